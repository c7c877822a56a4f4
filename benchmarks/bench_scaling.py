"""Data-parallel Jacobian descent on 1, 2, 4, 8 devices: time per step and its parts.

Instance-wise risk minimisation with UPGrad (one loss per sample) on an MLP
784 -> 1024 -> 256 -> 10 (1,068,810 parameters, float32) at batch 256, with
`strategy=eqxjd.DataParallel(mesh, "data")`. For each device count `D` a fresh process
runs (on CPU with `--xla_force_host_platform_device_count=D`; on a GPU machine with
the first `D` GPUs) and reports, as medians of `--reps` jitted calls after a warm-up:

- `step`: the whole step (`eqx.filter_jit` of the step), with the structured Gramian
  (the default: ghost factors of the local samples gathered, each device computes its
  rows of G);
- `step_gradients`: the same with `method="gradients"` (per-sample Jacobians);
- `gramian`, `gramian_gradients`: the Gramian as each method computes it in the step
  (losses included);
- `jacobians`: each device's per-sample Jacobians of its B / D samples;
- `exchange`: the all-to-all that gives every device all B rows of 1 / D of the
  columns, and the psum of the (B, B) partial Gramians (on arrays of those shapes);
- `contraction`: the (B, n / D) x (n / D, B) product of one device;
- `qp`: UPGrad's weights from G (the B lane QPs split over the devices);
- `update`: each device's VJP of the weighted losses, summed over the devices;
- `ring`: for comparison, a ring exchange (D `ppermute`s of a device's (B / D, n)
  per-sample Jacobians, and a (B / D, B / D) block per visit) that builds the same
  row blocks of G.

`traffic` is what one device sends per step for the Gramian: with the structured
Gramian, its factors (the inputs and output cotangents of the dense layers, f floats
per sample) to the D - 1 others, (D - 1) (B / D) f, and its (B / D, B) rows of G,
(D - 1) (B / D) B floats; with per-sample gradients, the all-to-all
(D - 1) / D * (B / D) * n floats plus a ring all-reduce of the (B, B) Gramian,
2 (D - 1) / D * B^2 floats; the ring sends D * (B / D) * n floats.

Host devices share the machine's cores: on CPU the numbers measure overheads and
traffic, not speed-ups.

    python benchmarks/bench_scaling.py [--devices 1 2 4 8] [--batch 256] [--reps 3]
"""

import os


# jaxlib's LAPACK (OpenBLAS) threads its Cholesky from n = 128 on; UPGrad's many
# small per-lane factorisations then slow down 10-100x on a small machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import statistics
import subprocess
import sys
import time


SIZES = (784, 1024, 256, 10)


def _timed(fn, *args, reps: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(devices: int, batch: int, reps: int) -> dict:
    import equinox as eqx
    import eqxjd
    import jax
    import jax.lax as lax
    import jax.numpy as jnp
    import jax.random as jr
    import jax.tree_util as jtu
    from eqxjd._sharding import _gramian_part, _layout, _update_part, _weigh
    from eqxjd._step import gram_spec_of, Problem
    from jax.sharding import NamedSharding, PartitionSpec as P

    available = jax.devices()
    if len(available) < devices:
        return {"skipped": f"{len(available)} device(s) available"}
    mesh = jax.make_mesh((devices,), ("data",), devices=available[:devices])
    kmodel, kx, ky = jr.split(jr.key(0), 3)
    keys = jr.split(kmodel, 3)
    layers = [eqx.nn.Linear(SIZES[i], SIZES[i + 1], key=keys[i]) for i in range(3)]

    def per_sample_losses(layers, xs, ys):
        def forward(x):
            for layer in layers[:-1]:
                x = jax.nn.relu(layer(x))
            return layers[-1](x)

        return jnp.sum((jax.vmap(forward)(xs) - ys) ** 2, axis=1)

    n = sum(x.size for x in jtu.tree_leaves(eqx.filter(layers, eqx.is_array)))
    rows = NamedSharding(mesh, P("data"))
    xs = jax.device_put(jr.normal(kx, (batch, SIZES[0])), rows)
    ys = jax.device_put(jr.normal(ky, (batch, SIZES[-1])), rows)
    replicated = NamedSharding(mesh, P())
    diff, static = eqx.partition(layers, eqx.is_inexact_array)
    diff = jax.device_put(diff, replicated)
    layers = eqx.combine(diff, static)

    aggregator = eqxjd.UPGrad()
    out = {"devices": devices, "platform": available[0].platform, "n": n}
    for method, suffix in (("structured", ""), ("gradients", "_gradients")):
        strategy = eqxjd.DataParallel(mesh, "data", method=method)
        step = eqx.filter_jit(
            eqxjd.filter_value_and_aggregate(
                per_sample_losses, aggregator, strategy=strategy
            )
        )
        out["step" + suffix] = _timed(step, layers, xs, ys, reps=reps)

    # The step's pieces, as the strategy runs them.
    problem = Problem(per_sample_losses, False, static, (xs, ys), {})
    spec = gram_spec_of(diff, True)
    layout = _layout(mesh, "data", diff)
    gramian = eqx.filter_jit(_gramian_part)
    for method, suffix in (("structured", ""), ("gradients", "_gradients")):
        args = (layout, method, spec, problem.batched, diff, (xs, ys))
        out["gramian" + suffix] = _timed(gramian, *args, reps=reps)
    _, g = gramian(layout, "structured", spec, problem.batched, diff, (xs, ys))
    weigh = eqx.filter_jit(_weigh)
    out["qp"] = _timed(weigh, layout, aggregator.weighting, g, None, None, reps=reps)
    weights, _ = weigh(layout, aggregator.weighting, g, None, None)
    update = eqx.filter_jit(_update_part)
    out["update"] = _timed(
        update, layout, problem.batched, diff, weights, (xs, ys), reps=reps
    )

    # The Gramian's parts on arrays of the same shapes.
    local = batch // devices
    cols = -(-n // devices) * devices

    def shard_map(body, in_specs, out_specs):
        return jax.jit(
            jax.shard_map(
                body,
                mesh=mesh,
                in_specs=in_specs,
                out_specs=out_specs,
                check_vma=False,
            )
        )

    def jacobians(diff, xs, ys):
        def one(x, y):
            return jax.grad(lambda d: per_sample_losses(d, x[None], y[None])[0])(diff)

        jac = jax.vmap(one)(xs, ys)
        # Summed so that nothing is left out, without moving (B / D, n) values.
        return sum(jnp.sum(leaf) for leaf in jtu.tree_leaves(jac))[None]

    out["jacobians"] = _timed(
        shard_map(jacobians, (P(), P("data"), P("data")), P("data")),
        diff,
        xs,
        ys,
        reps=reps,
    )
    mine = jax.device_put(jnp.ones((batch, cols), jnp.float32), rows)

    def exchange(mine):
        moved = lax.all_to_all(mine, "data", split_axis=1, concat_axis=0, tiled=True)
        # A (B, B) block that depends on the moved values at the cost of a sum.
        part = jnp.zeros((batch, batch), mine.dtype) + jnp.sum(moved)
        return lax.psum(part, "data")

    out["exchange"] = _timed(shard_map(exchange, P("data"), P()), mine, reps=reps)
    block = jax.device_put(
        jnp.ones((batch, cols), jnp.float32), NamedSharding(mesh, P(None, "data"))
    )

    def contraction(block):
        return jnp.matmul(block, block.T, precision=lax.Precision.HIGHEST)[None]

    out["contraction"] = _timed(
        shard_map(contraction, P(None, "data"), P("data")), block, reps=reps
    )

    def ring(mine):
        index = lax.axis_index("data")
        perm = [(j, (j + 1) % devices) for j in range(devices)]

        def visit(s, carry):
            g, visiting = carry
            source = (index - s) % devices
            blk = jnp.matmul(mine, visiting.T, precision=lax.Precision.HIGHEST)
            g = lax.dynamic_update_slice(g, blk, (0, source * local))
            return g, lax.ppermute(visiting, "data", perm)

        g = jnp.zeros((local, batch), mine.dtype)
        g, _ = lax.fori_loop(0, devices, visit, (g, mine))
        return g

    out["ring"] = _timed(shard_map(ring, P("data"), P("data")), mine[:, :n], reps=reps)
    floats = (devices - 1) / devices * local * n + 2 * (
        devices - 1
    ) / devices * batch**2
    out["traffic_gradients_gb"] = floats * 4 / 1e9
    factors = sum(SIZES[i] + SIZES[i + 1] for i in range(3))
    out["traffic_gb"] = (devices - 1) * local * (factors + batch) * 4 / 1e9
    out["ring_traffic_gb"] = devices * local * n * 4 / 1e9
    return out


def _run(devices: int, batch: int, reps: int, timeout: float) -> dict:
    env = dict(os.environ)
    if "JAX_PLATFORMS" not in env or env["JAX_PLATFORMS"] == "cpu":
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
    command = [sys.executable, __file__, "--worker", str(devices)]
    command += ["--batch", str(batch), "--reps", str(reps)]
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"devices": devices, "skipped": f"timed out after {timeout} s"}
    if proc.returncode:
        return {"devices": devices, "skipped": proc.stderr.strip()[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


_COLUMNS = (
    "step",
    "gramian",
    "step_gradients",
    "gramian_gradients",
    "jacobians",
    "exchange",
    "contraction",
    "qp",
    "update",
    "ring",
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(_worker(args.worker, args.batch, args.reps)))
        return
    results = [_run(d, args.batch, args.reps, args.timeout) for d in args.devices]
    names = [c.replace("_gradients", " (gradients)") for c in _COLUMNS]
    header = ["D"] + [f"{c} s" for c in names]
    header += ["GB sent", "GB sent (gradients)", "ring GB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        if "skipped" in r:
            print(f"| {r['devices']} | skipped: {r['skipped']} |")
            continue
        cells = [str(r["devices"])] + [f"{r[c]:.3f}" for c in _COLUMNS]
        cells += [
            f"{r[k]:.3f}"
            for k in ("traffic_gb", "traffic_gradients_gb", "ring_traffic_gb")
        ]
        print("| " + " | ".join(cells) + " |")
    first = next((r for r in results if "skipped" not in r), None)
    if first is not None:
        print(f"\nplatform {first['platform']}, n = {first['n']}, batch {args.batch}")
        base = first["step"]
        for r in results:
            if "skipped" not in r:
                exchange = r["exchange"] + r["contraction"]
                print(
                    f"D = {r['devices']}: step / step(D = {first['devices']}) = "
                    f"{r['step'] / base:.2f}; step_gradients / step = "
                    f"{r['step_gradients'] / r['step']:.2f}; ring / (exchange + "
                    f"contraction) = {r['ring'] / exchange:.2f}"
                )


if __name__ == "__main__":
    main()
