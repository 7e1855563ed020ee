"""The study the GLMM examples (cbpp.py, epil.py) share: type-II ML by Laplace and quadrature, NUTS,
the PLL learners, and MAP plug-in vs EB posterior vs full posterior on held-out observations.

Held-out protocol: fold f holds out observation ``(t + f) mod N`` of every task t that has it and
keeps at least one other observation, so over ``N`` folds every observation of such a task is
held out exactly once, each fold keeping every covariate level in the support.  Per fold, on the
support observations only:

* type-II ML (Laplace) of phi, sigma, beta; then the held-out observation's predictive under
  (a) the MAP plug-in (each task's mode theta_hat) and (b) the EB posterior of theta (adaptive
  Gauss-Hermite nodes, exact to quadrature accuracy: the random effect is scalar);
* (c) the full posterior: NUTS on the support data with data-scaled priors (``with_priors``);
* the paper's learners on a model without unpooled globals (the examples say which), meta-trained
  by the PLL on random support/query splits of the support data (K SGD steps inside, as the
  paper's algorithm), and their (a) plug-in: each task's exact MAP (Newton) under the learned phi
  and sigma.

Scores per held-out observation: log predictive density, randomised-PIT coverage and the coverage
of the central predictive intervals (50% and 90%).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hiermeta as hm
from hiermeta import marginal
from hiermeta.families import GLMData
from hiermeta.learners import sigma_of
from hiermeta.predictive import score_draws
from _common import MAX_CHAINS, count, format_table, prng_seed, pyplot, save_figure, study_parser, write_json

LEVELS = (0.5, 0.9)


class LearnerSpec(NamedTuple):
    """How the examples build the learners' model: ``build(support, eb_fit) -> (model, support_data)``,
    the support data re-expressed for a model whose theta holds the effects the learners adapt
    (no unpooled globals: learners on main do not learn beta yet), and ``query(data, eb_fit)`` the
    same for the held-out data; ``init`` the starting meta-parameters (pytree)."""

    build: Callable
    query: Callable
    init: Callable
    inner_lr: float
    inner_steps: int


def tasks(data, index):
    return jax.tree_util.tree_map(lambda a: a[np.asarray(index)], data)


def folds(mask: np.ndarray) -> list:
    """``(support_mask, query_mask, query_tasks)`` per fold (see the module docstring)."""
    T, N = mask.shape
    counts = mask.sum(1)
    out = []
    for f in range(N):
        held = np.zeros_like(mask)
        for t in range(T):
            j = (t + f) % N
            if mask[t, j] and counts[t] >= 2:
                held[t, j] = True
        query_tasks = np.flatnonzero(held.any(1))
        out.append((mask & ~held, held, query_tasks))
    return out


def type2_fits(model, data, nodes: int = 25, verbose: bool = True) -> dict:
    """Laplace and AGQ type-II ML on all the data, with timings (a second, warm call timed too)."""
    out = {}
    for approximation, k in (("laplace", None), ("agq", nodes)):
        t0 = time.perf_counter()
        fit = hm.type2_ml(model, data, approximation=approximation, num_nodes=k)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        hm.type2_ml(model, data, approximation=approximation, num_nodes=k, warn=False)
        out[approximation] = (fit, {"first_call_seconds": first, "warm_seconds": time.perf_counter() - t0})
        if verbose:
            print(f"type-II ML ({approximation}{'' if k is None else f', {k} nodes'}): log-likelihood "
                  f"{fit.log_marginal:.5f}, {fit.num_iterations} iterations, converged {fit.converged}, "
                  f"{first:.1f}s (warm {out[approximation][1]['warm_seconds']:.2f}s)")
    return out


def estimates_table(names, fits: dict, nuts=None, references: Optional[dict] = None) -> tuple:
    """Rows (parameter, [reference columns], Laplace (se), AGQ (se), NUTS mean (sd))."""
    headers = ["parameter"] + list(references or {}) + ["Laplace", "(se)", "AGQ", "(se)"]
    if nuts is not None:
        headers += ["NUTS mean", "(sd)", "2.5%", "97.5%"]
    rows = []
    values = {}
    for a, (fit, _) in fits.items():
        point = np.concatenate([fit.phi, fit.extra.get("beta", np.zeros(0)), fit.sigma])
        se = np.concatenate([fit.fixed_effects_se.get("phi", [np.nan]), fit.fixed_effects_se.get("beta", []),
                             [np.nan] * len(fit.sigma)])
        values[a] = (point, se)
    draws = None
    if nuts is not None:
        draws = np.concatenate([nuts.flat("phi"), nuts.flat("beta") if "beta" in nuts.samples else
                                np.zeros((nuts.flat("phi").shape[0], 0)), nuts.flat("sigma")], axis=1)
    for i, name in enumerate(names):
        row = [name] + [ref[i] for ref in (references or {}).values()]
        for a in ("laplace", "agq"):
            row += [values[a][0][i], values[a][1][i]]
        if draws is not None:
            row += [draws[:, i].mean(), draws[:, i].std(), *np.quantile(draws[:, i], [0.025, 0.975])]
        rows.append(row)
    return headers, rows, draws


def run_nuts(model, data, key, warmup, samples, chains):
    with_priors = hm.with_priors(model, data)
    t0 = time.perf_counter()
    run = hm.run_nuts(with_priors, data, key, num_warmup=warmup, num_samples=samples, num_chains=chains,
                      noncentred=True, progress_bar=False)
    return run, time.perf_counter() - t0, hm.prior_summary(with_priors)


def random_split(key, support: GLMData) -> hm.TaskBatch:
    """One observed support observation of every task becomes its query; the rest its support."""
    u = jax.random.uniform(key, support.mask.shape)
    u = jnp.where(support.mask, u, -1.0)
    val = jax.nn.one_hot(jnp.argmax(u, axis=1), support.mask.shape[1], dtype=bool) & support.mask
    return hm.TaskBatch(support._replace(mask=support.mask & ~val), support._replace(mask=val))


def train_learners(spec: LearnerSpec, model, support: GLMData, steps: int, key) -> dict:
    """(M-)Shrinkage (Eq. 4) and (M-)sigma-iMAML (exact hypergradient), one sigma per module, meta-trained
    by the PLL on random splits of the tasks holding two or more support observations (full batch)."""
    trainable = np.flatnonzero(np.asarray(support.mask).sum(1) >= 2)
    pool = tasks(support, trainable)
    sample = lambda k: random_split(k, pool)
    out = {}
    prefix = "M-" if model.partition.num_modules > 1 else ""  # one module: M-Shrinkage is Shrinkage
    for name, make in ((f"{prefix}Shrinkage", hm.m_shrinkage), (f"{prefix}sigma-iMAML", hm.m_sigma_imaml)):
        learner = make(model, inner_optimizer=optax.sgd(spec.inner_lr), inner_steps=spec.inner_steps,
                       outer_optimizer=optax.adam(optax.cosine_decay_schedule(0.05, steps, alpha=0.1)))
        state = learner.init(key, spec.init(model, support))
        t0 = time.perf_counter()
        status, history = "ok", {}
        try:  # an inner solve that stops short of its tolerance warns (ConvergenceWarning) and is counted below
            state, history = hm.fit(learner, state, sample, steps, data_key=jax.random.fold_in(key, 1), progress=False)
        except hm.errors.MetaTrainingError as err:  # keep the last good state, say so
            state, status, history = err.state, str(err), err.history or {}
        unconverged = np.asarray(history.get("num_unconverged", np.zeros(0)))
        out[name] = {"learner": learner, "state": state, "seconds": time.perf_counter() - t0, "status": status,
                     "sigma": np.asarray(sigma_of(state.params, model.partition.num_modules)),
                     "phi": np.asarray(state.params["phi"]), "skipped": int(state.num_skipped),
                     "unconverged_steps": int(np.sum(unconverged > 0)), "meta_steps": int(unconverged.size)}
    return out


def heldout_study(model, data: GLMData, spec: LearnerSpec, *, num_folds: Optional[int], warmup: int, samples: int,
                  chains: int, meta_steps: int, quad_nodes: int = 32, seed: int = 0, log=print) -> dict:
    """Per fold: EB (a) and (b), NUTS (c), the learners' (a); scores per held-out observation."""
    all_folds = folds(np.asarray(data.mask))[: num_folds or None]
    per_method: dict = {}
    details = []
    key = jax.random.PRNGKey(seed)
    t_start = time.perf_counter()
    for f, (support_mask, query_mask, query_tasks) in enumerate(all_folds):
        support = data._replace(mask=jnp.asarray(support_mask))
        query = tasks(data._replace(mask=jnp.asarray(query_mask)), query_tasks)
        k_nuts, k_learn, k_score = jax.random.split(jax.random.fold_in(key, f), 3)
        fold = {"num_query": int(query_mask.sum())}
        # ---- empirical Bayes on the support
        eb = hm.type2_ml(model, support, approximation="laplace", warn=False)
        beta = {"beta": jnp.asarray(eb.extra["beta"])} if "beta" in eb.extra else {}
        info = marginal.compiled_marginal_info(model)(jnp.asarray(eb.phi), jnp.asarray(eb.sigma), support, beta)
        mode = np.asarray(info.mode)[query_tasks][:, None, :]
        scores = {("type-II ML (Laplace)", "(a) MAP plug-in"): score_draws(model, mode, query, extra=beta,
                                                                           key=k_score)}
        nodes, log_w = marginal.quadrature_posterior(model, eb.phi, eb.sigma, support, beta, num_nodes=quad_nodes)
        scores[("type-II ML (Laplace)", "(b) EB posterior")] = score_draws(
            model, np.asarray(nodes)[query_tasks], query, np.asarray(log_w)[query_tasks], extra=beta, key=k_score)
        fold["type2_ml"] = {"phi": eb.phi, "sigma": eb.sigma, "beta": eb.extra.get("beta"), "converged": eb.converged}
        # ---- full posterior
        run, seconds, _ = run_nuts(model, support, k_nuts, warmup, samples, chains)
        theta = run.samples["theta"].reshape((-1,) + run.samples["theta"].shape[2:])  # (S, T, P)
        draws = np.swapaxes(theta, 0, 1)[query_tasks]
        extra = {"beta": run.flat("beta")} if "beta" in run.samples else {}
        scores[("NUTS", "(c) full posterior")] = score_draws(model, draws, query, extra=extra or None, key=k_score)
        fold["nuts"] = {"seconds": seconds, "num_divergences": run.num_divergences,
                        "max_r_hat": run.diagnostics["max_r_hat"], "min_ess": run.diagnostics["min_ess"]}
        # ---- the paper's learners on the modular model
        learn_model, learn_support = spec.build(support, eb)
        learn_query = spec.query(query, eb)
        trained = train_learners(spec, learn_model, learn_support, meta_steps, k_learn)
        fold["learners"] = {}
        for name, t in trained.items():
            # the MAP plug-in under the learned phi, sigma: each task's exact mode (Newton), so the
            # score measures the learned hyperparameters, not how far K SGD steps got
            learned = marginal.compiled_marginal_info(learn_model)(
                jnp.asarray(t["phi"]), jnp.asarray(t["sigma"]), tasks(learn_support, query_tasks), {})
            scores[(name, "(a) MAP plug-in")] = score_draws(learn_model, np.asarray(learned.mode)[:, None],
                                                            learn_query, key=k_score)
            fold["learners"][name] = {k: t[k] for k in ("sigma", "phi", "seconds", "status", "skipped",
                                                        "unconverged_steps", "meta_steps")}
        for k, s in scores.items():
            per_method.setdefault(k, []).append(s)
        details.append(fold)
        log(f"[{time.perf_counter() - t_start:6.1f}s] fold {f + 1}/{len(all_folds)}: {fold['num_query']} held-out "
            f"observations; EB sigma {np.round(eb.sigma, 3)}; NUTS {seconds:.1f}s, {run.num_divergences} divergences; "
            + "; ".join(f"{n} sigma {np.round(t['sigma'], 3)} (inner solve short of its tolerance in "
                        f"{t['unconverged_steps']} of {t['meta_steps']} meta-steps)" for n, t in trained.items()))
    return {"scores": per_method, "folds": details}


def score_rows(per_method: dict, reference=("NUTS", "(c) full posterior")) -> tuple:
    """Rows: method, theta, lpd per held-out observation (sem), paired difference to ``reference``
    (sem), PIT coverage and interval coverage at 50% and 90%."""
    pooled = {}
    for key, runs in per_method.items():
        lpd = np.concatenate([s.log_pred for s in runs])
        n = np.concatenate([s.num_obs for s in runs])
        pit = np.concatenate([s.pit[np.isfinite(s.pit)] for s in runs])
        below = np.concatenate([s.cdf_below[np.isfinite(s.cdf_below)] for s in runs])
        at = np.concatenate([s.cdf_at[np.isfinite(s.cdf_at)] for s in runs])
        pooled[key] = {"lpd_per_task": lpd, "num_obs": n, "pit": pit, "cdf_below": below, "cdf_at": at}
    ref = pooled[reference]["lpd_per_task"] / pooled[reference]["num_obs"]
    headers = ["method", "theta", "lpd/obs", "sem", "minus full", "sem", "pit50", "pit90", "int50", "int90"]
    rows, summary = [], {}
    for (method, level), p in pooled.items():
        per_obs = p["lpd_per_task"] / p["num_obs"]
        diff = per_obs - ref
        sem = lambda x: float(x.std(ddof=1) / np.sqrt(len(x)))
        cov = hm.predictive.coverage(p["pit"], LEVELS)
        icov = hm.predictive.interval_coverage(p["cdf_below"], p["cdf_at"], LEVELS)
        rows.append([method, level, per_obs.mean(), sem(per_obs), diff.mean(), sem(diff), *cov, *icov])
        summary[f"{method} / {level}"] = {"lpd_per_obs": float(per_obs.mean()), "lpd_sem": sem(per_obs),
                                          "minus_full_posterior": float(diff.mean()), "minus_full_sem": sem(diff),
                                          "pit_coverage": dict(zip(map(str, LEVELS), cov)),
                                          "interval_coverage": dict(zip(map(str, LEVELS), icov)),
                                          "num_heldout": int(p["num_obs"].sum())}
    return headers, rows, summary


def print_scores(per_method: dict) -> dict:
    headers, rows, summary = score_rows(per_method)
    print(format_table(headers, rows, 4))
    return summary


def plot(path, title, names, fits, draws, references, summary):
    plt = pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.8))
    y = np.arange(len(names))
    offsets = np.linspace(-0.25, 0.25, 2 + len(references) + (draws is not None))
    i = 0
    for label, ref in references.items():
        ax0.plot(ref, y + offsets[i], "s", label=label, color="0.4")
        i += 1
    for a, (fit, _) in fits.items():
        point = np.concatenate([fit.phi, fit.extra.get("beta", np.zeros(0)), fit.sigma])
        se = np.concatenate([fit.fixed_effects_se.get("phi", [np.nan]), fit.fixed_effects_se.get("beta", []),
                             [np.nan] * len(fit.sigma)])
        ax0.errorbar(point, y + offsets[i], xerr=1.96 * np.nan_to_num(se), fmt="o", capsize=2,
                     label=f"type-II ML ({a}) +- 1.96 se")
        i += 1
    if draws is not None:
        lo, hi = np.quantile(draws, [0.025, 0.975], axis=0)
        mean = draws.mean(0)
        ax0.errorbar(mean, y + offsets[i], xerr=[mean - lo, hi - mean], fmt="D", capsize=2,
                     label="NUTS mean, 95% interval")
    ax0.set_yticks(y, names)
    ax0.invert_yaxis()
    ax0.axvline(0, color="k", linewidth=0.5)
    ax0.set_title(f"{title}: estimates (link scale)")
    ax0.legend(fontsize=7)
    labels = list(summary)
    means = np.array([summary[k]["minus_full_posterior"] for k in labels])
    sems = np.array([summary[k]["minus_full_sem"] for k in labels])
    ax1.errorbar(means, np.arange(len(labels)), xerr=sems, fmt="o", capsize=3)
    ax1.axvline(0, color="k", linewidth=0.8)
    ax1.set_yticks(np.arange(len(labels)), labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("held-out lpd per observation minus the full posterior's (paired, +- sem)")
    ax1.set_title("MAP plug-in vs EB posterior vs full posterior")
    return save_figure(fig, path)


# ---------------------------------------------------------------------------- the script both examples run


def build_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The command line of ``examples/NAME.py`` (cbpp, epil)."""
    p = study_parser(description)
    p.add_argument("--quick", action="store_true", help="one fold, fewer draws and meta-steps (smoke run)")
    p.add_argument("--out", default="results", help=f"output directory for {name}.json and {name}.png")
    p.add_argument("--seed", type=prng_seed, default=0, help="PRNG seed")
    p.add_argument("--folds", type=count(1), help="held-out folds to run (default all; quick 1)")
    p.add_argument("--chains", type=count(1, MAX_CHAINS), default=4, help="NUTS chains")
    p.add_argument("--warmup", type=count(1), help="NUTS warm-up per chain (default 1000; quick 300)")
    p.add_argument("--samples", type=count(1), help="NUTS draws per chain (default 1000; quick 300)")
    p.add_argument("--meta-steps", type=count(1), help="meta-steps of the PLL learners (default 1500; quick 300)")
    p.add_argument("--no-plot", action="store_true", help="no figure")
    return p


def parse_args(name: str, description: str, argv=None):
    return build_parser(name, description).parse_args(argv)


def main(name: str, description: str, load: Callable, names, spec: LearnerSpec, argv=None, *,
         references: Optional[dict] = None, published_loglik: Optional[dict] = None, groups: str = "groups") -> dict:
    """Type-II ML (Laplace, AGQ), NUTS and the held-out study on one data set; prints the tables and
    writes ``NAME.json`` and ``NAME.png`` to ``--out``."""
    args = parse_args(name, description, argv)
    hm.enable_compilation_cache()
    warmup = args.warmup or (300 if args.quick else 1000)
    samples = args.samples or (300 if args.quick else 1000)
    meta_steps = args.meta_steps or (300 if args.quick else 1500)
    num_folds = args.folds or (1 if args.quick else None)
    out = Path(args.out)
    t_start = time.perf_counter()
    model, data = load()

    fits = type2_fits(model, data)
    nuts, nuts_seconds, priors = run_nuts(model, data, jax.random.PRNGKey(args.seed), warmup, samples, args.chains)
    print(f"NUTS on all {groups}: {args.chains} x {samples} draws, {nuts.num_divergences} divergences, max r-hat "
          f"{nuts.diagnostics['max_r_hat']:.3f}, min ESS {nuts.diagnostics['min_ess']:.0f}, {nuts_seconds:.1f}s\n"
          f"priors (data-scaled):\n{priors}")
    headers, rows, draws = estimates_table(names, fits, nuts, references)
    print("\nEstimates (link scale)" + (": published, " if references else ": ")
          + "type-II ML (standard errors from the observed information), NUTS posterior")
    print(format_table(headers, rows, 4))
    lik_rows = [[label, value] for label, value in (published_loglik or {}).items()]
    lik_rows += [[f"hiermeta ({a})", f.log_marginal] for a, (f, _) in fits.items()]
    print("\nMaximised log-likelihood")
    print(format_table(["fit", "log-likelihood"], lik_rows, 5))

    N = int(np.shape(data.mask)[1])
    print(f"\nHeld-out observations ({f'all {N} folds' if num_folds is None else f'{num_folds} fold(s)'})")
    result = heldout_study(model, data, spec, num_folds=num_folds, warmup=warmup, samples=samples,
                           chains=args.chains, meta_steps=meta_steps, seed=args.seed)
    print()
    summary = print_scores(result["scores"])
    total = time.perf_counter() - t_start
    print(f"total {total:.1f}s")
    payload = {
        "schema": f"hiermeta/{name}/v1",
        "config": {**vars(args), "warmup": warmup, "samples": samples, "meta_steps": meta_steps,
                   "jax_version": jax.__version__},
        "type2_ml": {a: {"fit": f._asdict(), **timing} for a, (f, timing) in fits.items()},
        "published": {"estimates": references or {}, "log_likelihood": published_loglik or {}},
        "estimates": {"headers": headers, "rows": rows},
        "nuts": {"seconds": nuts_seconds, "diagnostics": dict(nuts.diagnostics), "priors": priors,
                 "num_divergences": nuts.num_divergences},
        "heldout": {"summary": summary, "folds": result["folds"]},
        "timings_seconds": {"total": total},
    }
    path = write_json(out / f"{name}.json", payload)
    print(f"wrote {path}")
    if not args.no_plot:
        first = {k: v for k, v in list((references or {}).items())[:1]}
        print(f"wrote {plot(out / f'{name}.png', name, names, fits, draws, first, summary)}")
    return payload
