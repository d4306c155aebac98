"""One source of truth: FitSettings' fields (with the methods' declared hyperparameters) make the command
line's options, and a method's hyperparameters reach the settings, the CLI and compare's search."""
import argparse
import dataclasses

import pytest

import fastdelta
from fastdelta.apps.cli import build_parser, given_fields, given_settings, not_for_attention
from fastdelta.apps.demo import DemoConfig
from fastdelta.apps.compare.compare_settings import COMPARE_SETS, CompareSettings
from fastdelta.apps.compare.search import search_grid
from fastdelta.methods import METHODS, Method, Terms, register
from fastdelta.methods.base import squared_norm, unregister
from fastdelta.methods.hyperparameters import BETA, PAPER_GRID, Hyperparameter
from fastdelta.settings import COMPILE_MODES, FitSettings, SettingsError, make_settings
from tiny import TINY_LAYERS, arrays, tiny_net


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _dests(parser: argparse.ArgumentParser) -> set:
    return {a.dest for a in parser._actions}


def test_every_setting_has_a_fit_option_or_says_how_the_command_line_sets_it():
    fit = _subparser("fit")
    options = {o for a in fit._actions for o in a.option_strings}
    missing = []
    for f in dataclasses.fields(FitSettings):
        other = f.metadata.get("cli")
        if other is None:
            if f.name not in _dests(fit):
                missing.append(f.name)
        elif other.split()[0].startswith("--") and other.split()[0] not in options:
            missing.append(f"{f.name} (set by {other}, which fit lacks)")
    assert not missing, f"settings without a fit option: {missing}"
    # the three set another way: by --out, --resume and torchrun
    assert {f.name for f in dataclasses.fields(FitSettings) if f.metadata.get("cli")} == {
        "run_dir", "resume", "distributed"}


def test_attention_and_compare_take_every_setting_they_do_not_set_themselves():
    fields = {f.name for f in dataclasses.fields(FitSettings) if f.metadata.get("cli") is None}
    assert fields - _dests(_subparser("attention")) == set(not_for_attention())
    # val_fraction: compare's own option (its search's holdout) has the fit setting's name
    own = {f.name for f in dataclasses.fields(CompareSettings)}
    assert fields - _dests(_subparser("compare")) == (set(COMPARE_SETS) & fields) - own


def _non_default_text(f: dataclasses.Field):
    """(command-line text, the value it must give) different from the field's default."""
    choices = f.metadata["choices"]
    choices = choices() if callable(choices) else choices
    if choices:
        value = next(c for c in reversed(choices) if c != f.default)
        return value, value
    special = {"layers": ("conv1,conv2", ["conv1", "conv2"]), "attention_max_images": ("all", "all"),
               "attention_augmented": ("no", False), "compile": (COMPILE_MODES[0], COMPILE_MODES[0]),
               "channels_last": ("yes", True), "attention_cache": ("off", None), "extra": ('{"a": 1}', {"a": 1}),
               "attention": ("att.json", "att.json"), "device": ("cpu", "cpu"), "val": ("V", "V"),
               "loggers": ("csv,tensorboard", ["csv", "tensorboard"])}
    if f.name in special:
        return special[f.name]
    kind = str(f.type).removeprefix("Optional[").removesuffix("]")
    return {"int": ("7", 7), "float": ("0.25", 0.25)}[kind]


def test_each_option_sets_its_setting_to_the_typed_value_and_options_not_given_stay_out():
    argv, want = ["fit", "--data", "D", "--out", "O"], {}
    for f in dataclasses.fields(FitSettings):
        if f.metadata.get("cli") is not None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if str(f.type) == "bool":
            argv.append(flag if not f.default else f"--no-{f.name.replace('_', '-')}")
            want[f.name] = not f.default
        else:
            text, value = _non_default_text(f)
            argv += [flag, text]
            want[f.name] = value
    given = given_settings(build_parser().parse_args(argv))
    assert given == want
    assert given_settings(build_parser().parse_args(["fit", "--data", "D", "--out", "O"])) == {}
    # the older spellings still work
    old = build_parser().parse_args(["fit", "--data", "D", "--out", "O", "--temperature", "2", "--workers", "3",
                                     "--no-progress", "--head-epochs", "4"])
    assert given_settings(old) == {"attention_temperature": 2.0, "num_workers": 3, "progress": False,
                                   "attention_head_epochs": 4}


def test_fit_help_shows_every_setting_and_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    for f in dataclasses.fields(FitSettings):
        if f.metadata.get("cli") is None:
            assert "--" + f.name.replace("_", "-") in text, f.name
    assert "(default: 9000)" in text and "(default: the recipe's)" in text
    assert "delta: 1e-4, or 0.01 with delta_scale=paper_*" in text  # alpha: each method's own default


def test_methods_declare_their_hyperparameters_and_settings_take_each_methods_default():
    assert {h.name for h in METHODS["l2"].hyperparameters} == {"weight_decay"}
    assert METHODS["delta"].tuned == ("alpha", "beta") and METHODS["l2"].tuned == ()
    assert make_settings("l2").resolved().alpha is None  # L2 has no alpha
    assert make_settings("l2_sp").resolved().alpha == 0.01
    assert make_settings("delta").resolved().alpha == 1e-4
    with pytest.raises(SettingsError, match="delta_scale='eq8'"):
        make_settings("delta", delta_scale="eq8")
    with pytest.raises(SettingsError, match=r"beta=-1: must be a finite number >= 0"):
        make_settings("delta", beta=-1)
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        METHODS["l2"](tiny_net(), tiny_net(), "fc", TINY_LAYERS, gamma=1.0)


def test_two_methods_must_agree_on_a_shared_hyperparameter():
    class Clash(Method):
        name = "clash_test"
        hyperparameters = (Hyperparameter("beta", "x", "b", type=str, choices=("x", "y")),)
    with pytest.raises(ValueError, match="hyperparameter 'beta'"):
        register(Clash)
    assert "clash_test" not in METHODS


@pytest.fixture
def shrink():
    """A method with a hyperparameter of its own, registered after import, as a user would."""
    @register
    class Shrink(Method):
        """Shrink: reg = gamma/2 ||w_shared||^2 (weight decay under another name), head = beta/2 ||w_head||^2"""
        name, label, color = "shrink_test", "Shrink", "tab:cyan"
        hyperparameters = (Hyperparameter("gamma", 0.001, "weight of the shrinkage", grid=(1e-3, 1e-2)), BETA)

        def terms(self, target_feats=None, source_feats=None) -> Terms:
            return Terms(0.5 * self.gamma * squared_norm([p for _, p in self.shared]),
                         0.5 * self.beta * squared_norm(self.head_params))
    yield Shrink
    unregister(Shrink.name)
    assert "gamma" not in {f.name for f in dataclasses.fields(FitSettings)}


def test_a_new_hyperparameter_is_a_setting_an_option_and_a_search_grid(shrink):
    assert make_settings(shrink.name).resolved().gamma == 0.001
    args = build_parser().parse_args(["fit", "--data", "D", "--out", "O", "--method", shrink.name, "--gamma", "0.5"])
    assert given_settings(args) == {"method": shrink.name, "gamma": 0.5}
    res = fastdelta.fit(tiny_net(), arrays(), None, method=shrink.name, gamma=0.5, layers=TINY_LAYERS,
                        batch_size=4, resize=16, crop=12, iterations=2, progress=False, attention_cache=None)
    assert res.settings["gamma"] == 0.5 and res.history[-1]["reg"] > 0
    cs = CompareSettings(search="grid")
    fixed = {"gamma": 0.001, "beta": 0.01}
    assert search_grid(cs, shrink, fixed) == [{"gamma": g, "beta": b} for b in PAPER_GRID for g in (1e-3, 1e-2)]
    assert search_grid(CompareSettings(search="alpha"), shrink, fixed) == [{"gamma": 1e-3, "beta": 0.01},
                                                                     {"gamma": 1e-2, "beta": 0.01}]


def test_compare_searches_each_methods_declared_grid_unless_given_one():
    fixed = {"alpha": 1e-4, "beta": 0.01}
    assert search_grid(CompareSettings(), METHODS["delta"], fixed) == [{"alpha": a, "beta": 0.01} for a in PAPER_GRID]
    assert search_grid(CompareSettings(alpha_grid=(0.5,)), METHODS["delta"], fixed) == [{"alpha": 0.5, "beta": 0.01}]
    assert search_grid(CompareSettings(), METHODS["l2"], {"weight_decay": 1e-4}) == [{}]


@pytest.mark.parametrize("command, cls", [("compare", CompareSettings), ("demo", DemoConfig)])
def test_compare_and_demo_options_are_made_from_their_settings(command, cls):
    """CompareSettings and DemoConfig make their commands' options as FitSettings makes fit's."""
    parser = _subparser(command)
    assert {f.name for f in dataclasses.fields(cls)} <= _dests(parser)
    argv = [command] + (["--data", "D"] if command == "compare" else [])
    assert given_fields(build_parser().parse_args(argv), cls) == {}
    args = build_parser().parse_args(argv + ["--methods", "l2,delta", "--seed" if command == "demo" else "--seeds",
                                             "2", "--no-progress" if command == "demo" else "--reuse-search"])
    given = given_fields(args, cls)
    assert given["methods"] == ["l2", "delta"] and cls(**given).methods == ["l2", "delta"]
    assert given == ({"methods": ["l2", "delta"], "seed": 2, "progress": False} if command == "demo" else
                     {"methods": ["l2", "delta"], "seeds": 2, "reuse_runs": True})
