"""The standard library as a corpus: deterministic, split by module, capped."""
from __future__ import annotations

import pytest

from shrink.data.corpus import (
    Corpus, is_heldout, module_name, stable_unit, stdlib_corpus, stdlib_files, stdlib_root,
)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return stdlib_corpus()


def test_files_are_sorted_and_exclude_tests_and_installed_packages():
    root = stdlib_root()
    files = stdlib_files()
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel)
    assert len(files) > 300
    for r in rel:
        parts = r.split("/")
        assert not {"test", "tests", "idlelib", "site-packages", "encodings"} & set(parts[:-1]), r
        assert not parts[-1].startswith("_sysconfigdata")
    assert "os.py" in rel and "json/decoder.py" in rel


def test_the_corpus_is_the_same_every_time(corpus):
    again = stdlib_corpus()
    assert again.train == corpus.train and again.heldout == corpus.heldout


def test_splits_are_disjoint_sorted_and_about_five_percent(corpus):
    train = [d.module for d in corpus.train]
    heldout = [d.module for d in corpus.heldout]
    assert train == sorted(train) and heldout == sorted(heldout)
    assert not set(train) & set(heldout)
    assert len(set(train)) == len(train)
    share = len(heldout) / (len(train) + len(heldout))
    assert 0.02 < share < 0.10, share
    assert all(is_heldout(m) for m in heldout) and not any(is_heldout(m) for m in train)
    assert sum(len(d.text) for d in corpus.train) > 3_000_000     # a real corpus, not a sample
    assert all(d.text.strip() for d in corpus.train + corpus.heldout)


def test_the_split_depends_on_the_name_alone():
    # sha256, not Python's salted hash(): a fixed number per name, on every machine
    assert stable_unit("json") == stable_unit("json")
    assert 0.0 <= stable_unit("json") < 1.0
    assert stable_unit("json") != stable_unit("json.decoder")
    assert is_heldout("anything", fraction=0.999999) is (stable_unit("anything") < 0.999999)


def test_caps_bound_the_text_and_keep_the_split(corpus):
    small = stdlib_corpus(max_train_chars=50_000, max_heldout_chars=10_000)
    assert sum(len(d.text) for d in small.train) == 50_000
    assert sum(len(d.text) for d in small.heldout) == 10_000
    full_train = {d.module: d.text for d in corpus.train}
    for d in small.train:            # whole documents, except the one cut to fit
        assert full_train[d.module].startswith(d.text)
    assert {d.module for d in small.heldout} <= {d.module for d in corpus.heldout}
    assert stdlib_corpus(max_train_chars=50_000, max_heldout_chars=10_000) == small
    # a spread of the library, not its first files in alphabetical order
    assert len({d.module.split(".")[0] for d in stdlib_corpus(max_train_chars=300_000).train}) > 10
    assert stdlib_corpus(max_train_chars=0).train == ()


def test_a_small_tree(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "site-packages" / "other").mkdir(parents=True)
    (root / "os.py").write_text("import sys\n")
    (root / "pkg" / "__init__.py").write_text("x = 1\n")
    (root / "pkg" / "mod.py").write_bytes(b"s = '\xff caf\xc3\xa9'\n")     # a stray byte is dropped
    (root / "pkg" / "empty.py").write_text("\n")
    (root / "test" / "test_os.py").write_text("assert True\n")
    (root / "site-packages" / "other" / "x.py").write_text("y = 2\n")
    names = [module_name(p, root) for p in stdlib_files(root)]
    assert names == ["os", "pkg", "pkg.empty", "pkg.mod"]
    # a fraction between the names' hash values, so both splits are non-empty
    units = sorted(stable_unit(n) for n in ("os", "pkg", "pkg.mod"))
    c = stdlib_corpus(root=root, heldout_fraction=(units[0] + units[1]) / 2)
    assert len(c.heldout) == 1 and len(c.train) == 2
    texts = {d.module: d.text for d in c.train + c.heldout}
    assert texts == {"os": "import sys\n", "pkg": "x = 1\n", "pkg.mod": "s = ' café'\n"}


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="heldout_fraction"):
        stdlib_corpus(heldout_fraction=0.0)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        stdlib_files(tmp_path / "missing")
    (tmp_path / "a.py").write_text("a = 1\n")
    with pytest.raises(ValueError, match="too few"):
        stdlib_corpus(root=tmp_path)
    with pytest.raises(ValueError, match=">= 0"):
        stdlib_corpus(max_train_chars=-1)
