"""Memory of the implicit hypergradient does not grow with the number of inner steps K.

Measured from XLA's buffer assignment of the compiled executable
(``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``: the temporaries a call
needs at its peak, arguments and outputs excluded), for K = 10, 100, 1000 on the paper's linear
domain (25 tasks, P = 8): the PLL hypergradient by the implicit ``custom_vjp`` and a whole
sigma-iMAML meta-step, against backpropagation through the K unrolled inner steps.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import hiermeta as hm
from hiermeta.implicit import implicit_solution
from hiermeta.learners import shrinkage_params

KS = (10, 100, 1000)


def temp_bytes(fn, *args) -> int:
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


@pytest.fixture(scope="module")
def measured(paper, paper_model, paper_tasks):
    _, batch = paper_tasks
    model = paper_model
    params = shrinkage_params(model, paper.phi, paper.sigma)
    sigma = lambda p: jnp.exp(0.5 * p["log_sigma2"])

    def problem(p):
        return hm.inner.InnerProblem(p["phi"], lambda th, d: model.inner_objective(th, p["phi"], sigma(p), d), optax.sgd(0.3))

    inner_grad = lambda th, p, d: jax.grad(model.inner_objective)(th, p["phi"], sigma(p), d)
    prior_var = lambda p: model.partition.expand(jnp.exp(p["log_sigma2"]))
    out = {"implicit": [], "unrolled": [], "sigma-iMAML step": []}
    for K in KS:
        solve = lambda p, d, K=K: hm.inner.run_inner(problem(p), d, K).theta
        solution = implicit_solution(solve, inner_grad, prior_var)

        def pll(p, b, solve):
            return jnp.mean(jax.vmap(lambda tr, va: model.log_likelihood(solve(p, tr), va))(b.train, b.val))

        out["implicit"].append(temp_bytes(jax.grad(lambda p, b: pll(p, b, solution)), params, batch))
        out["unrolled"].append(temp_bytes(jax.grad(lambda p, b: pll(p, b, solve)), params, batch))
        learner = hm.m_sigma_imaml(model, inner_optimizer=optax.sgd(0.3), inner_steps=K)
        state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
        out["sigma-iMAML step"].append(temp_bytes(learner.step, state, batch))
    return out


@pytest.mark.parametrize("method", ["implicit", "sigma-iMAML step"])
def test_implicit_memory_is_flat_in_k(measured, method):
    sizes = measured[method]
    assert max(sizes) <= 1.02 * min(sizes), dict(zip(KS, sizes))


def test_unrolled_memory_grows_linearly_in_k(measured, paper_tasks):
    sizes = measured["unrolled"]
    T, P = paper_tasks[0].shape
    per_step = [(b - a) / (kb - ka) for (a, ka), (b, kb) in zip(zip(sizes, KS), zip(sizes[1:], KS[1:]))]
    # backprop stores at least theta_k (T x P float64) for every inner step k
    assert all(s >= T * P * 8 for s in per_step), (dict(zip(KS, sizes)), per_step)
    assert sizes[-1] > 10 * measured["implicit"][-1]
