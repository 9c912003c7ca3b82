"""`dma prepare`: corpora -> tokenized, packed, per-domain ArrayRecord shards + a manifest.

Per domain, documents are split into train / held-out by a hash of their text
(no document straddles both; exactly round(fraction * n) documents, at least one,
are held out), tokenized, packed into `record_len`-token records
with document boundaries marked (`segment_ids`), and written as ArrayRecord
shards under `<data dir>/domains/<domain>/`. A domain is finished when its
`done.json` exists; re-running skips finished domains whose inputs did not
change and redoes a half-written one. Benchmarks go to `benchmarks/<field>.jsonl`, each item
checked against the tokenizer and `eval.max_len` (a choice that cannot fit is an error here).
The manifest is removed before anything is rewritten and written last, atomically: a manifest always describes
complete data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from dma_jax.config import Config, DomainInput, dump_config
from dma_jax.data import benchmarks, demo_corpora, sources
from dma_jax.data.domains import FORMAT, DomainSpace
from dma_jax.data.packing import pack_documents, verify_shards, write_shards
from dma_jax.data.tokenizer import ByteTokenizer, Tokenizer, check_identity, load_tokenizer
from dma_jax.errors import DmaError
from dma_jax.faults import maybe_fault
from dma_jax.io_utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def _encoder(tok: Tokenizer) -> Callable[[str], np.ndarray]:
    if isinstance(tok, ByteTokenizer):  # vectorised fast path, same ids as tok.encode
        return lambda text: np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + ByteTokenizer.OFFSET
    return lambda text: np.asarray(tok.encode(text), np.int32)


def _user_documents(d: DomainInput) -> Callable[[], Iterator[str]]:
    if d.kind == "text":
        return lambda: sources.iter_text_files(d.paths)
    if d.kind == "jsonl":
        return lambda: (doc for p in sources.expand_patterns(d.paths, "JSONL file")
                        for doc in sources.iter_jsonl(p, d.text_field))
    if d.kind == "tfds":
        return lambda: sources.iter_tfds(d.tfds_name, d.split, d.data_dir, d.text_field)
    return lambda: sources.iter_array_record_texts(d.paths, d.text_field if d.text_field != "text" else None)


def domain_inputs(cfg: Config) -> list[tuple[str, str, Callable[[], Iterator[str]], dict]]:
    """(name, field, documents factory, fingerprint source) for every domain of the config."""
    dc = cfg.data
    if not dc.demo:
        return [(d.name, d.field, _user_documents(d), d.model_dump(mode="json")) for d in dc.domains]
    out = []
    for dom in demo_corpora.demo_domains(cfg.run.seed, dc.demo_math_docs_per_domain, dc.demo_fields):
        docs = dom.documents[: dc.demo_max_docs_per_domain] if dc.demo_max_docs_per_domain else dom.documents
        digest = hashlib.sha256("\0".join(docs).encode("utf-8")).hexdigest()
        out.append((dom.name, dom.field, (lambda docs=docs: iter(docs)), {"demo": dom.name, "sha256": digest}))
    return out


def _doc_hash(text: str, seed: int) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(text.encode("utf-8"))
    return int.from_bytes(h.digest(), "little")


def heldout_threshold(docs: Iterable[str], fraction: float, seed: int) -> int:
    """Hash threshold holding out round(fraction * n) documents, at least one (ties: duplicates)."""
    hashes = sorted(_doc_hash(t, seed) for t in docs if t)
    if len(hashes) < 2:
        return -1
    k = min(max(1, round(fraction * len(hashes))), len(hashes) - 1)
    return hashes[k - 1]


def _safe_dir(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "__", name)


def _write_split(docs: Iterable[str], encode, tok: Tokenizer, record_len: int, out_dir: Path, prefix: str,
                 records_per_shard: int) -> dict:
    counts = {"documents": 0, "tokens": 0}

    def token_docs():
        for text in docs:
            if not text:
                continue
            ids = encode(text)
            counts["documents"] += 1
            counts["tokens"] += len(ids) + 1  # + eos
            maybe_fault("prepare.document")
            yield ids

    shards = write_shards(pack_documents(token_docs(), record_len, tok.eos_id, tok.pad_id), out_dir, prefix,
                          records_per_shard)
    return {"dir": out_dir.name, "shards": shards, **counts}


def _prepare_domain(name, field, docs_fn, fp, tok, encode, cfg: Config, data_dir: Path) -> dict:
    dc = cfg.data
    ddir = data_dir / "domains" / _safe_dir(name)
    done = ddir / "done.json"
    if done.is_file():
        try:
            entry = json.loads(done.read_text())
        except json.JSONDecodeError:
            entry = {}
        if entry.get("fingerprint") == fp:
            try:
                for split in ("train", "heldout"):
                    verify_shards(entry[split]["shards"], data_dir / entry[split]["dir"])
                return entry
            except (DmaError, KeyError) as e:
                log.warning("domain %s: finished data fails verification (%s); preparing it again", name, e)
    if ddir.exists():
        shutil.rmtree(ddir)  # half-written or stale: redo
    seed = cfg.run.seed
    entry = {"name": name, "field": field, "fingerprint": fp}
    threshold = heldout_threshold(docs_fn(), dc.heldout_fraction, seed)
    if threshold < 0:
        raise DmaError(f"data domain '{name}': fewer than 2 non-empty documents (need train and held-out)")
    for split, held in (("train", False), ("heldout", True)):
        rel = Path("domains") / _safe_dir(name) / split
        docs = (t for t in docs_fn() if (_doc_hash(t, seed) <= threshold) == held)
        info = _write_split(docs, encode, tok, dc.record_len, data_dir / rel, split, dc.records_per_shard)
        info["dir"] = str(rel)
        entry[split] = info
    atomic_write_json(done, entry)
    maybe_fault("prepare.domain_done")
    return entry


def _write_benchmarks(cfg: Config, fields: list[str], data_dir: Path, tok: Tokenizer) -> dict:
    """Benchmarks per field to `benchmarks/<field>.jsonl`; every choice must fit `eval.max_len` tokens (checked
    here, so that the evaluation never has to skip an item). Demo text items are drawn with choices of at most
    max_len - max_len // 4 tokens, which leaves a quarter of the window to their context."""
    dc, max_len = cfg.data, cfg.eval.max_len
    bdir = data_dir / "benchmarks"
    out = {}
    if dc.demo:
        room = max_len - max_len // 4
        items = demo_corpora.demo_benchmarks(cfg.run.seed, dc.demo_benchmark_items, [f for f in fields],
                                             dc.demo_math_docs_per_domain,
                                             choice_fits=lambda c: len(tok.encode(c)) <= room)
        for field, its in items.items():
            benchmarks.check_choices_fit(its, tok.encode, max_len, f"demo benchmarks of field {field!r}")
    else:
        items = {}
        for b in dc.benchmarks:
            its = benchmarks.read_benchmarks_jsonl(b.path)
            benchmarks.check_choices_fit(its, tok.encode, max_len, f"{b.path} (field {b.field!r})")
            items.setdefault(b.field, []).extend(its)
    for field, its in items.items():
        path = bdir / f"{field}.jsonl"
        benchmarks.write_benchmarks_jsonl(its, path)
        out[field] = {"path": f"benchmarks/{field}.jsonl", "items": len(its),
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return out


def run_prepare(cfg: Config, progress: bool = True) -> DomainSpace:
    dc = cfg.data
    data_dir = Path(cfg.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(dc.tokenizer.kind, dc.tokenizer.path)
    manifest_path = data_dir / "manifest.json"
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            old = None
        if old and "tokenizer" in old:
            check_identity(old["tokenizer"], tok.identity(), str(manifest_path))
        # from here on domains and benchmarks may be rewritten: a run killed before the new manifest is written
        # must not leave the old one saying the data are complete (with another config, or half-rewritten)
        manifest_path.unlink()
    t0 = time.perf_counter()
    inputs = domain_inputs(cfg)
    common = {"tokenizer": tok.identity(), "record_len": dc.record_len, "heldout_fraction": dc.heldout_fraction,
              "seed": cfg.run.seed}
    encode = _encoder(tok)
    entries = []
    bar = tqdm(inputs, desc="prepare", unit="domain", disable=not progress, dynamic_ncols=True)
    for name, field, docs_fn, fp_src in bar:
        bar.set_postfix(domain=name)
        fp = hashlib.sha256(json.dumps({**common, "input": fp_src}, sort_keys=True).encode()).hexdigest()
        entries.append(_prepare_domain(name, field, docs_fn, fp, tok, encode, cfg, data_dir))
    bar.close()
    fields = list(dict.fromkeys(["source"] + [e["field"] for e in entries]))
    manifest = {
        "format": FORMAT,
        **common,
        "domains": [{k: e[k] for k in ("name", "field", "train", "heldout")} for e in entries],
        "benchmarks": _write_benchmarks(cfg, fields, data_dir, tok),
        "config": dump_config(cfg)["data"],
        "prepare_seconds": round(time.perf_counter() - t0, 2),
    }
    maybe_fault("prepare.manifest")
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return DomainSpace.load(data_dir)
