"""Choosing the tuned hyperparameters (each method's first, alpha for the paper's; every one with search
"grid") on validation data: every grid point of every method fitted on each fit part and scored on its
validation part; the best mean wins."""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import numpy as np

from ...methods import METHODS
from .compare_settings import CompareSettings
from .runs import Runner
from .splits import split_size, validation_splits

# how a search run's folder names a hyperparameter's value (search/delta_a0.001_b0.01)
SHORT_NAMES = {"alpha": "a", "beta": "b"}


def search_grid(cs: CompareSettings, method: type, fixed: dict) -> list:
    """The points a search fits for `method`, each {hyperparameter: value} over its tuned ones (cs.tuned):
    those the search varies (cs.searched: search "alpha" the first, "grid" every one) over their values,
    the others at `fixed`; every combination, the first varying fastest. A tuned hyperparameter's values
    are the comparison's grid for it (cs.grids()), else its declared grid."""
    given = cs.grids()
    grids = {h.name: list(given.get(h.name) or h.grid) for h in method.hyperparameters if h.name in cs.tuned(method)}
    names = list(grids)
    searched = cs.searched(method)
    points = [{}]
    for name in reversed(names):  # the first name innermost, as the paper's tables read
        values = grids[name] if name in searched else [fixed[name]]
        points = [{name: v, **rest} for rest in points for v in values]
    return [{k: p[k] for k in names} for p in points]


def search_run_name(method: str, point: dict, fold: int, folds: int) -> str:
    return (f"search/{method}" + "".join(f"_{SHORT_NAMES.get(k, k)}{v:g}" for k, v in point.items())
            + (f"_fold{fold}" if folds > 1 else ""))


def run_search(cs: CompareSettings, runner: Runner, train, methods, base_settings, seed: int, bar) -> dict:
    """Every grid point of every method fitted on each split's fit part and scored on its validation part
    (the mean over folds with cross-validation); the best score wins, ties keep the earlier point (the
    smaller alpha)."""
    splits = validation_splits(train, cs, seed)
    uses_attention = any(METHODS[m].uses_attention for m in methods)
    attention = [runner.attention(fit_part, seed) if uses_attention else None for fit_part, _ in splits]
    results, chosen = [], {}
    for method in methods:
        best = None
        for point in search_grid(cs, METHODS[method], fixed_values(base_settings, method)):
            where = f"search {method} " + " ".join(f"{k}={v:g}" for k, v in point.items())
            folds = []
            for k, (part, att) in enumerate(zip(splits, attention)):  # the bar counts every fit, fold by fold
                bar.set_postfix_str(where + (f" fold {k + 1}/{cs.folds}" if cs.folds > 1 else ""))
                folds.append(search_fit(runner, cs, method, point, seed, k, part, att))
                bar.update(1)
            ok = all(f["status"] == "ok" for f in folds)
            top1 = float(np.mean([f["val_top1"] for f in folds])) if ok else None
            status = "ok" if ok else next(f["status"] for f in folds if f["status"] != "ok")
            record = {"method": method, **point, "val_top1": top1, "status": status,
                      "seconds": total_seconds(folds), "reused": all(f["reused"] for f in folds)}
            if cs.folds > 1:
                record["folds"] = folds
            results.append(record)
            if top1 is not None and (best is None or top1 > best[0]):
                best = (top1, point)
        if best is None:
            raise RuntimeError(f"search: every {method} run diverged; see {runner.out / 'runs' / 'search'}")
        chosen[method] = {**best[1], "val_top1": best[0]}
    split = ({"fit": split_size(splits[0][0]), "val": split_size(splits[0][1]), "val_fraction": cs.val_fraction}
             if cs.folds == 1 else {"folds": cs.folds, "fit": [split_size(f) for f, _ in splits],
                                    "val": [split_size(v) for _, v in splits]})
    return {"seed": seed, "split": split, "results": results, "chosen": chosen}


def fixed_values(s, method: str) -> dict:
    """`method`'s hyperparameters as the settings give them (its defaults where they leave them at None)."""
    resolved = dataclasses.replace(s, method=method).resolved()
    return {name: getattr(resolved, name) for name in METHODS[method].declared()}


def search_fit(runner: Runner, cs: CompareSettings, method: str, point: dict, seed: int,
                fold: int, part, attention) -> dict:
    """One search fit (or the finished one reused): its validation top-1 and status."""
    fit_part, val_part = part
    name = search_run_name(method, point, fold, cs.folds)
    saved = (runner.finished(name, method, tuple(runner.fingerprint(p) for p in part), **point,
                             seed=seed) if cs.reuse_runs else None)
    if saved is not None:
        status, secs = saved["status"], saved.get("timings_s", {}).get("total")
        top1 = (saved.get("test") or {}).get("top1") if status == "ok" else None
    else:
        res, secs = runner.fit(name, fit_part, val_part, method, **point, seed=seed,
                               attention=attention if METHODS[method].uses_attention else None)
        status, top1 = res.status, res.test_top1 if res.status == "ok" else None
    return {"fold": fold, "val_top1": top1, "status": status, "seconds": secs, "reused": saved is not None}


def total_seconds(folds) -> Optional[float]:
    secs = [f["seconds"] for f in folds]
    return None if any(v is None for v in secs) else round(float(sum(secs)), 1)


def chosen_hyperparameters(cs: CompareSettings, search_record, s) -> Dict[str, dict]:
    """The tuned hyperparameters per method: from the search, else the given per-method alphas / betas,
    the settings' values or the method's defaults."""
    chosen = {}
    for m in cs.methods:
        tuned = cs.tuned(METHODS[m])
        if not tuned:
            continue
        if search_record is not None:
            chosen[m] = {k: search_record["chosen"][m][k] for k in tuned}
            continue
        given = {"alpha": (cs.alphas or {}).get(m), "beta": (cs.betas or {}).get(m)}
        fixed = fixed_values(s, m)
        chosen[m] = {k: given[k] if given.get(k) is not None else fixed[k] for k in tuned}
    return chosen
