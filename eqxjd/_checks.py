"""Validation of user input, in one place. Everything here raises `ValueError` with a
message that says what to do; checks on values run only when the values are concrete
(a module built inside `jit` is not checked)."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PRNGKeyArray, PyTree, Shaped

from ._custom_types import ScalarLike


def concrete(value: Any) -> np.ndarray | None:
    """`value` as a NumPy array if it is concrete (not traced), else `None`."""
    try:
        return np.asarray(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def check_floating(array: Any, name: str) -> None:
    """A real floating dtype: complex and integer input are rejected."""
    dtype = array.dtype if hasattr(array, "dtype") else jnp.asarray(array).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"`{name}` must have a real floating dtype; got {dtype}. Convert it with "
            "`.astype(jnp.float32)` or `.astype(jnp.float64)`."
        )


def check_real(array: Any, name: str) -> None:
    """Hyperparameter arrays (preferences, weights, ...) must not be complex."""
    dtype = array.dtype if hasattr(array, "dtype") else jnp.asarray(array).dtype
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError(
            f"`{name}` must be real; got a complex array. Pass its real part, e.g. "
            "`jnp.real(x)`."
        )


def check_matrix(matrix: Shaped[Array, "..."], name: str = "jacobian") -> Array:
    """Raises a `ValueError` unless `matrix` is a 2-D real floating array; returns it
    as a JAX array (NumPy input is accepted)."""
    shape = jnp.shape(matrix)
    if len(shape) != 2:
        raise ValueError(
            f"`{name}` must be a matrix of shape (m, n); got an array of shape {shape}."
        )
    check_floating(matrix, name)
    return jnp.asarray(matrix)


def check_gramian(gramian: Shaped[Array, "..."]) -> Array:
    """Raises a `ValueError` unless `gramian` is a square real floating matrix; returns
    it as a JAX array (NumPy input is accepted)."""
    gramian = check_matrix(gramian, "gramian")
    m, k = jnp.shape(gramian)
    if m != k:
        raise ValueError(f"`gramian` must be square; got shape {jnp.shape(gramian)}.")
    return gramian


def check_lower(lower: Shaped[Array, "..."], m: int) -> None:
    """Raises a `ValueError` unless `lower` holds lower bounds for a Gramian with `m`
    rows: a real floating `(k, m)` matrix, one QP per row."""
    check_matrix(lower, "lower")
    if jnp.shape(lower)[1] != m:
        raise ValueError(
            f"`lower` must have shape (k, {m}) (one bound per row of the Gramian, one "
            f"QP per row of `lower`); got shape {jnp.shape(lower)}."
        )


def check_length(vector: Shaped[Array, " k"], m: int, name: str) -> None:
    """Raises a `ValueError` if `vector` does not have one entry per objective."""
    if vector.shape[0] != m:
        raise ValueError(
            f"`{name}` has {vector.shape[0]} entries but there are {m} objectives "
            "(rows of the Jacobian)."
        )


def check_scalar(value: Any, name: str) -> None:
    """Raises a `ValueError` unless `value` is a scalar (0-d)."""
    if jnp.ndim(value) != 0:
        raise ValueError(
            f"`{name}` must be a scalar; got an array of shape {jnp.shape(value)}."
        )


def check_range(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises a `ValueError` unless every entry of a concrete `value` lies in the range
    (NaN never does)."""
    array = concrete(value)
    if array is None:
        return
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    interval = (
        f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    )
    ok = not np.any(np.isnan(array.astype(float)))
    if low is not None:
        ok = ok and bool(np.all(array > low) if low_open else np.all(array >= low))
    if high is not None:
        ok = ok and bool(np.all(array < high) if high_open else np.all(array <= high))
    if not ok:
        raise ValueError(f"`{name}` must be in {interval}; got {name}={value!r}.")


def check_nonnegative(value: ScalarLike, name: str) -> None:
    """A non-negative scalar hyperparameter (checked when concrete)."""
    check_scalar(value, name)
    check_range(value, name, 0.0)


def check_positive(value: ScalarLike, name: str) -> None:
    """A strictly positive scalar hyperparameter (checked when concrete)."""
    check_scalar(value, name)
    check_range(value, name, 0.0, low_open=True)


def check_state_shape(actual: tuple, expected: tuple, method: str) -> None:
    """Raises a `ValueError` when a state was built for another number of objectives."""
    if tuple(actual) != tuple(expected):
        raise ValueError(
            f"This `{method}` state was built for shape {tuple(actual)} but the input "
            f"needs {tuple(expected)} (the number of objectives or parameters "
            "changed). Build a fresh state with `init` (this is also how to reset it)."
        )


def require_state(state: Any, name: str, usage: str) -> None:
    """Stateful methods are called with the state from `init` (or the previous call)."""
    if state is None:
        raise ValueError(
            f"`{name}` is stateful: pass its state as the second argument, e.g. "
            f"{usage}, and pass the returned state to the next call."
        )


AGGREGATOR_USAGE = (
    "`state = aggregator.init(jacobian)` then "
    "`aggregation, state = aggregator(jacobian, state)`"
)
SCALARIZER_USAGE = "`state = scalarizer.init(losses)` then `scalarizer(losses, state)`"
WEIGHTING_USAGE = (
    "`state = weighting.init(stat)` then `weights, state = weighting(stat, state)`"
)


def require_key(key: PRNGKeyArray | None, name: str) -> PRNGKeyArray:
    """The key of a random method, which must be given."""
    if key is None:
        raise ValueError(
            f"`{name}` is random: pass a JAX PRNG key, e.g. `key=jax.random.key(0)` "
            "(split it between calls)."
        )
    return key


def check_chunk_size(chunk_size: int | None) -> None:
    """`None` (everything at once) or a positive int (a static loop bound)."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or chunk_size < 1
    ):
        raise ValueError(
            f"`chunk_size` must be None (all rows at once) or a positive int; got "
            f"{chunk_size!r}."
        )


def check_method(method: str) -> None:
    """The per-sample Gramian methods of `PerSampleGramian` and `DataParallel`."""
    if method not in ("structured", "gradients"):
        raise ValueError(
            f"`method` must be 'structured' or 'gradients'; got {method!r}."
        )


def check_losses(losses: Any, where: str) -> None:
    """What a loss function returns: a real floating JAX array."""
    if not (hasattr(losses, "shape") and hasattr(losses, "dtype")):
        raise ValueError(
            f"{where} must return a JAX array of losses; got {type(losses).__name__}. "
            "Stack several losses with `jnp.stack`."
        )
    if not jnp.issubdtype(losses.dtype, jnp.floating):
        raise ValueError(
            f"{where} must return real floating losses; got {losses.dtype}."
        )


def check_jacobian_tree(jacobians: PyTree[Array]) -> tuple[list[Array], Any, int]:
    """Flattens a Jacobian pytree and checks that every leaf is a floating array with a
    common leading axis `m` (the objectives)."""
    leaves, treedef = jtu.tree_flatten(jacobians)
    if not leaves:
        raise ValueError("The Jacobian pytree has no array leaves.")
    for leaf in leaves:
        if not hasattr(leaf, "shape") or jnp.ndim(leaf) < 1:
            raise ValueError(
                "Every leaf of a Jacobian pytree needs a leading axis of size m (one "
                f"row per objective); got a leaf of shape {jnp.shape(leaf)}."
            )
        check_floating(leaf, "jacobian")
    sizes = {leaf.shape[0] for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(
            "Every leaf of a Jacobian pytree must have the same leading size m; got "
            f"{sorted(sizes)}."
        )
    return leaves, treedef, sizes.pop()


def jacobian_shape(jacobian: PyTree[Array]) -> tuple[int, int, Any]:
    """`(m, n, dtype)` of a Jacobian matrix or pytree: `n` counts every column."""
    leaves, _, m = check_jacobian_tree(jacobian)
    n = sum(math.prod(leaf.shape[1:]) for leaf in leaves)
    return m, n, jnp.result_type(*leaves)
