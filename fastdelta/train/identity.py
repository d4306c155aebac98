"""What a checkpoint must agree with to be resumed: the result-changing settings, the model, the data
description, and fingerprints of the data's contents and of the source weights (counts alone let a
resume continue on edited data)."""
from __future__ import annotations

import warnings
from typing import Optional

from ..data.fingerprint import describe_listing_change
from ..settings import FitSettings, SettingsError

# keys of the model and data records that came with the fingerprints: not compared as settings
ADDED_WITH_FINGERPRINTS = {"model": ("source_sha256",), "data": ("overlap",), "split": ("fingerprint",)}


def run_identity(settings: dict, model_info: dict, description: dict, world_size: int) -> dict:
    """The identity a checkpoint stores; `settings` is the run's settings less those that may differ."""
    data = {k: v for k, v in description.items() if k not in ADDED_WITH_FINGERPRINTS["data"]}
    prints = {}
    for split in ("train", "test"):
        part = description.get(split)
        if part is not None:
            data[split] = {k: v for k, v in part.items() if k not in ADDED_WITH_FINGERPRINTS["split"]}
        prints[split] = None if part is None else part["fingerprint"]["sha256"]
    model = {k: v for k, v in model_info.items() if k not in ADDED_WITH_FINGERPRINTS["model"]}
    return {"settings": settings, "model": model, "data": data, "world_size": world_size,
            "fingerprints": {**prints, "source": model_info["source_sha256"]}}


def check_identity(saved: dict, current: dict, run_dir, saved_files: Optional[dict] = None,
                   current_files: Optional[dict] = None) -> None:
    """A SettingsError naming what differs between a checkpoint's identity and this run's: first
    the contents (which files changed, where a listing was kept), then the settings."""
    changes = _content_changes(saved, current, saved_files or {}, current_files or {})
    if changes:
        raise SettingsError(f"cannot resume {run_dir}: " + "; ".join(changes))
    diffs = _setting_diffs(saved, current)
    if diffs:
        raise SettingsError(f"cannot resume {run_dir}: the run was made with other settings: " + "; ".join(diffs[:6]))


def _setting_diffs(saved: dict, current: dict) -> list:
    diffs = []
    defaults = FitSettings().to_dict()
    for part in ("settings", "model", "data"):
        a, b = saved.get(part, {}), current.get(part, {})
        diffs += [f"{part}.{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in sorted(set(a) | set(b))
                  if a.get(k) != b.get(k)
                  # a setting added after the checkpoint was written, left at its default, changes nothing
                  and not (part == "settings" and k not in a and k in defaults and b.get(k) == defaults[k])]
    return diffs


def _content_changes(saved: dict, current: dict, saved_files: dict, current_files: dict) -> list:
    then, now = saved.get("fingerprints"), current["fingerprints"]
    if then is None:
        warnings.warn("fastdelta: the checkpoint was written before data fingerprints existed: resuming with "
                      "only the data's counts checked, not its contents", UserWarning, stacklevel=4)
        return []
    changes = [f"{split} data: {_what_changed(then.get(split), now.get(split), saved_files.get(split), current_files.get(split))}"
               for split in ("train", "test") if then.get(split) != now.get(split)]
    if then.get("source") != now.get("source"):
        changes.append(f"source weights: sha256 {str(then.get('source'))[:16]}... in the checkpoint, "
                       f"{str(now.get('source'))[:16]}... now")
    return changes


def _what_changed(then: Optional[str], now: Optional[str], files_then, files_now) -> str:
    if then is None or now is None:
        return "none in the checkpoint, some now" if then is None else "some in the checkpoint, none now"
    if files_then is not None and files_now is not None:
        described = describe_listing_change(files_then, files_now)
        if described:
            return described
    return "content hash differs"
