"""Pieces shared by the Gramian kernels: parameter splits, batch checks and blocks of
$J J^\\top$ from flattened rows."""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


_HIGHEST = lax.Precision.HIGHEST
FilterSpec = bool | Callable[[Any], bool] | PyTree[bool | Callable[[Any], bool]]


def split_params(params: PyTree, filter_spec: FilterSpec):
    """(gramian part, other differentiable part, static part)."""
    diff, static = eqx.partition(params, eqx.is_inexact_array)
    gram, rest = eqx.partition(diff, filter_spec)
    if not jtu.tree_leaves(gram):
        raise ValueError(
            "No floating-point array of `params` is selected for the Gramian: check "
            "`filter_spec` (a pytree of bools / callables like `eqx.partition`'s)."
        )
    return gram, rest, static


def batch_size(batch: tuple[Any, ...]) -> int:
    leaves = jtu.tree_leaves(batch)
    if not leaves:
        raise ValueError(
            "The per-sample path needs at least one batched array (leading axis = "
            "batch size) after `params`."
        )
    sizes = set()
    for leaf in leaves:
        if jnp.ndim(leaf) < 1:
            raise ValueError(
                "Every batched argument needs a leading batch axis; got a leaf of "
                f"shape {jnp.shape(leaf)}. Close over non-batched arguments instead."
            )
        sizes.add(jnp.shape(leaf)[0])
    if len(sizes) != 1:
        raise ValueError(
            "Mismatched batch sizes: every batched argument must have the same leading "
            f"axis size; got {sorted(sizes)}."
        )
    return sizes.pop()


def flat_rows(tree: PyTree[Array], rows: int) -> list[Array]:
    return [
        jnp.reshape(leaf, (rows, math.prod(leaf.shape) // max(rows, 1)))
        for leaf in jtu.tree_leaves(tree)
    ]


def block(left: list[Array], right: list[Array], dtype) -> Array:
    """$\\sum_\\ell A_\\ell B_\\ell^\\top$ over the leaves."""
    out = jnp.zeros((left[0].shape[0], right[0].shape[0]), dtype)
    for a, b in zip(left, right):
        out = out + jnp.matmul(a.astype(dtype), b.astype(dtype).T, precision=_HIGHEST)
    return out


def exchanged_gramian(rows: list[Array], axes: tuple[str, ...], dtype) -> Array:
    r"""$J J^\top$ of the rows of $J$ split by samples over the devices of `axes`
    (inside `shard_map`; each device holds `(b, n_l)` rows of every leaf, `b = B / D`).

    One `all_to_all` gives each device all $B$ rows of $1/D$ of the columns, and one
    `psum` adds up the $(B, B)$ partial Gramians: each device sends and receives
    $(D - 1)/D$ of its rows once, against $D - 1$ times with a ring of blocks.
    """
    devices = lax.axis_size(axes)
    cols = jnp.concatenate([r.astype(dtype) for r in rows], axis=1)
    cols = jnp.pad(cols, ((0, 0), (0, -cols.shape[1] % devices)))
    mine = lax.all_to_all(cols, axes, split_axis=1, concat_axis=0, tiled=True)
    return lax.psum(jnp.matmul(mine, mine.T, precision=_HIGHEST), axes)


def symmetrize(g: Array) -> Array:
    # Exactly symmetric (a A^T computed by XLA need not be bit-for-bit symmetric).
    return (g + g.T) / jnp.asarray(2, g.dtype)
