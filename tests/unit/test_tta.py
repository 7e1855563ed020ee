"""hiermeta/tta.py: test-time adaptation against hand-written answers (float64, a tiny network
``flatten -> linear -> layer norm (scale, offset) -> heads``).

- TENT's update is minus the rate times the entropy gradient written out by hand
  (``dH_n/dz_n = -p_n (log p_n + H_n)``, back through the head and the norm), on the norm's affine
  parameters only; padded query rows take no part.
- The rotations are numpy's ``rot90``; the rotation loss and the auxiliary likelihood against a direct
  NumPy computation; TTT's update is the finite-difference gradient of that loss on the feature layers.
- ``evaluate(test_time=)`` continues the loss curve with the method's steps from the learner's theta_K,
  and never reads the query labels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
from hiermeta import tta
from hiermeta.families import CategoricalData, CategoricalLikelihood

S, F, C, N = 4, 5, 3, 6  # image side, features, classes, query images
EPS = 1e-5


def layer_norm(h):
    mean = h.mean(-1, keepdims=True)
    return (h - mean) / np.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + EPS)


def features(p, x):
    h = x.reshape(x.shape[0], -1) @ p["feat"]["w"]
    mean = jnp.mean(h, -1, keepdims=True)
    hhat = (h - mean) / jnp.sqrt(jnp.mean((h - mean) ** 2, -1, keepdims=True) + EPS)
    return hhat * p["norm"]["scale"] + p["norm"]["offset"]


def logits(p, x):
    return features(p, x) @ p["head"]["w"] + p["head"]["b"]


def rotation_logits(p, x):
    return features(p, x) @ p["rot_head"]["w"] + p["rot_head"]["b"]


@pytest.fixture(scope="module")
def net():
    k = jax.random.split(jax.random.PRNGKey(0), 8)
    params = {"feat": {"w": jax.random.normal(k[0], (S * S, F)) / S},
              "norm": {"scale": 1.0 + 0.3 * jax.random.normal(k[1], (F,)), "offset": 0.2 * jax.random.normal(k[2], (F,))},
              "head": {"w": jax.random.normal(k[3], (F, C)), "b": 0.1 * jax.random.normal(k[4], (C,))},
              "rot_head": {"w": jax.random.normal(k[5], (F, 4)), "b": jnp.zeros(4)}}
    labels = {name: jax.tree_util.tree_map(lambda _: name, layer) for name, layer in params.items()}
    model = hm.HierarchicalModel(CategoricalLikelihood(logits, C), hm.ModulePartition.from_labels(params, labels))
    x = jax.random.uniform(k[6], (N, S, S))
    mask = jnp.array([True] * (N - 1) + [False])
    x = x.at[N - 1].set(50.0)  # a padded row that would dominate every sum if it were read
    return dict(params=params, model=model, theta=model.partition.ravel(params), x=x, mask=mask)


def test_leaf_mask_selects_named_leaves(net):
    part = net["model"].partition
    assert tta.leaf_paths(part.template) == ["feat/w", "head/b", "head/w", "norm/offset", "norm/scale",
                                             "rot_head/b", "rot_head/w"]
    mask = tta.leaf_mask(part, ("scale", "offset"))
    assert mask.sum() == 2 * F
    np.testing.assert_array_equal(tta.leaf_mask(part, ["norm/scale", "norm/offset"]), mask)
    with pytest.raises(ValueError, match="no parameter leaf"):
        tta.leaf_mask(part, ("gamma",))


def test_tent_update_is_the_hand_written_entropy_gradient(net):
    p = jax.tree_util.tree_map(np.asarray, net["params"])
    x, mask = np.asarray(net["x"]), np.asarray(net["mask"])
    # forward, in NumPy
    hhat = layer_norm(x.reshape(N, -1) @ p["feat"]["w"])
    z = (hhat * p["norm"]["scale"] + p["norm"]["offset"]) @ p["head"]["w"] + p["head"]["b"]
    z = z - z.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    prob = np.exp(log_p)
    H = -(prob * log_p).sum(-1)
    # backward by hand: mean over the real rows of H_n
    dz = -prob * (log_p + H[:, None]) * mask[:, None] / mask.sum()
    dout = dz @ p["head"]["w"].T
    d_scale, d_offset = (dout * hhat).sum(0), dout.sum(0)

    rate = 0.3
    method = tta.tent(net["model"].partition, num_steps=1, optimizer=optax.sgd(rate))
    result = jax.jit(lambda th: method.adapt(net["model"], th, net["x"], net["mask"]))(net["theta"])
    new = net["model"].partition.unravel(result.theta)
    np.testing.assert_allclose(new["norm"]["scale"], p["norm"]["scale"] - rate * d_scale, rtol=1e-10)
    np.testing.assert_allclose(new["norm"]["offset"], p["norm"]["offset"] - rate * d_offset, rtol=1e-10)
    for name in ("feat", "head", "rot_head"):
        for a, b in zip(jax.tree_util.tree_leaves(new[name]), jax.tree_util.tree_leaves(p[name])):
            np.testing.assert_array_equal(a, b)
    assert float(tta.prediction_entropy(jnp.asarray(z), jnp.asarray(mask))) == pytest.approx(H[mask].mean(), rel=1e-12)
    # more steps lower the entropy
    five = tta.tent(net["model"].partition, num_steps=5, optimizer=optax.sgd(rate))
    observe = lambda th: tta.prediction_entropy(logits(net["model"].partition.unravel(th), net["x"]), net["mask"])
    trace = jax.jit(lambda th: five.adapt(net["model"], th, net["x"], net["mask"], observe=observe).trace)(net["theta"])
    assert np.all(np.diff(np.asarray(trace)) < 0)


def test_rotations_are_numpys_rot90():
    x = np.arange(2 * 9.0).reshape(2, 3, 3)
    got = np.asarray(tta.rotations(jnp.asarray(x)))
    for r in range(4):
        np.testing.assert_array_equal(got[r], np.rot90(x, r, axes=(1, 2)))
    with pytest.raises(ValueError, match="square"):
        tta.rotations(jnp.zeros((1, 2, 3)))


def numpy_rotation_nll(p, x, mask):
    """Summed -log p(r | rot90^r x_n) over the real rows and the 4 rotations."""
    p = jax.tree_util.tree_map(np.asarray, p)
    total = 0.0
    for r in range(4):
        xr = np.rot90(np.asarray(x), r, axes=(1, 2))
        z = (layer_norm(xr.reshape(len(xr), -1) @ p["feat"]["w"]) * p["norm"]["scale"] + p["norm"]["offset"]) \
            @ p["rot_head"]["w"] + p["rot_head"]["b"]
        log_p = z - z.max(-1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
        total += -(log_p[:, r] * mask).sum()
    return total


def test_rotation_loss_and_the_auxiliary_likelihood(net):
    x, mask = net["x"], net["mask"]
    want = numpy_rotation_nll(net["params"], x, np.asarray(mask))
    got = float(tta.rotation_loss(rotation_logits, net["params"], x, mask))
    assert got == pytest.approx(want / (4 * int(mask.sum())), rel=1e-10)
    weight = 0.7
    aux = hm.HierarchicalModel(tta.RotationAuxiliaryLikelihood(net["model"].likelihood, rotation_logits, weight),
                               net["model"].partition)
    data = CategoricalData(labels=jnp.array([0, 1, 2, 0, 1, 2]), mask=mask, inputs=x)
    base = float(jax.jit(net["model"].log_likelihood)(net["theta"], data))
    assert float(jax.jit(aux.log_likelihood)(net["theta"], data)) == pytest.approx(base - weight * want, rel=1e-10)


def test_ttt_update_is_the_rotation_loss_gradient_on_the_feature_layers(net):
    rate = 0.2
    method = tta.rotation_ttt(net["model"].partition, rotation_logits=rotation_logits, optimizer=optax.sgd(rate))
    part = net["model"].partition
    result = jax.jit(lambda th: method.adapt(net["model"], th, net["x"], net["mask"]))(net["theta"])
    moved = np.asarray(result.theta - net["theta"])
    selected = tta.leaf_mask(part, lambda path: not path.startswith(("head", "rot_head")))
    assert np.all(moved[~selected] == 0) and np.abs(moved[selected]).max() > 0
    loss = jax.jit(lambda th: tta.rotation_loss(rotation_logits, part.unravel(th), net["x"], net["mask"]))
    h = 1e-6
    for i in np.flatnonzero(selected)[::3]:
        e = jnp.zeros_like(net["theta"]).at[i].set(h)
        fd = (float(loss(net["theta"] + e)) - float(loss(net["theta"] - e))) / (2 * h)
        assert moved[i] == pytest.approx(-rate * fd, rel=1e-6, abs=1e-10)


def test_evaluate_runs_a_test_time_method_after_the_learners_steps(net):
    """The curve has K + 1 + J entries; entry K + j is the query loss after j TENT steps from theta_K,
    the same theta adapt_to_query returns; shuffling the query labels changes no adapted theta."""
    model = net["model"]
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    T, n = 4, 6
    train = CategoricalData(labels=jnp.tile(jnp.arange(C), (T, 2)), mask=jnp.ones((T, n), bool),
                            inputs=jax.random.uniform(k[0], (T, n, S, S)))
    val = CategoricalData(labels=jnp.tile(jnp.arange(C), (T, 2)), mask=jnp.ones((T, n), bool),
                          inputs=jax.random.uniform(k[1], (T, n, S, S)))
    tasks = hm.TaskBatch(train, val)
    learner = hm.maml(model, inner_steps=2, init_lr=0.05)
    state = learner.init(jax.random.PRNGKey(0), net["params"])
    method = tta.tent(model.partition, num_steps=3, optimizer=optax.sgd(0.5))
    curve = hm.evaluate(learner, state, tasks, 2, test_time=method)
    plain = hm.evaluate(learner, state, tasks, 2)
    assert curve.per_task.shape == (T, 6)
    np.testing.assert_allclose(curve.per_task[:, :3], plain.per_task, rtol=1e-12)
    before, after = tta.adapt_to_query(learner, state, tasks, 2, method)
    np.testing.assert_allclose(curve.per_task[:, -1], jax.jit(jax.vmap(model.generalisation_loss))(after, val), rtol=1e-10)
    shuffled = tasks._replace(val=val._replace(labels=jnp.flip(val.labels, axis=1)))
    np.testing.assert_array_equal(tta.adapt_to_query(learner, state, shuffled, 2, method)[1], after)
