from .base import AbstractQPSolver as AbstractQPSolver
from .bpp import BPP as BPP
from .nesterov_pgd import NesterovPGD as NesterovPGD
from .qpax import QPax as QPax
