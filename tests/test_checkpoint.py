"""checkpoint.py: atomic and durable writes, files that would run code, format versions."""
import os
import errno

import pytest
import torch

import checkpoint
import data
import monitor
import utils
from conftest import Payload


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "mlm_bert.pt"
    target.write_bytes(b"good")

    def broken_save(obj, f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(utils.UserError) as e:
        checkpoint.atomic_save({"x": 1}, target)
    assert str(e.value) == (f"cannot write {target}: No space left on device; the previous file "
                            "is unchanged")
    assert target.read_bytes() == b"good" and os.listdir(tmp_path) == ["mlm_bert.pt"]


def test_a_folder_gone_before_saving_is_one_clear_error(tmp_path):
    gone = tmp_path / "gone"
    with pytest.raises(utils.UserError, match=f"cannot write {gone / 'log.txt'}: No such file or "
                                              "directory; nothing was written"):
        checkpoint.atomic_write_text(gone / "log.txt", "text")
    checkpoint.atomic_write_text(tmp_path / "log.txt", "text", main=False)  # not rank 0: no file
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_with_code_is_refused_unrun(tmp_path):
    torch.save({"format": "bert-example", "kind": "encoder", "x": Payload()}, tmp_path / "evil.pt")
    os.chdir(tmp_path)
    with pytest.raises(utils.UserError, match="not a checkpoint this project can read"):
        checkpoint.load(tmp_path / "evil.pt", "encoder")
    assert not (tmp_path / "pwned.txt").exists()


def test_files_of_other_format_versions_are_refused_naming_the_versions(tmp_path):
    from model import BertModel
    enc = BertModel(20, 8, 2, 16, 1, 0.0)
    path = tmp_path / "enc.pt"
    for version, word in ((2, "newer than the versions"), (0, "not a version")):
        torch.save({**checkpoint.header("encoder", enc.config, "fp", model=enc.state_dict()),
                    "version": version}, path)
        with pytest.raises(utils.UserError, match=rf"enc.pt is a checkpoint of format version {version}, "
                                                  rf"{word} this code reads \(1\)"):
            checkpoint.load(path, "encoder")
    for version, word in ((2, "newer than the versions"), (0, "not a version")):
        (tmp_path / "v.txt").write_text(f"# bert-example vocabulary v{version}\n" + "\n".join(data.SPECIALS))
        with pytest.raises(utils.UserError, match=rf"v.txt is a vocabulary file of format version "
                                                  rf"{version}, {word} this code reads \(1\)"):
            data.Vocab.load(tmp_path / "v.txt")
    # results files: the first line says the version; files from before it are read
    rec = monitor.Recorder(str(tmp_path / "r.jsonl"))
    rec.start(append=False)
    rec.write(dict(record="valid", epoch=1, loss=1.0))
    rec.close()
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert '"record": "format"' in lines[0] and '"version": 1' in lines[0]
    assert [r["record"] for r in monitor.read_results(tmp_path / "r.jsonl")] == ["valid"]
    (tmp_path / "old.jsonl").write_text(lines[1] + "\n")
    assert [r["record"] for r in monitor.read_results(tmp_path / "old.jsonl")] == ["valid"]
    (tmp_path / "new.jsonl").write_text(lines[0].replace('"version": 1', '"version": 2') + "\n" + lines[1])
    with pytest.raises(utils.UserError, match=r"new.jsonl is a results file of format version 2, newer"):
        monitor.read_results(tmp_path / "new.jsonl")


def test_atomic_writes_sync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import stat
    target, synced, real = tmp_path / "a.txt", [], os.fsync

    def fsync(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), target.exists()))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    checkpoint.atomic_write_text(target, "text")
    assert synced == [(False, False), (True, True)]  # the file, not yet renamed; then its folder
    assert target.read_text() == "text"
