"""python -m refinfer compare A B: bug or rounding, per tensor"""

from __future__ import annotations

import json
import math
import sys

from .. import threads

HELP = ("compare two activation dumps (or a dump against llama.cpp or transformers) tensor by tensor: bug or "
        "rounding? exit 0 when nothing is systematic, 1 at the first divergence, 2 on bad input")


def add_arguments(p):
    p.add_argument("reference", help="reference dump (.safetensors written by `dump`): the NMSE denominator")
    p.add_argument("test", nargs="?", default=None, help="dump to check against the reference")
    p.add_argument("--llama-cpp", metavar="MODEL", default=None,
                   help="instead of a second dump: run llama.cpp (llama-cpp-python) on MODEL with the "
                        "reference dump's tokens and compare its own intermediate tensors")
    p.add_argument("--transformers", metavar="DIR", default=None,
                   help="instead of a second dump: run HF transformers (float32, CPU) on the HF checkpoint DIR "
                        "with the reference dump's tokens and compare its tensors")
    p.add_argument("--floor", metavar="FILE", default=None,
                   help="llama.cpp's noise floor (written by `floor` or `dump --floor`); default: measured on "
                        "-m/--llama-cpp MODEL (cached), else the shipped table of the dumps' model, else the "
                        "shipped tables by tensor kind")
    p.add_argument("-m", "--model", default=None, help="GGUF file of the dumps: measure its floor (cached)")
    p.add_argument("--strict", action="store_true",
                   help="any difference is a divergence (two dumps of the same engine and settings)")
    p.add_argument("--tolerance-table", metavar="FILE", default=None,
                   help='fixed NMSE limits instead of the floor: JSON {"default": {"nmse": 1e-2}, "tensors": '
                        '{"kq-*": {"nmse": 1e-3, "max_abs": 0.5, "cos": 0.999}}}; first matching glob wins')
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
    return Dump({"engine": "llama.cpp", "mode": "llama.cpp-default", "model_sha256": got}, ref.tokens.copy(), tensors,
                f"llama.cpp:{model_path}")


def _transformers_dump(ref, model_dir):
    import pathlib
    from ..dump import Dump
    from ..errors import RefinferError
    if not pathlib.Path(model_dir).is_dir():
        raise RefinferError(f"--transformers {model_dir}: not a directory",
                            hint="give an HF checkpoint directory (config.json, *.safetensors); "
                                 "export-hf GGUF DIR writes one from a GGUF")
    from ..hf_oracle import capture_transformers
    _, tensors = capture_transformers(model_dir, [int(t) for t in ref.tokens])
    return Dump({"engine": "transformers", "mode": "float32"}, ref.tokens.copy(), tensors, f"transformers:{model_dir}")


def _label(d):
    h = d.header
    return f"{d.path} ({h.get('engine', '?')}, mode {h.get('mode', '?')}, backend {h.get('backend', '?')})"


def _method(args, ref, test):
    """(method, why): strict / tight / floor / table."""
    if args.tolerance_table:
        return "table", "fixed tolerances (--tolerance-table)"
    if args.strict:
        return "strict", "any difference (--strict)"
    a, b = ref.header, test.header
    if args.floor is None and a.get("engine") == b.get("engine") == "refinfer" and a.get("mode") == b.get("mode"):
        return "tight", f"both dumps are refinfer in {a.get('mode')} mode: nmse <= 1e-10, as between its backends"
    pair = {(h.get("engine"), h.get("mode")) for h in (a, b)}
    if args.floor is None and pair == {("refinfer", "ideal"), ("transformers", "float32")}:
        return "tight", "refinfer ideal against transformers float32: nmse <= 1e-10 (they agree to about 1e-12)"
    return "floor", ""


def _floor(args, ref, model_path, n_threads):
    """(lookup name -> effective floor entry, description)."""
    from .. import floor
    if args.floor:
        table = floor.read(args.floor)
        if not ref.header.get("model_sha256") or table.get("model_sha256") == ref.header.get("model_sha256"):
            return floor.effective(table).get, args.floor
        kinds = floor.by_kind(floor.effective(table))
        return (lambda name: kinds.get(floor.kind(name))), f"{args.floor} (another model's floor: used by tensor kind)"
    if model_path:
        table = floor.for_model(model_path, [int(t) for t in ref.tokens], n_threads=n_threads)
        eff = floor.effective(table)
        return eff.get, f"llama.cpp's variants on {model_path} at {len(ref.tokens)} tokens ({table['source']})"
    table, exact = floor.shipped(ref.header.get("model_sha256"))
    if table is None:
        from ..errors import RefinferError
        raise RefinferError("no floor table: none given, no model, none shipped",
                            hint="give --floor FILE (python -m refinfer floor -m MODEL -p PROMPT -o FILE) or -m MODEL")
    if exact:
        return floor.effective(table).get, f"{table['source']} (shipped, this model)"
    kinds = table["kinds"]
    return (lambda name: kinds.get(floor.kind(name))), table["source"]


def run(args) -> int:
    from .. import verdict as V
    from ..dump import compare_dumps, load_tolerances, read_dump, summarise_names, forward_key
    from ..errors import RefinferError
    from ..output_files import check_output_path

    sources = [x for x in (args.test, args.llama_cpp, args.transformers) if x is not None]
    if len(sources) != 1:
        raise RefinferError("give a second dump, --llama-cpp MODEL or --transformers DIR (exactly one)",
                            hint="compare REF.safetensors TEST.safetensors, or compare REF.safetensors --llama-cpp MODEL.gguf")
    if args.strict and args.tolerance_table:
        raise RefinferError("--strict and --tolerance-table are two different verdicts", hint="give one of them")
    threads.check(args.threads)
    check_output_path(args.json, "--json")
    ref = read_dump(args.reference)
    n_threads = threads.llama_cpp_threads(args.threads)
    if args.test is not None:
        test = read_dump(args.test)
    elif args.llama_cpp is not None:
        threads.set_threads(args.threads)
        test = _llama_dump(ref, args.llama_cpp, n_threads)
    else:
        test = _transformers_dump(ref, args.transformers)
    out = sys.stdout
    method, method_why = _method(args, ref, test)
    if method == "table":
        return _run_table(args, ref, test, load_tolerances(args.tolerance_table), out)

    diffs, only_ref, only_test = compare_dumps(ref, test, {"default": {}})   # check_same_run: exit 2, not 1
    if not diffs:
        raise RefinferError(f"{ref.path} and {test.path} share no tensor names", hint="see formats/dump-format.md for the names")
    names = sorted(set(ref.tensors) & set(test.tensors), key=forward_key)
    lookup, floor_src = (lambda name: None), ""
    if method == "floor":
        lookup, floor_src = _floor(args, ref, args.model or args.llama_cpp, n_threads)
        method_why = f"against llama.cpp's noise floor: {floor_src}"
    n_tests = V.n_tests_for([(n, ref.tensors[n].shape) for n in names])
    verdicts = V.compare_tensors(ref.tensors, test.tensors, lookup, method=method)

    if not args.quiet:
        print(f"reference: {_label(ref)}\ntest:      {_label(test)}\n{len(ref.tokens)} tokens; verdicts {method_why}",
              file=out)
        print(f"{'tensor':<16} {'shape':<14} {'nmse':>9} {'x floor':>8} {'scale s-1':>10} {'z':>7} "
              f"{'offset c':>9} {'z':>7}  verdict", file=out)
        for v in verdicts:
            shape = "x".join(str(s) for s in v.shape)
            st = v.structure
            ratio = f"{v.ratio:8.3g}" if math.isfinite(v.ratio) else f"{'-':>8}"
            fit = (f"{st.scale.value:+10.2e} {st.scale.z():+7.1f} {st.offset.value:+9.2e} {st.offset.z():+7.1f}"
                   if st else f"{'-':>10} {'-':>7} {'-':>9} {'-':>7}")
            print(f"{v.name:<16} {shape:<14} {v.nmse:9.2e} {ratio} {fit}  {v.verdict}"
                  + (f"  {v.why}" if v.verdict != V.OK else ""), file=out)
        if only_ref:
            print(f"only in the reference, not compared ({len(only_ref)}): {summarise_names(only_ref)}", file=out)
        if only_test:
            print(f"only in the test dump, not compared ({len(only_test)}): {summarise_names(only_test)}", file=out)
    bugs = sorted((v for v in verdicts if v.verdict == V.BUG), key=lambda v: forward_key(v.name))
    rounding = [v for v in verdicts if v.verdict == V.ROUNDING]
    if args.json:
        def num(x):
            return x if (x is None or math.isfinite(x)) else None
        rows = []
        for v in verdicts:
            st = v.structure
            rows.append(dict(name=v.name, shape=list(v.shape), nmse=num(v.nmse), max_abs=num(v.max_abs), cos=v.cos,
                             floor_nmse=num(v.floor_nmse), verdict=v.verdict, why=v.why,
                             scale=num(st.scale.value) if st else None, scale_z=num(st.scale.z()) if st else None,
                             offset=num(st.offset.value) if st else None, offset_z=num(st.offset.z()) if st else None,
                             worst_position=st.worst_position if st else None,
                             worst_head=st.worst_head if st else None))
        with open(args.json, "w") as f:
            json.dump({"method": method, "floor": floor_src, "n_tests": n_tests, "tensors": rows,
                       "first_divergence": bugs[0].name if bugs else None,
                       "only_in_reference": only_ref, "only_in_test": only_test}, f, indent=1)
    # the verdict is the last line, where a CI log shows it
    if bugs:
        first = bugs[0]
        label = " or ".join(getattr(first, "alternatives", None) or [first.name])
        print(f"FIRST DIVERGENCE: {label} ({first.why}); {len(bugs)} of {len(verdicts)} tensors BUG?"
              + (f", {len(rounding)} rounding?" if rounding else ""), file=out)
        return 1
    if rounding:
        print(f"warning: {len(rounding)} tensors beyond {V.SOFT_MULTIPLE:g}x the floor but not systematic (rounding?): "
              f"{summarise_names([v.name for v in rounding])}", file=out)
    worst = max(verdicts, key=lambda v: v.nmse)
    print(f"OK: {len(verdicts)} tensors, nothing systematic (largest nmse {worst.nmse:.3e} at {worst.name}"
          + (f", {len(rounding)} rounding?" if rounding else "") + ")", file=out)
    return 0


def _run_table(args, ref, test, table, out) -> int:
    """The fixed-tolerance verdict of --tolerance-table: NMSE, max|diff| and cosine limits."""
    from ..dump import compare_dumps, summarise_names
    from ..errors import RefinferError
    diffs, only_ref, only_test = compare_dumps(ref, test, table)
    if not diffs:
        raise RefinferError(f"{ref.path} and {test.path} share no tensor names", hint="see formats/dump-format.md for the names")
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
            json.dump({"method": "table", "tensors": [dict(name=d.name, shape=list(d.shape), nmse=d.nmse, max_abs=d.max_abs,
                                                           cos=d.cos, ok=d.ok, why=d.why) for d in diffs],
                       "first_divergence": bad[0].name if bad else None,
                       "only_in_reference": only_ref, "only_in_test": only_test}, f, indent=1)
    if bad:
        first = bad[0]
        print(f"FIRST DIVERGENCE: {first.name} ({first.why}); {len(bad)} of {len(diffs)} tensors beyond tolerance",
              file=out)
        return 1
    worst = max(diffs, key=lambda d: d.nmse)
    print(f"OK: {len(diffs)} tensors within tolerance (largest nmse {worst.nmse:.3e} at {worst.name})", file=out)
    return 0
