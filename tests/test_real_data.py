"""The embedded default on real weights and real data (Debian dataset-fashion-mnist)."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastdelta
from fastdelta.data import FASHION_MNIST_DIR, few_shot_subset, load_fashion_mnist, resolve_data
from fastdelta.train.evaluate import evaluate
from fastdelta.train.loop import make_loader
from fastdelta.networks.models import build_networks

needs_fmnist = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR) and not os.environ.get("CI"),
                                  reason="apt-get install dataset-fashion-mnist")


def imagenet_top1(model, image: np.ndarray) -> int:
    x = torch.tensor(image).permute(2, 0, 1).float().div(255)[None]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        return model((x - mean[:, None, None]) / std[:, None, None]).argmax(1).item()


def test_shipped_lite0_weights_predict_imagenet_classes():
    from skimage import data
    nets = build_networks("efficientnet_lite0", 10, "imagenet")
    assert imagenet_top1(nets.source, data.chelsea()) == 285  # Egyptian cat
    assert imagenet_top1(nets.source, data.coffee()) == 967   # espresso
    assert nets.target.classifier.out_features == 10 and nets.head_name == "classifier"


@needs_fmnist
def test_short_real_fit_beats_the_untrained_head():
    x, y = few_shot_subset(*load_fashion_mnist("train"), per_class=10, seed=0)
    xt, yt = load_fashion_mnist("test")
    test = (xt[:1000], yt[:1000])
    settings = dict(weights="imagenet", iterations=40, batch_size=20, resize=37, crop=32, progress=False, seed=0)
    res = fastdelta.fit("efficientnet_lite0", (x, y), test, method="l2", **settings)
    data = resolve_data((x, y), test, resize=37, crop=32)
    untrained = build_networks("efficientnet_lite0", 10, "imagenet", seed=0).target
    before = evaluate(untrained, make_loader(data.test, 250, False, 0, 0), torch.device("cpu"), False)["top1"]
    assert res.test_top1 > before + 15, (before, res.test_top1)
