"""Generate TorchJD 0.18.0 reference fixtures for eqxjd.

This is a standalone script. It imports torch, torchjd, numpy and quadprog, and must NEVER be
imported by the test-suite (tests only load the ``.npz`` files it writes, which contain both the
inputs and TorchJD's outputs, so tests never need torch).

Regenerate (CPU only, about 1-3 minutes on 2 cores)::

    python -m venv /tmp/tj && /tmp/tj/bin/pip install torch==2.13.0 'torchjd[full]==0.18.0' \
        && /tmp/tj/bin/python tests/reference/generate.py

Optionally pass part names (``foundation zoo modern scalarization autojac``) to regenerate only
some files. The key layout of every file is documented in ``tests/reference/README.md``.
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
    CAGrad,
    ConFIG,
    Constant,
    ConstantWeighting,
    CRMOGMWeighting,
    DualProj,
    DualProjWeighting,
    ExcessMTL,
    FairGrad,
    GradDrop,
    GradVac,
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
    AlignedMTL,
)

OUT = Path(__file__).resolve().parent
F64 = torch.float64
F32 = torch.float32
MAX_BYTES = 1_000_000


# --------------------------------------------------------------------------------------------
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
            assert np.array_equal(a, b, equal_nan=True), k
    print(f"[{fname}] {len(data)} keys, {size / 1e6:.3f} MB (reload OK)")
    if size >= MAX_BYTES:
        print(f"WARNING: {fname} is >= 1 MB")
    return size


def run_agg(agg, J):
    """Call aggregator `agg` on J once; return (w or None, d). Weights captured by a hook."""
    cap = []
    mod = None
    if isinstance(agg, GramianWeightedAggregator):
        mod = agg.gramian_weighting
    elif hasattr(agg, "weighting"):
        mod = agg.weighting
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
    print(f"  CHECK {'OK  ' if ok else 'FAIL'} {label}: max|err|={err:.2e} (atol {atol:g})")


def round32(a):
    """Round to float32-representable values (stored as float64): keeps files small."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


# --------------------------------------------------------------------------------------------
# matrix kinds (methods.md §8 semantics, numpy Generator)


def haar(rng, k):
    X = rng.standard_normal((k, k))
    Q, R = np.linalg.qr(X)
    return Q * np.sign(np.diag(R))


def complement(rng, vecs):
    """Orthonormal basis of the orthogonal complement of the orthonormal columns `vecs`."""
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


# --------------------------------------------------------------------------------------------
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
            out[f"qp0/{name}/V"] = N(QuadprogProjector(norm_eps=0.0, reg_eps=0.0)(U, gram(J)))
        except Exception as e:  # noqa: BLE001
            errors[f"errors/qp0/{name}"] = np.array(1, dtype=np.int64)
            print(f"  qp0 on {name} raised {type(e).__name__}: {e}")

    # preference vectors = arange(1, m+1)
    for name in ["5x7", "normal_4", "normal_5", "base", "krum"]:
        J = T(Js[name])
        m = J.shape[0]
        pref = torch.arange(1, m + 1, dtype=F64)
        for mid, A, W in [("upgrad_pref", UPGrad, UPGradWeighting), ("dualproj_pref", DualProj, DualProjWeighting)]:
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

    print("foundation checks (methods.md §9):")
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
    c("J/5x7", [[1.764052345967664, 0.4001572083672233, 0.9787379841057392, 2.240893199201458,
                 1.8675579901499675, -0.977277879876411, 0.9500884175255894]] + [list(r) for r in out["J/5x7"][1:]], 0)
    c("upgrad/5x7/d", [0.9165312994, 0.6849870014, 0.6194725098, 1.157813288, 0.7068130482,
                       -0.4273037019, -0.4375797466])
    c("upgrad/5x7/w", [0.2, 0.5897231645, 0.2207460623, 0.2528101517, 0.2542813742])
    mean57 = [0.848591236, 0.5928815305, 0.4592395929, 0.96553913, 0.2585495553, -0.601074769,
              -0.4032644762]
    c("dualproj/5x7/d", mean57)
    c("dualproj/5x7/w", [0.2] * 5)
    c("mean/5x7/d", mean57)
    c("mean/5x7/w", [0.2] * 5)
    c("sum/5x7/d", [4.24295618, 2.964407653, 2.296197964, 4.82769565, 1.292747777, -3.005373845,
                    -2.016322381])
    c("sum/5x7/w", [1] * 5)
    c("constant/5x7/d", [13.07129808, 11.99928113, 4.088249254, 12.88333664, -4.541083328,
                         -11.73843792, -8.953827144], 1e-7)
    c("constant/5x7/w", [1, 2, 3, 4, 5])
    c("upgrad/krum/d", [21.78351099, -123.5582759, 19.21658069], 1e-6)
    c("upgrad/krum/w", [2.088108311, 0.2, 0.2007808696, 4.036837458, 0.2])
    c("dualproj/krum/d", [21.2789313, -123.7129988, 18.29507118], 1e-6)
    c("dualproj/krum/w", [1.87086136, 0.2, 0.2, 3.808069941, 0.2])
    print(f"foundation built in {time.time() - t0:.1f}s")
    # Large matrices go to foundation_large.npz (same key layout) to keep each file < 1 MB.
    large = {k for k, J in Js.items() if J.shape[0] * (J.shape[0] + J.shape[1]) > LARGE_SIZE}
    small_out = {k: v for k, v in out.items() if not _key_in(k, large)}
    large_out = {k: v for k, v in out.items() if _key_in(k, large)}
    large_out["meta/names"] = np.array(sorted(large))
    save("foundation.npz", small_out)
    save("foundation_large.npz", large_out)


LARGE_SIZE = 15000  # m * (m + n) above which a matrix goes to foundation_large.npz


def _key_in(key, names):
    parts = key.split("/")
    return len(parts) >= 2 and parts[1] in names


# --------------------------------------------------------------------------------------------


PARTS = ["foundation", "zoo", "modern", "scalarization", "autojac"]


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
