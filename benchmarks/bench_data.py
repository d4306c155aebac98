"""Input-pipeline throughput: DALI (GPU decode) vs the torchvision CPU DataLoader vs torchvision nvjpeg.

Generates --images JPEGs of 500x375 (quality 90, ImageFolder of 10 classes) and times --batches training
batches of --batch (train augmentation --augmentation, 256 -> 224) through each backend after --warmup
batches; writes images/s to --out (JSON).

    dali_gpu          fastdelta.data.dali.DaliLoader, decoder "mixed" on cuda:0 (needs nvidia-dali-cuda130)
    dali_cpu          the same pipeline with device_id=None (CPU threads = all cores)
    torchvision_cpu   DataLoader(SeededSamples(ImageListDataset)), PIL decode, workers = all cores
    torchvision_nvjpeg torchvision.io.decode_jpeg(device="cuda") on the batch + GPU resize/crop/flip/normalise

GPU (goal: dali_gpu >= 8,000 img/s with 16 cores):
    python3 benchmarks/bench_data.py --images 4000 --batches 100 --out benchmarks/results/bench_data_gpu.json
CPU smoke test (no GPU: the CUDA rows are reported as skipped):
    python3 benchmarks/bench_data.py --images 24 --batch 8 --batches 2 --warmup 1 --workers 0 --out /tmp/bd.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image


def make_images(root: str, n: int, classes: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500]
    for k in range(n):
        d = os.path.join(root, f"c{k % classes}")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"{k:06d}.jpg")
        if os.path.exists(p):
            continue
        base = np.stack([(xx + 7 * k) % 256, (yy + 3 * k) % 256, (xx + yy + k) % 256], -1)
        img = (base * 0.7 + rng.integers(0, 76, base.shape)).astype(np.uint8)  # texture: realistic JPEG sizes
        Image.fromarray(img).save(p, quality=90)


def _time(it, batches: int, warmup: int, sync) -> dict:
    for _ in range(warmup):
        next(it)
    sync()
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        x, _ = next(it)
        n += len(x)
    sync()
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": round(dt, 4), "img_per_s": round(n / dt, 1)}


def bench_torchvision_cpu(samples, a):
    from fastdelta.data import ImageListDataset, build_transforms
    from fastdelta.train.loop import TrainSpec, make_train_loader
    from fastdelta.train.distributed import DistContext
    train_tf, _ = build_transforms(a.augmentation)
    spec = TrainSpec(iterations=1, lr=0.1, momentum=0.9, batch_size=a.batch, seed=0, num_workers=a.workers)
    dl = make_train_loader(ImageListDataset(samples, train_tf), spec, 0, DistContext())
    dl.pin_memory = torch.cuda.is_available()
    return _time(iter(dl), a.batches, a.warmup, lambda: None) | {"workers": a.workers}


def bench_dali(samples, a, gpu: bool):
    from fastdelta.data.dali import dali_train_loader
    ld = dali_train_loader(samples, a.batch, seed=0, augmentation=a.augmentation, device_id=0 if gpu else None,
                           num_threads=a.dali_threads or os.cpu_count(), prefetch=a.prefetch,
                           channels_last=True, dtype=torch.float16 if gpu else torch.float32)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    return _time(iter(ld), a.batches, a.warmup, sync) | {"threads": a.dali_threads or os.cpu_count(),
                                                          "prefetch": a.prefetch}


def bench_nvjpeg(samples, a):
    import torchvision.io as io
    import torchvision.transforms.v2.functional as F
    from fastdelta.data.sampling import GlobalBatchSampler
    from fastdelta.data.dali import train_crop
    sampler = GlobalBatchSampler(len(samples), a.batch, 0)
    mean = torch.tensor([0.485, 0.456, 0.406], device="cuda").view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device="cuda").view(1, 3, 1, 1) * 255

    def batches():
        t = 0
        while True:
            items = sampler.batch_at(t)
            data = [io.read_file(samples[i][0]) for i, _ in items]
            imgs = io.decode_jpeg(data, device="cuda", mode=io.ImageReadMode.RGB)
            out = []
            for img, (_, s) in zip(imgs, items):
                img = F.resize(img, [256, 256], antialias=True)
                top, left, m = train_crop(s, 256, 256, 224)
                img = img[:, top:top + 224, left:left + 224]
                out.append(img.flip(-1) if m else img)
            x = ((torch.stack(out).float() - mean) / std).contiguous(memory_format=torch.channels_last)
            yield x, torch.tensor([samples[i][1] for i, _ in items])
            t += 1
    return _time(batches(), a.batches, a.warmup, torch.cuda.synchronize)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--dali-threads", type=int, default=0)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--augmentation", default="default", choices=["default", "improved"])
    p.add_argument("--data", default=None, help="image folder to (re)use; default: a temporary one")
    p.add_argument("--backends", default="dali_gpu,dali_cpu,torchvision_cpu,torchvision_nvjpeg")
    p.add_argument("--out", default="bench_data.json")
    a = p.parse_args(argv)
    root = a.data or os.path.join(tempfile.gettempdir(), f"fastdelta_bench_data_{a.images}")
    t0 = time.perf_counter()
    make_images(root, a.images)
    from fastdelta.data import scan_image_folder
    samples = scan_image_folder(root).samples
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
              "images": len(samples), "image_size": "500x375", "batch": a.batch, "augmentation": a.augmentation,
              "prepare_s": round(time.perf_counter() - t0, 2), "results": {}}
    cuda = torch.cuda.is_available()
    runs = {"dali_gpu": (lambda: bench_dali(samples, a, True), cuda),
            "dali_cpu": (lambda: bench_dali(samples, a, False), True),
            "torchvision_cpu": (lambda: bench_torchvision_cpu(samples, a), True),
            "torchvision_nvjpeg": (lambda: bench_nvjpeg(samples, a), cuda)}
    for name in a.backends.split(","):
        fn, possible = runs[name]
        if not possible:
            result["results"][name] = {"skipped": "no CUDA device"}
            continue
        try:
            result["results"][name] = fn()
        except Exception as exc:  # noqa: BLE001 - one backend failing (e.g. DALI missing) must not hide the rest
            result["results"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(name, result["results"][name], flush=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
