"""`python -m refinfer COMMAND ...`: one module per command under refinfer/commands/.

Each command module defines HELP (one line), add_arguments(parser) and run(args) -> int.
Errors derived from RefinferError print `error: ...` and `hint: ...` and exit 2; --debug
shows the traceback instead. Warnings (a backend falling back to the reference, a mode that is
not exact on the chosen backend) print one `warning: ...` line each on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .errors import RefinferError

COMMANDS = ["generate", "batch", "inspect", "quantize", "imatrix", "convert", "export-hf", "dump", "floor", "compare", "perplexity", "kld", "backends", "bench", "serve", "bench-serve", "calibrate-kv"]


def _load(name):
    return importlib.import_module(f"refinfer.commands.{name.replace('-', '_')}")


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown option, a value that is not a number) in the same
    shape as every other error: usage, `error: ...`, `hint: ...`, exit 2."""

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        print(f"hint: {self.prog} --help lists the options and what they accept", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = _Parser(prog="python -m refinfer", description="refinfer: reference LLM inference")
    p.add_argument("--version", action="version", version=f"refinfer {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = _load(name)
        except ImportError as e:  # a command whose optional dependency is missing
            if f"refinfer.commands.{name}" in str(e) or getattr(e, "name", None) == f"refinfer.commands.{name}":
                continue
            raise
        sp = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # refinfer's own warnings speak to the user; others keep their category's name
    what = "" if category.__module__.startswith("refinfer") else f"{category.__name__}: "
    print(f"warning: {what}{message}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:         # --help, --version, or a usage error already printed
        return int(e.code or 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(args)


def _run(args) -> int:
    try:
        return int(args._run(args) or 0)
    except RefinferError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
