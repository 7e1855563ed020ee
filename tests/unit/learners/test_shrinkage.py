"""Shrinkage / M-Shrinkage end to end: what they learn, how they fail safely, how they resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import brentq

import hiermeta as hm
from hiermeta.learners import sigma_of
from hiermeta.models import linear

STEPS = 1500


def make(paper_model, modular, inner_lr=0.3, steps=STEPS):
    schedule = optax.cosine_decay_schedule(0.03, steps, alpha=0.1)
    return hm.shrinkage(paper_model, inner_optimizer=optax.sgd(inner_lr), inner_steps=200,
                        outer_optimizer=optax.adam(schedule), modular=modular)


@pytest.fixture(scope="module")
def trained(paper, paper_model):
    sample = lambda key: linear.sample_tasks(paper, key, 25)[1]
    out = {}
    for modular in (False, True):
        learner = make(paper_model, modular)
        state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
        state, history = hm.fit(learner, state, sample, STEPS, data_key=jax.random.PRNGKey(1), progress=False)
        out[modular] = (learner, state, history)
    return out


def test_m_shrinkage_separates_the_two_sigma_groups_and_reaches_the_oracle(trained, paper, paper_model):
    learner, state, history = trained[True]
    sigma = np.asarray(sigma_of(state.params, 8))
    assert np.all((sigma[:4] > 6.5) & (sigma[:4] < 9.5)), sigma  # truth 8
    assert np.all((sigma[4:] > 1.6) & (sigma[4:] < 2.5)), sigma  # truth 2
    assert int(state.num_skipped) == 0 and history["sigma"].shape == (STEPS, 8)
    _, test = linear.sample_tasks(paper, jax.random.PRNGKey(2), 1000)
    curve = hm.evaluate(learner, state, test, 200)
    oracle_theta, _ = linear.posterior(test.train, paper.phi, paper.sigma)
    oracle = np.asarray(jax.vmap(paper_model.generalisation_loss)(oracle_theta, test.val))
    gap = curve.per_task[:, 200] - oracle
    assert abs(gap.mean()) < 0.05, gap.mean()
    assert curve.mean[200] <= curve.mean[100] + 1e-9  # no overfitting with more steps
    assert np.all(np.diff(curve.mean[50:]) <= 1e-9)


def test_shrinkage_learns_one_sigma_at_the_eq4_fixed_point(trained, paper):
    _, state, _ = trained[False]
    assert state.params["log_sigma2"].shape == (1,)
    learned = float(np.exp(0.5 * state.params["log_sigma2"][0]))
    # closed-form fixed point of Eq. 4 for one shared sigma (5.39); the exact PLL optimum is 6.21
    root = np.exp(brentq(lambda ls: linear.expected_eq4_gradient(paper, np.exp(ls)).sum(), 0.0, 4.0))
    assert learned == pytest.approx(root, rel=0.06)


def test_adapt_and_inner_problem_follow_the_interface(trained, paper_tasks):
    learner, state, _ = trained[True]
    _, batch = paper_tasks
    theta = learner.adapt(state, batch.train, 5).theta
    assert theta.shape == (25, 8)
    problem = learner.inner_problem(state.params)
    np.testing.assert_array_equal(problem.init, state.params["phi"])
    # adapt(k) is the k-th iterate of run_inner
    result = hm.inner.run_inner(problem, jax.tree_util.tree_map(lambda a: a[0], batch.train), 5, observe=lambda th: th)
    np.testing.assert_allclose(result.trace[-1], theta[0], rtol=1e-12)
    np.testing.assert_array_equal(result.trace[0], problem.init)


def test_non_finite_hypergradient_leaves_state_unchanged(paper, paper_model, paper_tasks):
    _, batch = paper_tasks
    learner = make(paper_model, True)
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    bad = batch._replace(val=batch.val._replace(obs=batch.val.obs.at[3, 0, 0].set(jnp.nan)))
    new, metrics = jax.jit(learner.step)(state, bad)
    assert bool(metrics.skipped) and int(new.num_skipped) == 1 and int(new.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves((new.params, new.opt_state)),
                    jax.tree_util.tree_leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_diverging_inner_loop_is_skipped_and_training_stops(paper, paper_model, paper_tasks):
    learner = make(paper_model, True, inner_lr=1.0)  # above 2 / lambda_max(H) = 0.47
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8), sigma=2.0)
    _, metrics = jax.jit(learner.step)(state, paper_tasks[1])
    assert bool(metrics.skipped) and int(metrics.num_diverged) > 0
    sample = lambda key: linear.sample_tasks(paper, key, 25)[1]
    with pytest.raises(hm.errors.MetaTrainingError, match="skipped") as info:
        hm.fit(learner, state, sample, 50, data_key=jax.random.PRNGKey(1), chunk_size=5,
               max_consecutive_skips=10, progress=False)
    assert int(info.value.state.num_skipped) == 10
    np.testing.assert_array_equal(info.value.state.params["phi"], state.params["phi"])
    with pytest.raises(ValueError, match="diverged"):
        hm.evaluate(learner, state, paper_tasks[1], 50)


def test_fit_in_two_halves_equals_one_run(paper, paper_model):
    learner = make(paper_model, True)
    sample = lambda key: linear.sample_tasks(paper, key, 25)[1]
    key, state0 = jax.random.PRNGKey(3), learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    whole, _ = hm.fit(learner, state0, sample, 40, data_key=key, chunk_size=20, progress=False)
    half, _ = hm.fit(learner, state0, sample, 20, data_key=key, chunk_size=20, progress=False)
    half, _ = hm.fit(learner, half, sample, 20, data_key=key, chunk_size=20, progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(half)):
        np.testing.assert_array_equal(a, b)


def test_fixed_data_set_sampling(paper, paper_model, paper_tasks):
    _, batch = paper_tasks
    sample = hm.sample_from(batch, 10)
    drawn = sample(jax.random.PRNGKey(0))
    assert drawn.train.obs.shape == (10, 4, 9)
    rows = {tuple(np.asarray(r).ravel()) for r in batch.train.obs}
    assert all(tuple(np.asarray(r).ravel()) in rows for r in drawn.train.obs)
    with pytest.raises(ValueError, match="batch_size"):
        hm.sample_from(batch, 26)
