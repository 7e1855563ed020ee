"""Checkpoints: a pytree (a whole :class:`~hiermeta.MetaState`) saved to one portable file.

Format: a NumPy ``.npz`` archive (a zip of ``.npy`` arrays, readable by any NumPy) holding

* ``leaf_00000 ...``: the leaves of the pytree in ``jax.tree_util`` order (typed PRNG keys are
  stored as their ``key_data`` with the key implementation recorded);
* ``extra__NAME``: optional named arrays with no template (e.g. the training history so far);
* ``__meta__``: UTF-8 JSON: format name and version, the tree structure, each leaf's path, shape,
  dtype and SHA-256, and the caller's metadata (step, learner name, data key, ...).

Writing is atomic: the archive goes to a temporary file in the same directory, is flushed to
disk, and replaces the old checkpoint with ``os.replace``; an interrupted write leaves the
previous checkpoint intact, and temporary files left by killed writes (``.NAME.*.tmp``) are
removed by the next successful one.  Reading checks everything (archive integrity, the layout
of the metadata, every member's size and ``.npy`` header against it before allocating the
array, checksums, the tree structure, every shape and dtype against a template) before building
anything, and raises :class:`CheckpointError` (a ``ValueError``) naming the problem: a
checkpoint is never half-loaded, and a crafted file cannot make it allocate more than the
file's own size.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .errors import CheckpointError

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_metadata"]

FORMAT = "hiermeta-checkpoint"
VERSION = 1
_META = "__meta__"


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
    for orphan in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by killed writes
        try:
            orphan.unlink()
        except OSError:
            pass
    try:  # make the rename itself durable (not possible on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _fail(path, problem: str):
    raise CheckpointError(f"checkpoint {path} is corrupt: {problem}")


def _check_structure(path, meta) -> None:
    """The parsed ``__meta__`` record has the layout :func:`save_checkpoint` writes."""

    def entry_ok(info, keys) -> bool:
        return (
            isinstance(info, dict)
            and keys <= info.keys()
            and isinstance(info["shape"], list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in info["shape"])
            and isinstance(info["dtype"], str)
            and isinstance(info["sha256"], str)
        )

    if not isinstance(meta, dict):
        _fail(path, f"its metadata is a {type(meta).__name__}, not a record")
    missing = {"treedef", "leaves", "extra", "metadata"} - meta.keys()
    if missing:
        _fail(path, f"its metadata lacks {sorted(missing)}")
    if not isinstance(meta["treedef"], str) or not isinstance(meta["metadata"], dict):
        _fail(path, "its metadata has a malformed tree structure or caller record")
    leaves, extra = meta["leaves"], meta["extra"]
    if not isinstance(leaves, list) or not all(
        entry_ok(info, {"path", "shape", "dtype", "sha256", "key_impl"})
        and isinstance(info["path"], str)
        and (info["key_impl"] is None or isinstance(info["key_impl"], str))
        for info in leaves
    ):
        _fail(path, "its metadata has a malformed leaf record")
    if not isinstance(extra, dict) or not all(entry_ok(info, {"shape", "dtype", "sha256"}) for info in extra.values()):
        _fail(path, "its metadata has a malformed extra-array record")


def _read_entry(path, archive: zipfile.ZipFile, entry: zipfile.ZipInfo, shape=None, dtype=None) -> np.ndarray:
    """One ``.npy`` member, its header checked against the archive (and ``shape``, ``dtype``) first.

    Nothing is allocated before the header's size agrees with the member's size, which the caller
    has bounded by the file's size: a crafted header cannot force a large allocation.
    """
    with archive.open(entry) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(f)
        else:
            _fail(path, f"{entry.filename} has .npy version {version}")
        shape_h, fortran, dtype_h = header
        if dtype_h.hasobject:
            _fail(path, f"{entry.filename} holds Python objects")
        if shape is not None and (list(shape_h) != list(shape) or dtype_h.str != dtype):
            _fail(path, f"{entry.filename} has shape {shape_h} and dtype {dtype_h.str}, its record "
                        f"says {tuple(shape)} and {dtype}")
        nbytes = math.prod(shape_h) * dtype_h.itemsize
        if f.tell() + nbytes != entry.file_size:
            _fail(path, f"{entry.filename} declares {nbytes} bytes of data in a "
                        f"{entry.file_size}-byte member")
        buffer = bytearray(nbytes)
        if f.readinto(memoryview(buffer)) != nbytes:
            _fail(path, f"{entry.filename} is truncated")
    return np.frombuffer(buffer, dtype=dtype_h).reshape(shape_h, order="F" if fortran else "C")


def _read(path) -> tuple[dict, dict]:
    """Every array of the archive and its parsed metadata, integrity-checked.

    The archive is read member by member: the sizes in its directory must fit in the file (members
    are stored uncompressed, as :func:`save_checkpoint` writes them), the metadata must have its
    layout, and each ``.npy`` header must match the metadata, before any array is allocated.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {}
            for entry in archive.infolist():
                name = entry.filename[:-4] if entry.filename.endswith(".npy") else entry.filename
                if entry.compress_type != zipfile.ZIP_STORED or entry.file_size > size:
                    _fail(path, f"member {entry.filename} is compressed or larger than the file "
                                f"({entry.file_size} bytes in a {size}-byte file)")
                entries[name] = entry
            if _META not in entries:
                ours = sorted(n for n in entries if n.startswith(("leaf_", "extra__", "__me")))
                if ours:  # hiermeta's arrays without their metadata: a damaged zip directory
                    _fail(path, f"its zip directory lists hiermeta's arrays ({ours[:3]}) but no {_META} "
                                "entry (damaged)")
                raise CheckpointError(f"{path} is not a hiermeta checkpoint (no {_META} entry; it holds "
                                      f"{sorted(entries)[:5]})")
            raw = _read_entry(path, archive, entries[_META])
            try:
                meta = json.loads(raw.tobytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointError(f"checkpoint {path} has corrupt metadata: {err}") from None
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
                raise CheckpointError(f"{path} is not a hiermeta checkpoint (format {found!r})")
            if meta.get("version") != VERSION:
                raise CheckpointError(f"{path} has checkpoint format version {meta.get('version')}; "
                                      f"this hiermeta reads version {VERSION}")
            _check_structure(path, meta)
            expected = [f"leaf_{i:05d}" for i in range(len(meta["leaves"]))]
            expected += [f"extra__{name}" for name in meta["extra"]]
            if sorted(expected) != sorted(set(entries) - {_META}):
                _fail(path, "its arrays do not match its metadata")
            arrays = {}
            for key, info in zip(expected, meta["leaves"] + list(meta["extra"].values())):
                arr = _read_entry(path, archive, entries[key], info["shape"], info["dtype"])
                if _digest(arr) != info["sha256"]:
                    _fail(path, f"array {key} fails its checksum")
                arrays[key] = arr
    except CheckpointError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, io.UnsupportedOperation) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or not an .npz archive: {err}") from None
    except Exception as err:  # zlib.error, struct.error, ... from a damaged archive
        raise CheckpointError(f"checkpoint {path} is corrupt: {type(err).__name__}: {err}") from None
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
