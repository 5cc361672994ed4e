"""compare's false positives and detection limits, measured.

1. False `BUG?` verdicts over clean pairs: refinfer ideal (numba) against llama.cpp, both ways,
   and llama.cpp's one-token, flash-attention and F32-KV variants against its default, on
   SmolLM2 over passages of wiki.utf8 (the floor of each length measured and cached), and on
   the six fixture models over their prompts.
2. The smallest scale error (1 + e) and offset (+c) that `compare` calls the first divergence at
   each tensor kind, on SmolLM2 at a sample of layers, either side corrupted: the largest such
   e and c over layers and sides is the kind's detection limit.

    python bench/compare_detection.py [--passages 20] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "formats" / "fixtures"))

from refinfer import floor  # noqa: E402
from refinfer import verdict as V  # noqa: E402
from refinfer.dump import capture_llama_cpp, capture_refinfer, forward_key  # noqa: E402

KINDS = ("attn_norm", "Qcur", "Kcur", "Vcur", "kq", "kqv_out", "attn_out", "ffn_inp", "ffn_norm", "ffn_swiglu",
         "ffn_out", "l_out")
LAYERS = (1, 9, 17, 25, 29)


def pair(model, path, toks):
    llama = capture_llama_cpp(path, toks)
    ideal = {n: a.reshape(llama[n].shape) for n, a in capture_refinfer(model, toks).items() if n in llama}
    return ideal, llama


def count_bugs(ref, test, eff):
    return [v.name for v in V.compare_tensors(ref, test, eff.get) if v.verdict == V.BUG]


def false_positives(args):
    from refinfer.corpus import text
    from refinfer.fetch import default_model_path
    from refinfer.model import load
    rows = []
    path = default_model_path()
    model = load(path, mode="ideal", backend="numba")
    words = text("wiki").split()
    rng = np.random.default_rng(5)
    for i in range(args.passages):
        n_words = int(rng.integers(20, 90))
        start = int(rng.integers(0, len(words) - n_words))
        toks = model.tokenize(" ".join(words[start: start + n_words]))
        eff = floor.effective(floor.for_model(path, toks, quiet=True))
        caps = floor.capture_variants(path, toks)
        llama = caps["default"]
        ideal = {n: a.reshape(llama[n].shape) for n, a in capture_refinfer(model, toks).items() if n in llama}
        found = {"ideal->llama.cpp": count_bugs(ideal, llama, eff), "llama.cpp->ideal": count_bugs(llama, ideal, eff)}
        for v in floor.FLOOR_VARIANTS:
            t = {n: a for n, a in caps[v].items() if not (v == "single_token" and n.startswith("kq-"))}
            found[f"default->{v}"] = count_bugs(llama, t, eff)
        for k, bugs in found.items():
            rows.append({"model": path.name, "T": len(toks), "pair": k, "bugs": bugs})
        print(f"SmolLM2 passage {i}: {len(toks)} tokens, BUG? {sum(len(b) for b in found.values())}", file=sys.stderr)
    fx = ROOT / "formats" / "fixtures"
    expected = json.loads((fx / "expected.json").read_text())
    for name, m in expected["models"].items():
        p = fx / m["file"]
        model = load(p, mode="ideal", backend="numpy")
        for prompt in m["prompts"]:
            toks = prompt["tokens"]
            eff = floor.effective(floor.measure(p, toks))
            ideal, llama = pair(model, p, toks)
            for k, (a, b) in {"ideal->llama.cpp": (ideal, llama), "llama.cpp->ideal": (llama, ideal)}.items():
                rows.append({"model": p.name, "T": len(toks), "pair": k, "bugs": count_bugs(a, b, eff)})
    return rows


def detection_limits():
    from make_floors import SMOLLM2_PROMPT
    from refinfer.fetch import default_model_path
    from refinfer.model import load
    path = default_model_path()
    model = load(path, mode="ideal", backend="numba")
    toks = model.tokenize(SMOLLM2_PROMPT)
    ideal, llama = pair(model, path, toks)
    eff = floor.effective(floor.read(ROOT / "formats" / "fixtures" / f"floor-{path.stem}.json"))
    clean = {"llama": V.compare_tensors(ideal, llama, eff.get), "ideal": V.compare_tensors(llama, ideal, eff.get)}
    assert not any(v.verdict == V.BUG for vs in clean.values() for v in vs), "a clean pair has a BUG?"

    def caught(victim, side, f):
        good, other = (llama, ideal) if side == "llama" else (ideal, llama)
        bad = dict(good, **{victim: f(np.asarray(good[victim], np.float32)).astype(np.float32)})
        merged = {v.name: v for v in clean[side]}
        merged.update((v.name, v) for v in V.compare_tensors(other, bad, eff.get, only=V.related(victim, bad)))
        bugs = [v for v in sorted(merged.values(), key=lambda v: forward_key(v.name)) if v.verdict == V.BUG]
        return bool(bugs) and victim in (bugs[0].alternatives or [bugs[0].name])

    def smallest(victim, side, make):
        lo, hi = 0.0, 0.5
        if not caught(victim, side, make(hi)):
            return float("inf")
        for _ in range(14):
            mid = (lo * hi) ** 0.5 if lo else hi / 16
            if caught(victim, side, make(mid)):
                hi = mid
            else:
                lo = mid
        return hi

    limits = {}
    for kind in list(KINDS) + ["inp_embd", "result_norm", "result_output"]:
        names = [f"{kind}-{layer}" for layer in LAYERS] if kind in KINDS else [kind]
        scale = max(smallest(n, side, lambda e: (lambda a: a * np.float32(1 + e))) for n in names
                    for side in ("llama", "ideal"))
        offset = max(smallest(n, side, lambda c: (lambda a: a + np.float32(c))) for n in names for side in ("llama", "ideal"))
        rms = float(np.median([np.sqrt(np.mean(np.asarray(llama[n], np.float64) ** 2)) for n in names]))
        limits[kind] = {"scale": scale, "offset": offset, "median_rms": rms}
        print(f"{kind:<14} scale {scale:.2e}  offset {offset:.2e}  (median rms {rms:.3g})", file=sys.stderr)
    return {"T": len(toks), "layers": LAYERS, "limits": limits}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=20, help="SmolLM2 passages of wiki.utf8 (5 pairs each)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    t0 = time.time()
    rows = false_positives(args)
    n_bug = sum(len(r["bugs"]) for r in rows)
    print(f"\n{len(rows)} clean pairs, {sum(1 for r in rows if r['bugs'])} with a BUG? ({n_bug} tensors)")
    for r in rows:
        if r["bugs"]:
            print(f"  {r['model']} T={r['T']} {r['pair']}: {', '.join(r['bugs'])}")
    limits = detection_limits()
    print(f"\nsmallest error caught at its tensor (SmolLM2, {limits['T']} tokens, layers {limits['layers']}, "
          "either side; the largest over them):")
    print("| kind | scale 1+e: e | offset +c: c | c / median RMS |\n|---|---|---|---|")
    for kind, lim in limits["limits"].items():
        print(f"| {kind} | {lim['scale']:.2g} | {lim['offset']:.2g} | {lim['offset'] / lim['median_rms']:.2g} |")
    print(f"\n({time.time() - t0:.0f} s)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"pairs": rows, "limits": limits}, indent=1))


if __name__ == "__main__":
    main()
