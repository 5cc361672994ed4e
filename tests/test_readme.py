"""Every code block of README.md runs as written.

Conventions (README.md follows them):
- every fenced block has a language: ```python blocks run with this Python in a fresh
  process; ```sh blocks run with bash -e -o pipefail, `python` being this Python; ```text
  blocks (layouts, sample output) are not code and are not run;
- a block that cannot run in a test (it installs packages, say) has the line
  `<!-- readme-test: skip (REASON) -->` right before its opening fence, with a reason. A block
  that installs packages or runs pytest and has no such line fails without being run: it would
  change the environment under test, or run the suite inside itself.
Blocks run in a fresh directory whose entries link to the checkout's, so relative paths such as
README.md or formats/ work and the files a block writes stay out of the checkout. The default
model is fetched first (smollm2_path), into the cache refinfer uses. REFINFER_README=FILE tests
another file instead of README.md.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = pathlib.Path(os.environ.get("REFINFER_README") or ROOT / "README.md")
LANGS = {"python", "sh", "text"}
BLOCK_TIMEOUT_S = 600

_MUST_SKIP = re.compile(r"\b(?:pip3?|uv|conda|mamba|apt|apt-get|brew)\s+(?:\S+\s+)?install\b|(?<![\w/.-])pytest(?![\w/.-])")
_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([^`\s]*)[^`]*$")
_SKIP = re.compile(r"^\s*<!--\s*readme-test:\s*skip\s*\((.+)\)\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str           # the fence's info string up to the first space ("" when none)
    code: str
    line: int           # 1-based line of the opening fence
    skip: str | None    # the reason of a readme-test: skip comment on the line before


def code_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text (CommonMark fences: 3 or more backticks or
    tildes, indented up to 3 spaces, closed by a fence of the same kind at least as long)."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3)
        prev = lines[i - 1] if i else ""
        skip = _SKIP.match(prev)
        body, j = [], i + 1
        while j < len(lines):
            close = re.match(r"^ {0,3}(`{3,}|~{3,})\s*$", lines[j])
            if close and close.group(1)[0] == fence[0] and len(close.group(1)) >= len(fence):
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j].lstrip())
            j += 1
        out.append(Block(lang, "\n".join(body) + "\n", i + 1, skip.group(1).strip() if skip else None))
        i = j + 1
    return out


def _blocks():
    if not README.exists():
        return []
    return code_blocks(README.read_text(encoding="utf-8"))


BLOCKS = _blocks()
RUNNABLE = [b for b in BLOCKS if b.lang in ("python", "sh")]


def test_every_block_declares_a_known_language():
    assert BLOCKS, f"no code blocks found in {README}"
    bad = [f"line {b.line}: {b.lang or '(none)'}" for b in BLOCKS if b.lang not in LANGS]
    assert not bad, f"{README}: code blocks need one of the languages {sorted(LANGS)}: {bad}"


def _workdir(tmp_path):  # a fresh directory that sees the checkout's files
    d = tmp_path / "checkout"
    d.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".venv"):
            (d / entry.name).symlink_to(entry)
    return d


def must_skip(block: Block) -> str | None:  # why a block may not run in a test, if it may not
    m = _MUST_SKIP.search(block.code)
    return f"it runs `{m.group(0)}`" if m else None


def run_block(block: Block, cwd: pathlib.Path, timeout=BLOCK_TIMEOUT_S) -> subprocess.CompletedProcess:
    why = must_skip(block)
    assert why is None, (f"line {block.line}: {why}; put `<!-- readme-test: skip (REASON) -->` on the line "
                         f"before the block")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if block.lang == "python":
        cmd = [sys.executable, "-c", block.code]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)          # the block's whole process group
            proc.communicate()
            raise AssertionError(f"line {block.line}: the {block.lang} block ran past {timeout} s") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"{b.lang}-line{b.line}" for b in RUNNABLE])
def test_block_runs(block, smollm2_path, tmp_path):
    if block.skip is not None:
        pytest.skip(f"{README.name} line {block.line}: {block.skip}")
    r = run_block(block, _workdir(tmp_path))
    assert r.returncode == 0, (f"{README} line {block.line} ({block.lang} block) exits {r.returncode}:\n"
                               f"{block.code}\n--- stdout:\n{r.stdout[-3000:]}\n--- stderr:\n{r.stderr[-3000:]}")


# ---- the extraction itself -----------------------------------------------------------------

SAMPLE = """\
# Title

```sh
echo one
```

<!-- readme-test: skip (installs packages) -->
```sh
pip install something
```

- a list item with a block:

  ```python
  x = 1
  assert x == 1
  ```

````text
a fence inside:
```
still text
````

```
no language
```
"""


def test_code_blocks_finds_languages_skips_and_indented_fences():
    b = code_blocks(SAMPLE)
    assert [(x.lang, x.line, x.skip) for x in b] == [
        ("sh", 3, None), ("sh", 8, "installs packages"), ("python", 14, None), ("text", 19, None), ("", 25, None)]
    assert b[0].code == "echo one\n"
    assert b[2].code == "x = 1\nassert x == 1\n"                 # the list indentation removed
    assert b[3].code == "a fence inside:\n```\nstill text\n"      # a shorter fence does not close it


@pytest.mark.parametrize("code", ["pip install .\n", "pip install -e '.[test]' && python -m pytest\n",
                                  "X=1 python -m pip install numpy\n", "sudo apt-get install cmake\n",
                                  "uv pip install refinfer\n", "python -m pytest tests\n"])
def test_blocks_that_install_or_run_the_suite_are_refused_unrun(code, tmp_path):
    block = Block("sh", f"touch ran\n{code}", 1, None)
    with pytest.raises(AssertionError, match="readme-test: skip"):
        run_block(block, tmp_path)
    assert not (tmp_path / "ran").exists()


def test_run_block_kills_the_whole_block_on_timeout(tmp_path):
    with pytest.raises(AssertionError, match="ran past"):
        run_block(Block("sh", "(sleep 2; touch late) &\nsleep 30\n", 1, None), tmp_path, timeout=0.5)
    time.sleep(2.5)
    assert not (tmp_path / "late").exists()


def test_paths_that_mention_pytest_are_not_refused():
    assert must_skip(Block("sh", "ls /tmp/pytest-of-root/ tests/test_x.py.pytest_cache\n", 1, None)) is None


def test_run_block_reports_failures(tmp_path):
    assert run_block(Block("python", "raise SystemExit(3)\n", 1, None), tmp_path).returncode == 3
    assert run_block(Block("sh", "false\necho not reached\n", 1, None), tmp_path).returncode == 1
    assert run_block(Block("sh", "false | cat\n", 1, None), tmp_path).returncode == 1      # pipefail
    r = run_block(Block("sh", "python -c 'import sys; print(sys.executable)'\n", 1, None), tmp_path)
    assert r.stdout.strip() == sys.executable                                              # this Python
