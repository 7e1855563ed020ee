"""The ArviZ object of a NUTS run: every labelled row of a summary is the row of the draws it names.

Synthetic draws with a different mean for every (site, task, coordinate), P = 3 coordinates in
M = 2 modules named by a dict template, T = 4 named tasks: a summary whose labels and values
disagree (ArviZ 1.x stacking theta param-major under task-major labels) fails by far more than
rounding.  Runs on whichever ArviZ the environment has (0.x InferenceData, 1.x DataTree).
"""

import itertools

import arviz as az
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr
from scipy.special import logsumexp

import hiermeta as hm
from hiermeta import posterior as hp
from hiermeta.arviz_io import _use_datatree, param_names
from hiermeta.models import linear

C, S, T = 2, 60, 4
TASKS = ["north", "east", "south", "west"]


@pytest.fixture(scope="module")
def draws():
    template = {"Intercept": 0.0, "Days": jnp.zeros(2)}  # ravel order: Days[0], Days[1], Intercept
    partition = hm.ModulePartition.from_labels(template, {"Intercept": "level", "Days": "slope"})
    model = linear.make_model(partition.num_params, partition)
    P, M = partition.num_params, partition.num_modules
    rng = np.random.default_rng(0)
    noise = lambda *shape: 0.01 * rng.normal(size=(C, S) + shape)
    samples = {
        "phi": 100.0 * np.arange(1, P + 1) + noise(P),
        "sigma": 1000.0 * np.arange(1, M + 1) + noise(M),
        "theta": 10.0 * np.arange(T)[:, None] + np.arange(P)[None, :] + noise(T, P),  # (C, S, T, P)
    }
    log_lik = -np.abs(rng.normal(size=(C, S, T))) - np.arange(T)
    idata = hp.to_arviz(samples, model, log_likelihood=log_lik, task_names=TASKS)
    return model, samples, log_lik, idata


def expected_means(model, samples, idata):
    """Label -> mean of the raw draws, for labels as ArviZ writes them (``var[coord, coord]``, in the
    object's dimension order); each coordinate name is mapped back to its index in the raw arrays."""
    index = {"param": {p: i for i, p in enumerate(param_names(model.partition))},
             "module": {m: j for j, m in enumerate(model.partition.names)},
             "task": {t: k for k, t in enumerate(TASKS)}}
    raw_axes = {"phi": ("param",), "sigma": ("module",), "theta": ("task", "param")}  # NUTSResult layout
    want = {}
    for var, axes in raw_axes.items():
        dims = [d for d in idata["posterior"][var].dims if d not in ("chain", "draw")]
        for values in itertools.product(*(idata["posterior"][d].values.tolist() for d in dims)):
            where = dict(zip(dims, values))
            raw = tuple(index[axis][where[axis]] for axis in axes)
            want[f"{var}[{', '.join(map(str, values))}]"] = samples[var][(slice(None), slice(None)) + raw].mean()
    return want


def test_param_names_follow_the_ravel_order():
    part = hm.ModulePartition.from_labels({"b": 0.0, "w": jnp.zeros((2, 2))}, {"b": "b", "w": "w"})
    assert param_names(part) == ["b", "w[0,0]", "w[0,1]", "w[1,0]", "w[1,1]"]
    flat = np.asarray(part.ravel({"b": jnp.array(7.0), "w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}))
    assert dict(zip(param_names(part), flat)) == {"b": 7, "w[0,0]": 1, "w[0,1]": 2, "w[1,0]": 3, "w[1,1]": 4}
    assert param_names(hm.ModulePartition.per_coordinate(jnp.zeros(3))) == [0, 1, 2]


@pytest.mark.parametrize("var_names", [None, ["phi", "theta"], ["theta", "phi"], ["sigma", "theta", "phi"]])
def test_summary_rows_match_the_raw_draws(draws, var_names):
    model, samples, _, idata = draws
    want = expected_means(model, samples, idata)
    plain = az.summary(idata, var_names=var_names, round_to="none")  # what a user types
    ours = hp.summary(idata, var_names if var_names is not None else ["phi", "sigma", "theta"])
    for table in (plain, ours):
        selected = [k for k in want if var_names is None or k.split("[")[0] in var_names]
        assert sorted(table.index) == sorted(selected)
        got = table.loc[selected, "mean"].to_numpy(dtype=float)
        np.testing.assert_allclose(got, [want[k] for k in selected], rtol=0, atol=1e-12)
    if var_names is None or "theta" in var_names:  # task "south" (k = 2), coordinate "Intercept" (i = 2)
        assert float(plain.loc["theta[Intercept, south]", "mean"]) == pytest.approx(22.0, abs=0.01)
    np.testing.assert_allclose(ours["mcse_mean"].to_numpy(dtype=float),
                               plain.loc[ours.index, "mcse_mean"].to_numpy(dtype=float), rtol=1e-12)


def test_every_dimension_order_is_consistent_for_any_selection(draws):
    """ArviZ 1.x stacks a selection of variables in the order their dimensions first appear and
    labels each variable by its own order: both agree for every ordering of every group's variables."""
    *_, idata = draws
    for group in ("posterior", "log_likelihood", "constant_data"):
        ds = idata[group]
        names = list(ds.data_vars)
        for order in itertools.permutations(names):
            stacked = []
            for name in order:
                stacked += [d for d in ds[name].dims if d not in ("chain", "draw") and d not in stacked]
            for name in order:
                own = [d for d in ds[name].dims if d not in ("chain", "draw")]
                assert own == [d for d in stacked if d in own], (group, order, name)
        # a coordinate on only some variables makes az.summary(idata) refuse to stack them
        for coord in ds.coords:
            assert coord in ds.dims, (group, coord)


def test_object_names_modules_tasks_and_params(draws):
    model, samples, _, idata = draws
    assert isinstance(idata, xr.DataTree) == _use_datatree()
    post = idata["posterior"]
    assert post["theta"].dims == ("chain", "draw", "param", "task")
    assert list(post["param"].values) == ["Days[0]", "Days[1]", "Intercept"]
    assert list(post["module"].values) == ["slope", "level"]
    assert list(post["task"].values) == TASKS
    np.testing.assert_array_equal(post["theta"].sel(param="Intercept", task="south").values,
                                  samples["theta"][:, :, 2, 2])
    assert list(idata["constant_data"]["param_module"].values) == ["slope", "slope", "level"]


def test_loo_over_tasks_reads_the_log_likelihood(draws):
    """az.loo (what replaces az.waic on ArviZ 1.x) on the object: elpd_loo + p_loo is the lppd,
    sum_t log mean_s p(D_t | theta_s), computed here from the raw array."""
    _, _, log_lik, idata = draws
    loo = az.loo(idata)
    elpd, p = (loo.elpd, loo.p) if _use_datatree() else (loo["elpd_loo"], loo["p_loo"])
    flat = log_lik.reshape(C * S, T)
    lppd = float(np.sum(logsumexp(flat, axis=0) - np.log(C * S)))
    assert elpd + p == pytest.approx(lppd, rel=1e-10)
    assert elpd < lppd


def test_netcdf_round_trip_keeps_labels(draws, tmp_path):
    pytest.importorskip("h5netcdf")
    pytest.importorskip("h5py")
    model, samples, _, idata = draws
    path = tmp_path / "run.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    np.testing.assert_array_equal(back["posterior"]["theta"].values, idata["posterior"]["theta"].values)
    assert list(back["posterior"]["task"].values) == TASKS
    assert list(back["posterior"]["param"].values) == list(idata["posterior"]["param"].values)
    want = expected_means(model, samples, idata)
    table = hp.summary(back, ["theta"])
    np.testing.assert_allclose(table["mean"].to_numpy(dtype=float), [want[k] for k in table.index], atol=1e-12)


def test_summary_refuses_a_variable_that_was_not_sampled(draws):
    model, samples, log_lik, _ = draws
    idata = hp.to_arviz({"theta": samples["theta"]}, model, log_likelihood=log_lik,
                        constant={"sigma": np.ones(2), "phi": np.zeros(3)})
    with pytest.raises(ValueError, match=r"no posterior draws of \['sigma'\]"):
        hp.summary(idata, ["sigma"])
    assert idata["constant_data"]["sigma"].dims == ("module",)
    assert list(hp.summary(idata, ["theta"]).index)[:2] == ["theta[Days[0], 0]", "theta[Days[0], 1]"]
