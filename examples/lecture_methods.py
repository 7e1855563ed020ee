"""The meta-learning families of the lecture side by side (issue 24): shrinkage (hierarchical Bayes),
optimisation-based (MAML, Reptile, iMAML), metric (ProtoNet), black-box parameter prediction
(class-weight predictor, deep sets, set attention), a learned optimiser (coordinate-wise LSTM) and
test-time adaptation (TENT, rotation test-time training), on three domains:

- ``linear``: the paper's linear-Gaussian domain (P = 8), with the Bayes posterior mean and the MLE;
- ``sinusoid``: MAML's sine waves with an MLP 1-40-40-1 (one module per layer);
- ``glyphs``: 5-way 1-shot episodes of the rendered glyph set (a stand-in, not Omniglot) with a
  small convnet (16 x 16 images, 8 filters, 2 blocks).

Every learner is meta-trained once, with the configuration in ``METHODS`` below (no hyperparameter
search: the rates are the ones examples/compare.py and examples/fewshot.py chose or use), on the same
task stream, then scored on held-out tasks: the mean query loss (glyphs: accuracy and cross-entropy)
with its 95% interval (1.96 standard errors over tasks), the time per meta-step (wall and CPU
seconds, the first, compiling step excluded) and what it learns (sigma per module, inner rates,
predictor coefficients).  Test-time methods reuse a trained learner's state; their rate and step
count are chosen on validation episodes.

    nice -n 10 python examples/lecture_methods.py --domain linear   --out docs/results
    nice -n 10 python examples/lecture_methods.py --domain sinusoid --out docs/results
    nice -n 10 python examples/lecture_methods.py --domain glyphs   --out docs/results
    python examples/lecture_methods.py --quick                      # smoke run of all three
    python examples/lecture_methods.py --domain linear --methods M-Shrinkage,DeepSets
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import hiermeta as hm  # noqa: E402
from hiermeta import tta  # noqa: E402
from hiermeta.families import CategoricalLikelihood  # noqa: E402
from hiermeta.learners import (class_weight_predictor, learned_optimizer, m_sigma_reptile, rates_of,  # noqa: E402
                               set_encoder, sigma_of, sigma_reptile)
from hiermeta.learners.param_predict import class_features  # noqa: E402
from hiermeta.models import fewshot, glyphs, linear, sinusoid  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, also when loaded from elsewhere
from _common import count, format_table, prng_seed, study_parser, write_json  # noqa: E402

DOMAINS = ("linear", "sinusoid", "glyphs")
FAMILIES = {
    "shrinkage": "hierarchical Bayes: phi and sigma per module (Eq. 1)",
    "optimisation": "an initialisation adapted by K inner steps",
    "metric": "an embedding; a task is its class prototypes",
    "black-box": "a network that maps the support to the task's parameters",
    "learned optimiser": "the inner update rule itself",
    "test-time": "further adaptation on the unlabelled query",
}


class Method(NamedTuple):
    """A row of the comparison.

    ``build()`` returns the learner, ``init(learner, key, states)`` its initial state (``states``: the
    trained states so far, for a warm start); ``test_steps`` its adaptation budget at test time.
    ``base``: reuse that method's trained learner and state (no meta-training of its own);
    ``test_time``: ``(build(rate, steps) -> TestTimeAdaptation, rates, steps)``, chosen on validation tasks.
    """

    family: str
    build: Optional[Callable[[], hm.MetaLearner]]
    init: Optional[Callable]
    test_steps: int
    base: Optional[str] = None
    test_time: Optional[tuple] = None


def cosine_adam(lr: float, steps: int):
    return optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1))


def lstm_outer(lr: float, steps: int):
    """Adam on phi and the rates at ``lr``, on the LSTM's weights at lr / 10 (they see every coordinate)."""
    return optax.multi_transform({"base": cosine_adam(lr, steps), "lstm": cosine_adam(lr / 10, steps)},
                                 {"phi": "base", "log_lr": "base", "lstm": "lstm"})


def step_based(model, phi0, steps, *, K, lr, reptile_lr, reptile_K, prior_solver, sigma0, lam, set_kwargs,
               outer_lr, set_lr, lstm_kwargs, implicit_kwargs=None):
    """The methods every domain runs: shrinkage family, MAML family with four inner optimisers, Reptile,
    the learned optimiser, deep sets and set attention."""
    adam = lambda: cosine_adam(outer_lr, steps)
    plain = lambda learner, key, states: learner.init(key, phi0)
    prior = dict(prior_solver, init_sigma=sigma0)
    implicit = dict(implicit_kwargs or {})
    set_init = lambda learner, key, states: learner.init(key, phi0, data=states["__support__"])
    methods = {
        "Shrinkage": Method("shrinkage", lambda: hm.shrinkage(model, **prior, outer_optimizer=adam()), plain, None),
        "M-Shrinkage": Method("shrinkage", lambda: hm.m_shrinkage(model, **prior, outer_optimizer=adam()), plain, None),
        "sigma-iMAML": Method("shrinkage", lambda: hm.sigma_imaml(model, **prior, **implicit, outer_optimizer=adam()),
                              plain, None),
        "M-sigma-iMAML": Method("shrinkage", lambda: hm.m_sigma_imaml(model, **prior, **implicit,
                                                                      outer_optimizer=adam()), plain, None),
        "sigma-Reptile": Method("shrinkage", lambda: sigma_reptile(model, **prior), plain, None),
        "M-sigma-Reptile": Method("shrinkage", lambda: m_sigma_reptile(model, **prior), plain, None),
        "Shrinkage MAP": Method("shrinkage", lambda: hm.shrinkage_map(model, **prior, outer_optimizer=adam()), plain,
                                None),
        "M-Shrinkage MAP": Method("shrinkage", lambda: hm.m_shrinkage_map(model, **prior, outer_optimizer=adam()),
                                  plain, None),
        "iMAML": Method("optimisation", lambda: hm.imaml(model, lam=lam, **prior_solver, **implicit,
                                                         outer_optimizer=adam()), plain, None),
        "MAML (SGD, fixed rate)": Method("optimisation", lambda: hm.maml(model, inner_steps=K, init_lr=lr, learn_lr=False,
                                                                         outer_optimizer=adam()), plain, K),
        "MAML": Method("optimisation", lambda: hm.maml(model, inner_steps=K, init_lr=lr, outer_optimizer=adam()), plain, K),
        "MAML (Adam inner)": Method("optimisation", lambda: hm.maml(
            model, inner_steps=K, init_lr=lr, preconditioner=optax.scale_by_adam(eps_root=1e-12),
            outer_optimizer=adam(), name="MAML (Adam inner)"), plain, K),
        "M-MAML": Method("optimisation", lambda: hm.m_maml(model, inner_steps=K, init_lr=lr, outer_optimizer=adam()),
                         plain, K),
        "FOMAML": Method("optimisation", lambda: hm.fomaml(model, inner_steps=K, init_lr=lr, outer_optimizer=adam()),
                         plain, K),
        "FO-M-MAML": Method("optimisation", lambda: hm.fo_m_maml(model, inner_steps=K, init_lr=lr,
                                                                 outer_optimizer=adam()), plain, K),
        "Reptile": Method("optimisation", lambda: hm.reptile(model, inner_optimizer=optax.sgd(reptile_lr),
                                                             inner_steps=reptile_K, outer_optimizer=optax.sgd(
                                                                 optax.cosine_decay_schedule(1.0, steps, 0.1))),
                          plain, reptile_K),
        "LSTM-opt MAML": Method("learned optimiser", lambda: learned_optimizer(
            model, inner_steps=K, init_lr=lr, **lstm_kwargs, outer_optimizer=lstm_outer(outer_lr, steps)), plain, K),
        f"LSTM-opt MAML (T={K // 2})": Method("learned optimiser", lambda: learned_optimizer(
            model, inner_steps=K, truncation=K // 2, init_lr=lr, **lstm_kwargs,
            outer_optimizer=lstm_outer(outer_lr, steps)), plain, K),
        "DeepSets": Method("black-box", lambda: set_encoder(model, **set_kwargs, outer_optimizer=cosine_adam(set_lr, steps)),
                           set_init, 0),
        "SetAttention": Method("black-box", lambda: set_encoder(model, **set_kwargs, pooling="attention",
                                                                outer_optimizer=cosine_adam(set_lr, steps)), set_init, 0),
    }
    if K % 2:
        methods.pop(f"LSTM-opt MAML (T={K // 2})")  # truncation must divide K
    return methods


# ---------------------------------------------------------------------------- domains


class Domain(NamedTuple):
    name: str
    model: Any
    methods: dict
    sample: Callable  # key -> TaskBatch (a training batch)
    test: Any  # held-out TaskBatch (linear, sinusoid) or an episode sampler (glyphs)
    val: Any
    references: dict
    describe: str


def linear_domain(args, steps):
    domain = linear.paper_domain()
    model = linear.make_model(domain.num_params)
    k_val, k_test = jax.random.split(jax.random.PRNGKey(args.seed + 1))
    test = linear.sample_tasks(domain, k_test, 200 if args.quick else 1000)[1]
    methods = step_based(model, jnp.zeros(8), steps, K=10, lr=0.05, reptile_lr=0.1, reptile_K=50,
                         prior_solver=dict(inner_solver=hm.solvers.newton()), sigma0=1.0, lam=1 / 16,
                         set_kwargs=dict(width=32, depth=2, features=lambda tree, d: d.obs), outer_lr=0.03, set_lr=0.01,
                         lstm_kwargs=dict(hidden=16, output_scale=0.1))
    oracle, _ = linear.posterior(test.train, domain.phi, domain.sigma)
    mle, _ = linear.posterior(test.train, domain.phi, np.full(8, np.inf))
    loss = jax.jit(jax.vmap(model.generalisation_loss))
    references = {"Bayes posterior mean (true phi, sigma)": {"per_task": np.asarray(loss(oracle, test.val)),
                                                              "expected": linear.expected_loss(domain, domain.phi,
                                                                                               domain.sigma)},
                  "MLE": {"per_task": np.asarray(loss(mle, test.val)),
                          "expected": linear.expected_loss(domain, domain.phi, np.inf)}}
    return Domain("linear", model, methods, lambda key: linear.sample_tasks(domain, key, 25)[1], test, None, references,
                  f"the paper's linear-Gaussian domain (P = 8, 4 support + 4 query observations), "
                  f"{test.train.obs.shape[0]} held-out tasks")


def sinusoid_domain(args, steps):
    domain = sinusoid.maml_domain()
    params = sinusoid.init_mlp(jax.random.PRNGKey(args.seed))
    model = sinusoid.make_model(params)
    test = sinusoid.sample_tasks(domain, jax.random.PRNGKey(args.seed + 1), 100 if args.quick else 500)[1]
    methods = step_based(model, params, steps, K=5, lr=sinusoid.MAML_INNER_LR, reptile_lr=sinusoid.MAML_INNER_LR,
                         reptile_K=5, prior_solver=dict(inner_optimizer=optax.sgd(sinusoid.MAML_INNER_LR), inner_steps=5),
                         sigma0=1.0, lam=1.0, set_kwargs=dict(width=64, depth=2), outer_lr=0.01, set_lr=0.003,
                         lstm_kwargs=dict(hidden=8, output_scale=0.01),
                         # 5 SGD steps are far from stationary: the exact (CG to convergence) hypergradient runs
                         # off; 5 CG iterations, as examples/fewshot.py, keep it finite
                         implicit_kwargs=dict(hypergradient=hm.implicit.cg_solve(maxiter=5, tol=1e-6)))
    methods = {name: m._replace(test_steps=5) if m.test_steps is None else m for name, m in methods.items()}
    return Domain("sinusoid", model, methods, lambda key: sinusoid.sample_tasks(domain, key, 25)[1], test, None, {},
                  f"MAML's sine waves (10 support + 10 query points, MLP 1-40-40-1), "
                  f"{test.train.obs.shape[0]} held-out tasks; loss = half the query MSE")


def glyph_domain(args, steps):
    ways, shots, queries = 5, 1, 5
    data = glyphs.glyph_dataset(image_size=16)
    splits = glyphs.default_splits(data)
    net = fewshot.convnet(ways, 16, filters=8, blocks=2)
    params = net.init(jax.random.PRNGKey(args.seed))
    model = fewshot.make_model(net, params)
    spec = dict(ways=ways, shots=shots, queries=queries)
    sample = fewshot.episode_sampler(data.images, splits["train"], num_tasks=8, **spec)
    test = fewshot.episode_sampler(data.images, splits["test"], num_tasks=50, **spec)
    val = fewshot.episode_sampler(data.images, splits["val"], num_tasks=50, **spec)
    # the rotation head for test-time training (a second head on the same features), trained jointly
    E = net.embedding_size
    rot_params = {**params, "rot_head": {"w": jax.random.uniform(jax.random.PRNGKey(args.seed + 7), (E, 4),
                                                                 minval=-E**-0.5, maxval=E**-0.5),
                                         "b": jnp.zeros(4)}}
    rotation_logits = lambda p, x: net.embed(p, x) @ p["rot_head"]["w"] + p["rot_head"]["b"]
    rot_labels = {name: jax.tree_util.tree_map(lambda _: name, layer) for name, layer in rot_params.items()}
    rot_partition = hm.ModulePartition.from_labels(rot_params, rot_labels)
    aux_model = hm.HierarchicalModel(tta.RotationAuxiliaryLikelihood(model.likelihood, rotation_logits, 1.0),
                                     rot_partition)

    n_support = ways * shots
    rate, K = 0.4 / n_support, 5  # MAML's Omniglot rate on the mean support cross-entropy
    adam = lambda: cosine_adam(3e-3, steps)
    plain = lambda learner, key, states: learner.init(key, params)
    lbfgs = dict(inner_solver=hm.solvers.prior_scaled(hm.solvers.lbfgs(10, tol=1e-2, linesearch_steps=4)))
    init_sigma = (2.0 * n_support) ** -0.5  # iMAML's sigma at lambda = 2 on the mean cross-entropy
    both = optax.multi_transform({"phi": adam(), "log_sigma2": cosine_adam(0.03, steps)},
                                 {"phi": "phi", "log_sigma2": "log_sigma2"})

    def warm_from_protonet(learner, key, states):  # the lecture's predictor reads a pre-trained feature map
        return learner.init(key, model.partition.unravel(states["ProtoNet"].params["phi"]))

    tent = lambda r, n: tta.tent(model.partition, num_steps=n, optimizer=optax.adam(r))
    ttt = lambda r, n: tta.rotation_ttt(rot_partition, rotation_logits=rotation_logits, num_steps=n,
                                        optimizer=optax.adam(r))
    grid = ((1e-3, 1e-2), (5,))  # each point compiles its own program: kept small
    methods = {
        "M-Shrinkage": Method("shrinkage", lambda: hm.m_shrinkage(model, **lbfgs, init_sigma=init_sigma,
                                                                  outer_optimizer=both), plain, 10),
        "M-sigma-iMAML": Method("shrinkage", lambda: hm.m_sigma_imaml(
            model, **lbfgs, init_sigma=init_sigma, outer_optimizer=both,
            hypergradient=hm.implicit.cg_solve(maxiter=5, tol=1e-6)), plain, 10),
        "M-sigma-Reptile": Method("shrinkage", lambda: m_sigma_reptile(model, **lbfgs, init_sigma=init_sigma), plain, 10),
        "M-Shrinkage MAP": Method("shrinkage", lambda: hm.m_shrinkage_map(model, **lbfgs, init_sigma=init_sigma,
                                                                          outer_optimizer=both), plain, 10),
        "iMAML": Method("optimisation", lambda: hm.imaml(model, lam=2.0 * n_support, **lbfgs, outer_optimizer=adam(),
                                                         hypergradient=hm.implicit.cg_solve(maxiter=5, tol=1e-6)),
                        plain, 10),
        "MAML (SGD, fixed rate)": Method("optimisation", lambda: hm.maml(model, inner_steps=K, init_lr=rate,
                                                                         learn_lr=False, outer_optimizer=adam()), plain, K),
        "MAML": Method("optimisation", lambda: hm.maml(model, inner_steps=K, init_lr=rate, outer_optimizer=adam()),
                       plain, K),
        "MAML (Adam inner)": Method("optimisation", lambda: hm.maml(
            model, inner_steps=K, init_lr=0.01, preconditioner=optax.scale_by_adam(eps_root=1e-12),
            outer_optimizer=adam(), name="MAML (Adam inner)"), plain, K),
        "M-MAML": Method("optimisation", lambda: hm.m_maml(model, inner_steps=K, init_lr=rate, outer_optimizer=adam()),
                         plain, K),
        "FOMAML": Method("optimisation", lambda: hm.fomaml(model, inner_steps=K, init_lr=rate, outer_optimizer=adam()),
                         plain, K),
        "FO-M-MAML": Method("optimisation", lambda: hm.fo_m_maml(model, inner_steps=K, init_lr=rate,
                                                                 outer_optimizer=adam()), plain, K),
        "Reptile": Method("optimisation", lambda: hm.reptile(model, inner_optimizer=optax.sgd(rate), inner_steps=K,
                                                             outer_optimizer=optax.sgd(1.0)), plain, K),
        "LSTM-opt MAML": Method("learned optimiser", lambda: learned_optimizer(
            model, inner_steps=K, init_lr=rate, hidden=8, output_scale=0.01, outer_optimizer=lstm_outer(3e-3, steps)),
            plain, K),
        "ProtoNet": Method("metric", lambda: hm.protonet(model, embed=net.embed, outer_optimizer=adam()), plain, 0),
        "ClassWeightPredictor": Method("black-box", lambda: class_weight_predictor(
            model, embed=net.embed, outer_optimizer=cosine_adam(1e-3, steps)), warm_from_protonet, 0),
        "DeepSets (head)": Method("black-box", lambda: set_encoder(
            model, features=class_features(net.embed, ways), modules=("head",), width=64, depth=2,
            outer_optimizer=adam(), name="DeepSets (head)"),
            lambda learner, key, states: learner.init(key, params, data=states["__support__"]), 0),
        "ProtoNet + TENT": Method("test-time", None, None, 0, base="ProtoNet", test_time=(tent, *grid)),
        "MAML + TENT": Method("test-time", None, None, K, base="MAML", test_time=(tent, *grid)),
        "MAML (rotation aux)": Method("test-time", lambda: hm.maml(aux_model, inner_steps=K, init_lr=rate,
                                                                   outer_optimizer=adam(), name="MAML (rotation aux)"),
                                      lambda learner, key, states: learner.init(key, rot_params), K),
        "MAML (rotation aux) + TTT": Method("test-time", None, None, K, base="MAML (rotation aux)",
                                            test_time=(ttt, *grid)),
    }
    n_test = 40 if args.quick else 400
    return Domain("glyphs", model, methods, sample, (test, n_test), (val, 20 if args.quick else 100), {},
                  f"5-way 1-shot episodes of the rendered glyph set (16 x 16, a stand-in, not Omniglot), convnet with "
                  f"8 filters x 2 blocks ({model.partition.num_params} parameters), {n_test} test episodes "
                  f"of unseen alphabets")


# ---------------------------------------------------------------------------- training, scores, what is learned


def train(learner, state, sample, steps, key):
    """Meta-train; the first step alone (it compiles), then the rest timed: wall and CPU seconds per step."""
    state, first = hm.fit(learner, state, sample, 1, data_key=key, progress=False)
    wall, cpu = time.perf_counter(), time.process_time()
    state, history = hm.fit(learner, state, sample, steps - 1, data_key=key, progress=False)
    n = max(steps - 1, 1)
    return state, history, (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def ci95(values) -> tuple[float, float]:
    values = np.asarray(values, float)
    return float(values.mean()), float(1.96 * values.std(ddof=1) / np.sqrt(values.size))


def score_tasks(learner, state, tasks, steps):
    """Held-out query loss per task at the learner's budget (``hm.evaluate``'s last entry)."""
    return hm.evaluate(learner, state, tasks, steps).per_task[:, -1]


def score_episodes(learner, state, sample, num, steps, key, method=None, score_model=None):
    """Accuracy and cross-entropy per episode, after the support (``steps``) and, with ``method``, the query's inputs."""
    score_model = score_model or learner.model
    loss = jax.jit(jax.vmap(score_model.generalisation_loss))
    accuracy = jax.jit(lambda th, d: score_model.likelihood.accuracy(jax.vmap(score_model.partition.unravel)(th), d))
    acc, nll, i = [], [], 0
    while sum(map(len, acc)) < num:
        batch = sample(jax.random.fold_in(key, i))
        if method is None:
            theta = hm.adapt(learner, state, batch.train, steps).theta
        else:
            theta = tta.adapt_to_query(learner, state, batch, steps, method)[1]
        acc.append(np.asarray(accuracy(theta, batch.val)))
        nll.append(np.asarray(loss(theta, batch.val)))
        i += 1
    return np.concatenate(acc)[:num], np.concatenate(nll)[:num]


def learned(name, learner, state) -> dict:
    """What a method learns, as named vectors (per module where the learner has one per module)."""
    params, M = state.params, learner.model.partition.num_modules
    out = {}
    if "log_sigma2" in params:
        out["sigma"] = np.asarray(sigma_of(params, M))
    if "log_lr" in params:
        out["inner rate"] = np.asarray(rates_of(params, M))
    if "lstm" in params:
        out["LSTM output |w|"] = np.asarray([float(jnp.linalg.norm(params["lstm"]["out"]["w"]))])
    if "predictor" in params:
        out["predictor scale, quad"] = np.asarray([float(jnp.exp(params["predictor"]["log_scale"])),
                                                   float(jnp.exp(params["predictor"]["log_quad"]))])
    return out


def describe(values: dict) -> str:
    return "; ".join(f"{k} " + " ".join(f"{v:.3g}" for v in np.ravel(x)) for k, x in values.items()) or "-"


def run_domain(domain: Domain, args, steps) -> dict:
    results, states, learners = {}, {}, {}
    key = jax.random.PRNGKey(args.seed)
    states["__support__"] = domain.sample(key).train
    glyph = domain.name == "glyphs"
    for name, m in domain.methods.items():
        if args.methods and name not in args.methods:
            continue
        t0 = time.perf_counter()
        entry = {"family": m.family}
        if m.base is not None:
            if m.base not in states:
                print(f"  {name}: skipped ({m.base} was not run)")
                continue
            learner, state = learners[m.base], states[m.base]
            wall = cpu = None
        else:
            try:
                learner = m.build()
                state = m.init(learner, jax.random.fold_in(key, 1), states)
                state, history, wall, cpu = train(learner, state, domain.sample, steps, jax.random.fold_in(key, 2))
            except Exception as err:  # noqa: BLE001  (a learner that fails is reported, not hidden)
                print(f"  {name}: FAILED in meta-training: {err}")
                results[name] = {"family": m.family, "error": str(err)}
                continue
            states[name], learners[name] = state, learner
            entry["num_skipped"] = int(state.num_skipped)
        method = None
        if m.test_time is not None:
            build, rates, counts = m.test_time
            val, n_val = domain.val
            choices = {}
            for r in rates:
                for n in counts:
                    a, _ = score_episodes(learner, state, val, n_val, m.test_steps, jax.random.PRNGKey(11), build(r, n))
                    choices[(r, n)] = float(a.mean())
            (r, n), _ = max(choices.items(), key=lambda kv: kv[1])
            method = build(r, n)
            entry["test_time"] = {"adam_rate": r, "steps": n, "validation_accuracy": {f"{a}x{b}": v for (a, b), v in
                                                                                      choices.items()}}
        steps_at = m.test_steps if m.test_steps is not None else learner.inner_solver.num_steps
        try:
            if glyph:
                test, n_test = domain.test
                plain = hm.HierarchicalModel(CategoricalLikelihood(domain.model.likelihood.logits_fn,
                                                                   domain.model.likelihood.num_classes),
                                             learner.model.partition)
                acc, nll = score_episodes(learner, state, test, n_test, steps_at, jax.random.PRNGKey(12), method, plain)
                entry["accuracy"], entry["accuracy_ci95"] = ci95(acc)
                entry["loss"], entry["loss_ci95"] = ci95(nll)
            else:
                per_task = score_tasks(learner, state, domain.test, steps_at)
                entry["loss"], entry["loss_ci95"] = ci95(per_task)
                entry["per_task"] = per_task
        except ValueError as err:
            print(f"  {name}: FAILED at test time: {err}")
            entry["error"] = str(err)
        entry.update(test_steps=steps_at, seconds_per_meta_step=wall, cpu_seconds_per_meta_step=cpu,
                     learned=learned(name, learner, state) if m.base is None else {},
                     seconds=time.perf_counter() - t0)
        results[name] = entry
        shown = (f"acc {100 * entry['accuracy']:.1f} +- {100 * entry['accuracy_ci95']:.1f}%  " if "accuracy" in entry
                 else "")
        if "loss" in entry:
            print(f"  {name:28s} {shown}loss {entry['loss']:.4f} +- {entry['loss_ci95']:.4f}  "
                  f"{'' if wall is None else f'{1e3 * wall:.1f} ms/step'}  ({entry['seconds']:.0f} s)", flush=True)
    return results


def print_tables(domain: Domain, results: dict):
    """The comparison (scores with 95% intervals, budget, time per meta-step), then what each learns."""
    glyph = domain.name == "glyphs"
    ref_name, ref = next(iter(domain.references.items()), (None, None))
    head = ["method", "family"] + (["accuracy %"] if glyph else []) + ["loss (95% CI)"]
    if ref is not None:
        head.append("minus Bayes")
    head += ["steps", "ms/step", "CPU ms/step"]
    rows = []
    for name, e in results.items():
        if "loss" not in e:
            rows.append([name, e["family"], "failed: " + e.get("error", "?")[:60]] + [""] * (len(head) - 3))
            continue
        row = [name, e["family"]]
        if glyph:
            row.append(f"{100 * e['accuracy']:.1f} +- {100 * e['accuracy_ci95']:.1f}")
        row.append(f"{e['loss']:.4f} +- {e['loss_ci95']:.4f}")
        if ref is not None:
            d, ci = ci95(e["per_task"] - ref["per_task"])
            row.append(f"{d:+.4f} +- {ci:.4f}")
        ms = lambda x: "-" if x is None else f"{1e3 * x:.1f}"
        row += [e["test_steps"], ms(e["seconds_per_meta_step"]), ms(e["cpu_seconds_per_meta_step"])]
        rows.append(row)
    for name, r in domain.references.items():
        mean, ci = ci95(r["per_task"])
        rows.append([name, "reference", f"{mean:.4f} +- {ci:.4f}", f"(expected {r['expected']:.4f})", "", "", ""])
    print(f"\n{domain.name}: {domain.describe}")
    if ref is not None:
        print(f"(minus Bayes: the paired difference to the {ref_name} over the same tasks, with its 95% CI)")
    print(format_table(head, rows, digits=4))
    modules = list(domain.model.partition.names)
    per_module = [[name, quantity, *np.ravel(v)] for name, e in results.items()
                  for quantity, v in e.get("learned", {}).items() if np.size(v) == len(modules)]
    if per_module:
        print("\nwhat each learns, per module")
        print(format_table(["method", "quantity", *modules], per_module, digits=3))
    other = [[name, quantity, " ".join(f"{x:.3g}" for x in np.ravel(v))] for name, e in results.items()
             for quantity, v in e.get("learned", {}).items() if np.size(v) != len(modules)]
    other += [[name, "test-time method", f"Adam {e['test_time']['adam_rate']:g} x {e['test_time']['steps']} steps "
               "(chosen on validation episodes)"] for name, e in results.items() if e.get("test_time")]
    if other:
        print(format_table(["method", "quantity", "value"], other, digits=3))


def build_parser():
    p = study_parser(__doc__)
    p.add_argument("--domain", nargs="+", choices=DOMAINS, default=list(DOMAINS), help="domains to run")
    p.add_argument("--quick", action="store_true", help="smoke run: few meta-steps and test tasks")
    p.add_argument("--meta-steps", type=count(2), help="meta-steps per learner (default: linear 1000, sinusoid 1000, "
                                                         "glyphs 200; quick 30, 30, 10)")
    p.add_argument("--methods", type=lambda s: [x.strip() for x in s.split(",")], help="comma-separated method names")
    p.add_argument("--seed", type=prng_seed, default=0, help="seed of initial weights, task streams and test tasks")
    p.add_argument("--out", default="results",
                   help="directory for lecture_methods.json (a domain run replaces that domain's entry, keeps the others)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    hm.enable_compilation_cache()
    defaults = {"linear": (1000, 30), "sinusoid": (1000, 30), "glyphs": (200, 10)}
    builders = {"linear": linear_domain, "sinusoid": sinusoid_domain, "glyphs": glyph_domain}
    for name in args.domain:
        t0 = time.perf_counter()
        steps = args.meta_steps or defaults[name][1 if args.quick else 0]
        domain = builders[name](args, steps)
        print(f"\n{name}: {steps} meta-steps per learner; {domain.describe}", flush=True)
        results = run_domain(domain, args, steps)
        print_tables(domain, results)  # before the per-task losses are reduced to the JSON's summaries
        refs = {k: {"mean": ci95(v["per_task"])[0], "ci95": ci95(v["per_task"])[1], "expected": v["expected"]}
                for k, v in domain.references.items()}
        ref = next(iter(domain.references.values()), None)
        for entry in results.values():
            per_task = entry.pop("per_task", None)
            if ref is not None and per_task is not None:
                entry["minus_bayes"], entry["minus_bayes_ci95"] = ci95(per_task - ref["per_task"])
        path = Path(args.out) / "lecture_methods.json"
        record = json.loads(path.read_text()) if path.exists() else {"schema": "hiermeta/lecture_methods/v1",
                                                                       "families": FAMILIES, "domains": {}}
        record["domains"][name] = {"description": domain.describe, "meta_steps": steps, "config": vars(args),
                                   "jax_version": jax.__version__, "results": results, "references": refs,
                                   "seconds": time.perf_counter() - t0}
        write_json(path, record)
        print(f"wrote {path} (domain {name}: {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
