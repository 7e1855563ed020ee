"""hiermeta/learners/learned_optimizer.py: the coordinate-wise LSTM optimiser against an independent
re-implementation (a Python loop over the K steps with its own LSTM cell): the iterates, the exact
meta-gradient (T = K) and the truncated one (T < K) by central finite differences, float64; with
its output at zero it is M-MAML, step for step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import hiermeta as hm
from hiermeta.learners.learned_optimizer import learned_optimizer, learned_solver, preprocess_gradient

K, T, H = 4, 2, 3
RATES = np.array([0.05, 0.08, 0.11, 0.14, 0.06, 0.09, 0.12, 0.15, 0.04, 0.1])  # per module of the swirl model


def sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def rule_step(params, index, M, theta, theta0, h, c, g, scale=0.1):
    """The update rule written out again: preprocessing, LSTM cell, SGD at the module's rate plus the output."""
    p = 10.0
    big = jnp.abs(g) >= np.exp(-p)
    x1 = jnp.where(big, jnp.log(jnp.where(big, jnp.abs(g), 1.0)) / p, -1.0)
    x2 = jnp.where(big, jnp.sign(g), np.exp(p) * g)
    onehot = (index[:, None] == np.arange(M)[None, :]).astype(float)
    x = jnp.concatenate([x1[:, None], x2[:, None], (theta - theta0)[:, None], onehot], axis=1)
    W, b = params["lstm"]["cell"]["w"], params["lstm"]["cell"]["b"]
    z = jnp.concatenate([x, h], axis=1) @ W + b
    n = h.shape[1]
    i, f, gg, o = sigmoid(z[:, :n]), sigmoid(z[:, n:2 * n]), jnp.tanh(z[:, 2 * n:3 * n]), sigmoid(z[:, 3 * n:])
    c = f * c + i * gg
    h = o * jnp.tanh(c)
    rate = jnp.exp(params["log_lr"])[index]
    out = h @ params["lstm"]["out"]["w"][:, 0] + params["lstm"]["out"]["b"][0]
    return theta - rate * g + scale * out, h, c


def run_segment(model, params, start, theta0, train_t, val_t):
    """T steps of the rule (a Python loop) from ``start = (theta, h, c)``; the query loss at the end, and the end."""
    index, M = np.asarray(model.partition.index), model.partition.num_modules
    loss = lambda th, d: -model.log_likelihood(th, d)
    theta, h, c = start
    for _ in range(T):
        theta, h, c = rule_step(params, index, M, theta, theta0, h, c, jax.grad(loss)(theta, train_t))
    return loss(theta, val_t), (theta, h, c)


def segment_losses(model, params, train_t, val_t):
    """All K steps from phi: each segment's query loss, and each segment's end."""
    phi = params["phi"]
    end = (phi, jnp.zeros((phi.shape[0], H)), jnp.zeros((phi.shape[0], H)))
    losses, ends = [], []
    for _ in range(K // T):
        value, end = run_segment(model, params, end, phi, train_t, val_t)
        losses.append(value)
        ends.append(end)
    return jnp.stack(losses), ends


@pytest.fixture(scope="module")
def setup(swirl_domain, swirl_model, swirl_tasks):
    """A learned optimiser on the swirl domain with every LSTM weight non-zero (the output too)."""
    _, batch = swirl_tasks
    exact = learned_optimizer(swirl_model, inner_steps=K, hidden=H, outer_optimizer=optax.sgd(1.0))
    truncated = learned_optimizer(swirl_model, inner_steps=K, truncation=T, hidden=H, outer_optimizer=optax.sgd(1.0))
    state = exact.init(jax.random.PRNGKey(0), jnp.asarray(swirl_domain.phi + np.linspace(-1.0, 1.0, 10)), lr=RATES)
    out = state.params["lstm"]["out"]
    params = {**state.params, "lstm": {**state.params["lstm"],
                                       "out": {"w": jnp.array([[0.7], [-0.4], [0.9]]), "b": jnp.array([0.05])}}}
    return dict(model=swirl_model, batch=batch, exact=exact, truncated=truncated,
                state=state._replace(params=params, opt_state=optax.sgd(1.0).init(params)), zero_out=out)


def directions(params, count=5, seed=0):
    flat, unravel = ravel_pytree(params)
    rng = np.random.default_rng(seed)
    return [unravel(jnp.asarray(rng.normal(size=flat.shape))) for _ in range(count)]


def dot(a, b):
    return float(sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))))


def axpy(a, x, y):
    return jax.tree_util.tree_map(lambda u, v: a * u + v, x, y)


def test_iterates_equal_an_independent_loop_and_the_inner_solver(setup):
    """The meta-objective's segmented steps, the learner's adapt (gradient_steps with the rule) and the
    Python loop reach the same theta_K."""
    model, batch, state = setup["model"], setup["batch"], setup["state"]
    adapted = jax.jit(setup["exact"].adapt)(state, batch.train)
    for t in range(2):
        train_t, val_t = (jax.tree_util.tree_map(lambda a: a[t], d) for d in (batch.train, batch.val))
        _, ends = segment_losses(model, state.params, train_t, val_t)
        np.testing.assert_allclose(adapted.theta[t], ends[-1][0], rtol=1e-12, atol=1e-12)


def test_exact_meta_gradient_equals_finite_differences(one_step, setup):
    """T = K: the step's gradient (phi, rates, every LSTM weight) is the derivative of the mean query
    loss after K steps of the independent loop, along random directions (central differences)."""
    model, batch, state = setup["model"], setup["batch"], setup["state"]
    got = one_step(setup["exact"], state, batch)

    @jax.jit
    def objective(params):
        per_task = jax.vmap(lambda tr, va: segment_losses(model, params, tr, va)[0][-1])(batch.train, batch.val)
        return jnp.mean(per_task)

    h = 1e-5
    for d in directions(state.params):
        fd = (float(objective(axpy(h, d, state.params))) - float(objective(axpy(-h, d, state.params)))) / (2 * h)
        assert dot(got, d) == pytest.approx(fd, rel=1e-6, abs=1e-8)


def test_truncated_meta_gradient_holds_each_segment_start_fixed(one_step, setup):
    """T < K: the gradient is the mean over segments of each segment's query loss differentiated through
    its own T steps only: finite differences that perturb the parameters in segment j alone, from the
    start the unperturbed run reached."""
    model, batch, state = setup["model"], setup["batch"], setup["state"]
    got = one_step(setup["truncated"], state, batch)
    base = state.params

    def per_task(params, tr, va):
        losses, ends = segment_losses(model, params, tr, va)  # segment 0 as it is, from phi
        total = losses[0]
        for j in range(1, K // T):  # segment j with `params`, from where the unperturbed run stood
            held = jax.tree_util.tree_map(jax.lax.stop_gradient, segment_losses(model, base, tr, va)[1][j - 1])
            total = total + run_segment(model, params, held, base["phi"], tr, va)[0]
        return total / (K // T)

    objective = jax.jit(lambda params: jnp.mean(jax.vmap(lambda tr, va: per_task(params, tr, va))(batch.train, batch.val)))
    h = 1e-5
    for d in directions(state.params, seed=1):
        fd = (float(objective(axpy(h, d, base))) - float(objective(axpy(-h, d, base)))) / (2 * h)
        assert dot(got, d) == pytest.approx(fd, rel=1e-6, abs=1e-8)
    exact = one_step(setup["exact"], state, batch)
    assert not np.allclose(ravel_pytree(got)[0], ravel_pytree(exact)[0], rtol=1e-3)  # truncation changes it


def test_with_its_output_at_zero_it_is_m_maml(one_step, setup):
    """Zero output weights: the rule is SGD at the per-module rates, so theta_K, the phi and rate gradients
    are M-MAML's (and the output weights get a gradient: the LSTM would start to learn)."""
    model, batch, state = setup["model"], setup["batch"], setup["state"]
    params = {**state.params, "lstm": {**state.params["lstm"], "out": setup["zero_out"]}}
    state = state._replace(params=params, opt_state=optax.sgd(1.0).init(params))
    got = one_step(setup["exact"], state, batch)
    maml = hm.m_maml(model, inner_steps=K, init_lr=0.1, outer_optimizer=optax.sgd(1.0))
    m_state = maml.init(jax.random.PRNGKey(0), params["phi"], lr=RATES)
    want = one_step(maml, m_state, batch)
    np.testing.assert_allclose(got["phi"], want["phi"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["log_lr"], want["log_lr"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jax.jit(setup["exact"].adapt)(state, batch.train).theta,
                               jax.jit(maml.adapt)(m_state, batch.train).theta, rtol=1e-12)
    assert np.abs(got["lstm"]["out"]["w"]).max() > 0


def test_learned_rule_is_the_inner_solver_of_other_learners(setup):
    """learned_solver: Reptile and M-Shrinkage adapt with the learned rule; on Reptile's loss (the
    support NLL from phi) its iterates are the learner's own adapt."""
    model, batch, state = setup["model"], setup["batch"], setup["state"]
    solver = learned_solver(setup["exact"], state)
    assert solver.num_steps == K and math.isinf(solver.tol)
    reptile = hm.reptile(model, inner_solver=solver)
    r_state = reptile.init(jax.random.PRNGKey(0), state.params["phi"])
    np.testing.assert_allclose(jax.jit(reptile.adapt)(r_state, batch.train).theta,
                               jax.jit(setup["exact"].adapt)(state, batch.train).theta, rtol=1e-12)
    shrink = hm.m_shrinkage(model, inner_solver=learned_solver(setup["exact"], state, 2 * K))
    s_state = shrink.init(jax.random.PRNGKey(0), state.params["phi"], sigma=np.full(10, 2.0))
    new, info = jax.jit(shrink.step)(s_state, batch)
    assert np.isfinite(float(info.val_log_lik))
    with pytest.raises(ValueError, match="no learned optimiser"):
        learned_solver(reptile, r_state)


def test_gradient_preprocessing():
    g = jnp.array([2.0, -3e-3, 1e-6, -1e-7, 0.0])
    got = np.asarray(preprocess_gradient(g))
    np.testing.assert_allclose(got[:2], [[np.log(2.0) / 10, 1.0], [np.log(3e-3) / 10, -1.0]])
    np.testing.assert_allclose(got[2:], [[-1.0, np.exp(10) * 1e-6], [-1.0, -np.exp(10) * 1e-7], [-1.0, 0.0]])


def test_bad_configuration_raises(paper_model):
    with pytest.raises(ValueError, match="must divide"):
        learned_optimizer(paper_model, inner_steps=5, truncation=2)
    with pytest.raises(ValueError, match="init_lr"):
        learned_optimizer(paper_model, inner_steps=5, init_lr=-1.0)
    with pytest.raises(ValueError, match="inner_steps"):
        learned_optimizer(paper_model, inner_steps=0)
