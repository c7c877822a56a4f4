from typing import ClassVar

from jaxtyping import Array, Float

from .dual_cone import AbstractDualConeAggregator, AbstractDualConeWeighting


class DualProjWeighting(AbstractDualConeWeighting):
    r"""The weighting of [`eqxjd.DualProj`][]:
    $w = \operatorname{argmin}_{v \geq p} v^\top G' v$, one QP solved by `projector`
    (see [`eqxjd.DualConeProjector`][]).

    Lopez-Paz & Ranzato, *Gradient Episodic Memory for Continual Learning*, NeurIPS
    2017, [arXiv:1706.08840](https://arxiv.org/abs/1706.08840), Eq. 11.
    """

    # The shared constructor, declared here so that type checkers do not synthesise a
    # dataclass one from the fields.
    __init__ = AbstractDualConeWeighting.__init__

    def lower_bounds(self, pref: Float[Array, " m"]) -> Float[Array, "1 m"]:
        return pref[None]

    def combine(
        self, pref: Float[Array, " m"], solutions: Float[Array, "1 m"]
    ) -> Float[Array, " m"]:
        return solutions[0]


class DualProj(AbstractDualConeAggregator):
    r"""Projection of the preference-weighted mean onto the dual cone.

    $$A(J) = \pi_J(J^\top p), \qquad \pi_J(x) = \operatorname{argmin}_{y : J y \geq 0}
    \|y - x\|^2.$$

    Permutation invariant, equal to the weighted mean when that already conflicts with
    no objective, and non-conflicting: with TorchJD's regularisation (the default)
    $(J A(J))_j \geq -\epsilon_{reg} \operatorname{tr}(J J^\top) w_j$;
    `projector=eqxjd.DualConeProjector(norm_eps=0.0, reg_eps=0.0)` makes
    $J A(J) \geq 0$ strict (see [`eqxjd.DualConeProjector`][]). One QP, solved from
    the Gramian.

    Lopez-Paz & Ranzato, *Gradient Episodic Memory for Continual Learning*, NeurIPS
    2017, [arXiv:1706.08840](https://arxiv.org/abs/1706.08840), Eq. 11.
    """

    weighting_type: ClassVar[type[AbstractDualConeWeighting]] = DualProjWeighting
    weighting: DualProjWeighting

    __init__ = AbstractDualConeAggregator.__init__
