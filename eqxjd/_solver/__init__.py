from .base import AbstractQPSolver as AbstractQPSolver, to_solver as to_solver
