"""ns_task.py: next-sentence pretraining from the masked-LM encoder, reading its pairs
from the token store."""
import re

import data
import checkpoint
from conftest import TINY, run_script, write_wikitext


def test_next_sentence_trains_the_encoder_it_loads(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (200, 40, 40))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", cwd=tmp_path)
    ns = run_script("ns_task.py", "--bert-model", "mlm_bert.pt", "--dataset", "WikiText2",
                    "--data-dir", wt, "--min_sentence_len", "10", "--batch_size", "8", "--bptt",
                    "48", "--log-interval", "5", "--epochs", "2", "--cache-dir", "cache", cwd=tmp_path)
    counts = dict(re.findall(r"^\| (train|valid|test): (\d+) pairs \(lines with at least 10 tokens\)$",
                             ns.stdout, re.M))
    assert set(counts) == {"train", "valid", "test"} and int(counts["train"]) > 50
    assert re.search(r"^\| end of epoch +2 \| time: +[\d.]+s \| valid loss +[\d.]+ \| valid accuracy",
                     ns.stdout, re.M)
    assert re.search(r"^\| End of training \| test loss +[\d.]+ \| test ppl +[\d.]+ \| test accuracy",
                     ns.stdout, re.M)
    vocab = data.Vocab.load(tmp_path / "torchtext_bert_vocab.pt")
    before = checkpoint.load_encoder(tmp_path / "mlm_bert.pt", vocab).state_dict()
    after = checkpoint.load_encoder(tmp_path / "ns_bert.pt", vocab).state_dict()
    assert before.keys() == after.keys() and any((before[k] != after[k]).any() for k in before)
    # --prepare-only: the token stores (here in another folder), and nothing trained or written
    (tmp_path / "ns_bert.pt").unlink()
    prepared = run_script("ns_task.py", "--bert-model", "nowhere.pt", "--dataset", "WikiText2",
                          "--data-dir", wt, "--cache-dir", "ahead", "--prepare-only", cwd=tmp_path)
    assert "| --prepare-only: the token stores are ready in ahead" in prepared.stdout
    assert len(list((tmp_path / "ahead").glob("WikiText2-basic_english-*"))) == 3
    assert not (tmp_path / "ns_bert.pt").exists() and "| epoch" not in prepared.stdout


def test_encoder_of_another_vocabulary_is_refused(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (100, 30, 30))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--dry-run", cwd=tmp_path)
    (tmp_path / "torchtext_bert_vocab.pt").write_text(
        data.VOCAB_HEADER + "\n" + "\n".join(data.SPECIALS + ["other", "words"]) + "\n")
    proc = run_script("ns_task.py", "--dataset", "WikiText2", "--data-dir", wt, cwd=tmp_path,
                      check=False)
    assert proc.returncode == 2 and "another vocabulary" in proc.stderr
