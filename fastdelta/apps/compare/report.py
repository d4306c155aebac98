"""The comparison report: the paper's four claims checked on the data, report.json and report.md."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

from ...methods import L2, L2SP, Delta, DeltaNoAtt, method_class
from ...output_files import OutputError, atomic_write, atomic_write_text, reason
from ...settings import describe_conventions
from .figures import all_figures, describe_split, label


def _fmt(mean: Optional[float], std: Optional[float], n: int) -> str:
    if mean is None:
        return "diverged"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


# the baselines the paper claims DELTA beats on accuracy
ACCURACY_RIVALS = (L2.name, L2SP.name, DeltaNoAtt.name)
RULE = ("A claim \"DELTA is more accurate than X\" holds where the paired per-seed difference DELTA − X (same "
        "seed = same data order and head initialisation) has a mean greater than its spread (the sample std of the "
        "per-seed differences); it fails where the mean is below minus the spread; otherwise it is not decided: "
        "within the seed spread. With one seed no claim is decided. The accuracy claim holds only if it holds "
        "against every rival the paper claims DELTA beats that was run (L2, L2-SP, DELTA w/o ATT).")
# the same rule in one line, for the summaries that gather many reports
RULE_SHORT = ("a claim holds where the paired per-seed difference exceeds its spread (mean over seeds greater "
              "than the sample std of the per-seed differences), fails where the mean is below minus the spread, "
              "and is not decided otherwise or with one seed")


def paired_stats(values) -> dict:
    """{mean, std, n, values} of per-seed differences: std is the sample std (ddof=1), None below two seeds;
    mean None without any."""
    values = [float(v) for v in values]
    n = len(values)
    return {"mean": float(np.mean(values)) if n else None,
            "std": float(np.std(values, ddof=1)) if n > 1 else None, "n": n,
            "values": [round(v, 6) for v in values]}  # test top-1 has 2-4 decimals: no float noise in the file


def paired_difference(report: dict, rival: str, method: str = Delta.name) -> dict:
    """`method` − `rival` seed by seed over the runs of the step schedule that both finished (same seed =
    same data order and head initialisation): paired_stats plus the seeds."""
    top1 = {(r["method"], r["seed"]): r["test_top1"] for r in report.get("runs") or []
            if r.get("schedule", "step") == "step"}
    seeds = [s for s in sorted(s for m, s in top1 if m == method)
             if top1[(method, s)] is not None and top1.get((rival, s)) is not None]
    return {**paired_stats([top1[(method, s)] - top1[(rival, s)] for s in seeds]), "seeds": seeds}


def decide(stats: dict) -> Optional[bool]:
    """The rule: True where the mean exceeds the spread, False where it is below minus the spread, None
    otherwise (within the spread, or fewer than two seeds)."""
    if stats["n"] < 2:
        return None
    if stats["mean"] > stats["std"]:
        return True
    if stats["mean"] < -stats["std"]:
        return False
    return None


def _why_undecided(stats: dict) -> str:
    return {0: "no seed where both finished", 1: "one seed"}.get(stats["n"], "within the seed spread")


def _paired_text(stats: dict) -> str:
    if stats["n"] == 0:
        return "no paired seed"
    if stats["n"] == 1:
        return f"{stats['mean']:+.2f} (one seed)"
    return (f"{stats['mean']:+.2f} ± {stats['std']:.2f} ("
            + ", ".join(f"{v:+.2f}" for v in stats["values"]) + ")")


def _accuracy_claim(report: dict) -> Optional[dict]:
    table = report["table"]
    d = table.get(Delta.name, {}).get("mean")
    rivals = [m for m in ACCURACY_RIVALS if m in table and table[m]["mean"] is not None]
    if d is None or not rivals:
        return None
    paired = {m: paired_difference(report, m) for m in rivals}
    per = {m: decide(paired[m]) for m in rivals}
    holds = False if False in per.values() else True if all(per.values()) else None
    word = {True: "exceeds its spread", False: "below minus its spread"}
    parts = [f"{label(m)} {_paired_text(paired[m])}: " + (word[per[m]] if per[m] is not None else _why_undecided(paired[m]))
             for m in rivals]
    if holds is None:
        reasons = [_why_undecided(paired[m]) for m in rivals if per[m] is None]
        verdict = "not decided: " + ("within the seed spread" if "within the seed spread" in reasons else reasons[0])
    else:
        verdict = "holds" if holds else "does not hold"
    return {"holds": holds, "verdict": verdict, "rule": RULE,
            "paired": {m: {**paired[m], "holds": per[m]} for m in rivals},
            "text": (f"DELTA {d:.2f}% vs " + ", ".join(f"{label(m)} {table[m]['mean']:.2f}%" for m in rivals)
                     + " (means); DELTA − X paired by seed (points): " + "; ".join(parts) + ".")}


def claims(report: dict) -> Dict[str, dict]:
    """Each of the paper's claims, decided from the numbers where a number can decide it (the rule: RULE).
    The learning curves and the filter distances are measured on the first seed only: one seed's measurement
    decides nothing, so those claims say what seed 0 shows (seed0_agrees) and leave holds None."""
    out = {}
    # the paper's claims are about DELTA against these baselines
    delta, l2_sp = Delta.name, L2SP.name
    accuracy = _accuracy_claim(report)
    if accuracy is not None:
        out["accuracy"] = accuracy
    rough = report.get("roughness", {})
    pairs = [(s, rough.get(f"{delta}/{s}"), rough.get(f"{l2_sp}/{s}")) for s in ("step", "exp")]
    pairs = [(s, a, b) for s, a, b in pairs if a is not None and b is not None]
    if pairs:
        agrees = all(a < b for _, a, b in pairs)
        out["smoother_curve"] = {
            "holds": None, "verdict": "not decided: one seed", "seeds": 1, "seed0_agrees": agrees,
            "text": "one seed's measurement (the learning curves are recorded for seed 0 only): roughness of the "
                    "test-accuracy curve (mean |2nd difference|, points in %): "
                    + "; ".join(f"{s}: DELTA {a:.3f} vs L2-SP {b:.3f}" for s, a, b in pairs)
                    + (". In seed 0 DELTA's curve is smoother." if agrees
                       else ". In seed 0 DELTA's curve is not smoother everywhere.")}
    split = report.get("attention_split", {})
    if delta in split and l2_sp in split:
        rows = [(c, split[delta][c]["low_attention_mean"], split[l2_sp][c]["low_attention_mean"])
                for c in split[delta]]
        n = sum(a > b for _, a, b in rows)
        out["unactivated_filters_move"] = {
            "holds": None, "verdict": "not decided: one seed", "seeds": 1, "seed0_agrees": n == len(rows),
            "text": f"one seed's measurement (seed 0's fits): low-attention half of each regularised conv, mean "
                    f"distance from w*: DELTA farther than L2-SP in {n} of {len(rows)} layers ("
                    + "; ".join(f"{c}: {a:.4f} vs {b:.4f}" for c, a, b in rows) + ")."}
    if report["activation_maps"]["images"]:
        out["attention_regions"] = {
            "holds": None,
            "text": "qualitative: see fig6_activation_maps.png (weakly active source filters after each method); "
                    "no number decides this claim."}
    return out


def verdict(claim: dict, undecided: str = "not decided by a number") -> str:
    """The claim's verdict in words; `undecided` for a claim no number decides (one without its own)."""
    return claim.get("verdict") or {True: "holds", False: "does not hold", None: undecided}[claim["holds"]]


def claims_markdown(report: dict) -> list:
    """The claims section of report.md: the rule once, then one line per claim."""
    lines = ["## The paper's claims on this data", ""]
    if "accuracy" in report["claims"]:
        lines += [RULE, ""]
    for name, c in report["claims"].items():
        lines.append(f"- **{name.replace('_', ' ')}: {verdict(c)}.** {c['text']}")
    return lines + [""]


def _attention_warning(report: dict) -> list:
    """Attention is measured against the L2-FE head: a head near chance makes every weight noise."""
    head = (report.get("attention") or {}).get("head") or {}
    ce, classes = head.get("final_ce"), report["data"].get("num_classes")
    if ce is None or not classes:
        return []
    chance = float(np.log(classes))
    text = (f"Attention: the L2-FE head it is measured against ended at cross-entropy {ce:.3f} after "
            f"{head.get('iterations')} iterations (chance: ln {classes} = {chance:.3f}).")
    if ce > 0.9 * chance:
        text += (" **That is near chance: the frozen source features barely separate these classes at this "
                 "size, so the attention weights (DELTA, L2-SP(ATT)) are close to noise.**")
    return [text, ""]


def markdown(report: dict, figures) -> str:
    m, d, s, cs = report["model"], report["data"], report["settings"], report["compare"]
    table = report["table"]
    means = {k: v["mean"] for k, v in table.items() if v["mean"] is not None}
    best = max(means, key=means.get) if means else None
    columns = tuned_columns(report)
    tuned = "/".join(columns) or "hyperparameters"
    lines = [f"# fastdelta compare: {m['arch']} ({m['weights']})", "",
             f"- data: {d['train']['num_samples']} training images, {d['test']['num_samples']} test images, "
             f"{d['num_classes']} classes, {s['resize']}/{s['crop']} px ({s['augmentation']} protocol)",
             f"- every run: {s['iterations']} iterations of batch {s['batch_size']}, lr {s['lr']} "
             f"(x{s['lr_gamma']} at {s['lr_step']}), momentum {s['momentum']}, "
             f"regularised layers {', '.join(m['layers'])}",
             f"- conventions: {describe_conventions(s)}",
             f"- seeds 0..{cs['seeds'] - 1} (same data order for every method of a seed); {tuned} "
             + ("given" if report["search"] is None else
                f"chosen by {cs['search']} search on {describe_split(report['search'])}; the test set was "
                "never used to choose"),
             f"- device {report['environment']['device']}, torch {report['environment']['torch']}, "
             f"{report['environment']['date']}, wall time {report['wall_s'] / 60:.1f} min", "",
             "## Table 1 analog: test top-1 (%), mean ± std over seeds", "",
             "| method | " + "".join(f"{c} | " for c in columns) + "test top-1 | seeds |" + (" 10-crop |" if any(
                 v["mean_10crop"] is not None for v in table.values()) else ""),
             "|---|" + "---|" * len(columns) + "---|---|" + ("---|" if any(
                 v["mean_10crop"] is not None for v in table.values()) else "")]
    for meth in cs["methods"]:
        t = table[meth]
        c = report["chosen"].get(meth, {})
        cell = _fmt(t["mean"], t["std"], t["n"])
        if meth == best:
            cell = f"**{cell}**"
        extra = f" {_fmt(t['mean_10crop'], t['std_10crop'], t['n'])} |" if t["mean_10crop"] is not None else ""
        seeds = ", ".join(f"{v:.2f}" for v in t["values"]) + (f" ({t['diverged']} diverged)" if t["diverged"] else "")
        values = "".join(f"{c.get(k, '-')} | " for k in columns)
        lines.append(f"| {label(meth)} | {values}{cell} | {seeds} |{extra}")
    lines += ["", _regularisation_note(report, columns), ""]
    lines += kept_models_markdown(report)
    lines += _attention_warning(report)
    lines += claims_markdown(report)
    captions = {"table1.png": "Table 1 analog", "fig3_curves.png": "Fig. 3 analog: learning curves",
                "fig4_search.png": "Fig. 4 analog: validation accuracy over the search grid",
                "fig5_filter_distance.png": "Fig. 5 analog: per-filter distance from the start point",
                "fig6_activation_maps.png": "Fig. 6 analog: weakly active source filters after fine-tuning"}
    for f in figures:
        lines += [f"## {captions[f]}", "", f"![{captions[f]}]({f})", ""]
    return "\n".join(lines)


def kept_models_markdown(report: dict) -> list:
    """Where each method's kept model is (CompareSettings.keep_models), one line per method; nothing for a
    report from before keep_models (its runs kept no weights)."""
    keep = report["compare"].get("keep_models")
    if keep is None:
        return []
    lines = [f"Kept models (keep_models={keep!r}; load one with `fastdelta.load(folder)`):", ""]
    for meth in report["compare"]["methods"]:
        kept = [r["name"] for r in report["runs"] if r["method"] == meth and r["status"] == "ok"
                and (keep == "all" or (keep == "chosen" and r["seed"] == 0 and r["schedule"] == "step"))]
        where = ", ".join(f"`runs/{name}/model.pt`" for name in kept) if kept else "none"
        lines.append(f"- {label(meth)}: {where}")
    return lines + [""]


def tuned_columns(report: dict) -> list:
    """Table 1's hyperparameter columns: every hyperparameter chosen for a compared method (alpha and beta
    for the paper's methods), in the order the methods declare them."""
    chosen = report.get("chosen") or {}
    return list(dict.fromkeys(k for meth in report["compare"]["methods"] for k in chosen.get(meth, {})))


def _regularisation_note(report: dict, columns: list) -> str:
    """Which methods Table 1's columns do not regularise: those with weight decay (the settings' value)."""
    chosen, wd = report.get("chosen") or {}, report["settings"].get("weight_decay")
    decayed = [meth for meth in report["compare"]["methods"] if method_class(meth).uses_weight_decay
               and "weight_decay" not in chosen.get(meth, {})]
    parts = ([f"{' and '.join(label(meth) for meth in decayed)} use weight decay {wd:g}"]
             if decayed and wd is not None else [])
    if columns:
        parts.append(f"{'/'.join(columns)} apply to the methods that declare them")
    return f"({'; '.join(parts)}.)" if parts else ""


def finish_report(report: dict, out: Path) -> dict:
    """Claims, figures, then report.json and report.md (each file written atomically)."""
    out = Path(out)
    table = report["table"]
    means = {k: v["mean"] for k, v in table.items() if v["mean"] is not None}
    report["best"] = max(means, key=means.get) if means else None
    report["claims"] = claims(report)
    try:
        figures = all_figures(report, out)
        report["figures"] = figures
        save_report_json(report, out)
        atomic_write_text(out / "report.md", markdown(report, figures))
    except OSError as e:  # a full or read-only disk after hours of fits: say where the fits are kept
        raise OutputError(f"could not write the comparison report in {out}: {reason(e)}; every finished run is "
                          f"kept in {out / 'runs'}: free space (or make the folder writable) and run the same "
                          "command again with --reuse-runs, which writes the report without refitting",
                          e.errno) from e
    return report


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


# ---------------------------------------------------------------- report.json on disk
# report.json is written compact (no indentation) with the figures' data arrays (FIGURE_DATA) at float32's
# shortest digits: those values come from float32 tensors, so the digits past float32's precision are noise
# and dropping them loses nothing (the float32 value reads back the same). Committed results hold it gzipped
# (report.json.gz, benchmarks/slim_results.py); load_report reads either.
REPORT_FILES = ("report.json", "report.json.gz")
FIGURE_DATA = ("train_loss", "curve", "sorted_quantiles", "maps", "images")


def shortest_float32(value, keys=FIGURE_DATA, inside: bool = False):
    """`value` with every float under one of `keys` (at any depth) that is exactly a float32 replaced by the
    shortest decimal that reads back as the same float32; other values unchanged. Idempotent."""
    if isinstance(value, dict):
        return {k: shortest_float32(v, keys, inside or k in keys) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [shortest_float32(v, keys, inside) for v in value]
    if inside and isinstance(value, float) and math.isfinite(value) and float(np.float32(value)) == value:
        return float(str(np.float32(value)))
    return value


def dumps_report(report: dict) -> str:
    """report.json's text: compact, the figures' data at float32's shortest digits."""
    return json.dumps(shortest_float32(report), separators=(",", ":"), default=_json_default)


def report_path(folder) -> Optional[Path]:
    """folder/report.json, else folder/report.json.gz (committed results), else None."""
    for name in REPORT_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def load_report(where: Union[str, Path]) -> dict:
    """The report in a folder (report.json or report.json.gz) or in a file of either form."""
    path = Path(where)
    if path.is_dir():
        found = report_path(path)
        if found is None:
            raise FileNotFoundError(f"no report.json or report.json.gz in {path}")
        path = found
    data = path.read_bytes()
    return json.loads(gzip.decompress(data) if path.name.endswith(".gz") else data)


def report_bytes(report: dict, gz: bool) -> bytes:
    text = dumps_report(report).encode()
    return gzip.compress(text, compresslevel=9, mtime=0) if gz else text  # mtime 0: the same bytes every time


def save_report_json(report: dict, folder) -> Path:
    """Write the report where the folder keeps it: report.json.gz if that is there (committed results),
    else report.json."""
    folder = Path(folder)
    gz = (folder / "report.json.gz").is_file() and not (folder / "report.json").is_file()
    path = folder / REPORT_FILES[gz]
    data = report_bytes(report, gz)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path
