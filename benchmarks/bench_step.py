"""Training-step benchmark: every method, fastdelta's step engine next to the public recipe.

Same code as `fastdelta bench step ...` (fastdelta/apps/bench/). Writes bench_step.json (rewritten after
every row) and bench_step.md (method x engine: img/s, ms/step, ratio to the public recipe, ratio to the
same engine's L2 step, time to first step, peak GPU memory) to --out. Both engines run each method's
default alpha/beta/lr (recorded per row) on a random network whose BN statistics are calibrated first.

GPU, the benchmark configuration (ResNet-50, ResNet-101, EfficientNet-Lite0; batch 64, 224x224; all six
methods; public recipe + fastdelta "auto" = bf16 + channels_last + torch.compile "default"):
    python3 benchmarks/bench_step.py --out benchmarks/results/bench_step_gpu
Split over several calls (rows of an existing folder are kept with --append), with a safety budget:
    python3 benchmarks/bench_step.py --models resnet101 --time-budget 500 --out DIR
    python3 benchmarks/bench_step.py --models resnet50,efficientnet_lite0 --append --time-budget 500 --out DIR
Choosing the compile mode by measurement (DEFAULT_COMPILE_MODE in fastdelta/train/steps.py):
    python3 benchmarks/bench_step.py --models resnet101 --methods l2,delta --engines fastdelta \\
        --compile-modes off,default,max-autotune-no-cudagraphs,reduce-overhead --out DIR-modes
CPU smoke test (CI, tests/test_step.py):
    python3 benchmarks/bench_step.py --smoke --out /tmp/bench-smoke
The GPU session's summary table (benchmarks/gpu/session.sh; reads only JSON, imports no torch):
    python3 benchmarks/bench_step.py summary WORK_DIR [--out summary.txt]
"""
import json
import sys
from pathlib import Path

ANCHOR_METHODS = {"l2": "l2", "delta": "delta", "l2sp": "l2_sp"}  # the anchor script's names -> fastdelta's


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def anchor_rows(anchor: dict) -> list:
    """The anchor script's step rows ({"step/ARCH/MODE/amp=A/cl=C/compile=K": {...}}) as bench rows."""
    rows = []
    for key, value in (anchor or {}).items():
        parts = key.split("/")
        if len(parts) != 6 or parts[0] != "step" or parts[2] not in ANCHOR_METHODS:
            continue
        flags = dict(p.split("=", 1) for p in parts[3:])
        label = "anchor " + ("+".join(n for n, k in (("bf16", "amp"), ("cl", "cl"), ("compile", "compile"))
                                      if flags.get(k) == "1") or "fp32")
        row = {"model": parts[1], "method": ANCHOR_METHODS[parts[2]], "engine": label}
        if isinstance(value, dict):
            row.update(ms_per_step=value.get("ms_per_step"), img_per_s=value.get("img_per_s"),
                       first_step_s=value.get("first_step_s"), peak_gib=value.get("peak_gib"))
        else:
            row["error"] = str(value)
        rows.append(row)
    return rows


def _engine_order(engine: str) -> tuple:
    if engine.startswith("anchor"):
        return (0, engine != "anchor fp32", engine)
    if engine == "public":
        return (1, 0, engine)
    return (2, engine == "fastdelta", engine)  # fastdelta[eager] (and other variants) before fastdelta


def summary(work) -> str:
    """The session's summary: per model, method and engine img/s, ms/step, the ratio to the public
    re-implementation, first step, peak memory (step rows and anchor rows), then every part's exit status
    (status.tsv: name, exit, seconds, limit). Ends with a table row."""
    work = Path(work)
    step = _read_json(work / "bench_step_gpu" / "bench_step.json") or {}
    anchor = _read_json(work / "anchor.json") or {}
    rows = [r for r in step.get("rows", []) if isinstance(r, dict)]
    anchors = anchor_rows(anchor)
    env, config = step.get("environment", {}), step.get("config", {})
    machine = (work / "machine.txt").read_text().splitlines() if (work / "machine.txt").is_file() else []
    smoke = next((l.split()[0] for l in machine if l.startswith("SMOKE=")), "SMOKE=?")
    head = f"== summary: {env.get('gpu', env.get('device', 'no step rows'))}, torch {env.get('torch', '?')}"
    if config:
        head += (f"; batch {config.get('batch')}, {config.get('size')} px, {config.get('iters')} timed steps after "
                 f"{config.get('warmup')} warm-up; {smoke}")
    lines = [head, ""]
    if step.get("missing"):
        lines += [f"step rows: {step['missing']}", ""]
    if anchor.get("missing"):
        lines += [f"anchor rows: {anchor['missing']}", ""]

    fmt = lambda v, f="{:,.1f}": "-" if v is None else f.format(v)  # noqa: E731
    table = ["| model | method | engine | img/s | ms/step | vs public | first step s | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    headline = []
    every = rows + anchors
    for model in dict.fromkeys(r["model"] for r in every):
        for method in dict.fromkeys(r["method"] for r in every if r["model"] == model):
            group = [r for r in rows if (r["model"], r["method"]) == (model, method)]
            group += [r for r in anchors if (r["model"], r["method"]) == (model, method)]
            if not any(r["engine"] == "anchor fp32" for r in group):
                group.append({"model": model, "method": method, "engine": "anchor fp32"})
            pub = next((r for r in group if r["engine"] == "public" and "error" not in r), None)
            for r in sorted(group, key=lambda r: _engine_order(r["engine"])):
                if "error" in r:
                    table.append(f"| {model} | {method} | {r['engine']} | error: {str(r['error'])[:80]} | - | - | - | - |")
                    continue
                ips = r.get("img_per_s")
                ratio = ips / pub["img_per_s"] if ips and pub else None
                table.append(f"| {model} | {method} | {r['engine']} | {fmt(ips)} | {fmt(r.get('ms_per_step'), '{:.2f}')} | "
                             f"{fmt(ratio, '{:.2f}x')} | {fmt(r.get('first_step_s'), '{:.2f}')} | "
                             f"{fmt(r.get('peak_gib'), '{:.2f}')} |")
                if r["engine"] == "fastdelta" and ratio is not None:
                    headline.append(f"{method}: fastdelta {ips:,.1f} img/s = {ratio:.2f}x the public re-implementation "
                                    f"({pub['img_per_s']:,.1f} img/s)")
    if len(table) == 2:
        table.append("| - | - | no step rows | - | - | - | - | - |")
    lines += headline + ([""] if headline else []) + table + ["", "| part | exit | s | limit s |", "|---|---|---|---|"]
    status = (work / "status.tsv").read_text().splitlines() if (work / "status.tsv").is_file() else []
    for line in status:
        cells = (line.split("\t") + ["-"] * 4)[:4]
        if cells[1] == "124":
            cells[1] = "124 (timed out)"
        lines.append("| " + " | ".join(cells) + " |")
    if not status:
        lines.append("| - | no part ran | - | - |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["summary"]:
        import argparse
        p = argparse.ArgumentParser(prog="bench_step.py summary", description=summary.__doc__.split("\n\n")[0])
        p.add_argument("work", help="the session's work folder (bench_step_gpu/, anchor.json, status.tsv)")
        p.add_argument("--out", default=None, help="also write the summary to this file")
        a = p.parse_args(argv[1:])
        text = summary(a.work)
        if a.out:
            Path(a.out).write_text(text)
        print(text, end="")
        return text
    from fastdelta.apps.bench import main as bench_main  # torch and the package: not needed for the summary
    return bench_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
