"""Learners on a tiny convnet (float64): every one takes a finite step on an episode batch; the
implicit hypergradients match central finite differences; shrinkage with its feature layers held
at phi is per-task multinomial logistic regression (MAP against scipy.optimize); ProtoNet's
logits against a direct NumPy computation; ProtoNet resumes bit-identically from a checkpoint."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import minimize
from scipy.special import log_softmax

import hiermeta as hm
import hiermeta.train as train_module
from hiermeta.checkpoint import read_metadata
from hiermeta.implicit import cg_solve
from hiermeta.learners.bilevel import proximal_sgd
from hiermeta.learners.info import step_metrics
from hiermeta.models import fewshot, linear

ROOT = Path(__file__).resolve().parents[2]
WAYS, SHOTS, QUERIES = 3, 2, 2
K = 300  # inner steps: the implicit learners' hypergradients hold at a stationary point
RATE = 0.02  # proximal rate on the summed support log-likelihood (its curvature reaches ~70 here)
SIGMA = np.array([0.15, 0.3])  # block0, head: small enough that every task's L_t is convex at its optimum
LAM = 25.0  # iMAML: sigma = 0.2
IMPLICIT = ("M-Shrinkage", "M-sigma-iMAML", "iMAML")


@pytest.fixture(scope="module")
def tiny():
    """A 1-block convnet with 2 filters on 6 x 6 images (81 parameters, modules block0 and head)
    and 2 episodes; one network so that each learner compiles once for every test below."""
    net = fewshot.convnet(WAYS, image_size=6, filters=2, blocks=1, groups=1)
    params = net.init(jax.random.PRNGKey(0))
    model = fewshot.make_model(net, params)
    images = np.random.default_rng(0).integers(0, 256, (12, 6, 6, 6), dtype=np.uint8)
    sample = fewshot.episode_sampler(images, np.arange(12), ways=WAYS, shots=SHOTS, queries=QUERIES, num_tasks=2)
    cg = cg_solve(tol=1e-13, maxiter=model.partition.num_params)
    sgd1 = optax.sgd(1.0)  # the outer step is params - grad: the step reveals its gradient
    learners = {
        "M-Shrinkage": hm.m_shrinkage(model, inner_optimizer=proximal_sgd(RATE), inner_steps=K, outer_optimizer=sgd1,
                                      hypergradient=cg),
        "M-sigma-iMAML": hm.m_sigma_imaml(model, inner_optimizer=proximal_sgd(RATE), inner_steps=K,
                                          outer_optimizer=sgd1, hypergradient=cg),
        "iMAML": hm.imaml(model, lam=LAM, inner_optimizer=proximal_sgd(RATE), inner_steps=K, outer_optimizer=sgd1,
                          hypergradient=cg),
        "MAML": hm.maml(model, inner_steps=3, init_lr=RATE, outer_optimizer=optax.adam(1e-2)),
        "FOMAML": hm.fomaml(model, inner_steps=3, init_lr=RATE, outer_optimizer=optax.adam(1e-2)),
        "Reptile": hm.reptile(model, inner_optimizer=optax.sgd(RATE), inner_steps=3),
        "ProtoNet": hm.protonet(model, embed=net.embed, outer_optimizer=sgd1),
    }
    return dict(net=net, params=params, model=model, sample=sample, batch=sample(jax.random.PRNGKey(1)),
                learners=learners, step={name: jax.jit(learner.step) for name, learner in learners.items()})


def init(learner, params):
    if learner.name.startswith("M-"):
        return learner.init(jax.random.PRNGKey(0), params, sigma=SIGMA)
    return learner.init(jax.random.PRNGKey(0), params)


@pytest.fixture(scope="module")
def steps(tiny):
    """One meta-step of every learner from its initial state: (before, after, metrics)."""
    out = {}
    for name, learner in tiny["learners"].items():
        state = init(learner, tiny["params"])
        out[name] = (state, *tiny["step"][name](state, tiny["batch"]))
    return out


def central_differences(step, state, batch, directions, h):
    """d/de of the step's ``val_log_lik`` (the PLL at the K-step theta_hat) along each direction."""
    def value(sign, d):
        params = jax.tree_util.tree_map(lambda p, u: p + sign * h * u, state.params, d)
        return float(step(state._replace(params=params), batch)[1].val_log_lik)

    return np.array([(value(1, d) - value(-1, d)) / (2 * h) for d in directions])


@pytest.mark.parametrize("name", ["M-Shrinkage", "M-sigma-iMAML", "MAML", "FOMAML", "Reptile", "iMAML", "ProtoNet"])
def test_each_learner_takes_a_finite_step_on_an_episode_batch(name, steps):
    before, after, metrics = steps[name]
    assert not bool(metrics.skipped) and int(after.num_skipped) == 0 and int(after.step) == 1
    for key, value in step_metrics(metrics).items():
        assert np.all(np.isfinite(np.asarray(value, float))), (key, value)
    assert np.all(np.isfinite(after.params["phi"]))
    assert not np.allclose(after.params["phi"], before.params["phi"])  # it moved
    if "num_diverged" in metrics._fields:
        assert int(metrics.num_diverged) == 0


@pytest.mark.parametrize("name", IMPLICIT)
def test_implicit_hypergradients_match_central_finite_differences(name, tiny, steps):
    before, after, metrics = steps[name]
    params = before.params
    assert float(metrics.cg_residual) < 1e-9  # the linear solve is exact
    # sgd(1.0) minimises -PLL: the new params are old + dPLL/dmeta (old - dL/dphi for Shrinkage's phi)
    step = jax.tree_util.tree_map(lambda a, b: np.asarray(a - b), after.params, params)
    rng = np.random.default_rng(1)
    zero = jax.tree_util.tree_map(np.zeros_like, params)
    directions, predicted = [], []
    if name != "M-Shrinkage":  # its phi moves along the MAP gradient, not the PLL's
        for _ in range(2):
            u = rng.normal(size=params["phi"].shape)
            directions.append({**zero, "phi": u / np.linalg.norm(u)})
            predicted.append(step["phi"] @ directions[-1]["phi"])
    if "log_sigma2" in params:
        for m in range(len(SIGMA)):
            directions.append({**zero, "log_sigma2": np.eye(len(SIGMA))[m]})
            predicted.append(step["log_sigma2"][m])
    finite_diff = central_differences(tiny["step"][name], before, tiny["batch"], directions, 1e-4)
    np.testing.assert_allclose(predicted, finite_diff, rtol=1e-5, atol=1e-9)
    assert np.min(np.abs(finite_diff)) > 1e-4  # the directions are informative


def test_shrinkage_with_fixed_features_is_multinomial_logistic_regression(tiny):
    """Feature layers' sigma -> 0: each task's MAP head is a ridge-penalised softmax regression on
    the features of phi's conv layers, centred at phi's head; solved directly by scipy.optimize."""
    net, model, batch = tiny["net"], tiny["model"], tiny["batch"]
    learner = tiny["learners"]["M-Shrinkage"]
    part = model.partition
    phi = part.ravel(tiny["params"])
    head_sigma = SIGMA[1]
    state = learner.init(jax.random.PRNGKey(0), tiny["params"], sigma=np.array([1e-4, head_sigma]))
    theta = np.asarray(jax.jit(learner.adapt, static_argnums=2)(state, batch.train, K).theta)
    conv = part.index == 0  # block0
    np.testing.assert_allclose(theta[:, conv], np.broadcast_to(phi[conv], theta[:, conv].shape), atol=1e-6)
    phi_tree = part.unravel(phi)
    w0, b0 = np.asarray(phi_tree["head"]["w"]), np.asarray(phi_tree["head"]["b"])
    E = w0.shape[0]
    for t in range(2):
        x = np.asarray(jax.jit(net.embed)(phi_tree, batch.train.inputs[t]))
        y = np.asarray(batch.train.labels[t])

        def objective(v):
            w, b = v[: E * WAYS].reshape(E, WAYS), v[E * WAYS:]
            logp = log_softmax(x @ w + b, axis=-1)
            p = np.exp(logp)
            r = p - np.eye(WAYS)[y]
            value = -logp[np.arange(len(y)), y].sum() + (np.sum((w - w0) ** 2) + np.sum((b - b0) ** 2)) / (2 * head_sigma**2)
            grad = np.r_[(x.T @ r + (w - w0) / head_sigma**2).ravel(), r.sum(0) + (b - b0) / head_sigma**2]
            return value, grad

        sol = minimize(objective, np.r_[w0.ravel(), b0], jac=True, method="BFGS", options={"gtol": 1e-12})
        head = part.unravel(jnp.asarray(theta[t]))["head"]
        np.testing.assert_allclose(np.r_[np.asarray(head["w"]).ravel(), head["b"]], sol.x, rtol=1e-6, atol=1e-7)
        assert np.linalg.norm(sol.x - np.r_[w0.ravel(), b0]) > 0.05  # the head did adapt


@pytest.mark.slow  # a solver study on the convnet (66 s); the same solvers reach the closed-form MAP in tests/test_inner_solvers.py
def test_prior_scaled_lbfgs_and_curvature_steps_reach_the_same_convnet_map(tiny, steps):
    """The example's inner solvers on the convnet: L-BFGS in the prior's scale and proximal steps at
    the likelihood's curvature rate stop at the MAP that K fixed-rate proximal steps reach."""
    state = steps["M-Shrinkage"][0]
    support = tiny["batch"].train
    reference = jax.jit(tiny["learners"]["M-Shrinkage"].adapt)(state, support)
    assert np.all(reference.converged)
    for solver in (dict(inner_solver=hm.solvers.prior_scaled(hm.solvers.lbfgs(100, tol=1e-9))),
                   dict(inner_optimizer=proximal_sgd(), inner_steps=K)):
        learner = hm.m_shrinkage(tiny["model"], **solver)
        adapted = jax.jit(learner.adapt)(state, support)
        assert np.all(adapted.converged) and not np.any(adapted.diverged)
        np.testing.assert_allclose(adapted.theta, reference.theta, rtol=1e-5, atol=1e-6)


def test_proximal_sgd_reaches_the_closed_form_map(paper, paper_model, paper_tasks):
    """On the linear domain: the exact MAP for any sigma, where plain SGD at that rate diverges."""
    _, batch = paper_tasks
    sigma = np.array([8.0] * 4 + [0.01] * 4)
    learner = hm.m_shrinkage(paper_model, inner_optimizer=proximal_sgd(0.3), inner_steps=4000)
    state = learner.init(jax.random.PRNGKey(0), jnp.ones(8), sigma=sigma)
    theta = jax.jit(learner.adapt, static_argnums=2)(state, batch.train, 4000).theta  # the narrow valley needs many steps
    exact, _ = linear.posterior(batch.train, jnp.ones(8), jnp.asarray(sigma))
    np.testing.assert_allclose(theta, exact, rtol=1e-9)
    sgd = hm.m_shrinkage(paper_model, inner_optimizer=optax.sgd(0.3), inner_steps=50)  # needs rate < 2e-4
    sgd_state = sgd.init(jax.random.PRNGKey(0), jnp.ones(8), sigma=sigma)
    blown = jax.jit(sgd.adapt, static_argnums=2)(sgd_state, batch.train, 50).theta
    assert not np.all(np.abs(blown) < 1e6)  # run off (or NaN)
    with pytest.raises(ValueError, match="learning_rate must be finite and > 0"):
        proximal_sgd(0.0)
    with pytest.raises(ValueError, match="inner_optimizer must be an optax transformation"):
        hm.m_shrinkage(paper_model, inner_optimizer=0.3, inner_steps=4)


# ---------------------------------------------------------------------------- ProtoNet


def test_protonet_logits_match_a_direct_numpy_computation(tiny, steps):
    net, model, batch = tiny["net"], tiny["model"], tiny["batch"]
    learner = tiny["learners"]["ProtoNet"]
    before, _, metrics = steps["ProtoNet"]
    logits = jax.jit(lambda state, b: model.likelihood.logits(
        jax.vmap(model.partition.unravel)(learner.adapt(state, b.train, 0).theta), b.val))(before, batch)
    phi_tree = model.partition.unravel(before.params["phi"])
    embed = jax.jit(net.embed)
    total = 0.0
    for t in range(2):
        fs = np.asarray(embed(phi_tree, batch.train.inputs[t]))
        fq = np.asarray(embed(phi_tree, batch.val.inputs[t]))
        ys, yq = np.asarray(batch.train.labels[t]), np.asarray(batch.val.labels[t])
        protos = np.stack([fs[ys == k].mean(axis=0) for k in range(WAYS)])
        direct = -((fq[:, None, :] - protos[None]) ** 2).sum(-1)  # -squared Euclidean distance
        # the head holds w_k = 2 c_k, b_k = -||c_k||^2: logits = direct + ||f||^2, the same softmax
        np.testing.assert_allclose(np.asarray(logits[t]) - (fq**2).sum(-1, keepdims=True), direct, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(log_softmax(np.asarray(logits[t]), -1), log_softmax(direct, -1), rtol=1e-10, atol=1e-12)
        total += log_softmax(direct, -1)[np.arange(len(yq)), yq].sum()
    np.testing.assert_allclose(metrics.val_log_lik, total / 2, rtol=1e-10)  # the episodic objective
    # the meta-gradient (through prototypes and query embeddings) against central differences
    _, after, _ = steps["ProtoNet"]
    u = np.random.default_rng(2).normal(size=before.params["phi"].shape)
    fd = central_differences(tiny["step"]["ProtoNet"], before, batch, [{"phi": u}], 1e-5)
    np.testing.assert_allclose((after.params["phi"] - before.params["phi"]) @ u, fd, rtol=1e-6)  # sgd(1.0)
    head = model.partition.index == 1
    np.testing.assert_array_equal(after.params["phi"][head], before.params["phi"][head])  # the head is not trained


def test_protonet_refuses_what_it_cannot_do(tiny, steps):
    model, batch, learner = tiny["model"], tiny["batch"], tiny["learners"]["ProtoNet"]
    before = steps["ProtoNet"][0]
    with pytest.raises(ValueError, match="num_steps must be 0"):
        learner.adapt(before, batch.train, 3)
    with pytest.raises(ValueError, match="no inner optimisation"):
        learner.inner_problem(before.params)
    with pytest.raises(ValueError, match="needs a linear head at 'top'"):
        hm.protonet(model, embed=tiny["net"].embed, head="top")
    with pytest.raises(ValueError, match="classification likelihood"):
        hm.protonet(linear.make_model(8), embed=tiny["net"].embed)
    # a class with no support example has no prototype: the step is skipped, not silently wrong
    train = batch.train._replace(mask=batch.train.mask.at[0].set(batch.train.labels[0] != 1))
    new, metrics = tiny["step"]["ProtoNet"](before, batch._replace(train=train))
    assert bool(metrics.skipped) and int(metrics.num_missing) == QUERIES
    np.testing.assert_array_equal(new.params["phi"], before.params["phi"])


@pytest.mark.slow
def test_protonet_resumes_bit_identically(tiny, tmp_path, monkeypatch):
    learner, sample = tiny["learners"]["ProtoNet"], tiny["sample"]
    state0 = init(learner, tiny["params"])
    kwargs = dict(data_key=jax.random.PRNGKey(3), chunk_size=3, progress=False, checkpoint_every=3)
    whole, whole_history = hm.fit(learner, state0, sample, 6, checkpoint=tmp_path / "whole.npz", **kwargs)
    path = tmp_path / "run.npz"
    real_save = train_module.save_checkpoint

    def crash_after_save(*args, **kw):
        real_save(*args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_save)
    with pytest.raises(KeyboardInterrupt):
        hm.fit(learner, state0, sample, 6, checkpoint=path, **kwargs)
    monkeypatch.undo()
    assert read_metadata(path)["step"] == 3
    resumed, history = hm.fit(learner, state0, sample, 6, checkpoint=path, resume=True, **kwargs)
    np.testing.assert_array_equal(resumed.params["phi"], whole.params["phi"])
    np.testing.assert_array_equal(history["val_log_lik"], whole_history["val_log_lik"])


def test_episodic_scores(tiny, steps):
    learner = tiny["learners"]["ProtoNet"]
    state = steps["ProtoNet"][1]
    scores = fewshot.evaluate_episodes(learner, state, tiny["sample"], 5, key=jax.random.PRNGKey(4), num_steps=0)
    assert scores.num_episodes == 5 and scores.per_episode_accuracy.shape == (5,)
    acc = scores.per_episode_accuracy
    np.testing.assert_allclose(acc * WAYS * QUERIES, np.round(acc * WAYS * QUERIES), atol=1e-9)  # counts of hits
    assert scores.accuracy == pytest.approx(acc.mean()) and scores.loss == pytest.approx(scores.per_episode_loss.mean())
    assert scores.accuracy_ci95 == pytest.approx(1.96 * acc.std(ddof=1) / np.sqrt(5))
    with pytest.raises(ValueError, match="num_episodes must be an integer >= 2"):
        fewshot.evaluate_episodes(learner, state, tiny["sample"], 1, key=jax.random.PRNGKey(4), num_steps=0)
    bad = state._replace(params={"phi": state.params["phi"].at[0].set(jnp.nan)})
    with pytest.raises(ValueError, match="not finite on 5 of 5 episodes"):
        fewshot.evaluate_episodes(learner, bad, tiny["sample"], 5, key=jax.random.PRNGKey(4), num_steps=0)


# ---------------------------------------------------------------------------- devices and the example

MESH_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    import hiermeta as hm
    from hiermeta.learners.bilevel import proximal_sgd
    from hiermeta.models import fewshot
    hm.enable_compilation_cache(sys.argv[1])
    assert jax.device_count() == 4
    net = fewshot.convnet(3, image_size=6, filters=2, blocks=1, groups=1)
    params = net.init(jax.random.PRNGKey(0))
    model = fewshot.make_model(net, params)
    images = np.random.default_rng(0).integers(0, 256, (12, 6, 6, 6), dtype=np.uint8)
    sample = fewshot.episode_sampler(images, np.arange(12), ways=3, shots=2, queries=2, num_tasks=6)
    for learner in (hm.protonet(model, embed=net.embed, outer_optimizer=optax.adam(1e-2)),
                    hm.m_shrinkage(model, inner_optimizer=proximal_sgd(0.02), inner_steps=5)):
        state = learner.init(jax.random.PRNGKey(0), params)
        one, h1 = hm.fit(learner, state, sample, 4, data_key=jax.random.PRNGKey(1), progress=False)
        four, h4 = hm.fit(learner, state, sample, 4, data_key=jax.random.PRNGKey(1), progress=False, mesh=hm.sharding.task_mesh())
        assert len(four.params["phi"].sharding.device_set) == 4
        np.testing.assert_allclose(one.params["phi"], four.params["phi"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(h1["val_log_lik"], h4["val_log_lik"], rtol=1e-9)
        print("ok", learner.name)
    """
)


@pytest.mark.slow
def test_fewshot_training_runs_unchanged_on_4_devices(tmp_path):
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--ignored")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    script = tmp_path / "four.py"
    script.write_text(MESH_SCRIPT)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
    out = subprocess.run([sys.executable, str(script), cache], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok ") == 2, out.stdout


@pytest.mark.slow
def test_fewshot_example_quick_run(tmp_path):
    import json

    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "fewshot.py"), "--quick", "--meta-steps", "3",
                          "--test-episodes", "6", "--shots", "1", "--learners", "M-Shrinkage", "ProtoNet", "Untrained",
                          "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Learned sigma per layer" in out.stdout and "accuracy %" in out.stdout
    result = json.loads((tmp_path / "fewshot.json").read_text())
    setting = result["settings"]["5-way 1-shot"]
    assert set(setting["learners"]) == {"M-Shrinkage", "ProtoNet", "Untrained"}
    assert setting["learners"]["Untrained"]["test_steps"] == 5  # the L-BFGS budget (quick)
    assert len(setting["learners"]["M-Shrinkage"]["sigma"]) == len(setting["modules"])
    assert (tmp_path / "fewshot.png").exists()
