import equinox as eqx


class RESULTS(eqx.Enumeration):
    """The outcome of a solve. Compare with `==`: `result == RESULTS.successful`."""

    successful = ""
    max_steps_reached = (
        "The solver reached its maximum number of steps before its KKT residual fell "
        "below tolerance. Increase the solver's `max_steps`, or use another solver."
    )
    kkt_check_failed = (
        "The solver stopped, but its solution failed the relative KKT residual check. "
        'Try another solver (`solver="bpp"`, `"qpax"` or `"nesterov_pgd"`); if every '
        "solver fails on a positive semi-definite Gramian, please report it."
    )
    indefinite_gramian = (
        "The Gramian is not positive semi-definite: after normalisation and "
        "regularisation it has a negative eigenvalue, so the quadratic program has no "
        "minimiser (the value is NaN). Compute it as `J @ J.T` at full precision (as "
        "`eqxjd.tree_gramian` does), or increase `reg_eps`."
    )
    nonfinite = "The input contained NaN or infinite values."
