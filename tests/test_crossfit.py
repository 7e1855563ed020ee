"""Cross-fitting (hiermeta.crossfit): random re-splits, the sampler with hm.fit, the spread of the PLL
sigma over seeds with and without it, and the run-off check."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
from hiermeta.crossfit import check_sigma, crossfit_sampler, resplit, sigma_spread
from hiermeta.learners import sigma_of


def _groups(rng, T, sizes, sigma, noise=1.0, learned=False):
    """A random intercept per group; ``sizes`` rows per group (padded), known or learned noise."""
    N = int(max(sizes))
    theta = 2.0 + sigma * rng.normal(size=T)
    mask = np.arange(N)[None, :] < np.asarray(sizes)[:, None]
    y = theta[:, None] + noise * rng.normal(size=(T, N))
    lik = hm.linear_gaussian(noise="learned" if learned else "known")
    scale = None if learned else np.full((T, N), noise)
    data = lik.make_data(np.where(mask, y, 0.0), mask, np.ones((T, N, 1)), noise_scale=scale)
    return hm.HierarchicalModel(lik, hm.ModulePartition.named(("Intercept",))), data


def test_resplit_holds_out_the_fraction_of_each_groups_rows_at_random():
    rng = np.random.default_rng(0)
    sizes = [10, 7, 2, 5]
    _, data = _groups(rng, 4, sizes, 1.0)
    batch = resplit(data, jax.random.PRNGKey(1), 0.3)
    train, val = np.asarray(batch.train.mask), np.asarray(batch.val.mask)
    np.testing.assert_array_equal(train | val, np.asarray(data.mask))
    assert not np.any(train & val)
    np.testing.assert_array_equal(val.sum(1), [3, 2, 1, 2])  # round(0.3 n), at least 1, at most n - 1
    np.testing.assert_array_equal(batch.train.obs, data.obs)  # only the masks change
    again = resplit(data, jax.random.PRNGKey(1), 0.3)
    np.testing.assert_array_equal(again.val.mask, val)
    other = [np.asarray(resplit(data, jax.random.PRNGKey(k), 0.3).val.mask) for k in range(2, 30)]
    assert any(not np.array_equal(o, val) for o in other)
    # every row of the 10-row group is held out about 3/10 of the time
    freq = np.mean([o[0] for o in other], axis=0)
    assert freq.min() > 0.05 and freq.max() < 0.7


def test_crossfit_sampler_repeats_each_task_with_independent_splits_and_runs_under_fit():
    rng = np.random.default_rng(1)
    model, data = _groups(rng, 6, [8] * 6, 1.0, learned=True)
    sample = crossfit_sampler(data, query_fraction=0.25, num_splits=3, batch_size=4)
    batch = sample(jax.random.PRNGKey(0))
    assert batch.train.obs.shape[0] == 12
    obs = np.asarray(batch.train.obs)[:, :, 0]
    for i in range(0, 12, 3):  # three copies of one task, split three ways
        np.testing.assert_array_equal(obs[i], obs[i + 2])
    assert len({np.asarray(batch.val.mask)[i].tobytes() for i in range(12)}) > 4
    learner = hm.m_shrinkage(model, outer_optimizer=optax.adam(0.05))
    state = learner.init(jax.random.PRNGKey(0), data=data)
    state, history = hm.fit(learner, state, sample, 30, data_key=jax.random.PRNGKey(2), progress=False)
    assert history["sigma"].shape == (30, 1) and history["noise_sd"].shape == (30,)
    spread = sigma_spread(history, last=10)
    assert spread.last == 10 and spread.ratio[0] >= 1.0 and spread.low[0] <= spread.median[0] <= spread.high[0]


def test_crossfit_rejects_bad_input():
    rng = np.random.default_rng(2)
    _, data = _groups(rng, 3, [5, 1, 4], 1.0)
    with pytest.raises(ValueError, match=r"task\(s\) \[1\] have fewer than 2 rows"):
        crossfit_sampler(data)
    _, data = _groups(rng, 3, [5, 5, 4], 1.0)
    with pytest.raises(ValueError, match="query_fraction"):
        crossfit_sampler(data, query_fraction=1.0)
    with pytest.raises(ValueError, match="num_splits"):
        crossfit_sampler(data, num_splits=0)
    with pytest.raises(ValueError, match="batch_size"):
        crossfit_sampler(data, batch_size=4)
    with pytest.raises(ValueError, match="no 'sigma'"):
        sigma_spread({"lr": np.ones((3, 1))})


def _train_over_seeds(learner, data, seeds, steps, crossfit):
    """The meta-steps hm.fit runs, vmapped over seeds: a fixed random split per seed, or cross-fitting."""
    state0 = learner.init(jax.random.PRNGKey(0), data=data)
    sampler = crossfit_sampler(data, query_fraction=0.25, num_splits=4)

    def run(seed):
        split_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
        fixed = resplit(data, split_key, 0.25)

        def body(state, _):
            batch = sampler(jax.random.fold_in(data_key, state.step)) if crossfit else fixed
            state, _ = learner.step(state, batch)
            return state, sigma_of(state.params, 1)[0]

        return jax.lax.scan(body, state0, None, length=steps)[1]

    return np.asarray(jax.jit(jax.vmap(run))(jnp.arange(seeds)))


def test_crossfitting_shrinks_the_spread_of_the_pll_sigma_over_seeds():
    """A small version of examples/pll_spread.py: 12 groups of 8 rows; M-Shrinkage with Eq. 4 on one
    random split per seed vs cross-fitting.  Over 6 seeds the one-split estimates of sigma spread by
    a large factor; cross-fitting's (the geometric mean of its last 100 steps) by little."""
    rng = np.random.default_rng(5)
    model, data = _groups(rng, 12, [8] * 12, 1.0)
    learner = hm.m_shrinkage(model, outer_optimizer=optax.adam(0.05))
    one = _train_over_seeds(learner, data, 6, 300, crossfit=False)[:, -1]
    cross = np.exp(np.mean(np.log(_train_over_seeds(learner, data, 6, 300, crossfit=True)[:, -100:]), axis=1))
    ratio = lambda v: v.max() / v.min()
    assert ratio(one) > 3.0 * ratio(cross), (one, cross)
    assert ratio(cross) < 1.5
    exact = hm.type2_ml(model, data)  # and it sits within a factor 2 of type-II ML on the same rows
    assert 0.5 < np.median(cross) / exact.sigma[0] < 2.0


def test_run_off_warning_fires_on_a_run_off_sigma_and_not_on_a_sane_one():
    rng = np.random.default_rng(3)
    model, data = _groups(rng, 8, [6] * 8, 1.0, learned=True)
    learner = hm.m_shrinkage(model)
    key = jax.random.PRNGKey(0)
    scale = hm.crossfit.check_sigma(learner, learner.init(key, data=data), data=data, warn=False).scale
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a sane sigma
        sane = check_sigma(learner, learner.init(key, data=data, sigma=2.0 * scale[0]), data=data)
    assert not sane.ran_off.any()
    with pytest.warns(hm.errors.SigmaRunOffWarning, match=r"Intercept: sigma .* > 100 x the data's scale"):
        big = check_sigma(learner, learner.init(key, data=data, sigma=200.0 * scale[0]), data=data)
    assert big.too_large.all() and big.ran_off.all() and not big.at_floor.any()
    with pytest.warns(hm.errors.SigmaRunOffWarning, match="float floor"):
        small = check_sigma(learner, learner.init(key, data=data, sigma=1e-9 * scale[0]), data=data)
    assert small.at_floor.all()
    with pytest.raises(ValueError, match="scale="):
        check_sigma(learner, learner.init(key, data=data))


def test_run_off_warning_fires_on_a_trained_sigma_that_runs_off():
    """A split on which no pooling predicts the query perfectly (each group's query rows equal its
    support mean): the one-split PLL then rises with sigma without bound (Eq. 4's gradient
    (theta_hat - phi) . g is positive at every sigma) while the learned noise sd falls, so
    M-Shrinkage's sigma runs off (to ~1e10 in 200 steps, as sleepstudy's did in issue 11), and the
    check says so, with the spread of its last steps."""
    rng = np.random.default_rng(4)
    T, n = 10, 6
    model, data = _groups(rng, T, [n + 2] * T, 1.0, learned=True)
    obs = np.asarray(data.obs).copy()
    obs[:, n:, 0] = obs[:, :n, 0].mean(axis=1, keepdims=True)
    data = data._replace(obs=jnp.asarray(obs))
    query = np.arange(n + 2) >= n
    batch = hm.TaskBatch(data._replace(mask=jnp.asarray(np.broadcast_to(~query, (T, n + 2)))),
                         data._replace(mask=jnp.asarray(np.broadcast_to(query, (T, n + 2)))))
    learner = hm.m_shrinkage(model, outer_optimizer=optax.adam(0.2))
    state = learner.init(jax.random.PRNGKey(0), data=batch.train)
    state, history = hm.fit(learner, state, hm.sample_from(batch, T), 200, data_key=jax.random.PRNGKey(2),
                            progress=False)
    assert np.all(np.diff(np.log(history["sigma"][:, 0])) > 0)  # it only ever grew
    with pytest.warns(hm.errors.SigmaRunOffWarning, match="> 100 x the data's scale"):
        result = check_sigma(learner, state, data=data, history=history, last=50)
    assert result.too_large.all() and result.spread.ratio[0] > 10.0


def test_checkpoint_and_resume_with_extra_sites_and_crossfitting(tmp_path):
    """The meta-parameters with params["extra"] (noise_sd) go through a checkpoint; a run resumed from
    one, with the cross-fitting sampler, is bit-identical to an uninterrupted one."""
    rng = np.random.default_rng(1)
    model, data = _groups(rng, 6, [8] * 6, 1.0, learned=True)
    sample = crossfit_sampler(data, query_fraction=0.25, num_splits=2)
    learner = hm.m_shrinkage(model, outer_optimizer=optax.adam(0.05))
    state = learner.init(jax.random.PRNGKey(0), data=data)
    assert set(state.params) == {"phi", "log_sigma2", "extra"} and set(state.params["extra"]) == {"noise_sd"}
    key, path = jax.random.PRNGKey(2), tmp_path / "run.npz"
    full, h_full = hm.fit(learner, state, sample, 12, data_key=key, progress=False, chunk_size=4)
    hm.fit(learner, state, sample, 8, data_key=key, progress=False, chunk_size=4, checkpoint=path)
    resumed, h_res = hm.fit(learner, state, sample, 12, data_key=key, progress=False, chunk_size=4, checkpoint=path,
                            resume=True)
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(h_full["noise_sd"], h_res["noise_sd"])
