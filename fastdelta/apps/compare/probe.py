"""The inputs of Figs. 5 and 6 that need trained weights: the probe (layer, test images and weakly active
filters fixed once from the source network) and each analysed run's analysis.json, written beside its
result.json so that a finished run is reused without its weights (compare saves none)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ...data import resolve_data
from ...methods import METHODS
from ...methods.parameter_norm import tapped_conv
from ...networks.models import build_networks, guess_arch
from ...output_files import atomic_write_text
from ...settings import make_settings
from .analysis import (activation_maps, attention_split_distances, filter_distances, min_max,
                       pick_low_activation_filters, pick_map_layer, tap_maps)
from .runs import ANALYSIS_DEVICE, ANALYSIS_FILE, plain
from .splits import train_root
from .evaluation import materialise

class MapProbe:
    """Fig. 6 inputs fixed once from the source network: layer, test images, weakly active filters."""

    def __init__(self, model, weights, base: dict, train, test, n_images: int):
        s = make_settings(**base).resolved(model if isinstance(model, str) else guess_arch(model))
        data = resolve_data(train_root(train), test, augmentation=s.augmentation, resize=s.resize, crop=s.crop,
                            allow_overlap=s.allow_overlap)
        # the "improved" protocol's 10-crop items are 4-D: those stay a transformed dataset
        self.test = materialise(data.test, data.classes) if s.augmentation == "default" else test
        self.test_description = data.description["test"]
        self.overlap = data.description["overlap"]  # train/test overlap, checked here on the user's data
        self.train_fingerprint = data.description["train"]["fingerprint"]["sha256"]  # as each fit records it
        nets = build_networks(model, len(data.classes), weights, s.layers, s.seed)
        self.source, self.head_name, self.layers = nets.source, nets.head_name, nets.layers
        images, labels, seen = [], [], set()
        for i in range(len(data.test)):  # first image of distinct classes
            x, y = data.test[i]
            if y not in seen:
                seen.add(y)
                images.append(x)
                labels.append(data.classes[y])
            if len(images) >= n_images:
                break
        self.images = torch.stack(images) if images else None
        self.classes = labels
        self.layer = pick_map_layer(self.source, self.layers, self.images[0]) if images else None
        self.filters = pick_low_activation_filters(tap_maps(self.source, self.layer, self.images)) if images else []
        self.maps = {"source": activation_maps(self.source, self.layer, self.images, self.filters)} if images else {}
        self.conv_names = [tapped_conv(self.source, l, int(tap_maps(self.source, l, self.images[:1]).shape[1]))
                           for l in self.layers] if images else []

    def maps_of(self, model):
        """The trained network's activation maps of the probe's filters and images (None without images)."""
        return None if self.images is None else activation_maps(model.cpu(), self.layer, self.images, self.filters)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "classes": self.classes, "filters": self.filters, "maps": self.maps,
                "images": [] if self.images is None else [self._display(x) for x in self.images]}

    @staticmethod
    def _display(x: torch.Tensor) -> list:
        """The normalised input as a [0, 1] image for the figure: H x W x 3 (colour) for a 3-channel
        input, scaled as a whole so the colours keep their balance; else H x W (channel mean)."""
        if x.dim() == 3 and x.shape[0] == 3:
            return np.round(min_max(x.float().permute(1, 2, 0)), 3).tolist()
        return np.round(min_max(x.float().mean(0)), 3).tolist()


def write_analysis(folder: Path, method: str, res, probe: "MapProbe", att) -> None:
    """Filter distances to the source, split by attention, and activation maps of the trained network."""
    model = res.model.to(ANALYSIS_DEVICE)
    record = {"device": ANALYSIS_DEVICE,  # where these figures' inputs were computed
              "filter_distances": filter_distances(model, probe.source, probe.head_name),
              "attention_split": (attention_split_distances(model, probe.source, probe.conv_names, att.weights)
                                  if att is not None and probe.conv_names else None),
              "activation_maps": probe.maps_of(model) if METHODS[method].activation_map else None}
    atomic_write_text(folder / ANALYSIS_FILE, json.dumps(plain(record)))


def read_analysis(folder: Path, method: str, probe: "MapProbe", distances: dict, splits: dict) -> None:
    analysis = json.loads((folder / ANALYSIS_FILE).read_text())
    distances[method] = analysis["filter_distances"]
    if analysis["attention_split"] is not None:
        splits[method] = analysis["attention_split"]
    if analysis["activation_maps"] is not None:
        probe.maps[method] = analysis["activation_maps"]
