"""DALI input pipelines (CPU, device_id=None) on small generated ImageFolders, against the torchvision
path; the validated-file manifest; the backend choice. DALI tests skip when nvidia.dali is missing.

Tolerances: DALI's decoder/resampler and PIL's differ by a grey level or two, so tensors (normalised
by ImageNet mean/std, i.e. 1 grey level ~ 0.017) are compared with mean |diff| <= 0.01 (< 1 grey level)
and max |diff| <= 0.25 (~15 grey levels, a few pixels: chroma upsampling at crop edges of these tiny
grayscale/CMYK/noisy JPEGs). Measured: 224 px RGB JPEG/PNG max 0.035, mean 0.003; here max 0.14, mean 0.0033.
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image

from fastdelta.data import DataError, ImageListDataset, build_center_transform, build_transforms, scan_image_folder
from fastdelta.data.backend import choose_backend
from fastdelta.data.dali import dali_import_error, resized_size, train_crop
from fastdelta.data.manifest import Manifest
from fastdelta.data.sampling import GlobalBatchSampler, SeededSamples
from test_data import BAD_KINDS, write_bad_file

DALI_MISSING = dali_import_error()
needs_dali = pytest.mark.skipif(DALI_MISSING is not None, reason=f"DALI tests need NVIDIA DALI: {DALI_MISSING}")
MAX_TOL, MEAN_TOL = 0.25, 0.01
RESIZE, CROP = 40, 32
SIZES = [(64, 48), (45, 70), (50, 50), (81, 60)]
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _picture(w, h, k):
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(k)
    arr = np.stack([xx * 255 // w, yy * 255 // h, ((xx + 2 * yy) * 5 + 40 * k) % 256], -1).astype(np.float64)
    return (arr * 0.85 + rng.integers(0, 30, arr.shape)).clip(0, 255).astype(np.uint8)


def make_folder(root, classes=("ant", "bee", "cat"), per_class=4):
    """JPEG (quality 95) and PNG files of several sizes, a grayscale and a CMYK JPEG among them."""
    k = 0
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for j in range(per_class):
            w, h = SIZES[k % len(SIZES)]
            img = Image.fromarray(_picture(w, h, k))
            if k == 1:
                img = img.convert("L")
            if k == 2:
                img.convert("CMYK").save(root / c / f"{j}.jpg", quality=95)
            elif k % 3 == 0:
                img.save(root / c / f"{j}.png")
            else:
                img.save(root / c / f"{j}.jpg", quality=95)
            k += 1
    return root


def _close(a, b):
    d = (a.float() - b.float()).abs()
    assert d.max().item() <= MAX_TOL and d.mean().item() <= MEAN_TOL, (d.max().item(), d.mean().item())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("dali_folder"))
    return scan_image_folder(root)


def loader(samples, **kw):
    from fastdelta.data.dali import DaliLoader
    return DaliLoader(samples, resize=RESIZE, crop=CROP, num_threads=1, **kw)


# ---------------------------------------------------------------- eval


@needs_dali
@pytest.mark.parametrize("augmentation", ["default", "improved"])
def test_eval_center_crop_matches_torchvision(folder, augmentation):
    ref_ds = ImageListDataset(folder.samples, build_center_transform(augmentation, RESIZE, CROP))
    ld = loader(folder.samples, train=False, batch_size=5, augmentation=augmentation, ten_crop=False)
    assert len(ld) == 3
    xs, ys = zip(*list(ld))
    assert [len(y) for y in ys] == [5, 5, 2]
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (12, 3, CROP, CROP) and x.dtype == torch.float32 and y.dtype == torch.int64
    names = [os.path.basename(os.path.dirname(p)) for p, _ in folder.samples]
    assert [folder.classes[i] for i in y.tolist()] == names  # every label is its folder's
    _close(x, torch.stack([ref_ds[i][0] for i in range(12)]))
    x2 = torch.cat([b for b, _ in ld])  # a second pass gives the same tensors
    assert torch.equal(x, x2)


@needs_dali
def test_ten_crop_shapes_values_and_averaging(folder):
    from fastdelta.train.evaluate import evaluate
    _, eval_tf = build_transforms("improved", RESIZE, CROP)
    ref_ds = ImageListDataset(folder.samples, eval_tf)
    ld = loader(folder.samples, train=False, batch_size=4, augmentation="improved")
    x, y = next(iter(ld))
    assert x.shape == (4, 10, 3, CROP, CROP) and x.dtype == torch.float32
    ref = torch.stack([ref_ds[i][0] for i in range(4)])
    _close(x, ref)  # the same ten crops in TenCrop's order
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    with torch.no_grad():  # averaged crop probabilities agree with the torchvision crops'
        p = torch.softmax(model(x.flatten(0, 1)), 1).view(4, 10, -1).mean(1)
        p_ref = torch.softmax(model(ref.flatten(0, 1)), 1).view(4, 10, -1).mean(1)
    assert torch.allclose(p, p_ref, atol=0.02)
    res = evaluate(model, ld, torch.device("cpu"), progress=False)
    assert res["images"] == 12 and "top1_10crop" in res and 0 <= res["top1_10crop"] <= 100


# ---------------------------------------------------------------- train


@needs_dali
@pytest.mark.parametrize("augmentation", ["default", "improved"])
def test_train_batches_match_torchvision_same_crops(folder, augmentation):
    train_tf, _ = build_transforms(augmentation, RESIZE, CROP)
    ds = SeededSamples(ImageListDataset(folder.samples, train_tf))
    sampler = GlobalBatchSampler(12, 4, seed=7)
    it = iter(loader(folder.samples, train=True, batch_size=4, seed=7, augmentation=augmentation,
                     channels_last=True))
    for t in range(4):  # crosses the epoch boundary (3 batches per epoch)
        x, y = next(it)
        assert x.shape == (4, 3, CROP, CROP) and x.is_contiguous(memory_format=torch.channels_last)
        items = [ds[k] for k in sampler.batch_at(t)]
        assert y.tolist() == [label for _, label in items]
        _close(x, torch.stack([img for img, _ in items]))


@needs_dali
def test_train_deterministic_and_seeded(folder):
    def first(seed, **kw):
        it = iter(loader(folder.samples, train=True, batch_size=6, seed=seed, **kw))
        return [next(it) for _ in range(3)]
    a, b, c = first(3), first(3), first(4)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))
    resumed = iter(loader(folder.samples, train=True, batch_size=6, seed=3, start_iteration=1))
    assert torch.equal(next(resumed)[0], a[1][0])  # resuming needs only the iteration number
    h = first(3, dtype=torch.float16)
    assert h[0][0].dtype == torch.float16 and torch.allclose(h[0][0].float(), a[0][0], atol=0.01)
    assert first(3, dtype=torch.bfloat16)[0][0].dtype == torch.bfloat16


@needs_dali
def test_parallel_callback_gives_the_same_batches(folder):
    """With py_workers the Python callback runs in worker processes (off the training thread): the
    batches are the ones the in-thread callback gives."""
    def first(**kw):
        it = iter(loader(folder.samples, train=True, batch_size=4, seed=5, **kw))
        return [next(it) for _ in range(4)]
    for (x1, y1), (x2, y2) in zip(first(py_workers=0), first(py_workers=1)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_crop_and_mirror_statistics_match_torchvision():
    """The crop offsets and flips DALI is given are those torchvision draws under the same seed."""
    crop_tf, flip_tf = T.RandomCrop(24), T.RandomHorizontalFlip()
    img = torch.zeros(3, 40, 55)
    mirrors, tops, lefts = 0, set(), set()
    for seed in range(400):
        torch.manual_seed(seed)
        i, j, _, _ = crop_tf.get_params(img, (24, 24))
        flip = bool(torch.rand(1) < flip_tf.p)
        assert train_crop(seed, 55, 40, 24) == (i, j, flip)
        mirrors += flip
        tops.add(i)
        lefts.add(j)
    assert 0.4 < mirrors / 400 < 0.6 and tops == set(range(17)) and lefts == set(range(32))
    assert resized_size(64, 48, "improved", 40) == (53, 40) and resized_size(45, 70, "improved", 40) == (40, 62)
    assert T.Resize(40)(Image.new("RGB", (64, 48))).size == (53, 40)
    assert T.Resize(40)(Image.new("RGB", (45, 70))).size == (40, 62)


# ---------------------------------------------------------------- sharding


@needs_dali
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_covers_every_image_once_per_epoch(tmp_path, world_size):
    for k in range(12):  # flat images whose red level identifies them
        os.makedirs(tmp_path / f"c{k % 2}", exist_ok=True)
        Image.new("RGB", (48, 40), (10 + 20 * k, 100, 50)).save(tmp_path / f"c{k % 2}" / f"{k:02d}.png")
    samples = scan_image_folder(tmp_path).samples
    per_epoch = 12 // 6
    seen = {r: [] for r in range(world_size)}
    for r in range(world_size):
        it = iter(loader(samples, train=True, batch_size=6, seed=5, rank=r, world_size=world_size))
        for _ in range(2 * per_epoch):
            x, y = next(it)
            assert len(x) == 6 // world_size
            red = (x[:, 0].mean((1, 2)).numpy() * STD[0] + MEAN[0]) * 255
            ks = np.round((red - 10) / 20).astype(int).tolist()
            assert y.tolist() == [k % 2 for k in ks]
            seen[r].append(ks)
    for e in range(2):
        epoch = sorted(k for r in seen for batch in seen[r][e * per_epoch:(e + 1) * per_epoch] for k in batch)
        assert epoch == list(range(12))
    assert seen[0][:per_epoch] != seen[0][per_epoch:]  # reshuffled each epoch


# ---------------------------------------------------------------- bad files and the manifest


BAD = BAD_KINDS


@pytest.mark.parametrize("kind", BAD)
def test_bad_files_skipped_listed_and_strict(tmp_path, kind):
    root = make_folder(tmp_path / "d", per_class=2)
    bad = root / "bee" / f"bad_{kind}.jpg"
    write_bad_file(bad, kind, large_side=200)
    index = scan_image_folder(root, max_pixels=20_000)
    assert [p for p, _ in index.skipped] == [str(bad)] and len(index.samples) == 6
    assert ("too large" in index.skipped[0][1]) == (kind == "too_large")
    assert all(os.path.basename(os.path.dirname(p)) == index.classes[lab] for p, lab in index.samples)
    with pytest.raises(DataError, match=f"bad_{kind}"):
        scan_image_folder(root, max_pixels=20_000, strict=True)
    if DALI_MISSING is None:  # the pipeline over the validated index runs through without the bad file
        xs = [x for x, _ in loader(index.samples, train=False, batch_size=4, ten_crop=False)]
        assert sum(len(x) for x in xs) == 6


def test_manifest_caches_by_path_size_mtime(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", per_class=2)
    bad = root / "ant" / "bad.jpg"
    write_bad_file(bad, "corrupt")
    calls = []
    import fastdelta.data.folder as folder_mod
    real = folder_mod.check_image
    monkeypatch.setattr(folder_mod, "check_image", lambda p, m: calls.append(p) or real(p, m))
    first = scan_image_folder(root)
    assert len(calls) == 7 and len(first.skipped) == 1
    calls.clear()
    second = scan_image_folder(root)  # everything from the manifest
    assert calls == [] and second.samples == first.samples and second.skipped == first.skipped
    Image.new("RGB", (30, 30), "red").save(bad, "JPEG")  # the bad file is replaced by a good one
    os.utime(bad, ns=(os.stat(bad).st_atime_ns, os.stat(bad).st_mtime_ns + 10**9))
    third = scan_image_folder(root)
    assert calls == [str(bad)] and third.skipped == [] and len(third.samples) == 7
    calls.clear()
    scan_image_folder(root, max_pixels=10**6)  # another pixel limit: another manifest, all re-checked
    assert len(calls) == 7
    m = Manifest(root, folder_mod.DEFAULT_MAX_PIXELS)
    assert m.path is not None and m.path.exists() and len(m.entries) == 7
    m.path.write_text("{not json")  # a damaged manifest is ignored, never trusted
    calls.clear()
    assert len(scan_image_folder(root).samples) == 7 and len(calls) == 7
    monkeypatch.setenv("FASTDELTA_MANIFEST", "0")
    assert Manifest(root, 1).path is None


# ---------------------------------------------------------------- backend choice and fit


def test_backend_choice(folder, tmp_path):
    cpu = torch.device("cpu")
    ds = ImageListDataset(folder.samples)
    assert choose_backend("auto", cpu, ds).name == "torchvision"  # CPU default path unchanged
    assert choose_backend("torchvision", torch.device("cuda"), ds).name == "torchvision"
    with pytest.raises(DataError, match="DALI reads image files"):
        choose_backend("dali", cpu, torch.utils.data.TensorDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2)))
    gif = tmp_path / "x.gif"
    Image.new("RGB", (20, 20)).save(gif)
    cuda_auto = choose_backend("auto", torch.device("cuda"), ImageListDataset([(str(gif), 0)]))
    assert cuda_auto.name == "torchvision"
    if DALI_MISSING is None:
        assert choose_backend("dali", cpu, ds).name == "dali"
        assert choose_backend("auto", torch.device("cuda"), ds, None).name == "dali"
    else:
        assert "not importable" in choose_backend("auto", torch.device("cuda"), ds).reason


@needs_dali
def test_fit_with_dali_cpu_pipeline_reports_backend(folder):
    import fastdelta
    from tiny import TINY_LAYERS, tiny_net
    root = os.path.dirname(os.path.dirname(folder.samples[0][0]))
    kw = dict(method="l2", layers=TINY_LAYERS, iterations=3, batch_size=4, resize=16, crop=12, progress=False,
              eval_batch_size=5, num_workers=0, allow_overlap=True)  # tested on its training images
    res = fastdelta.fit(tiny_net(num_classes=3), root, root, data_backend="dali", **kw)
    assert res.data["backend"]["name"] == "dali" and res.test["images"] == 12
    assert all("data_s" in h for h in res.history)
    ref = fastdelta.fit(tiny_net(num_classes=3), root, root, **kw)
    assert ref.data["backend"]["name"] == "torchvision"
    # same batches and crops, pixels within decoder tolerance: the first loss agrees closely
    assert abs(res.history[0]["ce"] - ref.history[0]["ce"]) < 0.02


def test_bench_data_cpu_smoke(tmp_path):
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_data.py")
    spec = importlib.util.spec_from_file_location("bench_data", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bd.json"
    res = mod.main(["--images", "12", "--batch", "4", "--batches", "1", "--warmup", "1", "--workers", "0",
                    "--dali-threads", "1", "--data", str(tmp_path / "imgs"), "--out", str(out)])
    assert json.load(open(out))["images"] == 12
    assert res["results"]["torchvision_cpu"]["images"] == 4
    if DALI_MISSING is None:
        assert res["results"]["dali_cpu"]["images"] == 4
    if not torch.cuda.is_available():
        assert "skipped" in res["results"]["dali_gpu"]
