"""How a comparison runs: which methods and seeds, how the hyperparameters are searched, what the figures
hold. The fit settings every run shares are FitSettings'; the command line's `compare` options are made
from these fields."""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Sequence

from ...methods import METHODS
from ...methods.base import all_hyperparameters
from ...settings import SettingsError, csv_floats, csv_list, json_object, setting

SEARCHES = ("alpha", "grid", "none")
KEEP_MODELS = ("none", "chosen", "all")
# the older spellings of grid={name: values}
GRID_ALIASES = {"alpha_grid": "alpha", "beta_grid": "beta"}


def grid_option(text: str) -> dict:
    """'NAME=v1,v2' (one --grid option) -> {NAME: [v1, v2]}."""
    name, sep, values = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"expected NAME=v1,v2,..., got {text!r}")
    return {name.strip().replace("-", "_"): csv_floats(values)}


def _repeatable(f: dataclasses.Field) -> dataclasses.Field:
    """A dict setting whose option is given once per entry (`--grid a=1,2 --grid b=3`), merged."""
    return dataclasses.field(default=f.default, metadata={**f.metadata, "merge": True, "metavar": "NAME=V1,V2"})


# the fit settings compare sets itself for each run (val_fraction: its search holds out its own split)
COMPARE_SETS = ("seed", "method", "run_dir", "resume", "eval_every", "eval_images", "attention", "lr_schedule",
                "val_fraction")


@dataclasses.dataclass
class CompareSettings:
    """How a comparison runs (the fit settings every run shares are FitSettings'); the command line's
    `compare` options are made from these fields."""
    methods: Sequence[str] = setting(tuple(METHODS), "methods to compare, comma separated", parse=csv_list)
    seeds: int = setting(3, "seeds 0 .. N-1")
    search: str = setting("alpha", "alpha (each method's first tuned hyperparameter, alpha for the paper's, the "
                          "others fixed), grid (every tuned hyperparameter) or none (the settings' values)",
                          choices=SEARCHES)
    grid: Optional[Dict[str, Sequence[float]]] = _repeatable(setting(
        None, "the values the search tries for hyperparameter NAME (default: its declared grid, the paper's "
        "0.0001, 0.001, 0.01, 0.1, 0.2 for alpha and beta); a hyperparameter declared without a grid is then "
        "searched too; repeat for more names (Python: {name: [values]})",
        parse=grid_option))
    alpha_grid: Optional[Sequence[float]] = setting(None, "alpha values to search, comma separated: the same as "
                                                    "--grid alpha=...", parse=csv_floats)
    beta_grid: Optional[Sequence[float]] = setting(None, "beta values to search: the same as --grid beta=...",
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
    keep_models: str = setting("chosen", "which final runs write model.pt in runs/<name>/ (load it with "
                               "fastdelta.load): chosen (each method's first-seed run at the chosen "
                               "hyperparameters, <method>_seed0), all (every final run: every seed and "
                               "schedule) or none; search fits never keep weights", choices=KEEP_MODELS)

    def validate(self) -> None:
        methods = list(self.methods)
        bad = [m for m in methods if m not in METHODS]
        if not methods or bad or len(set(methods)) != len(methods):
            raise SettingsError(f"methods={methods!r}: expected distinct names from {', '.join(METHODS)}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise SettingsError(f"seeds={self.seeds!r}: must be an integer >= 1")
        if self.search not in SEARCHES:
            raise SettingsError(f"search={self.search!r}: expected one of {SEARCHES}")
        self._validate_grids(methods)
        if self.keep_models not in KEEP_MODELS:
            raise SettingsError(f"keep_models={self.keep_models!r}: expected one of {KEEP_MODELS}")
        if not 0 < self.val_fraction < 1:
            raise SettingsError(f"val_fraction={self.val_fraction!r}: must be between 0 and 1")
        if not isinstance(self.folds, int) or isinstance(self.folds, bool) or self.folds < 1:
            raise SettingsError(f"folds={self.folds!r}: must be an integer >= 1 (1: one holdout of val_fraction)")
        if not set(self.schedules) <= {"step", "exp"}:
            raise SettingsError(f"schedules={list(self.schedules)!r}: expected 'step' and/or 'exp'")
        if self.curve_points < 0 or self.map_images < 0:
            raise SettingsError("curve_points and map_images must be >= 0")
        for name in ("alphas", "betas"):
            self._validate_per_method(name, methods)

    def keeps_model(self, seed: int, schedule: str) -> bool:
        """Whether the final run of this seed and lr schedule writes model.pt (keep_models)."""
        return self.keep_models == "all" or (self.keep_models == "chosen" and seed == 0 and schedule == "step")

    def grids(self) -> Dict[str, list]:
        """{hyperparameter: the values searched} given here: `grid` with alpha_grid / beta_grid, each value
        of the declared type (as validate checks them)."""
        given = {GRID_ALIASES[k]: getattr(self, k) for k in GRID_ALIASES if getattr(self, k) is not None}
        for name, values in (self.grid or {}).items():
            if name in given:
                raise SettingsError(f"grid[{name!r}] and {name}_grid both give the values of {name}: give one")
            given[name] = values
        declared = all_hyperparameters()

        def typed(name, v):
            whole = name in declared and declared[name].type is int and isinstance(v, float) and v.is_integer()
            return int(v) if whole else v
        return {k: [typed(k, v) for v in values] if isinstance(values, (list, tuple)) else values
                for k, values in given.items()}

    def tuned(self, method: type) -> list:
        """The hyperparameters a search chooses for `method`: the declared ones with a grid, and those this
        comparison gives a grid, in declaration order."""
        given = self.grids() if self.grid or self.alpha_grid or self.beta_grid else {}
        return [h.name for h in method.hyperparameters if h.grid or h.name in given]

    def searched(self, method: type) -> list:
        """The tuned hyperparameters this search varies for `method` (search "alpha": the first)."""
        if self.search == "none":
            return []
        names = self.tuned(method)
        return names if self.search == "grid" else names[:1]

    def _validate_grids(self, methods: list) -> None:
        """Each grid names a number hyperparameter that this search varies for a compared method, and holds
        values it can take (a typo'd name or a grid the search ignores is never silent)."""
        if self.grid is not None and not isinstance(self.grid, dict):
            raise SettingsError(f"grid={self.grid!r}: expected a dict {{hyperparameter: values}}")
        grids = self.grids()
        declared = {h.name: h for m in methods for h in METHODS[m].hyperparameters}
        for name, values in grids.items():
            shown = f"grid[{name!r}]={values!r}"
            if name not in declared:
                raise SettingsError(f"{shown}: no compared method declares {name!r}; they declare "
                                    f"{', '.join(declared)}")
            h = declared[name]
            if h.choices is not None:
                raise SettingsError(f"{shown}: {name} is chosen from {h.choices}, not searched on a grid")
            if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
                raise SettingsError(f"{shown}: must be a non-empty list of numbers")
            for v in values:
                try:
                    h.check(v)
                except ValueError as e:
                    raise SettingsError(f"{shown}: {e}") from None
            if not any(name in self.searched(METHODS[m]) for m in methods):
                raise SettingsError(f"{shown}: search={self.search!r} does not vary {name} for "
                                    f"{', '.join(methods)} (search 'alpha' varies each method's first tuned "
                                    "hyperparameter, 'grid' every one, 'none' none)")

    def _validate_per_method(self, name: str, methods: list) -> None:
        """alphas / betas: {method: value} for methods compared here that take that hyperparameter, each a
        finite number > 0, used with search 'none' (a typo'd name or an ignored value is never silent)."""
        given = getattr(self, name)
        if given is None:
            return
        hyper = name[:-1]  # "alpha" / "beta"
        if not isinstance(given, dict):
            raise SettingsError(f"{name}={given!r}: expected a JSON object {{method: {hyper}}}")
        if self.search != "none":
            raise SettingsError(f"{name}={given!r}: used only with search='none' (CLI: --search none); search="
                                f"{self.search!r} chooses {hyper} on a validation split")
        for method, value in given.items():
            if method not in METHODS:
                raise SettingsError(f"{name}={given!r}: {method!r} is not a method; expected names from "
                                    f"{', '.join(METHODS)}")
            if method not in methods:
                raise SettingsError(f"{name}={given!r}: {method!r} is not among the compared methods {methods}")
            if hyper not in METHODS[method].declared():
                raise SettingsError(f"{name}={given!r}: {method} has no {hyper}; methods with one: "
                                    f"{', '.join(m for m, c in METHODS.items() if hyper in c.declared())}")
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0):
                raise SettingsError(f"{name}={given!r}: {method}'s {hyper} {value!r} must be a finite number > 0")
