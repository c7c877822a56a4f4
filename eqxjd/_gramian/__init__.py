from .common import (
    batch_size as batch_size,
    block as block,
    exchanged_gramian as exchanged_gramian,
    FilterSpec as FilterSpec,
    flat_rows as flat_rows,
    split_params as split_params,
    symmetrize as symmetrize,
)
from .generic import generic_gramian as generic_gramian
from .per_sample import (
    independence_check as independence_check,
    per_sample_gramian as per_sample_gramian,
    per_sample_vector_fn as per_sample_vector_fn,
)
from .structured import structured_value_and_gramian as structured_value_and_gramian
