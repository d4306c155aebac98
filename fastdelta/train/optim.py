"""SGD with the parameter-norm terms applied in the update, without an autograd graph.

Every parameter-norm term of the six methods has the form  0.5 * coef * sum scale * (w - anchor)^2
(anchor w* for L2-SP, 0 for weight decay and the beta head term; scale = c * W_j per filter of a
regularised conv for L2-SP(ATT), 1 elsewhere). Its gradient is  coef * scale * (w - anchor), so
instead of building the term in the autograd graph (a Python loop over every parameter in the forward
and again in the backward), `PullSGD.pull_()` adds it to the gradients with a few foreach ops after
the backward, and returns the term's value for the history (computed from the same differences,
no graph). Then the momentum update is torch's own SGD (foreach, or fused on CUDA).

Same update as the autograd formulation: tests/test_optim.py trains both ways and compares the weights.
`PullAdamW` does the same before torch's AdamW step (optimizer="adamw"); `make_optimizer` picks one.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ..methods.base import Pull


@torch.no_grad()
def apply_pulls(pulls: Sequence[Pull]) -> Dict[str, torch.Tensor]:
    """Add every pull's gradient to `.grad` (in place) and return {term: value} as 0-d fp32 tensors
    (no host sync). A parameter without a gradient gets the pull alone, as autograd would give."""
    values: Dict[str, torch.Tensor] = {}
    for pull in pulls:
        if not pull.params or pull.coef == 0:
            continue
        params = pull.params
        if pull.anchors is None:
            diffs = [p.detach() for p in params]
        else:
            diffs = list(torch._foreach_sub([p.detach() for p in params], pull.anchors))
        scales = pull.scales or [None] * len(params)
        plain = [i for i, s in enumerate(scales) if s is None]
        scaled = [i for i, s in enumerate(scales) if s is not None]
        sq = []
        if plain:
            norms = torch._foreach_norm([diffs[i] for i in plain])
            sq.append(torch.stack(norms).float().pow(2).sum())
        for i in scaled:
            d = diffs[i].float()
            sq.append((d * d * scales[i]).sum())
            diffs[i] = (d * scales[i]).to(diffs[i].dtype)
        value = 0.5 * pull.coef * torch.stack(sq).sum()
        values[pull.term] = values[pull.term] + value if pull.term in values else value
        missing = [i for i, p in enumerate(params) if p.grad is None]
        for i in missing:
            params[i].grad = torch.zeros_like(params[i])
        torch._foreach_add_([p.grad for p in params], diffs, alpha=pull.coef)
    return values


class _Pulls:
    """What PullSGD and PullAdamW add to their torch optimizer: `pull_()` (the parameter-norm gradients and
    values) and the GradScaler of an fp16 run (`scaler`), saved with the optimizer state."""
    pulls: list
    scaler = None

    def pull_(self) -> Dict[str, torch.Tensor]:
        """apply_pulls over this optimizer's pulls."""
        return apply_pulls(self.pulls)

    def state_dict(self):
        state = super().state_dict()
        if self.scaler is not None:
            state = {**state, "grad_scaler": self.scaler.state_dict()}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        scaler = state_dict.pop("grad_scaler", None)
        super().load_state_dict(state_dict)
        if scaler is not None and self.scaler is not None:
            self.scaler.load_state_dict(scaler)


class PullSGD(_Pulls, torch.optim.SGD):
    """torch SGD (momentum, foreach or fused) plus `pull_()` and the fp16 GradScaler (`_Pulls`)."""

    def __init__(self, params, lr: float, momentum: float, pulls: Sequence[Pull] = (),
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, nesterov: bool = False):
        super().__init__(params, lr=lr, momentum=momentum, foreach=foreach, fused=fused, nesterov=nesterov)
        self.pulls = list(pulls)
        self.scaler = None


class PullAdamW(_Pulls, torch.optim.AdamW):
    """torch AdamW (decoupled weight decay: w -= lr x weight_decay x w) plus `pull_()`, as PullSGD: the
    parameter-norm terms of the method (L2-SP's pull to w*, the head's beta term, ...) are gradients added
    after the backward, before the AdamW step, as autograd would give them (so Adam normalises them with
    the loss's gradient, as it would in the reference step's graph)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, pulls: Sequence[Pull] = (),
                 foreach: Optional[bool] = None, fused: Optional[bool] = None):
        super().__init__(params, lr=lr, weight_decay=weight_decay, foreach=foreach, fused=fused)
        self.pulls = list(pulls)
        self.scaler = None


def make_optimizer(kind: str, groups, lr: float, momentum: float = 0.0, nesterov: bool = False,
                   weight_decay: float = 0.0, pulls: Optional[Sequence[Pull]] = None,
                   foreach: Optional[bool] = None, fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """The training step's optimizer: "sgd" (momentum, nesterov) or "adamw" (torch's, `weight_decay` its
    decoupled decay). pulls None: torch's own class (the reference step, whose terms are in autograd);
    else PullSGD / PullAdamW adding those pulls' gradients (`pull_()`)."""
    if kind == "sgd":
        if pulls is None:
            return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, foreach=foreach, fused=fused)
        return PullSGD(groups, lr, momentum, pulls, foreach=foreach, fused=fused, nesterov=nesterov)
    if kind == "adamw":
        if pulls is None:
            return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, foreach=foreach, fused=fused)
        return PullAdamW(groups, lr, weight_decay, pulls, foreach=foreach, fused=fused)
    raise ValueError(f"optimizer={kind!r}: expected 'sgd' or 'adamw'")


def grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Total 2-norm of the gradients (foreach), a 0-d tensor: no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, foreach=True)
