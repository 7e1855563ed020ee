"""Few-shot classification data and models: the categorical family against scipy, the episode
sampler's protocol, the convnet against a direct NumPy computation, the Omniglot loader on a
tree written here, and the rendered glyph set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal, stats
from scipy.special import log_softmax, softmax

import hiermeta as hm
from hiermeta.families import CategoricalData, CategoricalLikelihood
from hiermeta.posterior import task_log_likelihood
from hiermeta.models import fewshot, glyphs, omniglot

C, D = 4, 3  # classes, input dims of the linear-softmax family


def linear_logits(theta, x):
    """One task: ``x (N, D) @ W (D, C) + b``."""
    return x @ theta["w"] + theta["b"]


@pytest.fixture(scope="module")
def softmax_model():
    params = {"w": jnp.zeros((D, C)), "b": jnp.zeros(C)}
    part = hm.ModulePartition.from_labels(params, {"w": "w", "b": "b"})
    return hm.HierarchicalModel(CategoricalLikelihood(linear_logits, C), part)


def random_categorical(rng, T=3, N=6):
    x = rng.normal(size=(T, N, D))
    labels = rng.integers(0, C, size=(T, N))
    mask = np.ones((T, N), bool)
    mask[1, 4:] = False
    labels[1, 4:] = -7  # padding may hold anything
    return CategoricalData.create(labels, x, mask=mask, num_classes=C)


# ---------------------------------------------------------------------------- the categorical family


def test_categorical_log_likelihood_matches_scipy(softmax_model):
    rng = np.random.default_rng(0)
    data = random_categorical(rng)
    theta = rng.normal(size=(3, softmax_model.partition.num_params))
    x, labels, mask = (np.asarray(a) for a in (data.inputs, data.labels, data.mask))
    expected, accuracy = np.zeros(3), np.zeros(3)
    for t in range(3):
        tree = softmax_model.partition.unravel(jnp.asarray(theta[t]))
        probs = softmax(x[t] @ np.asarray(tree["w"]) + np.asarray(tree["b"]), axis=-1)
        onehot = np.eye(C)[labels[t]]
        expected[t] = sum(stats.multinomial.logpmf(onehot[n], 1, probs[n]) for n in range(6) if mask[t, n])
        accuracy[t] = np.mean((probs.argmax(-1) == labels[t])[mask[t]])
    # per task, as the learners read it (one jitted program for all three tasks)
    per_task = jax.jit(jax.vmap(lambda th, d: (softmax_model.log_likelihood(th, d),
                                               softmax_model.generalisation_loss(th, d))))
    log_lik, loss = per_task(jnp.asarray(theta), data)
    np.testing.assert_allclose(log_lik, expected, rtol=1e-12)
    # the generalisation loss is the cross-entropy per observation (no constant)
    np.testing.assert_allclose(loss, -expected / mask.sum(axis=1), rtol=1e-12)
    # every task at once (the predictive's and NUTS's path: vmapped logits)
    np.testing.assert_allclose(task_log_likelihood(softmax_model, jnp.asarray(theta), data), expected, rtol=1e-12)
    lik = softmax_model.likelihood
    np.testing.assert_allclose(lik.accuracy(jax.vmap(softmax_model.partition.unravel)(jnp.asarray(theta)), data),
                               accuracy, rtol=1e-12)
    np.testing.assert_array_equal(lik.num_observations(data), [6, 4, 6])
    np.testing.assert_array_equal(lik.log_normaliser(data), 0.0)
    # the per-task MAP objective adds the Gaussian prior of Eq. 1
    phi, sigma = rng.normal(size=theta.shape[1]), np.array([0.7, 1.3])
    one = jax.tree_util.tree_map(lambda a: a[0], data)
    assert softmax_model.partition.names == ("b", "w")  # flattened in key order: b (C) then w (D x C)
    sd = np.where(np.arange(theta.shape[1]) < C, 0.7, 1.3)
    prior = stats.norm.logpdf(theta[0], phi, sd).sum()
    np.testing.assert_allclose(jax.jit(softmax_model.inner_objective)(jnp.asarray(theta[0]), phi, sigma, one),
                               -(prior + expected[0]), rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(labels=np.zeros((2, 3, 1), int)), "labels must have shape \\(tasks, observations\\)"),
        (dict(labels=np.zeros((2, 3))), "labels must be integer class indices"),
        (dict(labels=np.array([[0, 1, 4], [0, 0, 0]])), "label 4 is out of range for 4 classes"),
        (dict(labels=np.array([[0, -1, 2], [0, 0, 0]])), "labels must be >= 0"),
        (dict(mask=np.ones((2, 2), bool)), "mask must have shape \\(2, 3\\)"),
        (dict(mask=np.full((2, 3), 0.5)), "only 0/1"),
        (dict(mask=np.array([[1, 1, 1], [0, 0, 0]])), "task\\(s\\) \\[1\\] hold no observations"),
        (dict(inputs=np.zeros((2, 4, D))), "inputs leaves must have leading shape \\(2, 3\\)"),
        (dict(inputs=np.full((2, 3, D), np.nan)), "NaN or infinite"),
        (dict(labels=np.zeros((0, 3), int), inputs=np.zeros((0, 3, D))), "empty"),
    ],
)
def test_malformed_categorical_data(kwargs, match):
    args = dict(labels=np.zeros((2, 3), int), inputs=np.zeros((2, 3, D)), num_classes=C) | kwargs
    with pytest.raises(ValueError, match=match):
        CategoricalData.create(**args)


def test_padding_labels_are_ignored_and_logit_shapes_checked(softmax_model):
    rng = np.random.default_rng(1)
    data = random_categorical(rng)
    np.testing.assert_array_equal(np.asarray(data.labels)[1, 4:], 0)  # sanitised padding
    lik = softmax_model.likelihood
    lik.check(data, "data")
    bad = data._replace(labels=data.labels.at[0, 0].set(C))
    with pytest.raises(ValueError, match="out of range"):
        lik.check(bad, "support")
    with pytest.raises(ValueError, match="expected CategoricalData"):
        lik.check((data.labels, data.mask, data.inputs), "support")
    wrong = CategoricalLikelihood(linear_logits, C + 1)
    theta = jax.vmap(softmax_model.partition.unravel)(jnp.zeros((3, softmax_model.partition.num_params)))
    with pytest.raises(ValueError, match="logits of shape \\(6, 4\\) per task, expected \\(6, 5\\)"):
        wrong.logits(theta, data)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        CategoricalLikelihood(linear_logits, 1)


@pytest.mark.slow
def test_nuts_on_the_categorical_family_matches_quadrature():
    """One task, two classes, logits (0, theta x_n): the posterior of theta at fixed phi, sigma."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 12))
    labels = (rng.uniform(size=(1, 12)) < 1 / (1 + np.exp(-0.8 * x))).astype(int)
    data = CategoricalData.create(labels, x, num_classes=2)
    lik = CategoricalLikelihood(lambda th, xs: jnp.stack([jnp.zeros_like(xs), th["a"] * xs], -1), 2)
    model = hm.HierarchicalModel(lik, hm.ModulePartition.shared({"a": jnp.zeros(())}))
    phi, sigma = 0.3, 1.5
    grid = np.linspace(-8, 8, 20001)
    log_post = stats.norm.logpdf(grid, phi, sigma) + (
        labels[0] * grid[:, None] * x[0] - np.logaddexp(0, grid[:, None] * x[0])).sum(-1)
    w = np.exp(log_post - log_post.max())
    mean = np.sum(w * grid) / w.sum()
    sd = np.sqrt(np.sum(w * (grid - mean) ** 2) / w.sum())
    result = hm.run_nuts(model, data, jax.random.PRNGKey(0), num_warmup=300, num_samples=1000, num_chains=2,
                         fixed={"phi": [phi], "sigma": sigma}, progress_bar=False)
    draws = result.samples["theta"][..., 0, 0].ravel()
    mcse = sd / np.sqrt(min(len(draws), 400))  # conservative effective size
    assert abs(draws.mean() - mean) < 4 * mcse, (draws.mean(), mean)
    assert draws.std() == pytest.approx(sd, rel=0.15)
    assert result.num_divergences == 0


# ---------------------------------------------------------------------------- episodes


def coded_dataset(num_classes=12, instances=6, size=4, alphabets=("a", "b", "c", "d")):
    """Images whose pixels say which class and instance they are."""
    images = np.zeros((num_classes, instances, size, size), np.uint8)
    images[:, :, 0, 0] = np.arange(num_classes)[:, None]
    images[:, :, 0, 1] = np.arange(instances)[None, :]
    class_alphabet = np.arange(num_classes) % len(alphabets)
    names = tuple(f"{alphabets[a]}/{k}" for k, a in enumerate(class_alphabet))
    return fewshot.FewShotDataset(images, names, tuple(alphabets), class_alphabet)


def test_splits_are_class_disjoint_by_alphabet():
    ds = coded_dataset()
    splits = fewshot.split_classes(ds, ["b"], ["c", "d"])
    np.testing.assert_array_equal(splits["train"], [0, 4, 8])
    np.testing.assert_array_equal(splits["val"], [1, 5, 9])
    np.testing.assert_array_equal(splits["test"], [2, 3, 6, 7, 10, 11])
    with pytest.raises(ValueError, match="unknown alphabet 'z'"):
        fewshot.split_classes(ds, ["z"], [])
    with pytest.raises(ValueError, match="in both the validation and the test split"):
        fewshot.split_classes(ds, ["b"], ["b"])


def test_episodes_follow_the_k_way_n_shot_protocol():
    ds = coded_dataset()
    classes = fewshot.split_classes(ds, ["b"], [])["train"]  # 9 classes
    ways, shots, queries = 3, 2, 3
    sample = fewshot.episode_sampler(ds.images, classes, ways=ways, shots=shots, queries=queries, num_tasks=200)
    batch = jax.jit(sample)(jax.random.PRNGKey(0))  # jittable: fit draws episodes inside its compiled chunk
    assert batch.train.inputs.shape == (200, ways * shots, 4, 4) and batch.val.inputs.shape == (200, ways * queries, 4, 4)
    code = lambda split: (np.round(np.asarray(split.inputs)[..., 0, 0] * 255).astype(int),
                          np.round(np.asarray(split.inputs)[..., 0, 1] * 255).astype(int))
    (cls_s, inst_s), (cls_q, inst_q) = code(batch.train), code(batch.val)
    lab_s, lab_q = np.asarray(batch.train.labels), np.asarray(batch.val.labels)
    assert set(np.unique(cls_s)) <= set(classes.tolist()) and set(np.unique(cls_q)) <= set(classes.tolist())
    label_of = {}
    for t in range(200):
        mapping = {}
        for c, y in zip(np.r_[cls_s[t], cls_q[t]], np.r_[lab_s[t], lab_q[t]]):
            assert mapping.setdefault(y, c) == c  # one class per label within an episode
        assert sorted(mapping) == list(range(ways)) and len(set(mapping.values())) == ways
        for y in range(ways):  # support and query instances of a class are distinct
            s_inst = inst_s[t][lab_s[t] == y]
            q_inst = inst_q[t][lab_q[t] == y]
            assert len(s_inst) == shots and len(q_inst) == queries
            assert len(set(s_inst.tolist()) | set(q_inst.tolist())) == shots + queries
        for y, c in mapping.items():
            label_of.setdefault(c, []).append(y)
    # labels are permuted per episode: every class shows up under every label, about equally often
    for c, ys in label_of.items():
        counts = np.bincount(ys, minlength=ways)
        assert counts.min() > 0.15 * len(ys), (c, counts)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ways=10), "needs 10 classes; this split has 9"),
        (dict(shots=4, queries=3), "shots \\+ queries = 7 but each class has only 6"),
        (dict(ways=1), "ways must be an integer >= 2"),
        (dict(classes=np.array([0, 0, 1])), "distinct"),
        (dict(classes=np.array([0, 12])), "class indices must lie in 0..11"),
        (dict(images=np.zeros((12, 6, 4, 4))), "uint8"),
    ],
)
def test_episode_sampler_rejects_bad_protocols(kwargs, match):
    ds = coded_dataset()
    args = dict(images=ds.images, classes=np.arange(9), ways=3, shots=2, queries=3, num_tasks=2) | kwargs
    images, classes = args.pop("images"), args.pop("classes")
    with pytest.raises(ValueError, match=match):
        fewshot.episode_sampler(images, classes, **args)


def test_confidence_intervals():
    rng = np.random.default_rng(3)
    values = rng.uniform(size=600)
    mean, half = fewshot.mean_ci95(values)
    lo, hi = stats.norm.interval(0.95, loc=values.mean(), scale=stats.sem(values))
    assert mean == pytest.approx(values.mean(), rel=1e-12)
    assert half == pytest.approx((hi - lo) / 2, rel=1e-4)  # 1.96 for the 97.5% normal quantile
    with pytest.raises(ValueError, match="at least 2 values"):
        fewshot.mean_ci95([0.5])


# ---------------------------------------------------------------------------- the convnet


def numpy_convnet(params, images, groups, eps=1e-5):
    """The convnet written out with scipy's 2-D cross-correlation, one image at a time."""
    out = []
    for img in np.asarray(images, float):
        x = img[..., None]
        for i in range(len(params) - 1):
            p = {k: np.asarray(v) for k, v in params[f"block{i}"].items()}
            H, W, _ = x.shape
            F = p["kernel"].shape[-1]
            y = np.zeros((H, W, F))
            for f in range(F):
                for c in range(x.shape[-1]):
                    y[..., f] += signal.correlate2d(x[..., c], p["kernel"][:, :, c, f], mode="same")
            y += p["bias"]
            g = y.reshape(H, W, groups, F // groups)
            g = (g - g.mean(axis=(0, 1, 3), keepdims=True)) / np.sqrt(g.var(axis=(0, 1, 3), keepdims=True) + eps)
            y = np.maximum(g.reshape(H, W, F) * p["scale"] + p["offset"], 0)
            h, w = H // 2, W // 2
            x = y[: 2 * h, : 2 * w].reshape(h, 2, w, 2, F).max(axis=(1, 3))
        out.append(x.ravel())
    features = np.stack(out)
    return features, features @ np.asarray(params["head"]["w"]) + np.asarray(params["head"]["b"])


@pytest.mark.parametrize("conv", ["lax", "im2col"])
def test_convnet_matches_numpy_and_has_one_module_per_layer(conv):
    net = fewshot.convnet(ways=3, image_size=9, filters=4, blocks=2, groups=2, conv=conv)
    params = net.init(jax.random.PRNGKey(0))
    params["block0"]["scale"] = 1.0 + 0.1 * jnp.arange(4.0)  # non-trivial norm parameters
    params["block1"]["offset"] = 0.05 * jnp.arange(4.0)
    images = jax.random.uniform(jax.random.PRNGKey(1), (5, 9, 9))
    features, logits = numpy_convnet(params, images, groups=2)
    assert net.feature_size == 2 and net.embedding_size == 16  # 9 -> 4 -> 2 (floor)
    both = jax.jit(lambda p, x: (net.embed(p, x), net.logits(p, x)))
    got_features, got_logits = both(params, images)
    np.testing.assert_allclose(got_features, features, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_logits, logits, rtol=1e-10, atol=1e-12)
    # per-image normalisation: an image's logits do not depend on the rest of its batch
    others = images.at[2:].set(jax.random.uniform(jax.random.PRNGKey(2), (3, 9, 9)))
    np.testing.assert_allclose(both(params, others)[1][:2], logits[:2], rtol=1e-12)
    model = fewshot.make_model(net, params)
    part = model.partition
    assert part.names == ("block0", "block1", "head")
    np.testing.assert_array_equal(part.module_sizes, [9 * 4 + 3 * 4, 9 * 4 * 4 + 3 * 4, 16 * 3 + 3])
    full = fewshot.convnet(ways=5, image_size=28)
    assert full.embedding_size == 64 and full.layer_names[-1] == "head"
    # 64 filters: 9 x 64 + 3 x 64, then 3 x (9 x 64 x 64 + 3 x 64), then 64 x 5 + 5
    assert fewshot.make_model(full).partition.num_params == 768 + 3 * 37_056 + 325
    for kwargs, match in ((dict(filters=6, groups=4), "must divide"), (dict(image_size=8), "at least 16 pixels"),
                          (dict(ways=1), "ways must be"), (dict(conv="fft"), "conv must be")):
        with pytest.raises(ValueError, match=match):
            fewshot.convnet(**(dict(ways=5, image_size=28) | kwargs))


# ---------------------------------------------------------------------------- Omniglot and glyphs


def write_omniglot_tree(root, drawings=3):
    """A tiny Omniglot layout: each PNG a white 105 x 105 page with a black square at a known spot."""
    from PIL import Image

    layout = {"images_background": {"Alpha": 2, "Beta": 1}, "images_evaluation": {"Gamma": 2}}
    spots = {}
    for split, alphabets in layout.items():
        for alphabet, chars in alphabets.items():
            for c in range(chars):
                folder = root / split / alphabet / f"character{c + 1:02d}"
                folder.mkdir(parents=True)
                for d in range(drawings):
                    page = np.full((105, 105), 255, np.uint8)
                    r, col = 7 * (len(spots) % 12), 7 * d
                    page[r: r + 7, col: col + 7] = 0
                    Image.fromarray(page).save(folder / f"{c:04d}_{d:02d}.png")
                spots[(split, alphabet, c)] = len(spots) % 12
    return spots


def test_omniglot_loader_reads_the_standard_layout(tmp_path):
    spots = write_omniglot_tree(tmp_path)
    ds = omniglot.load_omniglot(tmp_path, image_size=15)
    assert ds.images.shape == (5, 3, 15, 15) and ds.images.dtype == np.uint8
    assert ds.alphabets == ("background/Alpha", "background/Beta", "evaluation/Gamma")
    assert ds.class_names[0] == "background/Alpha/character01" and ds.class_names[-1] == "evaluation/Gamma/character02"
    np.testing.assert_array_equal(ds.class_alphabet, [0, 0, 1, 2, 2])
    for k, ((split, alphabet, c), row) in enumerate(spots.items()):
        for d in range(3):  # 105 -> 15 is 7 -> 1 pixel: the black square is exactly one inked pixel
            expected = np.zeros((15, 15), np.uint8)
            expected[row, d] = 255
            np.testing.assert_array_equal(ds.images[k, d], expected)
    splits = omniglot.background_evaluation_split(ds, num_val_alphabets=1)
    np.testing.assert_array_equal(splits["train"], [0, 1])
    np.testing.assert_array_equal(splits["val"], [2])
    np.testing.assert_array_equal(splits["test"], [3, 4])
    rotated = omniglot.with_rotations(ds)
    assert rotated.num_classes == 20 and rotated.class_names[5] == "background/Alpha/character01/rot90"
    np.testing.assert_array_equal(rotated.images[5], np.rot90(ds.images[0], 1, axes=(1, 2)))
    np.testing.assert_array_equal(rotated.class_alphabet[5:10], ds.class_alphabet)


def test_omniglot_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        omniglot.load_omniglot(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="images_background not found"):
        omniglot.load_omniglot(tmp_path)
    write_omniglot_tree(tmp_path)
    next((tmp_path / "images_evaluation" / "Gamma" / "character02").glob("*.png")).unlink()
    with pytest.raises(ValueError, match="different numbers of drawings \\(2 to 3"):
        omniglot.load_omniglot(tmp_path)
    (tmp_path / "images_evaluation" / "Gamma" / "character03").mkdir()
    with pytest.raises(ValueError, match="holds no PNG files"):
        omniglot.load_omniglot(tmp_path)


def test_glyph_set_renders_distinct_characters_and_caches(tmp_path):
    config = glyphs.GlyphConfig(image_size=12, instances=5, alphabets=("Latin", "Greek"))
    ds = glyphs.glyph_dataset(config, cache_dir=tmp_path)
    assert ds.alphabets == ("Latin", "Greek") and ds.images.shape[1:] == (5, 12, 12)
    names = set(ds.class_names)
    assert {"Latin/U+0041", "Latin/U+006F", "Latin/U+004F", "Greek/U+03B1"} <= names  # A, o, O, alpha
    assert "Greek/U+0391" not in names and "Greek/U+039F" not in names  # Alpha, Omicron look like A, O
    assert 52 + 15 < ds.num_classes <= 52 + 49
    ink = ds.images.reshape(ds.num_classes, 5, -1).astype(float)
    assert np.all(ink.max(axis=-1) > 60)  # every instance is inked (thin strokes stay grey at 12 px)
    assert np.all(ink.std(axis=1).mean(axis=-1) > 1)  # instances of a class differ (faces, affine)
    files = list(tmp_path.glob("glyphs-*.npz"))
    assert len(files) == 1
    again = glyphs.glyph_dataset(config, cache_dir=tmp_path)  # from the cache
    np.testing.assert_array_equal(again.images, ds.images)
    assert again.class_names == ds.class_names
    rebuilt = glyphs.glyph_dataset(config, cache_dir=tmp_path, use_cache=False)  # deterministic
    np.testing.assert_array_equal(rebuilt.images, ds.images)
    glyphs.glyph_dataset(config._replace(seed=1), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("glyphs-*.npz"))) == 2  # keyed by the parameters
    with pytest.raises(ValueError, match="unknown alphabets \\['Klingon'\\]"):
        glyphs.glyph_dataset(alphabets=("Klingon",), cache_dir=tmp_path)


# ---------------------------------------------------------------------------- alphabet tasks, augmentation


def _coded_images(C, I, size=8):
    """Images whose pixel (0, 0) is the class and (0, 1) the instance: what a sampler drew is readable."""
    images = np.zeros((C, I, size, size), np.uint8)
    images[:, :, 0, 0] = np.arange(C)[:, None]
    images[:, :, 0, 1] = np.arange(I)[None, :]
    return images


def test_alphabet_sampler_draws_one_alphabet_per_task_with_disjoint_train_and_validation():
    C, I = 60, 20
    images = _coded_images(C, I)
    class_alphabet = np.repeat(np.arange(6), 10)  # 6 alphabets of 10 characters ...
    class_alphabet[35:40] = 4  # ... but alphabet 3 has 5 and alphabet 4 has 15
    classes = np.arange(C)[np.isin(class_alphabet, [0, 3, 4, 5])]
    sample = fewshot.alphabet_sampler(images, classes, class_alphabet, ways=8, train_shots=15, val_shots=5,
                                      num_tasks=64)
    batch = jax.jit(sample)(jax.random.PRNGKey(0))
    seen = set()
    for t in range(64):
        tr = np.rint(np.asarray(batch.train.inputs[t]) * 255).astype(int)
        va = np.rint(np.asarray(batch.val.inputs[t]) * 255).astype(int)
        cls_tr, cls_va = tr[:, 0, 0].reshape(8, 15), va[:, 0, 0].reshape(8, 5)
        assert np.all(cls_tr == cls_tr[:, :1]) and np.all(cls_va == cls_tr[:, :5])  # label j <-> one class
        assert len(set(cls_tr[:, 0])) == 8
        alphabets = set(class_alphabet[cls_tr[:, 0]])
        assert len(alphabets) == 1 and alphabets <= {0, 4, 5}  # one alphabet with >= 8 characters of the split
        seen |= alphabets
        inst = np.concatenate([tr[:, 0, 1].reshape(8, 15), va[:, 0, 1].reshape(8, 5)], axis=1)
        assert all(len(set(row)) == 20 for row in inst)  # 15 + 5 distinct instances per character
        np.testing.assert_array_equal(np.asarray(batch.train.labels[t]), np.repeat(np.arange(8), 15))
    assert seen == {0, 4, 5}
    with pytest.raises(ValueError, match="no alphabet"):
        fewshot.alphabet_sampler(images, classes, class_alphabet, ways=16, num_tasks=1)
    with pytest.raises(ValueError, match="instances"):
        fewshot.alphabet_sampler(images, classes, class_alphabet, ways=5, train_shots=16, val_shots=5, num_tasks=1)


def test_affine_warp_equals_scipy_affine_transform():
    from scipy.ndimage import affine_transform

    rng = np.random.default_rng(0)
    images = rng.uniform(size=(3, 9, 9))
    forward = np.stack([np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1.0, sh], [0, 1]]) * sc
                        for a, sh, sc in [(0.3, 0.1, 1.1), (-0.2, 0.0, 0.9), (0.0, -0.15, 1.0)]])
    shift = rng.uniform(-1.5, 1.5, size=(3, 2))
    got = np.asarray(fewshot.affine_warp(jnp.asarray(images), jnp.asarray(forward), jnp.asarray(shift)))
    c = np.full(2, 4.0)
    for n in range(3):
        inv = np.linalg.inv(forward[n])
        want = affine_transform(images[n], inv, offset=c - inv @ (c + shift[n]), order=1, mode="grid-constant")
        np.testing.assert_allclose(got[n], want, atol=1e-12)


def test_augmentation_is_the_identity_at_zero_ranges_and_varies_otherwise():
    images = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 8, 8)))
    still = fewshot.Augmentation(rotation=0.0, shear=0.0, scale=(1.0, 1.0), translate=0.0)
    np.testing.assert_allclose(fewshot.augment_images(jax.random.PRNGKey(0), images, still), images, atol=1e-12)
    moved = fewshot.augment_images(jax.random.PRNGKey(0), images, fewshot.Augmentation())
    assert np.all(np.abs(np.asarray(moved) - np.asarray(images)).max(axis=(1, 2)) > 1e-3)
    with pytest.raises(ValueError, match="augment"):
        fewshot.episode_sampler(_coded_images(5, 4), np.arange(5), ways=2, shots=1, queries=1, num_tasks=1,
                                augment="yes")
