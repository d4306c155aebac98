"""Slim a results folder before it is committed: the summaries, figures and commands stay whole; what is
bulky and either duplicated or read by no report is cut. Run it on every new results folder:

    python3 benchmarks/slim_results.py benchmarks/results/NEW_FOLDER [...]   slims in place; a second run changes nothing
    python3 benchmarks/slim_results.py --dry-run FOLDER ...                  what it would do, bytes before and after
    python3 benchmarks/slim_results.py --plot RUN_DIR ...                    a run's history.png again, from its history
    python3 benchmarks/slim_results.py --palette FOLDER ...                  also figures as palette PNGs (lossy, checked)

What it does, per file (each step checks before it deletes):
- report.json -> report.json.gz: compact, the figures' data at float32's shortest digits
  (fastdelta.apps.compare.report.dumps_report), gzipped. Checked first: the claims and report.md's text computed
  from the slim report equal those computed from the original. Every reader takes either form
  (fastdelta.apps.compare.report.load_report; benchmarks/reproduce_*.py, refresh_reports.py).
- a run folder's (one with result.json) history.jsonl -> history.sampled.jsonl.gz: the first row, every k-th
  iteration (k = iterations / --history-rows, default 20 rows), every row with a test evaluation and the
  last row, float32 quantities at their shortest digits (fastdelta.result.load_history reads it). The
  comparison report already holds every run's test-accuracy curve and (200 points of) its training loss.
  With --history-rows 0 the whole history is kept, gzipped.
- a run folder's history.png: dropped (--plot draws it again from the kept rows).
- channel_attention.json: a copy whose content equals another one's under the same FOLDER (the
  comparison's own, or the first of the runs that share one) is dropped, and result.json's
  attention.file points at the kept one (a relative path). A kept copy is written compact, without
  "weights" and "public_layout" where ChannelAttention.load recomputes exactly those from "raw".
- result.json of a run: compact, with the history and attention pointers above.
- analysis.json of a run (a comparison's first seed: its figures' inputs): compact, and with "device": "cpu"
  where it lacks one (written before compare recorded it; compare computes it on the model's CPU copy).
- other PNG figures: re-encoded losslessly where that is smaller (pixels checked identical). With --palette,
  re-encoded instead as a 256-colour palette image where that is smaller and looks the same (every pixel
  within PALETTE_MAX_ERROR levels of the original in each channel, checked); the figure's PNG text says
  so. A plot has a few thousand colours, mostly anti-aliasing, so a palette changes nothing visible and
  saves about 60% of its bytes; a figure the palette cannot hold within that error stays lossless.
"""
import argparse
import gzip
import io
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastdelta.apps.compare.report import claims, markdown, report_bytes  # noqa: E402
from fastdelta.apps.compare.runs import ANALYSIS_DEVICE, ANALYSIS_FILE  # noqa: E402
from fastdelta.output_files import atomic_write  # noqa: E402

SAMPLED = "history.sampled.jsonl.gz"
ATTENTION = "channel_attention.json"
DERIVED_NOTE = ("weights and public_layout dropped by benchmarks/slim_results.py: ChannelAttention.load(path) "
                "recomputes the weights from raw (checked equal); public_layout is raw's lists in layer order")


class Slimmer:
    def __init__(self, dry_run: bool = False, history_rows: int = 20, log=print, palette: bool = False):
        self.dry_run, self.history_rows, self.log, self.palette = dry_run, history_rows, log, palette
        self.before = self.after = 0
        self.history_note = {}  # run folder -> result.json's "history" (the sampled file)

    # -------------------------------------------------------------- file operations (dry-run aware)
    def write(self, path: Path, data: bytes, old: Path = None) -> None:
        """Write `data` to `path` (replacing `old`, which is then removed, if given)."""
        old = old or path
        self.before += old.stat().st_size if old.is_file() else 0
        self.after += len(data)
        if path.is_file() and path.read_bytes() == data and old == path:
            return
        self.log(f"{'would write' if self.dry_run else 'wrote'} {path} ({len(data):,} bytes"
                 + (f", was {old.name}: {old.stat().st_size:,})" if old.is_file() else ")"))
        if self.dry_run:
            return
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        if old != path and old.is_file():
            old.unlink()

    def drop(self, path: Path, why: str) -> None:
        self.before += path.stat().st_size
        self.log(f"{'would drop' if self.dry_run else 'dropped'} {path} ({path.stat().st_size:,} bytes): {why}")
        if not self.dry_run:
            path.unlink()

    def keep(self, path: Path) -> None:
        size = path.stat().st_size
        self.before += size
        self.after += size

    # -------------------------------------------------------------- the folder
    def slim(self, folder: Path) -> None:
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        runs = sorted({p.parent for p in files if p.name == "result.json" and is_run(p.parent)})
        attention_home = self.dedupe_attention(folder, [p for p in files if p.name == ATTENTION], runs)
        for p in files:
            if not p.is_file() and not self.dry_run:
                continue  # removed above
            if p.name == "report.json":
                self.slim_report(p)
            elif p.name == ATTENTION and p in attention_home.values():
                self.slim_attention(p)
            elif p.name == ATTENTION:
                pass  # a dropped duplicate (counted there)
            elif p.parent in runs and p.name == "history.jsonl":
                self.sample_history(p)
            elif p.parent in runs and p.name == "history.png":
                self.drop(p, f"regenerate: python3 benchmarks/slim_results.py --plot {p.parent}")
            elif p.parent in runs and p.name == "result.json":
                self.slim_result(p, attention_home.get(p.parent))
            elif p.parent in runs and p.name == ANALYSIS_FILE:
                self.slim_analysis(p)
            elif p.suffix == ".png":
                self.slim_png(p)
            else:
                self.keep(p)

    # -------------------------------------------------------------- report.json
    def slim_report(self, path: Path) -> None:
        original = json.loads(path.read_bytes())
        data = report_bytes(original, gz=True)
        slim = json.loads(gzip.decompress(data))
        figures = original.get("figures") or []
        if claims(slim) != claims(original) or markdown(slim, figures) != markdown(original, figures):
            raise SystemExit(f"{path}: the slim report reads differently (claims or report.md); left as it is")
        self.write(path.with_name("report.json.gz"), data, old=path)

    # -------------------------------------------------------------- histories
    def sample_history(self, path: Path) -> None:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept, every = sample_rows(rows, self.history_rows)
        text = "".join(json.dumps(shortest32(r), separators=(",", ":")) + "\n" for r in kept)
        self.write(path.with_name(SAMPLED), gzip.compress(text.encode(), compresslevel=9, mtime=0), old=path)
        # the rule is in this file's docstring; history.png: `--plot RUN_DIR` draws it from these rows
        self.history_note[path.parent] = {"file": SAMPLED, "rows": len(kept), "of": len(rows), "every": every,
                                          "by": "benchmarks/slim_results.py"}

    # -------------------------------------------------------------- result.json of a run
    def slim_result(self, path: Path, attention_file) -> None:
        """Compact, with the pointers to the sampled history and the kept attention (history.jsonl and
        the run's files sort before result.json: their notes are in by now)."""
        result = json.loads(path.read_text())
        if path.parent in self.history_note:
            result["history"] = self.history_note[path.parent]
        if attention_file is not None and isinstance(result.get("attention"), dict):
            result["attention"]["file"] = os.path.relpath(attention_file, path.parent)
        self.write(path, json.dumps(result, separators=(",", ":")).encode())

    def slim_analysis(self, path: Path) -> None:
        analysis = json.loads(path.read_bytes())
        if "device" not in analysis:  # written before compare recorded where it computes them
            analysis = {"device": ANALYSIS_DEVICE, **analysis}
        self.write(path, json.dumps(analysis, separators=(",", ":")).encode())

    # -------------------------------------------------------------- channel_attention.json
    def dedupe_attention(self, folder: Path, paths, runs) -> dict:
        """{folder: the channel_attention.json it uses} after dropping copies with equal content; the kept
        copy of a group is the one outside run folders (the comparison's), else the first in path order."""
        groups = []  # [(content, [paths])]
        for p in paths:
            content = json.loads(p.read_text())
            for c, members in groups:
                if c == content:
                    members.append(p)
                    break
            else:
                groups.append((content, [p]))
        home = {}
        for _, members in groups:
            members.sort(key=lambda p: (p.parent in runs, len(p.parts), str(p)))
            kept = members[0]
            home[kept.parent] = kept
            for p in members[1:]:
                home[p.parent] = kept
                self.drop(p, f"same content as {os.path.relpath(kept, p.parent)}")
        return home

    def slim_attention(self, path: Path) -> None:
        from fastdelta.attention.weights import ChannelAttention
        d = json.loads(path.read_text())
        slim = dict(d)
        if "raw" in d and "weights" in d:
            recomputed = ChannelAttention.from_dict(d)
            same_weights = all(json.loads(json.dumps(w.tolist())) == d["weights"][l]
                               for l, w in zip(recomputed.layers, recomputed.weights))
            same_layout = d.get("public_layout") == [d["raw"][l] for l in d["layers"]]
            if same_weights and same_layout:
                slim = {k: v for k, v in d.items() if k not in ("weights", "public_layout")}
                slim["derived"] = DERIVED_NOTE
        self.write(path, json.dumps(slim, separators=(",", ":")).encode())

    # -------------------------------------------------------------- figures
    def slim_png(self, path: Path) -> None:
        from PIL import Image, PngImagePlugin
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            info = PngImagePlugin.PngInfo()
            for k, v in (im.text or {}).items():
                info.add_text(k, v)
            encoded = palette_png(im, info) if self.palette and im.mode in ("RGB", "RGBA") else None
            if encoded is None:
                buf = io.BytesIO()
                im.save(buf, "PNG", optimize=True, pnginfo=info)
                with Image.open(io.BytesIO(buf.getvalue())) as again:
                    same = again.mode == im.mode and again.size == im.size and again.tobytes() == im.tobytes()
                encoded = buf.getvalue() if same else None
        if encoded is not None and len(encoded) < len(data):
            self.write(path, encoded)
        else:
            self.keep(path)


PALETTE_MAX_ERROR = 16  # levels of 255, per channel, for any pixel; the mean is checked under one level


def palette_png(im, info):
    """`im` (RGB or RGBA) as a 256-colour palette PNG, or None where some pixel would move more than
    PALETTE_MAX_ERROR levels in a channel or the mean error would reach one level. Maximum coverage
    keeps the rare colours (legend swatches, thin lines) that median cut merges away."""
    from PIL import Image
    if im.mode == "RGBA" and im.getchannel("A").getextrema() != (255, 255):
        return None  # transparency: not what a palette of opaque colours holds
    rgb = im.convert("RGB")
    quantized = rgb.quantize(256, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE)
    error = np.abs(np.asarray(quantized.convert("RGB"), dtype=np.int16) - np.asarray(rgb, dtype=np.int16))
    if error.max() > PALETTE_MAX_ERROR or error.mean() >= 1:
        return None
    info.add_text("fastdelta-slim", f"256-colour palette: largest channel error {int(error.max())} of 255, "
                                    f"mean {error.mean():.3f}")
    buf = io.BytesIO()
    quantized.save(buf, "PNG", optimize=True, pnginfo=info)
    return buf.getvalue()


def is_run(folder: Path) -> bool:
    """A fit's folder (FitResult.save): result.json with the fit's method and iterations."""
    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and "method" in result and "iterations_run" in result


def sample_rows(rows, target: int):
    """(kept rows, k): the first row, every k-th iteration (k = ceil(len / target)), every row with a test
    evaluation and the last row; every row for target 0."""
    if target <= 0 or len(rows) <= target:
        return rows, 1
    every = math.ceil(len(rows) / target)
    kept = [r for i, r in enumerate(rows)
            if i == 0 or i == len(rows) - 1 or r.get("iteration", i) % every == 0
            or any(k.startswith("test") and v is not None for k, v in r.items())]
    return kept, every


def shortest32(value):
    """Floats that are exactly float32 at float32's shortest digits (everything else unchanged)."""
    if isinstance(value, dict):
        return {k: shortest32(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shortest32(v) for v in value]
    if isinstance(value, float) and math.isfinite(value) and float(np.float32(value)) == value:
        return float(str(np.float32(value)))
    return value


def plot(run_dir: Path) -> Path:
    from fastdelta.result import load_history, plot_history
    result = json.loads((run_dir / "result.json").read_text())
    out = run_dir / "history.png"
    plot_history(load_history(run_dir), out, f"{result.get('method')} — {(result.get('model') or {}).get('arch')}",
                 result.get('method'))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--dry-run", action="store_true", help="say what would change; change nothing")
    p.add_argument("--history-rows", type=int, default=20,
                   help="rows of each run's history kept on the regular grid (0: all of them, gzipped)")
    p.add_argument("--plot", action="store_true", help="draw RUN_DIR/history.png from the run's history")
    p.add_argument("--palette", action="store_true",
                   help="figures as 256-colour palette PNGs where that looks the same (checked per pixel)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.plot:
        for folder in a.folders:
            print(plot(Path(folder)))
        return 0
    s = Slimmer(a.dry_run, a.history_rows, log=(lambda *_: None) if a.quiet else print, palette=a.palette)
    for folder in map(Path, a.folders):
        if not folder.is_dir():
            raise SystemExit(f"{folder}: not a folder")
        s.slim(folder)
    print(f"{'would be' if a.dry_run else 'slimmed'}: {s.before:,} -> {s.after:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
