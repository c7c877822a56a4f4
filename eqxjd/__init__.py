import importlib.metadata

# --- foundation: base classes, pytrees, dual cone ---
from ._aggregation import (
    Constant as Constant,
    ConstantWeighting as ConstantWeighting,
    DualProj as DualProj,
    DualProjWeighting as DualProjWeighting,
    Mean as Mean,
    MeanWeighting as MeanWeighting,
    Sum as Sum,
    SumWeighting as SumWeighting,
    UPGrad as UPGrad,
    UPGradWeighting as UPGradWeighting,
)
from ._aggregator import (
    AbstractAggregator as AbstractAggregator,
    AbstractGramianWeightedAggregator as AbstractGramianWeightedAggregator,
    AbstractStatefulAggregator as AbstractStatefulAggregator,
    AbstractStatefulGramianWeightedAggregator as AbstractStatefulGramianWeightedAggregator,
    AbstractStatefulWeightedAggregator as AbstractStatefulWeightedAggregator,
    AbstractWeightedAggregator as AbstractWeightedAggregator,
    GramianWeightedAggregator as GramianWeightedAggregator,
    StatefulGramianWeightedAggregator as StatefulGramianWeightedAggregator,
    StatefulWeightedAggregator as StatefulWeightedAggregator,
    WeightedAggregator as WeightedAggregator,
)
from ._dual_cone import (
    kkt_residual as kkt_residual,
    project_onto_dual_cone as project_onto_dual_cone,
)
from ._misc import gramian as gramian
from ._pytree import (
    aggregate as aggregate,
    init_tree as init_tree,
    tree_gramian as tree_gramian,
)
from ._results import RESULTS as RESULTS
from ._weighting import (
    AbstractStatefulWeighting as AbstractStatefulWeighting,
    AbstractWeighting as AbstractWeighting,
)

# --- solvers ---
from ._solver import AbstractQPSolver as AbstractQPSolver

# --- classic zoo (issue 3) ---

# --- modern methods (issue 4) ---

# --- autojac and optax (issue 5) ---

# --- autogram and sharding (issue 6) ---


__version__ = importlib.metadata.version("eqxjd")
