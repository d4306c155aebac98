"""Tests for fastdelta.data: folder indexing, bad files, image modes, arrays,
transforms, Fashion-MNIST and resolve_data. Images are tiny and generated in tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdelta.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    ArrayDataset,
    DataError,
    ImageListDataset,
    build_transforms,
    few_shot_subset,
    is_ten_crop,
    load_fashion_mnist,
    load_rgb,
    read_idx,
    resolve_data,
    scan_image_folder,
    to_rgb,
)

RESIZE, CROP = 20, 16  # small sizes keep the transform tests fast


# ---------------------------------------------------------------- helpers


def class_color(label: int) -> tuple[int, int, int]:
    """A distinct colour per class, so a loaded image reveals which folder it came from."""
    return (40 * label + 20, 0, 255 - 40 * label)


def make_image_folder(root: Path, counts: dict[str, int], size=(24, 18)) -> Path:
    """ROOT/<class>/<i>.png filled with the class colour (class index = sorted position)."""
    for label, name in enumerate(sorted(counts)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(counts[name]):
            Image.new("RGB", size, class_color(label)).save(root / name / f"{i:03d}.png")
    return root


def noise_jpeg_bytes(size=64) -> bytes:
    import io

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_bad_file(path: Path, kind: str, large_side: int = 100) -> None:
    if kind == "corrupt":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "truncated":
        data = noise_jpeg_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "too_large":
        Image.new("RGB", (large_side, large_side), "white").save(path, "JPEG")
    else:
        raise AssertionError(kind)


# ---------------------------------------------------------------- folder scanning


def test_labels_match_folders(tmp_path):
    root = make_image_folder(tmp_path, {"cat": 3, "dog": 2, "emu": 4})
    index = scan_image_folder(root)
    assert index.classes == ["cat", "dog", "emu"]
    assert index.skipped == []
    assert len(index.samples) == 9
    assert [p for p, _ in index.samples] == sorted(p for p, _ in index.samples)  # deterministic order
    for path, label in index.samples:
        assert Path(path).parent.name == index.classes[label]
    ds = ImageListDataset(index.samples)
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.mode == "RGB"
        assert img.getpixel((0, 0)) == class_color(label)


def test_given_class_mapping_is_respected(tmp_path):
    make_image_folder(tmp_path, {"a": 1, "b": 1, "c": 1})
    index = scan_image_folder(tmp_path, classes=["c", "a", "b"])
    assert index.classes == ["c", "a", "b"]
    assert {Path(p).parent.name: label for p, label in index.samples} == {"c": 0, "a": 1, "b": 2}


def test_non_image_and_hidden_files_ignored(tmp_path):
    make_image_folder(tmp_path, {"a": 2})
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"junk")
    (tmp_path / ".git").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "UPPER.PNG")  # extension check ignores case
    index = scan_image_folder(tmp_path)
    assert index.classes == ["a"]
    assert len(index.samples) == 3 and index.skipped == []


BAD_KINDS = ["corrupt", "truncated", "zero_byte", "text", "too_large"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_file_skipped_with_reason(tmp_path, kind):
    make_image_folder(tmp_path, {"a": 2, "b": 2})
    bad = tmp_path / "b" / f"bad_{kind}.jpg"
    write_bad_file(bad, kind)
    index = scan_image_folder(tmp_path, max_pixels=5000)
    assert len(index.samples) == 4
    assert [p for p, _ in index.skipped] == [str(bad)]
    reason = index.skipped[0][1]
    assert reason
    if kind == "too_large":
        assert "too large" in reason
    if kind == "zero_byte":
        assert "empty" in reason


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_file_fatal_in_strict_mode(tmp_path, kind):
    make_image_folder(tmp_path, {"a": 2})
    bad = tmp_path / "a" / f"bad_{kind}.jpg"
    write_bad_file(bad, kind)
    with pytest.raises(DataError, match=f"bad_{kind}.jpg"):
        scan_image_folder(tmp_path, strict=True, max_pixels=5000)


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")


def test_root_is_a_file(tmp_path):
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(DataError, match="not a directory"):
        scan_image_folder(tmp_path / "f.png")


def test_empty_root(tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        scan_image_folder(tmp_path)


def test_class_folders_without_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"contains no images; expected ROOT/<class>/<image>"):
        scan_image_folder(tmp_path)


def test_all_images_bad_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    write_bad_file(tmp_path / "a" / "x.jpg", "text")
    with pytest.raises(DataError, match="contains no images"):
        scan_image_folder(tmp_path)


def test_test_folder_missing_class(tmp_path):
    make_image_folder(tmp_path, {"a": 1, "b": 1})
    with pytest.raises(DataError, match=r"has no images for classes \['c'\]"):
        scan_image_folder(tmp_path, classes=["a", "b", "c"], role="test folder")


def test_test_folder_class_with_only_bad_images(tmp_path):
    make_image_folder(tmp_path, {"a": 1})
    (tmp_path / "b").mkdir()
    write_bad_file(tmp_path / "b" / "x.jpg", "corrupt")
    with pytest.raises(DataError, match=r"no images for classes \['b'\]"):
        scan_image_folder(tmp_path, classes=["a", "b"])


def test_test_folder_extra_class(tmp_path):
    make_image_folder(tmp_path, {"a": 1, "b": 1, "zebra": 1})
    with pytest.raises(DataError, match="zebra"):
        scan_image_folder(tmp_path, classes=["a", "b"])


# ---------------------------------------------------------------- image modes


def _saved(tmp_path, img: Image.Image, name: str, **kw) -> Path:
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_modes_are_converted_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 6), (10, 200, 30, 255))
    palette = Image.new("RGB", (8, 6), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    paths = {
        "L": _saved(tmp_path, Image.new("L", (8, 6), 77), "gray.png"),
        "RGBA": _saved(tmp_path, rgba, "rgba.png"),
        "CMYK": _saved(tmp_path, Image.new("CMYK", (8, 6), (0, 255, 0, 0)), "cmyk.jpg"),
        "I;16": _saved(tmp_path, Image.fromarray(np.full((6, 8), 1000, np.uint16)), "deep.png"),
        "P": _saved(tmp_path, palette, "pal.png"),
        "WEBP": _saved(tmp_path, Image.new("RGB", (8, 6), (0, 0, 255)), "pic.webp"),
        "LA": _saved(tmp_path, Image.new("LA", (8, 6), (50, 255)), "la.png"),
    }
    for mode, path in paths.items():
        img = load_rgb(path)
        assert img.mode == "RGB", mode
        assert img.size == (8, 6), mode
    assert load_rgb(paths["L"]).getpixel((0, 0)) == (77, 77, 77)
    assert load_rgb(paths["RGBA"]).getpixel((0, 0)) == (10, 200, 30)
    assert load_rgb(paths["P"]).getpixel((0, 0)) == (200, 10, 10)
    red, green, blue = load_rgb(paths["CMYK"]).getpixel((0, 0))
    assert green < 30 and red > 200 and blue > 200  # full magenta ink -> no green
    # All of them also pass folder validation.
    (tmp_path / "cls").mkdir()
    for path in paths.values():
        path.rename(tmp_path / "cls" / path.name)
    index = scan_image_folder(tmp_path)
    assert len(index.samples) == len(paths) and index.skipped == []


def test_16bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[65535, 32768], [0, 257]], dtype=np.uint16)
    path = _saved(tmp_path, Image.fromarray(values), "deep.png")
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_rgb(path))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert abs(int(out[0, 1, 0]) - 128) <= 1
    assert out[1, 0, 0] == 0 and out[1, 1, 0] == 1


def test_32bit_int_image_in_16bit_range_is_scaled():
    img = Image.fromarray(np.array([[65535, 32768]], dtype=np.int32))
    assert img.mode == "I"
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [255, 128]


def test_transparent_pixels_become_white(tmp_path):
    path = _saved(tmp_path, Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "clear.png")
    assert load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


# ---------------------------------------------------------------- ArrayDataset


@pytest.mark.parametrize(
    "x",
    [
        np.full((3, 10, 12), 200, np.uint8),
        np.full((3, 10, 12, 3), 200, np.uint8),
        np.full((3, 10, 12, 1), 200, np.uint8),
        np.full((3, 1, 10, 12), 200 / 255, np.float32),
        np.full((3, 3, 10, 12), 200 / 255, np.float64),
        torch.full((3, 3, 10, 12), 200 / 255),
    ],
    ids=["NHW-u8", "NHW3-u8", "NHW1-u8", "N1HW-float", "N3HW-float", "torch-float"],
)
def test_array_dataset_shapes(x):
    ds = ArrayDataset(x, np.array([0, 1, 2]))
    assert len(ds) == 3
    img, label = ds[2]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (12, 10)
    assert img.getpixel((0, 0)) == (200, 200, 200)
    assert label == 2 and isinstance(label, int)


def test_array_dataset_applies_transform():
    train_tf, _ = build_transforms("default", RESIZE, CROP)
    ds = ArrayDataset(torch.zeros(2, 28, 28, dtype=torch.uint8), torch.tensor([0, 1]), train_tf)
    img, _ = ds[0]
    assert img.shape == (3, CROP, CROP)


@pytest.mark.parametrize(
    "x, y, message",
    [
        (np.zeros((3, 8, 8), np.uint8), np.array([0, 1]), "train labels: got 2 labels for 3 images"),
        (np.zeros((2, 8, 8), np.uint8), np.array([0, -1]), "train labels: .*>= 0"),
        (np.zeros((2, 8, 8), np.uint8), np.array([0.0, 1.0]), "train labels: expected integer"),
        (np.zeros((2, 3, 8, 8), np.uint8), np.array([0, 1]), r"train images: expected .* got shape \(2, 3, 8, 8\)"),
        (np.zeros((2, 8, 8, 3), np.float32), np.array([0, 1]), r"train images: expected .* got shape \(2, 8, 8, 3\)"),
        (np.zeros((2, 8, 8), np.int64), np.array([0, 1]), "train images: expected .* dtype int64"),
        (np.full((2, 3, 8, 8), 255.0, np.float32), np.array([0, 1]), r"train images: .*\[0,1\]"),
        (np.zeros((0, 8, 8), np.uint8), np.array([], np.int64), "train images: expected a non-empty"),
    ],
)
def test_array_dataset_errors(x, y, message):
    with pytest.raises(DataError, match=message):
        ArrayDataset(x, y, name="train")


# ---------------------------------------------------------------- transforms


def asymmetric_image(width=40, height=30) -> Image.Image:
    """Left half black, right half white: a mirrored crop is obvious."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, width // 2 :] = 255
    return Image.fromarray(arr)


@pytest.mark.parametrize("augmentation", ["default", "improved"])
def test_transform_shapes(augmentation):
    train_tf, eval_tf = build_transforms(augmentation, RESIZE, CROP)
    img = asymmetric_image()
    assert train_tf(img).shape == (3, CROP, CROP)
    expected_eval = (3, CROP, CROP) if augmentation == "default" else (10, 3, CROP, CROP)
    out = eval_tf(img)
    assert out.shape == expected_eval and out.dtype == torch.float32
    batch = torch.stack([out, out])
    assert is_ten_crop(batch) == (augmentation == "improved")


def test_improved_resize_keeps_aspect_ratio():
    _, eval_tf = build_transforms("improved", RESIZE, CROP)
    resize = eval_tf.transforms[0]
    assert resize(asymmetric_image(40, 20)).size == (RESIZE * 2, RESIZE)


def test_default_normalizes_with_imagenet_stats():
    _, eval_tf = build_transforms("default", RESIZE, CROP)
    out = eval_tf(Image.new("RGB", (30, 30), (255, 255, 255)))
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out[:, 0, 0], expected, atol=1e-5)


@pytest.mark.parametrize("augmentation", ["default", "improved"])
def test_train_flip_statistics(augmentation):
    train_tf, _ = build_transforms(augmentation, RESIZE, CROP)
    img = asymmetric_image()
    torch.manual_seed(0)
    mirrored = 0
    for _ in range(200):
        out = train_tf(img)
        mirrored += bool(out[:, :, 0].mean() > out[:, :, -1].mean())  # white on the left
    assert 70 <= mirrored <= 130


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="crop"):
        build_transforms("default", resize=100, crop=224)
    with pytest.raises(ValueError, match=r"augmentation.*default.*improved"):
        build_transforms("fancy")


def test_is_ten_crop_rejects_non_tensors():
    assert not is_ten_crop(torch.zeros(2, 3, 4, 4))
    assert not is_ten_crop([1, 2])


# ---------------------------------------------------------------- Fashion-MNIST

needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR),
    reason=f"{FASHION_MNIST_DIR} missing (apt-get install -y dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def fmnist_train():
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip(f"{FASHION_MNIST_DIR} missing")
    return load_fashion_mnist("train")


@needs_fmnist
def test_fashion_mnist_train(fmnist_train):
    x, y = fmnist_train
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.dtype == np.int64
    assert y.min() == 0 and y.max() == 9
    assert np.bincount(y).tolist() == [6000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[0] == "T-shirt/top"


@needs_fmnist
def test_fashion_mnist_test():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert set(np.unique(y).tolist()) == set(range(10))


@needs_fmnist
def test_few_shot_subset(fmnist_train):
    x, y = fmnist_train
    xs, ys = few_shot_subset(x, y, per_class=5, seed=1)
    assert xs.shape == (50, 28, 28) and ys.tolist() == sorted(ys.tolist())
    assert np.bincount(ys).tolist() == [5] * 10
    xs2, ys2 = few_shot_subset(x, y, per_class=5, seed=1)
    assert np.array_equal(xs, xs2) and np.array_equal(ys, ys2)
    xs3, _ = few_shot_subset(x, y, per_class=5, seed=2)
    assert not np.array_equal(xs, xs3)


def test_few_shot_subset_keeps_original_order_within_class():
    x = np.arange(20)
    y = np.array([0, 1] * 10)
    xs, ys = few_shot_subset(x, y, per_class=3, seed=0)
    assert ys.tolist() == [0, 0, 0, 1, 1, 1]
    assert xs[:3].tolist() == sorted(xs[:3].tolist()) and xs[3:].tolist() == sorted(xs[3:].tolist())
    assert all(v % 2 == 0 for v in xs[:3]) and all(v % 2 == 1 for v in xs[3:])


def test_few_shot_subset_too_few():
    with pytest.raises(DataError, match="class 1 has only 1"):
        few_shot_subset(np.zeros(4), np.array([0, 0, 0, 1]), per_class=2, seed=0)


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_read_idx_roundtrip_and_bad_magic(tmp_path):
    import gzip

    data = np.arange(6, dtype=np.uint8).reshape(2, 3)
    header = bytes([0, 0, 0x08, 2]) + np.array([2, 3], dtype=">u4").tobytes()
    with gzip.open(tmp_path / "ok.gz", "wb") as f:
        f.write(header + data.tobytes())
    assert np.array_equal(read_idx(tmp_path / "ok.gz"), data)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x01\x02\x03\x04" + data.tobytes())
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "bad.gz")


# ---------------------------------------------------------------- resolve_data


class PILDataset(torch.utils.data.Dataset):
    classes = ["zero", "one"]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return Image.new("L", (30, 25), 60 * i), i % 2


class TensorDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return torch.full((3, 7, 7), float(i)), i  # labels 0..2, no classes/targets


def _resolve(train, test=None, **kw):
    kw.setdefault("allow_overlap", True)  # solid class colours: a test image is a training image by its bytes
    return resolve_data(train, test, augmentation=kw.pop("augmentation", "default"), resize=RESIZE, crop=CROP, **kw)


def test_resolve_root_with_train_and_test(tmp_path):
    make_image_folder(tmp_path / "train", {"a": 3, "b": 2, "c": 2})
    make_image_folder(tmp_path / "test", {"a": 1, "b": 1, "c": 1})
    bundle = _resolve(str(tmp_path))
    assert bundle.classes == ["a", "b", "c"]
    assert len(bundle.train) == 7 and len(bundle.test) == 3
    x, label = bundle.train[0]
    assert x.shape == (3, CROP, CROP) and label == 0
    desc = json.loads(json.dumps(bundle.description))
    assert desc["train"]["kind"] == "folder" and desc["train"]["num_samples"] == 7
    assert desc["train"]["class_counts"] == [3, 2, 2]
    assert desc["test"]["num_samples"] == 3 and desc["num_skipped"] == 0


def test_resolve_test_folder_uses_train_mapping(tmp_path):
    class Unsorted(PILDataset):
        classes = ["c", "a", "b"]  # deliberately not alphabetical

        def __getitem__(self, i):
            return Image.new("RGB", (30, 25)), i % 3

    make_image_folder(tmp_path, {"a": 1, "b": 1, "c": 1})
    bundle = _resolve(Unsorted(), tmp_path)
    assert bundle.classes == ["c", "a", "b"]
    assert {Path(p).parent.name: label for p, label in bundle.test.samples} == {"c": 0, "a": 1, "b": 2}


def test_resolve_test_missing_class(tmp_path):
    make_image_folder(tmp_path / "train", {"a": 1, "b": 1, "c": 1})
    make_image_folder(tmp_path / "test", {"a": 1, "c": 1})
    with pytest.raises(DataError, match=r"test folder .* has no images for classes \['b'\]"):
        _resolve(tmp_path)


def test_resolve_test_extra_class(tmp_path):
    make_image_folder(tmp_path / "train", {"a": 1, "b": 1})
    make_image_folder(tmp_path / "test", {"a": 1, "b": 1, "q": 1})
    with pytest.raises(DataError, match=r"\['q'\]"):
        _resolve(tmp_path)


def test_resolve_class_folder_root_without_test(tmp_path):
    make_image_folder(tmp_path, {"x": 2, "y": 2})
    bundle = _resolve(tmp_path)
    assert bundle.classes == ["x", "y"] and bundle.test is None
    assert bundle.description["test"] is None


def test_resolve_explicit_test_path_and_improved(tmp_path):
    make_image_folder(tmp_path / "tr", {"x": 2, "y": 2})
    make_image_folder(tmp_path / "te", {"x": 1, "y": 1})
    bundle = _resolve(tmp_path / "tr", tmp_path / "te", augmentation="improved")
    x, _ = bundle.test[0]
    assert x.shape == (10, 3, CROP, CROP)
    assert bundle.train[0][0].shape == (3, CROP, CROP)


def test_resolve_skipped_and_strict(tmp_path):
    make_image_folder(tmp_path / "train", {"a": 2, "b": 2})
    make_image_folder(tmp_path / "test", {"a": 1, "b": 1})
    write_bad_file(tmp_path / "train" / "a" / "broken.jpg", "truncated")
    write_bad_file(tmp_path / "test" / "b" / "empty.png", "zero_byte")
    bundle = _resolve(tmp_path)
    assert sorted(Path(p).name for p, _ in bundle.skipped) == ["broken.jpg", "empty.png"]
    assert bundle.description["num_skipped"] == 2
    with pytest.raises(DataError, match="broken.jpg"):
        _resolve(tmp_path, strict=True)


def test_resolve_arrays():
    x = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    bundle = _resolve((x, y), (x[:3], y[:3]))
    assert bundle.classes == ["0", "1", "2"]
    img, label = bundle.train[1]
    assert img.shape == (3, CROP, CROP) and label == 1
    assert bundle.test[0][0].shape == (3, CROP, CROP)
    assert {k: v for k, v in bundle.description["train"].items() if k != "fingerprint"} == {
        "kind": "arrays", "num_samples": 6, "num_skipped": 0, "class_counts": [2, 2, 2]
    }
    assert bundle.description["overlap"]["images"] == 3


def test_resolve_test_labels_out_of_range():
    x = np.zeros((4, 8, 8), np.uint8)
    with pytest.raises(DataError, match="test labels"):
        _resolve((x, np.array([0, 1, 0, 1])), (x, np.array([0, 1, 2, 3])))


def test_resolve_pil_dataset_gets_transform():
    bundle = _resolve(PILDataset(), PILDataset())
    assert bundle.classes == ["zero", "one"]
    img, label = bundle.train[3]
    assert img.shape == (3, CROP, CROP) and label == 1  # grayscale PIL became 3-channel
    assert bundle.test[0][0].shape == (3, CROP, CROP)
    assert bundle.description["train"]["kind"] == "dataset"
    json.dumps(bundle.description)


def test_resolve_tensor_dataset_passes_through():
    bundle = _resolve(TensorDataset())
    assert bundle.classes == ["0", "1", "2"]  # from iterating the labels
    img, label = bundle.train[2]
    assert torch.equal(img, torch.full((3, 7, 7), 2.0)) and label == 2


def test_resolve_dataset_with_bad_items():
    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return np.zeros((4, 4)), 0

    with pytest.raises(DataError, match="train dataset item 0: expected a PIL image or a CHW tensor"):
        _resolve(Bad())


def test_resolve_mixed_folder_train_array_test(tmp_path):
    make_image_folder(tmp_path, {"a": 1, "b": 1})
    bundle = _resolve(tmp_path, (np.zeros((2, 9, 9), np.uint8), np.array([1, 0])))
    assert bundle.classes == ["a", "b"] and len(bundle.test) == 2


@pytest.mark.parametrize("bad", [[1, 2], 42, {"x": 1}])
def test_resolve_wrong_types(tmp_path, bad):
    with pytest.raises(DataError, match=f"train: .*got {type(bad).__name__}"):
        _resolve(bad)
    make_image_folder(tmp_path, {"a": 1})
    with pytest.raises(DataError, match=f"test: .*got {type(bad).__name__}"):
        _resolve(tmp_path, bad)


def test_resolve_bad_sizes_fail_before_scanning(tmp_path):
    with pytest.raises(ValueError, match="crop"):
        resolve_data(tmp_path / "missing", augmentation="default", resize=10, crop=20)
