"""What a quantized KV cache costs: bytes per token, quality against an f32 cache, decode speed,
with llama.cpp's own numbers for its cache types in the same run.

    python bench/kv_cost.py --work DIR [--chunks 8] [--json kv-cost.json]
    python bench/kv_cost.py --model tiny.gguf --no-quality        # a generated model: sizes and speed

The weights (made in DIR with refinfer's own commands when missing, as bench/w4a16_table.py does):
    f32     SmolLM2-135M's Q4_1 weights dequantized (`convert --type f32`), the float model
    q4_0    `quantize f32.gguf q4_0.gguf --type q4_0`
    gptq    `quantize f32.gguf gptq-4-64 --method gptq --bits 4 --group-size 64 --format gptq`
Quality (`kld`, ideal mode, numba backend, wiki.utf8, -c 512): every row against ONE base, the
float weights with an f32 KV cache, so a combined row (q4_0 or GPTQ weights + a KV type) shows
both costs together. int8-calibrated uses `calibrate-kv` parameters from c4.utf8 (never the
scored text). llama.cpp's rows are llama.cpp against its own f32-weights, f32-KV run
(variant kv_f32), with its cache types and flash attention (which a quantized V requires);
its cache rotates Q/K/V with a Hadamard transform for quantized types (head_dim 64 % 64 == 0),
as refinfer's llama.cpp types do unless kv_rotation=0.
Speed (`bench --batched`, 2 threads, q4_0 weights, 64-token prompts, 32 decode steps): aggregate
decode tokens/s at 1 and 16 sequences, refinfer (numba, checked against the NumPy reference)
beside llama.cpp with the same cache type where llama.cpp has it (f16 otherwise).

Not collected by pytest: the table takes tens of minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

KV_TYPES = ["f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "lmdeploy-int8", "lmdeploy-int4",
            "lmdeploy-pt-int8", "lmdeploy-pt-int4", "int8-calibrated"]
COMBINED = ["f32", "q8_0", "q4_0", "lmdeploy-int8", "lmdeploy-int4"]          # with q4_0 and GPTQ weights
LLAMA_TYPES = ["f16", "q8_0", "q4_0"]
SPEED_TYPES = ["f32", "f16", "q8_0", "q4_0", "lmdeploy-int8", "lmdeploy-int4"]


def run(cmd, log):
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "refinfer", *cmd], capture_output=True, text=True)
    log(f"$ refinfer {' '.join(cmd)}  ({time.perf_counter() - t0:.0f} s, exit {p.returncode})")
    if p.returncode not in (0, 1):
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return p


def make_weights(work: pathlib.Path, log):
    from refinfer.fetch import default_model_path
    f32 = work / "smollm2-f32.gguf"
    if not f32.exists():
        run(["convert", str(default_model_path()), str(f32), "--type", "f32"], log)
    q4 = work / "q4_0.gguf"
    if not q4.exists():
        run(["quantize", str(f32), str(q4), "--type", "q4_0"], log)
    gptq = work / "gptq-4-64"
    if not (gptq / "config.json").exists():
        run(["quantize", str(f32), str(gptq), "--method", "gptq", "--bits", "4", "--group-size", "64",
             "--format", "gptq"], log)
    params = work / "kv-params-c4.json"
    if not params.exists():
        run(["calibrate-kv", "-m", str(f32), "-o", str(params)], log)
    return f32, q4, gptq, params


def src(kind, path, kv, params):
    if kind == "llama.cpp":
        opts = "variant=kv_f32" if kv == "f32" else (
            f"cache_type_k={kv},cache_type_v={kv}" + (",flash_attn=1" if kv != "f16" else ""))
        return f"llama.cpp[{opts}]:{path}"
    if kv == "f32":
        return str(path)
    extra = f",kv_params={params}" if kv == "int8-calibrated" else ""
    return f"refinfer[cache_type_k={kv},cache_type_v={kv}{extra}]:{path}"


def kld(base, tests, chunks, out, log):
    cmd = ["kld", "--base", base, "-f", "wiki", "-c", "512", "--chunks", str(chunks), "--json", str(out),
           "--no-progress"]
    for t in tests:
        cmd += ["--test", t]
    run(cmd, log)
    return json.loads(out.read_text())


def bytes_per_token(model, kv, params, mib=256):
    """(the pool's bytes per token, the 2048-token sequences an Engine's pool of mib MiB holds)."""
    import refinfer
    m = refinfer.load(model, backend="numpy", cache_type_k=None if kv == "f32" else kv,
                      cache_type_v=None if kv == "f32" else kv, kv_params=params if kv == "int8-calibrated" else None)
    s = refinfer.Engine(m, kv_cache_mib=mib).stats()
    return s.kv_bytes_per_token, s.kv_max_seqs_2k


def speed(model, kv, work, log):
    out = work / f"speed-{kv}.json"
    cmd = ["bench", "--batched", "-m", str(model), "-t", "2", "--seqs", "1,16", "-p", "64", "-n", "32",
           "--prefill", "0", "--system", "0", "--no-sampled", "--json", str(out)]
    if kv != "f32":
        cmd += ["-ctk", kv, "-ctv", kv]
    run(cmd, log)
    return json.loads(out.read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="kv-cost-work", help="directory for the weights and intermediate files")
    ap.add_argument("--model", default=None, help="a GGUF instead of SmolLM2 (with --no-quality: a generated model)")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    result = {"bytes_per_token": {}, "quality": {}, "llama_cpp_quality": {}, "speed": {}}
    if args.model:
        f32 = q4 = pathlib.Path(args.model)
        gptq, params = None, None
    else:
        f32, q4, gptq, params = make_weights(work, log)
    for kv in ["f32", *KV_TYPES]:
        if kv == "int8-calibrated" and params is None:
            continue
        result["bytes_per_token"][kv] = bytes_per_token(f32, kv, params)
    if not args.no_quality:
        groups = {"f32": (f32, ["f32", *KV_TYPES] + ["q4_0 no-rotation"]), "q4_0": (q4, COMBINED), "gptq": (gptq, COMBINED)}
        for weights, (path, kvs) in groups.items():
            tests, names = [], []
            for kv in kvs:
                if weights == "f32" and kv == "f32":
                    continue
                if kv == "q4_0 no-rotation":
                    tests.append(f"refinfer[cache_type_k=q4_0,cache_type_v=q4_0,kv_rotation=0]:{path}")
                else:
                    tests.append(src("refinfer", path, kv, params))
                names.append(kv)
            res = kld(str(f32), tests, args.chunks, work / f"kld-{weights}.json", log)
            for name, t in zip(names, tests):
                result["quality"][f"{weights} + {name}"] = res["tests"][t]
        tests = [src("llama.cpp", f32, kv, None) for kv in LLAMA_TYPES] + \
                [src("llama.cpp", q4, kv, None) for kv in LLAMA_TYPES]
        res = kld(src("llama.cpp", f32, "f32", None), tests, args.chunks, work / "kld-llama.json", log)
        names = [f"f32 + {kv}" for kv in LLAMA_TYPES] + [f"q4_0 + {kv}" for kv in LLAMA_TYPES]
        for name, t in zip(names, tests):
            result["llama_cpp_quality"][name] = res["tests"][t]
    if not args.no_speed:
        for kv in SPEED_TYPES:
            result["speed"][kv] = speed(q4, kv, work, log)
    text = json.dumps(result, indent=1)
    if args.json:
        pathlib.Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
