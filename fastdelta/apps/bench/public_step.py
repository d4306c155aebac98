"""The public DELTA code's training step, transcribed: what fastdelta's step is timed against."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class PublicStep:
    """The public code's step (github.com/lixingjian/DELTA, train.py), transcribed once per method and
    fixed: eager fp32, forward hooks on both networks, the full source forward, L2 as SGD weight decay,
    L2-SP(ATT) as a Python loop over the parameters, DELTA's distance on raw taps. It knows the six
    methods of the paper by name and refuses any other: a new fastdelta method has no public step, and
    timing it with another method's formula would be a wrong ratio."""

    # per method: (trains only the head, SGD weight decay, L2-SP pull, channel-weighted pull,
    #              feature-map term, attention-weighted feature-map term, beta on the head)
    FORMULAS = {
        "l2_fe":        (True,  True,  False, False, False, False, False),
        "l2":           (False, True,  False, False, False, False, False),
        "l2_sp":        (False, False, True,  False, False, False, True),
        "l2_sp_att":    (False, False, True,  True,  False, False, True),
        "delta_no_att": (False, False, False, False, True,  False, True),
        "delta":        (False, False, False, False, True,  True,  True),
    }

    def __init__(self, nets, method: str, attention, lr=0.01, momentum=0.9, alpha=0.01, beta=0.01, wd=1e-4):
        if method not in self.FORMULAS:
            raise ValueError(f"the public recipe has no step for method {method!r}: it transcribes "
                             f"{', '.join(self.FORMULAS)} only")
        (head_only, weight_decay, self.sp, sp_att, self.fm, fm_att, self.head_beta) = self.FORMULAS[method]
        self.alpha, self.beta = alpha, beta
        self.src, self.tgt = nets.source, nets.target
        self.head = nets.head_name
        self.src.eval()
        if head_only:
            self.tgt.eval().requires_grad_(False)
            self.tgt.get_submodule(self.head).requires_grad_(True)
            params = list(self.tgt.get_submodule(self.head).parameters())
        else:
            self.tgt.train().requires_grad_(True)
            params = list(self.tgt.parameters())
        self.opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd if weight_decay else 0)
        self.src_w = {n: p.detach().clone() for n, p in self.src.named_parameters()}
        self.fs, self.ft = [], []
        for model, store in ((self.src, self.fs), (self.tgt, self.ft)):
            for name in nets.layers:
                model.get_submodule(name).register_forward_hook(lambda m, i, o, store=store: store.append(o))
        # DELTA's attention weights; DELTA w/o ATT: the public fea_map, 0.5 sum ||d||^2
        self.cws = attention if fm_att else None
        self.filter_w = {}
        if sp_att:
            for layer, a in zip(nets.layers, attention):
                self.filter_w[layer + ".weight"] = a.numel() * a

    def _att_reg(self):
        reg = 0.
        for i, (a, b) in enumerate(zip(self.fs, self.ft)):
            bb, c, h, w = a.shape
            d = torch.norm(b.reshape(bb, c, -1) - a.reshape(bb, c, -1).detach(), 2, 2)
            reg = reg + (0.5 * torch.sum(d ** 2) if self.cws is None else
                         0.5 * torch.sum(c * self.cws[i] * d ** 2 / (h * w)))
        return reg

    def step(self, x, y) -> torch.Tensor:
        """One step; returns the (detached) loss, on the device: nothing here waits for the GPU."""
        self.fs.clear()
        self.ft.clear()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.tgt(x), y)
        if self.sp:
            sp = 0.
            for n, p in self.tgt.named_parameters():
                if not n.startswith(self.head + "."):
                    d2 = (p - self.src_w[n]).pow(2)
                    if n in self.filter_w:
                        d2 = d2.reshape(d2.shape[0], -1) * self.filter_w[n][:, None]
                    sp = sp + 0.5 * d2.sum()
            loss = loss + self.alpha * sp
        if self.fm:
            with torch.no_grad():
                self.src(x)
            loss = loss + self.alpha * self._att_reg()
        if self.head_beta:
            loss = loss + self.beta * 0.5 * sum(p.pow(2).sum() for p in self.tgt.get_submodule(self.head).parameters())
        loss.backward()
        self.opt.step()
        self.fs.clear()
        self.ft.clear()
        return loss.detach()
