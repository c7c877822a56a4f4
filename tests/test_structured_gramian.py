"""The structured per-sample Gramian engine (`structured_value_and_gramian`).

Every Gramian is checked against J J^T of the full Jacobian from `jax.jacrev`, every
update against `jax.vjp` of sum(w * losses), for float64 (1e-10 relative) and float32
(1e-4), with the whole batch at once and with a chunk size that does not divide it.
Each model is also run with the ghost form and the per-sample-gradient form forced
everywhere they apply, so that both paths are exercised whatever the cost model picks.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest
from eqxjd._gramian import structured, structured_value_and_gramian

from .helpers import rel_err


_TOL = {jnp.float64: 1e-10, jnp.float32: 1e-4}


def _run(loss_fn, model, batch, *, spec=True, variants=(("auto", None),)):
    """[(losses, gramian, update)] from the engine for each (form, chunk size), in one
    jitted function (the variants share its forward and backward passes). The form
    "ghost" or "rows" forces that form on every leaf that has a ghost form; "auto"
    leaves the choice to the cost model."""
    diff, static = eqx.partition(model, eqx.is_inexact_array)
    prefer = structured._prefer_ghost

    def engine(batch, weights, chunk_size, axis_name=None):
        losses, gram, vjp = structured_value_and_gramian(
            loss_fn,
            diff,
            static,
            spec,
            batch,
            chunk_size=chunk_size,
            axis_name=axis_name,
        )
        return losses, gram, vjp(weights)

    @eqx.filter_jit
    def run(diff, batch, weights):
        out = []
        for form, chunk_size in variants:
            if form != "auto":
                structured._prefer_ghost = lambda *_, form=form: form == "ghost"
            try:
                if chunk_size == "split":
                    out.append(_split(engine, batch, weights))
                else:
                    out.append(engine(batch, weights, chunk_size))
            finally:
                structured._prefer_ghost = prefer
        return out

    shape = jax.eval_shape(lambda: loss_fn(model, *batch))
    weights = jr.normal(jr.key(7), shape.shape, shape.dtype)
    return run(diff, batch, weights), weights


def _split(engine, batch, weights):
    """The engine with the batch split into D groups of samples, as over D devices:
    `vmap` with a named axis stands for `shard_map` (the same collectives). D is the
    smallest divisor of B above 1 (B itself when B is prime: one sample per group)."""
    size = weights.shape[0]
    groups = next(d for d in range(2, size + 1) if size % d == 0)

    def grouped(x):
        return x.reshape((groups, size // groups) + x.shape[1:])

    losses, grams, updates = jax.vmap(
        lambda b, w: engine(b, w, None, axis_name=("group",)), axis_name="group"
    )(jtu.tree_map(grouped, batch), grouped(weights))
    # Every group has the whole Gramian (all are returned, to be compared); the
    # update is the sum of the groups' own.
    update = jtu.tree_map(lambda u: jnp.sum(u, axis=0), updates)
    return losses.reshape(weights.shape), grams, update


@eqx.filter_jit
def _reference(loss_fn, model, batch, weights, spec=True):
    """(losses, J J^T, update) from `jax.jacrev` and `jax.vjp`."""
    diff, static = eqx.partition(model, eqx.is_inexact_array)
    chosen, rest = eqx.partition(diff, spec)

    def flat(c):
        return jnp.ravel(loss_fn(eqx.combine(c, rest, static), *batch))

    rows = [
        jnp.reshape(x, (x.shape[0], -1))
        for x in jtu.tree_leaves(jax.jacrev(flat)(chosen))
    ]
    gram = sum(r @ r.T for r in rows)
    losses, pull = jax.vjp(lambda d: loss_fn(eqx.combine(d, static), *batch), diff)
    return losses, gram, pull(weights)[0]


# Both forms, with the whole batch and with chunks of 3 (which do not divide B); the
# larger models skip half of the combinations, to bound compilation time.
_ALL = (("ghost", None), ("ghost", 3), ("rows", None), ("rows", 3))
_VARIANTS = (("ghost", None), ("rows", 3))
_SWAPPED = (("ghost", 3), ("rows", None))
_AUTO = (("auto", None), ("auto", 3))
# Split over groups of samples, as over devices (`axis_name`).
_SPLIT = (("ghost", "split"), ("rows", "split"))


def _check(loss_fn, model, batch, dtype, *, spec=True, variants=_VARIANTS):
    tol = _TOL[dtype]
    results, weights = _run(loss_fn, model, batch, spec=spec, variants=variants)
    losses_ref, gram_ref, update_ref = _reference(loss_fn, model, batch, weights, spec)
    n = losses_ref.size
    for variant, (losses, gram, update) in zip(variants, results):
        if gram.ndim == 3:  # split into groups: each has the same Gramian
            assert all(jnp.array_equal(g, gram[0]) for g in gram), variant
            gram = gram[0]
        assert losses.shape == losses_ref.shape and losses.dtype == losses_ref.dtype
        assert gram.shape == (n, n) and gram.dtype == losses_ref.dtype
        assert rel_err(losses, losses_ref) < tol
        assert rel_err(gram, gram_ref) < tol, (variant, rel_err(gram, gram_ref))
        assert jnp.array_equal(gram, gram.T)
        for x, y in zip(jtu.tree_leaves(update), jtu.tree_leaves(update_ref)):
            assert x.shape == y.shape and x.dtype == y.dtype
            assert rel_err(x, y) < tol or float(jnp.max(jnp.abs(y))) == 0.0


def _cross_entropy(forward):
    def loss_fn(model, x, y):
        logits = jax.vmap(lambda xi: forward(model, xi))(x)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]

    return loss_fn


def _call(model, x):
    return model(x)


# ------------------------------------------------------------------------- models


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_mlp(dtype):
    k1, k2, k3 = jr.split(jr.key(0), 3)
    model = eqx.nn.MLP(4, 3, 6, 2, activation=jnp.tanh, key=k1, dtype=dtype)
    x = jr.normal(k2, (7, 4), dtype)
    y = jr.randint(k3, (7,), 0, 3)
    _check(_cross_entropy(_call), model, (x, y), dtype, variants=_ALL + _SPLIT)


def test_iwmtl_tasks():
    dtype = jnp.float64
    # (B, T) losses: the Gramian is (B T, B T) in the order of losses.ravel().
    k1, k2, k3 = jr.split(jr.key(1), 3)
    model = eqx.nn.MLP(3, 2, 5, 1, activation=jax.nn.softplus, key=k1, dtype=dtype)
    x = jr.normal(k2, (5, 3), dtype)
    y = jr.normal(k3, (5, 2), dtype)

    def loss_fn(model, x, y):
        return (jax.vmap(model)(x) - y) ** 2

    variants = (("ghost", None), ("ghost", 2), ("rows", None), ("rows", 2))
    _check(loss_fn, model, (x, y), dtype, variants=variants + _SPLIT)


class _CNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    linear: eqx.nn.Linear
    pool1: eqx.nn.MaxPool2d
    pool2: eqx.nn.AvgPool2d

    def __init__(self, key, dtype):
        k1, k2, k3 = jr.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(2, 4, 3, key=k1, dtype=dtype)
        # Grouped, strided and padded: the patches and the groups' layout matter.
        self.conv2 = eqx.nn.Conv2d(
            4, 4, 3, stride=2, padding=1, groups=2, key=k2, dtype=dtype
        )
        self.linear = eqx.nn.Linear(4 * 2 * 2, 3, key=k3, dtype=dtype)
        self.pool1 = eqx.nn.MaxPool2d(2, 1)
        self.pool2 = eqx.nn.AvgPool2d(2, 1)

    def __call__(self, x):
        x = self.pool1(jax.nn.relu(self.conv1(x)))
        x = self.pool2(jnp.tanh(self.conv2(x)))
        return self.linear(jnp.ravel(x))


def test_cnn():
    dtype = jnp.float64
    k1, k2, k3 = jr.split(jr.key(2), 3)
    model = _CNN(k1, dtype)
    x = jr.normal(k2, (5, 2, 8, 8), dtype)
    y = jr.randint(k3, (5,), 0, 3)
    _check(_cross_entropy(_call), model, (x, y), dtype, variants=_SWAPPED + _SPLIT)


class _Transformer(eqx.Module):
    embedding: eqx.nn.Embedding
    norm1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP
    head: eqx.nn.Linear

    def __init__(self, key, dtype, vocab=11, width=8):
        ks = jr.split(key, 4)
        self.embedding = eqx.nn.Embedding(vocab, width, key=ks[0], dtype=dtype)
        self.norm1 = eqx.nn.LayerNorm(width, dtype=dtype)
        self.attention = eqx.nn.MultiheadAttention(2, width, key=ks[1], dtype=dtype)
        self.norm2 = eqx.nn.LayerNorm(width, dtype=dtype)
        self.mlp = eqx.nn.MLP(
            width, width, 16, 1, activation=jax.nn.gelu, key=ks[2], dtype=dtype
        )
        self.head = eqx.nn.Linear(width, vocab, key=ks[3], dtype=dtype)

    def __call__(self, tokens):
        x = jax.vmap(self.embedding)(tokens)
        h = jax.vmap(self.norm1)(x)
        x = x + self.attention(h, h, h)
        x = x + jax.vmap(self.mlp)(jax.vmap(self.norm2)(x))
        return jax.vmap(self.head)(x)


def _sequence_loss(model, tokens, targets):
    logp = jax.nn.log_softmax(jax.vmap(model)(tokens))
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return -jnp.mean(picked, axis=1)


def test_transformer():
    dtype = jnp.float64
    k1, k2, k3 = jr.split(jr.key(3), 3)
    model = _Transformer(k1, dtype)
    tokens = jr.randint(k2, (5, 4), 0, 11)
    targets = jr.randint(k3, (5, 4), 0, 11)
    _check(_sequence_loss, model, (tokens, targets), dtype, variants=_VARIANTS + _SPLIT)


class _Tied(eqx.Module):
    embedding: eqx.nn.Embedding
    linear: eqx.nn.Linear

    def __call__(self, tokens):
        x = jax.vmap(self.embedding)(tokens)
        x = jnp.tanh(jax.vmap(self.linear)(x))  # the same layer twice
        x = jnp.tanh(jax.vmap(self.linear)(x))
        return x @ self.embedding.weight.T  # the embedding as output projection


def test_tied_weights():
    k1, k2, k3, k4 = jr.split(jr.key(4), 4)
    dtype = jnp.float64
    model = _Tied(
        eqx.nn.Embedding(9, 6, key=k1, dtype=dtype),
        eqx.nn.Linear(6, 6, key=k2, dtype=dtype),
    )
    tokens = jr.randint(k3, (5, 3), 0, 9)
    targets = jr.randint(k4, (5, 3), 0, 9)
    _check(_sequence_loss, model, (tokens, targets), dtype, variants=_VARIANTS + _SPLIT)


@jax.custom_vjp
def _dense_tanh(weight, x):
    return jnp.tanh(weight @ x)


def _dense_tanh_fwd(weight, x):
    y = _dense_tanh(weight, x)
    return y, (weight, x, y)


def _dense_tanh_bwd(residuals, g):
    weight, x, y = residuals
    g = g * (1 - y**2)
    # Twice the true gradient for the weight: the engine must use this rule.
    return 2 * jnp.outer(g, x), weight.T @ g


_dense_tanh.defvjp(_dense_tanh_fwd, _dense_tanh_bwd)


@jax.custom_jvp
def _wave(x):
    return jnp.sin(x)


@_wave.defjvp
def _wave_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.sin(x), 3 * jnp.cos(x) * t  # not the derivative of sin: a custom rule


class _Custom(eqx.Module):
    weight1: jax.Array
    weight2: jax.Array
    scale: jax.Array
    mix: jax.Array

    def __call__(self, x):
        h = _wave(_dense_tanh(self.weight1, x) * self.scale)
        # A product with a constant: the same operand for every sample.
        fixed = jnp.cos(jnp.arange(3, dtype=x.dtype))
        # A jitted function inside the model: its equations are tapped too.
        return eqx.filter_jit(lambda w, h: w @ h)(self.weight2, h) + self.mix @ fixed


def test_custom_rules():
    k1, k2, k3, k4 = jr.split(jr.key(5), 4)
    dtype = jnp.float64
    model = _Custom(
        jr.normal(k1, (4, 3), dtype),
        jr.normal(k2, (2, 4), dtype),
        jnp.ones(4, dtype),
        jr.normal(k1, (2, 3), dtype),
    )
    x = jr.normal(k3, (6, 3), dtype)
    y = jr.normal(k4, (6, 2), dtype)

    def loss_fn(model, x, y):
        return jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=1)

    _check(loss_fn, model, (x, y), dtype, variants=_VARIANTS + _SPLIT)


class _Recurrent(eqx.Module):
    cell: eqx.nn.GRUCell
    inputs: jax.Array  # one weight matrix per step, scanned over as xs
    out: eqx.nn.Linear
    gain: jax.Array

    def __call__(self, xs):
        def step(h, inp):
            x, weight = inp
            x = jax.checkpoint(lambda w, x: jnp.tanh(w @ x))(weight, x)
            h = self.cell(x, h)  # the cell's weights are used at every step
            h = h + self.gain * jnp.sin(jnp.arange(h.shape[0], dtype=h.dtype))
            return h, h

        h0 = jnp.zeros(self.cell.hidden_size, xs.dtype)
        h, hs = jax.lax.scan(step, h0, (xs, self.inputs))
        return self.out(h + jnp.mean(hs, axis=0))


def test_scan_recurrent():
    dtype = jnp.float64
    k1, k2, k3, k4, k5 = jr.split(jr.key(6), 5)
    model = _Recurrent(
        eqx.nn.GRUCell(3, 5, key=k1, dtype=dtype),
        jr.normal(k2, (4, 3, 3), dtype),
        eqx.nn.Linear(5, 2, key=k3, dtype=dtype),
        jr.normal(k5, (5,), dtype),
    )
    xs = jr.normal(k4, (6, 4, 3), dtype)
    y = jr.normal(k5, (6, 2), dtype)

    def loss_fn(model, xs, y):
        return jnp.sum((jax.vmap(model)(xs) - y) ** 2, axis=1)

    _check(loss_fn, model, (xs, y), dtype)


class _Carried(eqx.Module):
    weight: jax.Array
    readout: jax.Array

    def __call__(self, x):
        # The weight is part of the loop's carry: the loop is tapped as a whole.
        def body(_, carry):
            weight, h = carry
            return 0.9 * weight, jnp.tanh(weight @ h)

        _, h = jax.lax.fori_loop(0, 3, body, (self.weight, x))
        return self.readout @ h


class _Rows(eqx.Module):
    table: jax.Array
    fused: jax.Array  # read in two disjoint halves
    weight: jax.Array
    offset: jax.Array

    def __call__(self, token, x):
        row = self.table[token]  # one row per sample: dynamic_slice
        oob = self.table.at[jnp.stack([token, token + 5])].get(
            mode="fill", fill_value=0.0
        )  # out-of-range rows read 0 and get no gradient
        half = self.fused.shape[0] // 2
        a = self.fused[:half] @ x
        b = self.fused[half:] @ jnp.tanh(x)
        # A product subtracted from a bias: its cotangent is minus the subtraction's.
        return self.offset - self.weight @ jnp.tanh(row + a * b + jnp.sum(oob, axis=0))


def test_loops_lookups_and_slices():
    k1, k2, k3, k4, k5, k6 = jr.split(jr.key(7), 6)
    dtype = jnp.float64
    carried = _Carried(jr.normal(k1, (3, 3), dtype), jr.normal(k2, (2, 3), dtype))
    x = jr.normal(k3, (5, 3), dtype)
    y = jr.normal(k4, (5, 2), dtype)

    def loss_fn(model, x, y):
        return jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=1)

    _check(loss_fn, carried, (x, y), dtype)

    rows = _Rows(
        jr.normal(k5, (7, 3), dtype),
        jr.normal(k6, (6, 3), dtype),
        jr.normal(k1, (2, 3), dtype),
        jr.normal(k3, (2,), dtype),
    )
    tokens = jr.randint(k2, (5,), 0, 7)

    def rows_loss(model, tokens, x, y):
        return jnp.sum((jax.vmap(model)(tokens, x) - y) ** 2, axis=1)

    _check(rows_loss, rows, (tokens, x, y), dtype, variants=_SWAPPED)


def test_untappable_parameter():
    # A parameter returned as a loss has no consuming equation: it goes through
    # per-sample Jacobians (the generic path), still exactly.
    k1, k2, k3 = jr.split(jr.key(8), 3)
    dtype = jnp.float64
    model = eqx.nn.Linear(3, 2, key=k1, dtype=dtype)
    x = jr.normal(k2, (5, 3), dtype)
    y = jr.normal(k3, (5, 2), dtype)

    def loss_fn(model, x, y):
        fit = jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=1, keepdims=True)
        return jnp.concatenate([fit, jnp.broadcast_to(model.bias[:1], fit.shape)], 1)

    _check(loss_fn, model, (x, y), dtype, variants=_AUTO + (("auto", "split"),))

    def bias_only(model, x, y):
        return jnp.broadcast_to(model.bias[0], x.shape[:1])

    # Not split: its per-sample gradients do not depend on the sample, and `vmap`'s
    # rule for `all_to_all` mishandles such an operand (under `shard_map` every value
    # is per device).
    _check(bias_only, model, (x, y), dtype, variants=_AUTO)


def test_partial_gramian():
    # G over the first layer's weight and the last layer only; the update still
    # covers every leaf.
    k1, k2, k3 = jr.split(jr.key(9), 3)
    dtype = jnp.float64
    model = eqx.nn.MLP(4, 3, 5, 2, activation=jnp.tanh, key=k1, dtype=dtype)
    spec = jtu.tree_map(lambda _: False, model)
    spec = eqx.tree_at(
        lambda m: (m.layers[0].weight, m.layers[2]), spec, replace=(True, True)
    )
    x = jr.normal(k2, (7, 4), dtype)
    y = jr.randint(k3, (7,), 0, 3)
    _check(
        _cross_entropy(_call),
        model,
        (x, y),
        dtype,
        spec=spec,
        variants=_VARIANTS + _SPLIT,
    )


def test_large_batch():
    # From 256 rows on, X X^T is formed from the blocks of one triangle.
    k1, k2, k3 = jr.split(jr.key(16), 3)
    dtype = jnp.float64
    model = eqx.nn.MLP(3, 2, 4, 1, activation=jnp.tanh, key=k1, dtype=dtype)
    x = jr.normal(k2, (300, 3), dtype)
    y = jr.normal(k3, (300, 2), dtype)

    def loss_fn(model, x, y):
        return jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=1)

    _check(loss_fn, model, (x, y), dtype, variants=(("ghost", None), ("rows", None)))


def test_float32():
    # The cost model's own choices, in float32, on the convolutional model (the MLP
    # test also runs in float32).
    dtype = jnp.float32
    k1, k2, k3 = jr.split(jr.key(15), 3)
    cnn = _CNN(k1, dtype)
    images = jr.normal(k2, (5, 2, 8, 8), dtype)
    labels = jr.randint(k3, (5,), 0, 3)
    variants = (("auto", 3),)
    _check(_cross_entropy(_call), cnn, (images, labels), dtype, variants=variants)


# ------------------------------------------------------------------------- cost model


def test_dense_layers_use_ghost_terms(monkeypatch):
    # Wide dense layers at one position: the ghost form is far cheaper and is picked
    # (biases folded in as a constant feature), so no per-sample gradient is formed.
    formed = []
    original = structured._leaf_rows

    def spy(term, *args):
        formed.append(term.leaf)
        return original(term, *args)

    monkeypatch.setattr(structured, "_leaf_rows", spy)
    model = eqx.nn.MLP(64, 10, 64, 2, key=jr.key(10))
    x = jr.normal(jr.key(11), (8, 64))
    y = jr.randint(jr.key(12), (8,), 0, 10)
    _run(_cross_entropy(_call), model, (x, y))
    assert formed == []


# ------------------------------------------------------------------------- API


def test_no_retrace_on_new_values():
    model = eqx.nn.MLP(3, 1, 4, 1, key=jr.key(13))
    diff, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_fn(model, x):
        return jnp.sum(jax.vmap(model)(x) ** 2, axis=1)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(diff, x):
        losses, gram, vjp = structured_value_and_gramian(
            loss_fn, diff, static, True, (x,), chunk_size=2
        )
        return gram, vjp(losses)

    for seed in range(3):
        x = jr.normal(jr.key(seed), (5, 3))
        diff = jtu.tree_map(lambda a: a + seed, diff)
        jax.block_until_ready(step(diff, x))


def test_bad_input():
    model = eqx.nn.Linear(3, 2, key=jr.key(14))
    diff, static = eqx.partition(model, eqx.is_inexact_array)
    x, y = jnp.ones((4, 3)), jnp.ones((4, 2))

    def good(model, x, y):
        return jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=1)

    def engine(loss_fn, batch, *, spec=True, chunk_size=None):
        return structured_value_and_gramian(
            loss_fn, diff, static, spec, batch, chunk_size=chunk_size
        )

    with pytest.raises((TypeError, ValueError), match="batch sizes"):
        engine(good, (x, jnp.ones((5, 2))))
    with pytest.raises((TypeError, ValueError), match=r"\(B,\) or \(B, T\)"):
        engine(lambda m, x, y: jnp.mean(good(m, x, y)), (x, y))
    with pytest.raises((TypeError, ValueError), match=r"\(B,\) or \(B, T\)"):
        engine(lambda m, x, y: good(m, x, y)[:, None, None], (x, y))
    with pytest.raises((TypeError, ValueError), match="floating"):
        engine(lambda m, x, y: good(m, x, y).astype(jnp.int32), (x, y))
    with pytest.raises((TypeError, ValueError), match="gram_spec"):
        engine(good, (x, y), spec=False)
    with pytest.raises((TypeError, ValueError), match="chunk_size"):
        engine(good, (x, y), chunk_size=0)
    with pytest.raises((TypeError, ValueError), match="tuple"):
        engine(good, [x, y])
    _, _, vjp = engine(good, (x, y))
    with pytest.raises((TypeError, ValueError)):
        vjp(jnp.ones(3))
