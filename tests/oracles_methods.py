"""The quantizers' oracles, loaded from the installed libraries' own source files.

AutoGPTQ 0.7.1's and AutoAWQ 0.2.9's package __init__ files do not import with transformers 5 and
without `datasets` (and pull CUDA extensions), so the few files the tests need are loaded by path,
with empty modules standing in for the imports those files make but never use here:
- AutoGPTQ quantization/quantizer.py (Quantizer) and quantization/gptq.py (GPTQ); gptq.py calls
  torch.cuda.synchronize() at the end of fasterquant, which CPU torch refuses, so that one function
  is replaced by a no-op (it does no arithmetic);
- AutoAWQ quantize/quantizer.py (AwqQuantizer), quantize/scale.py (apply_scale, apply_clip),
  utils/module.py, utils/utils.py; AwqQuantizer's methods are called on small nn.Modules, without
  its __init__ (which would fetch calibration data).
- compressed-tensors 0.20 imports normally.
Their arithmetic is never patched.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import sys
import types

import numpy as np

from ci_skips import oracle_import, oracle_skip


def _site(package: str) -> pathlib.Path:
    """The installed package's directory; also when tests/oracles_w4a16.py has already put a stub
    package (no __spec__) for it in sys.modules, which find_spec refuses."""
    mod = sys.modules.get(package)
    if getattr(mod, "__path__", None):
        return pathlib.Path(list(mod.__path__)[0])
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        oracle_skip(f"{package} is not installed (pip install --no-deps -r requirements-oracles.txt)")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _package(name: str, path: pathlib.Path | None = None):
    """An empty package module named name, searching path for its submodules (so that the other
    oracle loader's `import name.sub` still finds the real files); an existing one is reused."""
    if name not in sys.modules:
        mod = types.ModuleType(name)
        mod.__path__ = []
        sys.modules[name] = mod
    mod = sys.modules[name]
    if path and not getattr(mod, "__path__", None):
        mod.__path__ = [str(path)]
    return mod


@functools.cache
def autogptq():
    """(Quantizer module, GPTQ module) of AutoGPTQ 0.7.1."""
    torch = oracle_import("torch")
    oracle_import("transformers")
    root = _site("auto_gptq")
    prefix = "_oracle_auto_gptq"
    _package(prefix, root)
    _package(prefix + ".quantization", root / "quantization")
    quantizer = _load(prefix + ".quantization.quantizer", root / "quantization" / "quantizer.py")
    gptq = _load(prefix + ".quantization.gptq", root / "quantization" / "gptq.py")
    if not torch.cuda.is_available():
        # fasterquant ends with torch.cuda.synchronize(), which CPU torch refuses: no arithmetic.
        gptq.torch = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
        gptq.torch.cuda = types.SimpleNamespace(synchronize=lambda: None, empty_cache=lambda: None)
    return quantizer, gptq


@functools.cache
def autoawq():
    """AutoAWQ 0.2.9's quantize/quantizer.py module (AwqQuantizer) and quantize/scale.py."""
    oracle_import("torch")
    oracle_import("transformers")
    oracle_import("accelerate")
    root = _site("awq")
    # The real package names: quantizer.py imports `awq.…` absolutely.
    for name, sub in [("awq", ""), ("awq.utils", "utils"), ("awq.quantize", "quantize"), ("awq.modules", "modules")]:
        _package(name, root / sub if sub else root)
    _load("awq.utils.module", root / "utils" / "module.py")
    _load("awq.utils.utils", root / "utils" / "utils.py")
    _load("awq.utils.packing_utils", root / "utils" / "packing_utils.py")
    _load("awq.modules.act", root / "modules" / "act.py")
    calib = _package("awq.utils.calib_data")
    calib.get_calib_dataset = None          # only AwqQuantizer.__init__ (not used) reads calibration data
    linear = _package("awq.modules.linear", root / "modules" / "linear")
    for cls in ("WQLinear_GEMM", "WQLinear_GEMV", "WQLinear_Marlin", "WQLinear_GEMVFast"):
        setattr(linear, cls, None)          # packers: only _apply_quant (not used) builds them
    scale = _load("awq.quantize.scale", root / "quantize" / "scale.py")
    quantizer = _load("awq.quantize.quantizer", root / "quantize" / "quantizer.py")
    return quantizer, scale


def awq_quantizer(*, w_bit=4, group_size=128, zero_point=True, duo_scaling=True):
    """An AwqQuantizer with the attributes its search methods read, without its __init__."""
    quantizer, _ = autoawq()
    q = object.__new__(quantizer.AwqQuantizer)
    q.w_bit, q.group_size, q.zero_point, q.duo_scaling = w_bit, group_size, zero_point, duo_scaling
    q.n_parallel_calib_samples = None
    q.max_chunk_memory = 1024 * 1024 * 1024
    q.modules_to_not_convert = []
    return q


def compressed_tensors():
    """(calculate_qparams, QuantizationArgs, quantize) from compressed-tensors 0.20."""
    oracle_import("torch")
    helpers = oracle_import("compressed_tensors.quantization.utils.helpers")
    qa = oracle_import("compressed_tensors.quantization.quant_args")
    fwd = oracle_import("compressed_tensors.quantization.lifecycle.forward")
    return helpers.calculate_qparams, qa.QuantizationArgs, fwd.quantize


def autogptq_fasterquant(W, H, *, bits, group_size, sym, actorder, static_groups, percdamp=0.01):
    """Run AutoGPTQ's GPTQ.fasterquant on weight W [N, K] with Hessian H (float32 numpy) and return
    its outputs plus the Hinv and perm it computed (observed, not altered):
    dict(scale [N, G], zero [N, G], g_idx [K], Q [N, K], codes [N, K], Hinv, perm)."""
    torch = oracle_import("torch")
    quantizer, gptq = autogptq()
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer.weight.data = torch.from_numpy(W.copy())
    g = gptq.GPTQ(layer)
    g.H = torch.from_numpy(H.copy())
    g.nsamples = 1          # read only by its log line
    g.quantizer.configure(bits, perchannel=True, sym=sym, mse=False)
    seen = {}

    def cholesky(A, upper=False):
        out = torch.linalg.cholesky(A, upper=upper)
        if upper:
            seen["Hinv"] = out.clone()
        return out

    def argsort(x, descending=False):
        out = torch.argsort(x, descending=descending)
        seen.setdefault("perm", out.clone())     # the second call is invperm = argsort(perm)
        return out

    saved = gptq.torch
    gptq.torch = types.SimpleNamespace(**vars(saved))
    gptq.torch.linalg = types.SimpleNamespace(cholesky=cholesky)
    gptq.torch.argsort = argsort
    try:
        scale, zero, g_idx = g.fasterquant(percdamp=percdamp, group_size=group_size, actorder=actorder,
                                           static_groups=static_groups)
    finally:
        gptq.torch = saved
    scale, zero, g_idx = scale.numpy(), zero.numpy(), g_idx.numpy()
    Q = layer.weight.data.numpy()
    codes = np.rint(Q / scale[:, g_idx]) + zero[:, g_idx]     # Q = s (c - z): exact recovery
    perm = seen["perm"].numpy() if actorder else None
    return dict(scale=scale, zero=zero, g_idx=g_idx, Q=Q, codes=codes, Hinv=seen["Hinv"].numpy(), perm=perm)


def autogptq_hessian(X_per_seq):
    """GPTQ.add_batch over the sequences (one call each, as AutoGPTQ's layer loop does)."""
    torch = oracle_import("torch")
    _, gptq = autogptq()
    K = X_per_seq[0].shape[-1]
    layer = torch.nn.Linear(K, 1, bias=False)
    g = gptq.GPTQ(layer)
    for x in X_per_seq:
        g.add_batch(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None], None)
    return g.H.numpy().copy()


def trace_mismatches(codes, ref_codes, margin, order=None):
    """Rows where codes differ from the oracle's, and for each the margin (distance of w/s from its
    rounding boundary) of its first differing code in processing order (order: the column order
    the quantizer walked, act-order's perm; default 0..K-1). GPTQ's rows never interact, so a
    flip at a near-tie explains every later difference in its row.
    -> (rows with a difference, list of first-difference margins)."""
    K = codes.shape[1]
    order = np.arange(K) if order is None else np.asarray(order)
    diff = codes[:, order] != ref_codes[:, order]
    rows = np.flatnonzero(diff.any(axis=1))
    first = diff[rows].argmax(axis=1)
    return rows, [float(margin[r, order[f]]) for r, f in zip(rows, first)]
