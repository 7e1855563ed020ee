"""Sinusoid regression with a small neural network (the MAML protocol, Finn et al. 2017).

A task is a sine wave ``y = A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5]`` and phase
``~ U[0, pi]``; inputs ``x ~ U[-5, 5]``; 10 support and 10 query points.  The regressor is an MLP
1-40-40-1 with ReLU, and the task likelihood is Gaussian with a known noise sd:

    y_{t,n} ~ N(f(x_{t,n}; theta_t), noise_sd^2)

Modules are the layers (weights and biases of one layer share a sigma), so M-Shrinkage learns
which layers adapt to a task and which are shared.

Noise: the MAML protocol's data are noiseless (``observation_noise = 0``, the default) and its
loss is the mean squared error.  hiermeta needs a likelihood, so the model assumes a known noise
sd ``noise_sd = 1``: the task loss is then ``1/2 sum_n (y_n - f(x_n))^2``, ``N / 2`` times the MSE,
and SGD on it with learning rate ``alpha`` equals SGD on the MSE with ``alpha * N / 2``
(MAML's inner rate 0.01 on the MSE is ``0.002`` here for ``N = 10``).  The generalisation loss
hiermeta reports is then half the query MSE.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hiermeta import GaussianData, GaussianLikelihood, HierarchicalModel, ModulePartition, TaskBatch

__all__ = [
    "SinusoidDomain",
    "SinusoidTasks",
    "maml_domain",
    "init_mlp",
    "mlp",
    "likelihood",
    "layer_labels",
    "make_model",
    "sample_tasks",
    "MAML_INNER_LR",
]

HIDDEN = (40, 40)
# MAML's inner learning rate 0.01 on the MSE of 10 points, as a rate on 1/2 sum of squares
MAML_INNER_LR = 0.01 * 2.0 / 10.0


class SinusoidDomain(NamedTuple):
    """The task distribution (defaults: the MAML protocol)."""

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, float(np.pi))
    x_range: tuple[float, float] = (-5.0, 5.0)
    n_train: int = 10
    n_val: int = 10
    noise_sd: float = 1.0  # the likelihood's known noise sd
    observation_noise: float = 0.0  # sd of the noise added to the generated data


class SinusoidTasks(NamedTuple):
    """The true parameters of each sampled task."""

    amplitude: jax.Array  # (T,)
    phase: jax.Array  # (T,)


def maml_domain(**overrides) -> SinusoidDomain:
    """The MAML protocol's sinusoid domain (any field may be overridden)."""
    domain = SinusoidDomain(**overrides)
    if not (0 < domain.amplitude[0] <= domain.amplitude[1]):
        raise ValueError(f"amplitude range must satisfy 0 < low <= high, got {domain.amplitude}")
    if domain.x_range[0] >= domain.x_range[1] or domain.phase[0] > domain.phase[1]:
        raise ValueError(f"empty x or phase range: {domain.x_range}, {domain.phase}")
    if domain.n_train < 1 or domain.n_val < 1:
        raise ValueError(f"n_train and n_val must be >= 1, got {domain.n_train}, {domain.n_val}")
    if not domain.noise_sd > 0 or domain.observation_noise < 0:
        raise ValueError("noise_sd must be > 0 and observation_noise >= 0")
    return domain


def init_mlp(key, hidden=HIDDEN, dtype=None) -> dict:
    """An MLP 1-hidden-...-1 as ``{"layer_i": {"w": (fan_in, fan_out), "b": (fan_out,)}}``.

    PyTorch's ``nn.Linear`` default (the peers' initialisation): weights and biases
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
    """
    dtype = dtype or jnp.zeros(()).dtype
    sizes = (1, *hidden, 1)
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, k_w, k_b = jax.random.split(key, 3)
        bound = 1.0 / np.sqrt(fan_in)
        params[f"layer_{i}"] = {
            "w": jax.random.uniform(k_w, (fan_in, fan_out), dtype, -bound, bound),
            "b": jax.random.uniform(k_b, (fan_out,), dtype, -bound, bound),
        }
    return params


def mlp(params, x) -> jax.Array:
    """The regressor for one task: ``x`` ``(N, 1)`` -> ``(N, 1)``; ReLU between layers."""
    layers = [params[f"layer_{i}"] for i in range(len(params))]
    h = x
    for layer in layers[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h @ layers[-1]["w"] + layers[-1]["b"]


likelihood = GaussianLikelihood(mlp)


def layer_labels(params) -> dict:
    """One module per layer: its weights and bias share the label ``layer_i``."""
    return {name: jax.tree_util.tree_map(lambda _: name, layer) for name, layer in params.items()}


def make_model(params=None, per_layer: bool = True, **priors) -> HierarchicalModel:
    """Eq. 1 over the MLP's parameters; modules are the layers (or every leaf if not ``per_layer``)."""
    params = init_mlp(jax.random.PRNGKey(0)) if params is None else params
    if per_layer:
        partition = ModulePartition.from_labels(params, layer_labels(params))
    else:
        partition = ModulePartition.per_leaf(params)
    return HierarchicalModel(likelihood, partition, **priors)


def _split(domain: SinusoidDomain, key, amplitude, phase, n) -> GaussianData:
    T = amplitude.shape[0]
    dtype = amplitude.dtype
    k_x, k_noise = jax.random.split(key)
    x = jax.random.uniform(k_x, (T, n, 1), dtype, *domain.x_range)
    y = amplitude[:, None, None] * jnp.sin(x - phase[:, None, None])
    if domain.observation_noise > 0:
        y = y + domain.observation_noise * jax.random.normal(k_noise, y.shape, dtype)
    noise = jnp.full((T, n, 1), domain.noise_sd, dtype)
    return GaussianData(obs=y, noise_sd=noise, mask=jnp.ones((T, n), bool), inputs=x)


def sample_tasks(domain: SinusoidDomain, key, num_tasks: int) -> tuple[SinusoidTasks, TaskBatch]:
    """Draw ``num_tasks`` sine waves and their support/query points (jittable, ``num_tasks`` static).

    Returns the true amplitudes and phases, and the :class:`~hiermeta.TaskBatch` with inputs
    ``x`` ``(T, N, 1)`` and observations ``y`` ``(T, N, 1)``.
    """
    k_amp, k_phase, k_train, k_val = jax.random.split(key, 4)
    dtype = jnp.zeros(()).dtype
    amplitude = jax.random.uniform(k_amp, (num_tasks,), dtype, *domain.amplitude)
    phase = jax.random.uniform(k_phase, (num_tasks,), dtype, *domain.phase)
    batch = TaskBatch(
        train=_split(domain, k_train, amplitude, phase, domain.n_train),
        val=_split(domain, k_val, amplitude, phase, domain.n_val),
    )
    return SinusoidTasks(amplitude, phase), batch
