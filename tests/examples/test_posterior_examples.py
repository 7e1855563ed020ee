"""End-to-end runs of the three posterior studies in --quick mode (slow: several minutes)."""

import json

import numpy as np
import pytest
from _examples import load_example as load


@pytest.mark.slow
def test_eight_schools_example(tmp_path):
    load("eight_schools").main(["--quick", "--out", str(tmp_path), "--no-progress"])
    out = json.loads((tmp_path / "eight_schools.json").read_text())
    assert out["schema"] == "hiermeta/eight_schools/v1"
    nc = out["nuts"]["non-centred"]["summary"]
    z = (np.asarray(nc["mean"]) - np.concatenate([[out["exact"]["mu_mean"], out["exact"]["tau_mean"]],
                                                    out["exact"]["theta_mean"]])) / np.asarray(nc["mcse_mean"])
    assert np.max(np.abs(z)) < 3.5
    assert out["empirical_bayes"]["type2_ml"]["boundary"] and out["empirical_bayes"]["pll"]["pll_boundary"]
    assert (tmp_path / "eight_schools.png").exists()


@pytest.mark.slow
def test_map_vs_posterior_example(tmp_path):
    load("map_vs_posterior").main(["--quick", "--tasks", "8", "--domains", "linear", "--out", str(tmp_path),
                                   "--no-progress"])
    out = json.loads((tmp_path / "map_vs_posterior.json").read_text())
    scores = out["domains"]["linear"]["scores"]
    assert scores["T=8|Oracle|(b) exact posterior"]["regret"] == 0.0
    # the plug-in is sharper than the posterior predictive: it under-covers and scores lower
    plug, post = scores["T=8|Oracle|(a) MAP plug-in"], scores["T=8|Oracle|(b) exact posterior"]
    assert plug["coverage"]["0.9"] < post["coverage"]["0.9"] and plug["regret"] > 0
    full = scores["T=8|NUTS|(c) full posterior"]
    assert abs(full["coverage"]["0.9"] - 0.9) < 0.02
    assert full["regret"] < scores["T=8|Type-II ML|(b) exact posterior"]["regret"]


@pytest.mark.slow
def test_consistency_example(tmp_path):
    load("consistency").main(["--quick", "--tasks", "10,1000", "--seeds", "2", "--out", str(tmp_path),
                              "--no-progress"])
    out = json.loads((tmp_path / "consistency.json").read_text())
    toy = out["studies"]["toy s2=0.4"]["estimates"]
    assert np.all(np.asarray(toy["(iv) joint MAP"]) == 0.0)  # collapse below 3/N
    assert out["studies"]["toy s2=2.25"]["closed_form_gap"] < 1e-5


@pytest.mark.slow
def test_nuts_chains_run_in_parallel_on_several_devices():
    """With 4 (host) devices, run_nuts picks chain_method="parallel" (pmap) and gives the same draws'
    layout; run in a subprocess because the device count is fixed when JAX starts."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=false"
        import jax
        jax.config.update("jax_enable_x64", True)
        from unittest import mock
        import numpyro.infer
        from hiermeta import posterior as hp
        from hiermeta.models import eight_schools as es
        assert jax.local_device_count() == 4
        seen = {}
        original = numpyro.infer.MCMC.__init__
        def spy(self, *args, **kwargs):
            seen["chain_method"] = kwargs.get("chain_method")
            original(self, *args, **kwargs)
        with mock.patch.object(hp.MCMC, "__init__", spy):
            r = hp.run_nuts(es.make_model(), es.make_data(), jax.random.PRNGKey(0), num_warmup=200,
                            num_samples=200, num_chains=4, noncentred=True, progress_bar=False)
        assert seen["chain_method"] == "parallel", seen
        assert r.samples["theta"].shape == (4, 200, 8, 1)
        print("ok", float(r.samples["sigma"].mean()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
