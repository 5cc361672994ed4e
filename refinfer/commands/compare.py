"""python -m refinfer compare A B [--tolerance-table FILE]"""

from __future__ import annotations

import json
import sys

from .. import threads

HELP = ("compare two activation dumps (or a dump against llama.cpp) tensor by tensor; exit 0 when all agree, "
        "1 at the first divergence, 2 on bad input")


def add_arguments(p):
    p.add_argument("reference", help="reference dump (.safetensors written by `dump`): the NMSE denominator")
    p.add_argument("test", nargs="?", default=None, help="dump to check against the reference")
    p.add_argument("--llama-cpp", metavar="MODEL", default=None,
                   help="instead of a second dump: run llama.cpp (llama-cpp-python) on MODEL with the "
                        "reference dump's tokens and compare its own intermediate tensors")
    p.add_argument("--tolerance-table", metavar="FILE", default=None,
                   help='JSON {"default": {"nmse": 1e-2}, "tensors": {"kq-*": {"nmse": 1e-3, "max_abs": 0.5, "cos": 0.999}}}; '
                        "first matching glob wins (default: nmse 2e-2 for every tensor)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the verdict")
    p.add_argument("--json", metavar="FILE", default=None, help="also write every tensor's numbers to FILE as JSON")
    threads.add_argument(p, default_help="1 for llama.cpp (--llama-cpp)")


def _llama_dump(ref, model_path, n_threads):
    import pathlib
    from ..dump import Dump, capture_llama_cpp, sha256_file
    from ..errors import RefinferError
    if not pathlib.Path(model_path).is_file():
        raise RefinferError(f"--llama-cpp {model_path}: no such model file", hint="give the GGUF file the reference was dumped from")
    want = ref.header.get("model_sha256")
    got = sha256_file(model_path)
    if want and want != got:
        raise RefinferError(f"{model_path} (sha256 {got[:16]}...) is not the model of {ref.path} "
                            f"({ref.header.get('model_file')}, sha256 {want[:16]}...)",
                            hint="give --llama-cpp the model file the reference dump was made from")
    tensors = capture_llama_cpp(model_path, [int(t) for t in ref.tokens], n_threads=n_threads)
    return Dump({"engine": "llama.cpp", "mode": "llama.cpp-default"}, ref.tokens.copy(), tensors, f"llama.cpp:{model_path}")


def _label(d):
    h = d.header
    return f"{d.path} ({h.get('engine', '?')}, mode {h.get('mode', '?')}, backend {h.get('backend', '?')})"


def run(args) -> int:
    from ..dump import compare_dumps, load_tolerances, read_dump, summarise_names
    from ..errors import RefinferError
    from ..output_files import check_output_path

    if (args.test is None) == (args.llama_cpp is None):
        raise RefinferError("give a second dump or --llama-cpp MODEL (exactly one)",
                            hint="compare REF.safetensors TEST.safetensors, or compare REF.safetensors --llama-cpp MODEL.gguf")
    threads.check(args.threads)
    check_output_path(args.json, "--json")
    table = load_tolerances(args.tolerance_table)
    ref = read_dump(args.reference)
    if args.test is not None:
        test = read_dump(args.test)
    else:
        threads.set_threads(args.threads)
        test = _llama_dump(ref, args.llama_cpp, threads.llama_cpp_threads(args.threads))
    diffs, only_ref, only_test = compare_dumps(ref, test, table)    # check_same_run first: exit 2, not 1
    if not diffs:
        raise RefinferError(f"{ref.path} and {test.path} share no tensor names",
                            hint="see formats/dump-format.md for the names")
    out = sys.stdout
    if not args.quiet:
        print(f"reference: {_label(ref)}\ntest:      {_label(test)}\n{len(ref.tokens)} tokens", file=out)
        print(f"{'tensor':<18} {'shape':<18} {'nmse':>10} {'max|diff|':>10} {'cosine':>12}  status", file=out)
        for d in diffs:
            shape = "x".join(str(s) for s in d.shape)
            print(f"{d.name:<18} {shape:<18} {d.nmse:10.3e} {d.max_abs:10.3e} {d.cos:12.9f}  "
                  f"{'ok' if d.ok else 'FAIL ' + d.why}", file=out)
        if only_ref:
            print(f"only in the reference, not compared ({len(only_ref)}): {summarise_names(only_ref)}", file=out)
        if only_test:
            print(f"only in the test dump, not compared ({len(only_test)}): {summarise_names(only_test)}", file=out)
    bad = [d for d in diffs if not d.ok]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tensors": [dict(name=d.name, shape=list(d.shape), nmse=d.nmse, max_abs=d.max_abs, cos=d.cos,
                                        ok=d.ok, why=d.why) for d in diffs],
                       "first_divergence": bad[0].name if bad else None,
                       "only_in_reference": only_ref, "only_in_test": only_test}, f, indent=1)
    # the verdict is the last line, where a CI log shows it
    if bad:
        first = bad[0]
        print(f"FIRST DIVERGENCE: {first.name} ({first.why}); {len(bad)} of {len(diffs)} tensors beyond tolerance",
              file=out)
        return 1
    worst = max(diffs, key=lambda d: d.nmse)
    print(f"OK: {len(diffs)} tensors within tolerance (largest nmse {worst.nmse:.3e} at {worst.name})", file=out)
    return 0
