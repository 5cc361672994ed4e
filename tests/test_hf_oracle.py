"""refinfer's ideal mode against HF transformers 5.23 in float32 on the CPU: every dump tensor
(refinfer.hf_oracle.capture_transformers) and the logits, on generated Llama and Qwen2
checkpoints with GQA, tied and untied embeddings, llama3 rope scaling and qwen2's q/k/v biases;
RoPE at long context, where transformers' float32 angles differ from refinfer's float64 ones
by a predictable amount; negative controls that show each check can fail."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ci_skips import oracle_import
from hf_models import LLAMA3_SCALING, make_hf_checkpoint

import refinfer
from refinfer.dump import capture_refinfer, forward_key
from refinfer.errors import RefinferError
from refinfer.metrics import nmse

oracle_import("torch")
oracle_import("transformers")
from refinfer.hf_oracle import capture_transformers, load_transformers  # noqa: E402

# Largest NMSE per tensor kind over the four models below, 256 random tokens (float32 on both
# sides, different summation orders; torch 2.13.0 CPU):
#   llama-gqa          attn_norm 1.1e-13, Qcur 3.8e-13, Kcur 3.5e-13, kq 6.8e-13, kqv_out 2.5e-13, logits 1.7e-13
#   llama-tied-llama3  attn_norm 2.5e-13, Qcur 1.1e-12, Kcur 8.4e-13, kq 1.2e-12, ffn_out 6.1e-13, logits 4.3e-13
#   qwen2-gqa          attn_norm 8.1e-14, Qcur 1.3e-13, Kcur 2.1e-13, kq 3.0e-13, ffn_out 2.5e-13, logits 1.2e-13
#   qwen2-tied         attn_norm 1.8e-13, Qcur 5.4e-13, Kcur 6.3e-13, kq 1.5e-12, ffn_out 4.4e-13, logits 2.4e-13
# inp_embd is exact (a row copy). The target is 1e-10; the limit is about 10x the
# largest value measured (1.5e-12).
NMSE_LIMIT = 1e-11
T = 256

MODELS = {
    "llama-gqa": dict(arch="llama", n_layers=3, seed=1),
    "llama-tied-llama3": dict(arch="llama", n_layers=2, tie=True, rope_scaling=LLAMA3_SCALING, seed=2),
    "qwen2-gqa": dict(arch="qwen2", n_layers=3, seed=3, rope_theta=1e6),
    "qwen2-tied": dict(arch="qwen2", n_layers=2, tie=True, n_heads=4, n_kv_heads=1, seed=4),
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_models")
    return {name: make_hf_checkpoint(root / name, **kw) for name, kw in MODELS.items()}


def tokens_for(vocab=256, n=T, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n)


def refinfer_dump(model_dir, tokens, edit=None):
    model = refinfer.load(model_dir, backend="numpy", mode="ideal")
    if edit is not None:
        edit(model)
    return capture_refinfer(model, tokens)


def agreement(ref: dict, test: dict) -> dict:
    """{name: NMSE of test against ref}, in forward order, after checking both have the same
    names and shapes."""
    assert sorted(ref) == sorted(test), f"names differ: {sorted(set(ref) ^ set(test))}"
    bad = {n: (ref[n].shape, test[n].shape) for n in ref if ref[n].shape != test[n].shape}
    assert not bad, f"shapes differ: {bad}"
    return {n: nmse(test[n], ref[n]) for n in sorted(ref, key=forward_key)}


def first_divergence(nmses: dict, limit=NMSE_LIMIT):
    return next((n for n, v in nmses.items() if v > limit), None)


def check_model_agrees(model_dir, tokens):
    logits, hf = capture_transformers(model_dir, tokens)
    ref = refinfer_dump(model_dir, tokens)
    nm = agreement(ref, hf)
    assert np.array_equal(logits, hf["result_output"])
    worst = {}
    for name, v in nm.items():
        kind = name.split("-")[0]
        worst[kind] = max(worst.get(kind, 0.0), v)
    assert first_divergence(nm) is None, f"{first_divergence(nm)}: NMSE {nm[first_divergence(nm)]:.3g}; per kind {worst}"
    return worst


@pytest.mark.parametrize("name", list(MODELS))
def test_every_tensor_matches_transformers(hf_models, name):
    worst = check_model_agrees(hf_models[name], tokens_for())
    n_layers = MODELS[name]["n_layers"]
    assert len(worst) == 15 and n_layers >= 2  # every kind of dump.py's list is compared


def test_perturbed_weight_is_named_first(hf_models, tmp_path):
    """Negative control: one row of layer 1's v_proj scaled by 1.001 in transformers' copy.
    The first tensor beyond the limit is Vcur-1 (NMSE ~1e-6 / 32 rows: measured 2.85e-8), and every
    tensor before it still agrees."""
    from safetensors.numpy import load_file, save_file
    src = hf_models["llama-gqa"]
    bad = tmp_path / "perturbed"
    shutil.copytree(src, bad)
    weights = load_file(str(src / "model.safetensors"))
    weights["model.layers.1.self_attn.v_proj.weight"][0] *= np.float32(1.001)
    save_file(weights, str(bad / "model.safetensors"))
    tokens = tokens_for()
    nm = agreement(refinfer_dump(src, tokens), capture_transformers(bad, tokens)[1])
    assert first_divergence(nm) == "Vcur-1"
    assert nm["Vcur-1"] > 100 * NMSE_LIMIT


def test_rope_style_swapped_fails_at_qcur0(hf_models):
    """Negative control: refinfer rotating halves (NEOX) on a llama checkpoint whose q/k rows
    its loader permuted for adjacent pairs: Qcur-0 is the first tensor off (NMSE ~1)."""
    tokens = tokens_for()
    ref = refinfer_dump(hf_models["llama-gqa"], tokens,
                        edit=lambda m: setattr(m, "config", dataclasses.replace(m.config, rope_neox=True)))
    nm = agreement(ref, capture_transformers(hf_models["llama-gqa"], tokens)[1])
    assert first_divergence(nm) == "Qcur-0" and nm["Qcur-0"] > 1e-3


def test_llama3_scaling_is_exercised(hf_models):
    """Negative control: without llama3's rope factors refinfer's Qcur-0 differs from
    transformers' (which does apply them): the test models' positions reach the scaled bands."""
    tokens = tokens_for()
    ref = refinfer_dump(hf_models["llama-tied-llama3"], tokens, edit=lambda m: setattr(m.weights, "rope_freqs", None))
    nm = agreement(ref, capture_transformers(hf_models["llama-tied-llama3"], tokens)[1])
    assert first_divergence(nm) == "Qcur-0" and nm["Qcur-0"] > 1e-4


def test_attention_without_the_causal_mask_fails(hf_models, monkeypatch):
    """Negative control of the oracle itself: transformers gives an attention function it does
    not know a mask for no causal mask at all; the registered mask is what makes kqv_out agree."""
    from transformers.masking_utils import AttentionMaskInterface

    import refinfer.hf_oracle as hfo
    mapping = dict(AttentionMaskInterface._global_mapping)
    mapping.pop(hfo.ATTN_IMPLEMENTATION, None)
    monkeypatch.setattr(AttentionMaskInterface, "_global_mapping", mapping)
    monkeypatch.setattr(hfo, "register_attention", lambda: hfo.ATTN_IMPLEMENTATION)
    tokens = tokens_for(n=32)
    nm = agreement(refinfer_dump(hf_models["qwen2-gqa"], tokens), capture_transformers(hf_models["qwen2-gqa"], tokens)[1])
    assert first_divergence(nm) == "kqv_out-0"


# ---- RoPE at long context ---------------------------------------------------------------------

def rope_angles(positions, head_dim, theta, inv_freq_f32):
    """(transformers' angles: float32 inv_freq times float32 position, rounded to float32;
    refinfer's: position * theta^(-2i/d) in float64), both float64[P, head_dim // 2]."""
    pos = np.asarray(positions)
    hf = (pos.astype(np.float32)[:, None] * inv_freq_f32[None, :]).astype(np.float64)
    exact = pos.astype(np.float64)[:, None] * theta ** (-2.0 * np.arange(head_dim // 2) / head_dim)
    return hf, exact


def predicted_rope_nmse(x, delta):
    """NMSE that rotating each pair (2i, 2i+1) of x[P, heads, hd] by an extra angle delta[P, i]
    adds: |R(d) v - v|^2 = (2 - 2 cos d) |v|^2 for a pair v, summed over pairs, over |x|^2."""
    pair = x[..., 0::2].astype(np.float64) ** 2 + x[..., 1::2].astype(np.float64) ** 2   # [P, heads, hd/2]
    return float(np.sum((2 - 2 * np.cos(delta))[:, None, :] * pair) / np.sum(pair))


LONG = 8192
BUCKETS = ((0, 256), (1024, 1280), (4096, 4352), (7936, 8192))


def rope_long_context(tmp_path):
    """{bucket: (measured Qcur-0 NMSE, predicted, measured Kcur-0, predicted)} for 8192 tokens
    on a one-layer model with head_dim 64 and theta 10000 (refinfer on the numba backend: the
    same rope_cos_sin as the NumPy reference, quadratic attention in seconds)."""
    d = make_hf_checkpoint(tmp_path / "long", dim=64, hidden_dim=32, n_layers=1, n_heads=1, n_kv_heads=1,
                           head_dim=64, vocab=64, ctx=LONG, seed=5)
    tokens = tokens_for(vocab=64, n=LONG, seed=6)
    skip = ("kq-*",)
    model = load_transformers(d)
    _, hf = capture_transformers(d, tokens, skip=skip, model=model)
    ref = capture_refinfer(refinfer.load(d, backend="numba", mode="ideal"), tokens, skip=skip)
    inv_freq = model.model.rotary_emb.inv_freq.numpy()
    angle_hf, angle_ref = rope_angles(np.arange(LONG), 64, 10000.0, inv_freq)
    # refinfer's Qcur is in llama.cpp's pair order: pair i = dims (2i, 2i+1) rotates with freq i
    delta = angle_hf - angle_ref
    out = {}
    for a, b in BUCKETS:
        out[(a, b)] = tuple(v for name in ("Qcur-0", "Kcur-0")
                            for v in (nmse(hf[name][a:b], ref[name][a:b]), predicted_rope_nmse(ref[name][a:b], delta[a:b])))
    out["max_abs_angle_error"] = float(np.max(np.abs(delta)))
    return out


@pytest.mark.slow
def test_rope_at_8192_matches_the_float32_angle_prediction(tmp_path):
    """transformers' angles are float32 products (inv_freq * pos, inv_freq itself float32);
    refinfer's are float64. Each angle is then off by delta = pos * f_i * (relative error of
    inv_freq_i, up to 2^-24) + the rounding of the product (up to half an ulp of pos * f_i, 2.4e-4
    rad for angles in [4096, 8192)); a pair rotated by an extra delta moves by |delta| times its
    length, so the Qcur/Kcur NMSE is the pair-energy-weighted mean of delta^2
    (predicted_rope_nmse). As a closed form: delta^2 ~ (pos f_i)^2 * 1.8e-15 on average, f_0 = 1
    exact, so NMSE ~ pos^2 * 1.8e-15 * sum_{i>=1} f_i^2 / (hd/2) = 4.7e-9 at pos 8064 (hd 64,
    theta 1e4); the exact per-angle prediction, with this model's vectors, is 2.5e-9.
    Measured on Qcur-0 (prediction): 9.4e-13 (9.2e-13) at positions 0-256, 4.56e-11 (4.56e-11) at
    1024-1280, 6.637e-10 (6.637e-10) at 4096-4352, 2.505e-9 (2.505e-9) at 7936-8192; Kcur-0 the
    same to 4 digits; largest angle error 3.0e-4 rad. Allowed: 2% of the prediction plus 1e-13
    (10x the largest deviation measured, 0.2% and 1.4e-14)."""
    r = rope_long_context(tmp_path)
    assert 2e-4 < r["max_abs_angle_error"] < 1e-3
    for bucket in BUCKETS:
        q, q_pred, k, k_pred = r[bucket]
        for measured, pred in ((q, q_pred), (k, k_pred)):
            assert abs(measured - pred) <= 0.02 * pred + 1e-13, (bucket, measured, pred)
    q_far, q_far_pred = r[BUCKETS[-1]][:2]
    assert q_far > 1e-10 and q_far_pred > 1e-10   # beyond the short-context limit: the check can fail


# ---- errors and hygiene ---------------------------------------------------------------------

def test_bad_input_is_a_clear_error(hf_models, tmp_path):
    with pytest.raises(RefinferError, match="not a directory"):
        capture_transformers(tmp_path / "missing", [1, 2])
    with pytest.raises(RefinferError, match=r"token id 256 outside the vocabulary \[0, 256\)"):
        capture_transformers(hf_models["llama-gqa"], [1, 256])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RefinferError, match="cannot read") as e:
        capture_transformers(tmp_path / "empty", [1])
    assert e.value.hint


def test_missing_oracle_is_a_clear_error(hf_models, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(RefinferError, match="needs torch and transformers") as e:
        capture_transformers(hf_models["llama-gqa"], [1])
    assert "torch==2.13.0" in e.value.hint


def test_engine_does_not_import_the_oracles(hf_models):
    code = ("import sys, refinfer; m = refinfer.load(sys.argv[1], backend='numpy'); m.logits([1, 2, 3]);"
            "import refinfer.cli; refinfer.cli.build_parser();"
            "bad = [n for n in ('torch', 'transformers', 'refinfer.hf_oracle') if n in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code, str(hf_models["llama-gqa"])], capture_output=True, text=True,
                       env={**os.environ, "NUMBA_DISABLE_JIT": os.environ.get("NUMBA_DISABLE_JIT", "0")})
    assert r.returncode == 0, r.stdout + r.stderr


def test_compare_transformers_command(hf_models, tmp_path, capsys):
    """compare A --transformers DIR: a refinfer ideal dump of an HF checkpoint against
    transformers on its tokens, with the tight tolerance; a dump with Vcur-1 scaled by 1.001
    (NMSE 1e-6) is the first divergence."""
    from refinfer.cli import main
    from refinfer.dump import read_dump, write_dump
    model = hf_models["llama-gqa"]
    toks = ",".join(str(int(t)) for t in tokens_for(n=24))
    dump = tmp_path / "ideal.safetensors"
    assert main(["dump", "-m", str(model), "--tokens", toks, "-o", str(dump), "--no-progress"]) == 0
    rc = main(["compare", str(dump), "--transformers", str(model)])
    out = capsys.readouterr().out
    assert rc == 0 and "transformers float32: nmse <= 1e-10" in out, out
    d = read_dump(dump)
    tensors = {k: np.array(v) for k, v in d.tensors.items()}
    tensors["Vcur-1"] = tensors["Vcur-1"] * np.float32(1.001)
    bad = tmp_path / "bad.safetensors"
    write_dump(bad, tensors, d.tokens, {k: v for k, v in d.header.items() if k not in ("format", "format_version")})
    rc = main(["compare", str(bad), "--transformers", str(model), "-q"])
    out = capsys.readouterr().out
    assert rc == 1 and out.splitlines()[-1].startswith("FIRST DIVERGENCE: Vcur-1"), out
    rc = main(["compare", str(dump), "--transformers", str(tmp_path / "nope")])
    assert rc == 2 and "not a directory" in capsys.readouterr().err
