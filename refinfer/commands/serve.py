"""python -m refinfer serve [-m MODEL] [--host 127.0.0.1] [--port 8080] ...

An OpenAI-compatible server (refinfer/server/) over the continuous-batching engine. The server
listens at once; the model loads in a thread meanwhile, and /health answers 503 until it is
ready. Every option is checked before the server starts.
"""

from __future__ import annotations

import sys

from .. import threads
from .kv_args import add_kv_arguments, check_kv, kv_kwargs

HELP = "serve a model over an OpenAI-compatible HTTP API, with a chat page (default: loopback, port 8080)"


def add_arguments(p):
    p.add_argument("-m", "--model", default=None, help="GGUF file or HF safetensors directory (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--parallel", "-np", type=int, default=4,
                   help="sequences the engine runs at once (its max_batch; default 4)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences that may wait beyond the running ones; more are answered 503 (default 64)")
    p.add_argument("--ctx", "-c", type=int, default=None, help="context length served (default: the model's)")
    p.add_argument("--kv-cache-mib", type=float, default=None, help="KV pool size in MiB (default: the context length)")
    p.add_argument("--max-tokens-per-step", type=int, default=512,
                   help="tokens in an engine step at most: prompt chunks and one per decoding sequence (default 512)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API routes")
    p.add_argument("--model-alias", default=None, help="the model's name in the API (default: its file name)")
    p.add_argument("--backend", default=None, help="compute backend: numba (the default when installed), numpy (the reference) or cuda")
    p.add_argument("--mode", default="ideal", metavar="ideal|ggml",
                   help="numerics: ideal (exact float; batch-invariant) or ggml (llama.cpp's CPU roundings)")
    p.add_argument("--dequant", default="deployed", metavar="deployed|exact",
                   help="GPTQ/AWQ/compressed-tensors checkpoints: deployed (default) or exact dequantization")
    p.add_argument("--a16", action="store_true", help="GPTQ/AWQ/compressed-tensors checkpoints: fp16 activations")
    add_kv_arguments(p)
    threads.add_argument(p)


def check_args(args):
    from ..backends import check_backend_name
    from ..errors import RefinferError
    from ..model import check_dequant

    def positive(name, v, lo=1, hi=None):
        if v is None or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
            raise RefinferError(f"{name} must be an integer in {lo}..{hi if hi is not None else 'inf'}, got {v!r}",
                                hint=f"python -m refinfer serve {name} N")
    if not 0 <= args.port <= 65535:
        raise RefinferError(f"--port must be in 0..65535, got {args.port}", hint="e.g. --port 8080 (0: any free port)")
    positive("--parallel", args.parallel, 1, 1024)
    positive("--max-queue", args.max_queue, 0)
    positive("--max-tokens-per-step", args.max_tokens_per_step)
    if args.ctx is not None:
        positive("--ctx", args.ctx, 2)
    if args.kv_cache_mib is not None and not args.kv_cache_mib > 0:
        raise RefinferError(f"--kv-cache-mib must be > 0, got {args.kv_cache_mib}", hint="e.g. --kv-cache-mib 512")
    if args.api_key is not None and not args.api_key.strip():
        raise RefinferError("--api-key is empty", hint="give a key, or leave out --api-key for no authentication")
    check_backend_name(args.backend, args.mode)
    check_dequant(args.dequant, "--dequant")
    check_kv(args)
    threads.check(args.threads)


def check_listen(host, port):
    import socket

    from ..errors import RefinferError
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        raise RefinferError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                            hint="give another --port (0: any free port), or --host 127.0.0.1") from None


def run(args) -> int:
    import uvicorn

    from ..model import load
    from ..server import create_app

    check_args(args)
    check_listen(args.host, args.port)
    threads.set_threads(args.threads)

    def loader():
        return load(args.model, backend=args.backend, mode=args.mode, dequant=args.dequant, a16=args.a16,
                    **kv_kwargs(args))

    app = create_app(loader=loader, parallel=args.parallel, max_queue=args.max_queue, api_key=args.api_key,
                     model_alias=args.model_alias, kv_cache_mib=args.kv_cache_mib, ctx=args.ctx,
                     max_tokens_per_step=args.max_tokens_per_step)
    st = app.state.refinfer

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    import threading

    def announce():
        # once the socket is bound and the model loaded; the port may have been 0 (any free one)
        while not server.started:
            if server.should_exit:
                return
            threading.Event().wait(0.05)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else args.port
        print(f"refinfer server listening on http://{args.host}:{port} (model loading)", file=sys.stderr, flush=True)
        st.loaded.wait()
        if st.load_error:
            server.should_exit = True
            return
        print(f"model {st.name} ready: {st.fingerprint}; chat page http://{args.host}:{port}/, "
              f"API http://{args.host}:{port}/v1, docs http://{args.host}:{port}/docs", file=sys.stderr, flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run()
    if st.load_error:
        from ..errors import RefinferError
        raise RefinferError(f"the model did not load: {st.load_error}", hint="check -m/--model")
    return 0
