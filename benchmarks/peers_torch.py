"""PyTorch peers of the sinusoid MAML step: a plain autograd task loop, ``torch.func`` + ``vmap``,
and ``higher`` (the unrolled-inner-loop library that learn2learn-style code is built like).

Each computes exactly what ``benchmarks/peers_jax.py`` computes (same MLP, same weights, same
loss ``1/2 sum (y - f(x))^2 / noise_sd^2``, K SGD steps, mean query loss over tasks, one Adam
step), in float32 on the CPU.  Import fails cleanly (``available()``) without torch or higher.
"""

from __future__ import annotations

import importlib.util

import numpy as np


def available() -> dict[str, bool]:
    has = lambda name: importlib.util.find_spec(name) is not None
    return {"torch": has("torch"), "higher": has("torch") and has("higher")}


def _torch():
    import torch

    return torch


class Peer:
    """One MAML step implementation over fixed numpy data; ``meta_grad`` for the cross-check."""

    def __init__(self, params_np: dict, inner_steps: int, inner_lr: float, outer_lr: float, noise_sd: float = 1.0):
        torch = _torch()
        self.torch = torch
        self.K, self.lr, self.scale = inner_steps, inner_lr, 0.5 / noise_sd**2
        self.model = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40),
                                         torch.nn.ReLU(), torch.nn.Linear(40, 1))
        with torch.no_grad():
            for i, j in ((0, 0), (1, 2), (2, 4)):  # JAX stores w as (in, out); torch as (out, in)
                self.model[j].weight.copy_(torch.from_numpy(np.asarray(params_np[f"layer_{i}"]["w"]).T.copy()))
                self.model[j].bias.copy_(torch.from_numpy(np.asarray(params_np[f"layer_{i}"]["b"]).copy()))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=outer_lr)

    def tensors(self, xs, ys, xq, yq):
        return tuple(self.torch.from_numpy(np.asarray(a, np.float32)) for a in (xs, ys, xq, yq))

    def loss(self, pred, y):
        return self.scale * ((pred - y) ** 2).sum()

    def accumulate(self, data):  # fills .grad with the meta-gradient
        raise NotImplementedError

    def step(self, data):
        self.opt.zero_grad(set_to_none=True)
        self.accumulate(data)
        self.opt.step()

    def meta_grad(self, data) -> dict:
        """The meta-gradient as numpy, keyed like the JAX params (for the cross-check)."""
        self.opt.zero_grad(set_to_none=True)
        self.accumulate(data)
        out = {}
        for i, j in ((0, 0), (1, 2), (2, 4)):
            out[f"layer_{i}"] = {"w": self.model[j].weight.grad.numpy().T.copy(),
                                 "b": self.model[j].bias.grad.numpy().copy()}
        return out


class TorchLoop(Peer):
    """A Python loop over tasks; ``torch.autograd.grad(create_graph=True)`` for each inner step."""

    name = "torch autograd loop"

    def accumulate(self, data):
        torch, F = self.torch, self.torch.nn.functional
        xs, ys, xq, yq = data
        params = list(self.model.parameters())
        T = xs.shape[0]

        def forward(p, x):
            h = F.relu(F.linear(x, p[0], p[1]))
            h = F.relu(F.linear(h, p[2], p[3]))
            return F.linear(h, p[4], p[5])

        for t in range(T):
            fast = params
            for _ in range(self.K):
                grads = torch.autograd.grad(self.loss(forward(fast, xs[t]), ys[t]), fast, create_graph=True)
                fast = [p - self.lr * g for p, g in zip(fast, grads)]
            (self.loss(forward(fast, xq[t]), yq[t]) / T).backward()


class TorchFunc(Peer):
    """``torch.func``: ``grad`` of the inner loss inside ``vmap`` over tasks, ``grad`` of the mean."""

    name = "torch.func + vmap"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from torch.func import functional_call, grad, vmap

        model, K, lr = self.model, self.K, self.lr

        def loss(p, x, y):
            return self.loss(functional_call(model, p, (x,)), y)

        def task(p, xs, ys, xq, yq):
            for _ in range(K):
                g = grad(loss)(p, xs, ys)
                p = {n: p[n] - lr * g[n] for n in p}
            return loss(p, xq, yq)

        def meta(p, xs, ys, xq, yq):
            return vmap(task, in_dims=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq).mean()

        self.grad_fn = grad(meta)

    def accumulate(self, data):
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        grads = self.grad_fn(params, *data)
        for n, p in self.model.named_parameters():
            p.grad = grads[n]


class Higher(Peer):
    """``higher.innerloop_ctx`` with a differentiable SGD, one task at a time (its documented use)."""

    name = "higher"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inner_opt = self.torch.optim.SGD(self.model.parameters(), lr=self.lr)

    def accumulate(self, data):
        import higher

        xs, ys, xq, yq = data
        T = xs.shape[0]
        for t in range(T):
            with higher.innerloop_ctx(self.model, self.inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(self.K):
                    diffopt.step(self.loss(fmodel(xs[t]), ys[t]))
                (self.loss(fmodel(xq[t]), yq[t]) / T).backward()


def peers() -> list[type]:
    has = available()
    out = []
    if has["torch"]:
        out += [TorchLoop, TorchFunc]
    if has["higher"]:
        out.append(Higher)
    return out
