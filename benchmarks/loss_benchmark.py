"""Cost of the matching-gap losses next to InfoNCE on the same embeddings.

Prints one markdown table: for each problem size, the median wall time of the jitted
``value_and_grad`` of each loss, its ratio to InfoNCE, the Sinkhorn iterations and XLA's
memory estimate for the compiled computation (arguments + outputs + temporaries).

    python benchmarks/loss_benchmark.py                 # the README table
    python benchmarks/loss_benchmark.py --sizes=256 --repeats=3   # quick look

Embeddings are correlated pairs (``y = x + noise``), L2-normalised inside the losses, so
the Sinkhorn iteration counts are those of a partly trained model rather than pure noise.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from matching_gap import losses


def _views(key, k, n, d, noise):
    base_key, noise_key = jax.random.split(key)
    base = jax.random.normal(base_key, (n, d))
    return base[None] + noise * jax.random.normal(noise_key, (k, n, d))


def _time(fn, args, repeats):
    compiled = jax.jit(fn).lower(*args).compile()
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    mib = None
    if memory is not None:
        total = (
            memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
        )
        mib = total / 2**20
    return statistics.median(times), mib, compiled(*args)


def _row(name, n, k, fn, args, baseline, repeats):
    """Times ``fn``; the ratio is to the ``baseline`` row (itself when None)."""
    seconds, mib, ((_, aux), _) = _time(fn, args, repeats)
    iters = aux.get("sinkhorn_iterations")
    return {
        "loss": name,
        "n": n,
        "k": k,
        "seconds": seconds,
        "ratio": seconds / (baseline or {"seconds": seconds})["seconds"],
        "iters": "-" if iters is None else int(iters),
        "mib": mib,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024,4096", help="batch sizes n (two views)")
    parser.add_argument("--ks", default="2,3,4", help="M3G view counts at --m3g-n")
    parser.add_argument("--m3g-n", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--epsilon", type=float, default=0.4, help="sqeuclidean, unit vectors")
    parser.add_argument("--m3g-epsilon", type=float, default=0.2, help="circular variance")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    def grad_of(loss_fn):
        def fn(views):
            return jax.value_and_grad(lambda v: loss_fn(v), has_aux=True)(views)

        return fn

    info_nce = grad_of(lambda v: losses.info_nce(v[0], v[1], temperature=args.temperature))
    rows = []
    key = jax.random.key(0)
    for n in [int(s) for s in args.sizes.split(",")]:
        views = _views(key, 2, n, args.dim, args.noise)
        base = _row("InfoNCE", n, 2, info_nce, (views,), None, args.repeats)
        rows.append(base)
        mg = grad_of(
            lambda v: losses.matching_gap(v[0], v[1], epsilon=args.epsilon, normalize=True)
        )
        rows.append(_row("matching gap, global", n, 2, mg, (views,), base, args.repeats))
        if n > args.group_size:
            grouped = grad_of(
                lambda v: losses.matching_gap(
                    v[0], v[1], epsilon=args.epsilon, normalize=True, group_size=args.group_size
                )
            )
            name = f"matching gap, groups of {args.group_size}"
            rows.append(_row(name, n, 2, grouped, (views,), base, args.repeats))

    n = args.m3g_n
    for k in [int(s) for s in args.ks.split(",")]:
        views = _views(key, k, n, args.dim, args.noise)
        pairwise = grad_of(lambda v: losses.multiview_info_nce(v, temperature=args.temperature))
        base = _row("InfoNCE pairwise", n, k, pairwise, (views,), None, args.repeats)
        rows.append(base)
        m3g = grad_of(lambda v: losses.multi_marginal_matching_gap(v, epsilon=args.m3g_epsilon))
        rows.append(_row("M3G", n, k, m3g, (views,), base, args.repeats))

    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, d = {args.dim}, "
        f"eps = {args.epsilon} (M3G {args.m3g_epsilon}), tau = {args.temperature}, "
        f"median of {args.repeats}"
    )
    print()
    print("| loss | n | k | value_and_grad (ms) | vs InfoNCE | Sinkhorn iters | memory (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mib = "-" if r["mib"] is None else f"{r['mib']:.1f}"
        print(
            f"| {r['loss']} | {r['n']} | {r['k']} | {1e3 * r['seconds']:.2f} | {r['ratio']:.2f}x "
            f"| {r['iters']} | {mib} |"
        )


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
