import equinox as eqx


class RESULTS(eqx.Enumeration):
    """The outcome of a solve. Compare with `==`: `result == RESULTS.successful`."""

    successful = ""
    max_steps_reached = (
        "The solver reached its maximum number of steps before its KKT residual fell "
        "below tolerance. Increase `max_steps`, or use another solver."
    )
    kkt_check_failed = (
        "The solver stopped, but the solution failed the relative KKT residual check. "
        "This usually means a singular Gramian with `reg_eps=0`; use `reg_eps > 0`."
    )
    nonfinite = "The input contained NaN or infinite values."
