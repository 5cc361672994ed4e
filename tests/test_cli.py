"""The command line's own usage errors have the shape of every other error."""

import pytest

from refinfer.cli import main


@pytest.mark.parametrize("argv,fragment", [
    (["generate", "-n", "abc", "x"], "-n/--n-predict: invalid int value: 'abc'"),
    (["dump", "-o", "x.safetensors", "--mode", "fast"], "--mode: invalid choice: 'fast'"),
    (["perplexity"], "the following arguments are required: -f/--file"),
    (["inspect", "a.gguf", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["nonsense"], "invalid choice: 'nonsense'"),
])
def test_usage_errors_print_error_and_hint_and_exit_2(capsys, argv, fragment):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and "Traceback" not in err
    assert sum(ln.startswith("error: ") for ln in lines) == 1, err
    assert any(fragment in ln for ln in lines if ln.startswith("error: ")), err
    assert any(ln.startswith("hint: ") and "--help" in ln for ln in lines), err


def test_help_exits_0(capsys):
    assert main(["generate", "--help"]) == 0
    assert "--repeat-last-n" in capsys.readouterr().out
