"""corpus.py: the corpus registry, reading WikiText (plain, .gz, zip), downloads with
checksums, and the line splits of corpora without splits of their own."""
import dataclasses
import gzip
import hashlib
import zipfile

import pytest

import corpus
import data
import dist
from conftest import write_wikitext


def test_wikitext_folder_gz_and_zip(tmp_path):
    src = write_wikitext(tmp_path / "plain")
    assert corpus.wikitext_files("WikiText2", src)["train"] == src / "wiki.train.tokens"
    gz = tmp_path / "gz"
    gz.mkdir()
    for s in corpus.SPLITS:
        with open(src / f"wiki.{s}.tokens", "rb") as f, gzip.open(gz / f"wiki.{s}.tokens.gz", "wb") as g:
            g.write(f.read())
    files = corpus.wikitext_files("WikiText2", gz)
    assert list(corpus.read_lines([files["valid"]])) == list(corpus.read_lines([src / "wiki.valid.tokens"]))
    z = tmp_path / "zipped"
    z.mkdir()
    with zipfile.ZipFile(z / "wikitext-2-v1.zip", "w") as zf:
        for s in corpus.SPLITS:
            zf.write(src / f"wiki.{s}.tokens", f"wikitext-2/wiki.{s}.tokens")
    files = corpus.wikitext_files("WikiText2", z, allow_download=False)
    assert files["test"] == z / "wikitext-2" / "wiki.test.tokens"


def test_missing_files_offline_give_one_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="wiki.train.tokens.*wikitext-2-v1.zip"):
        corpus.wikitext_files("WikiText2", tmp_path, allow_download=False)
    with pytest.raises(data.DataError, match="does not exist"):
        corpus.dataset_dir("WikiText2", tmp_path / "nope")


def test_download_checks_md5_and_keeps_the_file(tmp_path, monkeypatch):
    src = write_wikitext(tmp_path / "src")
    zpath = tmp_path / "served.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for s in corpus.SPLITS:
            zf.write(src / f"wiki.{s}.tokens", f"wikitext-2/wiki.{s}.tokens")
    md5 = hashlib.md5(zpath.read_bytes()).hexdigest()
    target = tmp_path / "dl"
    target.mkdir()
    wt2 = corpus.CORPORA["WikiText2"]
    with_source = lambda **kw: dataclasses.replace(wt2, download=dataclasses.replace(wt2.download, **kw))
    monkeypatch.setitem(corpus.CORPORA, "WikiText2", with_source(url=zpath.as_uri(), md5="0" * 32))
    with pytest.raises(data.DataError, match="MD5"):
        corpus.wikitext_files("WikiText2", target)
    assert not (target / "wikitext-2-v1.zip").exists()
    monkeypatch.setitem(corpus.CORPORA, "WikiText2", with_source(url=zpath.as_uri(), md5=md5))
    files = corpus.wikitext_files("WikiText2", target)
    assert (target / "wikitext-2-v1.zip").is_file() and files["train"].is_file()
    monkeypatch.setitem(corpus.CORPORA, "WikiText2", with_source(url=(tmp_path / "absent.zip").as_uri()))
    with pytest.raises(data.DataError, match="could not download"):
        corpus.wikitext_files("WikiText2", tmp_path / "src" / "..")


def test_zip_with_escaping_member_is_refused(tmp_path):
    bad = tmp_path / "wikitext-2-v1.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../evil.txt", "x")
    with pytest.raises(data.DataError, match="outside"):
        corpus.wikitext_files("WikiText2", tmp_path, allow_download=False)
    assert not (tmp_path.parent / "evil.txt").exists()


def test_truncated_zip_is_refused(tmp_path):
    (tmp_path / "wikitext-2-v1.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(data.DataError, match="not a readable zip"):
        corpus.wikitext_files("WikiText2", tmp_path, allow_download=False)


def test_book_folder_split_by_lines(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "one.txt").write_text("".join(f"line {i}\n" for i in range(50)))
    (tmp_path / "b" / "two.txt").write_text("".join(f"more {i}\n" for i in range(50)))
    sources = corpus.corpus_sources("BookCorpus", tmp_path / "b")
    tok = data.Tokenizer()
    vocab = data.Vocab.from_counts(corpus.count_vocab("BookCorpus", sources, tok))
    splits = corpus.load_corpus("BookCorpus", sources, vocab, tok, tmp_path / "cache", dist.Context())
    assert [splits[s].num_lines for s in corpus.SPLITS] == [80, 10, 10]
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one store: the splits share files
    assert vocab["more"] != data.UNK  # train = the first 80 lines: 'more 0' to 'more 29'
    assert vocab["49"] != data.UNK and vocab["95"] == data.UNK  # lines 90+ are test only


def test_enwik9_filter(tmp_path):
    xml = tmp_path / "enwik9"
    xml.write_text('<page><title>X</title>\n<text xml:space="preserve">The [[Cat|cats]] ate 42 '
                   '{{cite}} fish&amp;chips.\nSecond line.</text>\n</page>\n<text>#REDIRECT [[Y]]</text>\n')
    assert list(corpus.enwik9_filter(xml)) == ["the cats ate four two fish chips\n", "second line\n"]
