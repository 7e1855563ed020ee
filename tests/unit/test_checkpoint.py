"""Checkpoints: the whole state round-trips exactly, resume is bit-identical, bad files fail clearly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
import hiermeta.train as train_module
from hiermeta.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from hiermeta.errors import CheckpointExistsError
from hiermeta.models import linear

STEPS = 30


def make(model, modular=True, outer=None):
    outer = outer or optax.adam(optax.cosine_decay_schedule(0.03, STEPS))
    return hm.shrinkage(model, inner_optimizer=optax.sgd(0.3), inner_steps=20, outer_optimizer=outer, modular=modular)


@pytest.fixture(scope="module")
def setup(paper, paper_model):
    learner = make(paper_model)
    sample = lambda key: linear.sample_tasks(paper, key, 25)[1]
    state0 = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    whole = hm.fit(learner, state0, sample, STEPS, data_key=jax.random.PRNGKey(1), chunk_size=10, progress=False)
    return learner, sample, state0, whole


def plain(tree):
    """Typed PRNG keys as their key data, so trees compare leaf by leaf."""
    is_key = lambda a: jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
    return jax.tree_util.tree_map(lambda a: jax.random.key_data(a) if is_key(a) else a, tree)


def assert_same(a, b):
    a, b = plain(a), plain(b)
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_round_trip_of_a_whole_state_with_typed_and_raw_keys(setup, tmp_path):
    learner, _, _, (state, history) = setup
    typed = state._replace(key=jax.random.key(7))
    for s in (state, typed):
        path = save_checkpoint(tmp_path / "ck.npz", s, {"step": int(s.step)}, extra={"history/sigma": history["sigma"]})
        template = learner.init(jax.random.PRNGKey(5), jnp.zeros(8))._replace(key=jax.random.key(0) if s is typed else jax.random.PRNGKey(0))
        loaded, meta, extra = load_checkpoint(path, template)
        assert_same(loaded, s)
        assert meta == {"step": STEPS} and read_metadata(path) == meta
        np.testing.assert_array_equal(extra["history/sigma"], history["sigma"])
    assert [p.name for p in tmp_path.iterdir()] == ["ck.npz"]  # no temporary files left behind


def test_resume_after_an_interruption_is_bit_identical(setup, tmp_path, monkeypatch):
    learner, sample, state0, (whole, whole_history) = setup
    path = tmp_path / "run.npz"
    kwargs = dict(data_key=jax.random.PRNGKey(1), chunk_size=10, progress=False, checkpoint=path)
    real_save, saves = train_module.save_checkpoint, []

    def crash_after_second_save(*args, **kw):
        real_save(*args, **kw)
        saves.append(args[1].step)
        if len(saves) == 2:
            raise KeyboardInterrupt  # the run dies right after writing its step-14 checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_second_save)
    with pytest.raises(KeyboardInterrupt):
        hm.fit(learner, state0, sample, STEPS, checkpoint_every=7, **kwargs)
    monkeypatch.undo()
    assert read_metadata(path)["step"] == 14
    # chunk ends at 7, 10, 14, 20, 21, ... in both runs: the resumed run is the same computation
    resumed, history = hm.fit(learner, state0, sample, STEPS, checkpoint_every=7, resume=True, **kwargs)
    assert_same(resumed, whole)
    assert history.keys() == whole_history.keys()
    for name in history:
        np.testing.assert_array_equal(history[name], whole_history[name])
    assert read_metadata(path)["step"] == STEPS
    # resuming a finished run returns it unchanged
    again, history = hm.fit(learner, state0, sample, STEPS, resume=True, **kwargs)
    assert_same(again, whole)
    np.testing.assert_array_equal(history["sigma"], whole_history["sigma"])


def test_resume_without_a_checkpoint_starts_from_the_given_state(setup, tmp_path):
    learner, sample, state0, (whole, _) = setup
    state, _ = hm.fit(learner, state0, sample, STEPS, data_key=jax.random.PRNGKey(1), chunk_size=10,
                      progress=False, checkpoint=tmp_path / "new.npz", resume=True)
    assert_same(state, whole)
    assert read_metadata(tmp_path / "new.npz")["step"] == STEPS


def test_interrupted_write_keeps_the_previous_checkpoint(setup, tmp_path, monkeypatch):
    _, _, state0, (state, _) = setup
    path = save_checkpoint(tmp_path / "ck.npz", state0, {"step": 0})

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, state, {"step": STEPS})
    monkeypatch.undo()
    assert read_metadata(path) == {"step": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]


def test_corrupt_checkpoints_raise_a_clear_error(setup, tmp_path):
    _, _, state0, (state, _) = setup
    good = save_checkpoint(tmp_path / "good.npz", state, {"step": STEPS}).read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "garbage": b"not a checkpoint at all",
        "empty": b"",
    }
    # one flipped byte inside the first array's data (past the zip and .npy headers)
    npy = good.index(b"\x93NUMPY", good.index(b"leaf_00000.npy"))
    offset = npy + 10 + int.from_bytes(good[npy + 8:npy + 10], "little") + 3
    cases["flipped"] = good[:offset] + bytes([good[offset] ^ 0xFF]) + good[offset + 1:]
    for name, blob in cases.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(blob)
        with pytest.raises(CheckpointError, match="corrupt|not an .npz|checksum"):
            load_checkpoint(path, state0)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.npz", state0)
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a hiermeta checkpoint"):
        load_checkpoint(tmp_path / "plain.npz", state0)


def test_mismatched_checkpoints_are_refused(setup, paper_model, tmp_path):
    learner, sample, state0, (state, _) = setup
    path = save_checkpoint(tmp_path / "ck.npz", state, {"step": STEPS})
    shared = make(paper_model, modular=False).init(jax.random.PRNGKey(0), jnp.zeros(8))
    with pytest.raises(CheckpointError, match=r"\['log_sigma2'\] has shape \(8,\).*expected \(1,\)"):
        load_checkpoint(path, shared)
    sgd = make(paper_model, outer=optax.sgd(0.1)).init(jax.random.PRNGKey(0), jnp.zeros(8))
    with pytest.raises(CheckpointError, match="different structure"):
        load_checkpoint(path, sgd)
    with pytest.raises(CheckpointError, match=r"dtype float64, expected \(8,\) and float32"):
        load_checkpoint(path, jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32) if a.dtype == np.float64 else a, state))
    # a checkpoint of another run (other data stream) is not resumed
    run = tmp_path / "run.npz"
    hm.fit(learner, state0, sample, 10, data_key=jax.random.PRNGKey(1), chunk_size=10, progress=False, checkpoint=run)
    with pytest.raises(CheckpointError, match="data_key"):
        hm.fit(learner, state0, sample, STEPS, data_key=jax.random.PRNGKey(2), progress=False, checkpoint=run, resume=True)
    with pytest.raises(CheckpointError, match="past this run's end"):
        hm.fit(learner, state0, sample, 5, data_key=jax.random.PRNGKey(1), progress=False, checkpoint=run, resume=True)
    with pytest.raises(ValueError, match="need a checkpoint path"):
        hm.fit(learner, state0, sample, 5, data_key=jax.random.PRNGKey(1), progress=False, resume=True)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


# ---------------------------------------------------------------------------- configuration fingerprint


def test_resume_refuses_a_checkpoint_of_another_configuration(setup, paper, paper_model, tmp_path):
    """Each change a user could make between runs is refused, and the message says which."""
    learner, sample, state0, _ = setup
    run = tmp_path / "run.npz"
    kwargs = dict(data_key=jax.random.PRNGKey(1), chunk_size=10, progress=False, checkpoint=run)
    done, _ = hm.fit(learner, state0, sample, 10, **kwargs)
    sgd = lambda lr, k=20: hm.shrinkage(paper_model, inner_optimizer=optax.sgd(lr), inner_steps=k, modular=True,
                                        outer_optimizer=optax.adam(optax.cosine_decay_schedule(0.03, STEPS)))
    cases = {
        "outer learning rate": (make(paper_model, outer=optax.adam(optax.cosine_decay_schedule(0.05, STEPS))), sample, state0),
        "inner learning rate": (sgd(0.2), sample, state0),
        "inner steps": (sgd(0.3, k=19), sample, state0),
        "task sampler (batch size)": (learner, lambda key: linear.sample_tasks(paper, key, 24)[1], state0),
        "task sampler (domain)": (learner, lambda key: linear.sample_tasks(paper._replace(sigma=paper.sigma * 2), key, 25)[1], state0),
        "initial params": (learner, sample, state0._replace(params={**state0.params, "phi": state0.params["phi"] + 0.1})),
        "initial key": (learner, sample, state0._replace(key=jax.random.PRNGKey(9))),
    }
    expected = {
        "outer learning rate": r"the meta-step \(learning rates", "inner learning rate": r"the meta-step \(learning rates",
        "inner steps": r"the meta-step \(learning rates", "task sampler (batch size)": "the task sampler",
        "task sampler (domain)": "the task sampler", "initial params": r"the initial state \(params\)",
        "initial key": r"the initial state \(key\)",
    }
    for name, (other, other_sample, other_state) in cases.items():
        with pytest.raises(CheckpointError, match="another configuration: .*" + expected[name]):
            hm.fit(other, other_state, other_sample, 10, resume=True, **kwargs)
    # an identical configuration built afresh (a re-run of the same script) is accepted
    again, _ = hm.fit(make(paper_model), learner.init(jax.random.PRNGKey(0), jnp.zeros(8)),
                      lambda key: linear.sample_tasks(paper, key, 25)[1], 10, resume=True, **kwargs)
    assert_same(again, done)


RERUN_SCRIPT = """
import jax, jax.numpy as jnp, optax
import hiermeta as hm
from hiermeta.models import linear

def build():
    domain = linear.paper_domain()
    learner = hm.m_shrinkage(linear.make_model(8), inner_optimizer=optax.sgd(0.25), inner_steps=4,
                             outer_optimizer=optax.adam(0.02), init_sigma=1.5)
    state = learner.init(jax.random.PRNGKey(3), jnp.zeros(8))
    sample = lambda key: linear.sample_tasks(domain, key, 6)[1]
    return learner, state, sample

if __name__ == "__main__":
    import sys
    jax.config.update("jax_enable_x64", True)
    hm.enable_compilation_cache(sys.argv[2])
    learner, state, sample = build()
    hm.fit(learner, state, sample, 3, data_key=jax.random.PRNGKey(4), chunk_size=3, progress=False,
           checkpoint=sys.argv[1])
"""


def test_a_rerun_of_the_same_script_in_a_new_process_matches_its_fingerprint(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script, path = tmp_path / "rerun.py", tmp_path / "run.npz"
    script.write_text(RERUN_SCRIPT)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(root / ".jax_cache"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script), str(path), cache], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    namespace = {}
    exec(compile(RERUN_SCRIPT, str(script), "exec"), namespace)
    learner, state, sample = namespace["build"]()
    resumed, history = hm.fit(learner, state, sample, 3, data_key=jax.random.PRNGKey(4), chunk_size=3,
                              progress=False, checkpoint=path, resume=True)  # finished: nothing to run
    assert int(resumed.step) == 3 and len(history["sigma"]) == 3
    fingerprint = read_metadata(path)["fingerprint"]
    assert set(fingerprint) >= {"meta_step", "task_sampler", "initial_state.params", "initial_state.key"}


# ---------------------------------------------------------------------------- runs of skipped steps


def skipping_learner(model, first, stop):
    """A stand-in learner whose meta-steps first <= step < stop are skipped (cheap to compile)."""
    from hiermeta.learners import MetaLearner, MetaState

    def init(key, params):
        zero = jnp.zeros((), jnp.int32)
        return MetaState({"phi": model.partition.ravel(params)}, (), zero, zero, key)

    def step(state, batch):
        skipped = (state.step >= first) & (state.step < stop)
        phi = jnp.where(skipped, state.params["phi"], state.params["phi"] + jnp.mean(batch.train.obs))
        new = state._replace(params={"phi": phi}, step=state.step + 1,
                             num_skipped=state.num_skipped + skipped.astype(jnp.int32))
        return new, {"skipped": skipped, "phi0": phi[0]}

    return MetaLearner(f"skipper {first}-{stop}", model, init, step, None, None)


def test_a_run_of_skips_inside_a_chunk_stops_training(paper_model, paper_tasks):
    """11 skips in a row (steps 5..15) inside one 30-step chunk with a limit of 10: training stops at
    the step that makes the tenth, not at the chunk's end (which shows no streak at all)."""
    _, batch = paper_tasks
    learner = skipping_learner(paper_model, 5, 16)
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    with pytest.raises(hm.errors.MetaTrainingError, match="meta-steps 5 to 14") as info:
        hm.fit(learner, state, lambda key: batch, 30, data_key=jax.random.PRNGKey(0), chunk_size=30,
               max_consecutive_skips=10, progress=False)
    assert int(info.value.state.step) == 15 and int(info.value.state.num_skipped) == 10
    assert info.value.history["skipped"].tolist() == [False] * 5 + [True] * 10
    done, _ = hm.fit(learner, state, lambda key: batch, 30, data_key=jax.random.PRNGKey(0), chunk_size=30,
                     max_consecutive_skips=12, progress=False)  # a limit of 12: the run goes through
    assert int(done.step) == 30 and int(done.num_skipped) == 11


def test_a_resumed_run_stops_where_an_uninterrupted_one_does(paper_model, paper_tasks, tmp_path, monkeypatch):
    _, batch = paper_tasks
    learner = skipping_learner(paper_model, 12, 40)  # skips from step 12: the tenth is step 21
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    kwargs = dict(data_key=jax.random.PRNGKey(0), chunk_size=5, checkpoint_every=5, max_consecutive_skips=10,
                  progress=False)
    sample = lambda key: batch
    with pytest.raises(hm.errors.MetaTrainingError) as whole:
        hm.fit(learner, state, sample, 40, checkpoint=tmp_path / "whole.npz", **kwargs)
    assert int(whole.value.state.step) == 22
    assert read_metadata(tmp_path / "whole.npz")["step"] == 22  # the stopped state is saved too

    real_save, saves = train_module.save_checkpoint, []

    def crash_after_third_save(*args, **kw):
        real_save(*args, **kw)
        saves.append(int(args[1].step))
        if len(saves) == 3:
            raise KeyboardInterrupt  # killed right after the step-15 checkpoint: 3 skips so far

    path = tmp_path / "run.npz"
    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_third_save)
    with pytest.raises(KeyboardInterrupt):
        hm.fit(learner, state, sample, 40, checkpoint=path, **kwargs)
    monkeypatch.undo()
    assert read_metadata(path)["skip_streak"] == 3
    with pytest.raises(hm.errors.MetaTrainingError) as resumed:
        hm.fit(learner, state, sample, 40, checkpoint=path, resume=True, **kwargs)
    assert_same(resumed.value.state, whole.value.state)
    for name in whole.value.history:
        np.testing.assert_array_equal(resumed.value.history[name], whole.value.history[name])
    # resuming the stopped run stops again at once; a higher limit carries the streak on
    with pytest.raises(hm.errors.MetaTrainingError, match="meta-steps 12 to 21"):
        hm.fit(learner, state, sample, 40, checkpoint=path, resume=True, **kwargs)
    with pytest.raises(hm.errors.MetaTrainingError, match="meta-steps 12 to 26"):
        hm.fit(learner, state, sample, 40, checkpoint=path, resume=True, **{**kwargs, "max_consecutive_skips": 15})


# ---------------------------------------------------------------------------- nothing overwritten


def test_an_existing_checkpoint_is_never_replaced_by_accident(setup, tmp_path):
    """A finished run's checkpoint survives a new run on the same path unless resume or overwrite says otherwise."""
    learner, sample, state0, (whole, _) = setup
    kwargs = dict(data_key=jax.random.PRNGKey(1), chunk_size=10, progress=False)
    path = tmp_path / "run.npz"
    hm.fit(learner, state0, sample, STEPS, checkpoint=path, **kwargs)
    before = path.read_bytes()
    calls = []
    counted = lambda key: calls.append(1) or sample(key)
    with pytest.raises(CheckpointExistsError, match=rf"checkpoint {path} already exists .*at step {STEPS} of a run "
                                                    rf"to step {STEPS}.*resume=True.*overwrite=True"):
        hm.fit(learner, state0, counted, 10, checkpoint=path, **kwargs)
    assert path.read_bytes() == before and len(calls) == 1  # only the eager check of one batch
    # a file that is not a checkpoint is not replaced either
    other = tmp_path / "notes.npz"
    other.write_text("my notes")
    with pytest.raises(CheckpointExistsError, match="not a readable checkpoint"):
        hm.fit(learner, state0, sample, 10, checkpoint=other, **kwargs)
    assert other.read_text() == "my notes"
    with pytest.raises(ValueError, match="give one of them"):
        hm.fit(learner, state0, sample, 10, checkpoint=path, resume=True, overwrite=True, **kwargs)
    with pytest.raises(ValueError, match="need a checkpoint path"):
        hm.fit(learner, state0, sample, 10, overwrite=True, **kwargs)
    # resume continues it (here: already finished, nothing runs); overwrite replaces it on purpose
    resumed, _ = hm.fit(learner, state0, sample, STEPS, checkpoint=path, resume=True, **kwargs)
    assert_same(resumed, whole) and path.read_bytes() == before
    hm.fit(learner, state0, sample, 10, checkpoint=path, overwrite=True, **kwargs)
    assert read_metadata(path)["step"] == 10 and read_metadata(path)["target_step"] == 10


# ---------------------------------------------------------------------------- unwritable paths


def test_an_unwritable_checkpoint_path_is_refused_before_training(setup, tmp_path):
    learner, sample, state0, _ = setup
    calls = []
    counted = lambda key: calls.append(1) or sample(key)
    (tmp_path / "a_file").write_text("not a directory")
    for bad, match in ((tmp_path, "is a directory"), (tmp_path / "a_file" / "ck.npz", "cannot be written")):
        calls.clear()
        with pytest.raises(ValueError, match=match):
            hm.fit(learner, state0, counted, STEPS, data_key=jax.random.PRNGKey(1), chunk_size=10, progress=False,
                   checkpoint=bad)
        assert len(calls) == 1  # only the eager check of one batch: no training ran


def test_a_failed_save_raises_with_the_state_and_history(setup, tmp_path, monkeypatch):
    import errno

    learner, sample, state0, (_, whole_history) = setup
    real_savez, calls = np.savez, []

    def disk_full_on_second(f, **arrays):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_savez(f, **arrays)

    monkeypatch.setattr(np, "savez", disk_full_on_second)
    path = tmp_path / "run.npz"
    with pytest.raises(hm.errors.CheckpointWriteError, match="No space left") as info:
        hm.fit(learner, state0, sample, STEPS, data_key=jax.random.PRNGKey(1), chunk_size=10, checkpoint_every=10,
               progress=False, checkpoint=path)
    monkeypatch.undo()
    assert int(info.value.state.step) == 20
    np.testing.assert_array_equal(info.value.history["sigma"], whole_history["sigma"][:20])
    assert read_metadata(path)["step"] == 10  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.npz"]


# ---------------------------------------------------------------------------- crafted files


def craft(path, meta, arrays=None):
    """An .npz holding ``arrays`` and a ``__meta__`` entry of the given JSON value."""
    import json

    np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **(arrays or {}))
    return path


def test_malformed_metadata_raises_checkpoint_error(setup, tmp_path):
    from hiermeta.checkpoint import FORMAT, VERSION

    _, _, state0, _ = setup
    leaf = {"path": "x", "shape": [3], "dtype": "<f8", "sha256": "0" * 64, "key_impl": None}
    good = {"format": FORMAT, "version": VERSION, "treedef": "*", "leaves": [leaf], "extra": {}, "metadata": {}}
    cases = {
        "a list": [],
        "a string": "hello",
        "missing keys": {"format": FORMAT, "version": VERSION},
        "leaves not a list": {**good, "leaves": "x"},
        "leaf not a record": {**good, "leaves": [3]},
        "leaf without shape": {**good, "leaves": [{k: v for k, v in leaf.items() if k != "shape"}]},
        "negative size": {**good, "leaves": [{**leaf, "shape": [-1]}]},
        "shape of strings": {**good, "leaves": [{**leaf, "shape": ["3"]}]},
        "extra a list": {**good, "extra": []},
        "metadata a list": {**good, "metadata": []},
        "treedef a number": {**good, "treedef": 4},
    }
    for name, meta in cases.items():
        path = craft(tmp_path / f"{len(name)}.npz", meta, {"leaf_00000": np.zeros(3)})
        with pytest.raises(CheckpointError):
            load_checkpoint(path, state0)
        with pytest.raises(CheckpointError):
            read_metadata(path)


def _npy_header(shape, descr="<f4") -> bytes:
    buffer = __import__("io").BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


@pytest.mark.parametrize("how", ["header lies", "compressed"])
def test_sizes_are_checked_before_anything_is_allocated(setup, tmp_path, how):
    """A small file declaring a large array (a lying .npy header in a stored member, or a deflated
    member of zeros) is refused without allocating the array."""
    import hashlib
    import json
    import tracemalloc
    import zipfile

    from hiermeta.checkpoint import FORMAT, VERSION

    _, _, state0, _ = setup
    n = 2**27 if how == "header lies" else 2**24  # 512 MiB and 64 MiB of float32
    leaf = {"path": "x", "shape": [n], "dtype": "<f4", "sha256": hashlib.sha256(b"").hexdigest(), "key_impl": None}
    meta = {"format": FORMAT, "version": VERSION, "treedef": "*", "leaves": [leaf], "extra": {}, "metadata": {}}
    path = tmp_path / "bomb.npz"
    meta_npy = _npy_header((len(json.dumps(meta)),), "|u1") + json.dumps(meta).encode()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("__meta__.npy", meta_npy)
        if how == "header lies":  # stored, 100 bytes of data behind a 512 MiB header
            archive.writestr("leaf_00000.npy", _npy_header((n,)) + bytes(100))
        else:  # deflated: 64 MiB of zeros in about 64 kB
            info = zipfile.ZipInfo("leaf_00000.npy")
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as member:
                member.write(_npy_header((n,)))
                for _ in range(n * 4 // 2**20):
                    member.write(bytes(2**20))
    assert path.stat().st_size < 2**20  # under a megabyte on disk
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="corrupt"):
            load_checkpoint(path, state0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, peak


def test_orphan_temporary_files_of_killed_writes_are_removed(setup, tmp_path):
    _, _, state0, _ = setup
    orphans = [tmp_path / ".ck.npz.k1ll3d.tmp", tmp_path / ".ck.npz.x.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"PK\x03\x04 half an archive")  # as a write killed mid-way leaves it
    bystander = tmp_path / ".other.npz.abc.tmp"
    bystander.write_bytes(b"someone else's")
    save_checkpoint(tmp_path / "ck.npz", state0, {"step": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.npz.abc.tmp", "ck.npz"]
