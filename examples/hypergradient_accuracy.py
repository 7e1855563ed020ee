"""Meta-gradient accuracy on the linear domain: Eq. 4, exact CG, and backprop through K steps.

The synthetic study of the iMAML paper, done for sigma as well as phi.  On the paper's linear
domain (Experiment 1), at phi = the true phi and one sigma for all 8 coordinates (each its own
module), the PLL hypergradients dPLL/dphi (8) and dPLL/d log sigma_m^2 (8), averaged over a fixed
set of tasks, are computed after K inner gradient-descent steps (step 1/L, L the largest
eigenvalue of the inner Hessian) by

    Eq. 4            v = sigma^2 g at theta_K (the paper's approximation);
    CG n             v from n conjugate-gradient iterations on Hessian-vector products at theta_K;
    unrolled         backpropagation through the K unrolled steps (MAML-style);

and compared with the closed-form derivative (autodiff through the exact posterior mean).
Relative error = ||estimate - exact|| / ||exact||.  The study also reports the compiled memory of
the implicit and the unrolled hypergradient for K = 10, 100, 1000.

    python examples/hypergradient_accuracy.py            # about a minute on 2 CPU cores
    python examples/hypergradient_accuracy.py --quick    # smoke run
    python examples/hypergradient_accuracy.py --out DIR  # DIR/hypergradient_accuracy.json and .png (default results/)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import hiermeta as hm  # noqa: E402
from hiermeta.implicit import cg_solve, eq4_solve, implicit_hypergradient, implicit_solution  # noqa: E402
from hiermeta.models import linear  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, also when loaded from elsewhere
from _common import count, format_table, prng_seed, pyplot, save_figure, study_parser, write_json  # noqa: E402

CG_ITERATIONS = (1, 2, 5, 10)
METHODS = ("Eq. 4", *[f"CG {n}" for n in CG_ITERATIONS], "unrolled")
MEMORY_KS = (10, 100, 1000)


def build_parser():
    p = study_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="fewer sigmas and K, smoke run")
    p.add_argument("--out", default="results", help="output directory for hypergradient_accuracy.json and .png")
    p.add_argument("--seed", type=prng_seed, default=0, help="seed of the tasks")
    p.add_argument("--tasks", type=count(1), default=100, help="tasks the hypergradient averages over")
    p.add_argument("--no-plot", action="store_true", help="write no figure")
    return p


def parse_args(argv=None):
    p = build_parser()
    return p.parse_args(argv)


def build(model, K):
    """Jitted ``(phi, log sigma^2, lr, batch) -> estimates`` for K inner steps (one compile per K)."""

    def loss(p):
        return lambda th, d: model.inner_objective(th, p["phi"], jnp.exp(0.5 * p["log_sigma2"]), d)

    def inner_grad(d):
        return lambda th, p: jax.grad(model.inner_objective)(th, p["phi"], jnp.exp(0.5 * p["log_sigma2"]), d)

    def run(phi, log_sigma2, lr, batch):
        params = {"phi": phi, "log_sigma2": jnp.full(phi.shape, log_sigma2)}
        theta_of = lambda p: jax.vmap(lambda d: hm.inner.run_inner(hm.inner.InnerProblem(p["phi"], loss(p), optax.sgd(lr)), d, K).theta)(batch.train)
        mean_pll = lambda theta: jnp.mean(jax.vmap(model.log_likelihood)(theta, batch.val))
        exact_theta = lambda p: linear.posterior(batch.train, p["phi"], jnp.exp(0.5 * p["log_sigma2"]))[0]
        out = {"exact": jax.grad(lambda p: mean_pll(exact_theta(p)))(params),
               "unrolled": jax.grad(lambda p: mean_pll(theta_of(p)))(params)}
        theta_k = theta_of(params)
        g = jax.vmap(jax.grad(model.log_likelihood))(theta_k, batch.val)
        prior_var = jnp.exp(params["log_sigma2"])
        solvers = {"Eq. 4": eq4_solve, **{f"CG {n}": cg_solve(tol=0.0, maxiter=n) for n in CG_ITERATIONS}}
        for name, solver in solvers.items():
            hyper, _ = jax.vmap(lambda th, g_t, d: implicit_hypergradient(inner_grad(d), th, params, g_t, prior_var, solver))(
                theta_k, g, batch.train)
            out[name] = jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), hyper)
        theta_hat = exact_theta(params)
        out["inner_error"] = jnp.linalg.norm(theta_k - theta_hat) / jnp.linalg.norm(theta_hat - phi)
        return out

    return jax.jit(run)


def memory_table(model, batch, phi, sigma):
    """Compiled temporaries (bytes) of the implicit (custom_vjp, CG) and unrolled hypergradient."""
    params = {"phi": jnp.asarray(phi), "log_sigma2": jnp.log(jnp.asarray(sigma) ** 2)}
    sd = lambda p: jnp.exp(0.5 * p["log_sigma2"])
    inner_grad = lambda th, p, d: jax.grad(model.inner_objective)(th, p["phi"], sd(p), d)
    prior_var = lambda p: jnp.exp(p["log_sigma2"])
    rows = {}
    for K in MEMORY_KS:
        def solve(p, d, K=K):
            problem = hm.inner.InnerProblem(p["phi"], lambda th, d: model.inner_objective(th, p["phi"], sd(p), d), optax.sgd(0.3))
            return hm.inner.run_inner(problem, d, K).theta

        solution = implicit_solution(solve, inner_grad, prior_var, cg_solve())
        pll = lambda p, b, f: jnp.mean(jax.vmap(lambda tr, va: model.log_likelihood(f(p, tr), va))(b.train, b.val))
        rows[K] = {}
        for name, f in (("implicit", solution), ("unrolled", solve)):
            stats = jax.jit(jax.grad(lambda p, b, f=f: pll(p, b, f))).lower(params, batch).compile().memory_analysis()
            rows[K][name] = {"temp_bytes": int(stats.temp_size_in_bytes),
                             "total_bytes": int(stats.temp_size_in_bytes + stats.argument_size_in_bytes
                                                + stats.output_size_in_bytes - stats.alias_size_in_bytes)}
    return rows


def main(argv=None):
    args = parse_args(argv)
    hm.enable_compilation_cache()
    t_start = time.perf_counter()
    sigmas = (0.1, 1.0, 10.0) if args.quick else (0.1, 0.3, 1.0, 3.0, 10.0)
    ks = (10, 100) if args.quick else (10, 30, 100, 300, 1000)
    out = Path(args.out)

    domain = linear.paper_domain()
    model = linear.make_model(domain.num_params)
    _, batch = linear.sample_tasks(domain, jax.random.PRNGKey(args.seed), args.tasks)
    phi = jnp.asarray(domain.phi)
    A, xi = domain.design, domain.noise_sd
    F = domain.n_train * A.T @ np.diag(xi**-2.0) @ A  # the training-likelihood Hessian (same for every task)

    records, inner_errors, lrs = [], {}, {}
    for K in ks:
        run = build(model, K)
        for s in sigmas:
            H = F + np.eye(domain.num_params) / s**2
            lr = 1.0 / float(np.linalg.eigvalsh(H).max())
            lrs[s] = lr
            est = jax.tree_util.tree_map(np.asarray, run(phi, jnp.log(s**2), lr, batch))
            inner_errors[(s, K)] = float(est["inner_error"])
            for method in METHODS:
                for key in ("phi", "log_sigma2"):
                    err = np.linalg.norm(est[method][key] - est["exact"][key]) / np.linalg.norm(est["exact"][key])
                    records.append({"sigma": s, "K": K, "method": method, "param": key, "rel_error": float(err)})
        print(f"[{time.perf_counter() - t_start:6.1f}s] K = {K}: {len(sigmas)} sigmas done")

    def table(key):
        lookup = {(r["sigma"], r["K"], r["method"]): r["rel_error"] for r in records if r["param"] == key}
        rows = [[f"{s:g}", K, f"{inner_errors[(s, K)]:.1e}", *[f"{lookup[(s, K, m)]:.1e}" for m in METHODS]]
                for s in sigmas for K in ks]
        return format_table(["sigma", "K", "|theta_K - theta*|", *METHODS], rows, digits=1)

    print(f"\nRelative error of dPLL/dphi against the closed form ({args.tasks} tasks; phi = truth; "
          "inner GD at step 1/L)\n|theta_K - theta*| is ||theta_K - theta_hat|| / ||theta_hat - phi||")
    print(table("phi"))
    print("\nRelative error of dPLL/d log sigma_m^2 against the closed form")
    print(table("log_sigma2"))

    memory = memory_table(model, jax.tree_util.tree_map(lambda a: a[:25], batch), domain.phi, domain.sigma)
    print("\nCompiled memory of the hypergradient on 25 tasks (XLA temporaries, and temporaries + "
          "arguments + outputs), bytes")
    print(format_table(["K", "implicit temp", "unrolled temp", "implicit total", "unrolled total"],
                       [[K, m["implicit"]["temp_bytes"], m["unrolled"]["temp_bytes"], m["implicit"]["total_bytes"],
                         m["unrolled"]["total_bytes"]] for K, m in memory.items()]))
    print(f"total {time.perf_counter() - t_start:.1f}s")

    payload = {
        "schema": "hiermeta/hypergradient_accuracy/v1",
        "config": {**vars(args), "sigmas": sigmas, "inner_steps": ks, "cg_iterations": CG_ITERATIONS,
                   "methods": METHODS, "inner_lr": {str(s): lr for s, lr in lrs.items()},
                   "phi": "truth", "jax_version": jax.__version__},
        "records": records,
        "inner_error": [{"sigma": s, "K": K, "value": v} for (s, K), v in inner_errors.items()],
        "memory": {str(K): m for K, m in memory.items()},
        "timings_seconds": {"total": time.perf_counter() - t_start},
    }
    path = write_json(out / "hypergradient_accuracy.json", payload)
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(out / 'hypergradient_accuracy.png', records, sigmas, ks)}")
    return payload


def plot(path, records, sigmas, ks):
    plt = pyplot()

    lookup = {(r["sigma"], r["K"], r["method"], r["param"]): max(r["rel_error"], 1e-16) for r in records}
    s_mid = sigmas[-2]  # 3 in the full run: the paper's sigma range
    style = {"CG 10": dict(linestyle="--", marker="x", markersize=9)}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (key, label) in enumerate((("phi", "dPLL/dphi"), ("log_sigma2", "dPLL/d log sigma^2"))):
        ax = axes[0, col]
        for method in METHODS:
            ax.loglog(ks, [lookup[(s_mid, K, method, key)] for K in ks], **{"marker": "o", **style.get(method, {})},
                      label=method)
        ax.set_xlabel("inner steps K")
        ax.set_title(f"{label}, sigma = {s_mid:g}")
        ax = axes[1, col]
        for method in METHODS:
            ax.loglog(sigmas, [lookup[(s, ks[-1], method, key)] for s in sigmas], **{"marker": "o", **style.get(method, {})},
                      label=method)
        ax.set_xlabel("sigma (likelihood curvature relative to the prior grows with sigma^2)")
        ax.set_title(f"{label}, K = {ks[-1]}")
        for ax in axes[:, col]:
            ax.set_ylabel("relative error vs closed form")
            ax.legend(fontsize=8)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
