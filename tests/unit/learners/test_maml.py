"""hiermeta/learners/maml.py: MAML, M-MAML, FOMAML and FO-M-MAML against exact answers: finite
differences of the unrolled objective, closed forms on the linear domain, independent first-order
formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
from hiermeta.models import linear

K = 4  # unrolled inner steps in the exact checks
RATES = np.array([0.05, 0.08, 0.11, 0.14, 0.06, 0.09, 0.12, 0.15, 0.04, 0.1])  # distinct per module


def swirl_start(swirl_domain):
    return jnp.asarray(swirl_domain.phi + np.linspace(-1.0, 1.0, 10))


def unrolled(model, batch, first_order=False):
    """Independent: the K SGD steps as a Python loop; returns J(phi, log_lr) and the iterates' gradients."""
    index = jnp.asarray(model.partition.index)

    def per_task(phi, log_lr, train_t, val_t):
        rates = jnp.take(jnp.broadcast_to(jnp.exp(log_lr), (model.partition.num_modules,)), index)
        theta, grads = phi, []
        for _ in range(K):
            g = -jax.grad(model.log_likelihood)(theta, train_t)
            grads.append(g)
            theta = theta - rates * g
        return -model.log_likelihood(theta, val_t), theta, jnp.stack(grads)

    def objective(phi, log_lr):
        loss, theta, grads = jax.vmap(per_task, in_axes=(None, None, 0, 0))(phi, log_lr, batch.train, batch.val)
        return jnp.mean(loss), (theta, grads)

    return jax.jit(objective)


def test_maml_meta_gradient_equals_finite_differences(one_step, swirl_domain, swirl_model, swirl_tasks):
    """M-MAML on the non-linear swirl domain: the step's gradient in (phi, log_lr) is the derivative
    of the unrolled objective (central differences, float64)."""
    _, batch = swirl_tasks
    learner = hm.m_maml(swirl_model, inner_steps=K, init_lr=0.1, outer_optimizer=optax.sgd(1.0))
    state = learner.init(jax.random.PRNGKey(0), swirl_start(swirl_domain), lr=RATES)
    got = one_step(learner, state, batch)
    objective = unrolled(swirl_model, batch)
    x0 = np.concatenate([np.asarray(state.params["phi"]), np.asarray(state.params["log_lr"])])
    f = lambda x: float(objective(jnp.asarray(x[:10]), jnp.asarray(x[10:]))[0])
    h = 1e-5
    fd = np.array([(f(x0 + h * e) - f(x0 - h * e)) / (2 * h) for e in np.eye(20)])
    np.testing.assert_allclose(got["phi"], fd[:10], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got["log_lr"], fd[10:], rtol=1e-6, atol=1e-8)


def test_maml_phi_gradient_on_the_linear_domain_is_the_closed_form(one_step, paper, paper_model, paper_tasks):
    """Linear-Gaussian tasks: theta_K - theta* = (I - a H)^K (phi - theta*), so dJ/dphi = mean_t (I - a H)^K g_t."""
    _, batch = paper_tasks
    lr, phi = 0.2, paper.phi + np.linspace(-0.5, 0.5, 8)
    learner = hm.maml(paper_model, inner_steps=K, init_lr=lr, outer_optimizer=optax.sgd(1.0))
    got = one_step(learner, learner.init(jax.random.PRNGKey(0), jnp.asarray(phi)), batch)
    A, w = paper.design, paper.noise_sd**-2
    H = paper.n_train * A.T @ (w[:, None] * A)  # Hessian of -log p(D^tr | theta), every task
    x_tr, x_val = np.asarray(batch.train.obs), np.asarray(batch.val.obs)
    theta = np.tile(phi, (x_tr.shape[0], 1))
    for _ in range(K):
        grad = theta @ H - (x_tr * w).sum(1) @ A
        theta = theta - lr * grad
    g_val = paper.n_val * theta @ (A.T @ (w[:, None] * A)) - (x_val * w).sum(1) @ A
    jac = np.linalg.matrix_power(np.eye(8) - lr * H, K)
    np.testing.assert_allclose(got["phi"], np.mean(g_val @ jac, axis=0), rtol=1e-10)
    assert np.max(np.abs(got["phi"] - g_val.mean(0))) > 1e-2  # the second-order terms matter here


def test_first_order_maml_is_maml_with_second_order_terms_stopped(one_step, swirl_domain, swirl_model, swirl_tasks):
    """FO-M-MAML: dJ/dphi = mean_t g_val(theta_K) and dJ/dlog_lr_m = -mean_t sum_k a_m g_k,m . g_val,m."""
    _, batch = swirl_tasks
    make = lambda fo: hm.maml(swirl_model, inner_steps=K, init_lr=0.1, outer_optimizer=optax.sgd(1.0),
                              modular=True, first_order=fo)
    fo, so = make(True), make(False)
    assert fo.name == "FO-M-MAML" and so.name == "M-MAML"
    state = fo.init(jax.random.PRNGKey(0), swirl_start(swirl_domain), lr=RATES)
    got = one_step(fo, state, batch)
    _, (theta_K, inner_grads) = unrolled(swirl_model, batch)(state.params["phi"], state.params["log_lr"])
    g_val = -jax.vmap(jax.grad(swirl_model.log_likelihood))(theta_K, batch.val)  # (T, P)
    want_phi = np.mean(g_val, axis=0)
    want_lr = -np.mean(np.sum(RATES * np.asarray(inner_grads) * np.asarray(g_val)[:, None], axis=1), axis=0)
    np.testing.assert_allclose(got["phi"], want_phi, rtol=1e-10)
    np.testing.assert_allclose(got["log_lr"], want_lr, rtol=1e-10)
    second = one_step(so, state, batch)  # ... and MAML differs: the swirl's Hessian terms are not small
    assert np.max(np.abs(second["phi"] - want_phi)) > 1e-2 * np.max(np.abs(want_phi))


@pytest.mark.parametrize("first_order", [False, True])
def test_m_maml_with_equal_rates_is_maml(one_step, first_order, swirl_domain, swirl_model, swirl_tasks):
    _, batch = swirl_tasks
    make = lambda modular: hm.maml(swirl_model, inner_steps=K, init_lr=0.1, outer_optimizer=optax.sgd(1.0),
                                   modular=modular, first_order=first_order)
    shared, modular = make(False), make(True)
    start = swirl_start(swirl_domain)
    s_state, m_state = shared.init(jax.random.PRNGKey(0), start), modular.init(jax.random.PRNGKey(0), start)
    assert s_state.params["log_lr"].shape == (1,) and m_state.params["log_lr"].shape == (10,)
    g_shared, g_mod = one_step(shared, s_state, batch), one_step(modular, m_state, batch)
    np.testing.assert_allclose(g_mod["phi"], g_shared["phi"], rtol=1e-12)
    np.testing.assert_allclose(g_mod["log_lr"].sum(), g_shared["log_lr"][0], rtol=1e-12)  # chain rule
    np.testing.assert_allclose(modular.adapt(m_state, batch.train, 7).theta, shared.adapt(s_state, batch.train, 7).theta,
                               rtol=1e-12)


def test_fixed_rate_maml_keeps_the_rate_and_takes_the_same_phi_step(swirl_domain, swirl_model, swirl_tasks):
    """learn_lr=False (the benchmarks' MAML): the rate stays at init_lr under Adam, phi moves as with
    a learned rate on the first step (same phi gradient: Adam's first step is -lr * sign(g))."""
    _, batch = swirl_tasks
    make = lambda learn: hm.maml(swirl_model, inner_steps=K, init_lr=0.1, outer_optimizer=optax.adam(1e-2),
                                 learn_lr=learn)
    fixed, learned = make(False), make(True)
    start = swirl_start(swirl_domain)
    f_state, l_state = fixed.init(jax.random.PRNGKey(0), start), learned.init(jax.random.PRNGKey(0), start)
    f_new, _ = jax.jit(fixed.step)(f_state, batch)
    l_new, _ = jax.jit(learned.step)(l_state, batch)
    np.testing.assert_allclose(f_new.params["phi"], l_new.params["phi"], rtol=1e-12)
    assert float(jnp.abs(l_new.params["log_lr"] - l_state.params["log_lr"]).max()) > 1e-3  # the learned one moves
    for _ in range(3):
        f_new, _ = jax.jit(fixed.step)(f_new, batch)
    np.testing.assert_array_equal(f_new.params["log_lr"], f_state.params["log_lr"])


def test_rematerialised_inner_loop_gives_the_same_step(one_step, swirl_domain, swirl_model, swirl_tasks):
    _, batch = swirl_tasks
    make = lambda remat: hm.m_maml(swirl_model, inner_steps=K, init_lr=0.1, outer_optimizer=optax.sgd(1.0),
                                   remat=remat)
    state = make(False).init(jax.random.PRNGKey(0), swirl_start(swirl_domain), lr=RATES)
    plain, remat = one_step(make(False), state, batch), one_step(make(True), state, batch)
    for key in ("phi", "log_lr"):
        np.testing.assert_allclose(remat[key], plain[key], rtol=1e-12)
    # ... and the compiled step's scratch memory at K = 1000 (backprop through 1000 steps) drops
    # (measured: 4.3 MB -> 0.33 MB; both grow linearly in K since the carries are stored)
    temp = {}
    for flag in (False, True):
        learner = hm.m_maml(swirl_model, inner_steps=1000, init_lr=0.1, remat=flag)
        compiled = jax.jit(learner.step).lower(learner.init(jax.random.PRNGKey(0), jnp.zeros(10)), batch).compile()
        temp[flag] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[True] < temp[False] / 5, temp


def test_adaptive_inner_optimiser_needs_eps_root():
    """Adam inner steps differentiated where a gradient coordinate is exactly 0 (an unobserved
    parameter): eps_root > 0 keeps the meta-gradient finite; eps_root = 0 gives NaN (step skipped)."""
    domain = linear.LinearDomain(phi=np.zeros(2), sigma=np.ones(2), design=np.array([[1.0, 0.0]]),
                                 noise_sd=np.ones(1), n_train=3, n_val=3)
    model = linear.make_model(2)
    _, batch = linear.sample_tasks(domain, jax.random.PRNGKey(0), 5)
    for eps_root, finite in ((1e-12, True), (0.0, False)):
        learner = hm.maml(model, inner_steps=3, init_lr=0.1, preconditioner=optax.scale_by_adam(eps_root=eps_root))
        state = learner.init(jax.random.PRNGKey(0), jnp.zeros(2))
        new, metrics = jax.jit(learner.step)(state, batch)
        assert bool(metrics.skipped) != finite
        assert bool(hm.learners.base.all_finite(new.params))


def test_bad_configuration_raises(paper_model):
    with pytest.raises(ValueError, match="inner_steps"):
        hm.maml(paper_model, inner_steps=0, init_lr=0.1)
    with pytest.raises(ValueError, match="init_lr"):
        hm.maml(paper_model, inner_steps=3, init_lr=-1.0)
    with pytest.raises(ValueError, match="one inner learning rate"):
        hm.maml(paper_model, inner_steps=3, init_lr=0.1).init(jax.random.PRNGKey(0), jnp.zeros(8), lr=RATES[:8])
    with pytest.raises(ValueError, match="lr must be a scalar or have shape"):
        hm.m_maml(paper_model, inner_steps=3, init_lr=0.1).init(jax.random.PRNGKey(0), jnp.zeros(8), lr=RATES)
    with pytest.raises(ValueError, match="inner_steps"):
        hm.reptile(paper_model, inner_optimizer=optax.sgd(0.1), inner_steps=0)
