"""MAP plug-in versus the full posterior, with few training tasks.

For T = 8, 32, 128 training tasks (each with support and query data) and fresh held-out tasks,
a new task's query data is predicted from its support under three levels of approximation:

    (a) empirical-Bayes phi, sigma + the MAP theta (what the meta-learners do)
    (b) empirical-Bayes phi, sigma + the posterior of theta (exact on the linear domain;
        Laplace and NUTS on a non-linear one)
    (c) the full posterior of phi, sigma, theta: NUTS on the training tasks, then per posterior
        draw the new task's theta given its support, weighted by that support's evidence
        (exact per draw on the linear domain; on a non-linear one, importance sampling with the
        widened Laplace fit as proposal, consistent for the exact full posterior)

with two empirical-Bayes estimates, M-Shrinkage (Algorithm 1 with Eq. 4, the paper's learner)
and exact type-II ML (linear domain only), plus the oracle (true phi, sigma).  Scores over the
held-out tasks: the log predictive density of the query data per observation (as the regret
against the oracle's exact posterior predictive, paired over tasks) and the coverage of central
50% and 90% predictive intervals of every query scalar.  Repeated over seeds (new training and
held-out tasks each time).

    python examples/map_vs_posterior.py                   # linear and swirl (hours on 2 cores: the swirl's
                                                          # NUTS runs and lattices dominate)
    python examples/map_vs_posterior.py --quick           # smoke run
    python examples/map_vs_posterior.py --domains linear  # one domain
    python examples/map_vs_posterior.py --domains swirl --seeds 1 --warmup 500 --samples 500  # README's swirl table
"""

from __future__ import annotations

import importlib.util
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
from hiermeta import posterior as hp  # noqa: E402
from hiermeta.laplace import laplace  # noqa: E402
from hiermeta.learners import sigma_of  # noqa: E402
from hiermeta.predictive import (  # noqa: E402
    PredictiveScores,
    full_bayes_importance_draws,
    gaussian_draws,
    score_draws,
    score_gaussian_mixture,
)
from hiermeta.tasks import num_tasks  # noqa: E402
from hiermeta.models import linear  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, also when loaded from elsewhere
from _common import MAX_CHAINS, count, count_list, format_table, positive_float, pyplot, save_figure, study_parser, write_json  # noqa: E402

LEVELS = (0.5, 0.9)


def build_parser():
    p = study_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: T = 8, 32, one seed, short chains")
    p.add_argument("--out", default="results", help="output directory for map_vs_posterior.json and .png")
    p.add_argument("--domains", default="linear,swirl", help="comma-separated: linear, swirl")
    p.add_argument("--tasks", type=count_list(2), help="training-task counts (default 8,32,128; quick 8,32)")
    p.add_argument("--seeds", type=count(1), help="repetitions (default 3, quick 1)")
    p.add_argument("--test-tasks", type=count(2), help="held-out tasks per repetition (default 500, quick 200)")
    p.add_argument("--meta-steps", type=count(1), help="M-Shrinkage meta-iterations (default 2000, quick 300)")
    p.add_argument("--chains", type=count(1, MAX_CHAINS), default=4, help="NUTS chains")
    p.add_argument("--warmup", type=count(0), help="NUTS warm-up per chain (default 1000, quick 400)")
    p.add_argument("--samples", type=count(1), help="NUTS draws per chain (default 1000, quick 400)")
    p.add_argument("--hyper-draws", type=count(1), default=1000, help="posterior draws of (phi, sigma) used for (c)")
    p.add_argument("--parametrisation", choices=["auto", "centred", "noncentred"], default="auto",
                   help="NUTS parametrisation of theta (auto: non-centred for T <= 32)")
    p.add_argument("--phi-scale", type=positive_float, default=10.0, help="prior phi ~ N(0, scale^2) for NUTS")
    p.add_argument("--sigma-scale", type=positive_float, default=5.0, help="prior sigma ~ HalfCauchy(scale) for NUTS")
    p.add_argument("--is-draws", type=count(1), default=1000,
                   help="importance draws per task for (b) IS (a non-linear domain without an exact predictive)")
    p.add_argument("--nuts-b", action="store_true",
                   help="also (b) by NUTS over the held-out tasks (slow on the swirl: long trees on 2000 dims)")
    p.add_argument("--generic-linear", action="store_true",
                   help="score the linear domain with the non-linear machinery (Laplace, NUTS) as a check")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plot", action="store_true", help="write no figure")
    return p


def parse_args(argv=None):
    p = build_parser()
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- domains


def linear_arm():
    domain = linear.paper_domain()
    return {
        "name": "linear",
        "exact": True,
        "model": linear.make_model(domain.num_params),
        "truth": (domain.phi, domain.sigma),
        "sample": lambda key, T: linear.sample_tasks(domain, key, T)[1],
        "merge": linear.merge_splits,
        "learner": dict(inner_optimizer=optax.sgd(0.3), inner_steps=200, init_sigma=1.0),
        "outer_lr": 0.03,
    }


def swirl_arm():
    """The non-linear swirl domain (models/swirl.py), or None when it is not installed."""
    if importlib.util.find_spec("hiermeta.models.swirl") is None:
        return None
    from hiermeta.models import swirl

    domain = swirl.paper_domain()
    return {
        "name": "swirl",
        "exact": False,
        "model": swirl.make_model(domain),
        "truth": (np.asarray(domain.phi, float), np.asarray(domain.sigma, float)),
        "sample": lambda key, T: swirl.sample_tasks(domain, key, T)[1],
        "merge": linear.merge_splits,  # concatenates support and query of any GaussianData
        "learner": dict(inner_optimizer=optax.sgd(0.3), inner_steps=200, init_sigma=1.0),
        "outer_lr": 0.03,
        # the exact predictive of a new task (a lattice per coordinate pair): level (b) exactly, and (c)
        # as the evidence-weighted mixture over NUTS draws of (phi, sigma), as on the linear domain
        "exact_predictive": lambda support, query, phi, sigma, grid=257: swirl.grid_predictive(
            support, query, phi, sigma, grid=grid),
        # one lattice per hyperposterior draw and held-out task is the cost of level (c) here: a coarser
        # lattice (129: log predictive within 5e-4 per observation of 513's) and 64 draws
        "grid_c": 129,
        "max_test_tasks": 200,
        "max_hyper_draws": 64,
    }


# ---------------------------------------------------------------------------- estimates


def fit_m_shrinkage(arm, train, meta_steps, key, progress):
    model, T = arm["model"], num_tasks(train.train)
    schedule = optax.cosine_decay_schedule(arm["outer_lr"], meta_steps, alpha=0.1)
    learner = hm.m_shrinkage(model, outer_optimizer=optax.adam(schedule), **arm["learner"])
    state = learner.init(key, jnp.zeros(model.partition.num_params))
    try:
        state, _ = hm.fit(learner, state, hm.sample_from(train, min(T, 32)), meta_steps,
                          data_key=jax.random.fold_in(key, 1), progress=progress, description=f"M-Shrinkage T={T}")
    except hm.errors.MetaTrainingError as err:  # keep the last good state, and say so
        print(f"  M-Shrinkage stopped early at T={T}: {err}")
        state = err.state
    phi = np.asarray(state.params["phi"])
    sigma = np.asarray(sigma_of(state.params, model.partition.num_modules))
    return phi, sigma, int(state.num_skipped)


def nuts_hyper_draws(arm, train, key, args, progress):
    model = hp.with_priors(arm["model"], phi_scale=args.phi_scale, sigma_scale=args.sigma_scale)
    T = num_tasks(train.train)
    nc = args.parametrisation == "noncentred" or (args.parametrisation == "auto" and T <= 32)
    t0 = time.perf_counter()
    result = hp.run_nuts(model, arm["merge"](train), key, num_warmup=args.warmup, num_samples=args.samples,
                         num_chains=args.chains, noncentred=nc, progress_bar=progress)
    table = hp.summary(result, ["sigma"])
    phi, sigma = result.flat("phi"), result.flat("sigma")
    num = min(args.hyper_draws, arm.get("max_hyper_draws", 10**9), phi.shape[0])
    idx = np.linspace(0, phi.shape[0] - 1, num).astype(int)
    info = {"parametrisation": "noncentred" if nc else "centred", "divergences": result.num_divergences,
            "max_r_hat": float(table["r_hat"].max()), "min_ess_bulk": float(table["ess_bulk"].min()),
            "seconds": time.perf_counter() - t0, "sigma_mean": sigma.mean(0), "sigma_median": np.median(sigma, 0),
            "sigma_q16": np.percentile(sigma, 16, 0), "sigma_q84": np.percentile(sigma, 84, 0)}
    return phi[idx], sigma[idx], info


# ---------------------------------------------------------------------------- the three levels


def exact_levels(model, phi, sigma, test):
    """(a) and (b) on the linear domain at (phi, sigma): the exact MAP plug-in and the exact predictive."""
    sd = model.partition.expand(jnp.asarray(sigma))
    mean, _ = linear.posterior(test.train, phi, sd)
    a = score_draws(model, mean[:, None], test.val)
    log_pred, _, m, s = linear.query_predictive(test.train, test.val, phi, sd)
    b = score_gaussian_mixture(log_pred[:, None], m[:, None], s[:, None], test.val)
    return {"(a) MAP plug-in": a, "(b) exact posterior": b}


def exact_full_bayes(model, phis, sigmas, test):
    """(c) on the linear domain: sum_h w_h p(val | train, phi_h, sigma_h), w_h propto p(train | phi_h, sigma_h)."""
    def one(args):
        phi, sigma = args
        return linear.query_predictive(test.train, test.val, phi, model.partition.expand(sigma))

    log_pred, log_ev, m, s = jax.lax.map(one, (jnp.asarray(phis), jnp.asarray(sigmas)))
    move = lambda a: jnp.moveaxis(a, 0, 1)
    score = score_gaussian_mixture(move(log_pred), move(m), move(s), test.val, log_weights=move(log_ev))
    w = jax.nn.softmax(move(log_ev), axis=-1)
    ess = 1.0 / jnp.sum(w**2, axis=-1)
    return score, (float(jnp.min(ess)), float(jnp.median(ess)))


def generic_levels(arm, phi, sigma, test, key, args, progress):
    """(a) MAP plug-in, (b) Laplace and (b) the exact posterior of theta for any domain at (phi, sigma).

    The exact level is the domain's own ``exact_predictive`` when it has one (the swirl's lattice);
    otherwise "(b) IS": self-normalised importance sampling per task with the widened Laplace fit as
    proposal (``--is-draws`` draws; consistent, but its effective sample size is reported because
    a unimodal proposal can miss modes).  ``--nuts-b`` adds "(b) NUTS" over the held-out tasks'
    theta (slow: one joint run over every held-out task).
    """
    model = arm["model"]
    lap = laplace(model, jnp.asarray(phi), jnp.asarray(sigma), test.train)
    out = {"(a) MAP plug-in": score_draws(model, lap.mean[:, None], test.val)}
    out["(b) Laplace"] = score_draws(model, gaussian_draws(key, lap.mean, lap.cov, 1000), test.val)
    notes = {"laplace_converged": float(np.mean(lap.converged))}
    if "exact_predictive" in arm:
        pred = arm["exact_predictive"](test.train, test.val, jnp.asarray(phi), jnp.asarray(sigma))
        out["(b) exact posterior"] = PredictiveScores(np.asarray(pred.log_pred), np.asarray(pred.pit),
                                                      np.asarray(model.likelihood.num_observations(test.val)))
    else:
        draws, log_w, ess = full_bayes_importance_draws(model, jnp.asarray(phi)[None], jnp.asarray(sigma)[None],
                                                        test.train, jax.random.fold_in(key, 2),
                                                        draws_per_hyper=args.is_draws)
        out["(b) IS"] = score_draws(model, draws, test.val, log_weights=log_w)
        notes.update(is_min_ess=float(jnp.min(ess)), is_median_ess=float(jnp.median(ess)))
    if args.nuts_b:
        res = hp.run_nuts(model, test.train, jax.random.fold_in(key, 1), num_warmup=args.warmup,
                          num_samples=args.samples, num_chains=args.chains, fixed={"phi": phi, "sigma": sigma},
                          progress_bar=progress)
        draws = np.moveaxis(res.samples["theta"].reshape((-1,) + res.samples["theta"].shape[2:]), 0, 1)
        out["(b) NUTS"] = score_draws(model, draws, test.val)
        notes["nuts_b_divergences"] = res.num_divergences
    return out, notes


def exact_predictive_full_bayes(arm, phis, sigmas, test):
    """(c) from a domain's exact predictive: ``sum_h w_h p(val | train, h)``, ``w_h`` propto the support's
    evidence ``p(train | phi_h, sigma_h)``, per task (PIT mixed with the same weights)."""
    def one(args):
        pred = arm["exact_predictive"](test.train, test.val, *args, grid=arm.get("grid_c", 257))
        return pred.log_pred, pred.log_evidence, pred.pit

    log_pred, log_ev, pit = jax.lax.map(one, (jnp.asarray(phis), jnp.asarray(sigmas)))  # (H, T), (H, T), (H, T, N, D)
    w = jax.nn.softmax(log_ev, axis=0)
    mixed = jax.scipy.special.logsumexp(log_pred + jnp.log(w), axis=0)
    scores = PredictiveScores(np.asarray(mixed), np.asarray(jnp.einsum("ht,htnd->tnd", w, pit)),
                              np.asarray(arm["model"].likelihood.num_observations(test.val)))
    ess = 1.0 / jnp.sum(w**2, axis=0)
    return scores, (float(jnp.min(ess)), float(jnp.median(ess)))


# ---------------------------------------------------------------------------- one repetition


def run_one(arm, T, seed, args, progress):
    model = arm["model"]
    key = jax.random.fold_in(jax.random.PRNGKey(seed), T)
    k_train, k_test, k_learn, k_nuts, k_score = jax.random.split(key, 5)
    train, test = arm["sample"](k_train, T), arm["sample"](k_test, min(args.test_tasks, arm.get("max_test_tasks", 10**9)))
    estimates = {}
    phi, sigma, skipped = fit_m_shrinkage(arm, train, args.meta_steps, k_learn, progress)
    estimates["M-Shrinkage"] = {"phi": phi, "sigma": sigma, "skipped": skipped}
    if arm["name"].startswith("linear"):
        t2 = linear.fit_type2_ml(arm["merge"](train), model, sigma0=np.ones(model.partition.num_modules))
        estimates["Type-II ML"] = {"phi": t2.phi, "sigma": np.maximum(t2.sigma, 1e-8), "converged": t2.converged}
    estimates["Oracle"] = {"phi": np.asarray(arm["truth"][0], float), "sigma": np.asarray(arm["truth"][1], float)}

    scores, notes = {}, {}
    for name, est in estimates.items():
        if arm["exact"]:
            levels = exact_levels(model, est["phi"], est["sigma"], test)
        else:
            levels, notes[name] = generic_levels(arm, est["phi"], est["sigma"], test, k_score, args, progress)
        for level, score in levels.items():
            scores[(name, level)] = score
    phis, sigmas, info = nuts_hyper_draws(arm, train, k_nuts, args, progress)
    info["importance_draws"] = phis.shape[0] * (1 if arm["exact"] or "exact_predictive" in arm else 8)
    if "exact_predictive" in arm:
        scores[("NUTS", "(c) full posterior")], ess = exact_predictive_full_bayes(arm, phis, sigmas, test)
        info["min_importance_ess"], info["median_importance_ess"] = ess
    elif arm["exact"]:
        scores[("NUTS", "(c) full posterior")], ess = exact_full_bayes(model, phis, sigmas, test)
        info["min_importance_ess"], info["median_importance_ess"] = ess
    else:
        draws, log_w, ess = full_bayes_importance_draws(model, phis, sigmas, test.train, k_score, draws_per_hyper=8)
        scores[("NUTS", "(c) full posterior")] = score_draws(model, draws, test.val, log_weights=log_w)
        info["min_importance_ess"], info["median_importance_ess"] = float(jnp.min(ess)), float(jnp.median(ess))
    estimates["NUTS"] = {"sigma": info["sigma_median"], "nuts": info}
    return estimates, scores, notes


def summarise(arm_name, T_values, runs, reference):
    """Rows per (T, estimate, level): regret vs the reference (paired, pooled over seeds), coverage."""
    rows, table = [], {}
    for T in T_values:
        keys = runs[T][0][1].keys()
        for key in keys:
            per_obs = np.concatenate([r[1][key].per_obs() for r in runs[T]])
            ref = np.concatenate([r[1][reference].per_obs() for r in runs[T]])
            diff = ref - per_obs
            pit = np.concatenate([r[1][key].pit.ravel() for r in runs[T]])
            cov = hm.predictive.coverage(pit, LEVELS)
            entry = {"lpd_per_obs": float(per_obs.mean()), "regret": float(diff.mean()),
                     "regret_sem": float(diff.std(ddof=1) / np.sqrt(diff.size)),
                     "coverage": dict(zip(map(str, LEVELS), cov)),
                     "per_seed_lpd": [float(r[1][key].per_obs().mean()) for r in runs[T]]}
            table[f"T={T}|{key[0]}|{key[1]}"] = entry
            rows.append([T, key[0], key[1], entry["lpd_per_obs"], entry["regret"], f"+-{entry['regret_sem']:.4f}",
                         *cov])
    return rows, table


def main(argv=None):
    args = parse_args(argv)
    hm.enable_compilation_cache()
    pick = lambda value, quick, full: value if value is not None else (quick if args.quick else full)
    args.seeds = pick(args.seeds, 1, 3)
    args.test_tasks = pick(args.test_tasks, 200, 500)
    args.meta_steps = pick(args.meta_steps, 300, 2000)
    args.warmup = pick(args.warmup, 400, 1000)
    args.samples = pick(args.samples, 400, 1000)
    T_values = pick(args.tasks, [8, 32], [8, 32, 128])
    progress = not args.no_progress
    out = Path(args.out)
    t_start = time.perf_counter()

    arms = []
    for name in args.domains.split(","):
        arm = {"linear": linear_arm, "swirl": swirl_arm}[name.strip()]()
        if arm is not None and arm["name"] == "linear" and args.generic_linear:
            arm = {**arm, "exact": False, "name": "linear (generic machinery)", "max_test_tasks": 200,
                   "max_hyper_draws": 200}
        if arm is None:
            print(f"NOTE: the {name} domain (models/{name}.py) is not available on this branch; its arm is skipped.")
            continue
        arms.append(arm)

    payload = {"schema": "hiermeta/map_vs_posterior/v1",
               "config": {**vars(args), "tasks": T_values, "levels": LEVELS, "jax_version": jax.__version__},
               "domains": {}}
    for arm in arms:
        runs = {}
        for T in T_values:
            runs[T] = []
            for seed in range(args.seeds):
                estimates, scores, notes = run_one(arm, T, seed, args, progress)
                runs[T].append((estimates, scores, notes))
                nuts = estimates["NUTS"]["nuts"]
                ess = (f", importance ESS min {nuts['min_importance_ess']:.0f} median {nuts['median_importance_ess']:.0f}"
                       f" of {nuts['importance_draws']}" if "min_importance_ess" in nuts else "")
                print(f"[{time.perf_counter() - t_start:7.1f}s] {arm['name']} T={T} seed={seed}: NUTS "
                      f"{nuts['parametrisation']}, {nuts['divergences']} divergences, max r_hat "
                      f"{nuts['max_r_hat']:.3f}, {nuts['seconds']:.0f}s{ess}; M-Shrinkage skipped "
                      f"{estimates['M-Shrinkage']['skipped']} meta-steps")
        reference = ("Oracle", "(b) exact posterior" if arm["exact"] or "exact_predictive" in arm else "(b) IS")
        rows, table = summarise(arm["name"], T_values, runs, reference)
        n_test = min(args.test_tasks, arm.get("max_test_tasks", 10**9))
        print(f"\n{arm['name']} domain: {n_test} held-out tasks x {args.seeds} seed(s). regret = "
              f"lpd of {reference[0]} {reference[1]} minus the method's, per query observation (paired; +- sem)")
        print(format_table(["T", "phi, sigma from", "theta", "lpd/obs", "regret", "sem",
                            *[f"cov{int(q * 100)}" for q in LEVELS]], rows, 4))

        print(f"\n{arm['name']} domain: sigma per module (seed 0; NUTS: posterior median [16%, 84%])")
        truth = arm["truth"][1]
        srows = [["truth", "", *truth]]
        for T in T_values:
            est = runs[T][0][0]
            for name in est:
                if name == "Oracle":
                    continue
                srows.append([name, T, *np.broadcast_to(est[name]["sigma"], truth.shape)])
            n = est["NUTS"]["nuts"]
            srows.append(["  NUTS 16-84%", T, *[f"{lo:.1f}-{hi:.1f}" for lo, hi in zip(n["sigma_q16"], n["sigma_q84"])]])
        print(format_table(["sigma from", "T", *[f"s{m + 1}" for m in range(len(truth))]], srows, 2))
        payload["domains"][arm["name"]] = {
            "truth": {"phi": arm["truth"][0], "sigma": truth},
            "reference": list(reference),
            "scores": table,
            "estimates": {str(T): [{k: v for k, v in r[0].items()} for r in runs[T]] for T in T_values},
            "notes": {str(T): [r[2] for r in runs[T]] for T in T_values},
        }
    payload["timings_seconds"] = {"total": time.perf_counter() - t_start}
    path = write_json(out / "map_vs_posterior.json", payload)
    print(f"\ntotal {time.perf_counter() - t_start:.1f}s\nwrote {path}")
    if not args.no_plot and arms:
        print(f"wrote {plot(out / 'map_vs_posterior.png', payload, T_values)}")
    return payload


def plot(path, payload, T_values):
    plt = pyplot()

    domains = payload["domains"]
    fig, axes = plt.subplots(len(domains), 2, figsize=(12, 4.2 * len(domains)), squeeze=False)
    for row, (dname, d) in enumerate(domains.items()):
        ax0, ax1 = axes[row]
        methods = sorted({k.split("|", 1)[1] for k in d["scores"]})
        for i, method in enumerate(methods):
            entries = [d["scores"][f"T={T}|{method}"] for T in T_values]
            x = np.asarray(T_values) * (1 + 0.04 * (i - len(methods) / 2))
            ax0.errorbar(x, [e["regret"] for e in entries], yerr=[e["regret_sem"] for e in entries], marker="o",
                         capsize=3, label=method.replace("|", ": "))
            ax1.plot(x, [e["coverage"]["0.9"] for e in entries], marker="o", label=method.replace("|", ": "))
        ax0.axhline(0, color="k", linewidth=0.8)
        regrets = np.abs([e["regret"] for e in d["scores"].values()])
        if regrets.max() > 100 * max(np.median(regrets), 1e-3):  # an off-scale method: keep the rest readable
            ax0.set_yscale("symlog", linthresh=0.1)
            ax0.set_ylim(bottom=min(-0.1, min(e["regret"] for e in d["scores"].values())))
        ax0.set_xscale("log")
        ax0.set_xlabel("training tasks T")
        ax0.set_ylabel("regret: lpd per query obs. below the oracle")
        ax0.set_title(f"{dname}: predictive regret (band: +- sem)")
        ax0.legend(fontsize=7)
        ax1.axhline(0.9, color="k", linewidth=0.8)
        ax1.set_xscale("log")
        ax1.set_xlabel("training tasks T")
        ax1.set_ylabel("coverage of central 90% intervals")
        ax1.set_title(f"{dname}: calibration")
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
