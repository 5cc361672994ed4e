"""Results of the child processes that tests start: a crash is a failure, never a skip."""

from __future__ import annotations

import signal
import subprocess

import pytest


def finished(p: subprocess.CompletedProcess, what: str) -> str:
    """The stdout of a child that exited with status 0; anything else (a signal, an uncaught
    exception, a non-zero exit) fails the calling test with the child's output."""
    if p.returncode != 0:
        how = f"exit status {p.returncode}"
        if p.returncode < 0:
            how = f"signal {signal.Signals(-p.returncode).name}"
        pytest.fail(f"{what}: the child process ended with {how}\n--- stdout\n{p.stdout[-4000:]}\n"
                    f"--- stderr\n{p.stderr[-4000:]}", pytrace=False)
    return p.stdout
