"""A refinfer server in a background thread of the test process, on a free loopback port.

    with serve_model(model, parallel=4) as url:      # "http://127.0.0.1:PORT"
        ...

uvicorn runs the app of refinfer.server.create_app; leaving the block stops the server and
its engine thread. Every wait is bounded."""

from __future__ import annotations

import contextlib
import threading
import time

import uvicorn

from refinfer.server import create_app

START_TIMEOUT_S = 60


@contextlib.contextmanager
def serve_app(app):
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def serve_model(model=None, **kwargs):
    """create_app(model, **kwargs) served on loopback; yields the base URL."""
    with serve_app(create_app(model, **kwargs)) as url:
        yield url
