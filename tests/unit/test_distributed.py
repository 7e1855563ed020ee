"""Meta-training over two processes (``jax.distributed`` on localhost, gloo CPU collectives) gives
the single-process numbers; checkpoints are written by process 0 and resumed by both.

The test starts two worker processes (two CPU devices each: a mesh of 4 devices over 2 processes),
waits for them with a timeout and kills both if either fails or hangs.  The single-process
reference is computed here, in the pytest process, while the workers run.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
from hiermeta.distributed import check_mesh, collectively, global_tasks, same_everywhere
from hiermeta.sharding import task_mesh
from hiermeta.models import linear

ROOT = Path(__file__).resolve().parents[2]
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2
NUM_STEPS, CHUNK, BATCH, EVAL_TASKS = 12, 6, 25, 11  # 25 and 11 tasks: uneven over 4 devices

# the configuration shared by the workers and the reference (one definition, exec'd by both)
SETUP = textwrap.dedent(
    f"""
    import jax, jax.numpy as jnp, numpy as np, optax
    import hiermeta as hm
    from hiermeta.models import linear
    paper = linear.paper_domain()
    learner = hm.m_shrinkage(linear.make_model(8), inner_optimizer=optax.sgd(0.3), inner_steps=20,
                             outer_optimizer=optax.adam(0.03))
    state0 = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    sample = lambda key: linear.sample_tasks(paper, key, {BATCH})[1]
    data_key = jax.random.PRNGKey(2)
    held_out = linear.sample_tasks(paper, jax.random.PRNGKey(5), {EVAL_TASKS})[1]
    """
)

# every worker's start: join the job, then the shared configuration
PRELUDE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    process_id, port, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
    import numpy as np
    import hiermeta as hm
    hm.enable_compilation_cache(sys.argv[4])
    exec(sys.argv[5])  # SETUP: learner, state0, sample, data_key, held_out

    def say(*args):
        print(f"[{process_id}]", *args, flush=True)
    """
)

WORKER = PRELUDE + textwrap.dedent(
    """
    import hiermeta.train
    from hiermeta.distributed import DistributedError, global_tasks
    from hiermeta.sharding import shard_tasks, sharded_step, task_mesh

    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = task_mesh()

    # count checkpoint writes and reads in this process
    writes, reads = [], []
    save, load = hiermeta.train.save_checkpoint, hiermeta.train.load_checkpoint
    hiermeta.train.save_checkpoint = lambda *a, **k: (writes.append(1), save(*a, **k))[1]
    hiermeta.train.load_checkpoint = lambda *a, **k: (reads.append(1), load(*a, **k))[1]

    # 1. meta-training: tasks over 4 devices of 2 processes, state replicated
    state, history = hm.fit(learner, state0, sample, NUM_STEPS, data_key=data_key, chunk_size=CHUNK,
                            progress=False, mesh=mesh)
    phi = state.params["phi"]
    assert phi.sharding.is_fully_replicated and len(phi.sharding.device_set) == 4
    assert {d.process_index for d in phi.sharding.device_set} == {0, 1}
    runner = hiermeta.train._chunk_runner(learner, sample, mesh, CHUNK)
    hlo = runner.run.lower(state0, data_key, CHUNK, 0, 20).compile().as_text()
    assert "num_partitions=4" in hlo and "all-reduce" in hlo, "the meta-step is not partitioned"
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves((state.params, state.opt_state))]
    np.savez(out / f"fit_{process_id}.npz", *leaves, **{"history/" + k: v for k, v in history.items()})
    say("fit ok", np.asarray(phi)[:3])

    # 2. checkpoint: 6 steps written by process 0, resumed by both to 12 steps
    ckpt = out / "run.npz"
    hm.fit(learner, state0, sample, CHUNK, data_key=data_key, chunk_size=CHUNK, progress=False, mesh=mesh,
           checkpoint=ckpt)
    assert (len(writes), len(reads)) == ((1, 0) if process_id == 0 else (0, 0)), (writes, reads)
    resumed, resumed_history = hm.fit(learner, state0, sample, NUM_STEPS, data_key=data_key, chunk_size=CHUNK,
                                      progress=False, mesh=mesh, checkpoint=ckpt, resume=True)
    assert len(reads) == 1 and len(writes) == (2 if process_id == 0 else 0), (writes, reads)
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(state)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), "the resumed run differs from the uninterrupted one"
    for k in history:
        assert np.array_equal(resumed_history[k], history[k]), k
    say("checkpoint ok")

    # 3. evaluation: held-out tasks over the mesh, losses gathered to every process
    curve = hm.evaluate(learner, state, held_out, num_steps=10, mesh=mesh)
    np.save(out / f"curve_{process_id}.npy", curve.per_task)
    say("evaluate ok")

    # 4. a batch from host memory, each process its own 4 tasks: one meta-step over the global batch
    local = lambda p: linear.sample_tasks(paper, jax.random.fold_in(jax.random.PRNGKey(7), p), 4)[1]
    batch = global_tasks(local(process_id), mesh)
    assert batch.train.obs.shape[0] == 8 and [s.data.shape[0] for s in batch.train.obs.addressable_shards] == [2, 2]
    stepped, _ = sharded_step(learner.step, mesh)(state0, batch)
    whole = jax.tree_util.tree_map(lambda a, b: np.concatenate([a, b]), local(0), local(1))
    expected, _ = jax.jit(learner.step)(state0, whole)
    for a, b in zip(jax.tree_util.tree_leaves(stepped.params), jax.tree_util.tree_leaves(expected.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
    say("global batch ok")

    # 5. bad configurations raise clear errors in every process, before anything is compiled
    def raises(fn, *needles):
        try:
            fn()
        except (ValueError, DistributedError) as err:
            assert all(n in str(err) for n in needles), err
            return
        raise AssertionError(f"no error; expected {needles}")

    half = task_mesh(devices=jax.local_devices(process_index=0))
    raises(lambda: hm.fit(learner, state0, sample, 1, data_key=data_key, mesh=half, progress=False),
           "leaves processes [1]", "without a device")
    raises(lambda: hm.evaluate(learner, state, held_out, num_steps=2, mesh=half), "leaves processes [1]")
    raises(lambda: global_tasks(local(process_id), half), "leaves processes [1]")
    raises(lambda: global_tasks(linear.sample_tasks(paper, jax.random.PRNGKey(3), 5)[1], mesh),
           "5 tasks do not split evenly over its 2 devices")
    raises(lambda: global_tasks(linear.sample_tasks(paper, jax.random.PRNGKey(3), 2 + 2 * process_id)[1], mesh),
           "processes hold different numbers of tasks [2, 4]")
    raises(lambda: shard_tasks(linear.sample_tasks(paper, jax.random.PRNGKey(3), 25)[1], mesh),
           "25 tasks does not split evenly over 4 devices")
    # a checkpoint that only process 0 sees (not on a shared file system)
    mine = out / f"own_{process_id}" / "run.npz"
    if process_id == 0:
        import shutil
        mine.parent.mkdir()
        shutil.copy(ckpt, mine)
    raises(lambda: hm.fit(learner, state0, sample, NUM_STEPS, data_key=data_key, chunk_size=CHUNK,
                          progress=False, mesh=mesh, checkpoint=mine, resume=True),
           "disagree on the checkpoint", "file system every process sees")
    say("errors ok")
    print("ALL OK", flush=True)
    """
)


# processes given different runs refuse to start; a divergence stops the run at the last agreed state
DISAGREE = PRELUDE + textwrap.dedent(
    """
    import optax
    import hiermeta.train as train
    from hiermeta.checkpoint import load_checkpoint, read_metadata
    from hiermeta.distributed import DistributedError, global_tasks
    from hiermeta.errors import MetaTrainingError, ProcessDisagreementError, ReplicaDivergenceError
    from hiermeta.sharding import task_mesh

    mesh = task_mesh()
    kwargs = dict(data_key=data_key, chunk_size=CHUNK, progress=False, mesh=mesh)
    # count the chunks run, and let process 1 change its copy of the state after a given step
    real_runner, runs, perturb_at = train._chunk_runner, [], []

    def runner(*args):
        inner = real_runner(*args)

        def run(*a):
            runs.append(1)
            (state, streak), metrics = inner.run(*a)
            if process_id == 1 and int(state.step) in perturb_at:
                phi = state.params["phi"]
                value = np.asarray(phi) + 1e-9  # built from this process's copy alone: no collective
                phi = jax.make_array_from_callback(phi.shape, phi.sharding, lambda index: value[index])
                state = state._replace(params={**state.params, "phi": phi})
            return (state, streak), metrics

        return train._Runner(run, inner.meta_step)

    train._chunk_runner = runner

    def refused(fn, error, *needles):
        try:
            fn()
        except error as err:
            assert all(n in str(err) for n in needles), (needles, str(err))
            say("refused:", err)
            return
        raise AssertionError(f"no {error.__name__}; expected {needles}")

    # 1. a data set whose response is shifted by 100 in process 1 (same shapes): refused, nothing run
    tasks = linear.sample_tasks(paper, jax.random.PRNGKey(3), 40)[1]
    if process_id == 1:
        tasks = tasks._replace(train=tasks.train._replace(obs=tasks.train.obs + 100.0))
    refused(lambda: hm.fit(learner, state0, hm.sample_from(tasks, 8), 2 * CHUNK, **kwargs), ProcessDisagreementError,
            "not given the same run", "the task sampler (what it draws, the data it draws from", "process(es) [1]",
            "no meta-step was run")
    # 2. another outer learning rate in process 1
    other = hm.m_shrinkage(linear.make_model(8), inner_optimizer=optax.sgd(0.3), inner_steps=20,
                           outer_optimizer=optax.adam(0.05 if process_id == 1 else 0.03))
    refused(lambda: hm.fit(other, state0, sample, 2 * CHUNK, **kwargs), ProcessDisagreementError,
            "the meta-step (learning rates", "process(es) [1]")
    # 3. another number of steps, and a bad argument in process 1 only (which must not leave process 0 waiting)
    refused(lambda: hm.fit(learner, state0, sample, 2 * CHUNK + process_id, **kwargs), ProcessDisagreementError,
            "the step to reach", "process(es) [1]")
    bad = state0 if process_id == 0 else state0._replace(params={**state0.params, "phi": state0.params["phi"] * np.nan})
    refused(lambda: hm.fit(learner, bad, sample, 2 * CHUNK, **kwargs), (ValueError, DistributedError),
            "NaN" if process_id == 1 else "checking fit's arguments failed in processes [1]")
    assert not runs, "a refused run ran meta-steps"
    # evaluation over the mesh: each process passes its own copy of the tasks, which must be the same
    refused(lambda: hm.evaluate(learner, state0, tasks, num_steps=2, mesh=mesh), ProcessDisagreementError,
            "evaluate over several processes", "the tasks (in process(es) [1])")
    # shares held in host memory differ by design, but not in layout
    share = linear.sample_tasks(paper, jax.random.PRNGKey(7), 4)[1]
    if process_id == 1:
        share = share._replace(val=share.val._replace(obs=np.asarray(share.val.obs, np.float32)))
    refused(lambda: global_tasks(share, mesh), ValueError, "task batches differ in leaf .val.obs", "processes [1]")
    say("refusals ok")

    # 4. process 1's state drifts during the second chunk: the run stops at the first chunk's state, saved
    reference, _ = hm.fit(learner, state0, sample, CHUNK, **kwargs)
    perturb_at.append(2 * CHUNK)
    ckpt = out / "diverged.npz"
    try:
        hm.fit(learner, state0, sample, 3 * CHUNK, checkpoint=ckpt, **kwargs)
    except ReplicaDivergenceError as err:
        assert f"differ after meta-steps {CHUNK} to {2 * CHUNK - 1}" in str(err) and "process(es) [1]" in str(err), err
        assert f"agreed on, step {CHUNK}, saved to {ckpt}" in str(err), err
        assert int(err.state.step) == CHUNK and len(err.history["sigma"]) == CHUNK
        assert isinstance(err, MetaTrainingError)  # caught wherever a stopped run is
        say("stopped:", err)
    else:
        raise AssertionError("the divergence was not noticed")
    assert read_metadata(ckpt)["step"] == CHUNK
    saved = load_checkpoint(ckpt, state0)[0]
    for a, b in zip(jax.tree_util.tree_leaves(saved.params), jax.tree_util.tree_leaves(reference.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), "the saved state is not the last agreed one"
    say("divergence ok")
    print("ALL OK", flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_workers(tmp_path, worker=WORKER):
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--ignored")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
    script = tmp_path / "worker.py"
    constants = f"NUM_STEPS, CHUNK = {NUM_STEPS}, {CHUNK}\n"
    script.write_text(constants + worker)
    port = str(_free_port())
    procs = []
    for i in range(NUM_PROCESSES):
        log = open(tmp_path / f"worker_{i}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(script), str(i), port, str(tmp_path), cache, SETUP],
                                       cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    return procs


def _wait(procs, tmp_path, timeout: float) -> list[str]:
    """Wait for every worker; on a failure or at the deadline kill them all. Returns their logs."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p, _ in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p, _ in procs):
                break
            time.sleep(0.2)
    finally:
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            log.close()
    logs = [(tmp_path / f"worker_{i}.log").read_text() for i in range(len(procs))]
    report = "\n".join(f"--- worker {i} (exit {p.returncode})\n{log[-4000:]}" for i, ((p, _), log)
                       in enumerate(zip(procs, logs)))
    assert all(p.returncode == 0 for p, _ in procs), report
    return logs


@pytest.mark.filterwarnings("ignore::hiermeta.errors.ConvergenceWarning")
def test_two_processes_give_the_single_process_run(tmp_path):
    procs = _start_workers(tmp_path)
    try:  # the single-process reference, computed while the workers run
        scope = {}
        exec(SETUP, scope)
        learner, state0, sample = scope["learner"], scope["state0"], scope["sample"]
        state, history = hm.fit(learner, state0, sample, NUM_STEPS, data_key=scope["data_key"],
                                chunk_size=CHUNK, progress=False)
        curve = hm.evaluate(learner, state, scope["held_out"], num_steps=10)
    finally:
        logs = _wait(procs, tmp_path, timeout=420)
    assert all("ALL OK" in log for log in logs), logs
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves((state.params, state.opt_state))]
    assert np.all(np.isfinite(leaves[0])) and int(state.num_skipped) == 0
    for i in range(NUM_PROCESSES):
        with np.load(tmp_path / f"fit_{i}.npz") as theirs:
            for j, ours in enumerate(leaves):
                np.testing.assert_allclose(theirs[f"arr_{j}"], ours, rtol=1e-10, atol=1e-12, err_msg=f"leaf {j}")
            for name, values in history.items():
                np.testing.assert_allclose(theirs[f"history/{name}"], values, rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(np.load(tmp_path / f"curve_{i}.npy"), curve.per_task, rtol=1e-10, atol=1e-12)
    # training moved the meta-parameters (a run that did nothing would match trivially)
    assert np.max(np.abs(np.asarray(state.params["phi"]))) > 0.1


@pytest.mark.filterwarnings("ignore::hiermeta.errors.ConvergenceWarning")
def test_single_process_helpers_are_plain_calls(tmp_path):
    """In one process the distributed helpers do what their single-process counterparts do."""
    paper = linear.paper_domain()
    mesh = task_mesh(num_devices=1)
    check_mesh(mesh)
    check_mesh(None)
    same_everywhere((1, 2), "anything")
    assert collectively("a step", lambda: 3) == 3
    with pytest.raises(ZeroDivisionError):
        collectively("a step", lambda: 1 / 0)
    batch = global_tasks(linear.sample_tasks(paper, jax.random.PRNGKey(0), 3)[1], mesh)
    assert batch.train.obs.shape[0] == 3 and batch.train.obs.sharding.mesh.devices.size == 1
    with pytest.raises(ValueError, match="leading task axis"):
        global_tasks({"x": np.float64(1.0)}, mesh)
    with pytest.raises(ValueError, match="disagree on the number of tasks"):
        global_tasks({"x": np.zeros((3, 2)), "y": np.zeros((4, 2))}, mesh)
    # evaluate over a one-device mesh is evaluate
    learner = hm.m_shrinkage(linear.make_model(8), inner_optimizer=optax.sgd(0.3), inner_steps=20,
                             outer_optimizer=optax.adam(0.03))
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    tasks = linear.sample_tasks(paper, jax.random.PRNGKey(1), 5)[1]
    a = hm.evaluate(learner, state, tasks, num_steps=3)
    b = hm.evaluate(learner, state, tasks, num_steps=3, mesh=mesh)
    np.testing.assert_allclose(a.per_task, b.per_task, rtol=1e-12)


@pytest.mark.filterwarnings("ignore::hiermeta.errors.ConvergenceWarning")
def test_processes_given_different_runs_refuse_to_start_and_a_divergence_stops_the_run(tmp_path):
    """Different data in one process, another learning rate, another step count: every process
    refuses before the first meta-step, naming the difference; a state that drifts in one process
    stops the run with the last agreed state saved."""
    logs = _wait(_start_workers(tmp_path, DISAGREE), tmp_path, timeout=420)
    assert all("ALL OK" in log for log in logs), logs
    # the workers' persistent cache is on, and warm from the other test: hiermeta turns it off for the
    # job (programs loaded from it hung in gloo's collectives with jax 0.12), and says so
    assert all("persistent compilation cache is off in this job" in log for log in logs), logs
    for log in logs:  # both processes refused each run, for the same reason
        assert log.count("refused:") == 6 and "stopped:" in log, log
