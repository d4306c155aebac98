"""1 process vs 2 gloo processes on the CPU, same global batch (tests/test_distributed.py's setting):
largest weight difference, largest relative weight difference, attention difference, test counts.

    python benchmarks/ddp_agreement.py
"""
import json
import os
import sys
import tempfile

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import fastdelta  # noqa: E402
from test_distributed import SETTINGS, _worker, free_port  # noqa: E402
from tiny import arrays, tiny_net  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    single = fastdelta.fit(tiny_net(bn=False), arrays(), arrays(2, seed=1), **SETTINGS)
    out = tempfile.mkdtemp()
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    r0 = torch.load(os.path.join(out, "rank0.pt"))
    w1 = single.model.state_dict()
    print(json.dumps({
        "max_abs_weight_diff": max((r0["model"][k] - v).abs().max().item() for k, v in w1.items()),
        "max_rel_weight_diff": max(((r0["model"][k] - v).abs().max() / v.abs().max().clamp_min(1e-12)).item()
                                   for k, v in w1.items()),
        "max_rel_attention_diff": max(((a - b).abs().max() / a.abs().max()).item()
                                      for a, b in zip(single.attention.raw, r0["raw"])),
        "test_1proc": single.test, "test_2proc": r0["test"]}))
