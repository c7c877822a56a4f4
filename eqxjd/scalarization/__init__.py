"""Scalarizers: maps from a vector of losses to one scalar loss.

They combine the losses directly instead of their gradients, and are the baseline
against which Jacobian-descent aggregators are compared.
"""

from .._scalarization import (
    AbstractScalarizer as AbstractScalarizer,
    AbstractStatefulScalarizer as AbstractStatefulScalarizer,
    Constant as Constant,
    COSMOS as COSMOS,
    DWA as DWA,
    FAMO as FAMO,
    GeometricMean as GeometricMean,
    IMTLL as IMTLL,
    Mean as Mean,
    PBI as PBI,
    Random as Random,
    STCH as STCH,
    Sum as Sum,
    UW as UW,
)
