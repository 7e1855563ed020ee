"""Meta-iterations per second of every learner on every domain, compile time apart.

For each domain (linear, swirl, sinusoid; meta-batch 25) and K in (5, 50) inner steps, each
learner's ``jit(learner.step)`` is compiled (``lower().compile()``, timed), then called on
pre-drawn batches; the rate is the median over repeated blocks, measured round-robin within a
(domain, K) group.  float32, default hyper-parameters of each learner, inner SGD at a stable
rate for the domain.  Learners not in this checkout are listed as skipped.

    python benchmarks/learners.py             # K = 5 and 50, every domain
    python benchmarks/learners.py --quick     # K = 5, short blocks
"""

from __future__ import annotations

from common import Timer, block, compile_seconds, format_table, note, parser, round_robin, settle, write_results  # noqa: I001

import jax  # noqa: E402

import registry  # noqa: E402

NUM_BATCHES = 4


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--inner-steps", type=int, nargs="+", help="values of K (default 5 50; quick 5)")
    p.add_argument("--domains", nargs="+", help="subset of linear swirl sinusoid")
    p.add_argument("--learners", nargs="+", help=f"subset of {list(registry.LEARNERS)}")
    args = settle(p.parse_args(argv))
    Ks = args.inner_steps or ([5] if args.quick else [5, 50])
    doms, notes = registry.domains(only=args.domains)
    for n in notes:
        note(n)
    names = args.learners or list(registry.LEARNERS)
    skipped, results, rows = {}, [], []
    for dom in doms:
        batches = [dom.sample(k) for k in jax.random.split(jax.random.PRNGKey(1), NUM_BATCHES)]
        for K in Ks:
            print(f"\n== {dom.name}, K = {K} ==", flush=True)
            timers, compile_s = [], {}
            for name in names:
                learner, why = registry.build(registry.LEARNERS, name, dom.model, K, dom.inner_lr)
                if learner is None:
                    skipped[name] = why
                    continue
                state = learner.init(jax.random.PRNGKey(0), dom.params)
                compile_s[name], step = compile_seconds(learner.step, state, batches[0])

                def run(n, step=step, state=state):
                    s = state
                    for i in range(n):
                        s, _ = step(s, batches[i % NUM_BATCHES])
                    block(s)

                timers.append(Timer(name, run))
            round_robin(timers, args.repeats, args.min_block, verbose=False)
            for t in timers:
                entry = {"domain": dom.name, "K": K, "learner": t.name, "meta_iterations_per_second": 1 / t.median,
                         "ms_per_step": t.median * 1e3, "cpu_ms_per_step": t.cpu_median * 1e3,
                         "compile_seconds": compile_s[t.name], "blocks_ms": [b * 1e3 for b in t.blocks]}
                results.append(entry)
                rows.append([dom.name, K, t.name, 1 / t.median, t.median * 1e3, t.cpu_median * 1e3, compile_s[t.name]])
                print(f"  {t.name:16s} {1 / t.median:9.1f} it/s  compile {compile_s[t.name]:.2f} s", flush=True)
    print("\nMeta-iterations per second (meta-batch 25; float32; median of blocks)")
    print(format_table(["domain", "K", "learner", "it/s", "ms/it", "CPU ms/it", "compile s"], rows, 2))
    for name, why in skipped.items():
        note(f"{name} skipped: {why}")
    write_results(args, "learners", {"results": results, "skipped": skipped, "meta_batch": 25})


if __name__ == "__main__":
    main()
