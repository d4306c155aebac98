"""No file fastdelta reads can run code: for every reader, a crafted file whose unpickling would run
`touch MARKER` is refused (or ignored, for caches) with an error that names the file, and MARKER never
appears. Old checkpoints (FDCKPT01, numpy RNG state as an array) still load."""
import hashlib
import io
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

import fastdelta
from fastdelta.apps import cli
from fastdelta.attention.cache import load_cached
from fastdelta.attention.weights import ChannelAttention
from fastdelta.data.manifest import Manifest
from fastdelta.train.checkpoint import (LEGACY_MAGIC, MAGIC, UnsafeCheckpointError, checkpoint_files, load_latest,
                                        read_checkpoint)
from tiny import TINY_LAYERS, arrays, image_folder, tiny_net


class RunsCode:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def crafted_checkpoint(path, marker, magic=MAGIC):
    """A checkpoint with a valid checksum whose payload runs code when unpickled with arbitrary globals."""
    data = torch_bytes({"iteration": 2, "model": RunsCode(marker)})
    path.write_bytes(magic + hashlib.sha256(data).digest() + data)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "reading a crafted file ran its code"


def test_the_crafted_payload_would_run_code_if_unpickled(tmp_path):
    """The guard's premise: the payload below does run code under a plain unpickler."""
    pickle.loads(pickle.dumps(RunsCode(tmp_path / "ran")))
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("magic", [MAGIC, LEGACY_MAGIC])
def test_a_crafted_checkpoint_is_refused_by_the_reader(tmp_path, marker, magic):
    crafted_checkpoint(tmp_path / "ckpt-00000002.pt", marker, magic)
    with pytest.raises(UnsafeCheckpointError, match=r"ckpt-00000002\.pt.*could run code") as e:
        read_checkpoint(tmp_path / "ckpt-00000002.pt")
    assert "weights_only=False" not in str(e.value) and "system" in str(e.value)


def test_a_crafted_newest_checkpoint_stops_the_resume_instead_of_falling_back(tmp_path, marker):
    kw = dict(method="l2", layers=TINY_LAYERS, iterations=4, checkpoint_every=2, batch_size=4, resize=16, crop=12,
              progress=False)
    fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "run"), **kw)
    newest = checkpoint_files(tmp_path / "run" / "checkpoints")[-1]
    crafted_checkpoint(newest, marker)
    with pytest.raises(UnsafeCheckpointError, match=str(newest)):
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "run"), resume=True, **kw)


def test_a_crafted_checkpoint_is_refused_on_the_command_line(tmp_path, marker, capsys):
    data = tmp_path / "data"
    image_folder(data / "train", per_class=3, size=16)
    torch.save(tiny_net(num_classes=2).state_dict(), tmp_path / "w.pt")
    out = tmp_path / "run"
    args = ["fit", "--data", str(data), "--model", "resnet18", "--weights", "random", "--resize", "16", "--crop", "16",
            "--batch-size", "2", "--iterations", "2", "--checkpoint-every", "1", "--method", "l2", "--no-progress"]
    assert cli.main([*args, "--out", str(out)]) == 0
    newest = checkpoint_files(out / "checkpoints")[-1]
    crafted_checkpoint(newest, marker)
    capsys.readouterr()
    assert cli.main(["fit", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(newest) in err and "could run code" in err


def test_a_checkpoint_written_by_an_earlier_version_still_loads(tmp_path):
    """FDCKPT01 files held numpy's RNG state as an ndarray: read with only the array's globals allowed."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    data = torch_bytes({"iteration": 3, "model": {"w": torch.ones(2)}, "rng": state})
    (tmp_path / "ckpt-00000003.pt").write_bytes(LEGACY_MAGIC + hashlib.sha256(data).digest() + data)
    loaded = load_latest(tmp_path)
    assert loaded["iteration"] == 3 and np.array_equal(loaded["rng"]["numpy"][1], state["numpy"][1])


def test_a_weights_file_with_a_pickled_global_is_refused_with_the_reason_first(tmp_path, marker):
    path = tmp_path / "w.pt"
    path.write_bytes(torch_bytes({"conv1.weight": RunsCode(marker)}))
    with pytest.raises(fastdelta.ModelError) as e:
        fastdelta.fit(tiny_net(), arrays(), None, weights=str(path), method="l2", iterations=1, progress=False)
    first_line = str(e.value).splitlines()[0]
    assert str(path) in first_line and "system" in first_line and "could run code" in first_line
    assert "weights_only=False" not in str(e.value)


@pytest.mark.parametrize("content", [b"\x80\x04\x95junk\xff\xfe", "pickle"])
def test_an_attention_file_that_is_not_json_is_named(tmp_path, marker, content):
    path = tmp_path / "att.json"
    path.write_bytes(pickle.dumps(RunsCode(marker)) if content == "pickle" else content)
    with pytest.raises(ValueError, match=f"attention file {path}"):
        ChannelAttention.load(path)


def test_crafted_cache_manifest_and_reused_result_files_are_ignored(tmp_path, marker):
    evil = pickle.dumps(RunsCode(marker))
    (tmp_path / "key.json").write_bytes(evil)
    assert load_cached(tmp_path, "key") is None  # recomputed, never trusted
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(evil)
    assert Manifest(tmp_path, 10_000, manifest).entries == {}
    from fastdelta.apps.compare.runs import Runner
    runner = Runner(tiny_net(), None, {}, tmp_path / "compare", print)
    (tmp_path / "compare" / "runs" / "l2_s0").mkdir(parents=True)
    (tmp_path / "compare" / "runs" / "l2_s0" / "result.json").write_bytes(evil)
    assert runner.finished("l2_s0", "l2", ("a", "b")) is None  # fitted again, never unpickled
