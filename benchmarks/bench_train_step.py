"""Train-step benchmark: eqxjd (step under `eqx.filter_jit`) against TorchJD 0.18.0.

1. The seed example: `Linear(10, 5) -> ReLU -> Linear(5, 2)`, batch 16, one MSE loss per
   output, UPGrad, SGD(0.1), 100 steps, float64, identical initial weights and data.
   TorchJD: `autojac.backward([l1, l2])` + `jac_to_grad(model.parameters(), UPGrad())`.
   eqxjd: `eqxjd.filter_value_and_aggregate(losses_fn, eqxjd.UPGrad())` + SGD, jitted.
2. A larger multi-task model: an MLP trunk (>= 1e5 parameters) and m task heads.
   TorchJD: `mtl_backward(losses, features=...)` +
   `jac_to_grad(trunk.parameters(), UPGrad())`.
   eqxjd: `eqxjd.filter_mtl_value_and_aggregate(...)`, jitted.

Prints the median per-step time of each (compilation excluded: the first eqxjd step is a
warm-up), the ratio, and the max absolute difference of the two loss trajectories.
torch is optional: without it only eqxjd runs.

    python benchmarks/bench_train_step.py [--steps 100] [--mtl-steps 20] [--m 4]
"""

import argparse
import time

import jax


jax.config.update("jax_enable_x64", True)

import equinox as eqx
import eqxjd
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


try:
    import torch
    from torchjd.aggregation import UPGrad as TorchUPGrad
    from torchjd.autojac import backward, jac_to_grad, mtl_backward
except ImportError:  # torch / torchjd are optional
    torch = None


# --------------------------------------------------------------------------------------
# Shared: parameters as numpy arrays in torch layout (weight (out, in), bias (out,))
# --------------------------------------------------------------------------------------


def init_linear(rng, n_in, n_out):
    bound = 1 / np.sqrt(n_in)
    return (
        rng.uniform(-bound, bound, (n_out, n_in)),
        rng.uniform(-bound, bound, (n_out,)),
    )


def eqx_linear(weight, bias):
    layer = eqx.nn.Linear(weight.shape[1], weight.shape[0], key=jax.random.key(0))
    return eqx.tree_at(
        lambda l: (l.weight, l.bias), layer, (jnp.asarray(weight), jnp.asarray(bias))
    )


def torch_linear(weight, bias):
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer


def timed(step, steps, sync):
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        out = step()
        sync(out)
        times.append(time.perf_counter() - start)
        losses.append(np.asarray(out))
    return np.asarray(times), np.stack(losses)


# --------------------------------------------------------------------------------------
# 1. Seed example
# --------------------------------------------------------------------------------------


def seed_example(steps, seed=0):
    rng = np.random.default_rng(seed)
    layers = [init_linear(rng, 10, 5), init_linear(rng, 5, 2)]
    x = rng.standard_normal((16, 10))
    y = rng.standard_normal((16, 2))

    # eqxjd
    model = eqx.nn.Sequential(
        [eqx_linear(*layers[0]), eqx.nn.Lambda(jax.nn.relu), eqx_linear(*layers[1])]
    )
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def losses_fn(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2, axis=0)

    value_and_update = eqxjd.filter_value_and_aggregate(losses_fn, eqxjd.UPGrad())

    @eqx.filter_jit
    def jax_step(model, x, y):
        out = value_and_update(model, x, y)
        return eqx.apply_updates(
            model, jtu.tree_map(lambda u: -0.1 * u, out.update)
        ), out.losses

    jax.block_until_ready(jax_step(model, xj, yj))  # compile (a throw-away step)
    state = {"model": model}

    def jstep():
        state["model"], losses = jax_step(state["model"], xj, yj)
        return losses

    jax_times, jax_losses = timed(jstep, steps, jax.block_until_ready)
    result = {"eqxjd_ms": 1e3 * np.median(jax_times), "eqxjd_losses": jax_losses}
    if torch is None:
        return result

    torch.manual_seed(0)
    tmodel = torch.nn.Sequential(
        torch_linear(*layers[0]), torch.nn.ReLU(), torch_linear(*layers[1])
    )
    opt = torch.optim.SGD(tmodel.parameters(), lr=0.1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    aggregator = TorchUPGrad()

    def tstep():
        pred = tmodel(xt)
        l1 = ((pred[:, 0] - yt[:, 0]) ** 2).mean()
        l2 = ((pred[:, 1] - yt[:, 1]) ** 2).mean()
        opt.zero_grad()
        backward([l1, l2])
        jac_to_grad(tmodel.parameters(), aggregator)
        opt.step()
        return np.array([l1.item(), l2.item()])

    torch_times, torch_losses = timed(tstep, steps, lambda _: None)
    result.update(
        torch_ms=1e3 * np.median(torch_times),
        torch_losses=torch_losses,
        max_diff=float(np.max(np.abs(jax_losses - torch_losses))),
    )
    return result


# --------------------------------------------------------------------------------------
# 2. Larger multi-task model
# --------------------------------------------------------------------------------------


def mtl_model(steps, m, seed=1, widths=(64, 256, 256, 128), batch=64):
    rng = np.random.default_rng(seed)
    trunk = [init_linear(rng, a, b) for a, b in zip(widths[:-1], widths[1:])]
    heads = [init_linear(rng, widths[-1], 1) for _ in range(m)]
    n_trunk = sum(w.size + b.size for w, b in trunk)
    x = rng.standard_normal((batch, widths[0]))
    y = rng.standard_normal((batch, m))

    # eqxjd
    jtrunk = [eqx_linear(*layer) for layer in trunk]
    jheads = tuple(eqx_linear(*head) for head in heads)
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def features_fn(trunk, x, y):
        h = x
        for layer in trunk:
            h = jax.nn.relu(jax.vmap(layer)(h))
        return h

    def losses_fn(heads, features, x, y):
        preds = jnp.stack([jax.vmap(h)(features)[:, 0] for h in heads], axis=1)
        return jnp.mean((preds - y) ** 2, axis=0)

    value_and_update = eqxjd.filter_mtl_value_and_aggregate(
        features_fn, losses_fn, eqxjd.UPGrad()
    )

    @eqx.filter_jit
    def jax_step(params, x, y):
        out = value_and_update(params[0], params[1], x, y)
        return eqx.apply_updates(
            params, jtu.tree_map(lambda u: -0.01 * u, out.update)
        ), out.losses

    params = (jtrunk, jheads)
    jax.block_until_ready(jax_step(params, xj, yj))
    state = {"params": params}

    def jstep():
        state["params"], losses = jax_step(state["params"], xj, yj)
        return losses

    jax_times, jax_losses = timed(jstep, steps, jax.block_until_ready)
    result = {
        "n_trunk": n_trunk,
        "eqxjd_ms": 1e3 * np.median(jax_times),
        "eqxjd_losses": jax_losses,
    }
    if torch is None:
        return result

    layers = []
    for layer in trunk:
        layers += [torch_linear(*layer), torch.nn.ReLU()]
    ttrunk = torch.nn.Sequential(*layers)
    theads = [torch_linear(*head) for head in heads]
    all_params = list(ttrunk.parameters()) + [p for h in theads for p in h.parameters()]
    opt = torch.optim.SGD(all_params, lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    aggregator = TorchUPGrad()

    def tstep():
        features = ttrunk(xt)
        losses = [
            ((h(features)[:, 0] - yt[:, i]) ** 2).mean() for i, h in enumerate(theads)
        ]
        opt.zero_grad()
        mtl_backward(losses, features=features)
        jac_to_grad(ttrunk.parameters(), aggregator)
        opt.step()
        return np.array([loss.item() for loss in losses])

    torch_times, torch_losses = timed(tstep, steps, lambda _: None)
    result.update(
        torch_ms=1e3 * np.median(torch_times),
        torch_losses=torch_losses,
        max_diff=float(np.max(np.abs(jax_losses - torch_losses))),
    )
    return result


def report(name, result, steps):
    print(f"\n== {name} ({steps} steps, float64) ==")
    if "n_trunk" in result:
        print(f"trunk parameters: {result['n_trunk']}")
    print(f"eqxjd  median step: {result['eqxjd_ms']:.3f} ms")
    if "torch_ms" not in result:
        print("TorchJD: skipped (torch/torchjd not installed)")
        return
    print(f"TorchJD median step: {result['torch_ms']:.3f} ms")
    print(f"speed-up (TorchJD / eqxjd): {result['torch_ms'] / result['eqxjd_ms']:.1f}x")
    print(
        f"max |loss_eqxjd - loss_torchjd| over the trajectory: {result['max_diff']:.3e}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--mtl-steps", type=int, default=20)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch.set_num_threads"
    )
    args = parser.parse_args()
    if torch is not None and args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}", end="")
    print(
        f"; torch {torch.__version__}, threads {torch.get_num_threads()}"
        if torch
        else ""
    )
    report("seed example", seed_example(args.steps), args.steps)
    report(
        f"multi-task model, m = {args.m}",
        mtl_model(args.mtl_steps, args.m),
        args.mtl_steps,
    )


if __name__ == "__main__":
    main()
