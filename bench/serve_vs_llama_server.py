"""refinfer's server beside llama.cpp's llama-server: same model, prompts, concurrency and
max tokens, measured in the same run by the same load generator (refinfer.bench_serve).

    python bench/serve_vs_llama_server.py [--concurrency 1,4,16] [--requests 32] [--max-tokens 128]
    python bench/serve_vs_llama_server.py --build-only      # build llama-server and exit

llama-server is built from the llama.cpp tree vendored in the llama-cpp-python sdist (the same
llama.cpp the tests compare against): cmake, the llama-server target only, AVX2 flags as the
tests' llama_cpp wheel uses, no web UI download (LLAMA_USE_PREBUILT_UI=OFF), no curl/openssl.
The binary is cached under refinfer's cache dir; the build takes about 10 minutes on 2 cores.

Each server is restarted for each concurrency level with as many slots as concurrent streams
(refinfer: --parallel N; llama-server: -np N, -c N * per-sequence context, flash attention
off), the same threads. Outputs are compared with each prompt's serial reference (the same
request alone at concurrency 1, temperature 0): refinfer's by token ids, llama-server's by the
token ids of its /completion endpoint.

Not collected by pytest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
LLAMA_CPP_VERSION = LLAMA_CPP_SDIST.split("==")[1]
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",   # one self-contained binary to cache
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
    # no UI download from the hub (tools/ui/CMakeLists.txt): the server runs without its web UI
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
    # the x86-64 flags of the tests' llama_cpp build, so both run the same kernels
    "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
]


def llama_server_dir() -> pathlib.Path:
    from refinfer.fetch import cache_dir
    return cache_dir() / f"llama-server-{LLAMA_CPP_VERSION}"


class BuildError(Exception):
    pass


def build_llama_server(*, jobs: int = 2, log=sys.stderr) -> pathlib.Path:
    """Path of the llama-server binary, building it first when it is not cached."""
    from refinfer.fetch import pip_download
    target = llama_server_dir()
    binary = target / "bin" / "llama-server"
    if binary.exists():
        return binary
    if shutil.which("cmake") is None:
        raise BuildError("cmake is not installed: llama-server cannot be built "
                         "(apt-get install cmake g++, then rerun)")
    target.mkdir(parents=True, exist_ok=True)
    build_log = target / "build.log"
    print(f"building llama-server {LLAMA_CPP_VERSION} (about 10 minutes on 2 cores); log: {build_log}",
          file=log, flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target) as tmp, open(build_log, "w") as out:
        tmp = pathlib.Path(tmp)
        sdist = pip_download(LLAMA_CPP_SDIST, tmp, sdist=True)
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name]
            tf.extractall(tmp, members=members, filter="data")
        src = next(tmp.glob("*/vendor/llama.cpp"))
        build = tmp / "build"
        for cmd in (["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS],
                    ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)]):
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                raise BuildError(f"`{' '.join(cmd[:3])} ...` failed (exit {proc.returncode}); "
                                 f"see the build log {build_log}")
        built = build / "bin" / "llama-server"
        if not built.exists():
            raise BuildError(f"the build finished without {built}; see the build log {build_log}")
        (target / "bin").mkdir(exist_ok=True)
        shutil.copy2(built, target / "bin" / ".llama-server.tmp")
        os.replace(target / "bin" / ".llama-server.tmp", binary)
    (target / "build-seconds").write_text(f"{time.perf_counter() - t0:.0f}\n")
    print(f"built {binary} in {time.perf_counter() - t0:.0f} s", file=log, flush=True)
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on 127.0.0.1: started, waited for (/health 200, bounded), stopped."""

    def __init__(self, name, cmd, port, log_path, start_timeout=300.0):
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.start_timeout = start_timeout

    def __enter__(self):
        import httpx
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before answering /health; "
                                   f"see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"{self.name} did not answer /health within {self.start_timeout:.0f} s; "
                                   f"see {self.log_path}")
            time.sleep(0.25)

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.log.close()


def kv_mib_per_position(model) -> float:
    """MiB of refinfer's KV pool per position for this model (the server's default numba backend,
    ideal mode: f32 K and V rows)."""
    import refinfer
    from refinfer.kv_cache import MIB, BlockPool
    m = refinfer.load(str(model))
    cfg, (k, v) = m.config, m.backend.kv_types()
    return BlockPool.bytes_per_block(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 1, k, v) / MIB


def refinfer_cmd(model, port, conc, threads, ctx, mib_per_pos):
    # --ctx: each request's context, as llama-server's per-slot -c / -np; the KV pool holds
    # conc * ctx positions, as llama-server's -c (the server's default pool is one context)
    mib = (conc * ctx + 0.5) * mib_per_pos
    return [sys.executable, "-m", "refinfer", "serve", "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(conc), "--threads", str(threads), "--ctx", str(ctx), "--kv-cache-mib", f"{mib:.3f}"]


def llama_cmd(binary, model, port, conc, threads, ctx):
    # -np slots, each with -c / -np positions (no unified KV when -np is given); flash attention
    # off as refinfer's attention; the same threads for decode (-t) and prompt batches (-tb)
    return [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(conc),
            "-c", str(conc * ctx), "-fa", "off", "-t", str(threads), "-tb", str(threads), "--no-webui"]


def shown(cmd):
    return " ".join(pathlib.Path(c).name if i == 0 or c.endswith(".gguf") else c for i, c in enumerate(cmd))


def run_level(name, make_cmd, conc, requests, settings, reference, logdir):
    """(level summary, reference outputs) of one server restarted with conc slots. At the first
    level (1) the run is the serial reference itself: a fresh server, one request at a time;
    later levels are compared with it."""
    from refinfer import bench_serve as bs
    port = free_port()
    cmd = make_cmd(port, conc)
    load0 = os.getloadavg()[0]
    print(f"[{name}] concurrency {conc}: {shown(cmd)}", file=sys.stderr, flush=True)
    with Server(name, cmd, port, logdir / f"{name}-np{conc}.log") as srv:
        if reference is None:
            if conc != 1:
                raise SystemExit("the first concurrency level must be 1: it is the serial reference")
            rep = bs.bench(srv.url, requests, settings, [])
            reference = rep["_reference_outputs"]
            lv = rep["reference"]
            lv.update(compared=lv["completed"], differ=0, compared_by="reference", differ_keys=[])
        else:
            lv = bs.bench(srv.url, requests, settings, [conc], reference=reference)["levels"][0]
    lv["loadavg_1min_before"], lv["loadavg_1min_after"] = load0, os.getloadavg()[0]
    lv["server_cmd"] = shown(cmd)
    print(f"[{name}] concurrency {conc}: {lv['completed']}/{lv['requests']} done, "
          f"{lv['output_throughput']:.1f} out tok/s, TTFT p50 {lv['ttft_ms']['p50'] or 0:.0f} ms, "
          f"differ {lv['differ']}", file=sys.stderr, flush=True)
    return lv, reference


def _ms(v):
    return "-" if v is None else f"{v:.0f}"


def table(results, levels, n_requests):
    names = list(results)
    lines = ["| conc | server | out tok/s | req/s | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | ITL p50 ms "
             "| failed | differ from serial |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in levels:
        for n in names:
            lv = results[n][0][c]
            diff = "reference" if lv["compared_by"] == "reference" else f"{lv['differ']} of {lv['compared']}"
            lines.append(f"| {c} | {n} | {lv['output_throughput']:.1f} | {lv['request_throughput']:.2f} "
                         f"| {_ms(lv['ttft_ms']['p50'])} | {_ms(lv['ttft_ms']['p90'])} | {lv['tpot_ms']['p50'] or 0:.1f} "
                         f"| {lv['itl_ms']['p50'] or 0:.1f} | {lv['failed']} | {diff} |")
    if len(names) == 2:
        a, b = names
        lines += ["", f"| conc | out tok/s {a}/{b} (higher: {a} faster) | TTFT p50 {a}/{b} (lower: {a} faster) "
                      f"| TPOT p50 {a}/{b} (lower: {a} faster) |", "|---|---|---|---|"]
        for c in levels:
            x, y = results[a][0][c], results[b][0][c]
            def r(k, q="p50"):
                u, v = (x[k][q], y[k][q]) if q else (x[k], y[k])
                return "-" if not u or not v else f"{u / v:.2f}x"
            lines.append(f"| {c} | {r('output_throughput', None)} | {r('ttft_ms')} | {r('tpot_ms')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--concurrency", default="1,4,16", help="levels, the first 1 (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=32, help="requests per level, all distinct prompts (default 32)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default 128)")
    ap.add_argument("--prompt-words", default="70,130",
                    help="built-in prompts' word counts MIN,MAX (default 70,130: about 128 tokens on average)")
    ap.add_argument("--ctx", type=int, default=512, help="context positions per sequence (default 512)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads of both servers (default 2)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    ap.add_argument("--servers", default="refinfer,llama-server", help="which servers to run (default both)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--build-only", action="store_true", help="build (or find) llama-server and exit")
    args = ap.parse_args(argv)
    from refinfer import bench_serve as bs
    from refinfer.fetch import default_model_path

    servers = [n.strip() for n in args.servers.split(",") if n.strip()]
    binary = None
    if "llama-server" in servers or args.build_only:
        try:
            binary = build_llama_server()
        except BuildError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.build_only:
            print(binary)
            return 0
    levels = [int(c) for c in args.concurrency.split(",")]
    model = pathlib.Path(args.model) if args.model else default_model_path()
    lo, hi = (int(v) for v in args.prompt_words.split(","))
    requests = bs.make_requests(bs.builtin_prompts(args.requests, seed=args.seed, words=(lo, hi)), args.requests)
    settings = bs.Settings(endpoint="completions", max_tokens=args.max_tokens, temperature=args.temperature,
                           seed=args.seed, timeout=args.timeout)
    logdir = pathlib.Path(tempfile.mkdtemp(prefix="serve-bench-"))
    mib_per_pos = kv_mib_per_position(model) if "refinfer" in servers else None
    makers = {
        "refinfer": (lambda port, c: refinfer_cmd(model, port, c, args.threads, args.ctx, mib_per_pos), settings),
        # llama-server's own endpoint: its streamed chunks carry the token ids
        "llama-server": (lambda port, c: llama_cmd(binary, model, port, c, args.threads, args.ctx),
                         dataclasses.replace(settings, endpoint="completion")),
    }
    results = {n: ({}, None) for n in servers}     # name -> ({conc: summary}, serial reference outputs)
    t0 = time.perf_counter()
    for c in levels:        # the servers in turn at each level, so that both see the same machine
        for n in servers:
            make, st = makers[n]
            lv, ref = run_level(n, make, c, requests, st, results[n][1], logdir)
            results[n][0][c] = lv
            results[n] = (results[n][0], ref)
    print()
    print(f"model {model.name}; {args.requests} requests per level, {args.max_tokens} max tokens, "
          f"temperature {args.temperature:g}, built-in prompts of {lo}-{hi} words "
          "(mean prompt tokens: " + ", ".join(f"{n} {results[n][0][levels[0]]['mean_prompt_tokens'] or 0:.0f}"
                                              for n in servers) + f"), {args.threads} threads, {os.cpu_count()} CPUs")
    print("refinfer: /v1/completions (token ids via logprobs + return_tokens_as_token_ids); "
          "llama-server: /completion (token ids in each chunk)")
    for n in servers:
        for c in levels:
            lv = results[n][0][c]
            print(f"  {n} -np/--parallel {c}: {lv['server_cmd']}  (1-min load average before/after: "
                  f"{lv['loadavg_1min_before']:.2f}/{lv['loadavg_1min_after']:.2f})")
    print()
    print(table(results, levels, args.requests))
    if len(servers) == 2:
        ra, rb = (results[n][1] for n in servers)
        same = sum(ra[k].ok and rb[k].ok and ra[k].token_ids == rb[k].token_ids for k in ra)
        print(f"serial outputs equal across the two servers (token ids): {same} of {len(ra)}")
    print(f"wall time {time.perf_counter() - t0:.0f} s; server logs in {logdir}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({n: {str(c): lv for c, lv in results[n][0].items()} for n in servers}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
