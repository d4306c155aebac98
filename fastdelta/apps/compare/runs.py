"""Each fit of a comparison in its own folder under runs/, a diverged one recorded (never fatal), and a
run an interrupted comparison finished taken back when its settings, data and source weights match."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from ...attention.measure import compute_attention
from ...data.inputs import fingerprint_of
from ...fitting import fit
from ...methods import METHODS
from ...settings import LEGACY_VALUES, make_settings
from ...result import HISTORY_FILES, load_history
from ...train.loop import NonFiniteLossError
from .evaluation import fast_top1

class Runner:
    """Runs fits, catching divergence (a diverged run is recorded, never fatal to the comparison)."""

    def __init__(self, model, weights, base: dict, out: Path, log):
        self.model, self.weights, self.base, self.out, self.log = model, weights, base, out, log
        self.source_sha256: Optional[str] = None  # of the source weights every fit starts from
        self._fingerprints: dict = {}  # id(data) -> sha256: each split is hashed once per comparison

    def fit(self, name: str, train, test, method: str, final_test=None, keep_model: bool = False, **overrides):
        """One fit; with final_test (a TensorSet), fit only evaluates `test` (curve points, or nothing)
        and the final top-1 comes from fast_top1 on final_test. keep_model: also write model.pt (loadable
        with fastdelta.load(runs/<name>); a diverged run's non-finite weights are never written)."""
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
        res.save(self.out / "runs" / name, weights=keep_model)
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
            if plain(stored.get(key, value)) != plain(value):
                return None
        # conventions added later: a result written before them used LEGACY_VALUES, not today's default
        resolved = make_settings(**{**self.base, **overrides, "method": method}).resolved()
        for key in conventions_of(METHODS[method]):
            if plain(stored.get(key, LEGACY_VALUES[key])) != plain(getattr(resolved, key)):
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


def conventions_of(method: type) -> tuple:
    """The LEGACY_VALUES settings that change what `method` computes."""
    if not method.uses_attention:
        return ()
    return ("attention_sample", "attention_normalisation") + (("delta_scale",) if method.uses_source_features else ())


def plain(value):
    """A setting as JSON stores it (tuples become lists), so saved and requested values compare equal."""
    return json.loads(json.dumps(value, default=str))


# the first seed's figures' inputs that need its trained weights, kept beside its result.json so that
# a finished run is reused without its weights (compare saves none)
ANALYSIS_FILE = "analysis.json"
ANALYSIS_DEVICE = "cpu"  # write_analysis measures the CPU copy of the trained model


class ReusedRun:
    """A final run an interrupted comparison finished: its result.json and history, read back (the
    whole history.jsonl, or the sampled rows a committed result keeps)."""

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


def reused_final(runner: "Runner", name: str, method: str, digests: tuple, final_test, analysed: bool,
                  overrides: dict, keep_model: bool = False) -> Optional[ReusedRun]:
    """The final run `name` if it finished with these settings on the same data (its top-1 measured on
    the same final test set), with its analysis for a seed-0 run; else None (it is fitted again).

    keep_model: the comparison keeps this run's weights, so a finished run without model.pt is fitted
    again (a diverged one never has one and is reused as it is). Otherwise a reused run keeps whatever
    files it had (a model.pt an earlier comparison wrote stays)."""
    saved = runner.finished(name, method, digests, **overrides)
    folder = runner.out / "runs" / name
    if saved is None or not any((folder / f).is_file() for f in HISTORY_FILES) or \
            (analysed and not (folder / ANALYSIS_FILE).is_file()):
        return None
    if keep_model and saved["status"] == "ok" and not (folder / "model.pt").is_file():
        return None
    if final_test is not None and saved["status"] == "ok" and \
            (saved.get("test") or {}).get("fingerprint") != runner.fingerprint(final_test):
        return None
    return ReusedRun(saved, load_history(folder))
