"""Exporting a run's network (TorchScript, ONNX, torch.export's .pt2) for use without fastdelta. Each
export is serialised in memory, loaded back and run on the same images as the eager network before the
file is written (atomically), so a file on disk is one that gave the eager logits; a sidecar FILE.json
says how to preprocess images and what the outputs mean."""
from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..output_files import atomic_write, atomic_write_text
from .errors import ExportDependencyError, ExportError
from .inputs import resolve_inputs
from .preprocessing import describe_transform

FORMATS = ("torchscript", "onnx", "pt2")
HOW_TO_LOAD = {"torchscript": "torch.jit.load(FILE)",
               "onnx": "onnxruntime.InferenceSession(FILE); run(None, {'images': x})",
               "pt2": "torch.export.load(FILE).module()"}
CHECK_IMAGES = 8       # at most this many of the given images are checked
RANDOM_IMAGES = 4      # without given images: this many seeded random ones
# torch's ONNX exporter (torch.export-based, the default) needs onnxscript; the check runs onnxruntime
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def export(model, format: str, out, images=None, tolerance: float = 1e-4) -> dict:
    """Write `model`'s network (a FineTunedModel) as `format` to `out`, and out + ".json" beside it.

    The check: max |exported - eager| over the logits of the check images (the given `images`, up to
    CHECK_IMAGES, else seeded random ones, through the run's transform), at their batch size and at batch
    size 1, must be at most tolerance * max(1, largest |eager logit|). Raises ExportError (nothing written)
    when it is not, ExportDependencyError when ONNX's packages are missing. Returns the sidecar's content."""
    if format not in FORMATS:
        raise ExportError(f"export format {format!r} is not one of {', '.join(FORMATS)}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    out = Path(out)
    if format == "onnx":
        require_onnx()
    x, source = check_batch(model, images)
    network = model.network if model.device.type == "cpu" else copy.deepcopy(model.network).cpu()
    data = _serialise(format, network, x, out)
    check = check_export(_load_back(format, data, out), network, x, tolerance, format, out)
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    sidecar = _sidecar(model, format, out, {**check, "images": source})
    atomic_write_text(Path(f"{out}.json"), json.dumps(sidecar, indent=1))
    return sidecar


def require_onnx() -> None:
    """An ExportDependencyError naming the missing ONNX packages and the command that installs them."""
    import importlib.util
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportDependencyError(f"ONNX export needs the packages {', '.join(ONNX_PACKAGES)}, and "
                                    f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
                                    f"pip install {' '.join(ONNX_PACKAGES)}")


def check_batch(model, images) -> tuple:
    """(x, description): the check images as the network takes them, (N, 3, crop, crop) float32 on the
    CPU with N >= 2 (a batch of one would fix the exported batch size), 10-crop views flattened."""
    if images is None:
        rng = np.random.default_rng(0)
        size = model.record.resize
        images = rng.integers(0, 256, (RANDOM_IMAGES, size, size, 3), dtype=np.uint8)
        source = f"{RANDOM_IMAGES} seeded random images"
    else:
        source = None
    dataset, _ = resolve_inputs(images, model.transform)
    n = min(len(dataset), CHECK_IMAGES)
    x = torch.stack([dataset[i][0] for i in range(n)])
    x = x.flatten(0, 1) if x.dim() == 5 else x
    if len(x) == 1:
        x = torch.cat([x, x])
    return x.float().contiguous(), source or f"{n} of the given images"


def _serialise(format: str, network: nn.Module, x: torch.Tensor, out: Path) -> bytes:
    """The export file's bytes; a failing exporter is an ExportError naming the format and file."""
    try:
        with warnings.catch_warnings():
            # torch.jit's deprecation notice: TorchScript is the format asked for
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
            return _WRITERS[format](network, x)
    except Exception as e:  # noqa: BLE001 - exporters raise many types
        raise ExportError(f"{format} export of the network for {out} failed ({type(e).__name__}: {e}); nothing "
                          "was written", out) from e


def _batch_dim() -> dict:
    return {0: torch.export.Dim("batch", min=1)}


def _torchscript(network: nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(network, x), buf)
    return buf.getvalue()


def _onnx(network: nn.Module, x: torch.Tensor) -> bytes:
    program = torch.onnx.export(network, (x,), None, dynamo=True, verbose=False, external_data=False,
                                input_names=["images"], output_names=["logits"], dynamic_shapes=(_batch_dim(),))
    return program.model_proto.SerializeToString()


def _pt2(network: nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.export.save(torch.export.export(network, (x,), dynamic_shapes=(_batch_dim(),)), buf)
    return buf.getvalue()


def _load_torchscript(data: bytes) -> Callable:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        return torch.jit.load(io.BytesIO(data), map_location="cpu")


def _load_onnx(data: bytes) -> Callable:
    import onnxruntime
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _load_pt2(data: bytes) -> Callable:
    return torch.export.load(io.BytesIO(data)).module()


_WRITERS = {"torchscript": _torchscript, "onnx": _onnx, "pt2": _pt2}
_LOADERS = {"torchscript": _load_torchscript, "onnx": _load_onnx, "pt2": _load_pt2}


def _load_back(format: str, data: bytes, out: Path) -> Callable:
    """The export, read back from its bytes as a user would read the file: what the check runs."""
    try:
        return _LOADERS[format](data)
    except Exception as e:  # noqa: BLE001 - each runtime has its own error types
        raise ExportError(f"the {format} export for {out} cannot be loaded back ({type(e).__name__}: {e}); "
                          "nothing was written", out) from e


@torch.no_grad()
def check_export(run: Callable, network: nn.Module, x: torch.Tensor, tolerance: float, format: str,
                 out: Path) -> dict:
    """The exported network (`run`, loaded back) against the eager one on `x` and on x[:1]; an
    ExportError when they differ by more than the tolerance."""
    expected = network(x).float()
    allowed = tolerance * max(1.0, expected.abs().max().item())
    diffs = []
    for batch, want in ((x, expected), (x[:1], network(x[:1]).float())):
        try:
            got = run(batch)
        except Exception as e:  # noqa: BLE001 - a runtime's own error types
            raise ExportError(f"the {format} export for {out} fails on a batch of {len(batch)} images "
                              f"({type(e).__name__}: {e}); nothing was written", out) from e
        if tuple(got.shape) != tuple(want.shape):
            raise ExportError(f"the {format} export for {out} gives logits of shape {tuple(got.shape)} for a "
                              f"batch of {len(batch)}, the network {tuple(want.shape)}; nothing was written", out)
        diffs.append((got.float() - want).abs().max().item())
    worst = max(diffs)
    if not worst <= allowed:
        raise ExportError(f"the {format} export for {out} differs from the eager network by {worst:.3g} (max abs "
                          f"logit difference; allowed {allowed:.3g} = tolerance {tolerance:g} x the logits' scale); "
                          "nothing was written", out)
    return {"max_abs_diff": worst, "allowed": allowed, "tolerance": tolerance, "batch_sizes": [len(x), 1]}


def _sidecar(model, format: str, out: Path, check: dict) -> dict:
    record = model.record
    return {"format": format, "file": out.name, "load": HOW_TO_LOAD[format],
            "run": str(record.run_dir.resolve()), "arch": record.arch, "method": record.method,
            "classes": list(model.classes), "num_classes": len(model.classes),
            "transform": describe_transform(record, model.transform),
            "input": {"name": "images", "shape": ["batch", 3, record.crop, record.crop], "dtype": "float32"},
            "output": {"name": "logits", "shape": ["batch", len(model.classes)],
                       "meaning": "logits in `classes` order; softmax gives the probabilities"},
            "check": check, "torch": torch.__version__}
