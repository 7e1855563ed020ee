"""Malformed and unlucky input at every public entry point that takes user data or a count.

Each case is refused with a message that names its cause (or accepted, and then right): never a
traceback from deep inside, a hang, a silently wrong answer or a misdiagnosis.  These are the
holes issue 22's fuzzing found (241 inputs), kept as tests, with hypothesis searching around them.
The multi-process and overwrite cases are in tests/unit/test_distributed.py and
tests/unit/test_checkpoint.py, the examples' command lines in tests/examples/test_examples_cli.py,
NUTS on a rescaled response in tests/unit/test_posterior.py.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hiermeta as hm
from hiermeta.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hiermeta.errors import EmpiricalBayesWarning
from hiermeta.families import bernoulli, binomial, gaussian, poisson, student_t
from hiermeta.priors import prior_tail_check
from hiermeta.models import linear

pd = pytest.importorskip("pandas")
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True, database=None)  # the same examples every run, nothing written


def frame(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n // 8), 8)[:n]
    x, w = rng.normal(size=n), rng.normal(size=n)
    return pd.DataFrame({"y": 1 + 0.5 * x + rng.normal(size=g.max() + 1)[g] + 0.3 * rng.normal(size=n),
                         "g": g, "x": x, "w": w})


# ---------------------------------------------------------------------------- from_table

def _dup(df):
    return pd.concat([df, df[["x"]]], axis=1)


def _scaled(factor, column="x"):
    return lambda df: df.assign(**{column: df[column] * factor})


@pytest.mark.parametrize("change, kwargs, match", [
    (lambda df: df.assign(**{"1": df["x"]}), dict(random=["1", "x"]), r"column named '1'.*means the intercept"),
    (lambda df: df.assign(**{"1": df["x"]}), dict(random=["x"], fixed=["1"]), r"column named '1'.*means the intercept"),
    (None, dict(random=["1", "y"]), r"response 'y' is also in random=: a column cannot explain itself"),
    (None, dict(fixed=["y"]), r"response 'y' is also in fixed="),
    (None, dict(group_covariates=["y"]), r"response 'y' is also in group_covariates="),
    (None, dict(offset="y"), r"response 'y' is also in offset="),
    (None, dict(response="g"), r"column 'g' is both the response and the group"),
    (_dup, dict(random=["1", "x"]), r"2 columns named 'x' \(random\); column names must be unique"),
    (lambda df: pd.concat([df, df[["y"]]], axis=1), {}, r"2 columns named 'y' \(response\)"),
    (_scaled(1e200), dict(random=["1", "x"]), r"random column 'x' has values of magnitude up to .*e\+200: their "
                                              r"squares overflow in float64.*rescale it"),
    (_scaled(1e-200), dict(random=["1", "x"]), r"random column 'x' .* up to .*e-200: their squares underflow to 0"),
    (_scaled(1e200), dict(fixed=["x"]), r"fixed column 'x' has values of magnitude up to"),
    (_scaled(1e-170, "y"), {}, r"response 'y' has values of magnitude up to .*underflow"),
])
def test_from_table_names_the_real_problem(change, kwargs, match):
    df = frame()
    df = change(df) if change else df
    args = dict(response="y", group="g")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        hm.from_table(df, **args)


def test_from_table_judges_a_column_by_its_magnitude_not_as_dependent():
    """Columns at 1e+-150 are well inside float64 and independent: accepted; a truly dependent one
    at 1e100 is still reported as dependent (the rank check is scale-free)."""
    for factor in (1e150, 1e-150):
        table = hm.from_table(_scaled(factor)(frame()), response="y", group="g", random=["1", "x"])
        np.testing.assert_allclose(table.arrays["all"].random[..., 1][table.arrays["all"].mask],
                                   frame()["x"].to_numpy() * factor, rtol=1e-15)
    df = frame().assign(x2=lambda d: 2e100 * d["x"])
    with pytest.raises(ValueError, match=r"linearly dependent: \['x2'\]"):
        hm.from_table(df, response="y", group="g", random=["1", "x", "x2"])


NAMES = ["y", "g", "x", "w", "1"]
numbers = st.floats(allow_nan=True, allow_infinity=True, width=64)


@FUZZ
@given(values=st.lists(st.tuples(numbers, numbers, st.sampled_from([0, 1, 2, "a"])), min_size=0, max_size=9),
       response=st.sampled_from(NAMES), group=st.sampled_from(NAMES),
       random=st.lists(st.sampled_from(NAMES), max_size=3), fixed=st.lists(st.sampled_from(NAMES), max_size=2),
       shadow=st.booleans())
def test_from_table_either_builds_sound_data_or_raises_value_error(values, response, group, random, fixed, shadow):
    df = pd.DataFrame({"y": [v[0] for v in values], "x": [v[1] for v in values],
                       "w": np.linspace(-1, 1, len(values)), "g": [v[2] for v in values]})
    if shadow:
        df["1"] = df["w"] * 2
    try:
        table = hm.from_table(df, response=response, group=group, random=random, fixed=fixed, warn=False)
    except ValueError:
        return
    arrays = table.arrays["all"]
    observed = arrays.mask
    assert np.all(np.isfinite(arrays.response[observed])) and np.all(np.isfinite(arrays.random[observed]))
    assert response != group and response not in random + fixed and not (shadow and "1" in random + fixed)


# ---------------------------------------------------------------------------- the families' make_data

def test_bernoulli_takes_a_boolean_response():
    y = np.array([[True, False, True], [False, False, True]])
    Z = np.ones((2, 3, 1))
    from_bool = bernoulli().make_data(y, random=Z)
    np.testing.assert_array_equal(from_bool.response, bernoulli().make_data(y.astype(float), random=Z).response)
    with pytest.raises(ValueError, match="must be 0 or 1"):
        bernoulli().make_data(np.array([[0.0, 2.0]]), random=np.ones((1, 2, 1)))


FAMILIES = {"bernoulli": bernoulli, "poisson": poisson, "gaussian": gaussian, "student_t": student_t,
            "binomial": binomial}


def _make(name, response, mask=None, random=None):
    random = np.ones(np.shape(response) + (1,)) if random is None else random
    extra = {"trials": np.full(np.shape(response), 3)} if name == "binomial" else {}
    return FAMILIES[name]().make_data(response, mask, random, **extra)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("response, match", [
    (np.array([[1.0, np.nan]]), "NaN|finite"),
    (np.array([1.0, 0.0]), r"shape \((tasks|groups), observations\)"),
    (np.array([["1", "0"]]), "real numbers"),
    (np.array([[1 + 1j, 0]]), "real (numbers|data)"),
])
def test_every_family_refuses_bad_responses_naming_them(name, response, match):
    with pytest.raises(ValueError, match=match):
        _make(name, response)


@FUZZ
@given(name=st.sampled_from(sorted(FAMILIES)),
       response=st.lists(st.one_of(numbers, st.integers(-3, 5), st.booleans()), min_size=1, max_size=6),
       mask=st.lists(st.booleans(), min_size=6, max_size=6))
def test_every_family_either_builds_finite_data_or_raises_value_error(name, response, mask):
    y = np.asarray(response)[None, :]
    m = np.asarray(mask[: y.shape[1]])[None, :]
    try:
        data = _make(name, y, m)
    except ValueError:
        return
    response = data.obs[..., 0] if name == "gaussian" else data.response
    assert np.all(np.isfinite(np.asarray(response)[np.asarray(data.mask)]))


# ---------------------------------------------------------------------------- type2_ml, run_nuts, with_priors

@pytest.fixture(scope="module")
def small():
    table = hm.from_table(frame(), response="y", group="g", random=["1", "x"], query_fraction=0.3, seed=0)
    return table, table.model()


@pytest.mark.parametrize("tol", [-1, float("nan"), 0.0, float("inf"), "1e-6", True])
def test_type2_ml_refuses_a_tolerance_that_cannot_be_met_or_always_is(small, tol):
    table, model = small
    with pytest.raises(ValueError, match=r"tol \(the largest gradient component of a converged fit\) must be a "
                                         r"finite number > 0"):
        hm.type2_ml(model, table.data, tol=tol)
    with pytest.raises(ValueError, match="tol .* must be a finite number > 0"):
        hm.empirical_bayes.type2_maximum_likelihood(lambda p, s, d: 0.0, [0.0], [1.0], None, num_tasks=1, tol=tol)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_chains=2.5), "num_chains must be an integer"),
    (dict(num_chains=int(1e11)), r"1e\+11 chain\(s\) .* GiB of memory, more than"),
    (dict(num_samples=10**12), r"num_samples=1000000000000 draws .* GiB of memory"),
    (dict(num_samples=0), "num_samples must be >= 1"),
    (dict(num_warmup=-1), "num_warmup must be >= 0"),
    (dict(target_accept=float("nan")), r"target_accept must be in \(0, 1\)"),
    (dict(max_tree_depth=0), "max_tree_depth must be >= 1"),
])
def test_run_nuts_refuses_counts_it_cannot_run(small, kwargs, match):
    table, model = small
    priors = hm.with_priors(model, table.data)
    args = dict(num_warmup=10, num_samples=10, num_chains=1)
    args.update(kwargs)
    if args["num_chains"] == int(1e11):
        match = match.replace(r"1e\+11", "100000000000")
    with pytest.raises(ValueError, match=match):
        hm.run_nuts(priors, table.data, jax.random.PRNGKey(0), **args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(phi_scale=0.0), "phi_scale must be finite and > 0"),
    (dict(phi_scale=[1.0, np.nan]), "phi_scale must be finite"),
    (dict(phi_scale=[1.0, 2.0, 3.0]), "phi_scale must be a scalar or have 2 entries"),
    (dict(sigma_scale=-1.0), "sigma_scale must be finite and > 0"),
    (dict(phi_loc=np.inf), "phi_loc must be finite"),
    (dict(sigma="cauchy"), "sigma prior must be one of"),
    (dict(corr_concentration=0.0), "corr_concentration must be finite and > 0"),
])
def test_with_priors_refuses_bad_scales(small, kwargs, match):
    table, model = small
    with pytest.raises(ValueError, match=match):
        hm.with_priors(model, table.data, **kwargs)


def test_a_posterior_the_sampler_did_not_reach_is_not_blamed_on_the_prior(small):
    """A posterior median far in the prior's tail while the data's own estimate sits inside the
    prior is the sampler's failure (Dyestuff x 1e6 before the start/scale fix), not a conflict."""
    table, model = small
    priors = hm.with_priors(model, table.data)
    own = model.likelihood.initial_values(table.data, model)
    stuck = {"phi": np.broadcast_to(own["phi"] - 1e6, (2, 5, 2))}
    messages = prior_tail_check(priors, stuck, table.data)
    assert messages and all("the sampler, not the prior, is off" in m for m in messages), messages
    assert not any("prior and data disagree" in m for m in messages)
    # a prior that really excludes the data is still reported as a conflict, for both checks
    narrow = hm.with_priors(model, table.data, phi_loc=-100.0, phi_scale=0.1)
    messages = prior_tail_check(narrow, {"phi": np.broadcast_to(own["phi"], (2, 5, 2))}, table.data)
    assert messages and all("prior and data disagree" in m for m in messages), messages


# ---------------------------------------------------------------------------- the shrinkage report

def test_shrinkage_report_refuses_an_adaptation_that_failed(small):
    table, model = small
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmpiricalBayesWarning)
        fit = hm.type2_ml(model, table.support)
    T, P = table.num_groups, 2
    with pytest.raises(ValueError, match=r"adapted\['diverged'\] theta holds 10 NaN or infinite value\(s\) \(groups "
                                         r"\[0, 1, 2, 3, 4\]\): the adaptation failed or diverged"):
        hm.shrinkage_report(model, table, fit, adapted={"diverged": np.full((T, P), np.nan)})
    one = np.zeros((T, P))
    one[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"holds 1 NaN or infinite value\(s\) \(groups \[3\]\)"):
        hm.shrinkage_report(model, table, fit, adapted={"one": one})
    with pytest.raises(ValueError, match=r"values\['noise_sd'\] holds 1 NaN"):
        hm.shrinkage_report(model, table, fit, adapted={"noise": (np.zeros((T, P)), {"noise_sd": np.nan})})


# ---------------------------------------------------------------------------- fit and evaluate

@pytest.fixture(scope="module")
def learner_setup():
    learner = hm.m_shrinkage(linear.make_model(8), inner_optimizer=optax.sgd(0.3), inner_steps=5,
                             outer_optimizer=optax.adam(0.03))
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    tasks = linear.sample_tasks(linear.paper_domain(), jax.random.PRNGKey(1), 10)[1]
    return learner, state, tasks


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_steps=10**23), r"num_steps=100000000000000000000000 from step 0 would run past step 2147483647, the "
                             r"largest the state's step counter \(int32\) holds"),
    (dict(num_steps=2**31), "would run past step 2147483647"),
    (dict(num_steps=2**30), r"the history of num_steps=1073741824 meta-steps .* GiB of memory"),
    (dict(num_steps=3, chunk_size=10**12), r"a chunk of chunk_size=1000000000000 meta-steps would need .* GiB"),
    (dict(num_steps=3.0), "num_steps must be an integer"),
])
def test_fit_refuses_counts_it_cannot_hold_before_running(learner_setup, kwargs, match):
    learner, state, tasks = learner_setup
    args = dict(data_key=jax.random.PRNGKey(0), progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        hm.fit(learner, state, hm.sample_from(tasks, 5), args.pop("num_steps"), **args)


def test_evaluate_refuses_a_curve_longer_than_memory(learner_setup):
    learner, state, tasks = learner_setup
    with pytest.raises(ValueError, match=r"loss curves of 10 tasks over num_steps=1000000000000 steps would need"):
        hm.evaluate(learner, state, tasks, 10**12)


# ---------------------------------------------------------------------------- the checkpoint reader

def test_every_single_bit_flip_is_reported_as_corrupt_or_changes_nothing(tmp_path):
    """One flipped bit per byte, across the whole file (zip directory included): the reader says
    "corrupt" (never "not a hiermeta checkpoint") or loads exactly what was saved."""
    tree = {"a": jnp.arange(5.0), "b": jnp.ones((2, 3)), "k": jax.random.PRNGKey(3)}
    good = save_checkpoint(tmp_path / "good.npz", tree, {"step": 7}).read_bytes()
    bad, loaded = tmp_path / "bad.npz", 0
    for position in range(len(good)):
        flipped = bytearray(good)
        flipped[position] ^= 1 << (position % 8)
        bad.write_bytes(bytes(flipped))
        try:
            restored, meta, _ = load_checkpoint(bad, tree)
        except CheckpointError as err:
            assert "is corrupt" in str(err) and "not a hiermeta checkpoint" not in str(err), (position, str(err))
            continue
        loaded += 1
        assert meta == {"step": 7}
        for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(tree)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded < len(good) // 4  # most flips are caught (the rest fall in bytes no reader uses)


def test_a_zip_that_is_not_ours_is_still_named_so(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.ones(3))
    with pytest.raises(CheckpointError, match=r"is not a hiermeta checkpoint \(no __meta__ entry; it holds \['weights'\]"):
        load_checkpoint(path, {"a": jnp.ones(3)})
