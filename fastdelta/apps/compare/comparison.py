"""`fastdelta.compare`: the paper's comparison on the user's data, as a report they can regenerate.

Every method runs under identical settings and, per seed, the same data order (the batch sampler
is seeded by the run's seed only). The tuned hyperparameters of each method (those it declares with a
grid, alpha and beta for the paper's; CompareSettings.grid adds or replaces grids) are chosen on a
validation split carved from the training set (never the test set): over every combination ("grid"),
over the first (alpha) with the others fixed ("alpha", the default, 5x cheaper) or not at all ("none").
Outputs: report.json (schema below), report.md
and PNG figures (fastdelta.compare.figures), each written atomically at the end, plus runs/<name>/ with
every fit's result.json and history.jsonl. Weights (model.pt, loadable with fastdelta.load(runs/<name>))
only as CompareSettings.keep_models says: "chosen" (the default) keeps each method's first-seed final run
(<method>_seed0, fitted at the chosen hyperparameters), "all" every final run (every seed, and seed 0's
extra schedules), "none" none; search fits never keep weights. With reuse_runs, a reused final run that
should keep its weights but has no model.pt is fitted again.

report.json (schema "fastdelta.compare/1"): model, data, settings (the fit settings shared by every
run), compare (methods, seeds, search, grids), search {seed, split, results [{method, <each tuned
hyperparameter: value>, val_top1, status}], chosen {method: {hyperparameter: value}}}, runs [{name,
method, seed, <the chosen hyperparameters>, schedule, test_top1, test_top1_10crop, status, seconds,
curve [[iteration, test_top1]], train_loss [[iteration, ce]]}], table {method: {mean, std, n, values,
mean_10crop, std_10crop}}, best, filter_distances {method: {stage: {filters, mean, median, max, sorted_quantiles}}},
attention_split {method: {conv: {low_attention_mean, high_attention_mean, filters}}},
activation_maps {layer, images, classes, filters, maps {network: [[...]]}}, roughness
{"method/schedule": value}, claims {name: {holds, text}}, environment, wall_s.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from ...data.fingerprint import state_sha256
from ...data.inputs import check_output_outside_data
from ...environment import environment
from ...methods import METHODS
from ...progress import progress_bar
from ...run_folder import RunFolder
from ...settings import SettingsError, make_settings
from ...train.preempt import Preempted, StopOutsideTraining
from .analysis import curve_roughness
from .compare_settings import COMPARE_SETS, CompareSettings
from .probe import MapProbe, read_analysis, write_analysis
from .runs import Runner, reused_final
from .search import chosen_hyperparameters, fixed_values, run_search, search_grid
from .splits import test_data, train_root
from .evaluation import TensorSet, curve_subset

SCHEMA = "fastdelta.compare/1"


def compare(model, train, test=None, methods: Sequence[str] = tuple(METHODS), seeds: int = 3, search: str = "alpha",
            out="fastdelta-compare", weights=None, compare_settings: Optional[CompareSettings] = None,
            log=print, **fit_settings) -> dict:
    """Run `methods` x `seeds` under identical settings, write report.json / report.md / figures in `out`.

    fit_settings are fastdelta.fit settings shared by every run (iterations, batch_size, resize, crop, ...);
    alpha/beta there are the values used with search="none" (per method: compare_settings.alphas/betas).
    Returns the report dict (also in out/report.json)."""
    cs = compare_settings or CompareSettings()
    cs = dataclasses.replace(cs, methods=list(methods), seeds=seeds, search=search)
    cs.validate()
    for key in COMPARE_SETS:
        if key in fit_settings:
            raise SettingsError(f"compare sets {key!r} itself for each run; remove it from the settings")
    show_progress = bool(fit_settings.pop("progress", True))
    base = {**fit_settings, "progress": False}  # one bar for the whole comparison, none per fit
    base_settings = make_settings(**base)  # unknown or bad settings fail here, before any run
    check_output_outside_data(out, train, test)  # before the folder is marked as output
    test = test_data(train, test)
    out = Path(out)
    # the folder is marked as output (a data scan never takes it for a class) and locked while this runs;
    # SIGTERM/SIGINT stop it with a Preempted naming the runs that finished (its fits have no handler of their own)
    with RunFolder.claim(out, check_earlier=False), _StopCompare(out).installed():
        return _compare_in(out, model, weights, train, test, cs, base, base_settings, show_progress, log)


class _StopCompare(StopOutsideTraining):
    """SIGTERM/SIGINT during a comparison: stop at once with a Preempted that names the runs finished in
    out/runs (each saved whole when its fit ended) and how to take them back (reuse_runs)."""

    def __init__(self, out: Path):
        super().__init__(None, "comparing")
        self.out = Path(out)

    def preempted(self, signal_name: str) -> Preempted:
        runs = self.out / "runs"
        done = sorted(str(p.parent.relative_to(runs)) for p in runs.rglob("result.json")) if runs.is_dir() else []
        if done:
            shown = ", ".join(done[:8]) + (f" and {len(done) - 8} more" if len(done) > 8 else "")
            kept = (f"{len(done)} run{'s' if len(done) > 1 else ''} finished in {runs} ({shown}); run the same "
                    "command again with --reuse-runs (compare_settings.reuse_runs=True) to take them back "
                    "instead of fitting them again")
        else:
            kept = "no run had finished yet; start it again"
        return Preempted(signal_name, None, None, self.out, f"stopped by {signal_name} while comparing: {kept}")


def _compare_in(out: Path, model, weights, train, test, cs: CompareSettings, base: dict, base_settings,
                show_progress: bool, log) -> dict:
    t_start = time.perf_counter()
    runner = Runner(model, weights, base, out, log)
    searched = [m for m in cs.methods if cs.searched(METHODS[m])]
    n_grid = sum(len(search_grid(cs, METHODS[m], fixed_values(base_settings, m))) for m in searched)
    curve_runs = [(m, sch) for m in cs.methods if METHODS[m].learning_curve for sch in cs.schedules if sch != "step"]
    total = n_grid * cs.folds + cs.seeds * len(cs.methods) + len(curve_runs)  # every fit, each fold's too
    probe = MapProbe(model, weights, base, train, test, cs.map_images)
    runner.source_sha256 = state_sha256(probe.source)
    report = {"schema": SCHEMA, "compare": {**dataclasses.asdict(cs), "methods": list(cs.methods)}}
    with progress_bar(total, "compare", "fit", show_progress) as bar:
        search_record = (run_search(cs, runner, train_root(train), searched, base_settings, 0, bar)
                         if searched else None)
        chosen = chosen_hyperparameters(cs, search_record, base_settings)
        every = max(1, base_settings.iterations // cs.curve_points) if cs.curve_points else 0
        # attention once, from the first seed's L2-FE head, shared by every seed (as the paper computes
        # it once per dataset); it is deterministic given the data, weights and settings
        att = runner.attention(train_root(train), 0) if any(METHODS[m].uses_attention for m in cs.methods) else None
        if att is not None:
            att.save(out / "channel_attention.json")
        finals = _FinalRuns(cs, runner, probe, train, chosen, att, every)
        for seed in range(cs.seeds):
            for method, schedule in [(m, "step") for m in cs.methods] + (curve_runs if seed == 0 else []):
                finals.run(seed, method, schedule, bar)
    from .report import finish_report
    report.update(_report_sections(finals, search_record, t_start))
    return finish_report(report, out)


class _FinalRuns:
    """The final runs of a comparison (every method x seed, and seed 0's learning-curve schedules), each
    fitted or, when an earlier comparison finished it, reused; seed 0's figure inputs gathered as they come."""

    def __init__(self, cs: CompareSettings, runner: Runner, probe: "MapProbe", train, chosen: Dict[str, dict],
                 att, every: int):
        self.cs, self.runner, self.probe, self.train, self.chosen, self.att = cs, runner, probe, train, chosen, att
        self.every = every  # iterations between learning-curve points (0: none)
        self.test = probe.test
        self.fast_test = isinstance(self.test, TensorSet)  # the final top-1 by fast_top1, after the fit
        self.runs, self.distances, self.splits, self.first = [], {}, {}, None

    def run(self, seed: int, method: str, schedule: str, bar) -> None:
        """One final run, its row appended to `runs`."""
        name = f"{method}_seed{seed}" + ("" if schedule == "step" else f"_{schedule}")
        bar.set_postfix_str(name)
        analysed = seed == 0 and schedule == "step"  # its weights feed the figures
        res, secs = self._result(name, seed, method, schedule, analysed)
        self.first = self.first or res
        self.runs.append(_run_row(name, method, seed, schedule, self.chosen.get(method, {}), res, secs))
        if analysed:
            read_analysis(self.runner.out / "runs" / name, method, self.probe, self.distances, self.splits)
        bar.update(1)

    def _result(self, name: str, seed: int, method: str, schedule: str, analysed: bool):
        """(result, seconds) of the finished run reused, else of a new fit (seed 0's analysis written)."""
        cs, test, runner = self.cs, self.test, self.runner
        curve = seed == 0 and METHODS[method].learning_curve and self.every > 0
        curve_test = None if not curve else (
            test if cs.curve_images is None or not isinstance(test, TensorSet) else
            curve_subset(test, cs.curve_images))
        overrides = dict(seed=seed, lr_schedule=schedule, eval_every=self.every if curve else 0,
                         eval_images=cs.curve_images, **self.chosen.get(method, {}))
        fit_test = curve_test if self.fast_test else test
        final_test = test if self.fast_test else None
        digests = (self.probe.train_fingerprint, runner.fingerprint(fit_test))
        keep = cs.keeps_model(seed, schedule)
        res = reused_final(runner, name, method, digests, final_test, analysed, overrides, keep_model=keep) \
            if cs.reuse_runs else None
        if res is not None:
            return res, res.timings.get("total")
        res, secs = runner.fit(name, train_root(self.train), fit_test, method, final_test=final_test,
                               keep_model=keep, attention=self.att if METHODS[method].uses_attention else None, **overrides)
        if analysed:
            write_analysis(runner.out / "runs" / name, method, res, self.probe, self.att)
        return res, secs


def _report_sections(finals: _FinalRuns, search_record, t_start: float) -> dict:
    """What report.json holds beyond the comparison's settings: the runs, their table and figure inputs."""
    first, probe, att, runs = finals.first, finals.probe, finals.att, finals.runs
    per_run = {"method", "seed", "alpha", "beta", "lr_schedule", "eval_every", "attention", "resumed_from_iteration"}
    per_run |= {k for values in finals.chosen.values() for k in values}  # the tuned hyperparameters
    return {"model": first.model_info,
            "data": {**first.data, "test": probe.test_description, "overlap": probe.overlap},
            "settings": {k: v for k, v in first.settings.items() if k not in per_run},
            "search": search_record, "chosen": finals.chosen, "runs": runs,
            "table": _summary_table(runs, finals.cs.methods),
            "filter_distances": finals.distances, "attention_split": finals.splits,
            "activation_maps": probe.to_dict(),
            "roughness": {f"{r['method']}/{r['schedule']}": curve_roughness([v for _, v in r["curve"]])
                          for r in runs if r["curve"]},
            "attention": None if att is None else {
                "file": "channel_attention.json", "images": att.images, "impl": att.impl,
                "seconds": att.timings.get("total"), "shared_by_seeds": True, "head": att.head},
            "environment": environment(), "wall_s": round(time.perf_counter() - t_start, 1)}


def _run_row(name: str, method: str, seed: int, schedule: str, chosen: dict, res, secs) -> dict:
    ok = res.status == "ok"
    return {"name": name, "method": method, "seed": seed, "schedule": schedule, **chosen,
            "test_top1": res.test_top1 if ok else None, "test_top1_10crop": res.test_top1_10crop if ok else None,
            "status": res.status, "seconds": secs, "curve": _curve(res.history, "test_top1"),
            "train_loss": _downsample(_curve(res.history, "ce"))}


def _summary_table(runs, methods) -> dict:
    table = {}
    for m in methods:
        vals = [r["test_top1"] for r in runs if r["method"] == m and r["schedule"] == "step" and r["test_top1"] is not None]
        ten = [r["test_top1_10crop"] for r in runs if r["method"] == m and r["schedule"] == "step"
               and r.get("test_top1_10crop") is not None]
        n_all = sum(1 for r in runs if r["method"] == m and r["schedule"] == "step")
        table[m] = {"mean": float(np.mean(vals)) if vals else None,
                    "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0 if vals else None,
                    "n": len(vals), "diverged": n_all - len(vals), "values": vals,
                    "mean_10crop": float(np.mean(ten)) if ten else None,
                    "std_10crop": float(np.std(ten, ddof=1)) if len(ten) > 1 else (0.0 if ten else None)}
    return table


def _curve(history, key):
    return [[h["iteration"], h[key]] for h in history if h.get(key) is not None]


def _downsample(points, n=200):
    if len(points) <= n:
        return points
    idx = np.linspace(0, len(points) - 1, n).round().astype(int)
    return [points[i] for i in idx]
