"""The domain space: the one object later stages ask for domain names, fields, sizes and data.

Built from the manifest that `dma prepare` writes (`<data dir>/manifest.json`):

    {"format": "dma-domains-v1", "tokenizer": {kind, path, sha256, vocab_size},
     "record_len": L, "heldout_fraction": f,
     "domains": [{"name", "field",
                  "train":   {"dir", "shards": [{path, num_records, sha256}], "tokens", "documents"},
                  "heldout": {... same ...}}],
     "benchmarks": {field: {"path", "sha256", "items"}}}

Fields are ordered with `source` first, then the target fields in order of appearance.
Every path in the manifest is relative to the data directory, so it can be moved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dma_jax.data.demo_corpora import read_benchmarks_jsonl
from dma_jax.data.packing import PackedRecords, read_records
from dma_jax.data.tokenizer import Tokenizer, check_identity, load_tokenizer
from dma_jax.errors import DmaError
from dma_jax.io_utils import read_json_file

FORMAT = "dma-domains-v1"


class DomainSpace:
    def __init__(self, data_dir: str | Path, manifest: dict, domain_idx: Sequence[int] | None = None):
        self.dir = Path(data_dir)
        self.manifest = manifest
        all_domains = manifest["domains"]
        idx = list(range(len(all_domains))) if domain_idx is None else list(domain_idx)
        self._entries = [all_domains[i] for i in idx]
        self.names: list[str] = [d["name"] for d in self._entries]
        self.fields_of_domain: list[str] = [d["field"] for d in self._entries]
        seen = dict.fromkeys(["source"] + self.fields_of_domain)
        self.fields: list[str] = [f for f in seen if f in self.fields_of_domain]
        self.record_len: int = int(manifest["record_len"])
        self.train_tokens = np.array([d["train"]["tokens"] for d in self._entries], np.int64)
        self.heldout_tokens = np.array([d["heldout"]["tokens"] for d in self._entries], np.int64)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, data_dir: str | Path) -> DomainSpace:
        path = Path(data_dir) / "manifest.json"
        manifest = read_json_file(path, "no manifest (run `dma prepare` with this config first)")
        _validate_manifest(manifest, path)
        return cls(path.parent, manifest)

    @classmethod
    def for_config(cls, cfg) -> DomainSpace:
        """The prepared space of `cfg`, checked against its tokenizer and record length."""
        space = cls.load(cfg.data_dir)
        space.check_tokenizer(cfg.data.tokenizer.kind, cfg.data.tokenizer.path)
        if space.record_len != cfg.data.record_len:
            raise DmaError(f"{space.dir}/manifest.json: prepared with record_len={space.record_len}, the config says "
                           f"data.record_len={cfg.data.record_len} (re-run `dma prepare`)")
        return space

    @classmethod
    def for_sweep(cls, cfg) -> DomainSpace:
        """The sweep's space (`dma sample`, `dma sweep`, the proxies): source + `sweep.target_field` domains."""
        return cls.for_config(cfg).subset(["source", cfg.sweep.target_field])

    def subset(self, fields: Sequence[str]) -> DomainSpace:
        """The domains of `fields` only (e.g. source + one target field for a sweep)."""
        unknown = [f for f in fields if f not in self.fields]
        if unknown:
            raise DmaError(f"{self.dir}/manifest.json: no field {unknown[0]!r} (fields: {', '.join(self.fields)})")
        all_names = [d["name"] for d in self.manifest["domains"]]
        keep = [i for i, d in enumerate(self.manifest["domains"]) if d["field"] in fields and d["name"] in self.names]
        del all_names
        return DomainSpace(self.dir, self.manifest, keep)

    def without(self, names: Sequence[str]) -> DomainSpace:
        """This space less the domains named in `names` (names it does not hold are ignored)."""
        keep = [i for i, d in enumerate(self.manifest["domains"]) if d["name"] in self.names and d["name"] not in names]
        return DomainSpace(self.dir, self.manifest, keep)

    # ------------------------------------------------------------------ queries
    @property
    def num_domains(self) -> int:
        return len(self.names)

    def domain_indices(self, field: str) -> list[int]:
        return [i for i, f in enumerate(self.fields_of_domain) if f == field]

    def field_index_of_domain(self) -> np.ndarray:
        return np.array([self.fields.index(f) for f in self.fields_of_domain], np.int32)

    def tokenizer(self) -> Tokenizer:
        ident = self.manifest["tokenizer"]
        tok = load_tokenizer(ident["kind"], ident.get("path"))
        check_identity(ident, tok.identity(), f"{self.dir}/manifest.json")
        return tok

    def check_tokenizer(self, kind: str, path: str | None) -> None:
        check_identity(self.manifest["tokenizer"], load_tokenizer(kind, path).identity(),
                       f"{self.dir}/manifest.json")

    def records(self, domain: int, split: str = "train") -> PackedRecords:
        info = self._entries[domain][split]
        base = self.dir / info["dir"]
        return read_records([base / s["path"] for s in info["shards"]], self.record_len)

    def tokens(self, domain: int, split: str = "train", max_tokens: int | None = None) -> np.ndarray:
        """The domain's tokens, padding dropped, records in order: int32 [n] (for on-device pools)."""
        recs = self.records(domain, split)
        out, n = [], 0
        for i in range(len(recs)):
            r = recs[i]
            toks = r["tokens"][r["segment_ids"] != 0]
            out.append(toks)
            n += len(toks)
            if max_tokens is not None and n >= max_tokens:
                break
        arr = np.concatenate(out) if out else np.zeros((0,), np.int32)
        return arr[:max_tokens] if max_tokens is not None else arr

    def benchmarks(self, field: str) -> list[dict]:
        info = self.manifest.get("benchmarks", {}).get(field)
        if info is None:
            return []
        return read_benchmarks_jsonl(self.dir / info["path"])

    def validate_weights(self, weights, where: str) -> np.ndarray:
        from dma_jax.data.mixer import validate_weights

        return validate_weights(weights, self.names, where)

    def describe(self) -> list[dict]:
        return [
            {"name": n, "field": f, "train_tokens": int(t), "heldout_tokens": int(h)}
            for n, f, t, h in zip(self.names, self.fields_of_domain, self.train_tokens, self.heldout_tokens)
        ]


def _validate_manifest(m: dict, path: Path) -> None:
    def bad(msg: str):
        raise DmaError(f"{path}: {msg}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        bad(f"not a domain-space manifest (format {m.get('format') if isinstance(m, dict) else None!r}, "
            f"expected {FORMAT!r})")
    for key in ("tokenizer", "record_len", "domains"):
        if key not in m:
            bad(f"missing field '{key}'")
    if not isinstance(m["domains"], list) or not m["domains"]:
        bad("'domains' must be a non-empty list")
    names = set()
    for i, d in enumerate(m["domains"]):
        for key in ("name", "field", "train", "heldout"):
            if key not in d:
                bad(f"domains[{i}]: missing field '{key}'")
        if d["name"] in names:
            bad(f"domains[{i}]: duplicate domain name {d['name']!r}")
        names.add(d["name"])
        for split in ("train", "heldout"):
            info = d[split]
            if not isinstance(info, dict) or not all(k in info for k in ("dir", "shards", "tokens")):
                bad(f"domain {d['name']!r}: '{split}' needs dir, shards and tokens")
            tokens = info["tokens"]
            if not isinstance(tokens, int) or isinstance(tokens, bool):
                bad(f"domain {d['name']!r}: {split}.tokens must be an integer, got {tokens!r}")
            if tokens <= 0:
                bad(f"domain {d['name']!r}: empty {split} split (no tokens)")
    if "source" not in {d["field"] for d in m["domains"]}:
        bad("no domain of field 'source'")
