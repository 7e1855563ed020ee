"""Checkpoints: the whole state round-trips exactly, resume is bit-identical, bad files fail clearly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
import hiermeta.train as train_module
from hiermeta.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from models import linear

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
