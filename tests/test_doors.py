"""One name, one meaning, through every door: Python settings take the command line's spellings, every bool
option takes `--x`, `--x yes|no` and `--no-x`, the demo names its options as fit does (the older names still
work, out of the help), and the version is written in one place."""
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import fastdelta
from fastdelta.apps.cli import build_parser, given_fields, given_settings, main
from fastdelta.apps.demo import DemoConfig
from fastdelta.settings import SettingsError, make_settings

ROOT = Path(__file__).resolve().parent.parent
FIT = ["fit", "--data", "D", "--out", "O"]


def _help(command, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps the help


@pytest.mark.parametrize("name, text, value", [("compile", "yes", True), ("compile", "no", False),
                                               ("compile", "YES", True), ("channels_last", "yes", True),
                                               ("channels_last", "no", False), ("cuda_graphs", "no", False)])
def test_python_settings_take_the_command_lines_yes_and_no(name, text, value):
    assert getattr(make_settings(**{name: text}), name) is value
    assert given_settings(build_parser().parse_args([*FIT, f"--{name.replace('_', '-')}", text])) == {name: value}


def test_other_strings_are_still_refused():
    with pytest.raises(SettingsError, match="compile='maybe'"):
        make_settings(compile="maybe")
    with pytest.raises(SettingsError, match="channels_last='on'"):
        make_settings(channels_last="on")


@pytest.mark.parametrize("argv, value", [(["--cuda-graphs"], True), (["--cuda-graphs", "yes"], True),
                                         (["--cuda-graphs", "no"], False), (["--no-cuda-graphs"], False),
                                         (["--progress", "no"], False), (["--no-progress"], False),
                                         (["--overwrite", "true"], True)])
def test_bool_options_take_both_spellings(argv, value):
    given = given_settings(build_parser().parse_args([*FIT, *argv]))
    assert list(given.values()) == [value]


def test_a_bool_option_refuses_what_is_not_yes_or_no(capsys):
    for argv in (["--progress", "maybe"], ["--no-progress", "yes"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*FIT, *argv])
    assert "--no-progress takes no value" in capsys.readouterr().err


def test_the_help_shows_each_bool_option_in_both_spellings(capsys):
    assert "--cuda-graphs [yes|no], --no-cuda-graphs" in _help("fit", capsys)


def test_the_demo_names_crop_and_alpha_as_fit_does(capsys):
    args = build_parser().parse_args(["demo", "--crop", "32", "--alpha", "0.001", "--beta", "0.1"])
    cfg = DemoConfig(**given_fields(args, DemoConfig))
    assert (cfg.crop, cfg.alpha, cfg.beta) == (32, 0.001, 0.1)
    assert cfg.values("delta") == {"alpha": 0.001, "beta": 0.1} and cfg.values("l2") == {}
    text = _help("demo", capsys)
    assert "--crop" in text and "--alpha ALPHA" in text
    for old in ("--image-size", "--alpha-feature", "--alpha-sp"):
        assert old not in text


def test_the_demos_older_names_still_work_with_a_warning():
    args = build_parser().parse_args(["demo", "--image-size", "32", "--alpha-feature", "0.002", "--alpha-sp", "0.2"])
    with pytest.warns(FutureWarning, match="image_size is deprecated, use crop"):
        cfg = DemoConfig(**given_fields(args, DemoConfig))
    assert cfg.crop == 32
    # each older alpha keeps its methods: alpha_feature the feature-map ones, alpha_sp the others
    assert cfg.values("delta")["alpha"] == 0.002 and cfg.values("l2_sp")["alpha"] == 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DemoConfig(crop=48).crop == 48  # the new names warn nothing


def test_the_demos_defaults_are_each_methods_own():
    cfg = DemoConfig()
    assert all(cfg.values(m) == {} for m in fastdelta.METHODS)
    with pytest.raises(SettingsError, match="no method of"):
        DemoConfig(methods=["l2"], hyperparameters={"alpha": 0.1}).validate()


def test_compare_help_names_only_options_it_has(capsys):
    text = _help("compare", capsys)
    assert "--resume" not in text and "output folder (default: fastdelta-compare)" in text
    assert "--grid NAME=V1,V2" in text


def test_version_is_written_once_and_shown_by_the_command_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"fastdelta {fastdelta.__version__}"
    setup = (ROOT / "setup.py").read_text()
    assert "version=read_version()" in setup and not re.search(r"version=\"[0-9]", setup)
    listed = [p for p in ROOT.joinpath("fastdelta").rglob("*.py")
              if re.search(r"__version__ = \"[0-9]", p.read_text())]
    assert [p.name for p in listed] == ["_version.py"]
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip().splitlines()[-1] == fastdelta.__version__


def test_license_and_changelog_name_this_version():
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert f"## {fastdelta.__version__}" in (ROOT / "CHANGELOG.md").read_text()
