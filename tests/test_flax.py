"""Flax models train with eqxjd's steps as they are.

The recipe of `docs/flax.md`: the step differentiates the first argument, which may
be any pytree, so it receives the trainable parameters (an `nnx.State` of `nnx.Param`
from `nnx.split`, or Linen's `params` collection); batch statistics and RNG state go
through the loss function as keyword arguments, untouched by the step.

Checked here, in float64 and on the same weights: the updates, weights and losses of
a Flax model equal those of an Equinox model written out by hand to 1e-12 (relative),
for UPGrad and GradVac (stateful and random), with the full Jacobian and with the
per-sample Gramian; BatchNorm in training mode (batch statistics returned as `aux`);
dropout with one key per sample, which keeps the per-sample Gramian exact; and the
Python blocks of `docs/flax.md`, which `tests/test_docs.py` leaves to this module (it
cannot skip a page whose optional dependency is missing).
"""

import contextlib
import functools as ft
import io
import pathlib
import re

import equinox as eqx
import eqxjd
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest


flax = pytest.importorskip("flax")
from flax import linen as nn, nnx  # noqa: E402


F64 = jnp.float64
EPS = 1e-5  # BatchNorm's epsilon, Flax's default
TOL = 1e-12
B = 6

AGGREGATORS = {"upgrad": eqxjd.UPGrad, "gradvac": eqxjd.GradVac}
STRATEGIES = {
    "full_jacobian": eqxjd.FullJacobian,
    "per_sample_gramian": eqxjd.PerSampleGramian,
}


@pytest.fixture(autouse=True)
def _standard_promotion():
    # Flax mixes Python scalars and arrays of other ranks; its users run JAX's defaults.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


def relative_difference(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def assert_same(flax_leaves: dict, eqx_leaves: dict) -> float:
    assert flax_leaves.keys() == eqx_leaves.keys()
    worst = max(relative_difference(flax_leaves[k], eqx_leaves[k]) for k in eqx_leaves)
    assert worst <= TOL, worst
    return worst


def flat(tree) -> dict:
    """A nested dict (`nnx.to_pure_dict(nnx.State)`, Linen's params) as dotted names."""
    return {
        ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
        for path, leaf in jtu.tree_leaves_with_path(tree)
    }


def run_steps(step, params, batches, lr, key, stateful, **kwargs):
    """Two plain SGD steps, the state and keys threaded: `[Aggregated, ...]`."""
    state = step.init(params, *batches[0], **kwargs) if stateful else None
    jitted = eqx.filter_jit(step)  # one compilation for both steps
    outs = []
    for batch in batches:
        key, sub = jr.split(key)
        out = jitted(params, *batch, agg_state=state, agg_key=sub, **kwargs)
        params = eqx.apply_updates(params, jtu.tree_map(lambda u: -lr * u, out.update))
        state = out.state
        outs.append(out)
    return outs


# --------------------------------------------------------------------------- NNX


class NNXNet(nnx.Module):
    """Linear, BatchNorm on running statistics, tanh, dropout, two heads."""

    def __init__(self, rngs, dropout=0.0):
        kw = dict(param_dtype=F64, rngs=rngs)
        self.linear = nnx.Linear(5, 8, **kw)
        self.norm = nnx.BatchNorm(8, use_running_average=True, **kw)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.heads = nnx.List([nnx.Linear(8, 1, **kw), nnx.Linear(8, 1, **kw)])

    def __call__(self, x, *, rngs=None):
        h = self.drop(jnp.tanh(self.norm(self.linear(x))), rngs=rngs)
        return jnp.concatenate([head(h) for head in self.heads], axis=-1)


def make_nnx(key, dropout=0.0):
    model = NNXNet(nnx.Rngs(int(jr.randint(key, (), 0, 2**30))), dropout)
    kmean, kvar, kscale, kbias = jr.split(key, 4)
    # Non-trivial statistics and affine weights, so that passing them matters.
    model.norm.mean.set_value(jr.normal(kmean, (8,), F64))
    model.norm.var.set_value(jr.uniform(kvar, (8,), F64, 0.5, 2.0))
    scale, bias = model.norm.scale, model.norm.bias
    assert scale is not None and bias is not None  # use_scale, use_bias
    scale.set_value(jr.uniform(kscale, (8,), F64, 0.5, 1.5))
    bias.set_value(0.1 * jr.normal(kbias, (8,), F64))
    return model


def nnx_losses(graphdef):
    def losses_fn(params, x, y, *, rest):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return (model(x) - y) ** 2  # (B, 2): one loss per sample and task

    return losses_fn


class EqxNet(eqx.Module):
    linear: eqx.nn.Linear
    scale: jax.Array
    bias: jax.Array
    heads: tuple[eqx.nn.Linear, eqx.nn.Linear]

    def __call__(self, x, mean, var):
        h = self.linear(x)
        # Flax's order of operations: (h - mean) * (scale / sqrt(var + eps)) + bias.
        h = (h - mean) * (lax.rsqrt(var + EPS) * self.scale) + self.bias
        h = jnp.tanh(h)
        return jnp.concatenate([head(h) for head in self.heads])


def eqx_linear(kernel, bias):
    out_features, in_features = kernel.shape[1], kernel.shape[0]
    layer = eqx.nn.Linear(in_features, out_features, key=jr.key(0), dtype=F64)
    return eqx.tree_at(lambda l: (l.weight, l.bias), layer, (kernel.T, bias))


def eqx_from_nnx(params) -> EqxNet:
    p = nnx.to_pure_dict(params)
    heads = tuple(
        eqx_linear(p["heads"][i]["kernel"], p["heads"][i]["bias"]) for i in (0, 1)
    )
    return EqxNet(
        eqx_linear(p["linear"]["kernel"], p["linear"]["bias"]),
        p["norm"]["scale"],
        p["norm"]["bias"],
        heads,
    )


def eqx_losses(model, x, y, *, mean, var):
    return (jax.vmap(lambda xi: model(xi, mean, var))(x) - y) ** 2


def eqx_net_as_nnx_names(net) -> dict:
    """An EqxNet-shaped update under the names and layouts of the NNX parameters."""
    out = {
        "linear.kernel": net.linear.weight.T,
        "linear.bias": net.linear.bias,
        "norm.scale": net.scale,
        "norm.bias": net.bias,
    }
    for i, head in enumerate(net.heads):
        out[f"heads.{i}.kernel"] = head.weight.T
        out[f"heads.{i}.bias"] = head.bias
    return out


def data(key, shape_x, outputs):
    kx, ky = jr.split(key)
    batches = []
    for k in jr.split(kx, 2):
        k1, k2 = jr.split(k)
        y = (
            jr.normal(k2, (B, outputs), F64)
            if outputs
            else jr.randint(k2, (B,), 0, 3)  # class labels
        )
        batches.append((jr.normal(k1, (B, *shape_x), F64), y))
    return batches


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_nnx_matches_equinox(strategy, aggregator, getkey):
    model = make_nnx(getkey())
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batches = data(getkey(), (5,), 2)
    agg, strat = AGGREGATORS[aggregator](), STRATEGIES[strategy]()
    stateful = aggregator == "gradvac"
    key = getkey()

    step = eqxjd.filter_value_and_aggregate(nnx_losses(graphdef), agg, strategy=strat)
    flax_outs = run_steps(step, params, batches, 0.1, key, stateful, rest=rest)

    stats = dict(mean=model.norm.mean[...], var=model.norm.var[...])
    eqx_step = eqxjd.filter_value_and_aggregate(eqx_losses, agg, strategy=strat)
    eqx_outs = run_steps(
        eqx_step, eqx_from_nnx(params), batches, 0.1, key, stateful, **stats
    )

    for f, e in zip(flax_outs, eqx_outs):
        assert_same(flat(nnx.to_pure_dict(f.update)), eqx_net_as_nnx_names(e.update))
        assert_same({"w": f.weights, "l": f.losses}, {"w": e.weights, "l": e.losses})
    # The statistics went through untouched.
    assert rest["norm"]["mean"][...] is model.norm.mean[...]


def test_nnx_optimizer_takes_the_update(getkey):
    pytest.importorskip("optax")
    import optax

    model = make_nnx(getkey())
    (x, y), _ = data(getkey(), (5,), 2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    step = eqxjd.filter_value_and_aggregate(nnx_losses(graphdef), eqxjd.Mean())
    out = step(params, x, y, rest=rest)
    # Computed first: the states of `nnx.split` share their variables with the model.
    expected = flat(
        nnx.to_pure_dict(jtu.tree_map(lambda p, u: p - 0.5 * u, params, out.update))
    )
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    optimizer.update(model, out.update)
    assert_same(flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))), expected)


# ------------------------------------------------------------------------- Linen


class LinenNet(nn.Module):
    """Conv, BatchNorm, tanh, dropout, Dense: three logits per image."""

    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, *, train=False, rng_dropout=False):
        x = nn.Conv(4, (3, 3), padding="VALID", param_dtype=F64)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, param_dtype=F64)(
            x
        )
        x = jnp.tanh(x)
        x = nn.Dropout(self.dropout, deterministic=not rng_dropout)(x)
        x = jnp.reshape(x, (x.shape[0], -1))
        return nn.Dense(3, param_dtype=F64)(x)


def cross_entropy(logits, labels):
    log_p = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_p, labels[:, None], axis=1)[:, 0]


def make_linen(key, dropout=0.0):
    model = LinenNet(dropout)
    kinit, kmean, kvar, kscale = jr.split(key, 4)
    variables = model.init(kinit, jnp.zeros((1, 6, 6, 1), F64))
    params = variables["params"]
    params["BatchNorm_0"]["scale"] = jr.uniform(kscale, (4,), F64, 0.5, 1.5)
    batch_stats = {
        "BatchNorm_0": {
            "mean": 0.3 * jr.normal(kmean, (4,), F64),
            "var": jr.uniform(kvar, (4,), F64, 0.5, 2.0),
        }
    }
    return model, params, batch_stats


def linen_losses(model):
    def per_sample_losses(params, x, labels, *, batch_stats):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x)
        return cross_entropy(logits, labels)  # (B,)

    return per_sample_losses


class EqxConvNet(eqx.Module):
    conv: eqx.nn.Conv2d
    scale: jax.Array
    bias: jax.Array
    dense: eqx.nn.Linear

    def features(self, x):
        """Convolution of one HWC image, as CHW."""
        return self.conv(jnp.transpose(x, (2, 0, 1)))

    def head(self, h, mean, var):
        c = (slice(None), None, None)  # per channel, on CHW
        h = (h - mean[c]) * (lax.rsqrt(var + EPS) * self.scale)[c] + self.bias[c]
        h = jnp.tanh(h)
        return self.dense(jnp.reshape(jnp.transpose(h, (1, 2, 0)), (-1,)))  # HWC order


def eqx_from_linen(params) -> EqxConvNet:
    kernel = params["Conv_0"]["kernel"]  # (kh, kw, in, out) -> (out, in, kh, kw)
    conv = eqx.nn.Conv2d(1, 4, 3, key=jr.key(0), dtype=F64)
    conv = eqx.tree_at(
        lambda c: (c.weight, c.bias),
        conv,
        (jnp.transpose(kernel, (3, 2, 0, 1)), params["Conv_0"]["bias"][:, None, None]),
    )
    dense = params["Dense_0"]
    return EqxConvNet(
        conv,
        params["BatchNorm_0"]["scale"],
        params["BatchNorm_0"]["bias"],
        eqx_linear(dense["kernel"], dense["bias"]),
    )


def eqx_conv_as_linen_names(net) -> dict:
    return {
        "Conv_0.kernel": jnp.transpose(net.conv.weight, (2, 3, 1, 0)),
        "Conv_0.bias": net.conv.bias[:, 0, 0],
        "BatchNorm_0.scale": net.scale,
        "BatchNorm_0.bias": net.bias,
        "Dense_0.kernel": net.dense.weight.T,
        "Dense_0.bias": net.dense.bias,
    }


def eqx_conv_losses(model, x, labels, *, mean, var):
    logits = jax.vmap(lambda xi: model.head(model.features(xi), mean, var))(x)
    return cross_entropy(logits, labels)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_linen_matches_equinox(strategy, aggregator, getkey):
    model, params, batch_stats = make_linen(getkey())
    batches = data(getkey(), (6, 6, 1), 0)
    agg, strat = AGGREGATORS[aggregator](), STRATEGIES[strategy]()
    stateful = aggregator == "gradvac"
    key = getkey()

    step = eqxjd.filter_value_and_aggregate(linen_losses(model), agg, strategy=strat)
    flax_outs = run_steps(
        step, params, batches, 0.1, key, stateful, batch_stats=batch_stats
    )

    stats = batch_stats["BatchNorm_0"]
    eqx_step = eqxjd.filter_value_and_aggregate(eqx_conv_losses, agg, strategy=strat)
    eqx_outs = run_steps(
        eqx_step, eqx_from_linen(params), batches, 0.1, key, stateful, **stats
    )

    for f, e in zip(flax_outs, eqx_outs):
        assert_same(flat(f.update), eqx_conv_as_linen_names(e.update))
        assert_same({"w": f.weights, "l": f.losses}, {"w": e.weights, "l": e.losses})


@pytest.mark.parametrize("strategy", ["full_jacobian", "gramian"])
def test_linen_batchnorm_training_mode(strategy, getkey):
    # Batch statistics mix the samples: the per-sample Gramian does not apply, the
    # full Jacobian and the Gramian do. The new statistics come back as `aux`. (Here
    # and below, IMTL-G: any Gramian weighting shows it, and it compiles in a second.)
    model, params, batch_stats = make_linen(getkey())
    (x, labels), _ = data(getkey(), (6, 6, 1), 0)
    strat = eqxjd.FullJacobian() if strategy == "full_jacobian" else eqxjd.Gramian()

    def losses_fn(params, x, labels, *, batch_stats):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return cross_entropy(logits, labels), updates["batch_stats"]

    step = eqxjd.filter_value_and_aggregate(
        losses_fn, eqxjd.IMTLG(), has_aux=True, strategy=strat
    )
    out = eqx.filter_jit(step)(params, x, labels, batch_stats=batch_stats)

    def eqx_losses_train(net, x, labels, *, mean, var):
        h = jax.vmap(net.features)(x)  # (B, C, H, W)
        mu = jnp.mean(h, axis=(0, 2, 3))
        # Flax's fast variance: E[h^2] - E[h]^2, clipped at 0.
        batch_var = jnp.maximum(0.0, jnp.mean(h**2, axis=(0, 2, 3)) - mu**2)
        logits = jax.vmap(lambda hi: net.head(hi, mu, batch_var))(h)
        new = {"mean": 0.9 * mean + 0.1 * mu, "var": 0.9 * var + 0.1 * batch_var}
        return cross_entropy(logits, labels), {"BatchNorm_0": new}

    eqx_step = eqxjd.filter_value_and_aggregate(
        eqx_losses_train, eqxjd.IMTLG(), has_aux=True, strategy=strat
    )
    stats = batch_stats["BatchNorm_0"]
    e = eqx.filter_jit(eqx_step)(eqx_from_linen(params), x, labels, **stats)
    assert_same(flat(out.update), eqx_conv_as_linen_names(e.update))
    assert_same(flat(out.aux), flat(lax.stop_gradient(e.aux)))
    assert relative_difference(out.aux["BatchNorm_0"]["mean"], stats["mean"]) > 1e-3


# ------------------------------------------------------------------------ dropout


def nnx_dropout_losses(graphdef, per_sample_keys):
    def losses_fn(params, x, y, keys, *, rest):
        model = nnx.merge(graphdef, params, rest, copy=True)
        if per_sample_keys:
            # Sample i draws its mask from keys[i], whatever the batch it is in.
            pred = jax.vmap(lambda xi, ki: model(xi[None], rngs=ki)[0])(x, keys)
        else:
            pred = model(x, rngs=keys[0])  # one mask for the batch: not per sample
        return jnp.sum((pred - y) ** 2, axis=1)

    return losses_fn


def linen_dropout_losses(model, per_sample_keys):
    def losses_fn(params, x, labels, keys, *, batch_stats):
        variables = {"params": params, "batch_stats": batch_stats}

        def apply(x, key):
            return model.apply(variables, x, rng_dropout=True, rngs={"dropout": key})

        if per_sample_keys:
            logits = jax.vmap(lambda xi, ki: apply(xi[None], ki)[0])(x, keys)
        else:
            logits = apply(x, keys[0])
        return cross_entropy(logits, labels)

    return losses_fn


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_dropout_with_per_sample_keys(framework, getkey):
    # With one key per sample (a batched argument), a sample's loss is the same in any
    # batch, so the per-sample Gramian's update equals the full Jacobian's. With one
    # key for the batch it does not: the masks of a batch of one differ.
    keys = jr.split(getkey(), B)
    if framework == "nnx":
        model = make_nnx(getkey(), dropout=0.5)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        (x, y), _ = data(getkey(), (5,), 2)
        make = ft.partial(nnx_dropout_losses, graphdef)
        kwargs = dict(rest=rest)
    else:
        model, params, batch_stats = make_linen(getkey(), dropout=0.5)
        (x, y), _ = data(getkey(), (6, 6, 1), 0)
        make = ft.partial(linen_dropout_losses, model)
        kwargs = dict(batch_stats=batch_stats)

    def update(per_sample_keys, strategy):
        step = eqxjd.filter_value_and_aggregate(
            make(per_sample_keys), eqxjd.IMTLG(), strategy=strategy
        )
        return flat(eqx.filter_jit(step)(params, x, y, keys, **kwargs).update)

    full = update(True, eqxjd.FullJacobian())
    assert_same(update(True, eqxjd.PerSampleGramian()), full)
    shared_full = update(False, eqxjd.FullJacobian())
    shared_gram = update(False, eqxjd.PerSampleGramian())
    assert max(relative_difference(shared_gram[k], shared_full[k]) for k in full) > 1e-3


# --------------------------------------------------------------------------- docs


DOCS_PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "flax.md"


def test_docs_page_runs():
    # As a user runs it: JAX's defaults, float32 (conftest.py turns float64 on).
    text = DOCS_PAGE.read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    blocks = [b for b in blocks if "--8<--" not in b]
    assert len(blocks) >= 3
    namespace = {"__name__": "docs_flax"}
    for i, code in enumerate(blocks):
        with contextlib.redirect_stdout(io.StringIO()), jax.enable_x64(False):
            try:
                exec(compile(code, f"docs/flax.md block {i}", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"docs/flax.md, Python block {i}: {e!r}") from e
