"""The comparison report: the paper's four claims checked on the data, report.json and report.md."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ..ioutil import atomic_write_text
from ..methods import L2, L2SP, Delta, DeltaNoAtt
from ..settings import describe_conventions
from .figures import all_figures, describe_split, label


def _fmt(mean: Optional[float], std: Optional[float], n: int) -> str:
    if mean is None:
        return "diverged"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def _accuracy_verdict(rivals, beaten, margin, noise: float) -> str:
    """Whether DELTA's mean is best, and whether the deciding margin exceeds the seed noise."""
    if len(beaten) == len(rivals):
        closest = min(margin.values())
        return "DELTA has the best mean" + (f", by {closest:.2f} at least: less than the largest seed std."
                                            if closest < noise else ", by more than the largest seed std.")
    behind = [m for m in rivals if m not in beaten]
    gap = -min(margin[m] for m in behind)
    return (f"DELTA does not beat {', '.join(label(m) for m in behind)}: behind by up to {gap:.2f}, "
            + ("more than the largest seed std." if gap > noise else "within the largest seed std."))


def claims(report: dict) -> Dict[str, dict]:
    """Each of the paper's claims, decided from the numbers where a number can decide it."""
    out = {}
    table = report["table"]
    # the paper's claims are about DELTA against these baselines
    delta, l2_sp = Delta.name, L2SP.name
    d = table.get(delta, {}).get("mean")
    rivals = {m: table[m]["mean"] for m in (L2.name, l2_sp, DeltaNoAtt.name)
              if m in table and table[m]["mean"] is not None}
    if d is not None and rivals:
        beaten = [m for m, v in rivals.items() if d > v]
        margin = {m: d - v for m, v in rivals.items()}
        noise = max(table[delta]["std"] or 0.0, *(table[m]["std"] or 0.0 for m in rivals))
        out["accuracy"] = {
            "holds": len(beaten) == len(rivals),
            "text": (f"DELTA {d:.2f}% vs " + ", ".join(f"{label(m)} {v:.2f}% ({margin[m]:+.2f})" for m, v in rivals.items())
                     + f"; largest seed std {noise:.2f}. " + _accuracy_verdict(rivals, beaten, margin, noise))}
    rough = report.get("roughness", {})
    pairs = [(s, rough.get(f"{delta}/{s}"), rough.get(f"{l2_sp}/{s}")) for s in ("step", "exp")]
    pairs = [(s, a, b) for s, a, b in pairs if a is not None and b is not None]
    if pairs:
        holds = all(a < b for _, a, b in pairs)
        out["smoother_curve"] = {
            "holds": holds,
            "text": "roughness of the test-accuracy curve (mean |2nd difference|, points in %): "
                    + "; ".join(f"{s}: DELTA {a:.3f} vs L2-SP {b:.3f}" for s, a, b in pairs)
                    + (". DELTA's curve is smoother." if holds else ". DELTA's curve is not smoother everywhere.")}
    split = report.get("attention_split", {})
    if delta in split and l2_sp in split:
        rows = [(c, split[delta][c]["low_attention_mean"], split[l2_sp][c]["low_attention_mean"])
                for c in split[delta]]
        n = sum(a > b for _, a, b in rows)
        out["unactivated_filters_move"] = {
            "holds": n == len(rows),
            "text": f"low-attention half of each regularised conv, mean distance from w*: DELTA farther than "
                    f"L2-SP in {n} of {len(rows)} layers (" + "; ".join(f"{c}: {a:.4f} vs {b:.4f}" for c, a, b in rows)
                    + ")."}
    if report["activation_maps"]["images"]:
        out["attention_regions"] = {
            "holds": None,
            "text": "qualitative: see fig6_activation_maps.png (weakly active source filters after each method); "
                    "no number decides this claim."}
    return out


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
    lines = [f"# fastdelta compare: {m['arch']} ({m['weights']})", "",
             f"- data: {d['train']['num_samples']} training images, {d['test']['num_samples']} test images, "
             f"{d['num_classes']} classes, {s['resize']}/{s['crop']} px ({s['augmentation']} protocol)",
             f"- every run: {s['iterations']} iterations of batch {s['batch_size']}, lr {s['lr']} "
             f"(x{s['lr_gamma']} at {s['lr_step']}), momentum {s['momentum']}, "
             f"regularised layers {', '.join(m['layers'])}",
             f"- conventions: {describe_conventions(s)}",
             f"- seeds 0..{cs['seeds'] - 1} (same data order for every method of a seed); alpha/beta "
             + ("given" if report["search"] is None else
                f"chosen by {cs['search']} search on {describe_split(report['search'])}; the test set was "
                "never used to choose"),
             f"- device {report['environment']['device']}, torch {report['environment']['torch']}, "
             f"{report['environment']['date']}, wall time {report['wall_s'] / 60:.1f} min", "",
             "## Table 1 analog: test top-1 (%), mean ± std over seeds", "",
             "| method | alpha | beta | test top-1 | seeds |" + (" 10-crop |" if any(
                 v["mean_10crop"] is not None for v in table.values()) else ""),
             "|---|---|---|---|---|" + ("---|" if any(v["mean_10crop"] is not None for v in table.values()) else "")]
    for meth in cs["methods"]:
        t = table[meth]
        c = report["chosen"].get(meth, {})
        cell = _fmt(t["mean"], t["std"], t["n"])
        if meth == best:
            cell = f"**{cell}**"
        extra = f" {_fmt(t['mean_10crop'], t['std_10crop'], t['n'])} |" if t["mean_10crop"] is not None else ""
        seeds = ", ".join(f"{v:.2f}" for v in t["values"]) + (f" ({t['diverged']} diverged)" if t["diverged"] else "")
        lines.append(f"| {label(meth)} | {c.get('alpha', '-')} | {c.get('beta', '-')} | {cell} | {seeds} |{extra}")
    lines += ["", "(L2 and L2-FE use weight decay %g; alpha/beta apply to the other methods.)" % s["weight_decay"], ""]
    lines += _attention_warning(report)
    lines += ["## The paper's claims on this data", ""]
    for name, c in report["claims"].items():
        verdict = {True: "holds", False: "does not hold", None: "not decided by a number"}[c["holds"]]
        lines.append(f"- **{name.replace('_', ' ')}: {verdict}.** {c['text']}")
    lines += [""]
    captions = {"table1.png": "Table 1 analog", "fig3_curves.png": "Fig. 3 analog: learning curves",
                "fig4_search.png": "Fig. 4 analog: validation accuracy over the search grid",
                "fig5_filter_distance.png": "Fig. 5 analog: per-filter distance from the start point",
                "fig6_activation_maps.png": "Fig. 6 analog: weakly active source filters after fine-tuning"}
    for f in figures:
        lines += [f"## {captions[f]}", "", f"![{captions[f]}]({f})", ""]
    return "\n".join(lines)


def finish_report(report: dict, out: Path) -> dict:
    """Claims, figures, then report.json and report.md (each file written atomically)."""
    out = Path(out)
    table = report["table"]
    means = {k: v["mean"] for k, v in table.items() if v["mean"] is not None}
    report["best"] = max(means, key=means.get) if means else None
    report["claims"] = claims(report)
    figures = all_figures(report, out)
    report["figures"] = figures
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=_json_default))
    atomic_write_text(out / "report.md", markdown(report, figures))
    return report


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)
