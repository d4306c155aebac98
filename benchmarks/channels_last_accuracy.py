"""How far fp32 channels_last is from float64 on this CPU, against contiguous fp32 (one step's gradients).

    python3 benchmarks/channels_last_accuracy.py [--out FILE.json]

1. ImageNet EfficientNet-Lite0 with a new 10-class head, train mode, batch 32 at 64 px (seeded uniform
   inputs in [-1, 1]): the cross-entropy's gradients in fp32 contiguous and fp32 channels_last against the
   same computation in float64 (relative error over all parameters).
2. One module at a time (BatchNorm2d in train mode, a depthwise and a 1x1 convolution; 96 channels, 16x16,
   inputs with mean 5 and std 3): output, input-gradient and parameter-gradient errors against float64.
Prints and writes JSON with the CPU and torch it ran on.
"""
import argparse
import copy
import json
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def network_errors() -> dict:
    from fastdelta.networks.models import build_architecture, build_networks
    from fastdelta.networks.pretrained import lite0_state_dict_for
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = build_architecture("efficientnet_lite0")
        net.load_state_dict(lite0_state_dict_for(net))
        target = build_networks(net, 10, None, None, 0).target.train()
    torch.manual_seed(0)
    x, y = torch.rand(32, 3, 64, 64) * 2 - 1, torch.randint(0, 10, (32,))

    def grads(dtype, channels_last):
        t, xx = copy.deepcopy(target).to(dtype), x.to(dtype)
        if channels_last:
            t, xx = t.to(memory_format=torch.channels_last), xx.contiguous(memory_format=torch.channels_last)
        torch.manual_seed(1)
        F.cross_entropy(t(xx), y).backward()
        return {n: p.grad.double() for n, p in t.named_parameters()}
    g64 = grads(torch.float64, False)
    out = {}
    for name, cl in (("fp32_contiguous", False), ("fp32_channels_last", True)):
        g = grads(torch.float32, cl)
        diff = torch.stack([(g[k] - g64[k]).norm() for k in g64]).norm()
        out[name] = (diff / torch.stack([g64[k].norm() for k in g64]).norm()).item()
    return out


def module_errors() -> dict:
    torch.manual_seed(0)
    modules = {"batchnorm": nn.BatchNorm2d(96), "depthwise_conv": nn.Conv2d(96, 96, 3, padding=1, groups=96),
               "conv1x1": nn.Conv2d(96, 96, 1)}
    x = torch.randn(32, 96, 16, 16) * 3 + 5
    out = {}
    for name, module in modules.items():
        runs = {}
        for tag, dtype, cl in (("f64", torch.float64, False), ("fp32_contiguous", torch.float32, False),
                               ("fp32_channels_last", torch.float32, True)):
            m = copy.deepcopy(module).to(dtype).train()
            xx = x.to(dtype).clone().requires_grad_(True)
            xin = xx
            if cl:
                m, xin = m.to(memory_format=torch.channels_last), xx.contiguous(memory_format=torch.channels_last)
            o = m(xin)
            o.backward(torch.linspace(-1, 1, o.numel(), dtype=dtype).reshape(o.shape))
            runs[tag] = (o.detach(), xx.grad, [p.grad for p in m.parameters()])
        for tag in ("fp32_contiguous", "fp32_channels_last"):
            o, gx, gp = runs[tag]
            out[f"{name}/{tag}"] = {"output": rel(o, runs["f64"][0]), "grad_input": rel(gx, runs["f64"][1]),
                                    "grad_params": max(rel(a, b) for a, b in zip(gp, runs["f64"][2]))}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    from fastdelta.apps.bench.interleaved import cpu_record
    result = {"machine": {**cpu_record(), "torch": torch.__version__},
              "lite0_step_gradients_vs_float64": network_errors(), "modules_vs_float64": module_errors()}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        open(a.out, "w").write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
