"""Checkpoints: a pytree (a whole :class:`~hiermeta.MetaState`) saved to one portable file.

Format: a NumPy ``.npz`` archive (a zip of ``.npy`` arrays, readable by any NumPy) holding

* ``leaf_00000 ...``: the leaves of the pytree in ``jax.tree_util`` order (typed PRNG keys are
  stored as their ``key_data`` with the key implementation recorded);
* ``extra__NAME``: optional named arrays with no template (e.g. the training history so far);
* ``__meta__``: UTF-8 JSON: format name and version, the tree structure, each leaf's path, shape,
  dtype and SHA-256, and the caller's metadata (step, learner name, data key, ...).

Writing is atomic: the archive goes to a temporary file in the same directory, is flushed to
disk, and replaces the old checkpoint with ``os.replace``; an interrupted write leaves the
previous checkpoint intact.  Reading checks everything (archive integrity, checksums, the tree
structure, every shape and dtype against a template) before building anything, and raises
:class:`CheckpointError` (a ``ValueError``) naming the problem: a checkpoint is never half-loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_metadata"]

FORMAT = "hiermeta-checkpoint"
VERSION = 1
_META = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match what it is loaded into."""


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_numpy(leaf):
    """``(array, key_impl or None)`` for one leaf."""
    if _is_key(leaf):
        return np.asarray(jax.random.key_data(leaf)), str(jax.random.key_impl(leaf))
    return np.asarray(leaf), None


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _describe(tree):
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(path) or "<root>" for path, _ in paths]
    return names, [leaf for _, leaf in paths], treedef


def save_checkpoint(path, tree, metadata: Optional[dict] = None, extra: Optional[dict] = None) -> Path:
    """Write ``tree`` (and named ``extra`` arrays) to ``path`` atomically; return the path.

    ``metadata`` must be JSON-serialisable; it comes back from :func:`load_checkpoint`.
    """
    path = Path(path)
    names, leaves, treedef = _describe(tree)
    arrays, leaf_info = {}, []
    for i, (name, leaf) in enumerate(zip(names, leaves)):
        arr, impl = _to_numpy(leaf)
        arrays[f"leaf_{i:05d}"] = arr
        leaf_info.append({"path": name, "shape": list(arr.shape), "dtype": arr.dtype.str,
                          "sha256": _digest(arr), "key_impl": impl})
    extra_info = {}
    for name, value in (extra or {}).items():
        arr = np.asarray(value)
        if arr.dtype == object:
            raise ValueError(f"extra array {name!r} is not numeric")
        arrays[f"extra__{name}"] = arr
        extra_info[name] = {"shape": list(arr.shape), "dtype": arr.dtype.str, "sha256": _digest(arr)}
    meta = {"format": FORMAT, "version": VERSION, "treedef": str(treedef), "leaves": leaf_info,
            "extra": extra_info, "metadata": metadata or {}}
    try:
        encoded = json.dumps(meta).encode("utf-8")
    except TypeError as err:
        raise ValueError(f"checkpoint metadata is not JSON-serialisable: {err}") from None
    arrays[_META] = np.frombuffer(encoded, dtype=np.uint8)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (not possible on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _read(path) -> tuple[dict, dict]:
    """Every array of the archive and its parsed metadata, integrity-checked."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, io.UnsupportedOperation) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or not an .npz archive: {err}") from None
    except Exception as err:  # zlib.error, struct.error, ... from a damaged archive
        raise CheckpointError(f"checkpoint {path} is corrupt: {type(err).__name__}: {err}") from None
    if _META not in arrays:
        raise CheckpointError(f"{path} is not a hiermeta checkpoint (no {_META} entry)")
    try:
        meta = json.loads(arrays.pop(_META).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} has corrupt metadata: {err}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a hiermeta checkpoint (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {meta.get('version')}; "
                              f"this hiermeta reads version {VERSION}")
    expected = [f"leaf_{i:05d}" for i in range(len(meta["leaves"]))]
    expected += [f"extra__{name}" for name in meta["extra"]]
    if sorted(expected) != sorted(arrays):
        raise CheckpointError(f"checkpoint {path} is corrupt: its arrays do not match its metadata")
    infos = list(zip(expected, meta["leaves"] + list(meta["extra"].values())))
    for key, info in infos:
        arr = arrays[key]
        if list(arr.shape) != info["shape"] or arr.dtype.str != info["dtype"] or _digest(arr) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: array {key} fails its checksum")
    return arrays, meta


def read_metadata(path) -> dict:
    """The caller's metadata of a checkpoint (after checking the archive's integrity)."""
    return _read(path)[1]["metadata"]


def load_checkpoint(path, like) -> tuple[Any, dict, dict]:
    """Load a checkpoint into the structure of ``like`` (e.g. a freshly initialised state).

    Every leaf must have the path, shape and dtype of the corresponding leaf of ``like``.
    Returns ``(tree, metadata, extra)``; raises :class:`CheckpointError` naming the first mismatch.
    """
    arrays, meta = _read(path)
    names, leaves, treedef = _describe(like)
    saved = meta["leaves"]
    if len(saved) != len(leaves) or meta["treedef"] != str(treedef):
        theirs = [info["path"] for info in saved]
        missing = sorted(set(names) - set(theirs))[:5]
        unexpected = sorted(set(theirs) - set(names))[:5]
        raise CheckpointError(
            f"checkpoint {path} holds a different structure: {len(saved)} leaves, expected "
            f"{len(leaves)} (missing {missing}, unexpected {unexpected}); saved {meta['treedef']}, "
            f"expected {treedef}"
        )
    out = []
    for i, (name, leaf, info) in enumerate(zip(names, leaves, saved)):
        arr = arrays[f"leaf_{i:05d}"]
        ref, impl = _to_numpy(leaf)
        if info["path"] != name:
            raise CheckpointError(f"checkpoint {path}: leaf {i} is {info['path']}, expected {name}")
        if arr.shape != ref.shape or arr.dtype != ref.dtype or info["key_impl"] != impl:
            raise CheckpointError(
                f"checkpoint {path}: {name} has shape {arr.shape} and dtype {arr.dtype}"
                f"{' (key ' + str(info['key_impl']) + ')' if info['key_impl'] else ''}, expected "
                f"{ref.shape} and {ref.dtype}{' (key ' + impl + ')' if impl else ''}"
            )
        out.append(arr)
    built = [jax.random.wrap_key_data(jnp.asarray(arr), impl=info["key_impl"]) if info["key_impl"]
             else jnp.asarray(arr) for arr, info in zip(out, saved)]
    extra = {name: arrays[f"extra__{name}"] for name in meta["extra"]}
    return jax.tree_util.tree_unflatten(treedef, built), meta["metadata"], extra
