"""Index an ImageFolder-style directory (ROOT/<class>/<image>) and load its images.

Every candidate file is fully decoded once while indexing, so corrupt,
truncated, empty or mislabelled files are found up front instead of crashing
a DataLoader worker in the middle of training.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch.utils.data
from PIL import Image, ImageOps
from tqdm import tqdm

from ..output_files import RUN_MARKER
from .errors import DataError
from .fingerprint import folder_listing, listing_fingerprint
from .manifest import Manifest

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
)

# Pillow's own default limit; larger images are almost always mistakes or
# decompression bombs and would blow up worker memory.
DEFAULT_MAX_PIXELS = 89_478_485

# Below this many files a progress bar is just noise.
_PROGRESS_MIN_FILES = 500


@dataclass
class ImageIndex:
    """Result of scanning a folder: valid samples plus what was left out and why."""

    samples: list[tuple[str, int]]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def is_image_file(path: str | os.PathLike) -> bool:
    """True for non-hidden files whose extension is a known image type (any case)."""
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def check_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Fully decode `path`; return None if it is a usable image, else the reason it is not."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        # Pillow only *warns* about decompression bombs below 2x its limit;
        # turn that into an error so such files are rejected, not loaded.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    return f"image too large ({width}x{height} = {width * height} pixels > max_pixels={max_pixels})"
                img.load()  # header parsing alone misses truncated/corrupt pixel data
                ImageOps.exif_transpose(img)  # an orientation tag that cannot be applied fails here, not in training
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        return f"image too large ({exc})"
    except Exception as exc:  # noqa: BLE001 - PIL plugins raise many unrelated types for bad data
        return f"cannot decode image ({type(exc).__name__}: {exc})"
    return None


def _list_class_dirs(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(class folder names, [(output folder, why skipped)]): a folder a fastdelta run writes into is
    no class, or a run's --out inside the data root would become one on the next run."""
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    runs = [n for n in names if _is_run_folder(os.path.join(root, n))]
    return [n for n in names if n not in runs], [(str(root / n), RUN_FOLDER_SKIP) for n in runs]


RUN_FOLDER_SKIP = f"a fastdelta output folder (holds {RUN_MARKER}), not data"


def _is_run_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RUN_MARKER))


def _identity(path: str) -> tuple | str:
    """What makes two paths the same file or directory: (device, inode), else the resolved path."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(path)


def _link_skip_reason(link: str) -> str:
    target = os.path.realpath(link)
    parent = os.path.realpath(os.path.dirname(link))
    if parent == target or parent.startswith(target.rstrip(os.sep) + os.sep):
        return f"symlink loop: directory already scanned as {target}"
    return f"directory link: {target} is already part of the scan"


class _FolderWalk:
    """Image files below the class folders of `root`, each real directory and real file taken once.

    Symlinked directories are followed, but only after the real tree, and never into a
    directory that is part of the scan anyway: a link to an ancestor (`ln -s . loop`) would
    otherwise be re-entered until the OS path limit and multiply every image in it, and a link
    to the root or another class folder would pull that class's images into this one. Links and
    hard links to one file count once too, so a duplicate cannot weigh an image twice or put it
    in two classes. What was left out goes to `skipped` as (path, reason).
    """

    def __init__(self, root: Path, class_dirs: Sequence[Path]):
        self.dirs = {_identity(str(d)) for d in [root, *class_dirs]}  # scanned, or claimed by a class
        self.tops: dict = {}  # identity -> class folder already walked
        self.files: dict = {}  # identity -> first path seen
        self.skipped: list[tuple[str, str]] = []

    def image_files(self, class_dir: Path) -> list[str]:
        """All image files below `class_dir` (recursively, hidden dirs skipped), sorted."""
        key = _identity(str(class_dir))
        if key in self.tops:  # a class folder that links to another one
            self.skipped.append((str(class_dir), f"directory link: already scanned as {self.tops[key]}"))
            return []
        self.tops[key] = str(class_dir)
        links: list[str] = []
        found = self._unique(self._walk_real(str(class_dir), links))
        while links:
            top = links.pop(0)
            if _identity(top) in self.dirs:
                self.skipped.append((top, _link_skip_reason(top)))
            else:
                found += self._unique(self._walk_real(top, links))
        return sorted(found)

    def _walk_real(self, top: str, links: list[str]) -> list[str]:
        """Files under `top` without following links; linked subdirectories are queued in `links`."""
        found = []
        for dirpath, dirnames, filenames in os.walk(top):
            self.dirs.add(_identity(dirpath))
            visible = sorted(d for d in dirnames if not d.startswith("."))
            runs = [d for d in visible if _is_run_folder(os.path.join(dirpath, d))]  # e.g. its history.png
            self.skipped.extend((os.path.join(dirpath, d), RUN_FOLDER_SKIP) for d in runs)
            visible = [d for d in visible if d not in runs]
            linked = {d for d in visible if os.path.islink(os.path.join(dirpath, d))}
            links.extend(os.path.join(dirpath, d) for d in visible if d in linked)
            dirnames[:] = [d for d in visible if d not in linked]
            found.extend(os.path.join(dirpath, f) for f in filenames if is_image_file(f))
        return found

    def _unique(self, paths: list[str]) -> list[str]:
        """`paths` less files already taken; real files go before links, so the kept path is the file."""
        kept = []
        for path in sorted(paths, key=lambda p: (os.path.islink(p), p)):
            try:
                key = _identity(path)
            except OSError:  # broken link: check_image reports it as unreadable
                kept.append(path)
                continue
            if key in self.files:
                self.skipped.append((path, f"duplicate of {self.files[key]} (same file)"))
            else:
                self.files[key] = path
                kept.append(path)
        return kept


def _check_root(root: Path, role: str) -> None:
    if not root.exists():
        raise DataError(f"{role} {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{role} {root} is not a directory; expected ROOT/<class>/<image>")


def _resolve_class_order(
    root: Path, found: list[str], classes: Sequence[str] | None, role: str
) -> list[str]:
    """Class order to use: the given mapping (so test labels match train) or sorted folder names."""
    if not found:
        loose = [f for f in os.listdir(root) if is_image_file(f)]
        hint = f" (found {len(loose)} images directly in it)" if loose else ""
        raise DataError(f"{role} {root} has no class folders{hint}; expected ROOT/<class>/<image>")
    if classes is None:
        return found
    classes = [str(c) for c in classes]
    extra = [c for c in found if c not in set(classes)]
    if extra:
        raise DataError(f"{role} {root} has class folders {extra} that are not among the classes {classes}")
    return classes


def _skipped_hint(root: Path, names: list[str], skipped: list[tuple[str, str]]) -> str:
    """Why the files of empty classes were left out, e.g. a class folder linked to another."""
    dirs = [str(root / n) for n in names]
    reasons = [f"{p}: {r}" for p, r in skipped if any(p == d or p.startswith(d + os.sep) for d in dirs)]
    return f" (skipped: {'; '.join(reasons[:3])}{' ...' if len(reasons) > 3 else ''})" if reasons else ""


def scan_image_folder(
    root: str | os.PathLike,
    classes: Sequence[str] | None = None,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    role: str = "image folder",
) -> ImageIndex:
    """Index ROOT/<class>/<image>, validating every image by decoding it.

    `classes` fixes the class -> index mapping (pass the training classes when
    scanning a test folder). Bad files are recorded in `skipped`, or raise
    DataError when `strict`. `role` only names the folder in error messages.

    Pillow's global Image.MAX_IMAGE_PIXELS still applies on top of
    `max_pixels`, and truncated files are only caught while
    ImageFile.LOAD_TRUNCATED_IMAGES is False (Pillow's default).
    """
    root = Path(root)
    _check_root(root, role)
    found, run_folders = _list_class_dirs(root)
    class_names = _resolve_class_order(root, found, classes, role)

    class_dirs = [(label, root / name) for label, name in enumerate(class_names) if (root / name).is_dir()]
    # one walk for all classes: a file linked into two classes is kept in the first
    walk = _FolderWalk(root, [d for _, d in class_dirs])
    candidates = [(path, label) for label, class_dir in class_dirs for path in walk.image_files(class_dir)]
    samples, skipped = [], run_folders + walk.skipped
    progress = tqdm(
        candidates,
        desc=f"checking images in {root}",
        unit="img",
        disable=True if len(candidates) < _PROGRESS_MIN_FILES else None,  # None: off when not a TTY
    )
    manifest = Manifest(root, max_pixels)  # verdicts cached by (path, size, mtime): decode each file once
    try:
        for path, label in progress:
            reason = manifest.check(path, check_image)
            if reason is None:
                samples.append((path, label))
            elif strict:
                raise DataError(f"bad image file {path}: {reason}")
            else:
                skipped.append((path, reason))
    finally:
        manifest.save()

    if not samples:
        detail = f" ({len(skipped)} files skipped)" if skipped else ""
        raise DataError(f"{role} {root} contains no images{detail}; expected ROOT/<class>/<image>")
    # A class without images would get an output unit that is never trained
    # (or never evaluated), which silently skews results.
    present = {label for _, label in samples}
    missing = [name for label, name in enumerate(class_names) if label not in present]
    if missing:
        raise DataError(f"{role} {root} has no images for classes {missing}{_skipped_hint(root, missing, skipped)}")
    return ImageIndex(samples=samples, classes=class_names, skipped=skipped)


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map high-bit-depth grayscale to 0..255 by scaling, never by clipping."""
    if arr.dtype.kind == "f":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if lo >= 0.0 and hi <= 1.0:  # already a [0, 1] intensity image
            return np.round(np.nan_to_num(arr) * 255.0).astype(np.uint8)
    else:
        arr = arr.astype(np.int64)
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 65535:  # 16-bit data (Pillow stores 16-bit PNG/TIFF as I;16 or I)
            return ((arr + 128) // 257).astype(np.uint8)  # 65535 -> 255, 32768 -> 128
    # Values outside any known range: stretch the image's own range to 0..255.
    span = (hi - lo) or 1
    return np.round((np.nan_to_num(arr.astype(np.float64)) - lo) * (255.0 / span)).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    16/32-bit integer and float grayscale are rescaled (Pillow's convert()
    would clip them to 255, turning most 16-bit images white). Transparent
    images are composited on white, because the colour stored under fully
    transparent pixels is arbitrary (often black).
    """
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(img))).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # returns a copy even when already RGB


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file and return it as 8-bit RGB, turned upright by its EXIF orientation tag (a
    camera's portrait photo is stored sideways with the tag saying so); file handle closed on return."""
    with Image.open(path) as img:
        img.load()
        # always a new image, so it outlives the closed file
        return to_rgb(ImageOps.exif_transpose(img) or img)


class ImageListDataset(torch.utils.data.Dataset):
    """Dataset over (path, label) pairs, e.g. `ImageIndex.samples`; yields (transform(img), label).
    `root`: the folder the paths are under (fingerprints name files relative to it)."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None = None,
                 root: str | os.PathLike | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.root = None if root is None else str(root)
        self._listing = None

    @property
    def targets(self) -> list[int]:
        """Labels without decoding images (same name as torchvision datasets)."""
        return [label for _, label in self.samples]

    def listing(self) -> list:
        """[[path, label, size, mtime_ns]] of the files, read once (a fingerprint of the set as it is now)."""
        if self._listing is None:
            self._listing = folder_listing(self.samples, self.root)
        return self._listing

    def fingerprint(self) -> dict:
        return listing_fingerprint(self.listing())

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            img = load_rgb(path)
        except Exception as exc:  # noqa: BLE001 - PIL plugins raise many unrelated types for bad data
            # it passed the scan's check: changed since (the manifest trusts an unchanged size and mtime)
            raise DataError(f"image file {path} can no longer be read ({type(exc).__name__}: {exc}); it was "
                            "readable when the folder was scanned, so it changed since: restore or remove "
                            "it and start again") from exc
        return (self.transform(img) if self.transform is not None else img), label
