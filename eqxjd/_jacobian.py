"""Jacobians of loss vectors as pytrees (TorchJD's `autojac.jac`/`backward` without
aggregation), as function transformations like `eqx.filter_value_and_grad`."""

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._checks import check_chunk_size, check_losses


def fn_name(fn: Callable) -> str:
    return f"`{getattr(fn, '__name__', type(fn).__name__)}`"


def split_output(out: Any, has_aux: bool, where: str) -> tuple[Array, Any]:
    """`(losses, aux)` from what a loss function returned, checked."""
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(
                f"With `has_aux=True`, {where} must return a 2-tuple (losses, aux)."
            )
        losses, aux = out
    else:
        losses, aux = out, None
    check_losses(losses, where)
    if jnp.ndim(losses) == 0:
        raise ValueError(
            f"{where} returned a scalar: return the vector of losses, e.g. "
            "`jnp.stack([loss1, loss2])` (use `eqx.filter_value_and_grad` for one "
            "loss)."
        )
    return losses, aux


def pull_rows(
    vjp_fn: Callable[[Any], Any], cotangents: PyTree[Array], chunk_size: int | None
) -> PyTree[Array]:
    """Applies `vjp_fn` to every row of `cotangents` (leading axis m): one vmapped VJP,
    or `lax.map` over chunks of `chunk_size` vmapped rows."""
    m = jtu.tree_leaves(cotangents)[0].shape[0]
    if chunk_size is None or chunk_size >= m:
        return jax.vmap(vjp_fn)(cotangents)
    return lax.map(vjp_fn, cotangents, batch_size=chunk_size)


def seeds(losses: Array) -> Array:
    """One cotangent per loss (the rows of the identity), shaped like the losses."""
    m = losses.size
    return jnp.reshape(jnp.eye(m, dtype=losses.dtype), (m,) + losses.shape)


def value_and_jac(
    f: Callable[[PyTree], tuple[Array, Any]], diff: PyTree, chunk_size: int | None
) -> tuple[Array, Any, PyTree[Array], Callable]:
    """Losses, aux, the Jacobian pytree of `f` at `diff` (one row per loss, in the
    order of `losses.ravel()`), and the VJP of `f`, from one forward pass."""
    losses, vjp_fn, aux = jax.vjp(f, diff, has_aux=True)
    jac = pull_rows(lambda s: vjp_fn(s)[0], seeds(losses), chunk_size)
    return losses, aux, jac, lambda c: vjp_fn(c)[0]


class _ValueAndJac(eqx.Module):
    fn: Callable
    has_aux: bool = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)

    @property
    def __wrapped__(self):
        return self.fn

    def __call__(self, model, /, *args, **kwargs):
        diff, static = eqx.partition(model, eqx.is_inexact_array)
        where = fn_name(self.fn)

        def f(d):
            out = self.fn(eqx.combine(d, static), *args, **kwargs)
            return split_output(out, self.has_aux, where)

        losses, aux, jac, _ = value_and_jac(f, diff, self.chunk_size)
        return ((losses, aux) if self.has_aux else losses), jac


def filter_value_and_jac(
    fn: Callable, *, has_aux: bool = False, chunk_size: int | None = None
) -> Callable:
    """The losses and their Jacobian with respect to the first argument of `fn`
    (TorchJD's `autojac.jac` / `backward` without aggregation).

    As `eqx.filter_value_and_grad`, only the floating-point arrays of the first
    argument (`eqx.is_inexact_array`) are differentiated; the Jacobian pytree has the
    structure of that argument, with `None` in place of everything else (ints, static
    fields, non-array leaves), and each array leaf gains a leading axis of size
    `m = losses.size` (rows in the order of `losses.ravel()`). Its leaves, flattened
    and concatenated in `jax.tree_util.tree_leaves` order, form the `(m, n)` Jacobian
    matrix. Rows are computed by vmapped VJPs over the rows of the identity: one
    forward pass, no `m` forward passes.

    **Arguments:**

    - `fn`: a function `fn(model, *args, **kwargs)` returning the losses, an array
        with at least one axis (or `(losses, aux)` with `has_aux=True`).
    - `has_aux`: whether `fn` also returns auxiliary data. (Keyword only argument.)
    - `chunk_size`: `None` computes all `m` rows at once; an int bounds memory by
        computing `chunk_size` rows at a time (vmapped, with `lax.map` over the chunks;
        `1` is fully sequential). TorchJD's `parallel_chunk_size`. Same result.
        (Keyword only argument.)

    **Returns:**

    A function with the signature of `fn` returning `(losses, jacobian)`, or
    `((losses, aux), jacobian)` with `has_aux=True`.
    """
    check_chunk_size(chunk_size)
    return eqx.module_update_wrapper(_ValueAndJac(fn, has_aux, chunk_size))


def filter_jac(
    fn: Callable, *, has_aux: bool = False, chunk_size: int | None = None
) -> Callable:
    """As [`eqxjd.filter_value_and_jac`][], returning only the Jacobian pytree (or
    `(jacobian, aux)` with `has_aux=True`), as `eqx.filter_grad` does for gradients."""
    value_and_jac_fn = filter_value_and_jac(fn, has_aux=has_aux, chunk_size=chunk_size)

    @ft.wraps(fn)
    def jac_fn(model, /, *args, **kwargs):
        value, jac = value_and_jac_fn(model, *args, **kwargs)
        return (jac, value[1]) if has_aux else jac

    return jac_fn
