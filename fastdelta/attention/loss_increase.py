"""The loss increase per channel, the measurement of supervised channel attention (Algorithm 1 of the paper).

With the L2-FE model (source extractor + trained head, eval mode), the raw weight of channel j of
a regularised layer is the loss increase when filter j is removed, summed over the images:

    raw_j = sum_i  L(z(x_i; w*\\j), y_i) - L(z(x_i; w*), y_i)

Removing filter j equals zeroing output channel j of the tapped layer (its bias included), so the
tapped output is masked and no weight is mutated. fastdelta.attention.weights normalises the raw
vectors into the weights W.

Implementations (`channel_loss_increase(..., impl=...)`), each per layer and batch:
- "masked_forward": one full forward per channel (the literal algorithm);
- "prefix" (default, exact): the network is traced with torch.fx and everything that does not
  depend on the tapped layer is computed once per batch (fastdelta.attention.prefix_reuse); then either
  * closed form, when the suffix is channel-separable up to a global average pool (e.g. ResNet's
    last conv -> bn -> +identity -> relu -> avgpool -> fc): pooled channel j with tap channel j
    zeroed equals pooled channel j with the whole tap zeroed, so two suffix passes give every
    channel's pooled features, and only the head runs per channel; or
  * K masked copies of the tap stacked into one suffix pass (K from free memory);
- "first_order" (an estimate, not exact): -sum(a_j * dL/da_j) from one forward + backward.
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..progress import progress_bar
from .prefix_reuse import PrefixReuse


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none").double()


# ---------------------------------------------------------------- literal algorithm (full forward)

@torch.no_grad()
def loss_increase_masked_forward(model: nn.Module, layer: str, batches: Sequence, progress=None) -> torch.Tensor:
    """raw_j by one full forward per channel and batch with channel j of `layer` zeroed."""
    module = model.get_submodule(layer)
    state = {"channel": None}

    def mask(_, __, out):
        if state["channel"] is None:
            return out
        out = out.clone()
        out[:, state["channel"]] = 0
        return out

    handle = module.register_forward_hook(mask)
    try:
        raw = None
        for x, y in batches:
            state["channel"] = None
            base = per_sample_loss(model(x), y)
            channels = _channels_of(model, layer, x)
            raw = torch.zeros(channels, dtype=torch.float64) if raw is None else raw
            for j in range(channels):
                state["channel"] = j
                raw[j] += (per_sample_loss(model(x), y) - base).sum().cpu()
                if progress is not None:
                    progress.update(1)
        return raw
    finally:
        handle.remove()


def _channels_of(model, layer, x) -> int:
    out = {}

    def record(module, inputs, output):  # returns None: the output is left unchanged
        out["c"] = output.shape[1]

    h = model.get_submodule(layer).register_forward_hook(record)
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        h.remove()
    return out["c"]


# ---------------------------------------------------------------- prefix reuse: K masked copies per suffix pass

def masked_copies(tap: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    """(K*B, C, H, W): K copies of the batch's tap, copy k with channel channels[k] zeroed."""
    k = len(channels)
    out = tap.unsqueeze(0).repeat(k, *([1] * tap.dim()))
    out[torch.arange(k), :, torch.as_tensor(channels)] = 0
    out = out.flatten(0, 1)
    return out.contiguous(memory_format=torch.channels_last) if out.is_cuda and out.dim() == 4 else out


def _repeat_batch(value, k: int, batch: int):
    """A prefix value read by the suffix, repeated for K stacked copies (batch-first tensors only)."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
        return value.repeat(k, *([1] * (value.dim() - 1)))
    return value


def auto_chunk(tap: torch.Tensor, channels: int, budget_bytes: Optional[int] = None) -> int:
    """How many masked copies to stack per suffix pass: on a GPU, a quarter of free memory over ~8x
    the tap's bytes per copy (the suffix's activations), at most 256. On the CPU one copy per pass:
    a batch already keeps the cores busy, and stacking is slower there."""
    if budget_bytes is None:
        if not tap.is_cuda:
            return 1
        budget_bytes = torch.cuda.mem_get_info(tap.device)[0] // 4
    per_copy = 8 * tap.numel() * tap.element_size()
    return int(max(1, min(channels, 256, budget_bytes // max(per_copy, 1))))


@torch.no_grad()
def loss_increase_prefix(reuse: PrefixReuse, layer: str, batches: Sequence, progress=None,
                         chunk: Optional[int] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """raw_j with the prefix computed once per batch and K masked copies per suffix pass."""
    raw = None
    for x, y in batches:
        device_type = x.device.type
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            logits, env = reuse.full_run(x)
            base = per_sample_loss(logits, y)
            tap = env[reuse.tap_nodes[layer]]
            c, b = tap.shape[1], tap.shape[0]
            raw = torch.zeros(c, dtype=torch.float64) if raw is None else raw
            k_max = chunk or auto_chunk(tap, c)
            # in reduced precision, the reference loss comes from an unmasked copy in the same pass,
            # so that both sides of each difference see the same kernels and rounding
            with_ref = dtype != torch.float32
            for start in range(0, c, k_max):
                channels = list(range(start, min(c, start + k_max)))
                k = len(channels) + with_ref
                copies = masked_copies(tap, ([-1] if with_ref else []) + channels)
                if with_ref:
                    copies[:b] = tap
                needed = [_repeat_batch(env[n], k, b) for n in reuse.needed[layer]]
                losses = per_sample_loss(reuse.suffix[layer](copies, *needed), y.repeat(k)).view(k, b)
                increase = losses[1:] - losses[:1] if with_ref else losses - base
                raw[channels] += increase.sum(1).cpu()
                if progress is not None:
                    progress.update(k)
        del env
    return raw


# ---------------------------------------------------------------- prefix reuse: closed form (channel-separable suffix)

@torch.no_grad()
def loss_increase_closed_form(reuse: "PrefixReuse", layer: str, batches: Sequence, progress=None,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """raw_j from one pass per batch when the suffix is channel-separable up to global pooling:
    zeroing tap channel j changes only pooled channel j, to its value with the whole tap zeroed."""
    to_pool, head = reuse.separable[layer]
    raw = None
    for x, y in batches:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits, env = reuse.full_run(x)
            base = per_sample_loss(logits, y)
            tap = env[reuse.tap_nodes[layer]]
            needed = [env[n] for n in reuse.needed[layer]]
            pooled = to_pool(tap, *needed)
            pooled_zero = to_pool(torch.zeros_like(tap), *needed)
            b, c = pooled.shape[:2]
            raw = torch.zeros(c, dtype=torch.float64) if raw is None else raw
            step = max(1, min(c, 2 ** 24 // max(1, pooled.numel())))
            for start in range(0, c, step):
                channels = torch.arange(start, min(c, start + step), device=pooled.device)
                k = len(channels)
                masked = pooled.unsqueeze(0).repeat(k, *([1] * pooled.dim()))
                masked[torch.arange(k), :, channels] = pooled_zero[:, channels].movedim(1, 0)
                increase = per_sample_loss(head(masked.flatten(0, 1)), y.repeat(k)).view(k, b) - base
                raw[channels.cpu()] += increase.sum(1).cpu()
            if progress is not None:
                progress.update(c)
        del env
    return raw


# ---------------------------------------------------------------- first-order estimator

def loss_increase_first_order(model: nn.Module, layers: Sequence[str], batches: Sequence) -> List[torch.Tensor]:
    """Taylor estimate of every layer's raw_j from one forward + backward per batch:
    L(a with a_j = 0) - L(a) ~= -sum over images and positions of a_j * dL/da_j."""
    store = {}
    handles = [model.get_submodule(l).register_forward_hook(lambda m, i, o, l=l: store.__setitem__(l, o))
               for l in layers]
    raws = [None] * len(layers)
    try:
        for x, y in batches:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)  # a graph through the taps without parameter grads
                loss = per_sample_loss(model(x), y).sum()
                acts = [store[l] for l in layers]
                grads = torch.autograd.grad(loss, acts)
            for i, (a, g) in enumerate(zip(acts, grads)):
                est = -(a.detach().double() * g.double()).sum(dim=(0, 2, 3)).cpu()
                raws[i] = est if raws[i] is None else raws[i] + est
            store.clear()
    finally:
        for h in handles:
            h.remove()
    return raws


# ---------------------------------------------------------------- driver

def channel_loss_increase(model: nn.Module, layers: Sequence[str], batches: Sequence, impl: str = "prefix",
                          show_progress: bool = True, log: Callable[[str], None] = print,
                          chunk: Optional[int] = None, dtype: torch.dtype = torch.float32) -> tuple:
    """Raw loss-increase vectors for every layer, what ran (per layer), and per-layer seconds.

    impl "prefix" (exact): closed form where the suffix is channel-separable, else K masked copies
    per suffix pass; "masked_forward" (exact, literal): one full forward per channel;
    "first_order": the Taylor estimate (not exact)."""
    model = model.eval()
    if impl == "first_order":
        t0 = time.perf_counter()
        raws = loss_increase_first_order(model, layers, batches)
        seconds = round(time.perf_counter() - t0, 3)
        return raws, {l: "first_order" for l in layers}, {"all layers": seconds}
    reuse = None
    if impl == "prefix":
        try:
            reuse = PrefixReuse(model, layers)
        except Exception as e:  # an untraceable network still gets the exact literal algorithm
            log(f"attention: torch.fx tracing failed ({type(e).__name__}: {str(e)[:120]}); "
                "using one full forward per channel")
    raws, ran, seconds = [], {}, {}
    for layer in layers:
        channels = _channels_of(model, layer, batches[0][0])
        t0 = time.perf_counter()
        with progress_bar(total=channels * len(batches), desc=f"attention {layer}", unit="ch·batch",
                          enabled=show_progress) as bar:
            if reuse is not None and reuse.separable[layer] is not None:
                ran[layer] = "closed_form"
                raws.append(loss_increase_closed_form(reuse, layer, batches, bar, dtype))
            elif reuse is not None:
                ran[layer] = "prefix_batched"
                raws.append(loss_increase_prefix(reuse, layer, batches, bar, chunk, dtype))
            else:
                ran[layer] = "masked_forward"
                raws.append(loss_increase_masked_forward(model, layer, batches, bar))
        seconds[layer] = round(time.perf_counter() - t0, 3)
    return raws, ran, seconds
