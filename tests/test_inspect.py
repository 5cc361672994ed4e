"""`python -m refinfer inspect` run as a user would: in a subprocess, on the real model, on a
safetensors checkpoint and on bad files. Numbers are checked against gguf-py's GGUFReader."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader


def run_inspect(*args):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "refinfer", "inspect", *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", timeout=120, env=env)


@pytest.fixture(scope="module")
def reader_facts(smollm2_path):
    r = GGUFReader(smollm2_path)
    return {"n_tensors": len(r.tensors),
            "n_params": sum(int(np.prod(t.shape, dtype=np.int64)) for t in r.tensors),
            "tensor_bytes": sum(int(t.n_bytes) for t in r.tensors),
            "types": {t.name: t.tensor_type.name.lower() for t in r.tensors},
            "n_vocab": len(r.fields["tokenizer.ggml.tokens"].data)}


def test_text_output(smollm2_path, reader_facts):
    p = run_inspect(smollm2_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"[{reader_facts['n_vocab']} x str]" in out
    assert '"<|endoftext|>", "<|im_start|>"' in out  # the first tokens, not the whole vocabulary
    assert len(out.splitlines()) < 400
    assert f"tensors ({reader_facts['n_tensors']}):" in out
    assert f"{reader_facts['n_params']:,} params" in out
    assert f"{reader_facts['tensor_bytes']:,} bytes" in out
    bpw = 8 * reader_facts["tensor_bytes"] / reader_facts["n_params"]
    assert f"{bpw:.2f} bits/weight" in out
    emb_row = next(line for line in out.splitlines() if line.strip().startswith("token_embd.weight"))
    assert emb_row.split()[1] == reader_facts["types"]["token_embd.weight"] == "q8_0"
    assert "49152 x 576" in emb_row


def test_json_output(smollm2_path, reader_facts):
    p = run_inspect(smollm2_path, "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    t = r["totals"]
    assert (t["n_tensors"], t["n_params"], t["tensor_bytes"]) == (
        reader_facts["n_tensors"], reader_facts["n_params"], reader_facts["tensor_bytes"])
    assert t["file_size"] == os.path.getsize(smollm2_path)
    assert {x["name"]: x["type"] for x in r["tensors"]} == reader_facts["types"]
    toks = r["metadata"]["tokenizer.ggml.tokens"]
    assert toks["length"] == reader_facts["n_vocab"] and toks["element_type"] == "STRING"
    assert toks["head"][0] == "<|endoftext|>" and "value" not in toks
    assert r["metadata"]["llama.block_count"] == {"type": "UINT32", "value": 30}
    assert sum(s["params"] for s in t["by_type"].values()) == t["n_params"]


def test_safetensors_checkpoint(tmp_path):
    from safetensors.numpy import save_file
    save_file({"model.norm.weight": np.ones(4, np.float16), "lm_head.weight": np.zeros((8, 4), np.float32)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4, "architectures": ["LlamaForCausalLM"]}))
    p = run_inspect(tmp_path, "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["format"] == "safetensors" and r["config"]["hidden_size"]["value"] == 4
    assert r["totals"]["n_params"] == 36 and r["totals"]["tensor_bytes"] == 4 * 2 + 32 * 4
    p = run_inspect(tmp_path)
    assert p.returncode == 0 and "lm_head.weight" in p.stdout and "config.json (2 keys)" in p.stdout


@pytest.mark.parametrize("kind", ["not_a_model", "truncated_gguf", "missing"])
def test_bad_file(tmp_path, smollm2_path, kind):
    path = tmp_path / "bad.gguf"
    if kind == "not_a_model":
        path.write_bytes(b"hello world, not a model\n")
    elif kind == "truncated_gguf":
        with open(smollm2_path, "rb") as f:
            path.write_bytes(f.read(100_000))  # cut inside the token list
    p = run_inspect(path)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0], p.stderr
    if kind == "truncated_gguf":
        assert "tokenizer.ggml.tokens" in errors[0] and "offset" in errors[0]


def test_quantized_checkpoint_shows_the_quantization(tmp_path):
    """A GPTQ checkpoint labelled v1 that stores v2 zeros: inspect shows the method, bits, group
    size, act-order, the version the data proves, and the real bits per weight of the stored
    codes, zeros, scales and g_idx (counted here from the layout: 4 bits per code, 4 bits per
    zero and 16 per scale per group of 32, 32 bits of g_idx per input column)."""
    import oracles_w4a16  # noqa: F401  (the packers below need the oracle libraries)
    from test_w4a16_loading import LINEARS, SHAPE, quantized_checkpoint
    from refinfer.safetensors_file import SafetensorsCheckpoint
    from refinfer.w4a16 import gptq
    from safetensors.numpy import save_file
    qdir, _ = quantized_checkpoint(tmp_path, "gptq", sym=True)
    ck = SafetensorsCheckpoint(qdir)
    tensors = {n: np.asarray(ck.raw(n)) for n in ck.tensors}
    del ck
    for n in [n for n in tensors if n.endswith(".qzeros")]:
        tensors[n] = gptq.pack_qzeros(np.full((tensors[n].shape[1] * 8, tensors[n].shape[0]), 8, np.uint8), 4)
    save_file(tensors, str(qdir / "model.safetensors"))
    p = run_inspect(qdir, "--json")
    assert p.returncode == 0, p.stderr
    q = json.loads(p.stdout)["quantization"]
    assert (q["method"], q["format"], q["config_format"], q["bits"], q["group_size"], q["act_order"], q["sym"]) == \
        ("gptq", "gptq_v2", "gptq", 4, 32, False, True)
    shapes = [tensors[f"model.layers.{i}.{lin}.qweight"].shape for i in range(SHAPE["n_layers"]) for lin in LINEARS]
    weights = sum(rows * 8 * N for rows, N in shapes)                      # qweight [K/8, N]
    bits = sum(rows * 8 * N * 4 + (rows * 8 // 32) * N * (4 + 16) + rows * 8 * 32 for rows, N in shapes)
    assert q["quantized_linears"] == len(shapes) and q["quantized_weights"] == weights
    assert q["real_bits_per_weight"] == bits / weights
    assert len(q["notes"]) == 1 and "0x88888888" in q["notes"][0]
    p = run_inspect(qdir)
    assert p.returncode == 0, p.stderr
    assert "format         gptq_v2 (the stored zeros prove it; the config says gptq)" in p.stdout
    assert f"real bits/weight {bits / weights:.3f} over {len(shapes)} quantized Linears" in p.stdout
