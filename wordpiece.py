"""WordPiece, BERT's tokenizer, beside basic_english: a vocab.txt (one token a line, id =
line number, with [PAD] [UNK] [CLS] [SEP] [MASK]), the tokenizer with character
offsets, and training a vocabulary on a corpus.

    python mlm_task.py --tokenizer wordpiece --vocab-file vocab.txt --vocab-size 16000
    python qa_task.py --tokenizer wordpiece --bert-model BERT_FOLDER   # its vocab.txt

The tokenizer is the `tokenizers` library's (pip install tokenizers), with torchtext's
BERTTokenizer for the tokens where torchtext imports; both give the same ids. Special
tokens are found by name, never by a fixed id.
"""
from pathlib import Path

import torch

import data
import hf
from data import DataError, Roles

ROLE_NAMES = dict(unk="[UNK]", pad="[PAD]", mask="[MASK]", cls="[CLS]", sep="[SEP]")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # a trained vocabulary's first ids
INSTALL = "pip install tokenizers"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError(f"--tokenizer wordpiece needs the tokenizers package; install it with "
                        f"`{INSTALL}`") from None
    return tokenizers


def load_vocab(path, lower_case=True):
    """The Vocab of a BERT vocab.txt; its fingerprint names WordPiece and the casing."""
    try:
        itos = Path(path).read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise DataError(f"WordPiece vocabulary {path} not found; pass --vocab-file with a BERT "
                        "vocab.txt (mlm_task.py trains one when the file does not exist)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read WordPiece vocabulary {path}: {e}") from None
    if itos and itos[-1] == "":
        itos.pop()
    if not itos or any(not t or t != t.strip() for t in itos):
        raise DataError(f"{path} is not a BERT vocab.txt (one token a line, no blank lines)")
    ids = {}
    for role, name in ROLE_NAMES.items():
        if name not in itos:
            raise DataError(f"{path} has no {name} token; a BERT vocab.txt needs "
                            f"{' '.join(ROLE_NAMES.values())}")
        ids[role] = itos.index(name)
    roles = Roles(first_word=max(ids.values()) + 1, **ids)
    try:
        return data.Vocab(itos, roles=roles, tag=f"wordpiece-{'uncased' if lower_case else 'cased'}")
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def continuations(vocab):
    """(V,) bool: the tokens that continue a word (## pieces), for whole-word masking."""
    return torch.tensor([t.startswith("##") for t in vocab.itos], dtype=torch.bool)


class WordPiece:
    """BERT's tokenizer on a vocab.txt: text -> tokens, with character spans (s, e) meaning
    text[s:e]. lower_case: the uncased models' lower-casing and accent stripping."""

    unk_text = ROLE_NAMES["unk"]  # read as the unknown token wherever it stands in a text

    def __init__(self, vocab_file, lower_case=True, backend=data.BACKEND):
        tokenizers = _tokenizers()
        self.name = "wordpiece" if lower_case else "wordpiece-cased"
        self._hf = tokenizers.BertWordPieceTokenizer(str(vocab_file), lowercase=lower_case)
        self._tt = None
        if backend == "torchtext":
            from torchtext.transforms import BERTTokenizer
            self._tt = BERTTokenizer(str(vocab_file), do_lower_case=lower_case, return_tokens=True)

    def __call__(self, text):
        if self._tt is not None:
            return self._tt(text)
        return self._hf.encode(text, add_special_tokens=False).tokens

    def tokenize_lines(self, lines):
        """[self(line) for line in lines], in one call of the tokenizers library."""
        if self._tt is not None:
            return [self._tt(line) for line in lines]
        return [e.tokens for e in self._hf.encode_batch(lines, add_special_tokens=False)]

    def tokenize_with_spans(self, text):
        enc = self._hf.encode(text, add_special_tokens=False)
        return enc.tokens, [tuple(o) for o in enc.offsets]


def train_vocab(lines, size, lower_case=True):
    """The tokens, in id order, of a WordPiece vocabulary of at most size tokens trained
    on lines (specials first): the lines of a BERT vocab.txt."""
    tokenizers = _tokenizers()
    tok = tokenizers.BertWordPieceTokenizer(lowercase=lower_case)
    tok.train_from_iterator(lines, vocab_size=size, min_frequency=2, special_tokens=SPECIALS,
                            show_progress=False)
    vocab = tok.get_vocab()
    itos = sorted(vocab, key=vocab.get)
    return itos


def from_args(args):
    """(tokenizer, vocab) of a run: basic_english with --save-vocab, or WordPiece with
    --vocab-file, or with the vocab.txt of the transformers folder given as --bert-model."""
    folder = bert_folder(args)
    if args.tokenizer == "basic_english":
        if folder is not None:
            raise DataError(f"--bert-model {folder} is a transformers model: pass --tokenizer "
                            "wordpiece (its vocab.txt is read from the folder)")
        return data.Tokenizer(), data.Vocab.load(args.save_vocab)
    vocab_file, lower = args.vocab_file, not args.cased
    if folder is not None:
        vocab_file, lower = folder / "vocab.txt", hf.lower_case(folder)
    vocab = load_vocab(vocab_file, lower)
    return WordPiece(vocab_file, lower), vocab


def bert_folder(args):
    """The transformers folder given as --bert-model, if it is one."""
    path = Path(args.bert_model) if "bert_model" in vars(args) else None
    return path if path is not None and path.is_dir() else None
