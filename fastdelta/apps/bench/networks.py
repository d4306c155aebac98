"""What a benchmark row trains: a randomly initialised network (or the tiny CPU one) whose BatchNorm
statistics are calibrated before source and target are built, a random attention, one synthetic batch."""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ...networks.models import DEFAULT_LAYERS, build_architecture, build_networks


class SmokeNet(nn.Module):
    """A small CNN (conv-BN-ReLU stages) for the CPU smoke configuration."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        def stage(i, o, s):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))
        self.stem = stage(3, width, 2)
        self.layer1 = stage(width, width, 1)
        self.layer2 = stage(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


SMOKE_LAYERS = ["layer1.0", "layer2.0"]


CALIBRATION_BATCHES = 2  # synthetic batches that set the BN running statistics


CALIBRATION_VALUES = 32  # values per channel at the last (stride-32) stage per calibration batch at least


def calibration_batch(batch: int, size: int) -> int:
    """Images per calibration batch: the benchmark's batch, more where the last stage's map is small. A
    running variance estimated from a few values per channel (batch 2 of a 1x1 map) is ~0 for some
    channels, and the eval-mode source then amplifies them by up to 1/sqrt(eps)."""
    last = max(1, -(-size // 32)) ** 2  # the stride-32 map: ceil(size / 32) squared
    return max(batch, -(-CALIBRATION_VALUES // last))


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batch: int, size: int, device, batches: int = CALIBRATION_BATCHES,
                        seed: int = 0) -> dict:
    """Set every BatchNorm's running statistics to their average over `batches` synthetic N(0, 1) batches
    (train-mode forwards, cumulative average), then put the model in eval mode.

    A randomly initialised network's fresh statistics (mean 0, var 1) do not normalise in eval mode: the
    frozen source's deep maps grow with depth (rms ~1e4 at ResNet-101's layer3.22.conv3 / layer4.2.conv3
    against ~0.5 for the train-mode target) and DELTA's distance to them overflows in a few steps. After
    calibration the eval-mode maps have the train-mode scale, as a pre-trained network's have."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    info = {"batches": batches if bns else 0, "batch": batch, "size": size, "input": "randn N(0,1)",
            "batchnorm_layers": len(bns)}
    if not bns or batches <= 0:
        return info
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every calibration batch counts the same
    model.train()
    g = torch.Generator(device="cpu").manual_seed(seed + 7919)
    for _ in range(batches):
        model(torch.randn(batch, 3, size, size, generator=g).to(device))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()
    return info


CALIBRATED: dict = {}  # the last calibrated network (on the CPU): the rows of one model share it


def networks_for(model: str, num_classes: int, device, seed=0, batch: int = 4, size: int = 32,
              calibration_batches: int = CALIBRATION_BATCHES):
    """Source and target from one randomly initialised network whose BN statistics are calibrated
    (`calibrate_batchnorm`) before the two are built: the source's eval-mode maps then have a
    realistic scale. Returns (networks, calibration record). The calibrated network is kept (one,
    on the CPU) for the next row of the same model and shapes: calibrated once, every engine the same."""
    key = (model, str(device), seed, calibration_batch(batch, size), size, calibration_batches)
    if key not in CALIBRATED:
        CALIBRATED.clear()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # random weights: speed does not depend on them
                net = SmokeNet() if model == "smoke" else build_architecture(model)
        net.to(device)
        calibration = calibrate_batchnorm(net, key[3], size, device, calibration_batches, seed)
        CALIBRATED[key] = (net.cpu(), calibration)
    net, calibration = CALIBRATED[key]
    layers = SMOKE_LAYERS if model == "smoke" else DEFAULT_LAYERS.get(model)
    nets = build_networks(net, num_classes, None, layers, seed)  # deep copies: the kept one stays as it is
    nets.source.to(device)
    nets.target.to(device)
    return nets, dict(calibration)


def random_attention(nets, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in nets.layers:
        with torch.no_grad():
            c = _out_channels(nets.source, layer)
        out.append(torch.softmax(torch.randn(c, generator=g) / 5, 0).to(device))
    return out


def _out_channels(model, layer):
    m = model.get_submodule(layer)
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    return (m if isinstance(m, nn.Conv2d) else convs[-1]).out_channels


def synthetic_batch(batch: int, size: int, num_classes: int, device) -> tuple:
    """The one (images, labels) batch every step of a row takes, the same for every row of that shape."""
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return x, y
