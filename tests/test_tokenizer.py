"""Tokenizers: exact round trips, ids against independent computations, identity, errors."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from dma_jax.data.tokenizer import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer,
                                    check_identity, load_tokenizer)
from dma_jax.errors import DmaError

TEXTS = ["Hello, world!", "café naïve Ångström", "数据混合代理", "emoji 🙂🚀 ok", "",
         "tab\tnew\nline  two  spaces"]
SP_ALPHABET = "abcdefghij"


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _words(rng, n: int) -> list[str]:
    return ["".join(rng.choice(list(SP_ALPHABET), size=rng.integers(2, 7))) for _ in range(n)]


def _train_sp(tmp_dir, name: str, **options):
    """A tiny SentencePiece model trained on random words over SP_ALPHABET."""
    rng = np.random.default_rng(0)
    corpus = tmp_dir / "sp_corpus.txt"
    corpus.write_text("\n".join(" ".join(_words(rng, 12)) for _ in range(400)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_dir / name), vocab_size=100,
        model_type="bpe", character_coverage=1.0, num_threads=1, minloglevel=2, **options)
    return tmp_dir / f"{name}.model"


@pytest.fixture(scope="module")
def sp_paths(tmp_path_factory):
    tmp_dir = tmp_path_factory.mktemp("sp")
    return _train_sp(tmp_dir, "default"), _train_sp(tmp_dir, "with_pad", pad_id=3)


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    """A byte-level BPE tokenizer.json whose post-processor adds <s> ... </s>."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("text", TEXTS)
def test_byte_ids_are_utf8_bytes_plus_3_and_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert tok.decode(ids) == text
    assert tok.decode([1, *ids, 2, 0, 0]) == text


def test_byte_specials_vocab_and_bad_ids():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
    assert tok.identity() == {"kind": "byte", "path": None, "sha256": None, "vocab_size": 259}
    assert tok.decode([0xFF + 3]) == "\ufffd"  # a lone 0xFF byte is not UTF-8
    assert tok.encode_batch(["ab", ""]) == [[0x61 + 3, 0x62 + 3], []]
    with pytest.raises(DmaError, match="259"):
        tok.decode([259])
    assert isinstance(load_tokenizer("byte", None), ByteTokenizer)


def test_sentencepiece_round_trip_and_specials(sp_paths):
    default_path, pad_path = sp_paths
    tok = load_tokenizer("sentencepiece", str(default_path))
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 100
    # Trainer defaults: unk=0, bos=1, eos=2, no pad -> pad falls back to eos.
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert load_tokenizer("sentencepiece", pad_path).pad_id == 3
    sentences = [" ".join(_words(np.random.default_rng(seed), 8)) for seed in (1, 2, 3)]
    ids_batch = tok.encode_batch(sentences)
    for sentence, ids in zip(sentences, ids_batch):
        assert ids == tok.encode(sentence)
        assert tok.decode(ids) == sentence
        assert tok.bos_id not in ids and tok.eos_id not in ids
        # Pieces concatenate back to the text, with "▁" marking each word start.
        pieces = sentencepiece.SentencePieceProcessor(model_file=str(default_path)).id_to_piece(ids)
        assert "".join(pieces) == "▁" + sentence.replace(" ", "▁")
    assert tok.decode([tok.bos_id, *ids_batch[0], tok.eos_id]) == sentences[0]
    assert tok.encode("") == []


def test_hf_round_trip_without_special_tokens(hf_path):
    tok = load_tokenizer("hf", hf_path)
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    saved = json.loads(hf_path.read_text())
    names = set(saved["model"]["vocab"]) | {t["content"] for t in saved["added_tokens"]}
    assert tok.vocab_size == len(names) > 259  # 256 bytes + 3 specials + merges
    raw = tokenizers.Tokenizer.from_file(str(hf_path))
    for text in TEXTS:  # byte-level BPE covers any text, seen in training or not
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert 1 not in ids and 2 not in ids
        with_specials = raw.encode(text).ids  # the file's post-processor adds <s> ... </s>
        assert with_specials == [1, *ids, 2]
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.decode([1, *tok.encode("fox"), 2, 0]) == "fox"


def test_hf_special_id_fallbacks(tmp_path):
    vocab = {"a": 0, "b": 1, "<|endoftext|>": 2, "[UNK]": 3}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "eot.json"))
    eot = HFTokenizer(tmp_path / "eot.json")
    assert (eot.bos_id, eot.eos_id, eot.pad_id) == (2, 2, 2)
    assert eot.encode("a b a") == [0, 1, 0]
    bare = tokenizers.Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(DmaError, match="bare.json.*neither a bos nor an eos"):
        HFTokenizer(tmp_path / "bare.json")


def test_identity_checksum_follows_the_file(sp_paths, hf_path, tmp_path):
    default_path, pad_path = sp_paths
    sp_identity = SentencePieceTokenizer(default_path).identity()
    assert sp_identity["sha256"] == _sha256(default_path)
    assert sp_identity["kind"] == "sentencepiece" and sp_identity["vocab_size"] == 100
    assert SentencePieceTokenizer(pad_path).identity()["sha256"] == _sha256(pad_path)
    assert _sha256(pad_path) != _sha256(default_path)

    copy = tmp_path / "tokenizer.json"
    shutil.copy(hf_path, copy)
    before = HFTokenizer(copy).identity()
    assert before["sha256"] == _sha256(hf_path)
    check_identity(before, HFTokenizer(copy).identity(), "m.json")  # same file: no error
    saved = json.loads(copy.read_text())
    saved["added_tokens"][0]["content"] = "<PAD>"  # rename <pad>: same vocab size
    saved["model"]["vocab"]["<PAD>"] = saved["model"]["vocab"].pop("<pad>")
    copy.write_text(json.dumps(saved))
    after = HFTokenizer(copy).identity()
    assert after["sha256"] == _sha256(copy) != before["sha256"]
    assert after["vocab_size"] == before["vocab_size"]
    with pytest.raises(DmaError, match=r"^data/manifest\.json: tokenizer differs .*sha256"):
        check_identity(before, after, "data/manifest.json")


def test_check_identity_names_each_difference():
    byte = ByteTokenizer().identity()
    other = {"kind": "hf", "path": "/x/tokenizer.json", "sha256": "ab" * 32, "vocab_size": 259}
    with pytest.raises(DmaError) as err:
        check_identity(byte, other, "run/manifest.json")
    message = str(err.value)
    assert message.startswith("run/manifest.json: tokenizer differs from the manifest's:")
    assert "kind 'byte'" in message and "sha256 None" in message
    assert "vocab_size" not in message and "\n" not in message
    with pytest.raises(DmaError, match="vocab_size 259 in the manifest, 300 now"):
        check_identity(byte, {**byte, "vocab_size": 300}, "m.json")
    with pytest.raises(DmaError, match="m.json: tokenizer identity lacks field 'sha256'"):
        check_identity({"kind": "byte", "vocab_size": 259}, byte, "m.json")
    check_identity(byte, {**byte, "path": "/elsewhere"}, "m.json")  # the path may move


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_load_errors_name_the_path(kind, tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    for path in (tmp_path / "missing.model", garbage, empty, tmp_path):
        with pytest.raises(DmaError) as err:
            load_tokenizer(kind, str(path))
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DmaError, match="needs a model file path"):
        load_tokenizer(kind, None)


def test_empty_sentencepiece_file_is_rejected(tmp_path):
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")  # parses as a valid, empty model proto
    with pytest.raises(DmaError, match="empty.model: sentencepiece model has no pieces"):
        SentencePieceTokenizer(empty)


def test_load_rejects_unknown_kind_and_byte_path():
    with pytest.raises(DmaError, match="unknown tokenizer kind 'bpe'"):
        load_tokenizer("bpe", None)
    with pytest.raises(DmaError, match="takes no file.*vocab.json"):
        load_tokenizer("byte", "vocab.json")
