"""Corpus sources: documents, order and one-line errors for text, JSONL, TFDS, ArrayRecord."""

import json

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from dma_jax.data.sources import (iter_array_record_texts, iter_jsonl, iter_text_files,
                                  iter_tfds)
from dma_jax.errors import DmaError

TEXTS = ["Hello, world!\n", "café naïve Ångström", "数据混合代理 🙂", ""]


def test_text_files_sorted_one_document_per_file(tmp_path):
    for name, text in zip(["b.txt", "a.txt", "c.txt", "d.txt"], TEXTS):
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.txt").write_text("nested", encoding="utf-8")
    docs = list(iter_text_files([str(tmp_path / "*.txt")]))
    assert docs == [TEXTS[1], TEXTS[0], TEXTS[2], TEXTS[3]]  # a, b, c, d
    # Paths and globs in the given order, a file named twice read once, dirs skipped.
    docs = list(iter_text_files([str(tmp_path / "sub" / "e.txt"), str(tmp_path / "**"),
                                 str(tmp_path / "a.txt")]))
    assert docs == ["nested", TEXTS[1], TEXTS[0], TEXTS[2], TEXTS[3]]


def test_text_file_errors_name_the_path(tmp_path):
    with pytest.raises(DmaError, match="missing.txt: text file not found"):
        list(iter_text_files([str(tmp_path / "missing.txt")]))
    with pytest.raises(DmaError, match=r"\*.md: pattern matches no text file"):
        list(iter_text_files([str(tmp_path / "*.md")]))
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(DmaError, match=r"bad.txt: not UTF-8 text \(bad byte at offset 3\)"):
        list(iter_text_files([str(tmp_path / "bad.txt")]))


def test_jsonl_documents_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)]
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n   \n", encoding="utf-8")
    assert list(iter_jsonl(path)) == TEXTS
    path.write_text(json.dumps({"body": "x", "text": 1}) + "\n", encoding="utf-8")
    assert list(iter_jsonl(path, text_field="body")) == ["x"]


@pytest.mark.parametrize("bad, message", [
    ('{"text": "a"', "malformed JSON"),
    ('["text"]', "expected a JSON object, got list"),
    ('{"body": "a"}', "no field 'text'"),
    ('{"text": 3}', "field 'text' is int, not a string"),
    ('{"text": null}', "field 'text' is NoneType, not a string"),
])
def test_jsonl_errors_carry_line_number(tmp_path, bad, message):
    path = tmp_path / "d.jsonl"
    # Line 4 is bad: a blank line still counts.
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n' + bad + '\n{"text": "c"}\n')
    docs = iter_jsonl(path)
    assert [next(docs), next(docs)] == ["a", "b"]
    with pytest.raises(DmaError, match=f"d.jsonl:4: {message}"):
        next(docs)


def test_jsonl_non_utf8_and_missing_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DmaError, match=r"d.jsonl:2: not UTF-8"):
        list(iter_jsonl(path))
    with pytest.raises(DmaError, match="nope.jsonl: cannot read JSONL file"):
        list(iter_jsonl(tmp_path / "nope.jsonl"))


def _write_array_record(path, records):
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()


def test_array_record_texts_round_trip(tmp_path):
    texts = [f"doc {i} {TEXTS[i % 4]}" for i in range(1200)]  # spans several read chunks
    _write_array_record(tmp_path / "p-1.ar", [t.encode() for t in texts[700:]])
    _write_array_record(tmp_path / "p-0.ar", [t.encode() for t in texts[:700]])
    assert list(iter_array_record_texts([str(tmp_path / "p-*.ar")])) == texts
    _write_array_record(tmp_path / "j.ar", [json.dumps({"t": t}).encode() for t in TEXTS])
    assert list(iter_array_record_texts([str(tmp_path / "j.ar")], text_field="t")) == TEXTS


def test_array_record_text_errors(tmp_path):
    _write_array_record(tmp_path / "bad.ar", [b"fine", b"fine", b"\xc3("])
    with pytest.raises(DmaError, match=r"bad.ar: record 2: not UTF-8"):
        list(iter_array_record_texts([str(tmp_path / "bad.ar")]))
    _write_array_record(tmp_path / "j.ar", [b'{"t": "a"}', b'{"u": "b"}'])
    with pytest.raises(DmaError, match=r"j.ar: record 1: no field 't'"):
        list(iter_array_record_texts([str(tmp_path / "j.ar")], text_field="t"))
    _write_array_record(tmp_path / "full.ar", [b"x" * 100] * 50)
    data = (tmp_path / "full.ar").read_bytes()
    (tmp_path / "cut.ar").write_bytes(data[: len(data) // 2])
    with pytest.raises(DmaError, match=r"cut.ar: no readable records"):
        list(iter_array_record_texts([str(tmp_path / "cut.ar")]))
    with pytest.raises(DmaError, match=r"none.ar: ArrayRecord file not found"):
        list(iter_array_record_texts([str(tmp_path / "none.ar")]))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny TFDS dataset prepared locally as ArrayRecord; nothing is downloaded."""
    import tensorflow_datasets as tfds

    with tfds.core.registered.skip_registration():  # read back from files, like real data
        class DmaTinyText(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                    {"text": tfds.features.Text(), "n": tfds.features.Scalar(np.int64)}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(0, 30),
                        "test": self._generate_examples(30, 35)}

            def _generate_examples(self, lo, hi):
                for i in range(lo, hi):
                    yield i, {"text": f"document {i}: {TEXTS[i % 4]}", "n": i}

    data_dir = tmp_path_factory.mktemp("tfds")
    DmaTinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_local_round_trip(tfds_dir):
    train = list(iter_tfds("dma_tiny_text", "train", tfds_dir))
    assert sorted(train) == sorted(f"document {i}: {TEXTS[i % 4]}" for i in range(30))
    assert list(iter_tfds("dma_tiny_text", "train", tfds_dir)) == train  # deterministic
    test = list(iter_tfds("dma_tiny_text", "test", tfds_dir))
    assert sorted(test) == sorted(f"document {i}: {TEXTS[i % 4]}" for i in range(30, 35))
    assert len(list(iter_tfds("dma_tiny_text", "train[:10]", tfds_dir))) == 10


def test_tfds_errors(tfds_dir, tmp_path):
    with pytest.raises(DmaError, match=rf"'no_such_ds' in data_dir '{tmp_path}': not found"):
        list(iter_tfds("no_such_ds", "train", tmp_path))
    with pytest.raises(DmaError, match="'mnist' in data_dir .*: not prepared there"):
        list(iter_tfds("mnist", "train", tmp_path))  # a registered dataset, never downloaded
    with pytest.raises(DmaError, match="split 'validation': Unknown split"):
        list(iter_tfds("dma_tiny_text", "validation", tfds_dir))
    with pytest.raises(DmaError, match="example 0: no feature 'body'"):
        list(iter_tfds("dma_tiny_text", "train", tfds_dir, text_field="body"))
    with pytest.raises(DmaError, match="example 0: feature 'n' is int, not text"):
        list(iter_tfds("dma_tiny_text", "train", tfds_dir, text_field="n"))
