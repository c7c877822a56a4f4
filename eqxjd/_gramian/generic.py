"""The Gramian of any loss function: all rows of $J$ at once, or by columns."""

import math
from collections.abc import Callable

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._checks import check_losses
from .common import block, flat_rows, symmetrize


def generic_gramian(
    fn_of_gram: Callable[[PyTree], Array],
    gram: PyTree,
    chunk_size: int | None,
) -> tuple[Array, Array]:
    losses, f_jvp = jax.linearize(fn_of_gram, gram)
    check_losses(losses, "`fn`")
    losses = losses
    shape, dtype = losses.shape, losses.dtype
    m = math.prod(shape)
    f_vjp = jax.linear_transpose(f_jvp, gram)
    eye = jnp.eye(m, dtype=dtype)
    if chunk_size is None or chunk_size >= m:
        # All rows at once: J is formed transiently, G = sum over leaves of J_l J_l^T.
        rows = jax.vmap(lambda e: f_vjp(jnp.reshape(e, shape))[0])(eye)
        leaves = flat_rows(rows, m)
        g = block(leaves, leaves, dtype)
    else:
        # G e_i = J (J^T e_i): a VJP then a JVP through the same linearisation, for
        # `chunk_size` basis vectors at a time. 2m linear passes, O(chunk_size * n).
        def column(e):
            (row,) = f_vjp(jnp.reshape(e, shape))
            return jnp.reshape(f_jvp(row), (m,))

        g = lax.map(column, eye, batch_size=chunk_size)
    return losses, symmetrize(g)
