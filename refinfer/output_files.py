"""Files refinfer writes: their paths checked before any work starts (a run of an hour must
not end in `cannot write`), and their bytes written under a temporary name beside the target
and renamed at the end, so that an interrupted run leaves no half file."""

from __future__ import annotations

import os
import tempfile

from .errors import RefinferError


def check_output_path(path, option: str):
    """Raise a RefinferError naming option and path unless a file can be written at path:
    its directory exists and takes a new file, and path is not a directory. Nothing is left
    behind (a probe file is created in the directory and removed)."""
    if path is None:
        return
    path = os.fspath(path)
    if os.path.isdir(path):
        raise RefinferError(f"{option} {path!r} is a directory", hint=f"give {option} the name of a file to write")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        what = "is a file, not a directory" if os.path.exists(parent) else "does not exist"
        raise RefinferError(f"{option} {path!r}: the directory {parent!r} {what}",
                            hint=f"create the directory first (mkdir -p {parent}) or write somewhere else")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise RefinferError(f"{option} {path!r} exists and is not writable", hint="choose another file name")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise RefinferError(f"{option} {path!r}: cannot write in {parent!r}: {e.strerror}",
                            hint="choose a directory you can write to") from None


def check_distinct(paths: dict):
    """paths {option: path or None}: two outputs on one file would overwrite each other."""
    seen = {}
    for option, path in paths.items():
        if path is None:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise RefinferError(f"{seen[key]} and {option} name the same file {path!r}",
                                hint="give each output its own file")
        seen[key] = option


def temp_beside(path, prefix=".", suffix=".part") -> tuple:
    """(fd, name) of a new temporary file in path's directory, to be renamed by publish()."""
    return tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=os.path.dirname(os.path.abspath(path)))


def publish(tmp, path):
    """Rename the finished temporary file tmp to path, with the permissions any new file gets
    (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
