"""Headline benchmark: one sinusoid MAML meta-step, hiermeta against hand-written JAX and PyTorch.

Sinusoid regression (MAML protocol, ``hiermeta.models.sinusoid``): MLP 1-40-40-1, meta-batch 25 tasks,
10 support + 10 query points, K inner SGD steps (rate 0.002 on 1/2 sum of squares = MAML's 0.01
on the MSE), second-order meta-gradient through the K steps, one Adam step.  float32 on the CPU.

Rows (all measured round-robin in the same run, on the same pre-drawn batches):
  hiermeta MAML step        ``jit(learner.step)`` of hiermeta's MAML learner (learning rate fixed)
  hiermeta fit              the same learner in ``hiermeta.fit`` (chunks of 100 steps under
                            ``lax.scan``, tasks drawn on the device inside the loop)
  hand-written JAX          ``benchmarks/peers_jax.py``: jit + vmap + scan, no hiermeta
  torch autograd loop, torch.func + vmap, higher   ``benchmarks/peers_torch.py`` (if installed)

Before timing, every implementation's meta-gradient is checked against the hand-written JAX one
on the same batch (float32: relative error < 1e-3), so the table compares the same computation.

    python benchmarks/sinusoid_maml.py            # K = 1, 5, 50 (a few minutes)
    python benchmarks/sinusoid_maml.py --quick    # K = 5, short blocks
"""

from __future__ import annotations

import time

from common import Timer, block, compile_seconds, format_table, note, parser, ratio, round_robin, settle, write_results  # noqa: I001

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import hiermeta as hm  # noqa: E402
import hiermeta.train  # noqa: E402  (hm.train._chunk_runner below)
import peers_jax  # noqa: E402
import peers_torch  # noqa: E402
from hiermeta.models import sinusoid  # noqa: E402

META_BATCH = 25
OUTER_LR = 1e-3
NUM_BATCHES = 8


def build_hiermeta(model, K, outer):
    return hm.maml(model, inner_steps=K, init_lr=sinusoid.MAML_INNER_LR, outer_optimizer=outer, learn_lr=False)


def check_gradients(model, params, K, batch, data_np, peers) -> dict:
    """Max relative error of each implementation's meta-gradient against hand-written JAX."""
    _, meta_grad = peers_jax.make_step(K, sinusoid.MAML_INNER_LR, optax.sgd(1.0))
    xs, ys, xq, yq = data_np
    ref = ravel_pytree(meta_grad(params, xs, ys, xq, yq)[1])[0]
    rel = lambda g: float(jnp.max(jnp.abs(g - ref)) / jnp.max(jnp.abs(ref)))
    errors = {}
    learner = build_hiermeta(model, K, optax.sgd(1.0))  # one SGD(1) step: new phi = phi - grad
    state = learner.init(jax.random.PRNGKey(0), params)
    new, _ = jax.jit(learner.step)(state, batch)
    errors["hiermeta"] = rel(state.params["phi"] - new.params["phi"])
    for cls in peers:
        peer = cls(params, K, sinusoid.MAML_INNER_LR, OUTER_LR)
        errors[cls.name] = rel(ravel_pytree(jax.tree_util.tree_map(jnp.asarray, peer.meta_grad(peer.tensors(*data_np))))[0])
    return errors


def run_k(args, K, peers) -> dict:
    print(f"\n== K = {K} inner steps, meta-batch {META_BATCH} ==", flush=True)
    domain = sinusoid.maml_domain()
    params = sinusoid.init_mlp(jax.random.PRNGKey(0))
    model = sinusoid.make_model(params)
    keys = jax.random.split(jax.random.PRNGKey(1), NUM_BATCHES)
    batches = [sinusoid.sample_tasks(domain, k, META_BATCH)[1] for k in keys]
    arrays = [tuple(np.asarray(a) for a in (b.train.inputs, b.train.obs, b.val.inputs, b.val.obs)) for b in batches]

    errors = check_gradients(model, params, K, batches[0], arrays[0], peers)
    print("meta-gradient max relative error vs hand-written JAX: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
    bad = {k: v for k, v in errors.items() if not v < 1e-3}
    if bad:
        raise SystemExit(f"implementations disagree on the meta-gradient: {bad}")

    outer = optax.adam(OUTER_LR)
    learner = build_hiermeta(model, K, outer)
    state0 = learner.init(jax.random.PRNGKey(0), params)
    compile_s, hm_step = {}, None
    compile_s["hiermeta MAML step"], hm_step = compile_seconds(learner.step, state0, batches[0])

    hand_step, _ = peers_jax.make_step(K, sinusoid.MAML_INNER_LR, outer)
    opt0 = outer.init(params)
    compile_s["hand-written JAX"], hand = compile_seconds(hand_step, params, opt0, *arrays[0])

    sample = lambda key: sinusoid.sample_tasks(domain, key, META_BATCH)[1]
    fit_chunk = 100
    chunk = hm.train._chunk_runner(learner, sample, None, fit_chunk)
    t0 = time.perf_counter()
    chunk.lower(state0, jax.random.PRNGKey(2), fit_chunk).compile()
    compile_s["hiermeta fit"] = time.perf_counter() - t0
    hm.fit(learner, state0, sample, fit_chunk, data_key=jax.random.PRNGKey(2), chunk_size=fit_chunk, progress=False)

    def hm_run(n):
        s = state0
        for i in range(n):
            s, _ = hm_step(s, batches[i % NUM_BATCHES])
        block(s)

    def hand_run(n):
        p, o = params, opt0
        for i in range(n):
            p, o, _ = hand(p, o, *arrays[i % NUM_BATCHES])
        block(p)

    def fit_run(n):  # whole chunks of 100 steps, per-step time
        chunks = max(1, round(n / fit_chunk))
        s, _ = hm.fit(learner, state0, sample, chunks * fit_chunk, data_key=jax.random.PRNGKey(2),
                      chunk_size=fit_chunk, progress=False)
        block(s)
        fit_run.last_steps = chunks * fit_chunk

    flat_step, _ = peers_jax.make_flat_step(K, sinusoid.MAML_INNER_LR, outer, params)
    flat0 = ravel_pytree(params)[0]
    flat_opt0 = outer.init(flat0)
    compile_s["hand-written JAX (flat vector)"], flat = compile_seconds(flat_step, flat0, flat_opt0, *arrays[0])

    def flat_run(n):
        p, o = flat0, flat_opt0
        for i in range(n):
            p, o, _ = flat(p, o, *arrays[i % NUM_BATCHES])
        block(p)

    timers = [Timer("hiermeta MAML step", hm_run), Timer("hand-written JAX", hand_run),
              Timer("hand-written JAX (flat vector)", flat_run)]
    fit_timer = Timer("hiermeta fit", fit_run)
    for cls in peers:
        peer = cls(params, K, sinusoid.MAML_INNER_LR, OUTER_LR)
        data = [peer.tensors(*a) for a in arrays]

        def peer_run(n, peer=peer, data=data):
            for i in range(n):
                peer.step(data[i % NUM_BATCHES])

        timers.append(Timer(cls.name, peer_run))
    round_robin(timers, args.repeats, args.min_block)
    # fit runs whole chunks: time it apart, as seconds per meta-step
    for _ in range(args.repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fit_run(fit_chunk)
        fit_timer.blocks.append((time.perf_counter() - t0) / fit_run.last_steps)
        fit_timer.cpu_blocks.append((time.process_time() - c0) / fit_run.last_steps)

    hand_t = timers[1]
    rows, result = [], {"K": K, "meta_batch": META_BATCH,
                        "gradient_check_max_rel_error": errors, "rows": {}}
    for t in timers[:3] + [fit_timer] + timers[3:]:
        if t is fit_timer:  # timed apart: ratio of medians
            r, rc = t.median / hand_t.median, t.cpu_median / hand_t.cpu_median
        else:
            r, rc = ratio(t, hand_t), ratio(t, hand_t, cpu=True)
        rows.append([t.name, t.median * 1e3, t.cpu_median * 1e3, 1.0 / t.median, r, rc,
                     compile_s.get(t.name, float("nan"))])
        result["rows"][t.name] = {"ms_per_step": t.median * 1e3, "cpu_ms_per_step": t.cpu_median * 1e3,
                                  "steps_per_second": 1.0 / t.median, "ratio_to_hand_written_jax": r,
                                  "cpu_ratio_to_hand_written_jax": rc, "blocks_ms": [b * 1e3 for b in t.blocks],
                                  "cpu_blocks_ms": [b * 1e3 for b in t.cpu_blocks],
                                  "compile_seconds": compile_s.get(t.name)}
    print(format_table(["implementation", "ms/step", "CPU ms/step", "steps/s", "x hand JAX", "x (CPU)",
                        "compile s"], rows, 3))
    by_name = {t.name: t for t in timers}
    hm_t = by_name["hiermeta MAML step"]
    headline = {"hiermeta / hand-written JAX": (ratio(hm_t, hand_t), ratio(hm_t, hand_t, cpu=True))}
    for name in ("hand-written JAX (flat vector)", "higher", "torch autograd loop", "torch.func + vmap"):
        if name in by_name:
            t = by_name[name]
            key = f"hiermeta / {name}" if name.startswith("hand") else f"{name} / hiermeta"
            num, den = (hm_t, t) if name.startswith("hand") else (t, hm_t)
            headline[key] = (ratio(num, den), ratio(num, den, cpu=True))
    result["headline"] = {k: {"wall": v[0], "cpu": v[1]} for k, v in headline.items()}
    print("ratios, median over rounds (wall / CPU time):")
    for k, (w, c) in headline.items():
        print(f"  {k:40s} {w:9.2f} {c:9.2f}")
    return result


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--inner-steps", type=int, nargs="+", help="values of K (default 1 5 50; quick 5)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
    args = settle(p.parse_args(argv))
    Ks = args.inner_steps or ([5] if args.quick else [1, 5, 50])
    if jax.config.jax_enable_x64:
        raise SystemExit("run the benchmarks in float32 (JAX's default)")
    peers = [] if args.no_torch else peers_torch.peers()
    has = peers_torch.available()
    if not args.no_torch and not has["torch"]:
        note("PyTorch is not installed: the torch peers are skipped (pip install -e '.[bench]')")
    elif not args.no_torch and not has["higher"]:
        note("higher is not installed: its row is skipped (pip install -e '.[bench]')")
    if peers:
        import torch

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results = [run_k(args, K, peers) for K in Ks]
    write_results(args, "sinusoid_maml", {"results": results})


if __name__ == "__main__":
    main()
