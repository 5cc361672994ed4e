"""`refinfer imatrix`: llama-imatrix's sums of squared matmul inputs, from refinfer's ggml-mode
activations, against the same sums over llama.cpp's own activations (eval callback), and the
file read back by quantize --imatrix giving llama_model_quantize's bytes."""

from __future__ import annotations

import numpy as np
import pytest

from ci_skips import oracle_import

TEXT = "The quick brown fox jumps over the lazy dog. " * 12
N_CTX = 32


@pytest.fixture(scope="module")
def q8_model(tiny_llama_f32, tmp_path_factory):
    from refinfer.quantize_model import quantize_model
    path = tmp_path_factory.mktemp("imatrix") / "tiny-q8_0.gguf"
    quantize_model(tiny_llama_f32, path, "q8_0")
    return path


def llama_cpp_sums(path, chunks, bos):
    # collect_imatrix's accumulation over llama.cpp's matmul inputs, chunk by chunk
    from refinfer.llama_oracle import llama_intermediates
    inputs = {"attn_norm": ("attn_q", "attn_k", "attn_v"), "kqv_out": ("attn_output",),
              "ffn_norm": ("ffn_gate", "ffn_up"), "ffn_swiglu": ("ffn_down",)}
    sums = {}
    for chunk in chunks:
        _, raw = llama_intermediates(path, [bos] + list(chunk[1:]))
        for kind, weights in inputs.items():
            for key in [k for k in raw if k.startswith(kind + "-")]:
                x = raw[key].reshape(len(chunk), -1).astype(np.float32)
                for w in weights:
                    acc = sums.setdefault(f"blk.{key.split('-')[1]}.{w}.weight", np.zeros(x.shape[1], np.float32))
                    for row in x:
                        acc += row * row
    return sums


def test_imatrix_equals_sums_over_llama_cpp_activations(q8_model, tmp_path):
    oracle_import("llama_cpp")
    from refinfer import model as M
    from refinfer.imatrix import compute_imatrix, read_imatrix, write_imatrix
    m = M.load(q8_model, mode="ggml")
    im = compute_imatrix(m, TEXT, N_CTX, dataset="calib.txt")
    toks = m.tokenize(TEXT)
    n_chunk = len(toks) // N_CTX
    assert im.chunk_count == n_chunk and im.chunk_size == N_CTX
    expected = llama_cpp_sums(q8_model, [toks[i * N_CTX:(i + 1) * N_CTX] for i in range(n_chunk)],
                              m.tokenizer.bos_id)
    assert sorted(expected) == sorted(im.sums)
    for name, e in expected.items():
        assert np.array_equal(im.sums[name][0], e), name
        assert im.counts[name][0] == n_chunk * N_CTX
    write_imatrix(tmp_path / "im.gguf", im)
    back = read_imatrix(tmp_path / "im.gguf")
    assert back.datasets == ["calib.txt"] and back.chunk_count == n_chunk
    assert all(np.array_equal(back.sums[k], im.sums[k]) for k in im.sums)


def test_quantize_with_the_file_matches_llama_model_quantize(q8_model, tiny_llama_f32, tmp_path, capsys):
    oracle_import("llama_cpp")
    from refinfer import model as M
    from refinfer.cli import main
    from refinfer.imatrix import compute_imatrix, read_imatrix, write_imatrix
    from test_quantize_presets import llama_quantize_preset
    im = compute_imatrix(M.load(q8_model, mode="ggml"), TEXT, N_CTX, dataset="calib.txt")
    write_imatrix(tmp_path / "im.gguf", im)
    # tools/quantize's load_imatrix: sums / count, handed to llama_model_quantize
    weights = {n: (s / np.float32(c[0])).reshape(-1) for n, s, c in
               ((n, im.sums[n], im.counts[n]) for n in im.sums)}
    assert all(np.array_equal(weights[n], w) for n, w in read_imatrix(tmp_path / "im.gguf").importance().items())
    assert main(["quantize", str(tiny_llama_f32), str(tmp_path / "ours.gguf"), "--type", "q4_0", "--no-pure",
                 "--imatrix", str(tmp_path / "im.gguf")]) == 0
    assert "importance-weighted" in capsys.readouterr().out
    llama_quantize_preset(tiny_llama_f32, tmp_path / "ref.gguf", 2, weights)
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_text_too_short_is_an_error(q8_model, tmp_path, capsys):
    from refinfer.cli import main
    (tmp_path / "t.txt").write_text("short text")
    rc = main(["imatrix", "-m", str(q8_model), "-f", str(tmp_path / "t.txt"), "-o", str(tmp_path / "o.gguf"), "-c", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and "2 * n_ctx = 128" in err and "hint:" in err
