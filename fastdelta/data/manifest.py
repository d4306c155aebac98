"""A cache of image-validation results, so a folder is fully decoded once, not on every run.

scan_image_folder decodes every candidate file to find corrupt, truncated, empty, non-image and
over-large (decompression-bomb) files before training. The verdict for a file is stored under its
absolute path together with its size and modification time (ns): a later scan reuses it only while
both are unchanged, so an edited or replaced file is checked again. One manifest per folder and
pixel limit, stored as JSON under $FASTDELTA_CACHE/manifests (default ~/.cache/fastdelta/manifests);
FASTDELTA_MANIFEST=0 turns the cache off. A manifest that cannot be read or written is ignored:
the cache only ever saves time, it never changes which files are accepted.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

import PIL

from ..output_files import atomic_write_text

MANIFEST_VERSION = 1


def manifest_dir() -> Optional[Path]:
    if os.environ.get("FASTDELTA_MANIFEST", "1").lower() in ("0", "false", "off", "no"):
        return None
    base = os.environ.get("FASTDELTA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastdelta")
    return Path(base) / "manifests"


def manifest_path(root: str | os.PathLike, max_pixels: int) -> Optional[Path]:
    d = manifest_dir()
    if d is None:
        return None
    key = f"{os.path.abspath(root)}|{max_pixels}|pillow-{PIL.__version__}|v{MANIFEST_VERSION}"
    return d / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


class Manifest:
    """path -> (size, mtime_ns, reason or None) for one folder and one pixel limit."""

    def __init__(self, root: str | os.PathLike, max_pixels: int, path: Optional[Path] = "default"):
        self.root = os.path.abspath(root)
        self.max_pixels = max_pixels
        self.path = manifest_path(root, max_pixels) if path == "default" else path
        self.entries: dict[str, list] = {}
        self.hits = self.misses = 0
        self._dirty = False
        if self.path is not None:
            try:
                with open(self.path) as f:
                    data = json.load(f)
                if (data.get("version") == MANIFEST_VERSION and data.get("root") == self.root
                        and data.get("max_pixels") == max_pixels):
                    self.entries = {k: v for k, v in data["entries"].items() if isinstance(v, list) and len(v) == 3}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self.entries = {}

    def check(self, path: str, checker: Callable[[str, int], Optional[str]]) -> Optional[str]:
        """The reason `path` is unusable (None: usable), from the cache while size and mtime match."""
        key = os.path.abspath(path)
        try:
            st = os.stat(path)
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = None
        cached = self.entries.get(key)
        if stamp is not None and cached is not None and cached[:2] == stamp:
            self.hits += 1
            return cached[2]
        self.misses += 1
        reason = checker(path, self.max_pixels)
        if stamp is not None:
            self.entries[key] = [*stamp, reason]
            self._dirty = True
        return reason

    def save(self) -> None:
        """Write atomically (a concurrent scan never reads half a file); errors are ignored."""
        if self.path is None or not self._dirty:
            return
        try:
            atomic_write_text(self.path, json.dumps({"version": MANIFEST_VERSION, "root": self.root,
                                                     "max_pixels": self.max_pixels, "entries": self.entries}))
            self._dirty = False
        except OSError:
            pass
