from typing import Any, TypeAlias

from jaxtyping import Array, ArrayLike, Float, Int, PyTree


Jacobian: TypeAlias = Float[Array, "m n"]
Gramian: TypeAlias = Float[Array, "m m"]
Weights: TypeAlias = Float[Array, " m"]
Aggregation: TypeAlias = Float[Array, " n"]
ScalarLike: TypeAlias = float | int | Float[ArrayLike, ""] | Int[ArrayLike, ""]
State: TypeAlias = PyTree[Any]
