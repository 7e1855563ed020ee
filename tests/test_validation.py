"""Bad input raises a ValueError naming the problem, before anything is compiled."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
from hiermeta.tasks import check_task_batch
from hiermeta.models import linear

OBS = np.zeros((3, 2, 9))
DESIGN = linear.paper_domain().design
NOISE = linear.paper_domain().noise_sd


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(obs=np.zeros((3, 9))), "shape \\(tasks, observations, dims\\)"),
        (dict(obs=np.where(np.arange(54).reshape(3, 2, 9) == 7, np.nan, 0.0)), "NaN or infinite"),
        (dict(obs=np.full((3, 2, 9), np.inf)), "NaN or infinite"),
        (dict(noise_sd=np.where(np.arange(9) == 2, 0.0, 1.0)), "noise_sd must be finite and > 0"),
        (dict(noise_sd=-NOISE), "noise_sd must be finite and > 0"),
        (dict(noise_sd=np.ones(4)), "does not broadcast"),
        (dict(obs=np.zeros((0, 2, 9))), "empty"),
        (dict(obs=np.zeros((3, 0, 9))), "empty"),
        (dict(mask=np.array([[1, 1], [0, 0], [1, 0]], bool)), "task\\(s\\) \\[1\\] hold no observations"),
        (dict(mask=np.ones((3, 3), bool)), "mask must have shape"),
        (dict(design=np.ones((8, 8))), "design must end in \\(D, P\\)"),
        (dict(design=np.full((9, 8), np.nan)), "design holds NaN"),
        (dict(design=np.ones((4, 2, 9, 8))), "does not broadcast"),
    ],
)
def test_malformed_data(kwargs, match):
    args = dict(obs=OBS, design=DESIGN, noise_sd=NOISE) | kwargs
    with pytest.raises(ValueError, match=match):
        linear.make_data(**args)


def test_nan_in_padding_is_fine_and_zeroed():
    obs = OBS.copy()
    obs[1, 1] = np.nan
    data = linear.make_data(obs, DESIGN, NOISE, mask=np.array([[1, 1], [1, 0], [1, 1]], bool))
    assert np.all(np.isfinite(np.asarray(data.obs)))


def test_splits_must_hold_the_same_tasks(paper_tasks):
    _, batch = paper_tasks
    short = batch._replace(val=jax.tree_util.tree_map(lambda a: a[:5], batch.val))
    with pytest.raises(ValueError, match="25 tasks but val split has 5"):
        check_task_batch(linear.likelihood, short)
    with pytest.raises(ValueError, match="TaskBatch"):
        check_task_batch(linear.likelihood, (batch.train, batch.val))


@pytest.fixture(scope="module")
def learner(paper_model):
    return hm.m_shrinkage(paper_model, inner_optimizer=optax.sgd(0.3), inner_steps=10)


def test_evaluate_and_fit_check_their_data_first(learner, paper, paper_tasks):
    _, batch = paper_tasks
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    bad = batch._replace(train=batch.train._replace(obs=batch.train.obs.at[0, 0, 0].set(jnp.inf)))
    with pytest.raises(ValueError, match="train split: obs holds 1 NaN or infinite"):
        hm.evaluate(learner, state, bad, 10)
    with pytest.raises(ValueError, match="val split: noise_sd"):
        hm.fit(learner, state, lambda key: batch._replace(val=batch.val._replace(noise_sd=0 * batch.val.noise_sd)),
               5, data_key=jax.random.PRNGKey(0), progress=False)
    with pytest.raises(ValueError, match="num_steps must be >= 0"):
        hm.evaluate(learner, state, batch, -1)
    nan_state = state._replace(params={**state.params, "phi": state.params["phi"].at[0].set(jnp.nan)})
    with pytest.raises(ValueError, match="initial meta-parameters hold NaN"):
        hm.fit(learner, nan_state, lambda key: batch, 5, data_key=jax.random.PRNGKey(0), progress=False)


@pytest.mark.parametrize("sigma, match", [(0.0, "> 0"), (-1.0, "> 0"), (np.nan, "> 0"), (np.ones(3), "shape \\(8,\\)")])
def test_non_positive_or_misshaped_sigma(learner, sigma, match):
    with pytest.raises(ValueError, match=match):
        learner.init(jax.random.PRNGKey(0), jnp.zeros(8), sigma=sigma)


def test_bad_learner_configuration(paper_model):
    with pytest.raises(ValueError, match="init_sigma"):
        hm.shrinkage(paper_model, inner_optimizer=optax.sgd(0.1), inner_steps=5, init_sigma=0.0)
    with pytest.raises(ValueError, match="inner_steps"):
        hm.shrinkage(paper_model, inner_optimizer=optax.sgd(0.1), inner_steps=-1)
    learner = hm.shrinkage(paper_model, inner_optimizer=optax.sgd(0.1), inner_steps=5)
    with pytest.raises(ValueError, match="shape \\(9,\\), expected \\(8,\\)"):
        learner.init(jax.random.PRNGKey(0), jnp.zeros(9))


def test_bad_model_construction(paper_model):
    with pytest.raises(ValueError, match="TaskLikelihood"):
        hm.HierarchicalModel(lambda theta, data: None, paper_model.partition)
    with pytest.raises(ValueError, match="ModulePartition"):
        hm.HierarchicalModel(linear.likelihood, {"w": 0})
    import numpyro.distributions as dist

    with pytest.raises(ValueError, match="sigma_prior"):
        hm.HierarchicalModel(linear.likelihood, paper_model.partition, sigma_prior=dist.HalfNormal(jnp.ones(3)))


# ---------------------------------------------------------------------------- holes found by fuzzing


def direct(batch_split, **fields):
    """A GaussianData built directly (no create), as NumPy arrays, with ``fields`` replaced."""
    data = jax.tree_util.tree_map(np.array, batch_split)
    return data._replace(**fields)


@pytest.mark.parametrize("dtype", [int, float, np.int8])
def test_a_directly_built_gaussian_data_with_a_non_boolean_mask_is_refused(paper_tasks, dtype):
    _, batch = paper_tasks
    data = direct(batch.train, mask=np.ones(batch.train.mask.shape, dtype))
    with pytest.raises(ValueError, match="mask must be boolean.*create converts"):
        linear.likelihood.check(data, "train split")


def test_bad_values_in_any_task_are_found(paper_tasks):
    _, batch = paper_tasks
    obs = np.array(batch.train.obs)
    obs[17, 2, 5] = np.nan  # a task past the first two
    with pytest.raises(ValueError, match=r"obs holds 1 NaN or infinite observed value\(s\), in task\(s\) \[17\]"):
        linear.likelihood.check(direct(batch.train, obs=obs), "train split")
    noise = np.array(batch.train.noise_sd)
    noise[24, 0, 0] = -1.0
    with pytest.raises(ValueError, match=r"noise_sd must be finite and > 0.*task\(s\) \[24\]"):
        linear.likelihood.check(direct(batch.train, noise_sd=noise), "train split")


def test_nan_padding_is_accepted_and_never_reaches_a_number(paper, paper_tasks):
    """NaN in padded obs (mask False): accepted by create (any 0/1 mask dtype) and when built
    directly; the closed forms and the library's densities equal those of the same data zero-padded."""
    _, batch = paper_tasks
    mask = np.ones(batch.train.mask.shape, bool)
    mask[[3, 20], [1, 3]] = False
    obs = np.array(batch.train.obs)
    obs[~mask] = np.nan
    design = np.array(batch.train.inputs)
    for m in (mask, mask.astype(int), mask.astype(float)):
        made = linear.make_data(obs, design, np.array(batch.train.noise_sd), mask=m)
        assert made.mask.dtype == bool and np.all(np.isfinite(np.asarray(made.obs)))
    raw = direct(batch.train, obs=obs, mask=mask)
    linear.likelihood.check(raw, "train split")  # accepted
    zeroed = raw._replace(obs=np.where(mask[..., None], obs, 0.0))
    for fn in (lambda d: linear.posterior(d, paper.phi, paper.sigma)[0],
               lambda d: linear.log_marginal_likelihood(d, paper.phi, paper.sigma)):
        np.testing.assert_array_equal(fn(raw), fn(zeroed))
        assert np.all(np.isfinite(fn(raw)))
    model = linear.make_model(8)
    theta = jnp.linspace(0.0, 1.0, 8)
    one = lambda d: jax.tree_util.tree_map(lambda a: jnp.asarray(a)[3], d)
    grad = jax.grad(model.log_likelihood)(theta, one(raw))
    np.testing.assert_array_equal(grad, jax.grad(model.log_likelihood)(theta, one(zeroed)))
    # NaN noise in padding would reach the gradients: refused, with the reason
    noise = np.array(batch.train.noise_sd)
    noise[~mask] = np.nan
    with pytest.raises(ValueError, match="in padding too"):
        linear.likelihood.check(direct(batch.train, noise_sd=noise, mask=mask), "train split")


@pytest.mark.parametrize("mask", [np.full((3, 2), 0.5), np.array([[1, 2], [1, 1], [1, 1]]), np.full((3, 2), "1")])
def test_masks_other_than_booleans_or_zero_one_are_refused(mask):
    with pytest.raises(ValueError, match="mask must hold booleans"):
        linear.make_data(OBS, DESIGN, NOISE, mask=mask)


def test_complex_data_is_refused():
    with pytest.raises(ValueError, match="obs is complex"):
        hm.GaussianData.create(OBS + 1j, NOISE)
    with pytest.raises(ValueError, match="noise_sd is complex"):
        hm.GaussianData.create(OBS, NOISE + 0j)
    with pytest.raises(ValueError, match="design is complex"):
        linear.make_data(OBS, DESIGN + 0j, NOISE)
    data = jax.tree_util.tree_map(np.asarray, linear.make_data(OBS, DESIGN, NOISE))
    with pytest.raises(ValueError, match="obs must hold real"):
        linear.likelihood.check(data._replace(obs=data.obs + 1j), "data")


def test_float32_overflow_is_reported_as_such(paper_model):
    """obs of 1e30 in float32: the squared residuals overflow (checked by evaluating the
    likelihood in float32), and validation says so instead of letting it look like divergence."""
    data = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32) if a.dtype == np.float64 else a,
                                  linear.make_data(np.full((3, 2, 9), 1e30), DESIGN, NOISE))
    assert data.obs.dtype == jnp.float32
    one = jax.tree_util.tree_map(lambda a: a[0], data)
    assert not np.isfinite(paper_model.log_likelihood(jnp.zeros(8, jnp.float32), one))  # it does overflow
    with pytest.raises(ValueError, match="squared residuals of the log-likelihood overflow float32.*x64"):
        linear.likelihood.check(data, "train split")
    small = data._replace(obs=data.obs * 1e-15)  # 1e15: squares stay far inside float32
    linear.likelihood.check(small, "train split")
    assert np.isfinite(paper_model.log_likelihood(jnp.zeros(8, jnp.float32), jax.tree_util.tree_map(lambda a: a[0], small)))
    linear.likelihood.check(linear.make_data(np.full((3, 2, 9), 1e30), DESIGN, NOISE), "float64 data")  # fine in float64


def test_dimension_mismatches_name_both_sizes(learner, paper_tasks):
    with pytest.raises(ValueError, match="partition covers 7 parameters but the model has num_params = 8"):
        linear.make_model(8, partition=hm.ModulePartition.per_coordinate(jnp.zeros(7)))
    _, batch = paper_tasks
    seven = linear.make_data(np.zeros((4, 2, 9)), np.ones((9, 7)), NOISE)
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    with pytest.raises(ValueError, match="design has P = 7 columns but the model has P = 8"):
        hm.evaluate(learner, state, hm.TaskBatch(seven, seven), 3)
    with pytest.raises(ValueError, match="design has P = 7 columns but the model has P = 8"):
        hm.fit(learner, state, lambda key: hm.TaskBatch(seven, seven), 2, data_key=jax.random.PRNGKey(0), progress=False)


@pytest.mark.parametrize("bad", [2.7, 3.0, "3", True, None])
def test_counts_take_integers_only(learner, paper_tasks, bad, tmp_path):
    _, batch = paper_tasks
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    fit = lambda **kw: hm.fit(learner, state, lambda key: batch, **{"num_steps": 2, **kw},
                              data_key=jax.random.PRNGKey(0), progress=False)
    for kwargs in (dict(num_steps=bad), dict(chunk_size=bad), dict(max_consecutive_skips=bad),
                   dict(checkpoint_every=bad, checkpoint=tmp_path / "ck.npz") if bad is not None else {"num_steps": "x"}):
        with pytest.raises(ValueError, match="must be an integer"):
            fit(**kwargs)
    if bad is not None:  # evaluate(num_steps=None) is the learner's own budget
        with pytest.raises(ValueError, match="num_steps must be an integer"):
            hm.evaluate(learner, state, batch, bad)
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        hm.sample_from(batch, bad)
    with pytest.raises(ValueError, match="num_tasks must be an integer"):
        linear.sample_tasks(linear.paper_domain(), jax.random.PRNGKey(0), bad)
    assert hm.fit(learner, state, lambda key: batch, np.int64(0), data_key=jax.random.PRNGKey(0),
                  progress=False)[0].step == 0  # NumPy integers are integers


@pytest.mark.parametrize("limit", [0, -1])
def test_max_consecutive_skips_below_one_is_refused(learner, paper_tasks, limit):
    _, batch = paper_tasks
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    with pytest.raises(ValueError, match="max_consecutive_skips must be >= 1"):
        hm.fit(learner, state, lambda key: batch, 2, data_key=jax.random.PRNGKey(0), progress=False,
               max_consecutive_skips=limit)


def test_run_nuts_refuses_a_tree_depth_below_one(paper_model, paper_tasks):
    _, batch = paper_tasks
    data = linear.merge_splits(batch)
    for depth in (0, (10, 0), 2.5):
        with pytest.raises(ValueError, match="max_tree_depth must be"):
            hm.run_nuts(hm.with_priors(paper_model), data, jax.random.PRNGKey(0), num_warmup=5, num_samples=5,
                        num_chains=1, max_tree_depth=depth, progress_bar=False)


def test_init_sigma_may_be_one_per_module_or_is_refused_clearly(paper_model):
    sigma = np.arange(1.0, 9.0)
    learner = hm.m_shrinkage(paper_model, inner_optimizer=optax.sgd(0.1), inner_steps=5, init_sigma=list(sigma))
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    np.testing.assert_allclose(hm.sigma_of(state.params, 8), sigma, rtol=1e-14)
    with pytest.raises(ValueError, match=r"init_sigma must be a scalar or have shape \(8,\)"):
        hm.m_shrinkage(paper_model, inner_optimizer=optax.sgd(0.1), inner_steps=5, init_sigma=[1.0, 2.0])
    with pytest.raises(ValueError, match="one value unless modular"):
        hm.shrinkage(paper_model, inner_optimizer=optax.sgd(0.1), inner_steps=5, init_sigma=list(sigma))
    with pytest.raises(ValueError, match="finite and > 0"):
        hm.m_shrinkage(paper_model, inner_optimizer=optax.sgd(0.1), inner_steps=5, init_sigma=[1.0] * 7 + [0.0])


def test_another_learners_state_is_refused_by_fit(learner, paper_model, paper_tasks):
    _, batch = paper_tasks
    maml_state = hm.maml(paper_model, inner_steps=3, init_lr=0.1).init(jax.random.PRNGKey(0), jnp.zeros(8))
    with pytest.raises(ValueError, match=r"state's params do not match M-Shrinkage's.*log_lr.*log_sigma2"):
        hm.fit(learner, maml_state, lambda key: batch, 2, data_key=jax.random.PRNGKey(0), progress=False)
    shared = hm.shrinkage(paper_model, inner_optimizer=optax.sgd(0.3), inner_steps=10).init(jax.random.PRNGKey(0), jnp.zeros(8))
    with pytest.raises(ValueError, match=r"log_sigma2'\]\": \(1,\)"):  # one sigma where M-Shrinkage has eight
        hm.fit(learner, shared, lambda key: batch, 2, data_key=jax.random.PRNGKey(0), progress=False)
    with pytest.raises(ValueError, match="learn no sigma"):
        hm.sigma_of(maml_state.params, 8)
