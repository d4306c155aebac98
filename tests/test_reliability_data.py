"""Input problems that used to pass silently or fail with an unhelpful message: symlinked
folders, label gaps in arrays, unbatched images, unreadable weights files, a missing GPU."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastdelta
from fastdelta import ModelError, SettingsError
from fastdelta.data import ArrayDataset, DataError, resolve_data, scan_image_folder
from fastdelta.train.distributed import DistContext, device_for
from fastdelta.networks.models import load_source_weights
from tiny import arrays, tiny_net

QUICK = dict(iterations=1, batch_size=4, resize=16, crop=12, progress=False)

needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt",
                                    reason="symlinks need privileges on Windows")


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    """ROOT/<class>/<i>.png, each image a different colour so no two files are equal by content."""
    for label, name in enumerate(sorted(counts)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(counts[name]):
            Image.new("RGB", (12, 12), (40 * label, 30 * i, 100)).save(root / name / f"{i}.png")
    return root


def class_counts(index) -> list[int]:
    return np.bincount([label for _, label in index.samples], minlength=len(index.classes)).tolist()


# ---------------------------------------------------------------- symlinks in image folders


@needs_symlinks
def test_directory_symlink_loop_is_scanned_once_and_reported(tmp_path):
    train = make_folder(tmp_path / "train", {"a": 4, "b": 3})
    os.symlink(".", train / "a" / "loop")
    index = scan_image_folder(train)
    assert class_counts(index) == [4, 3]
    assert [Path(p).name for p, _ in index.samples[:4]] == ["0.png", "1.png", "2.png", "3.png"]
    [(path, reason)] = index.skipped
    assert path == str(train / "a" / "loop")
    assert reason == f"symlink loop: directory already scanned as {os.path.realpath(train / 'a')}"


@needs_symlinks
def test_loop_to_an_ancestor_and_a_directory_linked_twice(tmp_path):
    train = make_folder(tmp_path / "train", {"a": 2, "b": 2})
    (train / "a" / "sub").mkdir()
    Image.new("RGB", (12, 12), "white").save(train / "a" / "sub" / "s.png")
    os.symlink("../..", train / "a" / "sub" / "up")  # back to train/: would re-enter a/ and b/
    make_folder(tmp_path / "extra", {"x": 1})
    os.symlink(tmp_path / "extra" / "x", train / "a" / "ext")  # outside the tree: followed
    os.symlink(tmp_path / "extra" / "x", train / "b" / "ext")  # the same directory again
    index = scan_image_folder(train)
    assert class_counts(index) == [4, 2]
    assert str(train / "a" / "ext" / "0.png") in [p for p, _ in index.samples]
    reasons = dict(index.skipped)
    assert reasons[str(train / "a" / "sub" / "up")].startswith("symlink loop: directory already scanned as ")
    assert reasons[str(train / "b" / "ext")] == f"directory link: {os.path.realpath(tmp_path / 'extra' / 'x')} is already part of the scan"


@needs_symlinks
def test_symlinked_file_counts_once(tmp_path):
    train = make_folder(tmp_path / "train", {"a": 3, "b": 2})
    os.symlink("0.png", train / "a" / "y.png")
    index = scan_image_folder(train)
    assert class_counts(index) == [3, 2]
    assert str(train / "a" / "y.png") not in [p for p, _ in index.samples]
    assert index.skipped == [(str(train / "a" / "y.png"), f"duplicate of {train / 'a' / '0.png'} (same file)")]


@needs_symlinks
def test_real_file_is_kept_over_a_link_that_sorts_first(tmp_path):
    train = make_folder(tmp_path / "train", {"a": 2, "b": 2})
    os.symlink("1.png", train / "a" / "00.png")  # "00.png" < "1.png"
    index = scan_image_folder(train)
    assert [Path(p).name for p, label in index.samples if label == 0] == ["0.png", "1.png"]
    assert index.skipped == [(str(train / "a" / "00.png"), f"duplicate of {train / 'a' / '1.png'} (same file)")]


def test_hard_link_into_another_class_counts_once(tmp_path):
    train = make_folder(tmp_path / "train", {"a": 2, "b": 2})
    os.link(train / "a" / "0.png", train / "b" / "z.png")
    index = scan_image_folder(train)
    assert class_counts(index) == [2, 2]
    assert index.skipped == [(str(train / "b" / "z.png"), f"duplicate of {train / 'a' / '0.png'} (same file)")]


@needs_symlinks
def test_class_folder_linked_to_another_class_names_the_link(tmp_path):
    train = make_folder(tmp_path / "train", {"a": 2, "b": 2})
    os.symlink("a", train / "c")
    with pytest.raises(DataError, match=r"no images for classes \['c'\] \(skipped: .*c: directory link: already"):
        scan_image_folder(train)


@needs_symlinks
def test_symlink_skips_reach_the_result(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", {"a": 4, "b": 4})
    make_folder(root / "test", {"a": 1, "b": 1})
    os.symlink(".", root / "train" / "a" / "loop")
    # make_folder's test images are its first training images: overlap allowed, it is not what is tested here
    bundle = resolve_data(root, resize=16, crop=12, allow_overlap=True)
    assert bundle.description["train"]["class_counts"] == [4, 4]
    assert [Path(p).name for p, _ in bundle.skipped] == ["loop"]
    res = fastdelta.fit(tiny_net(), str(root), None, method="l2", allow_overlap=True, **QUICK)
    assert res.data["skipped_files"] == [[str(root / "train" / "a" / "loop"),
                                          f"symlink loop: directory already scanned as {os.path.realpath(root / 'train' / 'a')}"]]


# ---------------------------------------------------------------- array labels


def test_array_labels_with_a_gap_are_rejected():
    x, _ = arrays(n_per_class=2, classes=2)
    y = np.array([0, 0, 2, 2])
    with pytest.raises(DataError, match=r"no sample for label\(s\) \[1\] in 0\.\.2.*relabel the classes to 0\.\.K-1"):
        resolve_data((x, y), resize=16, crop=12)
    with pytest.raises(DataError, match=r"label\(s\) \[1\]"):
        fastdelta.fit(tiny_net(), (x, y), None, method="l2", **QUICK)


def test_test_labels_missing_a_class_are_rejected_as_a_test_folder_is():
    test = (arrays(1, 3, seed=1)[0][:2], np.array([0, 2]))
    with pytest.raises(DataError, match=r"test labels \(arrays\) have no images for classes \['1'\]"):
        resolve_data(arrays(n_per_class=2, classes=3), test, resize=16, crop=12)


# ---------------------------------------------------------------- messages


def test_one_unbatched_colour_image_is_named():
    img = np.zeros((16, 16, 3), dtype=np.uint8)
    with pytest.raises(DataError, match=r"train images has shape \(16, 16, 3\) \(H, W, C\): that looks like one "
                                        r"colour image; pass a batch \(N, H, W, C\)"):
        ArrayDataset(img, np.array([0]), name="train")
    with pytest.raises(DataError, match="looks like one colour image"):
        ArrayDataset(np.zeros((16, 16, 4), dtype=np.uint8), [0], name="train")


def test_grayscale_batches_still_work():
    ds = ArrayDataset(np.zeros((3, 10, 3, 1), dtype=np.uint8), np.array([0, 1, 2]))  # 3 images of 10x3
    assert len(ds) == 3 and ds[0][0].size == (3, 10)
    ds = ArrayDataset(np.zeros((4, 8, 8), dtype=np.uint8), np.array([0, 1, 0, 1]))
    assert len(ds) == 4


def test_empty_weights_file(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match=rf"^weights file '{re.escape(str(path))}' is empty \(0 bytes\)$"):
        load_source_weights(tiny_net(), "custom", str(path), "fc")
    with pytest.raises(ModelError, match="is empty"):
        fastdelta.fit(tiny_net(), arrays(), None, weights=str(path), method="l2", **QUICK)


def test_weights_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelError, match=rf"^weights file '{re.escape(str(path))}' is not a PyTorch state dict "
                                         r"\(torch\.load failed: [^\n]+\)$") as info:
        load_source_weights(tiny_net(), "custom", str(path), "fc")
    assert "weights_only" not in str(info.value)  # not torch's advice to load untrusted pickles
    path.write_text("not weights\n")
    with pytest.raises(ModelError, match=r"is not a PyTorch state dict \(torch\.load failed: "):
        load_source_weights(tiny_net(), "custom", str(path), "fc")


def test_state_dict_file_still_loads(tmp_path):
    src = tiny_net(seed=1)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    net = tiny_net(seed=2)
    assert load_source_weights(net, "custom", str(tmp_path / "w.pt"), "fc").startswith("file ")
    assert torch.equal(net.conv1.weight, src.conv1.weight)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu():
    with pytest.raises(SettingsError, match=r"device='cuda': no CUDA device is available on this machine "
                                            r"\(torch\.cuda\.is_available\(\) is False\); use device='cpu' or 'auto'"):
        fastdelta.fit(tiny_net(), arrays(), None, method="l2", device="cuda", **QUICK)


def test_invalid_device_string():
    with pytest.raises(SettingsError, match=r"device='gpu' is not a valid device"):
        fastdelta.fit(tiny_net(), arrays(), None, method="l2", device="gpu", **QUICK)
    assert device_for(DistContext(), "cpu") == torch.device("cpu")
