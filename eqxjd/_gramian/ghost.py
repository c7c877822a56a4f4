r"""Ghost factors: the per-sample gradient of a parameter consumed by a dense-like
equation, as a sum over positions of rank-one terms, and the Gramian block of two
chunks of samples computed from those factors without forming any gradient.

For a use of a parameter view $W$ whose gradient for sample $i$ is, in a canonical
layout $(H, K, N)$, $g_i[h] = \sum_p a_{ihp} \otimes d_{ihp}$ ($a$ from the equation's
other operand, $d$ from its output cotangent),

$$\langle g_i, g_j \rangle = \sum_h \sum_{p, q}
    (a_{ihp} \cdot a_{jhq})\,(d_{ihp} \cdot d_{jhq}),$$

which costs $O(H P^2 (K + N))$ per pair of samples instead of $O(H K N)$ per sample
and pair. Equations: `dot_general` ($H$ its batch dimensions, $P$ the free dimensions
of the other operand, $K$ the contracted ones, $N$ the parameter's free ones),
`conv_general_dilated` on a kernel (input patches as $a$, $H$ the feature groups) and
row lookups in a table (`gather` / `dynamic_slice` of whole rows: $a$ is the one-hot
row, so $a_{ihp} \cdot a_{jhq}$ is an index comparison).
"""

import dataclasses
import math
from collections.abc import Callable

import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import primitives as prims
from jaxtyping import Array

from .taps import Tap


_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, eq=False)
class Ghost:
    """The factors of one use at one scan step (see the module docstring).

    - `index`: whether `a` is a row index (one-hot over `K`) rather than a vector.
    - `act(operands)`: `(H, P, K)` (or `(H, P)` row indices).
    - `cot(operands, cotangent)`: `(H, P, N)`.
    - `layout(index, lead)`: the parameter view's index array (with `lead` stacked
      leading axes) arranged as `(*stack, H, K, N)`.
    - `cot_layout(array)`: `cot` on a NumPy array shaped like the output (to find
      which output entries a bias adds to), or None.
    """

    index: bool
    h: int
    p: int
    k: int
    n: int
    act: Callable
    cot: Callable
    layout: Callable
    cot_layout: Callable | None = None


def ghost_of(tap: Tap, slot: int) -> Ghost | None:
    """The ghost factors of the use of `tap`'s operand `slot`, or None if that use
    has none (it is then handled through per-sample gradients)."""
    view = tap.views[slot]
    if view is None or not view.injective:
        return None
    prim = tap.eqn.primitive
    if prim is prims.dot_general_p:
        return _dot(tap.eqn, slot)
    if prim is prims.conv_general_dilated_p and slot == 1:
        return _conv(tap.eqn)
    if prim is prims.gather_p and slot == 0:
        return _gather(tap.eqn)
    if prim is prims.dynamic_slice_p and slot == 0:
        return _dynamic_slice(tap.eqn)
    return None


def _lead(index: np.ndarray, lead: int, axes) -> np.ndarray:
    return index.transpose(tuple(range(lead)) + tuple(lead + a for a in axes))


def _dot(eqn, slot: int) -> Ghost:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lc, rc, lb, rb = tuple(lc), tuple(rc), tuple(lb), tuple(rb)
    w_c, x_c, w_b, x_b = (lc, rc, lb, rb) if slot == 0 else (rc, lc, rb, lb)
    x_shape = eqn.invars[1 - slot].aval.shape
    w_shape = eqn.invars[slot].aval.shape
    x_free = tuple(d for d in range(len(x_shape)) if d not in x_c + x_b)
    w_free = tuple(d for d in range(len(w_shape)) if d not in w_c + w_b)
    h = math.prod(x_shape[d] for d in x_b)
    p = math.prod(x_shape[d] for d in x_free)
    k = math.prod(x_shape[d] for d in x_c)
    n = math.prod(w_shape[d] for d in w_free)
    # The output is (batch, lhs free, rhs free): bring it to (batch, x free, w free).
    nb, nw, nx = len(lb), len(w_free), len(x_free)
    batch = tuple(range(nb))
    if slot == 0:
        out_perm = (
            batch + tuple(range(nb + nw, nb + nw + nx)) + tuple(range(nb, nb + nw))
        )
    else:
        out_perm = batch + tuple(range(nb, nb + nx + nw))

    def act(ops):
        return jnp.transpose(ops[1 - slot], x_b + x_free + x_c).reshape(h, p, k)

    def cot(ops, d):
        return jnp.transpose(d, out_perm).reshape(h, p, n)

    def cot_layout(d):
        return np.transpose(d, out_perm).reshape(h, p, n)

    def layout(index, lead):
        out = _lead(index, lead, w_b + w_c + w_free)
        return out.reshape(out.shape[:lead] + (h, k, n))

    return Ghost(False, h, p, k, n, act, cot, layout, cot_layout)


def _conv(eqn) -> Ghost | None:
    params = eqn.params
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    # Patches list a window's entries in the kernel's spatial memory order, which is
    # the logical order only if the kernel's spatial axes are in increasing order.
    if params["batch_group_count"] != 1 or list(rhs_spec[2:]) != sorted(rhs_spec[2:]):
        return None
    rhs_shape = eqn.invars[1].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    groups = params["feature_group_count"]
    window = tuple(rhs_shape[d] for d in rhs_spec[2:])
    out_features, in_features = rhs_shape[rhs_spec[0]], rhs_shape[rhs_spec[1]]
    p = out_shape[out_spec[0]] * math.prod(out_shape[d] for d in out_spec[2:])
    k = in_features * math.prod(window)
    n = out_features // groups
    out_perm = (out_spec[0], *out_spec[2:], out_spec[1])

    def act(ops):
        # Features of a patch are (input channel, window position), channel-major, so
        # a feature group's channels are contiguous.
        patches = lax.conv_general_dilated_patches(
            ops[0],
            window,
            params["window_strides"],
            params["padding"],
            params["lhs_dilation"],
            params["rhs_dilation"],
            params["dimension_numbers"],
            precision=_HIGHEST,
        )
        patches = jnp.transpose(patches, out_perm).reshape(p, groups, k)
        return jnp.transpose(patches, (1, 0, 2))

    def cot(ops, d):
        return jnp.transpose(
            jnp.transpose(d, out_perm).reshape(p, groups, n), (1, 0, 2)
        )

    def cot_layout(d):
        return np.transpose(np.transpose(d, out_perm).reshape(p, groups, n), (1, 0, 2))

    def layout(index, lead):
        out = _lead(index, lead, (rhs_spec[0], rhs_spec[1], *rhs_spec[2:]))
        out = out.reshape(out.shape[:lead] + (groups, n, k))
        return np.swapaxes(out, -1, -2)

    return Ghost(False, groups, p, k, n, act, cot, layout, cot_layout)


def _rows_layout(rows: int, n: int):
    def layout(index, lead):
        return index.reshape(index.shape[:lead] + (1, rows, n))

    return layout


def _gather(eqn) -> Ghost | None:
    params = eqn.params
    dn = params["dimension_numbers"]
    shape = eqn.invars[0].aval.shape
    sizes = tuple(params["slice_sizes"])
    mode = params["mode"]
    if (
        dn.operand_batching_dims
        or dn.start_indices_batching_dims
        or mode == lax.GatherScatterMode.ONE_HOT
        or len(shape) == 0
        or sizes[0] != 1
        or sizes[1:] != tuple(shape[1:])
        or 0 not in dn.start_index_map
    ):
        return None
    out_shape = eqn.outvars[0].aval.shape
    offset = tuple(dn.offset_dims)
    positions = tuple(d for d in range(len(out_shape)) if d not in offset)
    p = math.prod(out_shape[d] for d in positions)
    rows, n = shape[0], math.prod(shape[1:])
    component = list(dn.start_index_map).index(0)
    starts = tuple(dn.start_index_map)
    # Out-of-range rows are clamped, except in FILL_OR_DROP mode, where they read the
    # fill value and receive no gradient.
    drop = mode == lax.GatherScatterMode.FILL_OR_DROP

    def act(ops):
        rows_ = jnp.clip(ops[1][..., component], 0, rows - 1)
        return rows_.astype(jnp.int32).reshape(1, p)

    def cot(ops, d):
        d = jnp.transpose(d, positions + offset).reshape(1, p, n)
        if drop:
            idx = ops[1]
            ok = jnp.ones(idx.shape[:-1], bool)
            for c, dim in enumerate(starts):
                ok = ok & (idx[..., c] >= 0) & (idx[..., c] <= shape[dim] - sizes[dim])
            d = d * ok.reshape(1, p, 1).astype(d.dtype)
        return d

    return Ghost(True, 1, p, rows, n, act, cot, _rows_layout(rows, n))


def _dynamic_slice(eqn) -> Ghost | None:
    shape = eqn.invars[0].aval.shape
    sizes = tuple(eqn.params["slice_sizes"])
    if len(shape) == 0 or sizes[0] != 1 or sizes[1:] != tuple(shape[1:]):
        return None
    rows, n = shape[0], math.prod(shape[1:])

    def act(ops):
        # dynamic_slice clamps its start so that the slice fits.
        return jnp.clip(ops[1], 0, rows - 1).astype(jnp.int32).reshape(1, 1)

    def cot(ops, d):
        return jnp.reshape(d, (1, 1, n))

    return Ghost(True, 1, 1, rows, n, act, cot, _rows_layout(rows, n))


def ghost_block(
    index: bool,
    ones: bool,
    left: tuple[Array, Array],
    right: tuple[Array, Array],
    dtype,
) -> Array:
    r"""$G_{(i, t), (j, s)} = \sum_{h, p, q} (a_{ihp} \cdot a_{jhq})
    (d_{ithp} \cdot d_{jshq})$ for factors `a` of shape `(c, H, P, K)` (or row indices
    `(c, H, P)`) and `d` of shape `(c, T, H, P, N)`; returns `(c_left T, c_right T)`.
    With `ones`, `a` has an extra constant feature 1 (a bias)."""
    (a1, d1), (a2, d2) = left, right
    c1, tasks, h, p = d1.shape[:4]
    c2, _, _, q = d2.shape[:4]
    if h == 1 and p == 1 and q == 1:
        # One position (dense layers): two plain products, (A A^T) * (D D^T).
        same = left is right
        if index:
            acts = (a1[:, 0, 0][:, None] == a2[:, 0, 0][None, :]).astype(dtype)
        else:
            x1, x2 = a1[:, 0, 0].astype(dtype), a2[:, 0, 0].astype(dtype)
            acts = gram(x1) if same else jnp.matmul(x1, x2.T, precision=_HIGHEST)
        if ones:
            acts = acts + jnp.ones((), dtype)
        y1 = d1.reshape(c1 * tasks, -1).astype(dtype)
        y2 = d2.reshape(c2 * tasks, -1).astype(dtype)
        cots = gram(y1) if same else jnp.matmul(y1, y2.T, precision=_HIGHEST)
        cots = cots.reshape(c1, tasks, c2, tasks)
        return (cots * acts[:, None, :, None]).reshape(c1 * tasks, c2 * tasks)
    if index:
        acts = (a1[:, None, :, :, None] == a2[None, :, :, None, :]).astype(dtype)
    else:
        acts = jnp.einsum(
            "ihpk,jhqk->ijhpq", a1.astype(dtype), a2.astype(dtype), precision=_HIGHEST
        )
    if ones:
        acts = acts + jnp.ones((), dtype)
    cots = jnp.einsum(
        "ithpn,jshqn->itjshpq", d1.astype(dtype), d2.astype(dtype), precision=_HIGHEST
    )
    out = jnp.einsum("ijhpq,itjshpq->itjs", acts, cots, precision=_HIGHEST)
    return out.reshape(c1 * tasks, c2 * tasks)


def gram(x: Array, blocks: int = 4) -> Array:
    r"""$X X^\top$ from the blocks on and above the diagonal of a `blocks` x `blocks`
    grid ($(k + 1) / 2k$ of the products: XLA has no symmetric product)."""
    m = x.shape[0]
    if m < 64 * blocks:
        return jnp.matmul(x, x.T, precision=_HIGHEST)
    edges = [m * i // blocks for i in range(blocks + 1)]
    parts = [x[a:b] for a, b in zip(edges[:-1], edges[1:])]
    grid: list[list] = [[None] * blocks for _ in range(blocks)]
    for i in range(blocks):
        for j in range(i, blocks):
            grid[i][j] = jnp.matmul(parts[i], parts[j].T, precision=_HIGHEST)
            grid[j][i] = grid[i][j].T
    return jnp.block(grid)


def use_cost(tap: Tap) -> int:
    """Rough flops of one sample's gradient contribution of `tap` (its VJP)."""
    eqn = tap.eqn
    steps = math.prod(tap.levels)
    out = sum(math.prod(v.aval.shape) for v in eqn.outvars)
    if eqn.primitive is prims.dot_general_p:
        (lc, _), _ = eqn.params["dimension_numbers"]
        shape = eqn.invars[0].aval.shape
        return steps * 2 * out * math.prod(shape[d] for d in lc)
    if eqn.primitive is prims.conv_general_dilated_p:
        rhs_spec = eqn.params["dimension_numbers"][1]
        shape = eqn.invars[1].aval.shape
        return steps * 2 * out * math.prod(shape) // shape[rhs_spec[0]]
    ins = sum(math.prod(getattr(v.aval, "shape", ())) for v in eqn.invars)
    return steps * 2 * (ins + out)
