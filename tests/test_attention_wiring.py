"""Which images Algorithm 1 measures, and that a cached attention is the one a fresh run would use."""
import dataclasses

import numpy as np
import pytest
import torch

import fastdelta
import fastdelta.attention.measure as measure_module
from fastdelta.attention.measure import attention_indices
from fastdelta.settings import FitSettings
from tiny import TINY_LAYERS, arrays, tiny_net


SMALL = dict(iterations=2, batch_size=4, resize=16, crop=16, layers=TINY_LAYERS, progress=False,
             attention_head_epochs=1)


def _class_ordered(n_per_class=8, classes=4):
    x, y = arrays(n_per_class, classes)  # labels 0,0,...,1,1,...: ordered by class, as a sorted folder
    assert (np.diff(y) >= 0).all()
    return x, y


def _labels_measured(monkeypatch, **settings):
    """The labels of the images that reach the channel ablation inside fastdelta.fit."""
    seen = []
    original = measure_module.channel_loss_increase

    def spy(model, layers, batches, *args, **kwargs):
        seen.extend(int(v) for _, y in batches for v in y)
        return original(model, layers, batches, *args, **kwargs)

    monkeypatch.setattr(measure_module, "channel_loss_increase", spy)
    res = fastdelta.fit(tiny_net(num_classes=4), _class_ordered(), None, method="delta", attention_cache=None,
                        **{**SMALL, **settings})
    return seen, res


def test_capped_attention_images_are_drawn_across_the_classes(monkeypatch):
    seen, res = _labels_measured(monkeypatch, attention_max_images=8)
    assert len(seen) == 8
    assert len(set(seen)) >= 3, f"attention measured on classes {sorted(set(seen))} of 4"
    assert res.attention.sample["rule"] == "random"
    assert sum(res.attention.sample["per_class"].values()) == 8
    assert sorted(res.attention.sample["per_class"].values(), reverse=True)[0] < 8


def test_first_sample_keeps_the_old_rule_and_says_so(monkeypatch):
    seen, res = _labels_measured(monkeypatch, attention_max_images=8, attention_sample="first")
    assert seen == [0] * 8  # the first eight images of a class-ordered set: one class
    assert res.attention.sample == {"rule": "first", "images": 8, "per_class": {"0": 8, "1": 0, "2": 0, "3": 0}}
    assert "the first 8 augmented images of the training set in its order" in fastdelta.settings.describe_conventions(res.settings)


def test_attention_sample_is_seeded_the_same_everywhere_and_all_means_all():
    a = attention_indices(100, 10, "random", seed=3)
    assert a == attention_indices(100, 10, "random", seed=3) and len(set(a)) == 10
    assert a != attention_indices(100, 10, "random", seed=4)
    assert attention_indices(30, "all", "random", 0) == list(range(30))
    assert attention_indices(30, 128, "random", 0) == list(range(30))  # cap above the set: all of it


# ------------------------------------------------------------------ the cache and the settings

# an alternative value for every setting; None marks settings a single-process attention run cannot
# take (they need torchrun, a run folder, or are the attention itself)
ALTERNATIVES = {
    "method": "l2_sp_att", "alpha": 0.5, "beta": 0.5, "weight_decay": 1e-2, "lr": 0.05, "momentum": 0.5,
    "nesterov": True, "backbone_lr_mult": 0.1, "batch_size": 6, "iterations": 7, "lr_schedule": "exp",
    "lr_step": 1, "lr_gamma": 0.5, "augmentation": "improved", "resize": 18, "crop": 14, "recipe": "paper",
    "feature_map": "activation", "delta_scale": "paper_eq8", "delta_no_att_scale": "uniform_attention",
    "source_bn": "batch", "feature_scale": "source_energy", "layers": ["conv2"], "attention_temperature": 0.5,
    "attention_normalisation": "softmax", "attention_sample": "first", "attention_max_images": 6,
    "attention_augmented": False, "attention_head_epochs": 3, "attention_head_min_iterations": 5,
    "attention_head_bn": "frozen", "attention_head_batch_size": 8, "attention_impl": "masked_forward",
    "attention_dtype": "bf16", "attention_chunk": 2, "distance_impl": "reference", "precision": "fp32",
    "compile": False, "channels_last": False, "cuda_graphs": None, "step_engine": "reference", "seed": 1,
    "device": "cpu", "num_workers": 0, "eval_batch_size": 3, "eval_every": 1, "eval_images": 2,
    "strict_data": True, "data_backend": "torchvision", "data_prefetch": 3, "progress": True,
    "distributed": None, "run_dir": None, "checkpoint_every": 3, "resume": None, "extra": {"note": 1},
    "attention": None, "attention_cache": None, "overwrite": True, "allow_overlap": True, "allow_low_disk": True,
    "dist_timeout": 30.0, "warmup_iterations": 1, "optimizer": "adamw", "val_fraction": 0.25,
    "val": arrays(2, 3, seed=7),
    # need another setting as well: adamw_weight_decay optimizer="adamw", keep and early stopping a validation
    # set, loggers a run folder
    "adamw_weight_decay": None, "keep": None, "early_stopping_patience": None, "loggers": None,
}


def test_every_setting_has_an_alternative_here():
    missing = [f.name for f in dataclasses.fields(FitSettings) if f.name not in ALTERNATIVES]
    assert not missing, f"add the new settings {missing} to ALTERNATIVES: the cache test must see them"


@pytest.mark.parametrize("name", [k for k, v in ALTERNATIVES.items() if v is not None])
def test_a_cached_attention_is_what_a_fresh_run_computes(name, tmp_path):
    """After a cached run with the defaults, a run that changes one setting must use the weights that
    a run without the cache computes with that setting (a hit is fine only if nothing changed)."""
    data = arrays(4, 3)
    base = dict(SMALL, batch_size=4, attention_head_epochs=2, eval_batch_size=5)
    fastdelta.compute_attention(tiny_net(num_classes=3), data, attention_cache=str(tmp_path), **base)
    changed = {**base, name: ALTERNATIVES[name]}
    cached = fastdelta.compute_attention(tiny_net(num_classes=3), data, attention_cache=str(tmp_path), **changed)
    fresh = fastdelta.compute_attention(tiny_net(num_classes=3), data, attention_cache=None, **changed)
    assert cached.layers == fresh.layers
    for a, b in zip(cached.weights, fresh.weights):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_fit_normalises_a_precomputed_attention_with_its_own_settings():
    data = arrays(4, 3)
    att = fastdelta.compute_attention(tiny_net(num_classes=3), data, attention_cache=None, **SMALL)
    res = fastdelta.fit(tiny_net(num_classes=3), data, None, method="delta", attention=att,
                        attention_temperature=0.5, **SMALL)
    assert res.attention.temperature == 0.5 and res.settings["attention_temperature"] == 0.5
    for used, want in zip(res.attention.weights, att.normalised(0.5, "zscore_softmax").weights):
        assert torch.equal(used, want)


class _PlainTensors(torch.utils.data.Dataset):
    """A torch Dataset with no fingerprint() of its own: the cache must read its images."""

    def __init__(self, x, y):
        self.x, self.targets = torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255, [int(v) for v in y]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


@pytest.mark.parametrize("form", ["arrays", "dataset"])
def test_two_training_sets_that_share_only_the_measured_images_share_no_cache_entry(form, tmp_path):
    """The head trains on the whole set, the ablation sees a sample: a second set of the same size and
    labels with the same sampled images but other images elsewhere gets its own attention."""
    kw = dict(SMALL, attention_max_images=4, seed=2, attention_cache=str(tmp_path))
    x, y = arrays(4, 3)
    sampled = attention_indices(len(x), 4, "random", kw["seed"])
    other = np.random.default_rng(5).integers(0, 256, x.shape, dtype=np.uint8)
    other[sampled] = x[sampled]  # the same measured images, other images elsewhere
    wrap = (lambda a: (a, y)) if form == "arrays" else (lambda a: _PlainTensors(a, y))
    first = fastdelta.compute_attention(tiny_net(num_classes=3), wrap(x), **kw)
    second = fastdelta.compute_attention(tiny_net(num_classes=3), wrap(other), **kw)
    assert "cache_hit" not in second.timings and len(list(tmp_path.iterdir())) == 2
    fresh = fastdelta.compute_attention(tiny_net(num_classes=3), wrap(other), **{**kw, "attention_cache": None})
    assert all(torch.equal(a, b) for a, b in zip(second.raw, fresh.raw))
    assert any(not torch.equal(a, b) for a, b in zip(first.raw, second.raw))  # else the case tests nothing
    again = fastdelta.compute_attention(tiny_net(num_classes=3), wrap(other), **kw)
    assert again.timings.get("cache_hit") is True  # a hit is still a hit
