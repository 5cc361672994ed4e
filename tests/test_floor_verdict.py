"""compare's verdicts: llama.cpp's noise floor per tensor, the systematic part of a difference,
and the identities inside a dump. Clean comparisons (refinfer ideal against llama.cpp, and
llama.cpp's variants against its default) give no `BUG?`; a 1% scale, a +0.05 offset or one row
replaced by noise, injected at a single tensor of either dump, is the first divergence."""

from __future__ import annotations

import functools
import json
import math
import pathlib
import sys

import numpy as np
import pytest

from refinfer import floor
from refinfer import verdict as V
from refinfer.cli import main
from refinfer.dump import capture_llama_cpp, capture_refinfer, forward_key, sha256_file, write_dump
from refinfer.model import load

pytest.importorskip("llama_cpp")

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "formats" / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_floors import SMOLLM2_PROMPT  # noqa: E402

KINDS = ("attn_norm", "Qcur", "Kcur", "Vcur", "kq", "kqv_out", "attn_out", "ffn_inp", "ffn_norm", "ffn_swiglu",
         "ffn_out", "l_out")
BUGS = ("scale", "offset", "row")
# result_output + 0.05 is left out on purpose: a constant added to every logit changes no
# probability, and between refinfer ideal and llama.cpp the logits' own fitted offset reaches
# 0.5% of their RMS (llama.cpp's F32-KV variant: 0.56%), so 0.05 (about 0.8%) is below what
# can be told from rounding (README: the smallest detectable errors).
SKIPPED_CASES = {("result_output", "offset")}


def inject(name, a, bug, rng):
    a = np.asarray(a, np.float32)
    if bug == "scale":
        return a * np.float32(1.01)
    if bug == "offset":
        return a + np.float32(0.05)
    b = V.by_position(name, a).copy()                       # positions first
    rms = float(np.sqrt(np.mean(np.asarray(a, np.float64) ** 2)))
    b[rng.integers(b.shape[0])] = rng.standard_normal(b.shape[1:]) * rms
    return np.moveaxis(b, 0, V.position_axis(name)).astype(np.float32)


def first_divergence(clean, verdicts):
    """The first BUG? in forward order when the verdicts of `verdicts` replace those of clean."""
    merged = {v.name: v for v in clean}
    merged.update((v.name, v) for v in verdicts)
    bugs = [v for v in sorted(merged.values(), key=lambda v: forward_key(v.name)) if v.verdict == V.BUG]
    return bugs[0] if bugs else None


def names_of(v):
    return v.alternatives or [v.name]


# ---- SmolLM2 ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(smollm2_path):
    model = load(smollm2_path, mode="ideal", backend="numba")
    toks = model.tokenize(SMOLLM2_PROMPT)
    caps = floor.capture_variants(smollm2_path, toks)
    base = caps["default"]
    ideal = {n: a.reshape(base[n].shape) for n, a in capture_refinfer(model, toks).items() if n in base}
    shipped = floor.read(FIXTURES / f"floor-{pathlib.Path(smollm2_path).stem}.json")
    eff = floor.effective(shipped)
    clean = {"llama": V.compare_tensors(ideal, base, eff.get), "ideal": V.compare_tensors(base, ideal, eff.get)}
    return dict(path=smollm2_path, toks=toks, caps=caps, llama=base, ideal=ideal, shipped=shipped, eff=eff, clean=clean)


def test_shipped_smollm2_floor_is_llama_cpp_s_own(smol):
    """formats/fixtures/floor-SmolLM2...json is what llama.cpp's variants give today, bit for bit
    (a table of llama.cpp's outputs, not of refinfer's)."""
    table = floor.floor_table(smol["caps"], {})
    assert smol["shipped"]["tokens"] == [int(t) for t in smol["toks"]]
    assert table["tensors"] == smol["shipped"]["tensors"]


def test_clean_comparisons_have_no_bug(smol):
    """refinfer ideal against llama.cpp both ways, and llama.cpp's variants against its default:
    nothing systematic (rounding? is allowed: it exits 0)."""
    for direction, verdicts in smol["clean"].items():
        assert [v.name for v in verdicts if v.verdict == V.BUG] == [], direction
        assert len(verdicts) == 363
    for variant in floor.FLOOR_VARIANTS:
        test = {n: a for n, a in smol["caps"][variant].items()
                if not (variant == "single_token" and n.startswith("kq-"))}   # the causal half only
        verdicts = V.compare_tensors(smol["llama"], test, smol["eff"].get)
        assert [(v.name, v.why) for v in verdicts if v.verdict == V.BUG] == [], variant


SMOL_CASES = [(f"{k}-{(1, 9, 17, 25, 29)[i % 5]}", bug, side)
              for i, k in enumerate(KINDS) for bug in BUGS for side in ("llama", "ideal")]
SMOL_CASES += [(n, bug, side) for n in ("inp_embd", "result_norm", "result_output") for bug in BUGS
               for side in ("llama", "ideal") if (n, bug) not in SKIPPED_CASES]


@pytest.mark.parametrize("victim,bug,side", SMOL_CASES)
def test_injected_error_is_the_first_divergence(smol, victim, bug, side):
    """side: the dump that is corrupted (the other one is the reference). Only the verdicts an
    injection at victim can move are recomputed (verdict.related); the rest are the clean run's,
    which test_clean_comparisons_have_no_bug checks."""
    rng = np.random.default_rng(abs(hash((victim, bug, side))) % 2**32)
    good, other = (smol["llama"], smol["ideal"]) if side == "llama" else (smol["ideal"], smol["llama"])
    bad = dict(good, **{victim: inject(victim, good[victim], bug, rng)})
    verdicts = V.compare_tensors(other, bad, smol["eff"].get, only=V.related(victim, bad))
    first = first_divergence(smol["clean"][side], verdicts)
    assert first is not None and victim in names_of(first), (first and (first.name, first.why))


def _write(path, tensors, tokens, model_path, engine):
    write_dump(path, tensors, tokens, {"engine": engine, "mode": "ideal" if engine == "refinfer" else "llama.cpp-default",
                                       "model_file": pathlib.Path(model_path).name,
                                       "model_sha256": sha256_file(model_path)})


def test_the_issue_example_exits_1_at_the_tensor(smol, tmp_path, capsys):
    """l_out-17 * 1.01 + 0.05 in a llama.cpp dump, against refinfer ideal: the old single NMSE
    limit called it OK (nmse 1e-4). With no --floor and no model, compare takes the shipped
    table of the dumps' model (by its sha256)."""
    ideal, llama = tmp_path / "ideal.safetensors", tmp_path / "bad.safetensors"
    _write(ideal, smol["ideal"], smol["toks"], smol["path"], "refinfer")
    bad = dict(smol["llama"], **{"l_out-17": smol["llama"]["l_out-17"] * np.float32(1.01) + np.float32(0.05)})
    _write(llama, bad, smol["toks"], smol["path"], "llama.cpp")
    rc = main(["compare", str(ideal), str(llama), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "(shipped, this model)" in out
    assert out.splitlines()[-1].startswith("FIRST DIVERGENCE: l_out-17 (the test dump breaks")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["first_divergence"] == "l_out-17" and report["method"] == "floor"
    _write(llama, smol["llama"], smol["toks"], smol["path"], "llama.cpp")
    rc = main(["compare", str(ideal), str(llama)])
    out = capsys.readouterr().out
    assert rc == 0 and out.splitlines()[-1].startswith("OK: 363 tensors, nothing systematic"), out


# ---- the generated fixture models ----------------------------------------------------------

@functools.lru_cache(maxsize=None)
def fixture_models():
    expected = json.loads((FIXTURES / "expected.json").read_text())
    out = {}
    for name, m in expected["models"].items():
        path = FIXTURES / m["file"]
        model = load(path, mode="ideal", backend="numpy")
        eff = floor.effective(floor.read(FIXTURES / f"floor-{path.stem}.json"))
        out[name] = dict(path=path, model=model, eff=eff, prompts=[p["tokens"] for p in m["prompts"]], floor=m)
    return out


@pytest.fixture(scope="module")
def fixtures():
    return fixture_models()


def test_shipped_fixture_floors_are_llama_cpp_s_own(fixtures):
    for name, f in fixtures.items():
        table = floor.measure(f["path"], f["prompts"][0])
        assert table["tensors"] == floor.read(FIXTURES / f"floor-{f['path'].stem}.json")["tensors"], name


def _pair(f, toks):
    llama = capture_llama_cpp(f["path"], toks)
    ideal = {n: a.reshape(llama[n].shape) for n, a in capture_refinfer(f["model"], toks).items() if n in llama}
    return ideal, llama


def check_fixture_clean_pairs(fixtures):
    """Every fixture model and prompt, refinfer ideal against llama.cpp both ways (part of the
    false-positive count; bench/compare_detection.py runs the rest)."""
    n = 0
    for name, f in fixtures.items():
        for toks in f["prompts"]:
            ideal, llama = _pair(f, toks)
            for ref, test in ((ideal, llama), (llama, ideal)):
                bugs = [(v.name, v.why) for v in V.compare_tensors(ref, test, floor.effective(
                    floor.read(FIXTURES / f"floor-{f['path'].stem}.json")).get) if v.verdict == V.BUG]
                assert bugs == [], (name, toks)
                n += 1
    assert n >= 30


def test_fixture_models_clean_pairs_have_no_bug(fixtures):
    check_fixture_clean_pairs(fixtures)


GENERATED_TOKENS = [1] + list(np.random.default_rng(11).integers(3, 32000, 63))   # 64 positions


@functools.lru_cache(maxsize=None)
def generated_workload():
    """tiny-llama-q4_0 on 64 seeded random tokens, its floor measured on them."""
    f = fixture_models()["q4_0"]
    ideal, llama = _pair(f, GENERATED_TOKENS)
    eff = floor.effective(floor.measure(f["path"], GENERATED_TOKENS))
    clean = {"llama": V.compare_tensors(ideal, llama, eff.get), "ideal": V.compare_tensors(llama, ideal, eff.get)}
    return dict(ideal=ideal, llama=llama, eff=eff, clean=clean)


@pytest.fixture(scope="module")
def generated():
    return generated_workload()


def check_generated_clean(generated):
    for side, verdicts in generated["clean"].items():
        assert [(v.name, v.why) for v in verdicts if v.verdict == V.BUG] == [], side


def test_generated_model_clean_pairs_have_no_bug(generated):
    check_generated_clean(generated)


def check_generated_injection(generated, victim):
    """tiny-llama-q4_0 (dim 32, 2 layers), each side corrupted in turn, every bug."""
    rng = np.random.default_rng(7)
    for side in ("llama", "ideal"):
        good, other = (generated["llama"], generated["ideal"]) if side == "llama" else (generated["ideal"], generated["llama"])
        for bug in BUGS:
            if (victim, bug) in SKIPPED_CASES:
                continue
            bad = dict(good, **{victim: inject(victim, good[victim], bug, rng)})
            verdicts = V.compare_tensors(other, bad, generated["eff"].get, only=V.related(victim, bad))
            first = first_divergence(generated["clean"][side], verdicts)
            assert first is not None and victim in names_of(first), (side, bug, first and (first.name, first.why))


@pytest.mark.parametrize("victim", [f"{k}-1" for k in KINDS] + ["inp_embd", "result_norm", "result_output"])
def test_generated_model_injected_errors_are_caught(generated, victim):
    check_generated_injection(generated, victim)


# ---- within one engine, and the statistics -------------------------------------------------

def _q8_dump(fixtures, tmp_path):
    """(tensors, tokens, model path, a.safetensors written from them, b.safetensors to write)."""
    f = fixtures["q8_0"]
    toks = f["prompts"][0]
    tensors = capture_refinfer(f["model"], toks)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _write(a, tensors, toks, f["path"], "refinfer")
    return tensors, toks, f, a, b


def test_two_refinfer_dumps_in_one_mode_get_the_tight_tolerance(fixtures, tmp_path, capsys):
    tensors, toks, f, a, b = _q8_dump(fixtures, tmp_path)
    bad = dict(tensors, **{"Vcur-0": tensors["Vcur-0"] * np.float32(1 + 1e-4)})   # nmse 1e-8: far under any floor
    _write(b, bad, toks, f["path"], "refinfer")
    rc = main(["compare", str(a), str(b)])
    out = capsys.readouterr().out
    assert rc == 1 and "nmse <= 1e-10" in out and out.splitlines()[-1].startswith("FIRST DIVERGENCE: Vcur-0"), out
    rc = main(["compare", str(a), str(a)])
    assert rc == 0, capsys.readouterr().out


def test_strict_reports_any_difference(fixtures, tmp_path, capsys):
    tensors, toks, f, a, b = _q8_dump(fixtures, tmp_path)
    x = tensors["ffn_out-1"].copy()
    x.flat[3] = np.nextafter(x.flat[3], np.float32(np.inf))                    # one ulp
    _write(b, dict(tensors, **{"ffn_out-1": x}), toks, f["path"], "llama.cpp")   # another engine: floor mode
    assert main(["compare", str(a), str(b), "--strict", "-q"]) == 1
    assert "FIRST DIVERGENCE: ffn_out-1 (bits differ" in capsys.readouterr().out
    assert main(["compare", str(a), str(b), "-q"]) == 0     # one ulp is rounding
    capsys.readouterr()


def test_a_systematic_scale_below_the_floor_is_named():
    """Noise with a per-row scale component (what rounding looks like, see verdict's docstring)
    plus a 1% scale: the NMSE is inside a floor set at the noise's own size, the fit is not. The
    same 1% inside rows that scale by +-3% at random is not called a bug: the verdict weighs the
    spread over positions, not only the size."""
    rng = np.random.default_rng(3)
    T, n = 64, 576
    a = rng.standard_normal((T, n)).astype(np.float32)

    def judged(row_scale_sd, bug):
        noise = 1e-2 * rng.standard_normal((T, n)) + a * (row_scale_sd * rng.standard_normal((T, 1)))
        entry = {"floor_nmse": 2 * float(np.mean(noise ** 2)), "floor_row_nmse": 1.0, "sigma_scale": row_scale_sd,
                 "sigma_offset": 1e-3}
        return V.judge("ffn_out-3", a, ((a + noise) * bug).astype(np.float32), floor_entry=entry, n_tests=800), entry

    clean, _ = judged(3e-3, 1.0)
    buggy, entry = judged(3e-3, 1.01)
    assert clean.verdict == V.OK, clean.why
    assert buggy.nmse < 10 * entry["floor_nmse"]
    assert buggy.verdict == V.BUG and "systematic scale" in buggy.why, buggy.why
    hidden, _ = judged(3e-2, 1.01)
    assert hidden.verdict == V.OK and abs(hidden.structure.scale.z()) < V.critical_z(V.ALPHA / 800), hidden.why


def test_student_t_tail_and_critical_values():
    # t with 1 degree of freedom is Cauchy: P(|T| > 1) = 1/2; the normal's two-sided 5% is 1.95996
    assert V.t_tail(1.0, 1) == pytest.approx(0.5, rel=1e-12)
    assert V.critical_z(0.05) == pytest.approx(1.959963985, rel=1e-9)
    assert V.critical_z(0.05, df=10) == pytest.approx(2.228138852, rel=1e-9)   # tables: t_{0.975,10}
    assert V.t_tail(3.0, math.inf) == pytest.approx(math.erfc(3 / math.sqrt(2)))


def test_bad_floor_input_is_a_clear_error(tmp_path, capsys):
    p = tmp_path / "f.json"
    p.write_text('{"format": "refinfer-floor", "format_version": 1, "tensors": {"kq-0": {"nmse": -1}}}')
    with pytest.raises(floor.FormatError) as e:
        floor.read(p)
    assert "kq-0" in str(e.value) and str(p) in str(e.value)
    model = FIXTURES / "tiny-llama-q4_0.gguf"
    rc = main(["floor", "-m", str(model), "-o", str(tmp_path / "x.json")])
    assert rc == 2 and "-p PROMPT or --tokens" in capsys.readouterr().err
    dump = tmp_path / "d.safetensors"
    assert main(["dump", "-m", str(model), "--tokens", "1,2,3", "-o", str(dump), "--no-progress"]) == 0
    rc = main(["compare", str(dump), str(dump), "--floor", str(p)])
    assert rc == 2 and "kq-0" in capsys.readouterr().err
    rc = main(["compare", str(dump), "--llama-cpp", str(model), "-m", str(tmp_path / "nope.gguf")])
    assert rc == 2 and "nope.gguf: no such model file" in capsys.readouterr().err
