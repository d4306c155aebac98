"""fastdelta.fit end to end on tiny networks and generated data: methods, freezing, bad input, saving."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import fastdelta
from fastdelta import ModelError, NonFiniteLossError, SettingsError
from fastdelta.data import DataError
from tiny import TINY_LAYERS, arrays, tiny_net

QUICK = dict(iterations=3, batch_size=4, resize=16, crop=12, progress=False, attention_head_epochs=1,
             eval_batch_size=8)




def write_folder(root, classes=("a", "b", "c"), per_class=3, size=20, mode="RGB"):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)
                img.save(d / f"{i}.png" if mode == "RGBA" else d / f"{i}.jpg")
    return root


@pytest.mark.parametrize("method", fastdelta.METHODS)
def test_every_method_runs_and_decomposes_its_loss(method):
    res = fastdelta.fit(tiny_net(), arrays(), arrays(2, seed=1), method=method, layers=TINY_LAYERS, **QUICK)
    assert len(res.history) == 3 and res.method == method
    for h in res.history:
        assert h["loss"] == pytest.approx(h["ce"] + h["reg"] + h["head"], rel=1e-6)
        assert h["head"] > 0
    regs = [h["reg"] for h in res.history]
    if method == "l2_fe":
        assert regs == [0.0] * 3
    elif method.startswith("l2_sp"):  # w starts at w*: zero, then positive once w moves
        assert regs[0] == 0.0 and regs[-1] > 0
    else:
        assert all(r > 0 for r in regs)
    assert 0 <= res.test_top1 <= 100 and res.test["images"] == 6
    assert (res.attention is not None) == (method in ("delta", "l2_sp_att"))
    assert res.settings["method"] == method and res.model_info["layers"] == TINY_LAYERS


def test_resnet18_default_layers_and_random_weights_warning():
    with pytest.warns(UserWarning, match="NO PRE-TRAINED WEIGHTS"):
        res = fastdelta.fit("resnet18", arrays(size=32), None, method="delta_no_att", weights="random",
                            **{**QUICK, "resize": 32, "crop": 32, "iterations": 2})
    assert res.model_info["layers"] == fastdelta.DEFAULT_LAYERS["resnet18"]
    assert res.model_info["weights"].startswith("random")
    assert res.history[0]["reg"] > 0  # train-mode BN vs eval-mode source: maps differ at step 0


def test_l2_fe_freezes_the_extractor_bit_for_bit():
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = fastdelta.fit(net, arrays(), None, method="l2_fe", layers=TINY_LAYERS, **{**QUICK, "iterations": 5})
    after = res.model.state_dict()
    for k, v in before.items():
        if not k.startswith("fc."):
            assert torch.equal(after[k], v), k  # weights and BN running statistics untouched
    assert not torch.equal(after["fc.weight"], res.model.fc.weight.detach() * 0)
    assert res.model.fc.weight.shape == (3, 16)


def test_same_seed_same_result_and_user_model_untouched():
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    a = fastdelta.fit(net, arrays(), None, method="delta", layers=TINY_LAYERS, **QUICK)
    b = fastdelta.fit(net, arrays(), None, method="delta", layers=TINY_LAYERS, **QUICK)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert all(torch.equal(x, y) for x, y in zip(a.attention.raw, b.attention.raw))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert not net._forward_hooks and not net.conv2._forward_hooks  # taps removed


def test_save_writes_every_file_and_reloads(tmp_path):
    res = fastdelta.fit(tiny_net(), arrays(), arrays(1, seed=1), method="delta", layers=TINY_LAYERS, **QUICK)
    res.save(tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert names == ["channel_attention.json", "history.jsonl", "history.png", "model.pt", "result.json"]
    result = json.load(open(tmp_path / "result.json"))
    assert result["method"] == "delta" and result["test"]["top1"] == res.test_top1
    assert result["settings"]["feature_map"] == "conv" and result["settings"]["recipe"] == "public"
    assert result["settings"]["feature_map_taps"] == {l: l for l in TINY_LAYERS}
    # what decides CPU arithmetic besides the code is recorded (threads, instruction set, CPU model)
    assert {"cpu_threads", "cpu_capability", "cpu_model"} <= set(result["environment"])
    assert result["model"]["layers"] == TINY_LAYERS
    assert len(open(tmp_path / "history.jsonl").readlines()) == 3
    att = json.load(open(tmp_path / "channel_attention.json"))
    assert [len(v) for v in att["public_layout"]] == [8, 16]
    net = tiny_net(num_classes=3)
    net.load_state_dict(torch.load(tmp_path / "model.pt"))
    again = fastdelta.ChannelAttention.load(tmp_path / "channel_attention.json")
    assert all(torch.allclose(x, y) for x, y in zip(again.weights, res.attention.weights))
    # reuse the saved attention: no recomputation, same weights
    res2 = fastdelta.fit(tiny_net(), arrays(), None, method="delta", layers=TINY_LAYERS,
                         attention=str(tmp_path / "channel_attention.json"), **QUICK)
    assert "head_training" not in res2.timings


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    res = fastdelta.fit(tiny_net(), arrays(), None, method="l2", layers=TINY_LAYERS, **QUICK)
    res.save(tmp_path)
    good = (tmp_path / "result.json").read_text()
    import fastdelta.result as result_mod
    monkeypatch.setattr(result_mod.FitResult, "summary", lambda self: {"bad": object.__new__(_Boom)})
    with pytest.raises(RuntimeError):
        res.save(tmp_path)
    assert (tmp_path / "result.json").read_text() == good
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


class _Boom:
    def __str__(self):
        raise RuntimeError("interrupted while writing")


def test_non_finite_loss_stops_and_keeps_last_good_state():
    with pytest.raises(NonFiniteLossError) as info:
        fastdelta.fit(tiny_net(), arrays(), None, method="l2_sp", layers=TINY_LAYERS,
                      **{**QUICK, "iterations": 50, "lr": 1e6})
    e = info.value
    assert e.term in ("ce", "reg", "head", "gradient", "bn_statistics") and f"iteration {e.iteration}" in str(e)
    assert len(e.history) == e.iteration
    partial = e.partial_result
    assert partial.status.startswith("diverged")
    assert all(torch.isfinite(p).all() for p in partial.model.parameters())
    assert all(torch.isfinite(b).all() for b in partial.model.buffers() if b.is_floating_point())
    assert "feature_scale" not in str(e)  # the raw-tap advice is for feature-map methods only


def test_a_diverging_feature_map_method_names_the_options_that_keep_alpha_usable():
    with pytest.raises(NonFiniteLossError) as info:
        fastdelta.fit(tiny_net(), arrays(), None, method="delta_no_att", layers=TINY_LAYERS,
                      **{**QUICK, "iterations": 50, "lr": 1e6})
    assert "feature_map='activation'" in str(info.value) and "feature_scale='source_energy'" in str(info.value)


def test_bad_settings_and_model_errors(tmp_path):
    with pytest.raises(SettingsError, match="alpha"):
        fastdelta.fit(tiny_net(), arrays(), method="delta", alpha=-1.0, layers=TINY_LAYERS, **QUICK)
    with pytest.raises(SettingsError, match="batch_size=64 is larger than the training set \\(12 images\\)"):
        fastdelta.fit(tiny_net(), arrays(), method="l2", layers=TINY_LAYERS, **{**QUICK, "batch_size": 64})
    with pytest.raises(SettingsError, match="method='nope'"):
        fastdelta.fit(tiny_net(), arrays(), method="nope")
    with pytest.raises(SettingsError, match="unknown setting"):
        fastdelta.fit(tiny_net(), arrays(), method="l2", learning_rate=0.1)
    with pytest.raises(ModelError, match="not found in the model; valid conv layers: \\['conv1', 'block.conv_a'"):
        fastdelta.fit(tiny_net(), arrays(), method="delta", layers=["block.nope"], **QUICK)
    with pytest.raises(ModelError, match="neither a torchvision nor a timm"):
        fastdelta.fit("no_such_net", arrays(), method="l2", **QUICK)


def test_weights_file_that_does_not_match_names_the_keys(tmp_path):
    import torchvision
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ModelError, match="do not match the model.*layer1.2"):
        fastdelta.fit("resnet34", arrays(size=32), weights=str(tmp_path / "r18.pt"), method="l2", **QUICK)
    with pytest.raises(ModelError, match="does not exist"):
        fastdelta.fit("resnet18", arrays(size=32), weights=str(tmp_path / "missing.pt"), method="l2", **QUICK)
    # a checkpoint with another head size and a 'module.' prefix loads (the head is replaced anyway)
    sd = torchvision.models.resnet18(num_classes=7).state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "r18_7.pt")
    res = fastdelta.fit("resnet18", arrays(size=32), weights=str(tmp_path / "r18_7.pt"), method="l2",
                        **{**QUICK, "resize": 32, "crop": 32, "iterations": 1, "lr": 1e-9})
    assert torch.allclose(res.model.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"], atol=1e-6)
    assert res.model.fc.out_features == 3 and res.model_info["weights"].startswith("file ")


def test_image_folder_bad_files_are_skipped_and_reported(tmp_path):
    root = write_folder(tmp_path / "data")
    (root / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "train" / "b" / "empty.jpg").write_bytes(b"")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "train" / "c" / "gray.jpg")  # grayscale: converted
    res = fastdelta.fit(tiny_net(), str(root), method="l2", layers=TINY_LAYERS, **QUICK)
    assert res.data["num_skipped"] == 2 and res.data["train"]["num_samples"] == 10
    assert res.test["images"] == 9
    with pytest.raises(DataError, match="broken.jpg"):
        fastdelta.fit(tiny_net(), str(root), method="l2", layers=TINY_LAYERS, strict_data=True, **QUICK)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError):
        fastdelta.fit(tiny_net(), str(tmp_path / "empty"), method="l2", layers=TINY_LAYERS, **QUICK)
    root = write_folder(tmp_path / "d")
    for f in (root / "test" / "c").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="'c'"):
        fastdelta.fit(tiny_net(), str(root), method="l2", layers=TINY_LAYERS, **QUICK)


def test_improved_protocol_reports_center_and_ten_crop_top1():
    res = fastdelta.fit(tiny_net(), arrays(), arrays(3, seed=2), method="l2", layers=TINY_LAYERS,
                        augmentation="improved", **QUICK)
    assert set(res.test) == {"top1", "top1_10crop", "images"} and res.test["images"] == 9


def test_lr_schedules():
    from fastdelta.train.loop import lr_at
    assert [lr_at(i, 0.01, "step", 6000, 0.1) for i in (0, 5999, 6000, 8999)] == [0.01, 0.01, 0.001, 0.001]
    assert lr_at(0, 0.01, "exp", 6000, 0.1) == 0.01
    assert lr_at(6000, 0.01, "exp", 6000, 0.1) == pytest.approx(0.001)
    assert lr_at(3000, 0.01, "exp", 6000, 0.1) == pytest.approx(0.01 * 0.1 ** 0.5)
    res = fastdelta.fit(tiny_net(), arrays(), None, method="l2", layers=TINY_LAYERS, lr_schedule="exp",
                        **{**QUICK, "iterations": 4})
    assert res.settings["lr_step"] == 3 and res.history[3]["lr"] == pytest.approx(0.01 * 0.1 ** (3 / 3))


def test_inception_v3_defaults():
    from fastdelta.networks.models import build_networks
    from fastdelta.settings import make_settings
    nets = build_networks("inception_v3", 4, "random")
    assert nets.layers == ["Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e"] and nets.head_name == "fc"
    s = make_settings("delta").resolved("inception_v3")
    assert (s.lr, s.resize, s.crop) == (0.001, 320, 299)
    from fastdelta.features.hooks import FeatureTaps
    with FeatureTaps(nets.target.eval(), nets.layers) as taps, torch.no_grad():
        logits, feats = taps(torch.randn(1, 3, 80, 80))
    assert logits.shape == (1, 4) and [f.shape[1] for f in feats] == [64, 192, 288, 768]


@pytest.mark.parametrize("method", ["l2_fe", "delta"])
def test_learning_curve_points_do_not_change_training(method):
    """eval_every adds test top-1 to the history (on eval_images images) without changing the weights."""
    quick = {**QUICK, "iterations": 4}
    plain = fastdelta.fit(tiny_net(), arrays(), arrays(seed=1), method=method, layers=TINY_LAYERS, **quick)
    curve = fastdelta.fit(tiny_net(), arrays(), arrays(seed=1), method=method, layers=TINY_LAYERS,
                          eval_every=3, eval_images=5, **quick)
    points = [(h["iteration"], h["test_images"]) for h in curve.history if "test_top1" in h]
    assert points == [(2, 5), (3, 5)]  # every 3 iterations and at the last one
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in curve.history]
    for a, b in zip(plain.model.state_dict().values(), curve.model.state_dict().values()):
        assert torch.equal(a, b)
    assert plain.test_top1 == curve.test_top1


def test_flush_denormals_on_cpu_only_inside_the_context():
    from fastdelta.train.evaluate import flush_denormals
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    with flush_denormals(torch.device("cpu")):
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() != 0.0
