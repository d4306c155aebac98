"""The skeptical user's tries, run again: each bad input or fault and what fastdelta now does with it.

    python3 scripts/reliability_tries.py        # prints one line per try (about two minutes on 2 cores)
"""
import errno
import os
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image

import fastdelta

warnings.simplefilter("ignore")
QUICK = dict(batch_size=4, resize=36, crop=32, progress=False, attention_cache=None)
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
y = np.repeat(np.arange(3), 4)


def outcome(label, fn):
    try:
        r = fn()
        print(f"- {label}: no error -> {r}")
    except Exception as e:  # noqa: BLE001 - the point is to show what each try raises
        print(f"- {label}: {type(e).__name__}: {str(e)[:300]}")


def diverging_l2_sp():
    try:
        fastdelta.fit("resnet18", (x, y), None, method="l2_sp", alpha=1e6, iterations=20, weights="random", **QUICK)
    except fastdelta.NonFiniteLossError as e:
        m = e.partial_result.model.eval()
        bad = [n for n, b in m.named_buffers() if b.is_floating_point() and not torch.isfinite(b).all()]
        out = m(torch.randn(2, 3, 32, 32))
        return (f"stopped at iteration {e.iteration} ({e.term}); non-finite BN buffers: {len(bad)}; "
                f"eval output finite: {bool(torch.isfinite(out).all())}")


def symlink_loop(tmp):
    train = Path(tmp) / "sym" / "train"
    for c, n in (("a", 4), ("b", 3)):
        (train / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(train / c / f"{i}.png")
    os.symlink(".", train / "a" / "loop")
    from fastdelta.data import scan_image_folder
    index = scan_image_folder(train)
    counts = np.bincount([label for _, label in index.samples]).tolist()
    return f"class counts {counts}; skipped {index.skipped}"


def out_is_a_file(tmp):
    f = Path(tmp) / "a_file"
    f.write_text("x")
    return fastdelta.fit("resnet18", (x, y), None, method="l2", weights="random", iterations=2, run_dir=str(f), **QUICK)


def full_disk_at_checkpoint(tmp):
    real = os.replace

    def full(src, dst):
        if str(dst).endswith(".pt") and "ckpt-00000004" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)
    with mock.patch("os.replace", full):
        return fastdelta.fit("resnet18", (x, y), None, method="l2", weights="random", iterations=6,
                             checkpoint_every=2, run_dir=str(Path(tmp) / "full"), **QUICK)


def weights_file(tmp, content):
    p = Path(tmp) / "w.pt"
    p.write_bytes(content)
    return fastdelta.fit("resnet18", (x, y), None, method="l2", weights=str(p), iterations=1, **QUICK)


with tempfile.TemporaryDirectory() as tmp:
    outcome("1. l2_sp with alpha=1e6 on resnet18", diverging_l2_sp)
    outcome("2. `ln -s . train/a/loop` (4 real images in a)", lambda: symlink_loop(tmp))
    outcome("3a. --out is an existing file", lambda: out_is_a_file(tmp))
    outcome("3b. disk full at the second checkpoint", lambda: full_disk_at_checkpoint(tmp))
    outcome("4. array labels {0, 2}", lambda: fastdelta.fit("resnet18", (x[:8], np.array([0, 2] * 4)), None,
                                                           method="l2", weights="random", iterations=1, **QUICK))
    outcome("5a. one (H, W, 3) image", lambda: fastdelta.fit("resnet18", (x[0], y), None, method="l2",
                                                            weights="random", iterations=1, **QUICK))
    outcome("5b. a 0-byte weights file", lambda: weights_file(tmp, b""))
    outcome("5c. a random-bytes weights file", lambda: weights_file(tmp, os.urandom(256)))
    outcome("5d. device='cuda' without a GPU", lambda: fastdelta.fit("resnet18", (x, y), None, method="l2",
                                                                    weights="random", device="cuda", **QUICK))
    outcome("5e. momentum=1.5", lambda: fastdelta.fit("resnet18", (x, y), None, method="l2", weights="random",
                                                     momentum=1.5, **QUICK))
print("- 6. SIGTERM / SIGINT: tests/test_faults.py (subprocess signalled mid-run, checkpoint, Preempted, "
      "exit 4 from the CLI, resume bit-identical; two gloo ranks stop at the same iteration)")
