"""`eqxjd.scalarization`: TorchJD 0.18.0 values (the worked example L = [1, 2, 3],
w = [0.2, 0.3, 0.5] of TorchJD's documentation, and random losses with non-default
hyperparameters), learnable parameters, FAMO and DWA sequences, any loss shape and
misuse."""

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
from eqxjd import scalarization as S
from eqxjd._scalarization.random import scalarize_with_normals

from .helpers import (
    finite_difference_jvp,
    rel_err,
)


# ------------------------------------------------------------------------------
# Reference numbers.
#
# The example of TorchJD 0.18.0's documentation: L = [1, 2, 3], w = [0.2, 0.3, 0.5]
# (float64); values and gradients dvalue/dL. Z97: torch.manual_seed(0);
# torch.randn(3).
L97 = [1.0, 2.0, 3.0]
W97 = [0.2, 0.3, 0.5]
Z97 = [
    1.5409961082440433,
    -0.2934289057609464,
    -2.1787893820745574,
]  # torch.manual_seed(0); torch.randn(3)
REF97 = {
    "Mean": (2.0, [1 / 3] * 3),
    "Sum": (6.0, [1.0] * 3),
    "Constant": (2.3, W97),
    "GeometricMean": (1.817120593, [0.60570686, 0.30285343, 0.20190229]),
    "COSMOS": (1.302823535, [0.18451589, 0.31238729, 0.49690318]),
    "STCH": (1.287467286, [0.049445699, 0.096307072, 0.18758056]),
    "STCH_w": (1.607383268, [0.011983741, 0.04000546, 0.40336488]),
    "STCH_w_ref": (1.382010431, [0.015398907, 0.046514385, 0.38397876]),
    "PBI": (5.135971403, [-3.4219004, 3.7647146, 0.3428142]),
    "UW": (3.0, [0.5] * 3),
    "IMTLL": (6.0, [1.0] * 3),
    "Random": (1.175839022, [0.84463421, 0.13489256, 0.020473229]),
}


# Random positive losses with non-default hyperparameters (FAMO lr, weight_decay and
# min_losses, DWA temperature, ...; tests/reference/scalarization.npz uses defaults):
# TorchJD 0.18.0 (torch 2.13, CPU, float64) numbers produced by the script below
# (run with a Python that has torch and torchjd; its output is pasted as is).
# Each entry is [value, *dvalue/dL] (UW and IMTLL: [value, *dvalue/dL, *dvalue/ds]);
# FAMO alternates [value, *grad] and the logits after each `update`; DWA lists
# [value, *grad] for the 2 batches of each of 3 epochs, then for L after them.
#
#   import numpy as np, torch
#   from torchjd import scalarization as S
#   torch.set_default_dtype(torch.float64)
#   rng = np.random.default_rng(0)
#   L = rng.uniform(0.2, 3.0, 5); w = rng.uniform(0.1, 1.0, 5)
#   ref = rng.uniform(0.0, 0.2, 5); s = rng.normal(size=5) * 0.5
#   L2 = L * rng.uniform(0.7, 1.0, 5); L3 = L2 * rng.uniform(0.7, 1.0, 5)
#   batches = rng.uniform(0.2, 3.0, (3, 2, 5)); b = rng.uniform(0.0, 0.1, 5)
#   T = lambda x: torch.tensor(x)
#   def vg(f, x=L):
#       x = T(x).requires_grad_(True); v = f(x); g, = torch.autograd.grad(v, x)
#       return [v.item(), *g.tolist()]
#   Mean = vg(S.Mean()); Sum = vg(S.Sum()); Constant = vg(S.Constant(T(w)))
#   GeometricMean = vg(S.GeometricMean()); COSMOS = vg(S.COSMOS(0.7, T(w)))
#   STCH = vg(S.STCH(0.3)); STCH_w_ref = vg(S.STCH(0.3, T(w), T(ref)))
#   PBI = vg(S.PBI(2.5, T(w))); PBI_ref = vg(S.PBI(2.5, T(w), T(ref)))
#   for cls, attr in [(S.UW, "log_var"), (S.IMTLL, "log_scale")]:
#       m = cls(5).double()
#       with torch.no_grad(): getattr(m, attr).copy_(T(s))
#       x = T(L).requires_grad_(True); v = m(x)
#       gx, gs = torch.autograd.grad(v, [x, getattr(m, attr)])
#       <name> = [v.item(), *gx.tolist(), *gs.tolist()]
#   f = S.FAMO(5, min_losses=T(b), lr=0.1, weight_decay=0.01).double(); FAMO = []
#   for old, new in [(L, L2), (L2, L3), (L3, L)]:
#       FAMO.append(vg(f, old)); f.update(T(new)); FAMO.append(f._w.detach().tolist())
#   FAMO.append(vg(f, L2))
#   d = S.DWA(1.5); DWA = []
#   for e in range(3):
#       for k in range(2): DWA.append(vg(d, batches[e, k]))
#       d.step()
#   DWA.append(vg(d, L))
#   torch.manual_seed(0); z = torch.randn(5).tolist()
#   torch.manual_seed(0); Random = vg(S.Random())
L_tj = [
    1.983492724500072,
    0.9554027985388369,
    0.31472586702134514,
    0.2462773794798815,
    2.4771566697607628,
]
w_tj = [
    0.9214800195499495,
    0.6459721981904619,
    0.7565469048855985,
    0.5892624923188806,
    0.9415651814089914,
]
ref_tj = [
    0.16317071082430645,
    0.000547700034029619,
    0.1714808553175139,
    0.006717115061092871,
    0.14593108928598883,
]
s_tj = [
    -0.3661336773517258,
    -0.27212949142865495,
    -0.15815007818457727,
    0.2058152681870664,
    0.5212566847213388,
]
L2_tj = [
    1.4052964656532283,
    0.7044041360309636,
    0.28362696202298204,
    0.22021060671712825,
    2.1913312688457114,
]
L3_tj = [
    1.1454617392436697,
    0.7038145362000021,
    0.28199627763065277,
    0.19943650960175713,
    1.9615434135509229,
]
batches_tj = [
    [
        [
            2.127650845598632,
            1.2889799871414904,
            0.5782702140627514,
            2.2201673525434287,
            1.6709921029320323,
        ],
        [
            1.0686772515650758,
            1.5603390047290093,
            2.6905659361772005,
            2.815321844677499,
            1.2018265507853965,
        ],
    ],
    [
        [
            1.8002835260433305,
            1.101234295012638,
            1.864040084559151,
            1.146151431419973,
            1.2965332014788513,
        ],
        [
            2.6927681856134185,
            0.8360412618934632,
            1.9449240051209187,
            0.43524296203067747,
            2.531403613429514,
        ],
    ],
    [
        [
            2.4038752609683134,
            0.870234440380266,
            2.654155846269971,
            0.36399049745454415,
            1.141127769527849,
        ],
        [
            0.6207825073055493,
            1.4609502266180034,
            2.4297079568044238,
            0.8457981851824927,
            0.3456596429803469,
        ],
    ],
]
b_tj = [
    0.04045518398215282,
    0.019851304450925533,
    0.00907530456191219,
    0.05803323859868507,
    0.029869613281892263,
]
z_tj = [
    1.5409961082440433,
    -0.2934289057609464,
    -2.1787893820745574,
    0.5684312772806678,
    -1.084522342424021,
]
TJ = {
    "Mean": [1.1954110878601798, 0.2, 0.2, 0.2, 0.2, 0.2],
    "Sum": [5.977055439300899, 1.0, 1.0, 1.0, 1.0, 1.0],
    "Constant": [
        5.160543932637259,
        0.9214800195499495,
        0.6459721981904619,
        0.7565469048855985,
        0.5892624923188806,
        0.9415651814089914,
    ],
    "GeometricMean": [
        0.8169312541625581,
        0.08237300233793003,
        0.17101294980754655,
        0.5191382976520025,
        0.6634237020775947,
        0.06595717292612382,
    ],
    "COSMOS": [
        4.543178279880677,
        0.9211343765817681,
        0.6216261324053466,
        0.6834767298194269,
        0.5324125718257738,
        0.9661675023218799,
    ],
    "STCH": [
        0.7756332610645936,
        0.056554323041611856,
        0.028497271960967505,
        0.018591238245790336,
        0.01776194207495016,
        0.07859522467668015,
    ],
    "STCH_w_ref": [
        2.2460037761819773,
        0.13846298813569735,
        0.00282952834486852,
        0.0006085500292124058,
        0.0005287385253072695,
        0.7943576324112038,
    ],
    "PBI": [
        6.877542870356187,
        1.2181590760568481,
        0.16267690799035153,
        -1.0873174313362135,
        -0.8450793530802022,
        1.96040974786764,
    ],
    "PBI_ref": [
        6.600022867340299,
        1.1659002188737573,
        0.3020907528469252,
        -1.2101539064683635,
        -0.7372805032743773,
        1.9471422235735039,
    ],
    "UW": [
        3.0426743860221466,
        0.7210740061484209,
        0.656378490541183,
        0.5856709871970138,
        0.40699171551487634,
        0.29688694616733313,
        -0.930245045021513,
        -0.1271058467637438,
        0.31567419076517267,
        0.3997671468329748,
        -0.23543547886331384,
    ],
    "IMTLL": [
        6.915630601862357,
        0.6934101017879203,
        0.761755613880264,
        0.8537216473586475,
        1.2285262351531183,
        1.6841427568802136,
        0.3753738919911942,
        -0.27221655469612605,
        -0.7313117143401586,
        -0.6974417781842054,
        3.1718854630350997,
    ],
    "FAMO": [
        [
            -0.1288482418314896,
            0.048662268895599395,
            0.10106617898041978,
            0.3093487278519629,
            0.5022871378204111,
            0.03863568645160661,
        ],
        [
            -0.09999996527486812,
            -0.09999995152405941,
            0.09999995094357474,
            0.09999991691229854,
            0.09999994119799123,
        ],
        [
            -0.19860324398085505,
            0.049712149879522764,
            0.09911462149465392,
            0.30184186297632976,
            0.5109910206402,
            0.03834034500929352,
        ],
        [
            -0.19746165743344923,
            -0.10383878120814967,
            0.1993737841845976,
            0.10103703791447413,
            0.14187994962383535,
        ],
        [
            -0.2173972845867301,
            0.04967436197341261,
            0.0881301059986886,
            0.29909122503910635,
            0.5232075540147192,
            0.039896752974073135,
        ],
        [
            -0.19188843896083052,
            -0.09224781459505853,
            0.18723617630109718,
            0.10029545870569768,
            0.13370836103097403,
        ],
        [
            -0.20311883370997014,
            0.04422504033064101,
            0.09741297041727144,
            0.32120184660288764,
            0.4984871530124353,
            0.03867298963676467,
        ],
    ],
    "DWA": [
        [7.886060502278335, 1.0, 1.0, 1.0, 1.0, 1.0],
        [9.33673058793418, 1.0, 1.0, 1.0, 1.0, 1.0],
        [7.208242538513944, 1.0, 1.0, 1.0, 1.0, 1.0],
        [8.440380028087992, 1.0, 1.0, 1.0, 1.0, 1.0],
        [
            8.279325178883346,
            1.280858401817212,
            0.7895239551608212,
            1.0911437020250951,
            0.6186406238468292,
            1.2198333171500422,
        ],
        [
            5.54464249205485,
            1.280858401817212,
            0.7895239551608212,
            1.0911437020250951,
            0.6186406238468292,
            1.2198333171500422,
        ],
        [
            5.234556847769621,
            0.8520149280425442,
            1.2132216579500337,
            1.3242751621070221,
            0.9058039592552662,
            0.7046842926451341,
        ],
    ],
    "Random": [
        1.4782731374234455,
        0.6118233588442273,
        0.09771143532648459,
        0.014830088461850377,
        0.231337753856985,
        0.044297363510452596,
    ],
}


def _vg(fn, losses):
    value, grad = jax.value_and_grad(fn)(losses)
    return np.concatenate([[value], grad])


def _scalarizers97():
    w = jnp.array(W97)
    return {
        "Mean": S.Mean(),
        "Sum": S.Sum(),
        "Constant": S.Constant(w),
        "GeometricMean": S.GeometricMean(),
        "COSMOS": S.COSMOS(1.0, w),
        "STCH": S.STCH(0.5),
        "STCH_w": S.STCH(0.5, w),
        "STCH_w_ref": S.STCH(0.5, w, 0.5 * jnp.ones(3)),
        "PBI": S.PBI(5.0, w),
        "UW": S.UW(3),
        "IMTLL": S.IMTLL(3),
    }


def _scalarizers_random():
    w, ref = jnp.array(w_tj), jnp.array(ref_tj)
    return {
        "Mean": S.Mean(),
        "Sum": S.Sum(),
        "Constant": S.Constant(w),
        "GeometricMean": S.GeometricMean(),
        "COSMOS": S.COSMOS(0.7, w),
        "STCH": S.STCH(0.3),
        "STCH_w_ref": S.STCH(0.3, w, ref),
        "PBI": S.PBI(2.5, w),
        "PBI_ref": S.PBI(2.5, w, ref),
    }


# ------------------------------------------------------------------------------
# Reference values.


@pytest.mark.parametrize("name", sorted(REF97))
def test_documentation_example(name):
    losses = jnp.array(L97)
    if name == "Random":
        out = _vg(lambda x: scalarize_with_normals(x, jnp.array(Z97)), losses)
    else:
        scalarizer = _scalarizers97()[name]
        out = _vg(scalarizer, losses)
    value, grad = REF97[name]
    # The reference prints 10 significant digits for values and 8 for gradients.
    assert rel_err(out[0], value) < 1e-9
    assert rel_err(out[1:], grad) < 1e-7


@pytest.mark.parametrize("name", sorted(_scalarizers_random()))
def test_torchjd_random_losses(name):
    out = _vg(_scalarizers_random()[name], jnp.array(L_tj))
    assert rel_err(out, TJ[name]) < 1e-12


def test_random_torchjd_draws():
    out = _vg(lambda x: scalarize_with_normals(x, jnp.array(z_tj)), jnp.array(L_tj))
    assert rel_err(out, TJ["Random"]) < 1e-12


@pytest.mark.parametrize("cls, field", [(S.UW, "log_var"), (S.IMTLL, "log_scale")])
def test_learnable_torchjd_and_filter_grad(cls, field):
    losses = jnp.array(L_tj)
    scalarizer = eqx.tree_at(lambda s: getattr(s, field), cls(5), jnp.array(s_tj))
    ref = np.array(TJ[cls.__name__])

    value, grad_losses = jax.value_and_grad(lambda x: scalarizer(x))(losses)
    grads = eqx.filter_grad(lambda s: s(losses))(scalarizer)
    grad_s = getattr(grads, field)
    assert rel_err(value, ref[0]) < 1e-12
    assert rel_err(grad_losses, ref[1:6]) < 1e-12
    assert rel_err(grad_s, ref[6:]) < 1e-12

    # The parameter gradient is the derivative: check it against finite differences.
    direction = jnp.linspace(-1.0, 1.0, 5)

    def of_params(params):
        return eqx.tree_at(lambda s: getattr(s, field), scalarizer, params)(losses)

    fd = finite_difference_jvp(of_params, [jnp.array(s_tj)], [direction])
    assert rel_err(jnp.dot(grad_s, direction), fd) < 1e-7

    # A few steps of gradient descent on the parameter alone reach its optimum:
    # UW: s = log L;  IMTLL: s = -log L.
    @eqx.filter_jit
    def step(s):
        g = eqx.filter_grad(lambda s: s(losses))(s)
        return eqx.apply_updates(s, jtu.tree_map(lambda x: -0.5 * x, g))

    for _ in range(200):
        scalarizer = step(scalarizer)
    optimum = jnp.log(losses) * (1 if cls is S.UW else -1)
    assert rel_err(getattr(scalarizer, field), optimum) < 1e-6


def test_hyperparameter_arrays_are_constants():
    losses = jnp.array(L_tj)
    w, ref = jnp.array(w_tj), jnp.array(ref_tj)
    for scalarizer in [
        S.Constant(w),
        S.COSMOS(jnp.array(0.7), w),
        S.STCH(jnp.array(0.3), w, ref),
        S.PBI(jnp.array(2.5), w, ref),
        S.FAMO(5, min_losses=jnp.array(b_tj)),
        S.DWA(jnp.array(1.5)),
    ]:
        if isinstance(scalarizer, S.AbstractStatefulScalarizer):
            state = scalarizer.init(losses)
            grads = eqx.filter_grad(lambda s: s(losses, state))(scalarizer)
        else:
            grads = eqx.filter_grad(lambda s: s(losses))(scalarizer)
        for leaf in jtu.tree_leaves(grads):
            assert jnp.all(leaf == 0), type(scalarizer).__name__


# ------------------------------------------------------------------------------
# Stateful scalarizers.


def test_famo_documentation_example():
    famo = S.FAMO(3)
    losses = jnp.array(L97)
    state = famo.init(losses)
    out = _vg(lambda x: famo(x, state), losses)
    assert rel_err(out[0], 0.9773233641) < 1e-9
    assert rel_err(out[1:], [0.54545454, 0.27272727, 0.18181818]) < 1e-7
    state = famo.update(state, losses, jnp.array([0.5, 1.8, 2.9]))
    # The table rounds the logits to ~9 significant digits; the full TorchJD values are
    # [-0.02499999819571644, 0.02499999564230305, 0.02499999692078061].
    assert rel_err(state.logits, [-0.0249999982, 0.0249999956, 0.0249999969]) < 1e-8
    full = [-0.02499999819571644, 0.02499999564230305, 0.02499999692078061]
    assert rel_err(state.logits, full) < 1e-12
    out = _vg(lambda x: famo(x, state), losses)
    assert rel_err(out[0], 1.004032774) < 1e-9
    assert rel_err(out[1:], [0.53303221, 0.28018068, 0.18678712]) < 1e-7


def _value_and_grad(scalarizer, losses, state):
    return jax.value_and_grad(scalarizer)(losses, state)


def test_famo_sequence_torchjd():
    famo = S.FAMO(5, min_losses=jnp.array(b_tj), lr=0.1, weight_decay=0.01)
    update = eqx.filter_jit(eqx.debug.assert_max_traces(famo.update, max_traces=1))
    value_and_grad = eqx.filter_jit(
        eqx.debug.assert_max_traces(_value_and_grad, max_traces=1)
    )
    state = famo.init(jnp.array(L_tj))
    structure = jtu.tree_structure(state)
    pairs = [(L_tj, L2_tj), (L2_tj, L3_tj), (L3_tj, L_tj)]
    for k, (old, new) in enumerate(pairs):
        value, grad = value_and_grad(famo, jnp.array(old), state)
        assert rel_err(np.concatenate([[value], grad]), TJ["FAMO"][2 * k]) < 1e-12
        assert rel_err(jnp.sum(grad), 1.0) < 1e-12  # a convex combination
        state = update(state, jnp.array(old), jnp.array(new))
        assert jtu.tree_structure(state) == structure
        assert rel_err(state.logits, TJ["FAMO"][2 * k + 1]) < 1e-10
    value, grad = value_and_grad(famo, jnp.array(L2_tj), state)
    assert rel_err(np.concatenate([[value], grad]), TJ["FAMO"][6]) < 1e-12


def test_dwa_documentation_example():
    dwa = S.DWA()
    losses = jnp.array(L97)
    state = dwa.init(losses)
    for average in ([0.8, 1.9, 3.0], [0.6, 1.8, 3.1]):
        # Before two epoch averages exist the weights are 1.
        assert rel_err(_vg(lambda x: dwa(x, state), losses), [6.0, 1, 1, 1]) == 0
        state = dwa.step(dwa.update(state, jnp.array(average)))
    out = _vg(lambda x: dwa(x, state), losses)
    assert rel_err(out[0], 6.14023039) < 1e-9
    assert rel_err(out[1:], [0.92140133, 1.016967, 1.0616317]) < 1e-7


def test_dwa_sequence_torchjd():
    dwa = S.DWA(1.5)
    batches = jnp.array(batches_tj)
    state = dwa.init(batches[0, 0])
    value_and_grad = eqx.filter_jit(
        eqx.debug.assert_max_traces(_value_and_grad, max_traces=1)
    )
    update = eqx.filter_jit(eqx.debug.assert_max_traces(dwa.update, max_traces=1))
    step = eqx.filter_jit(eqx.debug.assert_max_traces(dwa.step, max_traces=1))
    outs = []
    for epoch in range(3):
        for k in range(2):
            value, grad = value_and_grad(dwa, batches[epoch, k], state)
            outs.append(np.concatenate([[value], grad]))
            state = update(state, batches[epoch, k])
        state = step(state)
    value, grad = value_and_grad(dwa, jnp.array(L_tj), state)
    outs.append(np.concatenate([[value], grad]))
    assert rel_err(np.array(outs), np.array(TJ["DWA"])) < 1e-12
    # `step` without a recorded batch is a no-op, as in TorchJD.
    assert eqx.tree_equal(step(state), state)


def test_stateful_scan():
    """The state threads through `lax.scan` with a fixed structure (no retrace)."""
    famo, dwa = S.FAMO(5), S.DWA()
    losses = jnp.array(L_tj)
    decay = jnp.linspace(0.9, 0.99, 5)

    def body(carry, _):
        losses, famo_state, dwa_state = carry
        total = famo(losses, famo_state) + dwa(losses, dwa_state)
        new = losses * decay
        famo_state = famo.update(famo_state, losses, new)
        dwa_state = dwa.step(dwa.update(dwa_state, losses))
        return (new, famo_state, dwa_state), total

    init = (losses, famo.init(losses), dwa.init(losses))
    (_, famo_state, dwa_state), totals = jax.lax.scan(body, init, length=4)
    assert jnp.all(jnp.isfinite(totals))
    assert int(famo_state.count) == 4 and int(dwa_state.num_averages) == 2
    # The fastest-decreasing loss gets a smaller weight than the slowest one.
    famo_weights = famo.weights(famo_state)
    assert famo_weights[0] < 0.2 < famo_weights[-1]
    dwa_weights = dwa.weights(losses, dwa_state)
    assert jnp.all(jnp.diff(dwa_weights) > 0)


def test_any_shape():
    """As in TorchJD, the losses may have any shape; per-loss arrays must match it
    (all scalarizers are checked on a (2, 3) input by `test_torchjd_fixture`)."""
    losses = jnp.arange(1.0, 7.0).reshape(2, 3)
    w = jnp.linspace(0.1, 0.6, 6)
    assert S.STCH(0.3, w.reshape(2, 3))(losses) == S.STCH(0.3, w)(losses.reshape(-1))
    uw = S.UW((2, 3))
    assert uw.log_var.shape == (2, 3)
    assert uw(losses) == 0.5 * jnp.sum(losses)
    famo = S.FAMO((2, 3))
    assert famo.init(losses).logits.shape == (2, 3)
    with pytest.raises(ValueError, match="shape"):
        uw(losses.reshape(-1))
    with pytest.raises(ValueError, match="shape"):
        S.STCH(0.3, w)(losses)


def test_random_draws_normals_from_the_key():
    losses = jnp.array(L_tj)
    random = S.Random()
    k1, _ = jr.split(jr.key(0))
    normals = jr.normal(k1, (5,), jnp.float64)
    assert random(losses, key=k1) == scalarize_with_normals(losses, normals)
    with pytest.raises((TypeError, ValueError)):
        scalarize_with_normals(losses, normals[:3])


def test_geometric_mean_zero_and_negative():
    gm = S.GeometricMean()
    assert gm(jnp.array([0.0, 2.0, 3.0])) == 0
    negative = jnp.array([1.0, -2.0, 3.0])
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-negative"):
        gm(negative)
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-negative"):
        eqx.filter_jit(gm)(negative)
    batch = jnp.stack([jnp.array(L97), negative])
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-negative"):
        jax.vmap(gm)(batch)


# ------------------------------------------------------------------------------
# Misuse.


@pytest.mark.parametrize(
    "build",
    [
        lambda: S.COSMOS(-0.1, jnp.ones(3)),
        lambda: S.STCH(0.0),
        lambda: S.STCH(-1.0),
        lambda: S.STCH(0.5, jnp.ones(3), jnp.ones(2)),
        lambda: S.PBI(-1.0, jnp.ones(3)),
        lambda: S.PBI(1.0, jnp.ones(3), jnp.ones(2)),
        lambda: S.DWA(0.0),
        lambda: S.DWA(-2.0),
        lambda: S.FAMO(3, lr=-0.1),
        lambda: S.FAMO(3, weight_decay=-1e-3),
        lambda: S.FAMO(3, min_losses=jnp.zeros(2)),
        lambda: S.FAMO(-1),
        lambda: S.UW((2, -1)),
        lambda: S.STCH(jnp.ones(2)),
    ],
)
def test_bad_construction(build):
    with pytest.raises((TypeError, ValueError)):
        build()


def test_valid_edge_construction():
    S.COSMOS(0.0, jnp.ones(3))  # lambda_ = 0 is allowed
    S.PBI(0.0, jnp.ones(3))
    S.FAMO(3, lr=0.0, weight_decay=0.0)
    S.STCH(1e-9)


def test_bad_losses():
    w = jnp.ones(3)
    famo, dwa = S.FAMO(3), S.DWA()
    famo_state, dwa_state = famo.init(jnp.ones(3)), dwa.init(jnp.ones(3))
    wrong = jnp.ones(4)
    calls = [
        lambda: S.Constant(w)(wrong),
        lambda: S.COSMOS(1.0, w)(wrong),
        lambda: S.STCH(1.0, w)(wrong),
        lambda: S.STCH(1.0, None, w)(wrong),
        lambda: S.PBI(1.0, w)(wrong),
        lambda: S.PBI(1.0, w, w)(wrong),
        lambda: S.UW(3)(wrong),
        lambda: S.IMTLL(3)(jnp.ones((3, 1))),
        lambda: famo.init(wrong),
        lambda: famo(wrong, famo_state),
        lambda: famo.update(famo_state, jnp.ones(3), wrong),
        lambda: S.FAMO(4)(wrong, famo_state),  # state built for another shape
        lambda: dwa(wrong, dwa_state),
        lambda: dwa.update(dwa_state, wrong),
        lambda: S.Mean()(jnp.arange(3)),  # integer losses
    ]
    for call in calls:
        with pytest.raises((TypeError, ValueError)):
            call()


def test_public_api():
    assert eqxjd.scalarization is S
    names = {
        "AbstractScalarizer",
        "AbstractStatefulScalarizer",
        "COSMOS",
        "Constant",
        "DWA",
        "FAMO",
        "GeometricMean",
        "IMTLL",
        "Mean",
        "PBI",
        "Random",
        "STCH",
        "Sum",
        "UW",
    }
    assert names <= set(dir(S))
    for name in names - {"AbstractScalarizer", "AbstractStatefulScalarizer"}:
        cls = getattr(S, name)
        assert cls.__doc__ and cls.__init__.__doc__, name
        abstract = (S.AbstractScalarizer, S.AbstractStatefulScalarizer)
        assert issubclass(cls, abstract), name
    with pytest.raises(TypeError):
        S.AbstractScalarizer()  # pyright: ignore[reportAbstractUsage]
