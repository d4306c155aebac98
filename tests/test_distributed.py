"""torch.distributed (gloo, CPU): 2 ranks match 1 process with the same global batch."""
import json
import os
import shutil
import socket
import subprocess

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from PIL import Image

import fastdelta
from tiny import TINY_LAYERS, arrays, tiny_net

SETTINGS = dict(method="delta", layers=TINY_LAYERS, iterations=6, batch_size=4, resize=16, crop=12,
                progress=False, attention_head_epochs=1, eval_batch_size=4, seed=0)




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    res = fastdelta.fit(tiny_net(bn=False), arrays(), arrays(2, seed=1), distributed=True, **SETTINGS)
    torch.save({"model": res.model.state_dict(), "raw": res.attention.raw, "test": res.test,
                "history": res.history}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    torch.set_num_threads(1)
    single = fastdelta.fit(tiny_net(bn=False), arrays(), arrays(2, seed=1), **SETTINGS)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k, v in single.model.state_dict().items():
        assert torch.equal(r0["model"][k], r1["model"][k]), k  # DDP keeps the ranks identical
        # same global batches; only the order of float summation differs
        assert torch.allclose(r0["model"][k], v, rtol=1e-5, atol=1e-6), (k, (r0["model"][k] - v).abs().max())
    for a, b, c in zip(single.attention.raw, r0["raw"], r1["raw"]):
        assert torch.equal(b, c)  # all-reduced: identical on every rank
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    assert r0["test"] == r1["test"] == single.test  # sharded evaluation, counts summed
    stats = ("loss", "ce", "reg", "head", "grad_norm", "train_acc")
    for h1, h2, h3 in zip(single.history, r0["history"], r1["history"]):
        assert {k: h2[k] for k in stats} == {k: h3[k] for k in stats}  # one all-reduce: every rank reads the same
        for k in stats:  # the mean of the two half batches' values is the whole batch's
            assert h2[k] == pytest.approx(h1[k], rel=1e-5, abs=1e-9), k


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_cli_only_rank0_writes(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "data" / "train" / c / f"{i}.png")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pt")
    out = subprocess.run(
        ["torchrun", "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "fastdelta", "fit",
         "--data", str(tmp_path / "data"), "--model", "resnet18", "--weights", str(tmp_path / "w.pt"),
         "--method", "delta", "--iterations", "3", "--batch-size", "4", "--resize", "16", "--crop", "16",
         "--checkpoint-every", "2", "--no-progress", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    printed = [l for l in out.stdout.splitlines() if l.startswith("{")]
    assert len(printed) == 1  # rank 0 alone reports and writes
    result = json.load(open(tmp_path / "run" / "result.json"))
    assert result["settings"]["world_size"] == 2 and result["settings"]["batch_size"] == 4
    assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 3
