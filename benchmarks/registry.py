"""Which learners and domains the benchmarks run, built through hiermeta's public API.

A learner whose factory is missing or rejects the arguments (an older or a trimmed checkout) is
skipped with a printed note, never faked.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

import hiermeta as hm


class Domain(NamedTuple):
    name: str
    model: hm.HierarchicalModel
    params: object  # initial parameter pytree
    sample: Callable  # key -> TaskBatch of META_BATCH tasks
    inner_lr: float  # a stable inner SGD rate for this domain


def domains(meta_batch: int = 25, only: Optional[list[str]] = None) -> tuple[list[Domain], list[str]]:
    """The benchmark domains present in this checkout, and notes on the missing ones."""
    out, notes = [], []
    from hiermeta.models import linear, sinusoid, swirl

    if not only or "linear" in only:
        paper = linear.paper_domain()
        out.append(Domain("linear", linear.make_model(8), jnp.zeros(8),
                          lambda key: linear.sample_tasks(paper, key, meta_batch)[1], 0.3))
    if not only or "swirl" in only:
        dom = swirl.paper_domain()
        out.append(Domain("swirl", swirl.make_model(dom), jnp.zeros(len(dom.phi)),
                          lambda key: swirl.sample_tasks(dom, key, meta_batch)[1], 0.1))
    if not only or "sinusoid" in only:
        sine = sinusoid.maml_domain()
        params = sinusoid.init_mlp(jax.random.PRNGKey(0))
        out.append(Domain("sinusoid", sinusoid.make_model(params), params,
                          lambda key: sinusoid.sample_tasks(sine, key, meta_batch)[1], sinusoid.MAML_INNER_LR))
    return out, notes


def _get(name):
    return getattr(hm, name, None)


# name -> (hiermeta function name, builder(fn, model, K, lr, outer, **extra))
def _inner(fn, model, K, lr, outer, **kw):
    return fn(model, inner_optimizer=optax.sgd(lr), inner_steps=K, outer_optimizer=outer, **kw)


def _maml(fn, model, K, lr, outer, **kw):
    return fn(model, inner_steps=K, init_lr=lr, outer_optimizer=outer, **kw)


LEARNERS = {
    "Shrinkage": ("shrinkage", _inner, {}),
    "M-Shrinkage": ("m_shrinkage", _inner, {}),
    "MAML": ("maml", _maml, {}),
    "M-MAML": ("m_maml", _maml, {}),
    "FOMAML": ("fomaml", _maml, {}),
    "Reptile": ("reptile", _inner, {}),
    "M-Shrinkage MAP": ("m_shrinkage_map", _inner, {}),
    "iMAML": ("imaml", _inner, {"lam": 1.0}),
    "sigma-iMAML": ("sigma_imaml", _inner, {}),
    "M-sigma-iMAML": ("m_sigma_imaml", _inner, {}),
}

# the memory study: unrolled MAML, MAML with rematerialisation, and the implicit methods
MEMORY_LEARNERS = {
    "MAML (unrolled)": ("maml", _maml, {}),
    "MAML (remat)": ("maml", _maml, {"remat": True}),
    "iMAML": ("imaml", _inner, {"lam": 1.0}),
    "sigma-iMAML": ("sigma_imaml", _inner, {}),
    "M-Shrinkage (Eq. 4)": ("m_shrinkage", _inner, {}),
}


def build(table: dict, name: str, model, K: int, lr: float, outer=None):
    """``(learner, None)`` or ``(None, reason)`` if this checkout lacks it."""
    fn_name, builder, extra = table[name]
    fn = _get(fn_name)
    if fn is None:
        return None, f"hiermeta.{fn_name} is not in this version of hiermeta"
    try:
        return builder(fn, model, K, lr, outer or optax.adam(1e-3), **extra), None
    except TypeError as err:
        return None, f"hiermeta.{fn_name} has another signature: {err}"
