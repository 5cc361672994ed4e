"""Bug or rounding, per tensor: the statistics behind `compare`'s verdicts.

Two correct engines differ by rounding: noise-like, of a size llama.cpp's own settings show
(refinfer/floor.py measures it). A bug is usually systematic: a scale, an offset, a wrong eps or
theta, a permuted head, one bad row. Three kinds of evidence, in order of strength:

1. Identities inside one dump, which need no weights (the last part of this module): the
   residual additions (exact in llama.cpp and refinfer), kq = Q.K^T, kqv_out = softmax(kq).V,
   and, between the two dumps, the RMSNorm weights each implies. A tensor that breaks one is
   corrupted whatever the other engine's rounding, and the pattern of broken identities names it.
2. The systematic part of a matmul output's difference (FIT_KINDS). For a reference A and test B
   with D = B - A, every position t (a row) gets its own least-squares fit

       D[t] ~ (s_t - 1) * A[t] + c_t          c_t in units of the median row RMS

   and the tensor's systematic part is the mean over positions, s - 1 = mean_t(s_t - 1) and
   c = mean_t(c_t). Per position, not one fit over the whole tensor, because rounding noise is
   not independent element by element: a row's RMSNorm turns noise in its denominator into a
   scale of the whole row, so legitimate differences have per-row scale deviations of up to 1%
   (SmolLM2 ffn_out-1 between llama.cpp's F16 and F32 KV caches: s_t - 1 from -1.2e-2 to
   +1.0e-2), and a pooled fit is dominated by the BOS row's massive activations. A scale bug
   adds the same shift at every position; rounding's shifts change sign from row to row.
3. The NMSE against the floor: beyond HARD_MULTIPLE (or a position beyond ROW_NMSE_BUG) is a
   bug whatever its structure; beyond SOFT_MULTIPLE and not systematic is `rounding?`.

Standard errors come from the spread over positions, not from least squares, because residuals
are correlated along positions (attention mixes them) and along the row: a moving-block
bootstrap over positions (fixed seed, so the report is reproducible), and, where a floor table
is given, the floor's own spread of s_t and c_t divided by sqrt(T). A fit is systematic only
when it is significant under both error models and larger than an absolute epsilon: rounding
has a systematic part of its own (between refinfer ideal and llama.cpp on SmolLM2 the fitted
scale reaches 0.64% at attn_out-9), so EPS_SCALE and EPS_OFFSET sit above it.

The number of tests a dump implies (tensors x {scale, offset} x heads) is corrected for by
Bonferroni at a family-wise error rate of ALPHA: the threshold is Student's t with T - 1 degrees
of freedom for the bootstrap z (its standard error is itself estimated from T positions), and
the normal quantile for the floor z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ALPHA = 1e-3             # family-wise rate of false `BUG?` verdicts the thresholds aim at
EPS_SCALE = 7e-3         # |s - 1| below this is never called systematic (0.7%)
EPS_OFFSET = 1e-2        # |c| below this (in median-row-RMS units) is never called systematic
HEAD_EPS_FACTOR = 2.0    # a single head's fit is noisier: its epsilons are this many times larger
SOFT_MULTIPLE = 4.0      # NMSE beyond this multiple of the floor: `rounding?` (exit 0, a warning)
HARD_MULTIPLE = 100.0    # NMSE beyond this multiple of the floor: `BUG?` whatever its structure
# The kinds whose systematic part is judged: matmul outputs (and swiglu, a function of two), which
# nothing else in a dump determines. kq-N and kqv_out-N are functions of the dump's own Q, K, V;
# the norms' weights are implied by their inputs; the residual sums are sums: for those the
# identities below are exact and complete checks, and their fitted parts, the largest rounding
# shows (kqv_out offsets of 1% of a row's RMS, kq head offsets of 2% between refinfer ideal and
# llama.cpp on SmolLM2), would only add false alarms. attn_out-N is o_proj of kqv_out-N and
# inherits its systematic part (scales of -1.4% and -0.8% on two wiki passages), so it is left
# to its residual identity and the floor's NMSE too.
FIT_KINDS = ("Qcur", "Kcur", "Vcur", "ffn_swiglu", "ffn_out", "result_output")
ROW_NMSE_BUG = 0.5       # a position whose difference holds half its energy is never rounding
                         # (the floor's worst position on SmolLM2: 0.029, at result_output)
BOOTSTRAP_SAMPLES = 400
BOOTSTRAP_SEED = 20260101
MIN_POSITIONS = 3        # fewer positions: no bootstrap (a floor's spread alone decides)


def position_axis(name: str) -> int:
    """kq-N is [heads, T, T]: positions (queries) on axis 1; every other tensor has them first."""
    return 1 if name.startswith("kq-") else 0


def head_axis(name: str):
    """Axis of attention heads after positions are moved first, or None: Qcur/Kcur/Vcur are
    [T, heads, hd], kq-N [T, heads, T] once positions lead."""
    if name.startswith(("Qcur-", "Kcur-", "Vcur-", "kq-")):
        return 1
    return None


def by_position(name: str, a: np.ndarray) -> np.ndarray:
    """float64 [T, ...] with positions first."""
    return np.moveaxis(np.asarray(a, dtype=np.float64), position_axis(name), 0)


# ---- per-position fits --------------------------------------------------------------------

@dataclass
class RowFits:
    scale: np.ndarray      # s_t - 1 per row (NaN where the row has no spread)
    offset: np.ndarray     # c_t, in the tensor's units (an offset bug is the same number in every row);
                           # structure() divides it by the tensor's RMS
    nmse: np.ndarray       # sum(D[t]^2) / sum(A[t]^2)


def row_fits(A: np.ndarray, D: np.ndarray) -> RowFits:
    """Least squares D[r] ~ k_r * A[r] + b_r for every row r of 2-D A, D over finite entries."""
    ok = np.isfinite(A) & np.isfinite(D)
    A, D = np.where(ok, A, 0.0), np.where(ok, D, 0.0)
    n = ok.sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ma, md = A.sum(1) / n, D.sum(1) / n
        ac = np.where(ok, A - ma[:, None], 0.0)
        dc = np.where(ok, D - md[:, None], 0.0)
        var = (ac * ac).sum(1)
        k = (ac * dc).sum(1) / var
        b = md - k * ma
        nmse = (D * D).sum(1) / (A * A).sum(1)
    bad = (n < 2) | ~(var > 1e-300 * np.maximum(n, 1))
    k[bad] = np.nan
    b[bad] = np.nan
    return RowFits(k, b, nmse)


def block_bootstrap_se(x: np.ndarray, samples=BOOTSTRAP_SAMPLES, seed=BOOTSTRAP_SEED) -> float:
    """Standard error of mean(x) over positions by a moving-block bootstrap: blocks of
    ceil(T^(1/3)) consecutive positions drawn with replacement, so that neighbouring positions'
    correlation is kept inside a block."""
    x = x[np.isfinite(x)]
    T = len(x)
    if T < MIN_POSITIONS:
        return math.nan
    L = max(1, math.ceil(T ** (1 / 3)))
    n_blocks = math.ceil(T / L)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, T - L + 1, size=(samples, n_blocks))
    idx = (starts[:, :, None] + np.arange(L)).reshape(samples, -1)[:, :T]
    return float(x[idx].mean(axis=1).std(ddof=1))


# ---- thresholds ---------------------------------------------------------------------------

def _betacf(a, b, x):
    # continued fraction of the regularised incomplete beta function (Lentz's method)
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        de = d * c
        h *= de
        if abs(de - 1.0) < 1e-15:
            break
    return h


def t_tail(t: float, df: float) -> float:
    """P(|T| > t) for Student's t with df degrees of freedom (df = inf: the normal)."""
    t = abs(t)
    if math.isinf(df):
        return math.erfc(t / math.sqrt(2))
    x = df / (df + t * t)
    a, b = df / 2, 0.5
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def critical_z(p_two_sided: float, df: float = math.inf) -> float:
    """The |t| whose two-sided tail is p (bisection on t_tail)."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_tail(mid, df) > p_two_sided:
            lo = mid
        else:
            hi = mid
    return hi


# ---- one tensor -----------------------------------------------------------------------------

@dataclass
class Systematic:
    """A fitted scale or offset with its z-scores under the two error models."""
    value: float          # s - 1, or c in row-RMS units
    se_boot: float        # NaN when there are too few positions
    se_floor: float       # NaN without a floor table
    z_boot: float
    z_floor: float
    significant: bool

    def z(self) -> float:
        """The z the report prints: the smaller in magnitude of the two (both must pass)."""
        zs = [z for z in (self.z_boot, self.z_floor) if math.isfinite(z)]
        return min(zs, key=abs) if zs else math.nan


@dataclass
class Structure:
    scale: Systematic
    offset: Systematic
    worst_position: int
    worst_position_nmse: float
    worst_head: int | None = None
    worst_head_nmse: float = math.nan
    heads: list = field(default_factory=list)   # [(head, Systematic scale, Systematic offset)] flagged ones


def _z(value: float, se: float) -> float:
    """value / se; a zero se with a nonzero value (every position shifted exactly alike) is an
    infinite z, an unknown se (NaN) an unknown z."""
    if math.isnan(se):
        return math.nan
    if se > 0:
        return value / se
    return math.copysign(math.inf, value) if value else 0.0


def _systematic(x, floor_sigma, z_boot_crit, z_floor_crit, eps) -> Systematic:
    x = x[np.isfinite(x)]
    T = len(x)
    value = float(x.mean()) if T else 0.0
    se_b = block_bootstrap_se(x)
    se_f = floor_sigma / math.sqrt(T) if (floor_sigma is not None and T) else math.nan
    z_b, z_f = _z(value, se_b), _z(value, se_f)
    known = [(z, crit) for z, crit in ((z_b, z_boot_crit), (z_f, z_floor_crit)) if not math.isnan(z)]
    significant = bool(known) and abs(value) > eps and all(abs(z) > crit for z, crit in known)
    return Systematic(value, se_b, se_f, z_b, z_f, significant)


def structure(name: str, a: np.ndarray, b: np.ndarray, n_tests: int, floor: dict | None = None) -> Structure:
    """The systematic part of b - a (b the test tensor, a the reference): tensor-wide scale and
    offset, and per head for tensors with heads; the worst position and head by NMSE. n_tests is
    the number of tests the whole comparison makes (the Bonferroni factor); floor, the tensor's
    entry of a floor table (sigma_scale, sigma_offset), or None."""
    A = by_position(name, a)
    B = by_position(name, b)
    T = A.shape[0]
    p = ALPHA / max(1, n_tests)
    z_boot_crit = critical_z(p, df=max(1, T - 1))
    z_floor_crit = critical_z(p)
    fs = floor.get("sigma_scale") if floor else None
    fo = floor.get("sigma_offset") if floor else None
    rf = row_fits(A.reshape(T, -1), (B - A).reshape(T, -1))
    rms = _rms(A)
    rf.offset = rf.offset / rms if rms else rf.offset
    scale = _systematic(rf.scale, fs, z_boot_crit, z_floor_crit, EPS_SCALE)
    offset = _systematic(rf.offset, fo, z_boot_crit, z_floor_crit, EPS_OFFSET)
    nm = np.where(np.isfinite(rf.nmse), rf.nmse, -1.0)
    wp = int(np.argmax(nm)) if T else 0
    out = Structure(scale, offset, wp, float(rf.nmse[wp]) if T else math.nan)
    hax = head_axis(name)
    if hax is not None and A.ndim >= 3 and A.shape[hax] > 1:
        H = A.shape[hax]
        head_nmse = []
        for h in range(H):
            Ah = np.take(A, h, axis=hax).reshape(T, -1)
            Dh = (np.take(B, h, axis=hax) - np.take(A, h, axis=hax)).reshape(T, -1)
            ok = np.isfinite(Ah) & np.isfinite(Dh)
            den = float(np.sum(np.where(ok, Ah, 0.0) ** 2))
            head_nmse.append(float(np.sum(np.where(ok, Dh, 0.0) ** 2)) / den if den else math.nan)
            hf = row_fits(Ah, Dh)
            hf.offset = hf.offset / rms if rms else hf.offset
            hs = _systematic(hf.scale, fs, z_boot_crit, z_floor_crit, HEAD_EPS_FACTOR * EPS_SCALE)
            ho = _systematic(hf.offset, fo, z_boot_crit, z_floor_crit, HEAD_EPS_FACTOR * EPS_OFFSET)
            if hs.significant or ho.significant:
                out.heads.append((h, hs, ho))
        hn = np.where(np.isfinite(head_nmse), head_nmse, -1.0)
        out.worst_head = int(np.argmax(hn))
        out.worst_head_nmse = float(head_nmse[out.worst_head])
    return out


def _rms(A: np.ndarray) -> float:
    """The median over positions of a row's RMS: the unit of offsets. Not the tensor's RMS,
    which the BOS row's massive activations dominate (SmolLM2 l_out: 950 there, about 8 elsewhere)."""
    T = A.shape[0]
    f = np.where(np.isfinite(A), A, np.nan).reshape(T, -1)
    with np.errstate(invalid="ignore"):
        r = np.sqrt(np.nanmean(f * f, axis=1))
    r = r[np.isfinite(r)]
    return float(np.median(r)) if r.size else 0.0


def n_tests_for(names_shapes) -> int:
    """The Bonferroni factor of a comparison: a scale and an offset test per tensor, and per
    head of the tensors with heads."""
    n = 0
    for name, shape in names_shapes:
        n += 2
        hax = head_axis(name)
        if hax is not None and len(shape) >= 3:
            heads = shape[0] if name.startswith("kq-") else shape[1]
            n += 2 * heads
    return n


def row_sigmas(name: str, a: np.ndarray, b: np.ndarray) -> tuple:
    """(std over positions of s_t - 1, of c_t, max row NMSE) of b against a: what a floor table
    records of a legitimate difference."""
    A = by_position(name, a)
    T = A.shape[0]
    rf = row_fits(A.reshape(T, -1), (by_position(name, b) - A).reshape(T, -1))
    rms = _rms(A)
    s, c = rf.scale[np.isfinite(rf.scale)], rf.offset[np.isfinite(rf.offset)] / (rms or 1.0)
    sd = lambda x: float(np.sqrt(np.mean(x * x))) if len(x) else 0.0   # noqa: E731  (RMS about 0: rounding is unbiased)
    rn = rf.nmse[np.isfinite(rf.nmse)]
    return sd(s), sd(c), float(rn.max()) if len(rn) else 0.0


# ---- a whole comparison -----------------------------------------------------------------------

TIGHT_NMSE = 1e-10       # two refinfer dumps in the same mode: the backend-equivalence tolerance

OK, ROUNDING, BUG = "ok", "rounding?", "BUG?"


@dataclass
class TensorVerdict:
    name: str
    shape: tuple
    nmse: float
    max_abs: float
    cos: float
    floor_nmse: float            # NaN when the comparison uses no floor
    verdict: str
    why: str = ""
    structure: Structure | None = None
    alternatives: list | None = None   # other tensors the same evidence could blame (Qcur or Kcur)

    @property
    def ratio(self) -> float:
        if not math.isfinite(self.floor_nmse) or self.floor_nmse <= 0:
            return math.nan
        return self.nmse / self.floor_nmse


def _where(st: Structure) -> str:
    out = f"worst position {st.worst_position} (nmse {st.worst_position_nmse:.2g})"
    if st.worst_head is not None:
        out += f", worst head {st.worst_head} (nmse {st.worst_head_nmse:.2g})"
    return out


def judge(name, a, b, *, floor_entry=None, n_tests=1, method="floor") -> TensorVerdict:
    """The verdict on test tensor b against reference a. method: "floor" (NMSE against the
    floor's multiples, and the systematic fit), "tight" (NMSE <= TIGHT_NMSE), "strict" (any
    difference)."""
    from .dump import diff_tensor
    d = diff_tensor(name, a, b, {})        # no limits: not ok only for a shape or non-finite mismatch
    nmse, max_abs, cos, shape = d.nmse, d.max_abs, d.cos, tuple(a.shape)
    if not d.ok:
        return TensorVerdict(name, shape, nmse, max_abs, cos, math.nan, BUG, d.why)
    b = b.reshape(a.shape)
    if method == "strict":
        same = np.array_equal(a.view(np.uint32), b.view(np.uint32)) if a.dtype == b.dtype == np.float32 else np.array_equal(a, b)
        st = None if same else structure(name, a, b, n_tests)
        return TensorVerdict(name, shape, nmse, max_abs, cos, math.nan, OK if same else BUG,
                             "" if same else f"bits differ (--strict): {_where(st)}", st)
    if method == "tight":
        if nmse <= TIGHT_NMSE:
            return TensorVerdict(name, shape, nmse, max_abs, cos, math.nan, OK)
        st = structure(name, a, b, n_tests)
        return TensorVerdict(name, shape, nmse, max_abs, cos, math.nan, BUG,
                             f"nmse {nmse:.3g} > {TIGHT_NMSE:g} (the tight tolerance); {_where(st)}", st)
    st = structure(name, a, b, n_tests, floor_entry)
    floor_nmse = floor_entry["floor_nmse"] if floor_entry else math.nan
    why = []
    fitted = name.split("-")[0] in FIT_KINDS
    if floor_entry and nmse > HARD_MULTIPLE * floor_nmse:
        why.append(f"nmse {nmse / floor_nmse:.3g}x the floor (> {HARD_MULTIPLE:g}x)")
    row_floor = floor_entry.get("floor_row_nmse") if floor_entry else None
    if row_floor and st.worst_position_nmse > min(HARD_MULTIPLE * row_floor, ROW_NMSE_BUG):
        why.append(f"position {st.worst_position}: nmse {st.worst_position_nmse:.3g} (the floor's worst position: "
                   f"{row_floor:.3g})")
    for label, fit, unit in (("scale", st.scale, "s-1"), ("offset", st.offset, "c/rms")):
        if fit.significant and fitted:
            why.append(f"systematic {label}: {unit} = {fit.value:+.3g} (z {fit.z():+.1f})")
    for h, hs, ho in (st.heads if fitted else ()):
        for label, fit in (("scale", hs), ("offset", ho)):
            if fit.significant:
                why.append(f"head {h} systematic {label}: {fit.value:+.3g} (z {fit.z():+.1f})")
                break
    if why:
        return TensorVerdict(name, shape, nmse, max_abs, cos, floor_nmse, BUG, "; ".join(why) + "; " + _where(st), st)
    if floor_entry and nmse > SOFT_MULTIPLE * floor_nmse:
        return TensorVerdict(name, shape, nmse, max_abs, cos, floor_nmse, ROUNDING,
                             f"nmse {nmse / floor_nmse:.3g}x the floor, not systematic; {_where(st)}", st)
    return TensorVerdict(name, shape, nmse, max_abs, cos, floor_nmse, OK, "", st)


# ---- within one dump: identities between its tensors ----------------------------------------
#
# Some tensors of a dump are functions of others that need no weights. An engine that computes
# them keeps the identity to its own rounding, whatever the other engine does; a corrupted
# tensor breaks it by far more. Each check returns the largest violation in units of its
# tolerance (<= 1: holds). Where an engine may round an input to F16 first (llama.cpp's F16 KV
# cache and F16 matmul inputs), both forms are tried and the better one counts.

IDENTITY_ULPS = 4        # residual additions: |x - (a + b)| <= this many float32 eps of |a| + |b|
F16_UNITS = 4            # attention output: this many F16 half-ulps (2^-11) of sum_s p_s |V_s|
F32 = np.float32


def _residual(tensors, total, a_name, b_name) -> float:
    x = np.asarray(tensors[total], F32)
    a = np.asarray(tensors[a_name], F32).reshape(x.shape).astype(np.float64)
    b = np.asarray(tensors[b_name], F32).reshape(x.shape).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        r = np.abs(x - (a + b)) / (IDENTITY_ULPS * np.finfo(F32).eps * (np.abs(a) + np.abs(b)) + 1e-30)
    r = r[np.isfinite(r)]
    return float(r.max()) if r.size else 0.0


def _qk(tensors, n):
    q, k = np.asarray(tensors[f"Qcur-{n}"], F32), np.asarray(tensors[f"Kcur-{n}"], F32)
    T = q.shape[0]
    if q.ndim != 3 or k.ndim != 3 or k.shape[0] != T or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        return None
    return q, k


def _kq(tensors, n, constant=False) -> float:
    """kq-N = Qcur-N . Kcur-N^T (before scale and mask), to hd float32 eps of sum |q||k|. With
    constant, the violation left once its mean is taken out: an offset of kq itself leaves
    nothing, an error in Qcur or Kcur does (it varies with the key)."""
    qk = _qk(tensors, n)
    if qk is None:
        return 0.0
    q, k = qk
    kq = np.asarray(tensors[f"kq-{n}"], F32).astype(np.float64)
    group = q.shape[1] // k.shape[1]
    best = math.inf
    for dt in (F32, np.float16):
        qq = q.astype(dt).astype(np.float64)
        kk = np.repeat(k.astype(dt).astype(np.float64), group, axis=1)
        if kq.shape != (q.shape[1], q.shape[0], q.shape[0]):
            return 0.0
        # contiguous copies: numpy's stacked matmul on strided views skips BLAS (100x slower)
        qh = np.ascontiguousarray(qq.transpose(1, 0, 2))                    # [H, T, hd]
        kh = np.ascontiguousarray(kk.transpose(1, 2, 0))                    # [H, hd, T]
        hat = qh @ kh                                                       # [H, T, T]
        tol = q.shape[2] * np.finfo(F32).eps * (np.abs(qh) @ np.abs(kh)) + 1e-30
        err = kq - hat
        if constant:
            err = err - err.mean()
        best = min(best, float(np.max(np.abs(err) / tol)))
    return best


def _kqv(tensors, n) -> float:
    """kqv_out-N = softmax(kq-N / sqrt(hd), causal) . Vcur-N, to F16_UNITS half-ulps of F16."""
    qk = _qk(tensors, n)
    if qk is None or f"Vcur-{n}" not in tensors:
        return 0.0
    q, _ = qk
    T, H, hd = q.shape
    v = np.asarray(tensors[f"Vcur-{n}"], F32)
    kq = np.asarray(tensors[f"kq-{n}"], F32).astype(np.float64)
    out = np.asarray(tensors[f"kqv_out-{n}"], F32).reshape(T, -1).astype(np.float64)
    if v.ndim != 3 or H % v.shape[1] or kq.shape != (H, T, T) or out.shape[1] != H * v.shape[2]:
        return 0.0
    z = np.where(np.triu(np.ones((T, T), bool), 1)[None], -np.inf, kq / math.sqrt(hd))
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    group = H // v.shape[1]
    best = math.inf
    for dt in (F32, np.float16):
        pp = p.astype(dt).astype(np.float64)
        vv = np.repeat(v.astype(dt).astype(np.float64), group, axis=1)
        vh = np.ascontiguousarray(vv.transpose(1, 0, 2))                    # [H, T, hd]
        hat = (pp @ vh).transpose(1, 0, 2).reshape(T, -1)
        tol = F16_UNITS * 2.0 ** -11 * (pp @ np.abs(vh)).transpose(1, 0, 2).reshape(T, -1) + 1e-30
        best = min(best, float(np.max(np.abs(out - hat) / tol)))
    return best


def identities(tensors: dict):
    """[(label, members, check)] of the identities this dump's names allow; check() -> violation."""
    out = []
    n = 0
    while f"l_out-{n}" in tensors or f"ffn_inp-{n}" in tensors or f"kq-{n}" in tensors:
        prev = "inp_embd" if n == 0 else f"l_out-{n - 1}"
        out.append((f"ffn_inp-{n} = attn_out-{n} + {prev}", (f"ffn_inp-{n}", f"attn_out-{n}", prev),
                    lambda n=n, prev=prev: _residual(tensors, f"ffn_inp-{n}", f"attn_out-{n}", prev)))
        out.append((f"l_out-{n} = ffn_out-{n} + ffn_inp-{n}", (f"l_out-{n}", f"ffn_out-{n}", f"ffn_inp-{n}"),
                    lambda n=n: _residual(tensors, f"l_out-{n}", f"ffn_out-{n}", f"ffn_inp-{n}")))
        out.append((f"kq-{n} = Qcur-{n} . Kcur-{n}", (f"kq-{n}", f"Qcur-{n}", f"Kcur-{n}"), lambda n=n: _kq(tensors, n)))
        out.append((f"kqv_out-{n} = softmax(kq-{n}) . Vcur-{n}", (f"kqv_out-{n}", f"kq-{n}", f"Vcur-{n}"),
                    lambda n=n: _kqv(tensors, n)))
        n += 1
    return [(label, members, check) for label, members, check in out if all(m in tensors for m in members)]


def broken_identities(tensors: dict, scope=None) -> tuple:
    """({label: (members, violation)} of the identities this dump breaks, the set of members of
    those it keeps). With scope (a set of names), only identities with a member in scope are
    checked and the others count as kept: for a dump known to differ from a checked one only
    there."""
    broken, intact = {}, set()
    for label, members, check in identities(tensors):
        if scope is not None and not scope.intersection(members):
            intact.update(members)
            continue
        r = check()
        if r > 1:
            broken[label] = (members, r)
        else:
            intact.update(members)
    return broken, intact


def identity_suspects(tensors: dict, other: dict | None = None, scope=None) -> dict:
    """{label: (candidate tensors, reason)} for the identities this dump breaks and, when other
    (the other dump's tensors) is given, the other dump keeps: an identity both break is not one
    these engines share (another attention scale, say). A broken identity's candidates are its
    members that no kept identity contains and that the most broken ones share: a corrupted
    ffn_inp-N breaks both additions it is in, an l_out-N its own and the next layer's, a kq-N its
    own and the attention output's. Where the dump alone cannot tell (Qcur or Kcur; Vcur or
    kqv_out; the last layer's l_out or ffn_out), several are named."""
    broken, intact = broken_identities(tensors, scope)
    if other is not None and broken:
        other_broken, _ = broken_identities(other, scope)
        broken = {k: v for k, v in broken.items() if k not in other_broken}
    count = {}
    for members, _ in broken.values():
        for m in members:
            count[m] = count.get(m, 0) + 1
    out = {}
    for label, (members, r) in broken.items():
        cands = [m for m in members if m not in intact]
        kq = members[0]
        if kq.startswith("kq-") and kq in intact and _kq(tensors, int(kq[3:]), constant=True) <= 1:
            cands = [kq]   # a constant offset of kq: softmax cannot see it, so the attention output holds
        if not cands:
            continue
        best = max(count[m] for m in cands)
        out[label] = ([m for m in cands if count[m] == best], f"breaks {label} (by {r:.3g}x its rounding tolerance)")
    return out


# ---- between the two dumps: the RMSNorm weights they imply -------------------------------------
#
# y = x / rms(x) * w: with u = x / sqrt(mean(x^2) + eps), each dump implies w_i = sum_t y_ti u_ti /
# sum_t u_ti^2 from its own x and y. Both engines multiply by the same weights, so the two w
# agree to float rounding (refinfer ideal and llama.cpp on SmolLM2: 5.7e-8 relative at most),
# while a scale, an offset or a bad row of the norm's output, or a wrong eps, moves them.

NORM_EPS = 1e-5          # the eps the implied weights assume (Llama's; both dumps get the same)
NORM_RTOL = 1e-6         # |w_test - w_ref| <= this times |w_ref| + 1e-3 rms(w_ref)


def norm_pairs(tensors: dict):
    """[(norm output, its input)] of the RMSNorms a dump's names show."""
    out = []
    n = 0
    while f"attn_norm-{n}" in tensors or f"ffn_norm-{n}" in tensors:
        out.append((f"attn_norm-{n}", "inp_embd" if n == 0 else f"l_out-{n - 1}"))
        out.append((f"ffn_norm-{n}", f"ffn_inp-{n}"))
        n += 1
    if n:
        out.append(("result_norm", f"l_out-{n - 1}"))
    return [(y, x) for y, x in out if y in tensors and x in tensors]


def implied_norm_weight(tensors: dict, y_name: str, x_name: str) -> np.ndarray:
    x = np.asarray(tensors[x_name], np.float64)
    y = np.asarray(tensors[y_name], np.float64).reshape(x.shape)
    u = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + NORM_EPS)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (y * u).sum(axis=0) / (u * u).sum(axis=0)


def norm_weight_mismatches(ref: dict, test: dict, scope=None) -> dict:
    """{norm output: violation in units of NORM_RTOL} where the two dumps imply different weights."""
    out = {}
    for y, x in norm_pairs(ref):
        if y not in test or x not in test or (scope is not None and not scope.intersection((y, x))):
            continue
        if np.shape(ref[x]) != np.shape(test[x]) or np.ndim(ref[x]) != 2:
            continue
        wr, wt = implied_norm_weight(ref, y, x), implied_norm_weight(test, y, x)
        ok = np.isfinite(wr) & np.isfinite(wt)
        if not ok.any():
            continue
        scale = float(np.sqrt(np.mean(wr[ok] ** 2)))
        r = float(np.max(np.abs(wt[ok] - wr[ok]) / (NORM_RTOL * (np.abs(wr[ok]) + 1e-3 * scale) + 1e-300)))
        if r > 1:
            out[y] = r
    return out


def related(name: str, tensors: dict) -> set:
    """name and every tensor an identity or a norm pair ties it to: the verdicts that a change
    to name alone can move."""
    out = {name}
    for _, members, _ in identities(tensors):
        if name in members:
            out.update(members)
    for y, x in norm_pairs(tensors):
        if name in (y, x):
            out.update((y, x))
    return out


def compare_tensors(ref: dict, test: dict, lookup=lambda name: None, method="floor", scope=None, only=None) -> list:
    """TensorVerdicts of test against ref for their common names, in forward order. lookup(name)
    gives a tensor's effective floor entry (floor.effective) or None. In floor mode the broken
    identities of either dump (identity_suspects) blame their candidates: where an identity
    leaves several (Qcur or Kcur), those with evidence of their own against the floor are
    blamed; without any, all are, and the verdict names them. scope: see broken_identities."""
    # one BLAS thread: the identities' matmuls are small, and OpenBLAS's spinning threads made
    # them 18x slower on a busy 2-core machine (26 s against 1.5 s for SmolLM2's 30 layers)
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):
        return _compare_tensors(ref, test, lookup, method, scope, only)


def _compare_tensors(ref, test, lookup, method, scope, only) -> list:
    from .dump import forward_key
    names = sorted(set(ref) & set(test), key=forward_key)
    n_tests = n_tests_for([(n, np.shape(ref[n])) for n in names])
    if only is not None:   # judge these alone (scope defaults to them); the Bonferroni factor stays the whole's
        names = [n for n in names if n in only]
        scope = set(only) if scope is None else scope
    verdicts = [judge(n, np.asarray(ref[n]), np.asarray(test[n]), floor_entry=lookup(n), n_tests=n_tests, method=method)
                for n in names]
    if method != "floor":
        return verdicts
    by_name = {v.name: v for v in verdicts}
    blamed = set()
    for side, d, other in (("test", test, ref), ("reference", ref, test)):
        for label, (cands, why) in identity_suspects(d, other, scope).items():
            cands = [c for c in cands if c in by_name]
            marked = [c for c in cands if by_name[c].verdict != OK] or cands
            for c in marked:
                v = by_name[c]
                v.why = f"the {side} dump {why}" + ("; " + v.why if v.why else "")
                v.verdict = BUG
                v.alternatives = marked if len(marked) > 1 else None
                blamed.add(c)
    inputs = dict(norm_pairs(ref))
    for y, r in norm_weight_mismatches(ref, test, scope).items():
        if y in by_name and inputs[y] not in blamed:   # a corrupted input explains it already
            v = by_name[y]
            v.why = f"the dumps imply different {y} weights (by {r:.3g}x rounding)" + ("; " + v.why if v.why else "")
            v.verdict = BUG
    return verdicts
