"""Few-shot image classification: k-way n-shot episodes, the 4-block convnet, and episodic scores.

The protocol (Vinyals et al. 2016; Finn et al. 2017): a labelled image set is split by class into
meta-train, meta-validation and meta-test classes (disjoint).  A task (an *episode*) draws
``ways`` classes of one split, gives them the labels ``0..ways-1`` in a random order (so a class's
label changes from episode to episode and nothing can be memorised per class), and draws
``shots`` support and ``queries`` query images of each.  A learner adapts to the support and is
scored on the query: accuracy and cross-entropy per query image, averaged over episodes, with a
95% confidence interval (+- 1.96 standard errors) over at least 600 test episodes.

The network is the standard 4-block convnet of the few-shot literature, a pure function of a
parameter pytree:

    block_i:  conv 3x3 (``filters`` channels, stride 1, 'same' padding) -> group norm -> ReLU
              -> max-pool 2x2 (floor)                                    i = 0..blocks-1
    head:     flatten -> linear (``ways`` logits)

with one module per layer for :class:`hiermeta.ModulePartition` (``block0`` .. ``block3``,
``head``: the conv kernel, bias and the norm's scale and offset of a block share a sigma).

Normalisation: MAML normalises by batch statistics of each task's batch, which makes one
image's prediction depend on the other images of its batch (transductive), so the likelihood
would not be a product over observations.  Group norm (Wu and He 2018) normalises each image
over groups of channels and its pixels: per image, so it works the same under ``vmap`` over
tasks, for any batch and for padding, and ``p(D_t | theta_t)`` stays ``prod_n p(y_n | x_n, theta_t)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hiermeta import HierarchicalModel, MetaLearner, MetaState, ModulePartition, TaskBatch
from hiermeta.families import CategoricalData, CategoricalLikelihood

__all__ = [
    "FewShotDataset",
    "check_dataset",
    "split_classes",
    "episode_sampler",
    "Augmentation",
    "augment_images",
    "affine_warp",
    "alphabet_sampler",
    "ConvNet",
    "convnet",
    "layer_labels",
    "make_model",
    "EpisodeScores",
    "mean_ci95",
    "evaluate_episodes",
]


# ---------------------------------------------------------------------------- data


class FewShotDataset(NamedTuple):
    """A labelled image set for few-shot learning.

    Attributes:
      images: ``(C, I, H, W)`` uint8, ``I`` instances of each of ``C`` classes; ink is high
        (255), background 0.
      class_names: ``C`` names (e.g. ``"Greek/U+03B1"`` or ``"Latin/character01"``).
      alphabets: the alphabet names.
      class_alphabet: ``(C,)`` index into ``alphabets`` of each class.
    """

    images: np.ndarray
    class_names: tuple
    alphabets: tuple
    class_alphabet: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0])

    @property
    def instances(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[2])


def check_dataset(dataset: FewShotDataset) -> None:
    """Raise ``ValueError`` naming the problem if ``dataset`` is malformed."""
    images = np.asarray(dataset.images)
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must have shape (classes, instances, size, size), got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {images.dtype}")
    C = images.shape[0]
    if len(dataset.class_names) != C or np.shape(dataset.class_alphabet) != (C,):
        raise ValueError(
            f"{C} classes of images but {len(dataset.class_names)} class names and "
            f"{np.shape(dataset.class_alphabet)} alphabet indices"
        )
    idx = np.asarray(dataset.class_alphabet)
    if C and (idx.min() < 0 or idx.max() >= len(dataset.alphabets)):
        raise ValueError(f"class_alphabet must index the {len(dataset.alphabets)} alphabets")


def split_classes(
    dataset: FewShotDataset, val_alphabets: Sequence[str], test_alphabets: Sequence[str]
) -> dict[str, np.ndarray]:
    """Class-disjoint splits by alphabet: ``{"train", "val", "test"}`` -> class indices.

    The classes of ``val_alphabets`` and ``test_alphabets`` form the meta-validation and meta-test
    splits; every other alphabet's classes are meta-training classes.
    """
    check_dataset(dataset)
    known = set(dataset.alphabets)
    for name in (*val_alphabets, *test_alphabets):
        if name not in known:
            raise ValueError(f"unknown alphabet {name!r}; the data set has {sorted(known)}")
    both = set(val_alphabets) & set(test_alphabets)
    if both:
        raise ValueError(f"alphabets {sorted(both)} are in both the validation and the test split")
    names = np.asarray(dataset.alphabets, dtype=object)[np.asarray(dataset.class_alphabet)]
    val = np.isin(names, list(val_alphabets))
    test = np.isin(names, list(test_alphabets))
    return {
        "train": np.flatnonzero(~val & ~test),
        "val": np.flatnonzero(val),
        "test": np.flatnonzero(test),
    }


def episode_sampler(
    images,
    classes,
    *,
    ways: int,
    shots: int,
    queries: int,
    num_tasks: int,
    augment: Optional["Augmentation"] = None,
    dtype=None,
) -> Callable[[jax.Array], TaskBatch]:
    """``sample(key) -> TaskBatch`` of ``num_tasks`` k-way n-shot episodes from ``classes``.

    Jittable: the images of ``classes`` become a constant of the compiled program, so
    ``hiermeta.fit`` draws the episodes inside its compiled chunk.  Per episode: ``ways``
    distinct classes in a random order (class ``j`` of the draw gets label ``j``: the labels are
    a fresh random permutation per episode), and ``shots + queries`` distinct instances of each,
    the first ``shots`` the support (``train``), the rest the query (``val``).  Inputs are
    ``(T, N, H, W)`` floats in [0, 1]; labels ``(T, N)`` ``int32``, grouped by label.

    Args:
      images: ``(C, I, H, W)`` uint8 (a :class:`FewShotDataset`'s ``images``).
      classes: indices of the classes to draw from (one split of :func:`split_classes`).
      augment: an :class:`Augmentation` (every image under its own random affine map), or None.
      dtype: float dtype of the inputs (default: JAX's default float).
    """
    images = np.asarray(images)
    classes = np.asarray(classes)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 of shape (classes, instances, H, W), got {images.dtype} {images.shape}")
    for name, value, low in (("ways", ways, 2), ("shots", shots, 1), ("queries", queries, 1), ("num_tasks", num_tasks, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value}")
    if classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError("classes must be a 1-D array of class indices")
    if classes.size and (classes.min() < 0 or classes.max() >= images.shape[0]):
        raise ValueError(f"class indices must lie in 0..{images.shape[0] - 1}")
    if np.unique(classes).size != classes.size:
        raise ValueError("classes must be distinct")
    if classes.size < ways:
        raise ValueError(f"a {ways}-way episode needs {ways} classes; this split has {classes.size}")
    instances = images.shape[1]
    if shots + queries > instances:
        raise ValueError(f"shots + queries = {shots + queries} but each class has only {instances} instances")
    augment = _check_augmentation(augment)
    pool = jnp.asarray(images[classes])  # only this split's images enter the program
    dtype = dtype or jnp.zeros(()).dtype
    ways, shots, queries = int(ways), int(shots), int(queries)

    def one(key):
        k_class, k_inst = jax.random.split(key)
        k_aug = jax.random.fold_in(key, 1)
        # the ranks of uniform draws are a uniformly random permutation (argsort compiles faster
        # than jax.random.permutation under vmap)
        chosen = jnp.argsort(jax.random.uniform(k_class, (pool.shape[0],)))[:ways]  # label j <-> chosen[j]
        inst = jnp.argsort(jax.random.uniform(k_inst, (ways, instances)), axis=-1)[:, : shots + queries]
        x = pool[chosen[:, None], inst].astype(dtype) / 255.0  # (ways, shots + queries, H, W)
        return _labelled_task(x, shots, k_aug, augment)

    def sample(key) -> TaskBatch:
        return jax.vmap(one)(jax.random.split(key, int(num_tasks)))

    return sample


class Augmentation(NamedTuple):
    """Random affine augmentation of each image (the "augmented Omniglot" of Leap and WarpGrad).

    Per image, independently: rotation uniform in ``+-rotation`` degrees, shear uniform in
    ``+-shear``, isotropic scale uniform in ``scale``, translation uniform in ``+-translate`` of
    the side per axis, about the image centre; bilinear interpolation, zero (background) outside.
    """

    rotation: float = 15.0
    shear: float = 0.1
    scale: tuple = (0.9, 1.1)
    translate: float = 0.08


def augment_images(key, images, augmentation: Augmentation):
    """``images`` ``(N, H, W)`` floats, each under its own random affine map (:class:`Augmentation`); jittable."""
    N, H, W = images.shape
    k_rot, k_shear, k_scale, k_shift = jax.random.split(key, 4)
    angle = jnp.deg2rad(jax.random.uniform(k_rot, (N,), minval=-augmentation.rotation, maxval=augmentation.rotation))
    shear = jax.random.uniform(k_shear, (N,), minval=-augmentation.shear, maxval=augmentation.shear)
    scale = jax.random.uniform(k_scale, (N,), minval=augmentation.scale[0], maxval=augmentation.scale[1])
    shift = jax.random.uniform(k_shift, (N, 2), minval=-augmentation.translate, maxval=augmentation.translate)
    shift = shift * jnp.asarray([H, W], images.dtype)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    # forward map A = R(angle) [[1, shear], [0, 1]] scale; output pixel o reads input A^-1 (o - c - shift) + c
    a = jnp.stack([jnp.stack([cos, cos * shear - sin], -1), jnp.stack([sin, sin * shear + cos], -1)], -2)
    return affine_warp(images, a * scale[:, None, None], shift)


def affine_warp(images, forward, shift):
    """Each image ``(N, H, W)`` under ``x -> forward_n (x - c) + c + shift_n`` (``c`` the centre,
    coordinates (row, column)); bilinear, zero outside: output pixel ``o`` reads the input at
    ``forward_n^-1 (o - c - shift_n) + c`` (``scipy.ndimage.affine_transform`` with ``order=1,
    mode="grid-constant"``: zeros beyond the edge, interpolated into)."""
    N, H, W = images.shape
    inverse = jnp.linalg.inv(forward)  # (N, 2, 2)
    centre = jnp.asarray([(H - 1) / 2.0, (W - 1) / 2.0], images.dtype)
    grid = jnp.stack(jnp.meshgrid(jnp.arange(H, dtype=images.dtype), jnp.arange(W, dtype=images.dtype),
                                  indexing="ij"), -1)  # (H, W, 2)

    def one(image, inv, d):
        source = jnp.einsum("ij,hwj->ihw", inv, grid - centre - d) + centre[:, None, None]
        return jax.scipy.ndimage.map_coordinates(image, [source[0], source[1]], order=1, mode="constant", cval=0.0)

    return jax.vmap(one)(images, inverse, jnp.asarray(shift, images.dtype))


def _labelled_task(x, n_train: int, key, augment: Optional[Augmentation]) -> TaskBatch:
    """A task from ``x`` ``(ways, n_train + n_val, H, W)`` floats: row ``j`` is class ``j``; its first
    ``n_train`` images are ``train``, the rest ``val`` (labels grouped); augmented if asked."""
    ways, n, H, W = x.shape
    if augment is not None:
        x = augment_images(key, x.reshape(-1, H, W), augment).reshape(x.shape)
    labels = jnp.arange(ways, dtype=jnp.int32)

    def split(x_part):
        y = jnp.repeat(labels, x_part.shape[1])
        return CategoricalData(labels=y, mask=jnp.ones(y.shape, bool), inputs=x_part.reshape(-1, H, W))

    return TaskBatch(train=split(x[:, :n_train]), val=split(x[:, n_train:]))


def _check_augmentation(augment) -> Optional[Augmentation]:
    if augment is None:
        return None
    if not isinstance(augment, Augmentation):
        raise ValueError(f"augment must be a fewshot.Augmentation or None, got {type(augment).__name__}")
    lo, hi = augment.scale
    if not (augment.rotation >= 0 and augment.shear >= 0 and augment.translate >= 0 and 0 < lo <= hi):
        raise ValueError(f"augmentation ranges must be >= 0 and 0 < scale low <= high, got {augment}")
    return augment


def alphabet_sampler(
    images,
    classes,
    class_alphabet,
    *,
    ways: int = 20,
    train_shots: int = 15,
    val_shots: int = 5,
    num_tasks: int,
    augment: Optional[Augmentation] = None,
    dtype=None,
) -> Callable[[jax.Array], TaskBatch]:
    """``sample(key) -> TaskBatch`` of alphabet tasks (the protocol of Leap, WarpGrad and the NeurIPS
    version of the shrinkage paper on Omniglot): each task is one alphabet.

    Per task: an alphabet drawn uniformly from those of ``classes`` with at least ``ways``
    characters (the others are never drawn), ``ways`` of its characters in a random order (label
    ``j`` for the ``j``-th), and for each a random ``train_shots`` of its instances as the task's
    training data (``train``) and ``val_shots`` others as its validation data (``val``); every image
    under its own random affine map when ``augment`` is given.  Jittable, like
    :func:`episode_sampler` (the split's images are a constant of the compiled program).

    Args:
      images: ``(C, I, H, W)`` uint8; ``class_alphabet``: ``(C,)`` alphabet index of each class.
      classes: the split's class indices (e.g. ``split_classes(...)["train"]``).
    """
    images, classes = np.asarray(images), np.asarray(classes)
    class_alphabet = np.asarray(class_alphabet)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 of shape (classes, instances, H, W), got {images.dtype} {images.shape}")
    if class_alphabet.shape != images.shape[:1]:
        raise ValueError(f"class_alphabet must have shape ({images.shape[0]},), got {class_alphabet.shape}")
    for name, value, low in (("ways", ways, 2), ("train_shots", train_shots, 1), ("val_shots", val_shots, 1),
                             ("num_tasks", num_tasks, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value}")
    if classes.ndim != 1 or np.unique(classes).size != classes.size or (classes.size and (
            classes.min() < 0 or classes.max() >= images.shape[0])):
        raise ValueError("classes must be distinct class indices")
    instances = images.shape[1]
    if train_shots + val_shots > instances:
        raise ValueError(f"train_shots + val_shots = {train_shots + val_shots} but each class has only {instances} instances")
    augment = _check_augmentation(augment)
    groups = [classes[class_alphabet[classes] == a] for a in np.unique(class_alphabet[classes])]
    groups = [g for g in groups if g.size >= ways]
    if not groups:
        raise ValueError(f"no alphabet of this split has {ways} characters (a {ways}-way alphabet task needs them)")
    position = {int(c): i for i, c in enumerate(classes)}  # class index -> its row in the pool
    table = np.zeros((len(groups), max(g.size for g in groups)), np.int32)  # each alphabet's rows, padded
    for a, g in enumerate(groups):
        table[a, : g.size] = [position[int(c)] for c in g]
    counts = jnp.asarray([g.size for g in groups])
    table = jnp.asarray(table)
    pool = jnp.asarray(images[classes])
    dtype = dtype or jnp.zeros(()).dtype
    ways, n_tr, n_val = int(ways), int(train_shots), int(val_shots)

    def one(key):
        k_alpha, k_class, k_inst, k_aug = jax.random.split(key, 4)
        a = jax.random.randint(k_alpha, (), 0, len(groups))
        u = jnp.where(jnp.arange(table.shape[1]) < counts[a], jax.random.uniform(k_class, (table.shape[1],)), 2.0)
        chosen = table[a, jnp.argsort(u)[:ways]]  # label j <-> chosen[j]
        inst = jnp.argsort(jax.random.uniform(k_inst, (ways, instances)), axis=-1)[:, : n_tr + n_val]
        x = pool[chosen[:, None], inst].astype(dtype) / 255.0  # (ways, n_tr + n_val, H, W)
        return _labelled_task(x, n_tr, k_aug, augment)

    def sample(key) -> TaskBatch:
        return jax.vmap(one)(jax.random.split(key, int(num_tasks)))

    return sample


# ---------------------------------------------------------------------------- the network


def _conv_lax(x, kernel, bias):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def _conv_im2col(x, kernel, bias):
    """The same 3x3 'same' convolution as one matrix product of the 9 shifted copies of ``x``.

    Under ``vmap`` over tasks (a kernel per task) this is a batched matrix product, where XLA's
    CPU backend lowers ``conv_general_dilated`` to a grouped convolution that is ~2.5x slower here.
    """
    N, H, W, C = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[:, i: i + H, j: j + W, :] for i in range(3) for j in range(3)], axis=-1)
    return patches @ kernel.reshape(9 * C, -1) + bias


_CONVS = {"lax": _conv_lax, "im2col": _conv_im2col}


def _group_norm(x, scale, offset, groups: int, eps: float):
    """Normalise each image over its pixels and the channels of each group; then scale and offset."""
    N, H, W, C = x.shape
    xg = x.reshape(N, H, W, groups, C // groups)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
    xg = (xg - mean) * jax.lax.rsqrt(var + eps)
    return xg.reshape(N, H, W, C) * scale + offset


def _max_pool(x):
    """2x2 max-pool, stride 2, dropping an odd last row/column (floor, as ``MaxPool2d(2)``)."""
    N, H, W, C = x.shape
    h, w = H // 2, W // 2
    return x[:, : 2 * h, : 2 * w].reshape(N, h, 2, w, 2, C).max(axis=(2, 4))


class ConvNet(NamedTuple):
    """The 4-block convnet (see the module docstring); build it with :func:`convnet`.

    Parameters (``init``): ``{"block0": {"kernel", "bias", "scale", "offset"}, ..., "head":
    {"w": (E, ways), "b": (ways,)}}``.  ``embed(params, images)`` is the feature extractor (``(N, E)``
    features), ``logits(params, images) = embed @ head.w + head.b``; both take ``images``
    ``(N, H, W)`` or ``(N, H, W, channels)`` for one task.
    """

    ways: int
    image_size: int
    filters: int
    blocks: int
    groups: int
    channels: int
    eps: float
    conv: str

    @property
    def feature_size(self) -> int:
        """Side of the last block's feature map (floor-halved ``blocks`` times)."""
        size = self.image_size
        for _ in range(self.blocks):
            size //= 2
        return size

    @property
    def embedding_size(self) -> int:
        return self.filters * self.feature_size**2

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(f"block{i}" for i in range(self.blocks)) + ("head",)

    def init(self, key, dtype=None) -> dict:
        """He-normal conv kernels (sd sqrt(2 / fan_in)), zero biases, unit norm scales, zero offsets;
        head weights ``U(-1/sqrt(E), 1/sqrt(E))`` (PyTorch's ``nn.Linear``), zero head bias."""
        dtype = dtype or jnp.zeros(()).dtype
        params = {}
        keys = jax.random.split(key, self.blocks + 1)
        c_in = self.channels
        for i in range(self.blocks):
            fan_in = 9 * c_in
            params[f"block{i}"] = {
                "kernel": jax.random.normal(keys[i], (3, 3, c_in, self.filters), dtype) * np.sqrt(2.0 / fan_in),
                "bias": jnp.zeros((self.filters,), dtype),
                "scale": jnp.ones((self.filters,), dtype),
                "offset": jnp.zeros((self.filters,), dtype),
            }
            c_in = self.filters
        bound = 1.0 / np.sqrt(self.embedding_size)
        params["head"] = {
            "w": jax.random.uniform(keys[-1], (self.embedding_size, self.ways), dtype, -bound, bound),
            "b": jnp.zeros((self.ways,), dtype),
        }
        return params

    def embed(self, params, images) -> jax.Array:
        """``(N, E)`` features of one task's images (the head is not used)."""
        x = images[..., None] if images.ndim == 3 else images
        conv = _CONVS[self.conv]
        for i in range(self.blocks):
            layer = params[f"block{i}"]
            x = conv(x, layer["kernel"], layer["bias"])
            x = _group_norm(x, layer["scale"], layer["offset"], self.groups, self.eps)
            x = _max_pool(jax.nn.relu(x))
        return x.reshape(x.shape[0], -1)

    def logits(self, params, images) -> jax.Array:
        """``(N, ways)`` logits of one task's images."""
        return self.embed(params, images) @ params["head"]["w"] + params["head"]["b"]


def convnet(
    ways: int,
    image_size: int,
    filters: int = 64,
    blocks: int = 4,
    groups: int = 4,
    channels: int = 1,
    eps: float = 1e-5,
    conv: str = "auto",
) -> ConvNet:
    """The standard few-shot convnet (64 filters, 4 blocks) for ``ways`` classes of square images.

    ``groups``: channel groups of the group norm (must divide ``filters``; 1 is layer norm).
    ``conv``: how the 3x3 convolutions are computed, with the same result: ``"lax"``
    (``jax.lax.conv_general_dilated``), ``"im2col"`` (one matrix product of shifted copies, faster
    on CPU under vmap over tasks) or ``"auto"`` (im2col on a CPU backend, lax on GPU/TPU).
    """
    if conv == "auto":
        conv = "im2col" if jax.default_backend() == "cpu" else "lax"
    if conv not in _CONVS:
        raise ValueError(f"conv must be 'auto', 'lax' or 'im2col', got {conv!r}")
    for name, value, low in (("ways", ways, 2), ("image_size", image_size, 1), ("filters", filters, 1),
                             ("blocks", blocks, 1), ("groups", groups, 1), ("channels", channels, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value}")
    if filters % groups:
        raise ValueError(f"groups ({groups}) must divide filters ({filters})")
    if image_size < 2**blocks:
        raise ValueError(f"{blocks} max-pooling blocks need images of at least {2**blocks} pixels, got {image_size}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return ConvNet(int(ways), int(image_size), int(filters), int(blocks), int(groups), int(channels), float(eps), conv)


def layer_labels(params) -> dict:
    """One module per layer: every leaf of ``params[name]`` gets the label ``name``."""
    return {name: jax.tree_util.tree_map(lambda _: name, layer) for name, layer in params.items()}


def make_model(net: ConvNet, params=None, **priors) -> HierarchicalModel:
    """Eq. 1 over the convnet's parameters (one module per layer) with the categorical likelihood."""
    params = net.init(jax.random.PRNGKey(0)) if params is None else params
    partition = ModulePartition.from_labels(params, layer_labels(params))
    return HierarchicalModel(CategoricalLikelihood(net.logits, net.ways), partition, **priors)


# ---------------------------------------------------------------------------- scores


class EpisodeScores(NamedTuple):
    """Query accuracy and cross-entropy (nats per query image) over test episodes.

    ``accuracy_ci95`` / ``loss_ci95``: half-widths of the 95% confidence intervals of the means,
    ``1.96 * sd / sqrt(episodes)``.
    """

    accuracy: float
    accuracy_ci95: float
    loss: float
    loss_ci95: float
    per_episode_accuracy: np.ndarray
    per_episode_loss: np.ndarray

    @property
    def num_episodes(self) -> int:
        return int(self.per_episode_accuracy.shape[0])

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "accuracy_ci95": self.accuracy_ci95, "loss": self.loss,
                "loss_ci95": self.loss_ci95, "episodes": self.num_episodes}


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval, ``1.96 sd / sqrt(n)``."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"need a 1-D array of at least 2 values, got shape {values.shape}")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


def _score_batch(learner: MetaLearner, state: MetaState, batch: TaskBatch, num_steps: int):
    model = learner.model
    theta = learner.adapt(state, batch.train, num_steps).theta
    loss = jax.vmap(model.generalisation_loss)(theta, batch.val)
    accuracy = model.likelihood.accuracy(jax.vmap(model.partition.unravel)(theta), batch.val)
    return accuracy, loss, jnp.all(jnp.isfinite(theta), axis=-1)


_score_batch_jit = jax.jit(_score_batch, static_argnums=(0, 3))


def evaluate_episodes(
    learner: MetaLearner,
    state: MetaState,
    sample_episodes: Callable[[jax.Array], TaskBatch],
    num_episodes: int,
    *,
    key: jax.Array,
    num_steps: int,
) -> EpisodeScores:
    """Adapt to ``num_episodes`` episodes (``num_steps`` steps of the learner's own adaptation)
    and score each one's query: accuracy and cross-entropy per image, with 95% intervals.

    Episodes come from ``sample_episodes(fold_in(key, i))`` for ``i = 0, 1, ...`` (each call a
    batch), the last batch cut to ``num_episodes``.  A learner's likelihood must have an
    ``accuracy`` method (:class:`hiermeta.families.CategoricalLikelihood`).

    Raises:
      ValueError: malformed episodes, or an adaptation that is not finite (with the count).
    """
    if int(num_episodes) != num_episodes or num_episodes < 2:
        raise ValueError(f"num_episodes must be an integer >= 2, got {num_episodes}")
    if int(num_steps) != num_steps or num_steps < 0:
        raise ValueError(f"num_steps must be an integer >= 0, got {num_steps}")
    if not callable(getattr(learner.model.likelihood, "accuracy", None)):
        raise ValueError("evaluate_episodes needs a classification likelihood with an accuracy method")
    accuracies, losses, finite = [], [], []
    done, i = 0, 0
    while done < num_episodes:
        batch = sample_episodes(jax.random.fold_in(key, i))
        if i == 0:
            learner.model.likelihood.check(batch.train, "support")
            learner.model.likelihood.check(batch.val, "query")
        acc, loss, ok = (np.asarray(a) for a in _score_batch_jit(learner, state, batch, int(num_steps)))
        accuracies.append(acc)
        losses.append(loss)
        finite.append(ok)
        done += acc.shape[0]
        i += 1
    acc = np.concatenate(accuracies)[:num_episodes]
    loss = np.concatenate(losses)[:num_episodes]
    ok = np.concatenate(finite)[:num_episodes] & np.isfinite(loss)
    if not ok.all():
        raise ValueError(
            f"{learner.name}: the adaptation is not finite on {int(np.sum(~ok))} of {num_episodes} episodes "
            f"within {num_steps} steps; lower the inner learning rate"
        )
    (acc_mean, acc_ci), (loss_mean, loss_ci) = mean_ci95(acc), mean_ci95(loss)
    return EpisodeScores(acc_mean, acc_ci, loss_mean, loss_ci, acc, loss)
