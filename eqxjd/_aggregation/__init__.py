from .aligned_mtl import (
    AlignedMTL as AlignedMTL,
    AlignedMTLWeighting as AlignedMTLWeighting,
)
from .cagrad import CAGrad as CAGrad, CAGradWeighting as CAGradWeighting
from .config import ConFIG as ConFIG
from .constant import Constant as Constant, ConstantWeighting as ConstantWeighting
from .cr_mogm import CRMOGMWeighting as CRMOGMWeighting
from .dualproj import DualProj as DualProj, DualProjWeighting as DualProjWeighting
from .excess_mtl import ExcessMTL as ExcessMTL, ExcessMTLWeighting as ExcessMTLWeighting
from .fairgrad import FairGrad as FairGrad, FairGradWeighting as FairGradWeighting
from .graddrop import GradDrop as GradDrop
from .gradvac import GradVac as GradVac, GradVacWeighting as GradVacWeighting
from .imtlg import IMTLG as IMTLG, IMTLGWeighting as IMTLGWeighting
from .krum import Krum as Krum, KrumWeighting as KrumWeighting
from .mean import Mean as Mean, MeanWeighting as MeanWeighting
from .mgda import MGDA as MGDA, MGDAWeighting as MGDAWeighting
from .modo import MoDoWeighting as MoDoWeighting
from .nash_mtl import NashMTL as NashMTL
from .pcd import PCD as PCD, PCDWeighting as PCDWeighting
from .pcgrad import PCGrad as PCGrad, PCGradWeighting as PCGradWeighting
from .random import Random as Random, RandomWeighting as RandomWeighting
from .sdmgrad import SDMGradWeighting as SDMGradWeighting
from .sum import Sum as Sum, SumWeighting as SumWeighting
from .trimmed_mean import TrimmedMean as TrimmedMean
from .upgrad import UPGrad as UPGrad, UPGradWeighting as UPGradWeighting
