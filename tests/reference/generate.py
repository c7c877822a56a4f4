"""Generate TorchJD 0.18.0 reference fixtures for eqxjd.

This is a standalone script. It imports torch, torchjd, numpy and quadprog, and must
NEVER be imported by the test-suite (tests only load the ``.npz`` files it writes, which
contain both the inputs and TorchJD's outputs, so tests never need torch).

Regenerate (CPU only, about 1-3 minutes on 2 cores)::

    python -m venv /tmp/tj \
        && /tmp/tj/bin/pip install torch==2.13.0 'torchjd[full]==0.18.0' quadprog \
        && /tmp/tj/bin/python tests/reference/generate.py

Optionally pass part names
(``foundation zoo modern modern_sequences scalarization autojac``) to
regenerate only some files. The key layout of every file is documented in
``tests/reference/README.md``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchjd  # noqa: F401
from torchjd._linalg import QuadprogProjector
from torchjd.aggregation import (
    AlignedMTL,
    CAGrad,
    ConFIG,
    Constant,
    ConstantWeighting,
    CRMOGMWeighting,
    DualProj,
    DualProjWeighting,
    ExcessMTL,
    FairGrad,
    FairGradWeighting,
    GradDrop,
    GradVac,
    GradVacWeighting,
    GramianWeightedAggregator,
    IMTLG,
    Krum,
    Mean,
    MeanWeighting,
    MGDA,
    MGDAWeighting,
    MoDoWeighting,
    NashMTL,
    PCD,
    PCGrad,
    Random,
    SDMGradWeighting,
    Sum,
    SumWeighting,
    TrimmedMean,
    UPGrad,
    UPGradWeighting,
    WeightedAggregator,
)


OUT = Path(__file__).resolve().parent
F64 = torch.float64
F32 = torch.float32
MAX_BYTES = 1_000_000


# --------------------------------------------------------------------------------------
# helpers


def T(a, dtype=F64):
    return torch.tensor(np.asarray(a), dtype=dtype)


def N(t):
    return t.detach().cpu().numpy().astype(np.float64)


def gram(J):
    return J @ J.T


def save(fname, data):
    data = {k: np.asarray(v) for k, v in data.items()}
    for k, v in data.items():
        if v.dtype.kind == "f" and v.dtype != np.float64:
            raise TypeError(k)
    path = OUT / fname
    np.savez_compressed(path, **data)
    size = path.stat().st_size
    with np.load(path) as z:
        assert set(z.files) == set(data), fname
        for k in z.files:
            a, b = z[k], data[k]
            assert a.shape == b.shape and a.dtype == b.dtype, k
            assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), k
    print(f"[{fname}] {len(data)} keys, {size / 1e6:.3f} MB (reload OK)")
    if size >= MAX_BYTES:
        print(f"WARNING: {fname} is >= 1 MB")
    return size


def run_agg(agg, J):
    """Call aggregator `agg` on J once; return (w or None, d). A hook captures w."""
    cap = []
    mod = None
    if isinstance(agg, GramianWeightedAggregator):
        mod = agg.gramian_weighting
    elif isinstance(agg, WeightedAggregator):
        mod = (
            agg.weighting
        )  # (ConFIG's `weighting` is only its preference vector: not captured)
    h = None
    if mod is not None:
        h = mod.register_forward_hook(lambda _m, _i, o: cap.append(o.detach().clone()))
    try:
        d = agg(J)
    finally:
        if h is not None:
            h.remove()
    w = cap[-1] if cap else None
    return w, d


CHECKS: list[tuple[str, float, bool]] = []


def check(label, got, expected, atol):
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    err = float(np.max(np.abs(got - expected))) if got.size else 0.0
    ok = got.shape == expected.shape and err <= atol
    CHECKS.append((label, err, ok))
    print(
        f"  CHECK {'OK  ' if ok else 'FAIL'} {label}: "
        f"max|err|={err:.2e} (atol {atol:g})"
    )


def round32(a):
    """Round to float32-representable values (stored as float64): keeps files small."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


# --------------------------------------------------------------------------------------
# matrix kinds: the samplers of TorchJD's tests/unit/aggregation/_matrix_samplers.py,
# re-implemented with a numpy Generator


def haar(rng, k):
    X = rng.standard_normal((k, k))
    Q, R = np.linalg.qr(X)
    return Q * np.sign(np.diag(R))


def complement(rng, vecs):
    """Orthonormal basis of the complement of the orthonormal columns `vecs`."""
    m, k = vecs.shape
    X = np.concatenate([vecs, rng.standard_normal((m, m - k))], axis=1)
    Q, _ = np.linalg.qr(X)
    return Q[:, k:]


def sv(rng, r):
    return np.abs(rng.standard_normal(r))


def normal_mat(rng, m, n, r):
    U = haar(rng, m)
    V = haar(rng, n)
    return U[:, :r] @ np.diag(sv(rng, r)) @ V.T[:r]


def strong_mat(rng, m, n, r):
    v = np.abs(rng.standard_normal(m))
    u1 = (v / np.linalg.norm(v))[:, None]
    U2 = complement(rng, u1)
    V = haar(rng, n)
    return U2[:, :r] @ np.diag(sv(rng, r)) @ V.T[:r]


def strictly_weak_mat(rng, m, n, r):
    p = np.abs(rng.standard_normal(m)) + 1e-3
    k = int(rng.integers(1, m))  # split index in [1, m-1]
    v = np.zeros(m)
    v[:k] = p[:k]
    v2 = np.zeros(m)
    v2[k:] = p[k:]
    v /= np.linalg.norm(v)
    v2 /= np.linalg.norm(v2)
    B = np.stack([v, v2], axis=1)
    U = np.concatenate([B, complement(rng, B)], axis=1)
    V = haar(rng, n)
    return U[:, 1 : r + 1] @ np.diag(sv(rng, r)) @ V.T[:r]


def non_weak_mat(rng, m, n, r):
    v = np.abs(rng.standard_normal(m)) + 1e-3
    u1 = (v / np.linalg.norm(v))[:, None]
    U = np.concatenate([u1, complement(rng, u1)], axis=1)
    V = haar(rng, n)
    return U[:, :r] @ np.diag(sv(rng, r)) @ V.T[:r]


NORMAL_SHAPES = [(1, 1, 1), (4, 3, 1), (4, 3, 2), (4, 3, 3), (9, 11, 5), (9, 11, 9)]
SW_SHAPES = [(20, 10, 10), (20, 10, 5), (20, 10, 1), (20, 100, 1), (20, 100, 19)]
SCALES = [0.0, 1e-10, 1e3, 1e5, 1e10, 1e15]
J_BASE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
J_KRUM = np.array(
    [[1, 1, 1], [1, 0, 1], [75, -666, 23], [1, 2, 3], [2, 0, 1]], dtype=np.float64
)
J_TM = np.array([[1e11, 3], [1, -1e11], [-1e10, 1e10], [2, 2]], dtype=np.float64)


def j_5x7():
    np.random.seed(0)
    return np.random.randn(5, 7)


def build_matrices():
    """Returns (dict name -> J, dict meta)."""
    Js: dict[str, np.ndarray] = {}
    meta: dict[str, np.ndarray] = {}

    rng = np.random.default_rng(0)
    for i, (m, n, r) in enumerate(NORMAL_SHAPES):
        Js[f"normal_{i}"] = normal_mat(rng, m, n, r)
    Js["normal_6"] = round32(rng.standard_normal((16, 100)))
    Js["normal_7"] = round32(rng.standard_normal((32, 1000)))

    for kind, fn, seed in [
        ("strong", strong_mat, 1),
        ("strictlyweak", strictly_weak_mat, 2),
        ("nonweak", non_weak_mat, 3),
    ]:
        rng = np.random.default_rng(seed)
        for i, (m, n, r) in enumerate(SW_SHAPES):
            J = fn(rng, m, n, r)
            Js[f"{kind}_{i}"] = J if n < 100 else round32(J)

    for i, (m, n) in enumerate([(1, 1), (4, 3), (9, 11)]):
        Js[f"zero_{i}"] = np.zeros((m, n))

    bi, sc = [], []
    for b in range(6):
        for s_i, s in enumerate(SCALES):
            Js[f"scaled_{b * 6 + s_i}"] = Js[f"normal_{b}"] * s
            bi.append(b)
            sc.append(s)
    meta["meta/scaled/base_index"] = np.array(bi, dtype=np.int64)
    meta["meta/scaled/scale"] = np.array(sc)

    # illcond: low rank + 1e-3 noise; odd indices also get row norms spread over 1..100.
    rng = np.random.default_rng(4)
    ill = []
    for r in (2, 4):
        for m in (8, 16, 32, 64, 128):
            ill.append((m, 100, r))
    for m, r in [(8, 2), (32, 4)]:
        ill.append((m, 1000, r))
    rows = []
    for i, (m, n, r) in enumerate(ill):
        A = rng.standard_normal((m, r))
        B = rng.standard_normal((r, n))
        J = A @ B + 1e-3 * rng.standard_normal((m, n))
        spread = i % 2 == 1
        if spread:
            scales = np.logspace(0, 2, m)
            rng.shuffle(scales)
            J = J / np.linalg.norm(J, axis=1, keepdims=True) * scales[:, None]
        Js[f"illcond_{i}"] = round32(J)
        rows.append((m, n, r, int(spread)))
    meta["meta/illcond/m_n_rank_spread"] = np.array(rows, dtype=np.int64)

    rng = np.random.default_rng(5)
    for i, (m, n) in enumerate([(32, 8), (64, 16), (128, 20)]):
        Js[f"mgtn_{i}"] = rng.standard_normal((m, n))

    # corr: rows s_i * (c + 1e-2 * noise_i), c a unit direction, s_i random signs
    rng = np.random.default_rng(6)
    for i, m in enumerate((5, 16, 64)):
        n = 20
        c = rng.standard_normal(n)
        c /= np.linalg.norm(c)
        s = rng.choice([-1.0, 1.0], size=m)
        s[0], s[1] = 1.0, -1.0
        Js[f"corr_{i}"] = s[:, None] * (c[None, :] + 1e-2 * rng.standard_normal((m, n)))

    Js["base"] = J_BASE.copy()
    Js["5x7"] = j_5x7()
    Js["krum"] = J_KRUM.copy()
    Js["tm"] = J_TM.copy()
    return Js, meta


# --------------------------------------------------------------------------------------
# 1. foundation


def foundation(Js, meta):
    t0 = time.time()
    out: dict[str, np.ndarray] = dict(meta)
    errors = {}
    for name, Jn in Js.items():
        out[f"J/{name}"] = Jn
        m = Jn.shape[0]
        J = T(Jn)
        G = gram(J)
        pref = torch.arange(1, m + 1, dtype=F64)
        methods = {
            "upgrad": (UPGradWeighting(), UPGrad(), True),
            "dualproj": (DualProjWeighting(), DualProj(), True),
            "mean": (MeanWeighting(), Mean(), False),
            "sum": (SumWeighting(), Sum(), False),
            "constant": (ConstantWeighting(pref), Constant(pref), False),
        }
        for mid, (wt, agg, on_gram) in methods.items():
            try:
                w = wt(G if on_gram else J)
                d = agg(J)
                out[f"{mid}/{name}/w"] = N(w)
                out[f"{mid}/{name}/d"] = N(d)
            except Exception as e:  # noqa: BLE001
                errors[f"errors/{mid}/{name}"] = np.array(1, dtype=np.int64)
                print(f"  {mid} on {name} raised {type(e).__name__}: {e}")
        try:
            U = torch.diag(torch.full((m,), 1.0 / m, dtype=F64))
            out[f"qp/{name}/V"] = N(QuadprogProjector()(U, G))
        except Exception as e:  # noqa: BLE001
            errors[f"errors/qp/{name}"] = np.array(1, dtype=np.int64)
            print(f"  qp on {name} raised {type(e).__name__}: {e}")

    # qp0: norm_eps = reg_eps = 0, full-rank normal matrices with m < n only
    for name in ["normal_5", "normal_6", "normal_7"]:
        J = T(Js[name])
        m = J.shape[0]
        U = torch.diag(torch.full((m,), 1.0 / m, dtype=F64))
        try:
            out[f"qp0/{name}/V"] = N(
                QuadprogProjector(norm_eps=0.0, reg_eps=0.0)(U, gram(J))
            )
        except Exception as e:  # noqa: BLE001
            errors[f"errors/qp0/{name}"] = np.array(1, dtype=np.int64)
            print(f"  qp0 on {name} raised {type(e).__name__}: {e}")

    # preference vectors = arange(1, m+1)
    for name in ["5x7", "normal_4", "normal_5", "base", "krum"]:
        J = T(Js[name])
        m = J.shape[0]
        pref = torch.arange(1, m + 1, dtype=F64)
        for mid, A, W in [
            ("upgrad_pref", UPGrad, UPGradWeighting),
            ("dualproj_pref", DualProj, DualProjWeighting),
        ]:
            out[f"{mid}/{name}/pref"] = N(pref)
            out[f"{mid}/{name}/w"] = N(W(pref)(gram(J)))
            out[f"{mid}/{name}/d"] = N(A(pref)(J))

    # float32 outputs (J cast to float32 by round-to-nearest)
    f32_names = [k for k in Js if k.startswith("normal_")] + ["base", "5x7"]
    for name in f32_names:
        J = T(Js[name], F32)
        m = J.shape[0]
        G = gram(J)
        pref = torch.arange(1, m + 1, dtype=F32)
        for mid, wt, agg, on_gram in [
            ("upgrad", UPGradWeighting(), UPGrad(), True),
            ("dualproj", DualProjWeighting(), DualProj(), True),
            ("mean", MeanWeighting(), Mean(), False),
            ("sum", SumWeighting(), Sum(), False),
            ("constant", ConstantWeighting(pref), Constant(pref), False),
        ]:
            out[f"{mid}_f32/{name}/w"] = N(wt(G if on_gram else J))
            out[f"{mid}_f32/{name}/d"] = N(agg(J))
    out.update(errors)

    print("foundation checks (reference values):")
    c = lambda k, e, a=1e-8: check(k, out[k], e, a)  # noqa: E731
    c("upgrad/base/d", [0.2929020002, 1.900352078, 1.900352078])
    c("upgrad/base/w", [1.110921047, 0.7894310312])
    c("dualproj/base/d", [0.5563158129, 1.110921047, 1.110921047])
    c("dualproj/base/w", [0.6109210468, 0.5])
    c("mean/base/d", [1, 1, 1])
    c("mean/base/w", [0.5, 0.5])
    c("sum/base/d", [2, 2, 2])
    c("sum/base/w", [1, 1])
    c("constant/base/d", [8, 3, 3])
    c("constant/base/w", [1, 2])
    c("upgrad_f32/base/d", [0.2929015160, 1.900352240, 1.900352240], 1e-6)
    c("upgrad_f32/base/w", [1.110921144, 0.7894310355], 1e-6)
    c("upgrad_pref/base/d", [1.698435626, 6.02254625, 6.02254625])
    c("upgrad_pref/base/w", [3.443684187, 2.578862062])
    c("dualproj_pref/base/d", [2.225263251, 4.443684187, 4.443684187])
    c("dualproj_pref/base/w", [2.443684187, 2])
    c(
        "J/5x7",
        [
            [
                1.764052345967664,
                0.4001572083672233,
                0.9787379841057392,
                2.240893199201458,
                1.8675579901499675,
                -0.977277879876411,
                0.9500884175255894,
            ]
        ]
        + [list(r) for r in out["J/5x7"][1:]],
        0,
    )
    c(
        "upgrad/5x7/d",
        [
            0.9165312994,
            0.6849870014,
            0.6194725098,
            1.157813288,
            0.7068130482,
            -0.4273037019,
            -0.4375797466,
        ],
    )
    c("upgrad/5x7/w", [0.2, 0.5897231645, 0.2207460623, 0.2528101517, 0.2542813742])
    mean57 = [
        0.848591236,
        0.5928815305,
        0.4592395929,
        0.96553913,
        0.2585495553,
        -0.601074769,
        -0.4032644762,
    ]
    c("dualproj/5x7/d", mean57)
    c("dualproj/5x7/w", [0.2] * 5)
    c("mean/5x7/d", mean57)
    c("mean/5x7/w", [0.2] * 5)
    c(
        "sum/5x7/d",
        [
            4.24295618,
            2.964407653,
            2.296197964,
            4.82769565,
            1.292747777,
            -3.005373845,
            -2.016322381,
        ],
    )
    c("sum/5x7/w", [1] * 5)
    c(
        "constant/5x7/d",
        [
            13.07129808,
            11.99928113,
            4.088249254,
            12.88333664,
            -4.541083328,
            -11.73843792,
            -8.953827144,
        ],
        1e-7,
    )
    c("constant/5x7/w", [1, 2, 3, 4, 5])
    c("upgrad/krum/d", [21.78351099, -123.5582759, 19.21658069], 1e-6)
    c("upgrad/krum/w", [2.088108311, 0.2, 0.2007808696, 4.036837458, 0.2])
    c("dualproj/krum/d", [21.2789313, -123.7129988, 18.29507118], 1e-6)
    c("dualproj/krum/w", [1.87086136, 0.2, 0.2, 3.808069941, 0.2])
    print(f"foundation built in {time.time() - t0:.1f}s")
    # Large matrices go to foundation_large.npz (same key layout): each file < 1 MB.
    large = {
        k for k, J in Js.items() if J.shape[0] * (J.shape[0] + J.shape[1]) > LARGE_SIZE
    }
    small_out = {k: v for k, v in out.items() if not _key_in(k, large)}
    large_out = {k: v for k, v in out.items() if _key_in(k, large)}
    large_out["meta/names"] = np.array(sorted(large))
    save("foundation.npz", small_out)
    save("foundation_large.npz", large_out)


LARGE_SIZE = 15000  # m * (m + n) above which a matrix goes to foundation_large.npz


def _key_in(key, names):
    parts = key.split("/")
    return len(parts) >= 2 and parts[1] in names


# --------------------------------------------------------------------------------------
# shared helpers for zoo / modern


def save_split(stem, out, Js_used, threshold=None):
    """Write <stem>.npz, and <stem>_large.npz for the keys of large matrices, if any."""
    threshold = LARGE_SIZE if threshold is None else threshold
    large = {
        k
        for k, J in Js_used.items()
        if J.shape[0] * (J.shape[0] + J.shape[1]) > threshold
    }
    small_out = {k: v for k, v in out.items() if not _key_in(k, large)}
    large_out = {k: v for k, v in out.items() if _key_in(k, large)}
    save(f"{stem}.npz", small_out)
    if large_out:
        large_out["meta/names"] = np.array(sorted(large))
        save(f"{stem}_large.npz", large_out)


def err_key(out, mid, name, e):
    out[f"errors/{mid}/{name}"] = np.array(1, dtype=np.int64)
    msg = str(e).splitlines()[0][:120] if str(e) else ""
    print(f"  {mid} on {name} raised {type(e).__name__}: {msg}")


def store(out, prefix, w, d):
    if w is not None:
        out[f"{prefix}/w"] = N(w)
    out[f"{prefix}/d"] = N(d)


def pair_matrices():
    """m = 2 matrices (PCGrad = UPGrad(sum) territory), half of them conflicting."""
    rng = np.random.default_rng(7)
    Js = {}
    for i, n in enumerate((3, 5, 9, 27, 102)):
        J = rng.standard_normal((2, n))
        g0, g1 = J
        if i % 2 == 0 and g0 @ g1 > 0:  # make it conflicting
            J[1] = -g1
        if i % 2 == 1 and g0 @ g1 < 0:
            J[1] = -g1
        Js[f"pair_{i}"] = J
    Js["pair_antiparallel"] = np.array([[1.0, 0.0], [-1.0, 0.0]])
    Js["pair_duplicate"] = np.array([[1.0, 0.0], [1.0, 0.0]])
    return Js


def zoo_selection(Js):
    sel = {}
    for k, J in Js.items():
        kind, idx = (k.rsplit("_", 1) + [""])[:2] if "_" in k else (k, "")
        if kind == "normal" or kind == "mgtn" or k in ("base", "5x7", "krum", "tm"):
            sel[k] = J
        elif kind == "scaled" and SCALES[int(idx) % 6] <= 1e5:
            sel[k] = J
        elif kind == "illcond" and J.shape[0] <= 32:
            sel[k] = J
    sel.update(pair_matrices())
    return sel


# numpy re-implementations, to check that the stored draws are the ones TorchJD used
def np_pcgrad(G, perms):
    m = G.shape[0]
    w = np.zeros(m)
    for i in range(m):
        c = np.zeros(m)
        c[i] = 1.0
        for j in perms[i]:
            if j == i:
                continue
            ip = G[j] @ c
            if ip < 0.0:
                c[j] -= ip / G[j, j]
        w += c
    return w


def np_graddrop(J, U, leak=None):
    m = J.shape[0]
    leak = np.zeros(m) if leak is None else leak
    with np.errstate(invalid="ignore", divide="ignore"):
        P = 0.5 * (1.0 + J.sum(0) / np.abs(J).sum(0))
    d = np.zeros(J.shape[1])
    for i in range(m):
        M = (P > U) * (J[i] > 0) + (P < U) * (J[i] < 0)
        d += (leak[i] + (1 - leak[i]) * M) * J[i]
    return d


# --------------------------------------------------------------------------------------
# 2. zoo


ZOO_DET = [
    ("mgda", lambda m: MGDA()),
    ("mgda_e1e-5", lambda m: MGDA(epsilon=1e-5, max_iters=1000)),
    ("cagrad_c0.5", lambda m: CAGrad(c=0.5)),
    ("cagrad_c1", lambda m: CAGrad(c=1.0)),
    ("alignedmtl_min", lambda m: AlignedMTL(scale_mode="min")),
    ("alignedmtl_median", lambda m: AlignedMTL(scale_mode="median")),
    ("alignedmtl_rmse", lambda m: AlignedMTL(scale_mode="rmse")),
    ("imtlg", lambda m: IMTLG()),
    ("krum_1", lambda m: Krum(n_byzantine=1)),
    ("krum_1_2", lambda m: Krum(n_byzantine=1, n_selected=2)),
    ("trimmedmean_1", lambda m: TrimmedMean(trim_number=1)),
    ("config", lambda m: ConFIG()),
]
NASH_MAX_M = 64  # NashMTL (cvxpy/ECOS) is too slow above this; recorded under skipped/


def zoo(Js):
    t0 = time.time()
    sel = zoo_selection(Js)
    out: dict[str, np.ndarray] = {}
    for name, Jn in sel.items():
        out[f"J/{name}"] = Jn
        J = T(Jn)
        m, n = Jn.shape
        for mid, make in ZOO_DET:
            try:
                w, d = run_agg(make(m), J)
                store(out, f"{mid}/{name}", w, d)
            except Exception as e:  # noqa: BLE001
                err_key(out, mid, name, e)

        # PCGrad: randperm(m) per row, global RNG, seed 0
        torch.manual_seed(0)
        perms = np.stack([torch.randperm(m).numpy() for _ in range(m)]).astype(np.int64)
        torch.manual_seed(0)
        w, d = run_agg(PCGrad(), J)
        store(out, f"pcgrad/{name}", w, d)
        out[f"pcgrad/{name}/draws"] = perms.reshape(m, m)
        if np.all(np.isfinite(Jn)):
            ref = np_pcgrad(Jn @ Jn.T, perms)
            assert np.allclose(
                ref, N(w), rtol=1e-9, atol=1e-12 * max(1.0, np.abs(ref).max())
            ), name

        # GradDrop: rand(n) with J's dtype, seed 0
        torch.manual_seed(0)
        U = N(torch.rand(n, dtype=F64))
        torch.manual_seed(0)
        _, d = run_agg(GradDrop(), J)
        out[f"graddrop/{name}/d"] = N(d)
        out[f"graddrop/{name}/draws"] = U
        assert np.allclose(np_graddrop(Jn, U), N(d), rtol=1e-12, atol=0), name

        # Random: randn(m) with J's dtype, seed 0
        torch.manual_seed(0)
        z = N(torch.randn(m, dtype=F64))
        torch.manual_seed(0)
        w, d = run_agg(Random(), J)
        store(out, f"random/{name}", w, d)
        out[f"random/{name}/draws"] = z
        assert np.allclose(
            np.exp(z - z.max()) / np.exp(z - z.max()).sum(), N(w), rtol=1e-12
        ), name

        # NashMTL(n_tasks=m): 3 successive calls on the same J
        if m > NASH_MAX_M:
            out[f"skipped/nashmtl/{name}"] = np.array(1, dtype=np.int64)
        else:
            agg = NashMTL(n_tasks=m)
            for k in range(3):
                try:
                    w, d = run_agg(agg, J)
                    store(out, f"nashmtl/{name}/call{k}", w, d)
                except Exception as e:  # noqa: BLE001
                    err_key(out, "nashmtl", name, e)  # (always raised on call0 so far)
                    break

    # NashMTL on sequences of 3 different Js (fresh instance per sequence)
    rng = np.random.default_rng(8)
    for s, (m, n) in enumerate([(2, 3), (3, 5), (5, 7), (9, 11)]):
        agg = NashMTL(n_tasks=m)
        base = rng.standard_normal((m, n))
        for k in range(3):
            Jn = base + 0.3 * rng.standard_normal((m, n))
            out[f"nashmtl_seq/seq_{s}/J{k}"] = Jn
            w, d = run_agg(agg, T(Jn))
            store(out, f"nashmtl_seq/seq_{s}/call{k}", w, d)

    # extras with preference vectors / leak (pref = arange(1, m+1), leak stored)
    for name in ("base", "5x7"):
        Jn = sel[name]
        J = T(Jn)
        m, n = Jn.shape
        pref = torch.arange(1, m + 1, dtype=F64)
        for mid, agg in [
            ("alignedmtl_pref", AlignedMTL(pref_vector=pref)),
            ("config_pref", ConFIG(pref)),
        ]:
            w, d = run_agg(agg, J)
            store(out, f"{mid}/{name}", w, d)
            out[f"{mid}/{name}/pref"] = N(pref)
        leak = np.linspace(0.5, 0.2, m)
        torch.manual_seed(0)
        U = N(torch.rand(n, dtype=F64))
        torch.manual_seed(0)
        d = GradDrop(leak=T(leak))(J)
        out[f"graddrop_leak/{name}/d"] = N(d)
        out[f"graddrop_leak/{name}/leak"] = leak
        out[f"graddrop_leak/{name}/draws"] = U
        # float32 GradDrop (float32 draws differ from float64 ones)
        torch.manual_seed(0)
        U32 = torch.rand(n, dtype=F32)
        torch.manual_seed(0)
        d = GradDrop()(T(Jn, F32))
        out[f"graddrop_f32/{name}/d"] = N(d)
        out[f"graddrop_f32/{name}/draws"] = N(U32)

    print("zoo checks (reference values):")
    c = lambda k, e, a=1e-8: check(k, out[k], e, a)  # noqa: E731
    c("mgda/base/d", [0, 1, 1])
    c("mgda/base/w", [0.6, 0.4])
    c("cagrad_c0.5/base/d", [0.1835034204, 1.204124148, 1.204124148], 1e-7)
    c("cagrad_c0.5/base/w", [0.7041241467, 0.5000000012], 1e-7)
    c("cagrad_c1/base/w", [1.199978642, 0.7999679646], 1e-6)
    c("alignedmtl_min/base/d", [0.213278746, 0.9673329838, 0.9673329838])
    c("alignedmtl_min/base/w", [0.5590719157, 0.4082610681])
    c("alignedmtl_median/base/w", out["alignedmtl_min/base/w"], 0)
    c("alignedmtl_rmse/base/d", [0.5763758127, 2.614172041, 2.614172041])
    c("alignedmtl_rmse/base/w", [1.510865643, 1.103306398])
    c("alignedmtl_pref/base/d", [2.007851663, 2.751188104, 2.751188104])
    c("alignedmtl_pref/base/w", [1.449927696, 1.301260408])
    c("imtlg/base/d", [0.07669683062, 1, 1])
    c("imtlg/base/w", [0.5923303169, 0.4076696831])
    c("pcgrad/base/d", [0.5847953216, 3.801169591, 3.801169591])
    c("pcgrad/base/w", [2.222222222, 1.578947368])
    c("pcgrad/base/draws", [[0, 1], [1, 0]], 0)
    c("random/base/d", [-2.622880285, 1, 1])
    c("random/base/w", [0.8622880285, 0.1377119715])
    c("nashmtl/base/call0/d", [0.05415325109, 0.7060691982, 0.7060691982], 1e-7)
    c("nashmtl/base/call0/w", [0.4182261938, 0.2878430044], 1e-7)
    c("nashmtl/base/call1/w", [0.4182261938, 0.2878430044], 1e-7)
    c("config/base/d", [0.1588089758, 2.070606758, 2.070606758])
    c("config_pref/base/d", [0.4684087453, 2.165635178, 2.165635178])
    c("graddrop/base/d", [-4, 2, 2], 0)
    c("graddrop_f32/base/d", [6, 2, 2], 0)
    c(
        "graddrop_f32/base/draws",
        [0.49625658988952637, 0.7682217955589294, 0.08847743272781372],
        0,
    )
    c("graddrop_leak/base/d", [-2.8, 2, 2], 1e-12)
    c(
        "mgda/5x7/d",
        [
            0.3504403246,
            0.3830415931,
            0.2210010211,
            0.5143078375,
            0.5111838255,
            0.02642931478,
            -0.08504113774,
        ],
    )
    c(
        "mgda/5x7/w",
        [0.008519169496, 0.6094059882, 0.02630414165, 0.1471213802, 0.2086493205],
    )
    c("cagrad_c0.5/5x7/w", [0.2, 0.6891156168, 0.2, 0.2, 0.2], 1e-7)
    c(
        "cagrad_c0.5/5x7/d",
        [
            0.7745600795,
            0.5423955974,
            0.6600697272,
            1.035993124,
            0.9698574167,
            -0.2288393431,
            -0.3437513354,
        ],
        1e-7,
    )
    c(
        "alignedmtl_min/5x7/w",
        [-0.02400097834, 0.1744902624, 0.01852667719, 0.05411026285, 0.08151047659],
    )
    c(
        "imtlg/5x7/w",
        [-0.2140504039, 0.7586993835, -0.03681735645, 0.1474885182, 0.3446798586],
    )
    c("krum_1/5x7/w", [0, 0, 0, 0, 1], 0)
    c("pcgrad/5x7/w", [1, 2.841342726, 1.103779291, 1.365391734, 1.213572897])
    c(
        "pcgrad/5x7/d",
        [
            4.576506427,
            3.438647907,
            2.969216603,
            5.981752896,
            3.282033494,
            -2.099004672,
            -2.199924486,
        ],
        1e-7,
    )
    c(
        "pcgrad/5x7/draws",
        [
            [4, 0, 1, 3, 2],
            [3, 4, 0, 1, 2],
            [2, 4, 1, 3, 0],
            [1, 4, 3, 2, 0],
            [1, 0, 4, 2, 3],
        ],
        0,
    )
    c(
        "nashmtl/5x7/call0/w",
        [0.06492839723, 0.3891211598, 0.1244417412, 0.163014577, 0.134139188],
        1e-7,
    )
    c(
        "nashmtl/5x7/call1/w",
        [0.06492839723, 0.3891211598, 0.1244417412, 0.163014577, 0.134139188],
        1e-7,
    )
    c(
        "random/5x7/w",
        [0.6118233588, 0.09771143533, 0.01483008846, 0.2313377539, 0.04429736351],
    )
    c(
        "random/5x7/draws",
        [
            1.5409961082440433,
            -0.2934289057609464,
            -2.1787893820745574,
            0.5684312772806678,
            -1.084522342424021,
        ],
        0,
    )
    c(
        "config/5x7/d",
        [
            0.9152938459,
            3.613138908,
            -0.07136282742,
            0.8074294781,
            1.35442371,
            1.121270979,
            -1.299236544,
        ],
        1e-7,
    )
    c(
        "graddrop/5x7/d",
        [
            -0.1513572083,
            3.067626505,
            3.038362985,
            5.032853914,
            -2.342151422,
            -3.812170087,
            1.071763434,
        ],
        1e-7,
    )
    c(
        "graddrop/5x7/draws",
        [
            0.9700530018065531,
            0.707819864399788,
            0.45938294312745087,
            0.9207476841219603,
            0.6450241201227648,
            0.7911478921803037,
            0.17860617520075095,
        ],
        0,
    )
    c(
        "trimmedmean_1/5x7/d",
        [
            0.8767536808,
            0.5327559115,
            0.5147613039,
            0.9210330967,
            0.2931851537,
            -0.595205034,
            -0.1378069943,
        ],
    )
    c("krum_1_2/krum/w", out["krum_1_2/krum/w"], 0)
    c("krum_1/krum/d", [1, 0, 1], 0)
    c("krum_1/krum/w", [0, 1, 0, 0, 0], 0)
    c("trimmedmean_1/tm/d", [1.5, 2.5], 0)
    c("trimmedmean_1/krum/d", [1.333333333, 0.3333333333, 1.666666667])
    c("mgda/krum/d", [1, 0, 1], 1e-12)
    c("mgda/krum/w", [0, 1, 0, 0, 0], 1e-12)
    c(
        "imtlg/krum/w",
        [-0.04601977318, 0.03316070687, 0.009982713198, 1.998310132, -0.9954337788],
    )
    c("alignedmtl_min/krum/d", [0.4346761435, -0.2117983915, 0.3445739817], 1e-7)
    c("config/krum/d", [57.62857027, -125.6058654, 277.1772522], 1e-6)
    c("pcgrad/krum/w", [20.61904762, 1, 1.003904739, 85.85714286, 1], 1e-7)
    c("pcgrad/krum/d", [184.7690459, -476.2672226, 303.2802852], 1e-6)
    print(f"zoo built in {time.time() - t0:.1f}s")
    save_split("zoo", out, sel)


# --------------------------------------------------------------------------------------
# 3. modern


def modern_selection(Js):
    sel = {}
    for k, J in Js.items():
        if k in ("base", "5x7", "krum"):
            sel[k] = J
        elif k.startswith("normal_") and J.shape[1] < 1000:
            sel[k] = J
        elif k.startswith("illcond_") and J.shape[0] <= 16 and J.shape[1] <= 100:
            sel[k] = J
    for k, J in pair_matrices().items():
        if k in ("pair_0", "pair_1", "pair_2"):
            sel[k] = J
    return sel


STATEFUL = [
    ("gradvac", lambda: GradVac()),
    ("pcd", lambda: PCD()),
    ("pcd_tau1", lambda: PCD(tau=1.0)),
    ("excessmtl", lambda: ExcessMTL()),
    ("excessmtl_r0.1", lambda: ExcessMTL(robust_step_size=0.1)),
    ("excessmtl_warm2", lambda: ExcessMTL(n_warmup_steps=2)),
    (
        "crmogm_upgrad",
        lambda: GramianWeightedAggregator(CRMOGMWeighting(UPGradWeighting())),
    ),
    (
        "crmogm_mgda_a0.5",
        lambda: GramianWeightedAggregator(CRMOGMWeighting(MGDAWeighting(), alpha=0.5)),
    ),
]


def fairgrad_residual(G, w, alpha):
    with np.errstate(all="ignore"):
        r = G @ w - w ** (-1.0 / alpha)
        return float(np.max(np.abs(r)) / max(1.0, np.max(np.abs(G @ w))))


def gradvac_draws(m, seed):
    torch.manual_seed(seed)
    return (
        np.stack([torch.randperm(m - 1).numpy() for _ in range(m)])
        .astype(np.int64)
        .reshape(m, max(m - 1, 0))
    )


def modern(Js):
    t0 = time.time()
    sel = modern_selection(Js)
    out: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(9)
    for name, Jn in sel.items():
        out[f"J/{name}"] = Jn
        m, n = Jn.shape
        J = T(Jn)
        # sequence of 3 different Js of the same shape: J0 = J, J1, J2 stored
        scale = float(np.std(Jn)) or 1.0
        seq = [Jn] + [Jn + 0.5 * scale * rng.standard_normal((m, n)) for _ in range(2)]
        out[f"seqJ/{name}/J1"] = seq[1]
        out[f"seqJ/{name}/J2"] = seq[2]

        for alpha, mid in [
            (0.5, "fairgrad_a0.5"),
            (1.0, "fairgrad_a1"),
            (2.0, "fairgrad_a2"),
        ]:
            try:
                w, d = run_agg(FairGrad(alpha=alpha), J)
                store(out, f"{mid}/{name}", w, d)
                out[f"{mid}/{name}/resid"] = np.array(
                    fairgrad_residual(Jn @ Jn.T, N(w), alpha)
                )
            except Exception as e:  # noqa: BLE001
                err_key(out, mid, name, e)

        for mid, make in STATEFUL:
            for mode, Jseq in (("same", [Jn] * 3), ("seq", seq)):
                agg = make()
                for k, Jk in enumerate(Jseq):
                    if mid == "gradvac":
                        out[f"{mid}/{name}/{mode}/call{k}/draws"] = gradvac_draws(m, k)
                    torch.manual_seed(k)
                    try:
                        w, d = run_agg(agg, T(Jk))
                    except Exception as e:  # noqa: BLE001
                        err_key(out, mid, name, e)
                        break
                    store(out, f"{mid}/{name}/{mode}/call{k}", w, d)
                    if mid == "gradvac":
                        out[f"{mid}/{name}/{mode}/call{k}/phi"] = N(
                            agg.gramian_weighting._phi_t
                        )

        # MoDo / SDMGrad: call0 on M = J J^T, call1/2 on M = J1 J2^T (two noisy batches)
        Ms = [Jn @ Jn.T]
        for _ in range(2):
            J1 = Jn + 0.3 * scale * rng.standard_normal((m, n))
            J2 = Jn + 0.3 * scale * rng.standard_normal((m, n))
            Ms.append(J1 @ J2.T)
        for mid, make in [("modo", MoDoWeighting), ("sdmgrad", SDMGradWeighting)]:
            wt = make()
            for k, M in enumerate(Ms):
                out[f"{mid}/{name}/call{k}/M"] = M
                w = wt(T(M))
                out[f"{mid}/{name}/call{k}/w"] = N(w)
                out[f"{mid}/{name}/call{k}/d"] = N(w @ J)

    # SDMGrad cases small enough to check by hand (see tests/reference/README.md)
    wt = SDMGradWeighting(n_iter=1)
    for k, M in enumerate([np.diag([1.0, 0.25, 0.0]), np.eye(3)]):
        out[f"sdmgrad_niter1/doc/call{k}/M"] = M
        out[f"sdmgrad_niter1/doc/call{k}/w"] = N(wt(T(M)))
    wt = SDMGradWeighting(n_iter=1, pref_vector=T([0.0, 0.0, 1.0]))
    out["sdmgrad_niter1_pref001/doc/call0/M"] = np.diag([1.0, 0.25, 0.0])
    out["sdmgrad_niter1_pref001/doc/call0/w"] = N(wt(T(np.diag([1.0, 0.25, 0.0]))))

    print("modern checks (reference values):")
    c = lambda k, e, a=1e-8: check(k, out[k], e, a)  # noqa: E731
    c("gradvac/base/same/call0/d", [0.5847953281, 3.801169586, 3.801169586])
    c("gradvac/base/same/call0/w", [2.222222219, 1.578947367])
    # GradVac's state phi_hat on J_base after the second call, then after the first
    # (beta * cos = -0.4205955119).
    c("gradvac/base/same/call1/phi", [[0, -0.6308932679], [-0.6308932679, 0]])
    c("gradvac/base/same/call0/phi", [[0, -0.4205955119], [-0.4205955119, 0]])
    c(
        "gradvac/5x7/same/call0/w",
        [1, 2.928923858, 1.101981977, 1.363415553, 1.213572896],
    )
    c(
        "gradvac/5x7/same/call0/d",
        [
            4.56116096,
            3.427299882,
            3.003958608,
            5.990251682,
            3.411711825,
            -2.030907474,
            -2.184309616,
        ],
        1e-7,
    )
    c(
        "gradvac/5x7/same/call0/draws",
        [[0, 1, 3, 2], [0, 2, 3, 1], [3, 2, 0, 1], [3, 0, 2, 1], [0, 1, 2, 3]],
        0,
    )
    # published 2nd GradVac calls use seed 0 again (stored fixtures: seed k for call k)
    for name, w2, d2 in [
        ("base", [1.857987802, 1.406415275], [1.006540441, 3.264403077, 3.264403077]),
        ("5x7", [1, 2.033075705, 1.051210751, 1.191980765, 1.169878214], None),
    ]:
        agg = GradVac()
        for _ in range(2):
            torch.manual_seed(0)
            w, d = run_agg(agg, T(sel[name]))
        check(f"gradvac/{name} 2nd call, seed 0 (not stored) w", N(w), w2, 1e-8)
        if d2 is not None:
            check(f"gradvac/{name} 2nd call, seed 0 (not stored) d", N(d), d2, 1e-8)
    c("fairgrad_a1/base/d", [0.07658428839, 0.9985326351, 0.9985326351])
    c("fairgrad_a1/base/w", [0.5914611522, 0.4070714829])
    c("fairgrad_a2/base/d", [0.03127367982, 0.7908171505, 0.7908171505])
    c("fairgrad_a2/base/w", [0.4713629223, 0.3194542282])
    c(
        "fairgrad_a1/5x7/w",
        [0.1451843099, 0.870101365, 0.2782601925, 0.3645116755, 0.2999443427],
    )
    c(
        "fairgrad_a2/5x7/w",
        [0.04220285718, 0.8442548204, 0.1740032534, 0.2968946649, 0.2623194361],
    )
    c(
        "fairgrad_a1/krum/w",
        [0.3945282588, 0.3257664443, 0.00198029646, 0.1946689972, 0.2187831414],
        1e-7,
    )
    for k in range(3):
        c(f"pcd/base/same/call{k}/d", [-0.8200327513, 2.943428807, 2.943428807])
        c(f"pcd/base/same/call{k}/w", [1.848060559, 1.095368248])
    c("pcd_tau1/base/same/call0/d", [3.16946792, 1.994301019, 1.994301019])
    c("pcd_tau1/base/same/call0/w", [0.8796338192, 1.114667199])
    c("pcd/5x7/same/call0/w", [1, 0, 0, 0, 0], 1e-12)
    c("pcd/5x7/same/call1/w", [1, 0, 0, 0, 0], 1e-12)
    c("pcd/krum/same/call0/w", [1.146125105, 0, 0.0015068022, 0, 0])
    c("pcd/krum/same/call0/d", [1.25913527, 0.1425948403, 1.180781556])
    c("excessmtl/base/same/call0/d", [4.807970784, 1, 1])
    c("excessmtl/base/same/call0/w", [0.1192029216, 0.8807970784])
    c("excessmtl/base/same/call1/w", [0.1192029215, 0.8807970785])
    c("excessmtl_r0.1/base/same/call0/d", [1.498339974, 1, 1])
    c("excessmtl_r0.1/base/same/call0/w", [0.4501660026, 0.5498339974])
    c(
        "excessmtl/5x7/same/call0/w",
        [0.8381243874, 0.00201094436, 0.04249256976, 0.0433663033, 0.07400579516],
    )
    c(
        "excessmtl/5x7/same/call1/w",
        [0.8381243821, 0.002010944695, 0.04249257063, 0.04336630626, 0.07400579636],
    )
    c(
        "excessmtl/5x7/same/call0/d",
        [
            1.638831377,
            0.4955810939,
            0.8638991774,
            1.996136287,
            1.452701658,
            -0.9984487826,
            0.6541888699,
        ],
        1e-7,
    )
    c("excessmtl/krum/same/call0/w", [0, 0, 1, 0, 0], 1e-9)
    for name in ("base", "5x7"):
        for k in range(3):
            c(
                f"crmogm_upgrad/{name}/same/call{k}/w",
                out[f"crmogm_upgrad/{name}/same/call0/w"],
                1e-12,
            )
    c("crmogm_upgrad/base/same/call0/w", [1.110921047, 0.7894310312])
    c("crmogm_mgda_a0.5/base/same/call2/w", [0.6, 0.4])
    c(
        "crmogm_mgda_a0.5/5x7/same/call1/w",
        [0.008519169496, 0.6094059882, 0.02630414165, 0.1471213802, 0.2086493205],
    )
    c("modo/base/call0/w", [1, 0])
    c("modo/base/call0/d", [-4, 1, 1])
    c("modo/5x7/call0/w", [0, 0.474080769, 0.206191877, 0.2158484194, 0.1038789347])
    c(
        "modo/5x7/call0/d",
        [
            0.3200714639,
            0.359089474,
            0.3586244489,
            0.5551923871,
            0.3478503498,
            -0.01120037688,
            -0.5452660582,
        ],
    )
    c("sdmgrad/base/call0/w", [0.1153846154, 0.8846153846])
    c("sdmgrad/base/call0/d", [4.846153846, 1, 1])
    c("sdmgrad/5x7/call0/w", [0.04615384615] * 4 + [0.8153846154])
    c("sdmgrad_niter1/doc/call0/w", [1 / 13, 1 / 13, 11 / 13], 1e-12)
    c("sdmgrad_niter1/doc/call1/w", [6 / 13, 6 / 13, 1 / 13], 1e-12)
    c("sdmgrad_niter1_pref001/doc/call0/w", [0, 0, 1], 1e-12)
    # 2nd-call published values for MoDo / SDMGrad use the same G twice
    for mid, make, name, w2 in [
        ("modo", MoDoWeighting, "base", [0, 1]),
        (
            "modo",
            MoDoWeighting,
            "5x7",
            [0, 0.5411466286, 0.1137755798, 0.2318421591, 0.1132356325],
        ),
        (
            "sdmgrad",
            SDMGradWeighting,
            "5x7",
            [0.04615384615, 0.4367646275, 0.04615384615, 0.4247738341, 0.04615384615],
        ),
    ]:
        wt = make()
        G = T(sel[name] @ sel[name].T)
        wt(G)
        check(f"{mid}/{name} 2nd call on same G (not stored) w", N(wt(G)), w2, 1e-8)
    print(f"modern built in {time.time() - t0:.1f}s")
    save_split("modern", out, sel, threshold=1000)


# --------------------------------------------------------------------------------------
# 3b. modern_sequences: short sequences for the stateful modern methods


def sequence_inputs():
    """The two sequences of three Jacobians (`s5`: 5x7, `s2`: 2x3) fed to the stateful
    methods: numpy `RandomState(seed).randn`, starting from J_5x7 and J_base."""
    rs = lambda seed, shape: np.random.RandomState(seed).randn(*shape)  # noqa: E731
    return {
        "s5": [j_5x7(), rs(1, (5, 7)), rs(2, (5, 7))],
        "s2": [J_BASE.copy(), rs(3, (2, 3)), rs(4, (2, 3))],
    }


def cross_batch(seq):
    """The cross-batch matrices J1 J2^T given to MoDo and SDMGrad."""
    return [seq[0] @ seq[1].T, seq[1] @ seq[2].T, seq[2] @ seq[0].T]


def modern_sequences(Js):
    """For each sequence, a fresh TorchJD object per configuration, called on the
    three inputs in turn with `torch.manual_seed(k)` set before call k."""
    t0 = time.time()
    out: dict[str, np.ndarray] = {}
    for seq_name, seq in sequence_inputs().items():
        m = seq[0].shape[0]
        out[f"J/{seq_name}"] = np.stack(seq)
        crosses = cross_batch(seq)
        out[f"M/{seq_name}"] = np.stack(crosses)
        pref = [0.1, 0.2, 0.3, 0.2, 0.2] if m == 5 else [0.25, 0.75]
        # (id, factory, input kind): "J" = the aggregator on J_k (weights captured),
        # "G" = the weighting on J_k J_k^T, "M" = the weighting on cross_batch(seq)[k].
        configs = [
            ("gradvac", lambda: GradVac(), "J"),
            ("gradvac_b0.2", lambda: GradVac(beta=0.2, eps=1e-6), "J"),
            ("pcd", lambda: PCD(), "J"),
            ("pcd_t0.5_b0.9", lambda: PCD(tau=0.5, beta=0.9), "J"),
            ("excess", lambda: ExcessMTL(), "J"),
            (
                "excess_r0.1_w1",
                lambda: ExcessMTL(robust_step_size=0.1, n_warmup_steps=1),
                "J",
            ),
            ("crmogm_mgda", lambda: CRMOGMWeighting(MGDAWeighting(), alpha=0.5), "G"),
            (
                "crmogm_gradvac_init",
                lambda: CRMOGMWeighting(
                    GradVacWeighting(),
                    alpha=0.7,
                    initial_weights=torch.arange(1, m + 1, dtype=F64),
                ),
                "G",
            ),
            ("modo", lambda: MoDoWeighting(), "M"),
            ("modo_g0.5_r0", lambda: MoDoWeighting(gamma=0.5, rho=0.0), "M"),
            ("sdmgrad", lambda: SDMGradWeighting(), "M"),
            (
                "sdmgrad_custom",
                lambda: SDMGradWeighting(
                    lr=1.0, momentum=0.9, n_iter=5, lambda_=0.6, pref_vector=T(pref)
                ),
                "M",
            ),
        ]
        if m == 5:
            configs.append(
                ("pcd_tauvec", lambda: PCD(tau=T([0.1, 0.2, 0.3, 0.4]), beta=0.5), "J")
            )
        for alpha in (0.5, 1.0, 2.0, 5.0):
            configs.append(
                (f"fairgrad_a{alpha}", lambda a=alpha: FairGradWeighting(a), "G")
            )
        for mid, make, kind in configs:
            obj = make()
            ws = []
            for k, Jk in enumerate(seq):
                torch.manual_seed(k)
                if kind == "J":
                    w, _ = run_agg(obj, T(Jk))
                elif kind == "G":
                    w = obj(T(Jk @ Jk.T))
                else:
                    w = obj(T(crosses[k]))
                ws.append(N(w))
            out[f"{mid}/{seq_name}"] = np.stack(ws)
        out[f"draws/{seq_name}"] = np.stack([gradvac_draws(m, k) for k in range(3)])

    print("modern_sequences checks (first calls, reference values):")
    for key, expected in [
        ("gradvac/s5", [1, 2.928923858, 1.101981977, 1.363415553, 1.213572896]),
        ("gradvac/s2", [2.222222219, 1.578947367]),
        (
            "excess/s5",
            [0.8381243874, 0.00201094436, 0.04249256976, 0.0433663033, 0.07400579516],
        ),
        (
            "crmogm_mgda/s5",
            [0.008519169496, 0.6094059882, 0.02630414165, 0.1471213802, 0.2086493205],
        ),
        ("fairgrad_a1.0/s2", [0.5914611522, 0.4070714829]),
        ("sdmgrad/s2", [0.1153846154, 0.8846153846]),
    ]:
        check(f"{key} call0", out[key][0], expected, 1e-8)
    check(
        "draws/s5 call0",
        out["draws/s5"][0],
        [[0, 1, 3, 2], [0, 2, 3, 1], [3, 2, 0, 1], [3, 0, 2, 1], [0, 1, 2, 3]],
        0,
    )
    print(f"modern_sequences built in {time.time() - t0:.1f}s")
    save("modern_sequences.npz", out)


# --------------------------------------------------------------------------------------
# 4. scalarization


def scalarization(Js):
    import torchjd.scalarization as S

    t0 = time.time()
    out: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(10)
    cases = {"doc": np.array([1.0, 2.0, 3.0])}
    weights = {"doc": np.array([0.2, 0.3, 0.5])}
    for m in (2, 3, 5):
        cases[f"m{m}"] = rng.uniform(0.5, 3.0, m)
        weights[f"m{m}"] = rng.dirichlet(np.ones(m))
    cases["mat"] = rng.uniform(0.5, 3.0, (2, 3))
    weights["mat"] = rng.dirichlet(np.ones(6)).reshape(2, 3)
    refs = {k: np.full(L.shape, 0.5) for k, L in cases.items()}
    for k in cases:
        out[f"L/{k}"] = cases[k]
        out[f"weights/{k}"] = weights[k]
        out[f"reference/{k}"] = refs[k]

    def val_grad(sc, L, extra=None):
        Lt = T(L).requires_grad_(True)
        v = sc(Lt)
        params = [Lt] + ([extra] if extra is not None else [])
        grads = torch.autograd.grad(v, params)
        return N(v), [N(g) for g in grads]

    for k, L in cases.items():
        w, ref = T(weights[k]), T(refs[k])
        simple = {
            "mean": S.Mean(),
            "sum": S.Sum(),
            "constant": S.Constant(w),
            "geometricmean": S.GeometricMean(),
            "cosmos_l1": S.COSMOS(1.0, w),
            "cosmos_l0.5": S.COSMOS(0.5, w),
            "stch_0.5": S.STCH(0.5),
            "stch_0.5_w": S.STCH(0.5, w),
            "stch_0.5_w_ref": S.STCH(0.5, w, reference=ref),
            "stch_0.01_w": S.STCH(0.01, w),
            "pbi_5": S.PBI(5.0, w),
            "pbi_5_ref": S.PBI(5.0, w, reference=ref),
        }
        for sid, sc in simple.items():
            v, (g,) = val_grad(sc, L)
            out[f"{sid}/{k}/value"] = v
            out[f"{sid}/{k}/grad"] = g

        # Random: randn(numel) with L's dtype, seed 0
        torch.manual_seed(0)
        z = N(torch.randn(L.size, dtype=F64))
        torch.manual_seed(0)
        v, (g,) = val_grad(S.Random(), L)
        out[f"random/{k}/draws"] = z
        out[f"random/{k}/value"] = v
        out[f"random/{k}/grad"] = g

        # UW / IMTLL: at init (s = 0) and at a given s; grads w.r.t. L and s
        s_rand = rng.normal(0.0, 0.5, L.shape)
        for sid, cls, attr in [
            ("uw", S.UW, "log_var"),
            ("imtll", S.IMTLL, "log_scale"),
        ]:
            for suffix, s_val in (("0", np.zeros(L.shape)), ("", s_rand)):
                sc = cls(L.shape).double()
                with torch.no_grad():
                    getattr(sc, attr).copy_(T(s_val))
                v, (g, gs) = val_grad(sc, L, getattr(sc, attr))
                key = f"{sid}{suffix}/{k}"
                out[f"{key}/s"] = s_val
                out[f"{key}/value"] = v
                out[f"{key}/grad"] = g
                out[f"{key}/grad_s"] = gs

        # FAMO: 3 steps of (call on L_k, then update(Lnew_k)); logits after each update
        for sid, min_l in (("famo", None), ("famo_min", 0.1 * L)):
            sc = S.FAMO(
                L.shape, min_losses=None if min_l is None else T(min_l)
            ).double()
            if min_l is not None:
                out[f"{sid}/{k}/min_losses"] = min_l
            Lk = L.copy()
            for step in range(3):
                Lnew = Lk * rng.uniform(0.7, 1.05, L.shape)
                if k == "doc" and step == 0:
                    Lnew = np.array([0.5, 1.8, 2.9])
                v, (g,) = val_grad(sc, Lk)
                sc.update(T(Lnew))
                pre = f"{sid}/{k}/step{step}"
                out[f"{pre}/L"] = Lk
                out[f"{pre}/value"] = v
                out[f"{pre}/grad"] = g
                out[f"{pre}/Lnew"] = Lnew
                out[f"{pre}/logits"] = N(sc._w)
                # next call: same L for the doc case at step 1 (published), else the new
                # losses
                Lk = L.copy() if (k == "doc" and step == 0) else Lnew

        # DWA: a flat sequence of calls; step() called after the calls flagged
        # step_after = 1
        sc = S.DWA()
        if k == "doc":
            seq = [
                (np.array([0.8, 1.9, 3.0]), 1),
                (np.array([0.6, 1.8, 3.1]), 1),
                (L, 0),
                (L * 0.9, 1),
                (L * 0.8, 0),
            ]
        else:
            seq = []
            Lc = L.copy()
            for epoch in range(4):
                for b in range(2):
                    Lc = Lc * rng.uniform(0.8, 1.05, L.shape)
                    seq.append((Lc.copy(), int(b == 1)))
        for i, (Li, flag) in enumerate(seq):
            v, (g,) = val_grad(sc, Li)
            pre = f"dwa/{k}/call{i}"
            out[f"{pre}/L"] = Li
            out[f"{pre}/value"] = v
            out[f"{pre}/grad"] = g
            out[f"{pre}/step_after"] = np.array(flag, dtype=np.int64)
            if flag:
                sc.step()

    print("scalarization checks (L = [1, 2, 3], w = [0.2, 0.3, 0.5]):")
    c = lambda k, e, a=1e-8: check(k, out[k], e, a)  # noqa: E731
    c("mean/doc/value", 2)
    c("mean/doc/grad", [1 / 3] * 3)
    c("sum/doc/value", 6)
    c("sum/doc/grad", [1, 1, 1])
    c("constant/doc/value", 2.3)
    c("constant/doc/grad", [0.2, 0.3, 0.5])
    c("geometricmean/doc/value", 1.817120593)
    c("geometricmean/doc/grad", [0.60570686, 0.30285343, 0.20190229])
    c("cosmos_l1/doc/value", 1.302823535)
    c("cosmos_l1/doc/grad", [0.18451589, 0.31238729, 0.49690318])
    c("stch_0.5/doc/value", 1.287467286)
    c("stch_0.5/doc/grad", [0.049445699, 0.096307072, 0.18758056])
    c("stch_0.5_w/doc/value", 1.607383268)
    c("stch_0.5_w/doc/grad", [0.011983741, 0.04000546, 0.40336488])
    c("stch_0.5_w_ref/doc/value", 1.382010431)
    c("stch_0.5_w_ref/doc/grad", [0.015398907, 0.046514385, 0.38397876])
    c("pbi_5/doc/value", 5.135971403)
    c("pbi_5/doc/grad", [-3.4219004, 3.7647146, 0.3428142], 1e-7)
    c("uw0/doc/value", 3)
    c("uw0/doc/grad", [0.5] * 3)
    c("imtll0/doc/value", 6)
    c("imtll0/doc/grad", [1] * 3)
    c("famo/doc/step0/value", 0.9773233641)
    c("famo/doc/step0/grad", [0.54545454, 0.27272727, 0.18181818])
    c("famo/doc/step0/logits", [-0.0249999982, 0.0249999956, 0.0249999969])
    c("famo/doc/step1/value", 1.004032774)
    c("famo/doc/step1/grad", [0.53303221, 0.28018068, 0.18678712])
    c("dwa/doc/call2/value", 6.14023039)
    c(
        "dwa/doc/call2/grad", [0.92140133, 1.016967, 1.0616317], 1e-7
    )  # published to 7 digits
    c("random/doc/value", 1.175839022)
    c("random/doc/grad", [0.84463421, 0.13489256, 0.020473229])
    print(f"scalarization built in {time.time() - t0:.1f}s")
    save("scalarization.npz", out)


# --------------------------------------------------------------------------------------
# 5. autojac


def autojac(Js):
    from torch import nn
    from torchjd.autojac import backward, jac, jac_to_grad, mtl_backward

    t0 = time.time()
    out: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(11)
    x = rng.standard_normal((16, 10))
    y = rng.standard_normal((16, 2))

    # basic: Linear(10,5) -> ReLU -> Linear(5,2), one MSE loss per output column,
    # 100 SGD steps
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    out["basic/x"] = x
    out["basic/y"] = y
    for pn, p in model.named_parameters():
        out[f"basic/init/{pn}"] = N(p)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xt, yt = T(x), T(y)
    losses, weights = [], []
    for step in range(100):
        pred = model(xt)
        l1 = ((pred[:, 0] - yt[:, 0]) ** 2).mean()
        l2 = ((pred[:, 1] - yt[:, 1]) ** 2).mean()
        opt.zero_grad()
        backward([l1, l2])
        if step == 0:
            for pn, p in model.named_parameters():
                out[f"basic/step0/jac/{pn}"] = N(p.jac)
        w = jac_to_grad(model.parameters(), UPGrad())
        if step == 0:
            for pn, p in model.named_parameters():
                out[f"basic/step0/grad/{pn}"] = N(p.grad)
        opt.step()
        losses.append([l1.item(), l2.item()])
        weights.append(N(w))
    out["basic/losses"] = np.array(losses)
    out["basic/weights"] = np.array(weights)
    for pn, p in model.named_parameters():
        out[f"basic/final/{pn}"] = N(p)

    # mtl: trunk Linear(10,8)+ReLU, heads Linear(8,1) x2;
    # mtl_backward + jac_to_grad(trunk), 20 steps
    torch.manual_seed(1)
    trunk = nn.Sequential(nn.Linear(10, 8), nn.ReLU()).double()
    head1 = nn.Linear(8, 1).double()
    head2 = nn.Linear(8, 1).double()
    mods = {"trunk": trunk, "head1": head1, "head2": head2}
    out["mtl/x"] = x
    out["mtl/y"] = y
    for mn, mod in mods.items():
        for pn, p in mod.named_parameters():
            out[f"mtl/init/{mn}.{pn}"] = N(p)
    params = [p for mod in mods.values() for p in mod.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    losses, weights = [], []
    for step in range(20):
        feat = trunk(xt)
        l1 = ((head1(feat)[:, 0] - yt[:, 0]) ** 2).mean()
        l2 = ((head2(feat)[:, 0] - yt[:, 1]) ** 2).mean()
        opt.zero_grad()
        mtl_backward([l1, l2], features=feat)
        w = jac_to_grad(trunk.parameters(), UPGrad())
        if step == 0:
            for mn, mod in mods.items():
                for pn, p in mod.named_parameters():
                    out[f"mtl/step0/grad/{mn}.{pn}"] = N(p.grad)
        opt.step()
        losses.append([l1.item(), l2.item()])
        weights.append(N(w))
    out["mtl/losses"] = np.array(losses)
    out["mtl/weights"] = np.array(weights)
    for mn, mod in mods.items():
        for pn, p in mod.named_parameters():
            out[f"mtl/final/{mn}.{pn}"] = N(p)

    # worked examples of backward, jac_to_grad and jac (tests/reference/README.md)
    p = T([1.0, 2.0]).requires_grad_(True)
    y1 = T([-1.0, 1.0]) @ p
    y2 = (p**2).sum()
    backward([y1, y2])
    out["doc1/p"] = np.array([1.0, 2.0])
    out["doc1/jac"] = N(p.jac)
    out["doc1/weights"] = N(jac_to_grad([p], UPGrad()))
    out["doc1/grad"] = N(p.grad)

    W = T([[1.0, 2.0], [3.0, 4.0]]).requires_grad_(True)
    b = T([0.5, -0.5]).requires_grad_(True)
    y1 = W @ T([1.0, -1.0]) + b
    y2 = (W**2).sum() + (b**2).sum()
    jW, jb = jac([y1, y2], [W, b])
    Jm = torch.cat([jW.reshape(3, -1), jb.reshape(3, -1)], dim=1)
    out["doc2/W"] = np.array([[1.0, 2.0], [3.0, 4.0]])
    out["doc2/b"] = np.array([0.5, -0.5])
    out["doc2/jac_W"] = N(jW)
    out["doc2/jac_b"] = N(jb)
    out["doc2/gramian"] = N(Jm @ Jm.T)

    xx = T([1.0, 2.0]).requires_grad_(True)
    h = xx**2
    y1 = h.sum()
    y2 = T([1.0, -1.0]) @ h
    (jh,) = jac([y1, y2], [h], retain_graph=True)
    (jx,) = jac([h], [xx], jac_outputs=[jh])
    out["doc3/x"] = np.array([1.0, 2.0])
    out["doc3/jac"] = N(jx)

    print("autojac checks (worked examples):")
    c = lambda k, e, a=1e-12: check(k, out[k], e, a)  # noqa: E731
    c("doc1/jac", [[-1, 1], [2, 4]])
    c("doc1/grad", [0.5, 2.5], 1e-9)
    c("doc1/weights", [0.5, 0.5], 1e-9)
    c("doc2/gramian", [[3, 0, -1], [0, 3, -3], [-1, -3, 122]])
    c("doc3/jac", [[2, 4], [2, -4]])
    print(
        f"  basic losses: step0 {out['basic/losses'][0]}, "
        f"step99 {out['basic/losses'][-1]}"
    )
    print(f"  mtl losses: step0 {out['mtl/losses'][0]}, step19 {out['mtl/losses'][-1]}")
    print(f"autojac built in {time.time() - t0:.1f}s")
    save("autojac.npz", out)


# --------------------------------------------------------------------------------------


PARTS = [
    "foundation",
    "zoo",
    "modern",
    "modern_sequences",
    "scalarization",
    "autojac",
]


def main(argv):
    parts = argv or PARTS
    torch.set_num_threads(2)
    Js, meta = build_matrices()
    t0 = time.time()
    for p in parts:
        t = time.time()
        if p == "foundation":
            foundation(Js, meta)
        else:
            globals()[p](Js)
        print(f"== {p} done in {time.time() - t:.1f}s")
    print(f"total {time.time() - t0:.1f}s")
    n_fail = sum(1 for _, _, ok in CHECKS if not ok)
    print(f"{len(CHECKS)} checks, {n_fail} failed")
    for label, err, ok in CHECKS:
        if not ok:
            print(f"  FAILED {label} err={err:.3e}")


if __name__ == "__main__":
    main(sys.argv[1:])
