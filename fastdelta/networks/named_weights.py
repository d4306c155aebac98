"""Pre-trained weights by name, found in the local caches, never downloaded.

`weights="IMAGENET1K_V1"` (any member of torchvision's weights enum of the model, `DEFAULT` included)
reads the file torchvision would download, from torch hub's cache `torch.hub.get_dir()/checkpoints/`
(`$TORCH_HOME/hub/checkpoints/`). `weights="pretrained"` on a timm model reads the file of its
`pretrained_cfg`: from the Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
`~/.cache/huggingface/hub`) for an `hf_hub_id`, else torch hub's cache for a `url`. A missing file is a
ModelError saying which file to put where; fastdelta works offline.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

PRETRAINED = "pretrained"  # timm's pre-trained weights (for a torchvision model: its DEFAULT)
_ENUM_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # the order timm tries them in


def is_weights_name(weights) -> bool:
    """`weights` names pre-trained weights (DEFAULT, IMAGENET1K_V1, pretrained) rather than a file: an
    upper-case enum-style name or 'pretrained', unless a file of that name exists."""
    if not isinstance(weights, str):
        return False
    return (weights == PRETRAINED or bool(_ENUM_NAME.match(weights))) and not os.path.exists(weights)


def torch_hub_checkpoint(url: str) -> Path:
    """Where torch.hub.load_state_dict_from_url keeps `url`'s file (follows TORCH_HOME at call time)."""
    import torch.hub
    from urllib.parse import urlparse
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_named_weights(arch: str, name: str) -> Tuple[Path, str]:
    """(the file, a description for the results) of the weights `name` for architecture `arch`."""
    from .models import ModelError
    import torchvision
    if arch in torchvision.models.list_models(module=torchvision.models):
        return _torchvision_file(arch, name)
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(arch):
        return _timm_file(arch, name)
    raise ModelError(f"weights={name!r} names pre-trained weights, but {arch!r} is neither a torchvision nor a timm "
                     "model name, so there are none to look up; pass a state-dict path")


def _torchvision_file(arch: str, name: str) -> Tuple[Path, str]:
    from .models import ModelError
    import torchvision
    enum = torchvision.models.get_model_weights(arch)
    names = list(enum.__members__)
    key = "DEFAULT" if name == PRETRAINED else name
    if key not in enum.__members__:
        raise ModelError(f"weights={name!r}: torchvision has no such weights for {arch!r}; its weights are "
                         f"{names} (or pass a state-dict path)")
    member = enum[key]
    path = torch_hub_checkpoint(member.url)
    if not path.is_file():
        raise ModelError(f"weights={name!r} for {arch!r} ({enum.__name__}.{member.name}) are not in torch hub's "
                         f"cache, and fastdelta does not download: put the file {member.url} at {path} "
                         "(the folder is torch.hub.get_dir()/checkpoints, set by TORCH_HOME)")
    shown = name if key == member.name else f"{name} = {member.name}"
    return path, f"{shown} ({path})"


def _timm_file(arch: str, name: str) -> Tuple[Path, str]:
    from .models import ModelError
    if name != PRETRAINED:
        raise ModelError(f"weights={name!r}: {arch!r} is a timm model, whose pre-trained weights are named "
                         "'pretrained' (or pass a state-dict path)")
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(arch)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    if cfg.get("custom_load"):
        raise ModelError(f"timm's pre-trained weights of {arch!r} need timm's own loader; convert them to a "
                         "state dict and pass its path")
    tried: List[str] = []
    if cfg.get("file"):
        path = Path(cfg["file"]).expanduser()
        if path.is_file():
            return path, f"{PRETRAINED} (timm {arch}: {path})"
        tried.append(f"the file {path} (timm's pretrained_cfg 'file')")
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        filenames = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else list(HF_FILENAMES)
        for filename in filenames:
            path = _hf_cached(hub_id, filename)
            if path is not None:
                return path, f"{PRETRAINED} (timm {hub_id}: {path})"
        repo = hf_hub_cache() / ("models--" + hub_id.replace("/", "--"))
        tried.append(f"https://huggingface.co/{hub_id}/resolve/main/{filenames[0]} in the Hugging Face cache as "
                     f"{repo}/snapshots/REVISION/{filenames[0]} with REVISION written in {repo}/refs/main "
                     f"(`huggingface-cli download {hub_id} {filenames[0]}` on a machine online, with the same "
                     "HF_HOME, then copy the folder)")
    if cfg.get("url"):
        path = torch_hub_checkpoint(cfg["url"])
        if path.is_file():
            return path, f"{PRETRAINED} (timm {arch}: {path})"
        tried.append(f"the file {cfg['url']} at {path}")
    if not tried:
        raise ModelError(f"timm has no pre-trained weights for {arch!r}; pass a state-dict path")
    raise ModelError(f"weights='pretrained' for timm's {arch!r} are not in the local caches, and fastdelta does not "
                     "download: put " + "; or ".join(tried))


def _hf_cached(repo_id: str, filename: str) -> Optional[Path]:
    cache = hf_hub_cache()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        try_to_load_from_cache = None
    if try_to_load_from_cache is not None:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache))
        return Path(found) if isinstance(found, str) and os.path.isfile(found) else None
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    try:
        revision = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    path = repo / "snapshots" / revision / filename
    return path if path.is_file() else None


def fix_torchvision_keys(arch: str, state: dict) -> dict:
    """torchvision's DenseNet files use the old `norm.1` key style (torchvision renames them on load)."""
    if not arch.startswith("densenet"):
        return state
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    out = {}
    for key, value in state.items():
        m = pattern.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out
