"""llama.cpp as the oracle for whole-model numbers: teacher-forced logits under its default
settings and under the variants that define its own noise floor (refinfer.llama_oracle), and
the comparison of refinfer's intermediate tensors with those of llama.cpp's graph."""

from __future__ import annotations

import re

import numpy as np
import pytest

VARIANTS = ("default", "single_token", "flash_attn", "kv_f32")

# refinfer's taps (forward.py), in forward order: inp_embd, then these per layer, then the two
# final tensors. Each one is compared with the llama.cpp tensor of the same name.
LAYER_TAPS = ("attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "attn_out", "ffn_inp", "ffn_norm",
              "ffn_swiglu", "ffn_out", "l_out")
FINAL_TAPS = ("result_norm", "result_output")
# llama.cpp's name where it differs from refinfer's
LLAMA_CPP_NAME = {"inp_embd": "embd"}
# Tensors llama.cpp's eval callback names that refinfer computes inside an op and does not tap:
# the RMSNorm before its weight (norm-N, norm), Q/K/V views and reshapes of Qcur/Kcur/Vcur, the
# attention scores, probabilities and product before the heads are merged, and the gate and up
# projections before SwiGLU. Unnamed graph nodes (node_N) are left out as well.
LLAMA_CPP_ONLY_PER_LAYER = ("norm-{i}", "Qcur-{i} (view)", "Kcur-{i} (view)", "Vcur-{i} (reshaped)",
                            "Vcur-{i} (reshaped) (reshaped)", "kq-{i}", "kq_soft_max-{i}", "kqv-{i}",
                            "ffn_gate-{i}", "ffn_up-{i}")
LLAMA_CPP_ONLY = ("norm",)
# the permuted Q and attention product: the callback only reads contiguous tensors, and these
# are contiguous for a one-token batch only
LLAMA_CPP_ONE_TOKEN_PER_LAYER = ("Qcur-{i} (view) (permuted)", "kqv-{i} (permuted)")
# llama.cpp's qwen2 graph leaves the attention output projection unnamed (a node_N)
REFINFER_ONLY = {"qwen2": ("attn_out",)}
_UNNAMED = re.compile(r"node_\d+$")


def llama_logits(path, tokens, variant="default", n_ctx=None) -> np.ndarray:
    """float32[len(tokens), vocab] teacher-forced logits from llama.cpp."""
    pytest.importorskip("llama_cpp")
    from refinfer.llama_oracle import llama_logits as _logits
    return _logits(path, tokens, variant, n_ctx=n_ctx)


def noise_floor(path, tokens):
    """(default logits, {variant: compare_logits vs the default, 'worst': ...})."""
    pytest.importorskip("llama_cpp")
    from refinfer.llama_oracle import noise_floor as _floor
    return _floor(path, tokens)


def tap_names(n_layers: int) -> list:
    """Every name refinfer's forward pass taps, in order."""
    return ["inp_embd"] + [f"{t}-{i}" for i in range(n_layers) for t in LAYER_TAPS] + list(FINAL_TAPS)


def collect_taps():
    """(tap, dict): a tap for Model.logits / forward that copies every tensor into dict."""
    got = {}
    return (lambda name, a: got.__setitem__(name, np.array(a, np.float32))), got


def assert_taps_match(mine: dict, theirs: dict, context: str, *, n_layers: int, arch: str = "llama",
                      nmse_bounds: dict | None = None) -> dict:
    """refinfer's taps `mine` against llama.cpp's eval-callback tensors `theirs`.

    The names must be exactly tap_names(n_layers) on refinfer's side, and llama.cpp's must be
    those plus exactly the documented LLAMA_CPP_ONLY tensors. Then every tensor refinfer taps
    and llama.cpp names is compared: bit for bit when nmse_bounds is None, else by NMSE against
    nmse_bounds[name] if given, else nmse_bounds[kind] (kind: the name without its layer).
    Returns {name: nmse}."""
    only_mine = {f"{t}-{i}" for t in REFINFER_ONLY.get(arch, ()) for i in range(n_layers)}
    want_mine = tap_names(n_layers)
    assert list(mine) == want_mine, (
        f"{context}: refinfer's taps differ from forward.py's names: missing {sorted(set(want_mine) - set(mine))}, "
        f"unexpected {sorted(set(mine) - set(want_mine))}" + ("" if set(mine) != set(want_mine) else ", order differs"))
    one_token = {p.format(i=i) for p in LLAMA_CPP_ONE_TOKEN_PER_LAYER for i in range(n_layers)}
    named = {n for n in theirs if not _UNNAMED.match(n)}
    if mine["inp_embd"].shape[0] == 1:
        named -= one_token
    want_theirs = ({LLAMA_CPP_NAME.get(n, n) for n in want_mine if n not in only_mine}
                   | {p.format(i=i) for p in LLAMA_CPP_ONLY_PER_LAYER for i in range(n_layers)} | set(LLAMA_CPP_ONLY))
    assert named == want_theirs, (
        f"{context}: llama.cpp's tensors are not the documented set: missing {sorted(want_theirs - named)}, "
        f"unexpected {sorted(named - want_theirs)}")
    errors = {}
    for name in want_mine:
        if name in only_mine:
            continue
        a, b = mine[name].ravel(), theirs[LLAMA_CPP_NAME.get(name, name)].ravel()
        assert a.size == b.size, f"{context} {name}: {a.size} values vs llama.cpp's {b.size}"
        if nmse_bounds is None:
            bad = np.flatnonzero(a.view(np.uint32) != b.view(np.uint32))
            assert bad.size == 0, (f"{context} {name}: {bad.size} of {a.size} values differ, first at flat index "
                                   f"{bad[0]}: {a[bad[0]]!r} vs llama.cpp {b[bad[0]]!r}")
            errors[name] = 0.0
        else:
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            err = float(np.sum((a64 - b64) ** 2) / np.sum(b64 ** 2))
            bound = nmse_bounds.get(name, nmse_bounds.get(name.rsplit("-", 1)[0] if name[-1].isdigit() else name))
            assert err <= bound, f"{context} {name}: NMSE {err:.3g} > {bound:.3g}"
            errors[name] = err
    return errors


def refinfer_greedy(model, ids, n, prompt_logits=False):
    """Greedy decoding through the path Model.generate takes: one prefill of ids, then one
    one-token step through the KV cache for each of the n tokens chosen. -> (n token ids,
    logits float32[rows, vocab]): the prefill's rows (every prompt position with prompt_logits,
    else the last), then each step's row (n rows, the last one after the n-th token)."""
    from refinfer.forward import forward
    cache = model.new_cache(len(ids) + n + 1)
    z = forward(model.config, model.weights, model.backend, ids, cache, all_logits=prompt_logits)
    logits, toks = [z], []
    for _ in range(n):
        toks.append(int(np.argmax(z[-1])))
        z = forward(model.config, model.weights, model.backend, [toks[-1]], cache, all_logits=False)
        logits.append(z)
    return toks, np.concatenate(logits)
