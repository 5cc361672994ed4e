"""The quantization table: GPTQ, AWQ and RTN checkpoints beside llama.cpp's block types, on
SmolLM2-135M, against the float model.

    python bench/w4a16_table.py --json w4a16-table.json [--chunks 8] [--rows gptq-4-64,awq-4-64,q4_0]
    python bench/w4a16_table.py --model tiny.gguf --group-size 32 --no-quality   # a generated model

A generated model has random weights and near-flat outputs (PPL about 1.7e5): its rows say
nothing about which method is safe, so --no-quality leaves out PPL, KLD and same-top-p and
keeps the sizes and the decode speed.

The float model is SmolLM2's Q4_1 weights dequantized (`refinfer convert --type f32`): the only
float weights of it that can be had offline. So re-quantizing it to q4_1 is trivially lossless
(every block is already a q4_1 block), and its q4_1 row measures nothing but that.

Each row is made with refinfer's own commands:
    W4A16   python -m refinfer quantize F32.gguf DIR --method M --bits B --group-size G --format F
            (calibration: the default, exllamav2's c4.utf8, 32 x 512 tokens)
    GGUF    python -m refinfer quantize F32.gguf OUT.gguf --type T
and measured with
    kld     python -m refinfer kld --base F32.gguf --test ... -f wiki -c 512 --chunks N --json
            (ideal mode, numba backend: PPL, mean KLD and same-top-p against the float model)
    decode  refinfer.load(...).generate greedy, 64 tokens, numba backend, median of 3 runs
Columns: bits per weight of the quantized linear layers (the checkpoint's bytes over the
weights), file size, PPL, mean KLD, same-top-p, decode tok/s. Evaluation text is wiki.utf8,
calibration c4.utf8: no step of a row reads the text it is scored on.

Not collected by pytest: the AWQ search alone takes tens of minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

# Group size 64: SmolLM2's width 576 is 4.5 x 128, and GPTQ/AWQ checkpoints need groups that divide
# every Linear's in_features (AutoGPTQ's and vLLM's kernels do), so 128 is not possible on it.
ROWS = {  # name -> quantize arguments
    "rtn-4-64": ["--method", "rtn", "--bits", "4", "--group-size", "64", "--format", "gptq"],
    "rtn-3-64": ["--method", "rtn", "--bits", "3", "--group-size", "64", "--format", "gptq"],
    "rtn-8-64": ["--method", "rtn", "--bits", "8", "--group-size", "64", "--format", "gptq"],
    "gptq-4-64": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--format", "gptq"],
    "gptq-4-64-act": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--desc-act", "--format", "gptq"],
    "gptq-4-32": ["--method", "gptq", "--bits", "4", "--group-size", "32", "--format", "gptq"],
    "gptq-3-64": ["--method", "gptq", "--bits", "3", "--group-size", "64", "--format", "gptq"],
    "gptq-8-64": ["--method", "gptq", "--bits", "8", "--group-size", "64", "--format", "gptq"],
    "awq-4-64": ["--method", "awq", "--bits", "4", "--group-size", "64", "--format", "awq", "--asym"],
    "awq-4-64-sym": ["--method", "awq", "--bits", "4", "--group-size", "64", "--format", "awq", "--sym"],
    "q4_0": ["--type", "q4_0"], "q4_1": ["--type", "q4_1"], "q5_0": ["--type", "q5_0"],
    "q5_1": ["--type", "q5_1"], "q8_0": ["--type", "q8_0"],
}


def run(cmd, log):
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "refinfer", *cmd], capture_output=True, text=True)
    log.write(f"$ refinfer {' '.join(cmd)}\n{p.stdout}{p.stderr}\n")
    log.flush()
    if p.returncode:
        raise SystemExit(f"refinfer {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def size_of(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def linear_bits_per_weight(path: pathlib.Path) -> float:
    """Bits per weight of the quantized linear layers (the transformer blocks' matrices), from the
    model as refinfer loads it: IntGroupTensor.nbytes (codes, scales, zeros, g_idx as stored) or
    the GGUF blocks' bytes."""
    import refinfer.loader as loader
    _, weights, _ = loader.load(path)
    nbytes = n = 0
    for layer in weights.layers:
        for name in loader.LAYER_MATRICES:
            t = getattr(layer, name)
            nbytes += t.nbytes
            n += t.shape[0] * t.shape[1]
    return 8.0 * nbytes / n


def decode_tok_s(path, n=64, reps=3) -> float:
    import refinfer
    m = refinfer.load(str(path), backend="numba")
    m.generate("The history of", max_tokens=4, temperature=0)        # compile, warm the caches
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        r = m.generate("The history of", max_tokens=n, temperature=0, details=True)
        rates.append(len(r.token_ids) / (time.perf_counter() - t0))   # prompt included: 4 tokens
    return statistics.median(rates)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="w4a16-work", help="directory for the models (kept: reruns reuse them)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (default: all)")
    ap.add_argument("--chunks", type=int, default=8, help="wiki chunks of 512 tokens for kld (default 8)")
    ap.add_argument("--json", default=None, metavar="FILE")
    ap.add_argument("--model", default=None, help="float or quantized GGUF to start from (default: SmolLM2, "
                                                   "its Q4_1 weights converted to f32)")
    ap.add_argument("--group-size", type=int, default=64, help="group size of the W4A16 rows (default 64)")
    ap.add_argument("--no-quality", action="store_true", help="sizes and decode speed only (generated models)")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "log.txt", "a")
    from refinfer.fetch import default_model_path
    src = pathlib.Path(args.model) if args.model else default_model_path()
    f32 = work / (src.stem + "-f32.gguf" if args.model else "smollm2-f32.gguf")
    if not f32.exists():
        run(["convert", str(src), str(f32), "--type", "f32"], log)
    made, seconds = {}, {}
    for r in rows:
        argv_r = [a if a != "64" else str(args.group_size) for a in ROWS[r]]
        name = r.replace("-64", f"-{args.group_size}")
        out = work / (name + ".gguf" if ROWS[r][0] == "--type" else name)
        if not out.exists():
            seconds[name] = run(["quantize", str(f32), str(out), *argv_r], log)
        made[name] = out
    stats = {"tests": {}}
    if not args.no_quality:
        kjson = work / "kld.json"
        run(["kld", "--base", str(f32), *sum((["--test", str(p)] for p in made.values()), []), "-f", "wiki",
             "-c", "512", "--chunks", str(args.chunks), "--json", str(kjson)], log)
        stats = json.loads(kjson.read_text())
    table = []
    for r, p in made.items():
        s = stats["tests"].get(str(p), {})
        table.append({"row": r, "bits_per_weight": linear_bits_per_weight(p), "file_mib": size_of(p) / 2**20,
                      "ppl": s.get("ppl_test"), "mean_kld": s.get("kld_mean"), "same_top_p": s.get("same_top"),
                      "decode_tok_s": decode_tok_s(p), "quantize_s": seconds.get(r)})
    base_ppl = next(iter(stats["tests"].values()))["ppl_base"] if stats["tests"] else None
    print(f"float model ({src.name} as f32): {size_of(f32) / 2**20:.1f} MiB"
          + (f", PPL {base_ppl:.3f}" if base_ppl else ""))
    print("| row | bits/weight | file MiB | PPL | mean KLD | same top p | decode tok/s |")
    print("|---|---|---|---|---|---|---|")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    for t in table:
        print(f"| {t['row']} | {t['bits_per_weight']:.2f} | {t['file_mib']:.1f} | {f(t['ppl'], '.3f')} | "
              f"{f(t['mean_kld'], '.5f')} | {f(None if t['same_top_p'] is None else 100 * t['same_top_p'], '.2f')}{'' if t['same_top_p'] is None else '%'} | "
              f"{t['decode_tok_s']:.1f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"base_ppl": base_ppl, "rows": table}, indent=1))


if __name__ == "__main__":
    main()
