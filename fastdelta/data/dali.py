"""NVIDIA DALI input pipelines: JPEG/PNG decode, resize, crop, mirror and normalise on the GPU
(decoder device "mixed"), or on the CPU with device_id=None; same semantics as the torchvision path.

Which images a batch holds and every random choice come from Python, not from DALI's RNG: batch t
is GlobalBatchSampler.batch_at(t) (fastdelta/data/sampling.py: a pure function of the run's seed
and t, rank r taking its contiguous share, epochs crossed seamlessly, resumable from any t) and each
image's crop offset and mirror flag are drawn exactly as torchvision's RandomCrop and
RandomHorizontalFlip draw them under SeededSamples (torch's CPU generator seeded with
sample_seed(seed, epoch, index)). The resize target is computed in Python with torchvision's rule.
So a DALI batch shows the same images, the same crops and the same flips as the torchvision batch
of the same iteration; pixels differ only by decoder and resampling differences (tested in
tests/test_dali.py). DALI only reads, decodes and transforms.

Output: x float (float32 / float16; bfloat16 is made from float32 after the copy) shaped NCHW,
in channels_last memory (DALI writes NHWC) when `channels_last`, on the pipeline's device; y int64
on the CPU. Eval 10-crop batches are (B, 10, C, H, W) in torchvision's TenCrop order (four corners,
centre, then the same five of the mirrored image), which fastdelta.train.evaluate.evaluate averages.

Differences from the PIL path (documented, not hidden): DALI drops an alpha channel instead of compositing
on white, and cannot decode GIF (fastdelta.data.backend falls back to torchvision for such sets). Both
apply a JPEG's EXIF orientation (DALI's adjust_orientation, PIL's ImageOps.exif_transpose in load_rgb);
image_size gives the upright size the resize is computed from.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .sampling import GlobalBatchSampler
from .transforms import AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD

# extensions DALI's image decoder reads (JPEG, JPEG 2000, TIFF, PNG, BMP, PNM, WebP)
DALI_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                             ".pbm", ".pnm", ".jp2", ".j2k"})


def dali_import_error() -> Optional[str]:
    """None when nvidia.dali imports, else why not (for skip messages and backend reports)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install raises anything
        return f"nvidia.dali is not importable ({type(exc).__name__}: {exc}); pip install nvidia-dali-cuda130"
    return None


def dali_unsupported(paths: Sequence[str]) -> list[str]:
    """The files DALI's decoder cannot read (by extension)."""
    return [p for p in paths if os.path.splitext(p)[1].lower() not in DALI_EXTENSIONS]


# EXIF orientations that turn the image by 90 or 270 degrees (width and height swap once upright)
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def image_size(path: str) -> tuple[int, int]:
    """(width, height) upright, by the EXIF orientation tag, from the file header (PIL reads no pixels)."""
    with Image.open(path) as img:
        width, height = img.size
        try:
            orientation = img.getexif().get(0x0112)
        except Exception:  # noqa: BLE001 - a damaged EXIF block: the decoder leaves the image as stored
            orientation = None
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def resized_size(width: int, height: int, augmentation: str, resize: int) -> tuple[int, int]:
    """(width, height) after the augmentation's resize, with torchvision's rounding."""
    if augmentation == "default":
        return resize, resize
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resize * long / short)
    return (resize, new_long) if width <= height else (new_long, resize)


def _pos(offset: int, span: int) -> float:
    """DALI's normalised crop position for an integer offset: robust to its floor/round choice."""
    return 0.5 if span <= 0 else min(1.0, (offset + 0.25) / span)


def train_crop(seed: int, out_w: int, out_h: int, crop: int) -> tuple[int, int, bool]:
    """(top, left, mirror) drawn as RandomCrop(crop) + RandomHorizontalFlip() draw them after
    torch.manual_seed(seed)."""
    g = torch.Generator().manual_seed(seed)
    top = left = 0
    if not (out_w == crop and out_h == crop):
        top = int(torch.randint(0, out_h - crop + 1, size=(1,), generator=g).item())
        left = int(torch.randint(0, out_w - crop + 1, size=(1,), generator=g).item())
    mirror = bool(torch.rand(1, generator=g).item() < 0.5)
    return top, left, mirror


class _Source:
    """external_source callback: batch -> (encoded files, labels, resize w/h, crop x/y, mirror)."""

    def __init__(self, samples, augmentation, resize, crop, train, batch_size, seed=0, start_iteration=0,
                 rank=0, world_size=1):
        self.samples = list(samples)
        self.augmentation, self.resize, self.crop, self.train = augmentation, resize, crop, train
        self.seed, self.start = seed, start_iteration
        self.ten_crop = False  # set by DaliLoader
        self._sizes: dict[int, tuple[int, int]] = {}
        if train:
            self.sampler = GlobalBatchSampler(len(self.samples), batch_size, seed, start_iteration, rank, world_size)
            self.num_batches = None
        else:  # eval: this rank's samples in order, last batch smaller
            self.batch = batch_size
            self.num_batches = max(1, -(-len(self.samples) // batch_size))

    def _out_size(self, i: int) -> tuple[int, int]:
        if self.augmentation == "default":
            return self.resize, self.resize
        if i not in self._sizes:
            self._sizes[i] = resized_size(*image_size(self.samples[i][0]), self.augmentation, self.resize)
        return self._sizes[i]

    def indices(self, iteration: int) -> list[tuple[int, Optional[int]]]:
        if self.train:
            return self.sampler.batch_at(self.start + iteration)
        k = iteration % self.num_batches  # eval cycles: prefetching past the end is harmless
        return [(i, None) for i in range(k * self.batch, min(len(self.samples), (k + 1) * self.batch))]

    def __call__(self, info):
        enc, labels, rx, ry, px, py, mirror = [], [], [], [], [], [], []
        for i, seed in self.indices(info.iteration):
            path, label = self.samples[i]
            with open(path, "rb") as f:
                enc.append(np.frombuffer(f.read(), dtype=np.uint8))
            w, h = self._out_size(i)
            if self.train:
                top, left, m = train_crop(seed, w, h, self.crop)
            else:  # torchvision CenterCrop's rounding
                top, left, m = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0)), False
            labels.append(np.array([label], dtype=np.int64))
            rx.append(np.array(w, dtype=np.float32))
            ry.append(np.array(h, dtype=np.float32))
            px.append(np.array(_pos(left, w - self.crop), dtype=np.float32))
            py.append(np.array(_pos(top, h - self.crop), dtype=np.float32))
            if self.ten_crop:  # 7th output: x of the centre crop of the mirrored image, in original coordinates
                mirror.append(np.array(_pos(w - self.crop - left, w - self.crop), dtype=np.float32))
            else:
                mirror.append(np.array(int(m), dtype=np.int32))
        return enc, labels, rx, ry, px, py, mirror


def build_pipeline(source: _Source, batch_size: int, crop: int, *, device_id: Optional[int] = None,
                   num_threads: Optional[int] = None, prefetch: int = 2, ten_crop: bool = False,
                   channels_last: bool = False, half: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   hw_decoder_load: float = 0.65, py_workers: int = 0):
    """The DALI pipeline: decode ("mixed" on a GPU, "cpu" with device_id=None), resize, crop/mirror,
    normalise. Outputs (images, labels). py_workers > 0: the Python callback (file reads, crop draws)
    runs in that many worker processes (DALI's parallel external source), not on the training thread."""
    from nvidia.dali import Pipeline, fn, types

    threads = num_threads or max(1, min(8, os.cpu_count() or 1))
    workers = dict(py_num_workers=py_workers, py_start_method="spawn") if py_workers else {}  # spawn: CUDA is up
    pipe = Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id,
                    prefetch_queue_depth=prefetch, seed=1234, **workers)
    gpu = device_id is not None
    norm = dict(mean=[255.0 * m for m in mean], std=[255.0 * s for s in std],
                dtype=types.FLOAT16 if half else types.FLOAT, crop=(crop, crop))
    with pipe:
        enc, labels, rx, ry, px, py, mirror = fn.external_source(source=source, num_outputs=7, batch=True,
                                                                 batch_info=True, parallel=py_workers > 0)
        dec_args = dict(hw_decoder_load=hw_decoder_load) if gpu else {}
        img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                adjust_orientation=True, **dec_args)
        img = fn.resize(img, resize_x=rx, resize_y=ry, interp_type=types.INTERP_LINEAR, antialias=True)
        if ten_crop:  # torchvision TenCrop order: tl, tr, bl, br, centre; then the same five crops of the
            # mirrored image, i.e. mirrored crops of tr, tl, br, bl and the mirror-image centre (`mirror` = its x)
            spots = [(0.0, 0.0, 0), (1.0, 0.0, 0), (0.0, 1.0, 0), (1.0, 1.0, 0), (px, py, 0),
                     (1.0, 0.0, 1), (0.0, 0.0, 1), (1.0, 1.0, 1), (0.0, 1.0, 1), (mirror, py, 1)]
            crops = [fn.crop_mirror_normalize(img, crop_pos_x=x, crop_pos_y=y, mirror=m, output_layout="CHW",
                                              **norm) for x, y, m in spots]
            out = fn.stack(*crops)
        else:
            out = fn.crop_mirror_normalize(img, crop_pos_x=px, crop_pos_y=py, mirror=mirror,
                                           output_layout="HWC" if channels_last else "CHW", **norm)
        pipe.set_outputs(out, labels)
    pipe.build()
    return pipe


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """Copy a DALI TensorList (dense) into a new torch tensor on `device`."""
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tl.as_tensor()))


def default_py_workers(device_id: Optional[int]) -> int:
    return 0 if device_id is None else max(1, min(4, (os.cpu_count() or 2) // 4))


class DaliLoader:
    """Iterate (x, y) batches from a DALI pipeline. Training loaders are endless (iteration-based,
    from `start_iteration`); eval loaders give ceil(n / batch) batches per pass, like a DataLoader."""

    def __init__(self, samples, *, train: bool, batch_size: int, augmentation: str = "default",
                 resize: int = 256, crop: int = 224, seed: int = 0, start_iteration: int = 0, rank: int = 0,
                 world_size: int = 1, device_id: Optional[int] = None, num_threads: Optional[int] = None,
                 prefetch: int = 2, channels_last: bool = False, dtype: torch.dtype = torch.float32,
                 ten_crop: Optional[bool] = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 py_workers: Optional[int] = None):
        """py_workers: processes for the Python callback; None: up to 4 on a GPU (the training thread
        stays free to queue steps), 0 on the CPU."""
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {list(AUGMENTATIONS)}, got {augmentation!r}")
        if crop > resize:
            raise ValueError(f"crop ({crop}) must not be larger than resize ({resize})")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        bad = dali_unsupported([p for p, _ in samples])
        if bad:
            raise ValueError(f"DALI cannot decode {len(bad)} file(s), e.g. {bad[0]}; use the torchvision backend")
        self.train = train
        self.ten_crop = (augmentation == "improved" and not train) if ten_crop is None else ten_crop
        self.dtype = dtype
        self.channels_last = channels_last and not self.ten_crop
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        per_rank = batch_size // world_size if train else batch_size
        if train and batch_size % world_size:
            raise ValueError(f"global batch {batch_size} is not divisible by the {world_size} ranks")
        self.source = _Source(samples, augmentation, resize, crop, train, batch_size, seed, start_iteration,
                              rank, world_size)
        self.source.ten_crop = self.ten_crop
        self.batch_size = per_rank
        self.pipe = build_pipeline(self.source, per_rank, crop, device_id=device_id, num_threads=num_threads,
                                   prefetch=prefetch, ten_crop=self.ten_crop, channels_last=self.channels_last,
                                   half=dtype == torch.float16, mean=mean, std=std,
                                   py_workers=default_py_workers(device_id) if py_workers is None else py_workers)
        self._runs = 0  # pipeline iterations consumed (eval passes stay aligned to batch 0)

    def __len__(self) -> int:
        if self.train:
            raise TypeError("a DALI training loader is endless (iteration-based)")
        return self.source.num_batches

    def _next(self):
        x_tl, y_tl = self.pipe.run()
        self._runs += 1
        x = _to_torch(x_tl, self.device)
        if self.channels_last:  # NHWC buffer -> NCHW view in channels_last memory
            x = x.permute(0, 3, 1, 2)
        if self.dtype == torch.bfloat16:
            x = x.to(torch.bfloat16)
        y = torch.from_numpy(np.array(y_tl.as_tensor())).reshape(-1).to(torch.int64)
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.train:
            while True:
                yield self._next()
        n = self.source.num_batches
        while self._runs % n:  # a previous pass was abandoned part-way: skip to the next pass
            self._next()
        for _ in range(n):
            yield self._next()


def dali_train_loader(samples, batch_size: int, seed: int, start_iteration: int = 0, rank: int = 0,
                      world_size: int = 1, **kw) -> DaliLoader:
    return DaliLoader(samples, train=True, batch_size=batch_size, seed=seed, start_iteration=start_iteration,
                      rank=rank, world_size=world_size, **kw)


def dali_eval_loader(samples, batch_size: int, **kw) -> DaliLoader:
    return DaliLoader(samples, train=False, batch_size=batch_size, **kw)
