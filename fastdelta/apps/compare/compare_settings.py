"""How a comparison runs: which methods and seeds, how the hyperparameters are searched, what the figures
hold. The fit settings every run shares are FitSettings'; the command line's `compare` options are made
from these fields."""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

from ...methods import METHODS
from ...settings import SettingsError, csv_floats, csv_list, json_object, setting

SEARCHES = ("alpha", "grid", "none")


# the fit settings compare sets itself for each run
COMPARE_SETS = ("seed", "method", "run_dir", "resume", "eval_every", "eval_images", "attention", "lr_schedule")


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
