"""Loader of the native CPU kernel (kernels/cpu/fm_distance.cpp, built by kernels/build_native.py).

The library registers torch.ops.fastdelta_native.fm_distance_fwd / fm_distance_bwd. It is looked for
in $FASTDELTA_NATIVE_LIB, else fastdelta/kernels/_native/libfastdelta_native.so. A missing library, one
built against another torch version, or one that fails to load leaves ``available()`` False (with the
reason in ``status()``), and dispatch falls back to the plain PyTorch reference path.
"""
from __future__ import annotations

import json
import os
import warnings

import torch

LIB_NAME = "libfastdelta_native.so"
_STATE = {"loaded": None, "reason": "not tried", "path": None}


def library_path() -> str:
    return os.environ.get("FASTDELTA_NATIVE_LIB") or os.path.join(os.path.dirname(__file__), "_native", LIB_NAME)


def load(warn: bool = True) -> bool:
    """Load once; True when torch.ops.fastdelta_native is usable."""
    if _STATE["loaded"] is not None:
        return _STATE["loaded"]
    path = library_path()
    _STATE["path"] = path
    ok, reason = False, ""
    if not os.path.isfile(path):
        reason = f"{path} not found (build it: python3 kernels/build_native.py)"
    else:
        stamp = os.path.join(os.path.dirname(path), "build.json")
        built_for = None
        if os.path.isfile(stamp):
            try:
                built_for = json.load(open(stamp)).get("torch")
            except (OSError, ValueError):
                built_for = None
        if built_for is not None and built_for != torch.__version__:
            reason = f"{path} was built for torch {built_for}, this is torch {torch.__version__} (rebuild it)"
        else:
            try:
                torch.ops.load_library(path)
                torch.ops.fastdelta_native.fm_distance_fwd  # noqa: B018 - the op must be registered
                ok, reason = True, "loaded"
            except Exception as e:  # noqa: BLE001 - any load failure means: use the reference path
                reason = f"{path} failed to load: {type(e).__name__}: {e}"
    _STATE.update(loaded=ok, reason=reason)
    if not ok and warn and os.path.isfile(path):  # a present but unusable build is worth a warning
        warnings.warn(f"fastdelta native CPU kernel unavailable, using the PyTorch reference: {reason}",
                      RuntimeWarning, stacklevel=2)
    return ok


def available() -> bool:
    return bool(_STATE["loaded"]) if _STATE["loaded"] is not None else load()


def status() -> dict:
    available()
    return {"available": bool(_STATE["loaded"]), "reason": _STATE["reason"], "path": _STATE["path"]}


def forward(t, s, scale, relu: bool):
    return torch.ops.fastdelta_native.fm_distance_fwd(t, s, scale, relu)


def backward(grad_out, t, s, scale, relu: bool):
    return torch.ops.fastdelta_native.fm_distance_bwd(grad_out, t, s, scale, relu)
