import importlib.metadata

from . import scalarization as scalarization
from ._aggregation import (
    AlignedMTL as AlignedMTL,
    AlignedMTLWeighting as AlignedMTLWeighting,
    CAGrad as CAGrad,
    CAGradWeighting as CAGradWeighting,
    ConFIG as ConFIG,
    Constant as Constant,
    ConstantWeighting as ConstantWeighting,
    CRMOGMWeighting as CRMOGMWeighting,
    DualProj as DualProj,
    DualProjWeighting as DualProjWeighting,
    ExcessMTL as ExcessMTL,
    ExcessMTLWeighting as ExcessMTLWeighting,
    FairGrad as FairGrad,
    FairGradWeighting as FairGradWeighting,
    GradDrop as GradDrop,
    GradVac as GradVac,
    GradVacWeighting as GradVacWeighting,
    IMTLG as IMTLG,
    IMTLGWeighting as IMTLGWeighting,
    Krum as Krum,
    KrumWeighting as KrumWeighting,
    Mean as Mean,
    MeanWeighting as MeanWeighting,
    MGDA as MGDA,
    MGDAWeighting as MGDAWeighting,
    MoDoWeighting as MoDoWeighting,
    NashMTL as NashMTL,
    PCD as PCD,
    PCDWeighting as PCDWeighting,
    PCGrad as PCGrad,
    PCGradWeighting as PCGradWeighting,
    Random as Random,
    RandomWeighting as RandomWeighting,
    SDMGradWeighting as SDMGradWeighting,
    Sum as Sum,
    SumWeighting as SumWeighting,
    TrimmedMean as TrimmedMean,
    UPGrad as UPGrad,
    UPGradWeighting as UPGradWeighting,
)
from ._aggregator import (
    AbstractAggregator as AbstractAggregator,
    AbstractStatefulAggregator as AbstractStatefulAggregator,
    AbstractStatefulWeightedAggregator as AbstractStatefulWeightedAggregator,
    AbstractWeightedAggregator as AbstractWeightedAggregator,
    StatefulWeightedAggregator as StatefulWeightedAggregator,
    WeightedAggregator as WeightedAggregator,
)
from ._jacobian import (
    filter_jac as filter_jac,
    filter_value_and_jac as filter_value_and_jac,
)
from ._mtl import (
    filter_mtl_value_and_aggregate as filter_mtl_value_and_aggregate,
    filter_mtl_value_and_jac as filter_mtl_value_and_jac,
)
from ._optax import as_optax as as_optax, AsOptaxState as AsOptaxState
from ._projector import (
    DualConeProjector as DualConeProjector,
    DualConeSolution as DualConeSolution,
)
from ._results import RESULTS as RESULTS
from ._sharding import DataParallel as DataParallel, sharded_gramian as sharded_gramian
from ._solver import (
    AbstractQPSolver as AbstractQPSolver,
    BPP as BPP,
    NesterovPGD as NesterovPGD,
    QPax as QPax,
)
from ._step import (
    AbstractStrategy as AbstractStrategy,
    filter_value_and_aggregate as filter_value_and_aggregate,
    filter_value_and_gramian as filter_value_and_gramian,
    FullJacobian as FullJacobian,
    Gramian as Gramian,
    PerSampleGramian as PerSampleGramian,
    Step as Step,
)
from ._tree import (
    aggregate as aggregate,
    Aggregated as Aggregated,
    Grouped as Grouped,
    tree_gramian as tree_gramian,
)
from ._weighting import (
    AbstractStatefulWeighting as AbstractStatefulWeighting,
    AbstractWeighting as AbstractWeighting,
)


__version__ = importlib.metadata.version("eqxjd")
