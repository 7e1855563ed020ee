"""run_nuts as one compiled program: the same draws as NumPyro's own loop, built once and reused.

A second call with data of the same shapes (another key, other values of the sites held fixed)
traces and compiles nothing; the draws are those NumPyro's eager ``MCMC.run`` gives for the same
key (to rounding); the per-task log-likelihood computed inside the program is the Gaussian
density of each school's observation.
"""

from collections import Counter

import jax
import numpy as np
import pytest
from scipy import stats

import hiermeta as hm
import hiermeta.posterior as hp
from hiermeta.nuts_start import sampler_start
from hiermeta.models import eight_schools as es

RUN = dict(num_warmup=100, num_samples=100, num_chains=2, noncentred=True)


class CompileCounter:
    """Counts JAX's tracing and XLA compilation events while active."""

    EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "traces", "/jax/core/compile/backend_compile_duration": "compiles"}

    def __init__(self):
        self.counts, self.active = Counter(), False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name, seconds, **kwargs):
        if self.active and name in self.EVENTS:
            self.counts[self.EVENTS[name]] += 1

    def __enter__(self):
        self.counts.clear()
        self.active = True
        return self.counts

    def __exit__(self, *exc):
        self.active = False


@pytest.fixture(scope="module")
def counter():
    return CompileCounter()


@pytest.fixture(scope="module")
def schools():
    return es.make_model(), es.make_data()


@pytest.mark.filterwarnings("ignore::hiermeta.errors.SamplingWarning")
def test_second_call_traces_and_compiles_nothing(schools, counter):
    model, data = schools
    hm.run_nuts(model, data, jax.random.PRNGKey(0), **RUN)
    with counter as counts:
        result = hm.run_nuts(model, data, jax.random.PRNGKey(1), **RUN)
    assert counts["traces"] == 0 and counts["compiles"] == 0, counts
    assert result.samples["sigma"].shape == (2, 100, 1) and np.all(result.samples["sigma"] > 0)
    seconds = result.diagnostics["seconds"]
    assert set(seconds) == {"sampling", "log_likelihood", "arviz", "diagnostics"}
    assert all(v >= 0 for v in seconds.values()) and seconds["sampling"] > 0

    # sites held fixed are arguments of the program: other values reuse it
    hm.run_nuts(model, data, jax.random.PRNGKey(2), fixed={"sigma": 3.0}, **RUN)
    with counter as counts:
        small = hm.run_nuts(model, data, jax.random.PRNGKey(2), fixed={"sigma": 0.5}, **RUN)
    assert counts["traces"] == 0 and counts["compiles"] == 0, counts
    # and the values are used: at sigma = 0.5 every school sits near the common mean
    spread = np.std(small.samples["theta"][..., 0], axis=-1).mean()
    assert 0.2 < spread < 0.8, spread


@pytest.mark.filterwarnings("ignore::hiermeta.errors.SamplingWarning")
def test_compiled_run_gives_numpyro_loop_draws(schools):
    """The one-program run is NumPyro's MCMC.run (same key, same configuration), only compiled whole.

    Compared over 20 + 20 iterations: the two programs differ by rounding (1.6e-13 in phi after 5 + 5
    iterations), and a chain is chaotic, so over 100 + 100 one chain's draws drift apart entirely."""
    model, data = schools
    result = hm.run_nuts(model, data, jax.random.PRNGKey(3), **{**RUN, "num_warmup": 20, "num_samples": 20})
    config = hp._SamplerConfig(True, (), 20, 20, 2, "vectorized", 0.8, 10, False)
    start = sampler_start(model, data, {}, noncentred=True)  # the data's fit and scale, as run_nuts starts
    mcmc = hp._run_mcmc(model, config, {}, False, jax.random.PRNGKey(3), data, start)
    eager = mcmc.get_samples(group_by_chain=True)
    for site, draws in result.samples.items():
        np.testing.assert_allclose(draws, np.asarray(eager[site]), rtol=1e-6, atol=1e-8, err_msg=site)
    steps = np.asarray(mcmc.get_extra_fields(group_by_chain=True)["num_steps"])
    np.testing.assert_array_equal(result.stats["n_steps"], steps)
    # the log-likelihood computed in the same program: log N(y_j | theta_j, s_j^2) per school
    expected = stats.norm.logpdf(es.Y, result.samples["theta"][..., 0], es.SE)
    np.testing.assert_allclose(result.log_likelihood, expected, rtol=1e-10)


@pytest.mark.filterwarnings("ignore::hiermeta.errors.SamplingWarning")
def test_progress_bar_runs_numpyro_loop(schools):
    """With a bar, NumPyro's own loop runs; the log-likelihood comes from the cached program."""
    model, data = schools
    looped = hm.run_nuts(model, data, jax.random.PRNGKey(4), num_warmup=20, num_samples=20, num_chains=1,
                         noncentred=True, progress_bar=True)
    expected = stats.norm.logpdf(es.Y, looped.samples["theta"][..., 0], es.SE)
    np.testing.assert_allclose(looped.log_likelihood, expected, rtol=1e-10)
    assert looped.diagnostics["seconds"]["log_likelihood"] > 0
