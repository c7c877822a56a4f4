from .constant import Constant as Constant, ConstantWeighting as ConstantWeighting
from .dualproj import DualProj as DualProj, DualProjWeighting as DualProjWeighting
from .mean import Mean as Mean, MeanWeighting as MeanWeighting
from .sum import Sum as Sum, SumWeighting as SumWeighting
from .upgrad import UPGrad as UPGrad, UPGradWeighting as UPGradWeighting
