"""`dma prepare` and the domain space: demo and user inputs, resume, and one-line errors."""

import collections
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from array_record.python.array_record_module import ArrayRecordWriter

from dma_jax.config import load_config
from dma_jax.data import benchmarks, demo_corpora
from dma_jax.data.domains import DomainSpace
from dma_jax.data.tokenizer import ByteTokenizer
from dma_jax.errors import DmaError
from dma_jax.evaluation import SUBSET_SEED, select_items
from dma_jax.prepare import run_prepare
from tests.paths import DEMO
from tests.test_sources import tfds_dir  # noqa: F401  (fixture)


def _decode_docs(space, d, split):
    """Rebuild the documents of a split from its records (independent of the writer)."""
    tok = ByteTokenizer()
    recs = space.records(d, split)
    stream = np.concatenate([recs[i]["tokens"][recs[i]["segment_ids"] != 0] for i in range(len(recs))])
    pieces = np.split(stream, np.where(stream == tok.eos_id)[0] + 1)
    return [tok.decode(p[:-1]) for p in pieces if len(p)]


@pytest.fixture(scope="module")
def tiny_space(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep")
    cfg = load_config(DEMO, [f"run.out_dir={out}"], variant="tiny")
    return cfg, run_prepare(cfg, progress=False)


def test_demo_space_fields_domains_and_records(tiny_space):
    cfg, space = tiny_space
    assert space.fields == ["source", "math", "code"]
    for field in space.fields:
        assert len(space.domain_indices(field)) >= 4
        assert len(space.benchmarks(field)) == cfg.data.demo_benchmark_items
    assert space.manifest["tokenizer"]["kind"] == "byte"
    doms = {d.name: d for d in demo_corpora.demo_domains(cfg.run.seed, cfg.data.demo_math_docs_per_domain)}
    for d, name in enumerate(space.names):
        expected = [t for t in doms[name].documents[: cfg.data.demo_max_docs_per_domain] if t]
        train, held = _decode_docs(space, d, "train"), _decode_docs(space, d, "heldout")
        # Every document lands in exactly one split, whole, in order; one of ~20 documents is held out.
        assert sorted(train + held) == sorted(expected)
        assert not set(train) & set(held) and len(held) >= 1
        assert space.train_tokens[d] == sum(len(t.encode()) + 1 for t in train)
        rec = space.records(d)[0]
        assert rec["tokens"].shape == (cfg.data.record_len,)


def test_demo_benchmarks_fit_eval_max_len_and_the_in_loop_subset_covers_every_domain(tiny_space):
    cfg, space = tiny_space
    tok, max_len = space.tokenizer(), cfg.eval.max_len
    for field in space.fields:
        items = space.benchmarks(field)
        domains = {space.names[d] for d in space.domain_indices(field)} - set(demo_corpora.LOW_QUALITY_DOMAINS)
        assert {it["domain"] for it in items} == domains, field  # every domain in the written file
        # Demo choices leave a quarter of the window to the context (prepare draws them so).
        assert max(len(tok.encode(c)) for it in items for c in it["choices"]) <= max_len - max_len // 4
        subset = select_items(items, cfg.eval.benchmark_items_per_field, SUBSET_SEED)
        counts = collections.Counter(it["domain"] for it in subset)
        assert set(counts) == domains and max(counts.values()) - min(counts.values()) <= 1, (field, counts)


def test_prepare_refuses_a_benchmark_choice_longer_than_eval_max_len(tmp_path):
    (tmp_path / "a.txt").write_text("some source text " * 10)
    (tmp_path / "b.txt").write_text("more source text " * 10)
    items = [{"context": "2 + 2 =", "choices": [" 4", " 5"], "gold": 0, "domain": "m"},
             {"context": "Spell it:", "choices": [" " + "x" * 32, " y"], "gold": 1, "domain": "m/long"}]
    benchmarks.write_benchmarks_jsonl(items, tmp_path / "b.jsonl")
    cfg = _user_cfg(tmp_path, [{"name": "s", "field": "source", "kind": "text", "paths": [str(tmp_path / "*.txt")]}],
                    [{"field": "source", "path": str(tmp_path / "b.jsonl")}])
    with pytest.raises(DmaError, match=re.escape(f"{tmp_path / 'b.jsonl'} (field 'source'): item 1 (domain m/long): ")
                       + r"choice ' x+' is 33 tokens; eval.max_len=32") as e:
        run_prepare(cfg, progress=False)
    assert "\n" not in str(e.value)


def test_rerun_skips_finished_domains_and_redoes_a_half_written_one(tiny_space):
    cfg, space = tiny_space
    ddirs = sorted((space.dir / "domains").iterdir())
    stamps = {p.name: (p / "done.json").stat().st_mtime_ns for p in ddirs}
    victim = ddirs[3]
    (victim / "done.json").unlink()  # as if killed before the domain finished
    (victim / "train" / ".train-00007.array_record.123.tmp").write_bytes(b"partial")
    again = run_prepare(cfg, progress=False)
    for p in ddirs:
        if p == victim:
            assert (p / "done.json").exists() and not list((p / "train").glob(".*tmp"))
        else:
            assert (p / "done.json").stat().st_mtime_ns == stamps[p.name]  # untouched
    assert again.manifest["domains"] == space.manifest["domains"]


def test_a_killed_reprepare_leaves_no_manifest_of_the_old_data(tmp_path, monkeypatch):
    # Prepared, then prepared again with another config and killed after a domain was rewritten: the old
    # manifest must not say the data are complete (a pipeline would skip prepare and read the new half).
    from dma_jax import prepare
    from dma_jax.runs import RunDir

    cfg = load_config(DEMO, [f"run.out_dir={tmp_path}"], variant="tiny")
    run_prepare(cfg, progress=False)
    assert RunDir(cfg).prepared()
    other = load_config(DEMO, [f"run.out_dir={tmp_path}", "data.heldout_fraction=0.1"], variant="tiny")
    real, calls = prepare._prepare_domain, {"n": 0}

    def killed(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(prepare, "_prepare_domain", killed)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(other, progress=False)
    monkeypatch.undo()
    assert not RunDir(cfg).prepared() and not RunDir(other).prepared()
    again = run_prepare(cfg, progress=False)  # the same command as the first: the old data back, complete
    assert RunDir(cfg).prepared() and again.manifest["config"]["heldout_fraction"] == 0.05


def test_other_tokenizer_is_refused_and_nothing_is_lost(tiny_space, tmp_path):
    cfg, space = tiny_space
    import tokenizers
    from tokenizers import models, pre_tokenizers

    hf = tokenizers.Tokenizer(models.WordLevel({"a": 0, "<unk>": 1, "</s>": 2}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    before = (space.dir / "manifest.json").read_bytes()
    bad = load_config(DEMO, [f"run.out_dir={cfg.run.out_dir}", "data.tokenizer.kind=hf",
                             f"data.tokenizer.path={tmp_path / 'tokenizer.json'}"], variant="tiny")
    with pytest.raises(DmaError, match="manifest.json: tokenizer differs from the manifest's"):
        run_prepare(bad, progress=False)
    assert (space.dir / "manifest.json").read_bytes() == before
    assert DomainSpace.load(space.dir).num_domains == space.num_domains


def _user_cfg(tmp_path, domains, benchmarks=()):
    raw = {"run": {"out_dir": str(tmp_path / "run")},
           "data": {"demo": False, "record_len": 33, "heldout_fraction": 0.25, "domains": domains,
                    "benchmarks": list(benchmarks)},
           "proxy": {"max_seq_len": 64}, "target": {"max_seq_len": 64}, "eval": {"max_len": 32}, "sweep": {"seq_len": 32}}
    p = tmp_path / "user.yaml"
    p.write_text(yaml.safe_dump(raw))
    return load_config(p)


def test_user_domains_from_text_jsonl_array_record_and_tfds(tmp_path, tfds_dir):  # noqa: F811
    (tmp_path / "txt").mkdir()
    for i in range(6):
        (tmp_path / "txt" / f"{i}.txt").write_text(f"plain document number {i}. " * 5)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"text": f"2 + {i} = {2 + i}"}) + "\n" for i in range(8)))
    w = ArrayRecordWriter(str(tmp_path / "c.array_record"), "group_size:1")
    for i in range(5):
        w.write(f"def f{i}():\n    return {i}\n".encode())
    w.close()
    items = [{"context": "2 + 2 =", "choices": [" 4", " 5"], "gold": 0, "domain": "m"}]
    benchmarks.write_benchmarks_jsonl(items, tmp_path / "b.jsonl")
    cfg = _user_cfg(tmp_path, [
        {"name": "prose", "field": "source", "kind": "text", "paths": [str(tmp_path / "txt" / "*.txt")]},
        {"name": "tf", "field": "source", "kind": "tfds", "tfds_name": "dma_tiny_text", "data_dir": str(tfds_dir)},
        {"name": "m", "field": "math", "kind": "jsonl", "paths": [str(tmp_path / "m.jsonl")]},
        {"name": "c", "field": "code", "kind": "array_record", "paths": [str(tmp_path / "c.array_record")]},
    ], [{"field": "math", "path": str(tmp_path / "b.jsonl")}])
    space = run_prepare(cfg, progress=False)
    assert space.names == ["prose", "tf", "m", "c"] and space.fields == ["source", "math", "code"]
    docs = _decode_docs(space, 2, "train") + _decode_docs(space, 2, "heldout")
    assert sorted(docs) == sorted(f"2 + {i} = {2 + i}" for i in range(8))
    tf_docs = _decode_docs(space, 1, "train") + _decode_docs(space, 1, "heldout")
    assert len(tf_docs) == 30 and all(d.startswith("document ") for d in tf_docs)
    assert space.benchmarks("math") == items
    assert space.subset(["source", "math"]).names == ["prose", "tf", "m"]


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"nope/\*\.txt: pattern matches no text file"),
    ("empty", r"data domain 'e': fewer than 2 non-empty documents"),
    ("badjsonl", r"bad\.jsonl:2: "),
])
def test_bad_inputs_are_one_line_errors(tmp_path, case, pattern):
    (tmp_path / "ok.txt").write_text("fine text " * 10)
    (tmp_path / "ok2.txt").write_text("more text " * 10)
    src = {"name": "s", "field": "source", "kind": "text", "paths": [str(tmp_path / "ok*.txt")]}
    if case == "missing":
        dom = {"name": "x", "field": "math", "kind": "text", "paths": [str(tmp_path / "nope" / "*.txt")]}
    elif case == "empty":
        (tmp_path / "e.txt").write_text("")
        dom = {"name": "e", "field": "math", "kind": "text", "paths": [str(tmp_path / "e.txt")]}
    else:
        (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
        dom = {"name": "j", "field": "math", "kind": "jsonl", "paths": [str(tmp_path / "bad.jsonl")]}
    cfg = _user_cfg(tmp_path, [src, dom])
    with pytest.raises(DmaError, match=pattern) as e:
        run_prepare(cfg, progress=False)
    assert "\n" not in str(e.value)


def test_config_errors_for_domain_spaces(tmp_path):
    with pytest.raises(DmaError, match="duplicate domain name"):
        _user_cfg(tmp_path, [{"name": "a", "field": "source", "kind": "text", "paths": ["x"]}] * 2)
    with pytest.raises(DmaError, match="no domain of field 'source'"):
        _user_cfg(tmp_path, [{"name": "a", "field": "math", "kind": "text", "paths": ["x"]}])
    with pytest.raises(DmaError, match="kind tfds needs tfds_name"):
        _user_cfg(tmp_path, [{"name": "a", "field": "source", "kind": "tfds"}])


def test_domain_space_errors(tiny_space, tmp_path):
    cfg, space = tiny_space
    with pytest.raises(DmaError, match="no manifest"):
        DomainSpace.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DmaError, match="manifest.json: not valid JSON"):
        DomainSpace.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DmaError, match="not a domain-space manifest"):
        DomainSpace.load(tmp_path)
    with pytest.raises(DmaError, match="no field 'chemistry'"):
        space.subset(["source", "chemistry"])
    with pytest.raises(DmaError, match="weight"):
        space.validate_weights(np.full(space.num_domains, -1.0), "test")
    with pytest.raises(DmaError):
        space.validate_weights(np.ones(space.num_domains + 1) / (space.num_domains + 1), "test")


def test_cli_prepare_prints_summary(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dma_jax.cli", "--no-progress", "prepare", "--variant", "tiny",
                          f"run.out_dir={tmp_path}", "data.demo_fields=[source, math]"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "source" in out.stdout and "math" in out.stdout and "train tokens" in out.stdout
