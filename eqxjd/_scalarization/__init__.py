from .base import (
    AbstractScalarizer as AbstractScalarizer,
    AbstractStatefulScalarizer as AbstractStatefulScalarizer,
)
from .constant import Constant as Constant
from .cosmos import COSMOS as COSMOS
from .dwa import DWA as DWA
from .famo import FAMO as FAMO
from .geometric_mean import GeometricMean as GeometricMean
from .imtll import IMTLL as IMTLL
from .mean import Mean as Mean
from .pbi import PBI as PBI
from .random import Random as Random
from .stch import STCH as STCH
from .sum import Sum as Sum
from .uw import UW as UW
