"""`fastdelta.compare`: the paper's comparison on the user's data, as a report they can regenerate.

Every method runs under identical settings and, per seed, the same data order (the batch sampler
is seeded by the run's seed only). alpha/beta of the regularised methods are chosen on a
validation split carved from the training set (never the test set): a grid as in the paper
(0.0001, 0.001, 0.01, 0.1, 0.2), over alpha x beta ("grid"), over alpha with beta fixed ("alpha",
the default, 5x cheaper) or not at all ("none"). Outputs: report.json (schema below), report.md
and PNG figures (fastdelta.compare.figures), each written atomically at the end, plus runs/<name>/ with
every fit's result.json and history.jsonl (no weights, to keep the folder small).

report.json (schema "fastdelta.compare/1"): model, data, settings (the fit settings shared by every
run), compare (methods, seeds, search, grids), search {seed, split, results [{method, alpha, beta,
val_top1, status}], chosen {method: {alpha, beta}}}, runs [{name, method, seed, alpha, beta,
schedule, test_top1, test_top1_10crop, status, seconds, curve [[iteration, test_top1]],
train_loss [[iteration, ce]]}], table {method: {mean, std, n, values, mean_10crop, std_10crop}},
best, filter_distances {method: {stage: {filters, mean, median, max, sorted_quantiles}}},
attention_split {method: {conv: {low_attention_mean, high_attention_mean, filters}}},
activation_maps {layer, images, classes, filters, maps {network: [[...]]}}, roughness
{"method/schedule": value}, claims {name: {holds, text}}, environment, wall_s.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ...attention.measure import compute_attention
from ...data import resolve_data
from ...data.errors import DataError
from ...data.fingerprint import array_fingerprint, dataset_fingerprint, fingerprint_of, state_sha256
from ..demo import environment
from ...fitting import fit
from ...output_files import atomic_write_text
from ...methods import METHODS
from ...methods.hyperparameters import PAPER_GRID  # noqa: F401  (re-exported: the paper's grid)
from ...methods.parameter_norm import tapped_conv
from ...networks.models import build_networks, guess_arch
from ...progress import progress_bar
from ...run_folder import RunFolder
from ...settings import LEGACY_VALUES, SettingsError, csv_floats, csv_list, json_object, make_settings, setting
from ...train.evaluate import evaluate
from ...train.loop import NonFiniteLossError
from .analysis import (activation_maps, attention_split_distances, curve_roughness, filter_distances,
                       min_max, pick_low_activation_filters, pick_map_layer, tap_maps)

SEARCHES = ("alpha", "grid", "none")
# the fit settings compare sets itself for each run
COMPARE_SETS = ("seed", "method", "run_dir", "resume", "eval_every", "eval_images", "attention", "lr_schedule")
# how a search run's folder names a hyperparameter's value (search/delta_a0.001_b0.01)
SHORT_NAMES = {"alpha": "a", "beta": "b"}
SCHEMA = "fastdelta.compare/1"


@dataclasses.dataclass
class CompareSettings:
    """How a comparison runs (the fit settings every run shares are FitSettings'); the command line's
    `compare` options are made from these fields."""
    methods: Sequence[str] = setting(tuple(METHODS), "methods to compare, comma separated", parse=csv_list)
    seeds: int = setting(3, "seeds 0 .. N-1")
    search: str = setting("alpha", "alpha (the others fixed), grid (every tuned hyperparameter) or none (the "
                          "settings' values)", choices=SEARCHES)
    alpha_grid: Optional[Sequence[float]] = setting(None, "alpha values to search, comma separated (default: each "
                                                    "method's grid, the paper's 0.0001, 0.001, 0.01, 0.1, 0.2)",
                                                    parse=csv_floats)
    beta_grid: Optional[Sequence[float]] = setting(None, "beta values of search grid (default: each method's grid)",
                                                   parse=csv_floats)
    val_fraction: float = setting(0.2, "share of each class's training images held out for the search")
    folds: int = setting(1, "K >= 2: choose the hyperparameters by K-fold cross-validation, as the paper (5), "
                         "instead of one holdout of val_fraction")
    schedules: Sequence[str] = setting(("step", "exp"), "Fig. 3: the first seed's l2_sp and delta also run with "
                                       "each of these lr schedules", parse=csv_list)
    curve_points: int = setting(10, "test evaluations along training for the learning curves (Fig. 3)")
    curve_images: Optional[int] = setting(2000, "test images per curve point (final tests use all)")
    map_images: int = setting(4, "test images in Fig. 6")
    alphas: Optional[Dict[str, float]] = setting(None, "per-method alpha with search none, a JSON object "
                                                 "(default: the settings' alpha, else the method's)",
                                                 parse=json_object)
    betas: Optional[Dict[str, float]] = setting(None, "per-method beta with search none, a JSON object",
                                                parse=json_object)
    reuse_runs: bool = setting(False, "take back the runs (search and final) an interrupted compare finished in "
                               "out, with the same settings, data and source weights, instead of refitting them",
                               flags=("--reuse-search",))

    def validate(self) -> None:
        methods = list(self.methods)
        bad = [m for m in methods if m not in METHODS]
        if not methods or bad or len(set(methods)) != len(methods):
            raise SettingsError(f"methods={methods!r}: expected distinct names from {', '.join(METHODS)}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise SettingsError(f"seeds={self.seeds!r}: must be an integer >= 1")
        if self.search not in SEARCHES:
            raise SettingsError(f"search={self.search!r}: expected one of {SEARCHES}")
        for name in ("alpha_grid", "beta_grid"):
            if getattr(self, name) is None:
                continue
            grid = list(getattr(self, name))
            if not grid or not all(isinstance(v, (int, float)) and v > 0 for v in grid):
                raise SettingsError(f"{name}={grid!r}: must be a non-empty list of numbers > 0")
        if not 0 < self.val_fraction < 1:
            raise SettingsError(f"val_fraction={self.val_fraction!r}: must be between 0 and 1")
        if not isinstance(self.folds, int) or isinstance(self.folds, bool) or self.folds < 1:
            raise SettingsError(f"folds={self.folds!r}: must be an integer >= 1 (1: one holdout of val_fraction)")
        if not set(self.schedules) <= {"step", "exp"}:
            raise SettingsError(f"schedules={list(self.schedules)!r}: expected 'step' and/or 'exp'")
        if self.curve_points < 0 or self.map_images < 0:
            raise SettingsError("curve_points and map_images must be >= 0")


def stratified_split(labels: np.ndarray, fraction: float, seed: int):
    """(fit indices, validation indices): `fraction` of each class (at least one image, and at least
    one left to train on) goes to validation."""
    rng = np.random.default_rng(seed)
    fit_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < 2:
            raise DataError(f"class {c} has {len(idx)} training image(s); the validation split needs at least 2 "
                            "per class (or use search='none')")
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        val_idx += idx[:k].tolist()
        fit_idx += idx[k:].tolist()
    return np.sort(fit_idx), np.sort(val_idx)


class _LabelledSubset(torch.utils.data.Dataset):
    """Part of the raw training data, keeping class names and labels so fit sees the same classes."""

    def __init__(self, base, indices, classes, labels):
        self.base, self.indices, self.classes = base, list(indices), list(classes)
        self.targets = [int(labels[i]) for i in self.indices]
        self._fingerprint = None

    def fingerprint(self) -> dict:
        """The base data's fingerprint with the indices and labels taken from it (computed once)."""
        if self._fingerprint is None:
            base = dataset_fingerprint(self.base)
            h = hashlib.sha256(base["sha256"].encode())
            h.update(np.asarray(self.indices, dtype=np.int64).tobytes())
            h.update(np.asarray(self.targets, dtype=np.int64).tobytes())
            self._fingerprint = {"sha256": h.hexdigest(), "of": f"{len(self)} items of: {base['of']}"}
        return self._fingerprint

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]


def stratified_folds(labels: np.ndarray, folds: int, seed: int):
    """[(fit indices, validation indices)] for K-fold cross-validation: each class's images, shuffled
    with `seed`, are dealt into K parts of near-equal size; fold k validates on part k of every class."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(folds)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < folds:
            raise DataError(f"class {c} has {len(idx)} training image(s); {folds}-fold cross-validation needs at "
                            f"least {folds} per class (use fewer folds or search='none')")
        for k, chunk in enumerate(np.array_split(idx, folds)):
            parts[k] += chunk.tolist()
    everything = np.arange(len(labels))
    return [(np.setdiff1d(everything, part), np.sort(part)) for part in parts]


def _raw_train(train):
    """The user's training data as (raw dataset or arrays, labels, class names), untransformed."""
    if isinstance(train, tuple):
        x, y = train
        y = np.asarray(y, dtype=np.int64)
        return train, y, [str(i) for i in range(int(y.max()) + 1)]
    from ...data.folder import ImageListDataset, scan_image_folder
    from ...data.inputs import _dataset_labels, _split_dataset_root
    if isinstance(train, (str, os.PathLike)):
        root, _ = _split_dataset_root(train)
        index = scan_image_folder(root, role="train folder")
        ds = ImageListDataset(index.samples, None)
        return ds, np.asarray(ds.targets, dtype=np.int64), index.classes
    labels = _dataset_labels(train, "train")
    names = getattr(train, "classes", None)
    return train, labels, [str(c) for c in names] if names is not None else [str(i) for i in range(labels.max() + 1)]


def _parts(raw, labels, classes, fit_idx, val_idx):
    if isinstance(raw, tuple):
        x, _ = raw
        return (x[fit_idx], labels[fit_idx]), (x[val_idx], labels[val_idx])
    return _LabelledSubset(raw, fit_idx, classes, labels), _LabelledSubset(raw, val_idx, classes, labels)


def validation_split(train, fraction: float, seed: int):
    """(fit part, validation part) of the training data, stratified per class."""
    raw, labels, classes = _raw_train(train)
    return _parts(raw, labels, classes, *stratified_split(labels, fraction, seed))


def validation_splits(train, cs: "CompareSettings", seed: int):
    """The search's (fit part, validation part) pairs: one holdout, or cs.folds cross-validation folds."""
    raw, labels, classes = _raw_train(train)
    if cs.folds == 1:
        return [_parts(raw, labels, classes, *stratified_split(labels, cs.val_fraction, seed))]
    return [_parts(raw, labels, classes, f, v) for f, v in stratified_folds(labels, cs.folds, seed)]


def _size(part) -> int:
    return len(part[1]) if isinstance(part, tuple) else len(part)


def _test_data(train, test):
    """The test split compare evaluates on: `test`, or DATA/test for a folder with train/ and test/."""
    if test is not None:
        return test
    if isinstance(train, (str, os.PathLike)) and (Path(train) / "test").is_dir():
        return Path(train) / "test"
    raise SettingsError("compare needs a test set (test=..., or a DATA folder with train/ and test/)")


def _train_root(train):
    if isinstance(train, (str, os.PathLike)) and (Path(train) / "train").is_dir():
        return Path(train) / "train"
    return train


def _grid(cs: CompareSettings, method: type, fixed: dict) -> list:
    """The points a search fits for `method`, each {hyperparameter: value} over its tuned ones: search
    "alpha" varies the first (alpha) with the others at `fixed`, "grid" every combination, the first
    varying fastest. A tuned hyperparameter's values are its declared grid, or alpha_grid / beta_grid."""
    grids = {h.name: list(h.grid) for h in method.hyperparameters if h.grid}
    for name, override in (("alpha", cs.alpha_grid), ("beta", cs.beta_grid)):
        if override is not None and name in grids:
            grids[name] = list(override)
    names = list(grids)
    searched = names if cs.search == "grid" else names[:1]
    points = [{}]
    for name in reversed(names):  # the first name innermost, as the paper's tables read
        values = grids[name] if name in searched else [fixed[name]]
        points = [{name: v, **rest} for rest in points for v in values]
    return [{k: p[k] for k in names} for p in points]


def _search_name(method: str, point: dict, fold: int, folds: int) -> str:
    return (f"search/{method}" + "".join(f"_{SHORT_NAMES.get(k, k)}{v:g}" for k, v in point.items())
            + (f"_fold{fold}" if folds > 1 else ""))


class _Runner:
    """Runs fits, catching divergence (a diverged run is recorded, never fatal to the comparison)."""

    def __init__(self, model, weights, base: dict, out: Path, log):
        self.model, self.weights, self.base, self.out, self.log = model, weights, base, out, log
        self.source_sha256: Optional[str] = None  # of the source weights every fit starts from
        self._fingerprints: dict = {}  # id(data) -> sha256: each split is hashed once per comparison

    def fit(self, name: str, train, test, method: str, final_test=None, **overrides):
        """One fit; with final_test (a _TensorSet), fit only evaluates `test` (curve points, or nothing)
        and the final top-1 comes from fast_top1 on final_test."""
        t0 = time.perf_counter()
        settings = {**self.base, **overrides}
        try:
            res = fit(self.model, train, test, method=method, weights=self.weights, **settings)
        except NonFiniteLossError as e:
            res = e.partial_result
        if final_test is not None and res.status == "ok":
            t1 = time.perf_counter()
            res.test = {"top1": fast_top1(res.model, final_test, settings.get("eval_batch_size", 256)),
                        "images": len(final_test), "fingerprint": self.fingerprint(final_test),
                        "evaluated": "train.evaluate.evaluate: channels_last on CPU, denormals flushed"}
            res.timings["test"] = round(time.perf_counter() - t1, 3)
        res.save(self.out / "runs" / name, weights=False)
        return res, round(time.perf_counter() - t0, 1)

    def finished(self, name: str, method: str, digests: tuple, **overrides) -> Optional[dict]:
        """The saved result.json of run `name` if it finished with exactly these settings, on the data
        whose fingerprints are `digests` (training part, evaluated part) from the same source weights,
        else None.

        Only the settings given here are compared (the stored ones also hold resolved defaults); data
        and weights by the fingerprints fit records (a result saved without them is not reused)."""
        path = self.out / "runs" / name / "result.json"
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        stored = saved.get("settings", {})
        wanted = {**self.base, **overrides, "method": method}
        for key, value in wanted.items():
            if key in ("progress", "attention"):
                continue
            if _plain(stored.get(key, value)) != _plain(value):
                return None
        # conventions added later: a result written before them used LEGACY_VALUES, not today's default
        resolved = make_settings(**{**self.base, **overrides, "method": method}).resolved()
        for key in _conventions_of(METHODS[method]):
            if _plain(stored.get(key, LEGACY_VALUES[key])) != _plain(getattr(resolved, key)):
                return None
        if not self._same_inputs(saved, digests):
            return None
        status = str(saved.get("status", ""))
        return saved if status == "ok" or status.startswith("diverged") else None

    def _same_inputs(self, saved: dict, digests: tuple) -> bool:
        recorded = saved.get("data") or {}
        then = [((recorded.get(split) or {}).get("fingerprint") or {}).get("sha256") for split in ("train", "test")]
        return then == list(digests) and (saved.get("model") or {}).get("source_sha256") == self.source_sha256

    def fingerprint(self, part) -> Optional[str]:
        """The data's fingerprint (None for no data), computed once per object."""
        if part is None:
            return None
        if id(part) not in self._fingerprints:
            self._fingerprints[id(part)] = fingerprint_of(part)["sha256"]
        return self._fingerprints[id(part)]

    def attention(self, train, seed: int):
        return compute_attention(self.model, train, weights=self.weights, **{**self.base, "seed": seed})


def _conventions_of(method: type) -> tuple:
    """The LEGACY_VALUES settings that change what `method` computes."""
    if not method.uses_attention:
        return ()
    return ("attention_sample", "attention_normalisation") + (("delta_scale",) if method.uses_source_features else ())


def _search(cs: CompareSettings, runner: _Runner, train, methods, base_settings, seed: int, bar) -> dict:
    """Every grid point of every method fitted on each split's fit part and scored on its validation part
    (the mean over folds with cross-validation); the best score wins, ties keep the earlier point (the
    smaller alpha)."""
    splits = validation_splits(train, cs, seed)
    uses_attention = any(METHODS[m].uses_attention for m in methods)
    attention = [runner.attention(fit_part, seed) if uses_attention else None for fit_part, _ in splits]
    results, chosen = [], {}
    for method in methods:
        best = None
        for point in _grid(cs, METHODS[method], _fixed_values(base_settings, method)):
            bar.set_postfix_str(f"search {method} " + " ".join(f"{k}={v:g}" for k, v in point.items()))
            folds = [_search_fit(runner, cs, method, point, seed, k, part, att)
                     for k, (part, att) in enumerate(zip(splits, attention))]
            ok = all(f["status"] == "ok" for f in folds)
            top1 = float(np.mean([f["val_top1"] for f in folds])) if ok else None
            status = "ok" if ok else next(f["status"] for f in folds if f["status"] != "ok")
            record = {"method": method, **point, "val_top1": top1, "status": status,
                      "seconds": _total_seconds(folds), "reused": all(f["reused"] for f in folds)}
            if cs.folds > 1:
                record["folds"] = folds
            results.append(record)
            if top1 is not None and (best is None or top1 > best[0]):
                best = (top1, point)
            bar.update(1)
        if best is None:
            raise RuntimeError(f"search: every {method} run diverged; see {runner.out / 'runs' / 'search'}")
        chosen[method] = {**best[1], "val_top1": best[0]}
    split = ({"fit": _size(splits[0][0]), "val": _size(splits[0][1]), "val_fraction": cs.val_fraction}
             if cs.folds == 1 else {"folds": cs.folds, "fit": [_size(f) for f, _ in splits],
                                    "val": [_size(v) for _, v in splits]})
    return {"seed": seed, "split": split, "results": results, "chosen": chosen}


def _fixed_values(s, method: str) -> dict:
    """`method`'s hyperparameters as the settings give them (its defaults where they leave them at None)."""
    resolved = dataclasses.replace(s, method=method).resolved()
    return {name: getattr(resolved, name) for name in METHODS[method].declared()}


def _search_fit(runner: _Runner, cs: CompareSettings, method: str, point: dict, seed: int,
                fold: int, part, attention) -> dict:
    """One search fit (or the finished one reused): its validation top-1 and status."""
    fit_part, val_part = part
    name = _search_name(method, point, fold, cs.folds)
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


def _total_seconds(folds) -> Optional[float]:
    secs = [f["seconds"] for f in folds]
    return None if any(v is None for v in secs) else round(float(sum(secs)), 1)


def _plain(value):
    """A setting as JSON stores it (tuples become lists), so saved and requested values compare equal."""
    return json.loads(json.dumps(value, default=str))


def _curve(history, key):
    return [[h["iteration"], h[key]] for h in history if h.get(key) is not None]


def _downsample(points, n=200):
    if len(points) <= n:
        return points
    idx = np.linspace(0, len(points) - 1, n).round().astype(int)
    return [points[i] for i in idx]


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


class _TensorSet(torch.utils.data.Dataset):
    """A transformed split held as one tensor: fit passes CHW tensors through untransformed."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes):
        self.x, self.targets, self.classes = x, y.tolist(), list(classes)
        self._fingerprint = None

    def fingerprint(self) -> dict:
        """SHA-256 of the tensors and labels (computed once): which test set a top-1 was measured on."""
        if self._fingerprint is None:
            self._fingerprint = array_fingerprint(self.x.numpy(), np.asarray(self.targets))
        return self._fingerprint

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def _curve_subset(test: _TensorSet, n: int) -> _TensorSet:
    """n test images for the curve points: the first n, unless they leave a class out (a class-ordered
    set, e.g. an image folder), then each class's first images in turn, so that every class is tested."""
    targets = np.asarray(test.targets)
    if len(np.unique(targets[:n])) == len(np.unique(targets)):
        return _TensorSet(test.x[:n], torch.as_tensor(test.targets[:n]), test.classes)
    rank = np.zeros(len(targets), dtype=np.int64)  # position of each image within its class
    for c in np.unique(targets):
        rank[targets == c] = np.arange(int((targets == c).sum()))
    idx = torch.as_tensor(np.sort(np.lexsort((np.arange(len(targets)), rank))[:n]))
    return _TensorSet(test.x[idx], torch.as_tensor(targets)[idx], test.classes)


def materialise(dataset, classes, batch_size: int = 256) -> _TensorSet:
    """Decode and transform a deterministic (centre-crop) split once; every run then reuses the tensors
    instead of decoding and resizing the same test images again (the test set is the same for all runs)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    xs, ys = zip(*[(x, y) for x, y in loader])
    return _TensorSet(torch.cat(xs), torch.cat(ys), classes)


def fast_top1(model, test: _TensorSet, batch_size: int = 256) -> float:
    """Top-1 on a held tensor split through train.evaluate.evaluate (channels_last on CPU, denormals flushed),
    fed slices of the held tensors instead of a per-item DataLoader."""
    device = next(model.parameters()).device
    return evaluate(model, _Batches(test, batch_size), device, progress=False)["top1"]


class _Batches:
    """(x, y) batches sliced from a _TensorSet, in order (what train.evaluate.evaluate iterates)."""

    def __init__(self, test: _TensorSet, batch_size: int):
        self.test, self.batch_size = test, batch_size

    def __len__(self):
        return -(-len(self.test) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.test), self.batch_size):
            yield self.test.x[i:i + self.batch_size], torch.as_tensor(self.test.targets[i:i + self.batch_size])


class _MapProbe:
    """Fig. 6 inputs fixed once from the source network: layer, test images, weakly active filters."""

    def __init__(self, model, weights, base: dict, train, test, n_images: int):
        s = make_settings(**base).resolved(model if isinstance(model, str) else guess_arch(model))
        data = resolve_data(_train_root(train), test, augmentation=s.augmentation, resize=s.resize, crop=s.crop,
                            allow_overlap=s.allow_overlap)
        # the "improved" protocol's 10-crop items are 4-D: those stay a transformed dataset
        self.test = materialise(data.test, data.classes) if s.augmentation == "default" else test
        self.test_description = data.description["test"]
        self.overlap = data.description["overlap"]  # train/test overlap, checked here on the user's data
        self.train_fingerprint = data.description["train"]["fingerprint"]["sha256"]  # as each fit records it
        nets = build_networks(model, len(data.classes), weights, s.layers, s.seed)
        self.source, self.head_name, self.layers = nets.source, nets.head_name, nets.layers
        images, labels, seen = [], [], set()
        for i in range(len(data.test)):  # first image of distinct classes
            x, y = data.test[i]
            if y not in seen:
                seen.add(y)
                images.append(x)
                labels.append(data.classes[y])
            if len(images) >= n_images:
                break
        self.images = torch.stack(images) if images else None
        self.classes = labels
        self.layer = pick_map_layer(self.source, self.layers, self.images[0]) if images else None
        self.filters = pick_low_activation_filters(tap_maps(self.source, self.layer, self.images)) if images else []
        self.maps = {"source": activation_maps(self.source, self.layer, self.images, self.filters)} if images else {}
        self.conv_names = [tapped_conv(self.source, l, int(tap_maps(self.source, l, self.images[:1]).shape[1]))
                           for l in self.layers] if images else []

    def maps_of(self, model):
        """The trained network's activation maps of the probe's filters and images (None without images)."""
        return None if self.images is None else activation_maps(model.cpu(), self.layer, self.images, self.filters)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "classes": self.classes, "filters": self.filters, "maps": self.maps,
                "images": [] if self.images is None else [self._display(x) for x in self.images]}

    @staticmethod
    def _display(x: torch.Tensor) -> list:
        """The normalised input as a [0, 1] grey image (channel mean), for the figure."""
        return np.round(min_max(x.float().mean(0)), 3).tolist()


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
    test = _test_data(train, test)
    out = Path(out)
    # the folder is marked as output (a data scan never takes it for a class) and locked while this runs
    with RunFolder.claim(out, check_earlier=False):
        return _compare_in(out, model, weights, train, test, cs, base, base_settings, show_progress, log)


def _compare_in(out: Path, model, weights, train, test, cs: CompareSettings, base: dict, base_settings,
                show_progress: bool, log) -> dict:
    t_start = time.perf_counter()
    runner = _Runner(model, weights, base, out, log)
    searched = [m for m in cs.methods if METHODS[m].tuned] if cs.search != "none" else []
    n_grid = sum(len(_grid(cs, METHODS[m], _fixed_values(base_settings, m))) for m in searched)
    curve_runs = [(m, sch) for m in cs.methods if METHODS[m].learning_curve for sch in cs.schedules if sch != "step"]
    total = n_grid + cs.seeds * len(cs.methods) + len(curve_runs)
    probe = _MapProbe(model, weights, base, train, test, cs.map_images)
    runner.source_sha256 = state_sha256(probe.source)
    report = {"schema": SCHEMA, "compare": {**dataclasses.asdict(cs), "methods": list(cs.methods)}}
    with progress_bar(total, "compare", "fit", show_progress) as bar:
        search_record = (_search(cs, runner, _train_root(train), searched, base_settings, 0, bar)
                         if searched else None)
        chosen = _chosen(cs, search_record, base_settings)
        every = max(1, base_settings.iterations // cs.curve_points) if cs.curve_points else 0
        # attention once, from the first seed's L2-FE head, shared by every seed (as the paper computes
        # it once per dataset); it is deterministic given the data, weights and settings
        att = runner.attention(_train_root(train), 0) if any(METHODS[m].uses_attention for m in cs.methods) else None
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

    def __init__(self, cs: CompareSettings, runner: _Runner, probe: "_MapProbe", train, chosen: Dict[str, dict],
                 att, every: int):
        self.cs, self.runner, self.probe, self.train, self.chosen, self.att = cs, runner, probe, train, chosen, att
        self.every = every  # iterations between learning-curve points (0: none)
        self.test = probe.test
        self.fast_test = isinstance(self.test, _TensorSet)  # the final top-1 by fast_top1, after the fit
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
            _read_analysis(self.runner.out / "runs" / name, method, self.probe, self.distances, self.splits)
        bar.update(1)

    def _result(self, name: str, seed: int, method: str, schedule: str, analysed: bool):
        """(result, seconds) of the finished run reused, else of a new fit (seed 0's analysis written)."""
        cs, test, runner = self.cs, self.test, self.runner
        curve = seed == 0 and METHODS[method].learning_curve and self.every > 0
        curve_test = None if not curve else (
            test if cs.curve_images is None or not isinstance(test, _TensorSet) else
            _curve_subset(test, cs.curve_images))
        overrides = dict(seed=seed, lr_schedule=schedule, eval_every=self.every if curve else 0,
                         eval_images=cs.curve_images, **self.chosen.get(method, {}))
        fit_test = curve_test if self.fast_test else test
        final_test = test if self.fast_test else None
        digests = (self.probe.train_fingerprint, runner.fingerprint(fit_test))
        res = _reused_final(runner, name, method, digests, final_test, analysed, overrides) if cs.reuse_runs else None
        if res is not None:
            return res, res.timings.get("total")
        res, secs = runner.fit(name, _train_root(self.train), fit_test, method, final_test=final_test,
                               attention=self.att if METHODS[method].uses_attention else None, **overrides)
        if analysed:
            _write_analysis(runner.out / "runs" / name, method, res, self.probe, self.att)
        return res, secs


def _report_sections(finals: _FinalRuns, search_record, t_start: float) -> dict:
    """What report.json holds beyond the comparison's settings: the runs, their table and figure inputs."""
    first, probe, att, runs = finals.first, finals.probe, finals.att, finals.runs
    return {"model": first.model_info,
            "data": {**first.data, "test": probe.test_description, "overlap": probe.overlap},
            "settings": {k: v for k, v in first.settings.items()
                         if k not in ("method", "seed", "alpha", "beta", "lr_schedule", "eval_every",
                                      "attention", "resumed_from_iteration")},
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


# the first seed's figures' inputs that need its trained weights, kept beside its result.json so that
# a finished run is reused without its weights (compare saves none)
ANALYSIS_FILE = "analysis.json"


def _write_analysis(folder: Path, method: str, res, probe: "_MapProbe", att) -> None:
    """Filter distances to the source, split by attention, and activation maps of the trained network."""
    model = res.model.cpu()
    record = {"device": "cpu",  # where these figures' inputs were computed: always on the CPU copy
              "filter_distances": filter_distances(model, probe.source, probe.head_name),
              "attention_split": (attention_split_distances(model, probe.source, probe.conv_names, att.weights)
                                  if att is not None and probe.conv_names else None),
              "activation_maps": probe.maps_of(model) if METHODS[method].activation_map else None}
    atomic_write_text(folder / ANALYSIS_FILE, json.dumps(_plain(record)))


def _read_analysis(folder: Path, method: str, probe: "_MapProbe", distances: dict, splits: dict) -> None:
    analysis = json.loads((folder / ANALYSIS_FILE).read_text())
    distances[method] = analysis["filter_distances"]
    if analysis["attention_split"] is not None:
        splits[method] = analysis["attention_split"]
    if analysis["activation_maps"] is not None:
        probe.maps[method] = analysis["activation_maps"]


class _ReusedRun:
    """A final run an interrupted comparison finished: its result.json and history.jsonl, read back."""

    def __init__(self, saved: dict, history: list):
        self.status, self.test, self.history = saved["status"], saved.get("test") or {}, history
        self.model_info, self.data, self.settings = saved["model"], saved["data"], saved["settings"]
        self.timings = saved.get("timings_s", {})

    @property
    def test_top1(self):
        return self.test.get("top1")

    @property
    def test_top1_10crop(self):
        return self.test.get("top1_10crop")


def _reused_final(runner: "_Runner", name: str, method: str, digests: tuple, final_test, analysed: bool,
                  overrides: dict) -> Optional[_ReusedRun]:
    """The final run `name` if it finished with these settings on the same data (its top-1 measured on
    the same final test set), with its analysis for a seed-0 run; else None (it is fitted again)."""
    saved = runner.finished(name, method, digests, **overrides)
    folder = runner.out / "runs" / name
    if saved is None or not (folder / "history.jsonl").is_file() or (analysed and not (folder / ANALYSIS_FILE).is_file()):
        return None
    if final_test is not None and saved["status"] == "ok" and \
            (saved.get("test") or {}).get("fingerprint") != runner.fingerprint(final_test):
        return None
    history = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines() if line.strip()]
    return _ReusedRun(saved, history)


def _chosen(cs: CompareSettings, search_record, s) -> Dict[str, dict]:
    """The tuned hyperparameters per method: from the search, else the given per-method alphas / betas,
    the settings' values or the method's defaults."""
    chosen = {}
    for m in cs.methods:
        tuned = METHODS[m].tuned
        if not tuned:
            continue
        if search_record is not None:
            chosen[m] = {k: search_record["chosen"][m][k] for k in tuned}
            continue
        given = {"alpha": (cs.alphas or {}).get(m), "beta": (cs.betas or {}).get(m)}
        fixed = _fixed_values(s, m)
        chosen[m] = {k: given[k] if given.get(k) is not None else fixed[k] for k in tuned}
    return chosen
