"""A tiny residual CNN for fast CPU tests (conv biases, BN, residual, in-place ReLU)."""
import contextlib
import signal

import torch
import torch.nn as nn


def _norm(c, bn):
    return nn.BatchNorm2d(c) if bn else nn.Identity()


class Block(nn.Module):
    def __init__(self, c, bn=True):
        super().__init__()
        self.conv_a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn_a = _norm(c, bn)
        self.relu = nn.ReLU(inplace=True)
        self.conv_b = nn.Conv2d(c, c, 3, padding=1, bias=True)
        self.bn_b = _norm(c, bn)

    def forward(self, x):
        out = self.relu(self.bn_a(self.conv_a(x)))
        out = self.bn_b(self.conv_b(out))
        out += x
        return self.relu(out)


class TinyNet(nn.Module):
    def __init__(self, num_classes=5, width=8, bn=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=True)
        self.bn1 = _norm(width, bn)
        self.relu = nn.ReLU(inplace=True)
        self.block = Block(width, bn)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = _norm(2 * width, bn)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.block(x)
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


TINY_LAYERS = ["block.conv_b", "conv2"]


def tiny_net(seed=0, num_classes=5, bn=True):
    """bn=False: no batch statistics, so DDP over R ranks can match one process exactly."""
    torch.manual_seed(seed)
    net = TinyNet(num_classes, bn=bn)
    # non-trivial BN statistics so eval mode differs from identity
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def arrays(n_per_class=4, classes=3, size=16, seed=0):
    """Random uint8 images (N, size, size, 3) with balanced labels: a dataset for quick fits."""
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n_per_class * classes, size, size, 3), dtype=np.uint8)
    return x, np.repeat(np.arange(classes), n_per_class)


def fit_killed_and_resumed(run_dir, **kw):
    """fastdelta.fit to the end, then again with resume=True after deleting the last checkpoint (as if
    the process was killed just before writing it); asserts the resumed run is bitwise the full one."""
    import os
    import fastdelta
    full = fastdelta.fit(tiny_net(), arrays(), arrays(1, seed=1), run_dir=str(run_dir), **kw)
    os.remove(os.path.join(run_dir, "checkpoints", f"ckpt-{kw['iterations']:08d}.pt"))
    resumed = fastdelta.fit(tiny_net(), arrays(), arrays(1, seed=1), run_dir=str(run_dir), resume=True, **kw)
    for (k, v), w in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(v, w), k
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    return full, resumed


def image_folder(root, per_class=3, seed=0, size=14, classes=("a", "b"), suffix="png"):
    """ROOT/<class>/<i>.<suffix>, each a different random colour image of size x size."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.{suffix}")
    return root


@contextlib.contextmanager
def sigterm_must_be_handled():
    """A SIGTERM that fastdelta does not handle raises here instead of ending the test process."""
    def not_ours(signum, frame):
        raise AssertionError("SIGTERM reached the caller's handler: fastdelta did not handle it")
    previous = signal.signal(signal.SIGTERM, not_ours)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
