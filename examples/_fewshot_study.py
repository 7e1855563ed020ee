"""Shared pieces of the few-shot studies (``fewshot_factorial.py``, ``fewshot_alphabets.py``):
intervals over seeds, meta-training with meta-validation (early stopping), per-layer summaries.

Not part of the library.  A study repeats each configuration over seeds (a seed fixes the
network's initialisation, the training tasks and the test tasks; the same seed gives every
configuration the same ones, so differences between configurations are paired by seed).
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
from scipy import stats

import hiermeta as hm

__all__ = ["seed_interval", "paired_difference", "train_with_validation", "layer_movement"]


def seed_interval(values) -> tuple[float, float]:
    """Mean over seeds and the half-width of its 95% t-interval (``t_{0.975, n-1} sd / sqrt(n)``; NaN for one seed)."""
    values = np.asarray(values, dtype=float)
    n = values.size
    if n < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def paired_difference(a, b) -> tuple[float, float]:
    """Mean over seeds of ``a - b`` (paired by seed) and its 95% t half-width."""
    return seed_interval(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))


def layer_movement(learner, state, support, num_steps, partition) -> np.ndarray:
    """How far adaptation moves each layer: RMS of ``theta_hat - phi`` over the layer's coordinates and
    the tasks of ``support``, relative to the RMS of phi (per module)."""
    adapted = jax.jit(learner.adapt, static_argnums=2)(state, support, num_steps)
    phi = state.params["phi"]
    sizes = np.asarray(partition.module_sizes, dtype=float)
    moved = np.asarray(partition.module_sum(jax.numpy.mean((adapted.theta - phi) ** 2, axis=0))) / sizes
    return np.sqrt(moved / (np.asarray(partition.module_sum(phi**2)) / sizes))


def train_with_validation(learner, state, sample, num_steps, *, data_key, val_every, validate, description=None):
    """Meta-train ``num_steps`` steps in rounds of ``val_every``; after each round ``validate(state)``
    (meta-validation accuracy) decides which state is kept: the best one (early stopping).

    Returns ``(best_state, history, record)``: ``record`` holds the validation curve, the step of the
    best state and the seconds per meta-step (the first round, which compiles, not counted).
    """
    curve, best, best_acc, histories = [], state, -math.inf, []
    seconds, timed = 0.0, 0
    done = 0
    while done < num_steps:
        n = min(val_every, num_steps - done)
        t0 = time.perf_counter()
        state, history = hm.fit(learner, state, sample, n, data_key=data_key, progress=False,
                                description=description)
        if done > 0:
            seconds, timed = seconds + time.perf_counter() - t0, timed + n
        histories.append(history)
        done += n
        acc = float(validate(state))
        curve.append([int(state.step), acc])
        if acc > best_acc:
            best, best_acc = state, acc
    history = {k: np.concatenate([h[k] for h in histories]) for k in histories[0]}
    record = {"validation": curve, "best_step": int(best.step), "best_val_accuracy": best_acc,
              "seconds_per_meta_step": seconds / timed if timed else None}
    return best, history, record
