"""Tokenizers: byte-level (the default), SentencePiece, and Hugging Face `tokenizer.json`.

All three share one small interface, so ingestion, the LM and the manifests never care
which one is in use. `identity()` is written into data manifests and `check_identity`
compares it when data is read back: tokens are never trained on or decoded with a
tokenizer other than the one that produced them.

Special ids: every tokenizer has integer `pad_id`, `bos_id` and `eos_id`. Where a model
file lacks one, the fallbacks are the same for SentencePiece and Hugging Face:
  - bos missing -> eos; eos missing -> bos (one separator token, GPT-2 style);
    both missing -> DmaError (packing needs a document separator).
  - pad missing -> eos (the GPT-2 / LLaMA convention). pad may then equal eos, so a
    loss mask must not be built from `tokens == pad_id`.
`encode` never adds special tokens; callers add bos/eos where they pack documents.
`decode` drops special tokens.
"""

import abc
import hashlib
import os
from collections.abc import Sequence

import sentencepiece
import tokenizers

from dma_jax.errors import DmaError

KINDS = ("byte", "hf", "sentencepiece")
_IDENTITY_FIELDS = ("kind", "sha256", "vocab_size")

# Token strings looked up in a Hugging Face vocabulary, in order of preference.
_HF_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|endoftext|>")
_HF_EOS_NAMES = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>")
_HF_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer(abc.ABC):
    """Text <-> token ids. Subclasses set the attributes below in `__init__`."""

    kind: str
    path: str | None
    sha256: str | None
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens are dropped."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text."""
        return [self.encode(text) for text in texts]

    def identity(self) -> dict:
        """What a manifest records to recognise this tokenizer later (JSON-serialisable)."""
        return {"kind": self.kind, "path": self.path, "sha256": self.sha256,
                "vocab_size": self.vocab_size}

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        """`ids` as Python ints, each checked to lie in [0, vocab_size)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DmaError(f"{self.kind} tokenizer: token id {bad[0]} is outside "
                           f"[0, {self.vocab_size})")
        return ids


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: PAD=0, BOS=1, EOS=2, byte b -> b + 3. Needs no file."""

    OFFSET = 3

    def __init__(self):
        self.kind, self.path, self.sha256 = "byte", None, None
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = 256 + self.OFFSET

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - self.OFFSET for i in self._check_ids(ids) if i >= self.OFFSET)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file; special ids come from the model (see module doc)."""

    def __init__(self, path: str | os.PathLike):
        self.kind, self.path = "sentencepiece", os.path.abspath(path)
        data = _read_model_file(path, self.kind)
        self.sha256 = hashlib.sha256(data).hexdigest()
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        except RuntimeError as e:
            raise DmaError(f"{path}: not a valid sentencepiece model ({_first_line(e)})")
        self.vocab_size = self._sp.get_piece_size()
        if self.vocab_size == 0:
            raise DmaError(f"{path}: sentencepiece model has no pieces")
        self.bos_id, self.eos_id, self.pad_id = _special_ids(
            path, self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(self._check_ids(ids))


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`; special ids looked up by common token names."""

    def __init__(self, path: str | os.PathLike):
        self.kind, self.path = "hf", os.path.abspath(path)
        data = _read_model_file(path, self.kind)
        self.sha256 = hashlib.sha256(data).hexdigest()
        try:
            self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise DmaError(f"{path}: not a valid tokenizer.json (not UTF-8 text)")
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise DmaError(f"{path}: not a valid tokenizer.json ({_first_line(e)})")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = _special_ids(
            path, self._find(_HF_BOS_NAMES), self._find(_HF_EOS_NAMES),
            self._find(_HF_PAD_NAMES))

    def _find(self, names: Sequence[str]) -> int:
        """Id of the first of `names` in the vocabulary, or -1."""
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return -1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=True)


def load_tokenizer(kind: str, path: str | os.PathLike | None) -> Tokenizer:
    """The tokenizer of `kind` ("byte", "sentencepiece" or "hf"); `path` only for files."""
    if kind not in KINDS:
        raise DmaError(f"unknown tokenizer kind {kind!r} (expected one of {', '.join(KINDS)})")
    if kind == "byte":
        if path is not None:
            raise DmaError(f"byte tokenizer takes no file, got path {str(path)!r}")
        return ByteTokenizer()
    if path is None:
        raise DmaError(f"{kind} tokenizer needs a model file path, got none")
    return SentencePieceTokenizer(path) if kind == "sentencepiece" else HFTokenizer(path)


def check_identity(expected: dict, actual: dict, where: str) -> None:
    """Raise DmaError naming `where` if `actual` is not the tokenizer `expected` records."""
    missing = [f for f in _IDENTITY_FIELDS if f not in expected]
    if missing:
        raise DmaError(f"{where}: tokenizer identity lacks field {missing[0]!r}")
    diffs = [f"{f} {expected[f]!r} in the manifest, {actual.get(f)!r} now"
             for f in _IDENTITY_FIELDS if expected[f] != actual.get(f)]
    if diffs:
        raise DmaError(f"{where}: tokenizer differs from the manifest's: {'; '.join(diffs)}")


def _read_model_file(path: str | os.PathLike, kind: str) -> bytes:
    """The bytes of a tokenizer file, read once so that checksum and model agree."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DmaError(f"{path}: cannot read {kind} tokenizer file ({e.strerror})")


def _special_ids(path, bos_id: int, eos_id: int, pad_id: int) -> tuple[int, int, int]:
    """(bos, eos, pad) with the module doc's fallbacks applied to missing (-1) ids."""
    if bos_id < 0 and eos_id < 0:
        raise DmaError(f"{path}: tokenizer defines neither a bos nor an eos token")
    bos_id = bos_id if bos_id >= 0 else eos_id
    eos_id = eos_id if eos_id >= 0 else bos_id
    pad_id = pad_id if pad_id >= 0 else eos_id
    return bos_id, eos_id, pad_id


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
