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

`DomainSpace.split(k)` is a view with more domains than were prepared: each domain cut into k by record
range (train and held-out alike), named `<name>.<i>of<k>`; `part_of` keeps the prepared name, which is what
`eval.unscored_domains` and the policies' exclusions match. The manifest itself is never rewritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dma_jax.data.benchmarks import read_benchmarks_jsonl
from dma_jax.data.packing import PackedRecords, read_records
from dma_jax.data.tokenizer import Tokenizer, check_identity, load_tokenizer
from dma_jax.errors import DmaError
from dma_jax.io_utils import read_json_file

FORMAT = "dma-domains-v1"


class RecordRange:
    """Records `start` .. `stop` - 1 of a `PackedRecords` as a sequence of their own (a split domain's part)."""

    def __init__(self, records: PackedRecords, start: int, stop: int):
        if not 0 <= start < stop <= len(records):
            raise DmaError(f"record range [{start}, {stop}) outside the {len(records)} records of {records.paths[0]}")
        self.records, self.start, self.stop = records, int(start), int(stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        n = len(self)
        for i in indices:
            if not -n <= int(i) < n:
                raise IndexError(f"record {i} out of range for {n} records")
        return self.records.__getitems__([self.start + int(i) % n for i in indices])


def count_tokens(records) -> int:
    """Non-padding tokens of a sequence of records (segment id != 0)."""
    return sum(int((r["segment_ids"] != 0).sum()) for r in records.__getitems__(range(len(records))))


class DomainSpace:
    def __init__(self, data_dir: str | Path, manifest: dict, domain_idx: Sequence[int] | None = None, *,
                 entries: Sequence[dict] | None = None):
        """The domains `domain_idx` of the manifest (all by default), or the given manifest-style `entries`
        (a view such as `split` builds)."""
        self.dir = Path(data_dir)
        self.manifest = manifest
        if entries is None:
            all_domains = manifest["domains"]
            idx = list(range(len(all_domains))) if domain_idx is None else list(domain_idx)
            entries = [all_domains[i] for i in idx]
        self._entries = list(entries)
        self.names: list[str] = [d["name"] for d in self._entries]
        self.part_of: list[str] = [d.get("part_of", d["name"]) for d in self._entries]  # the prepared domain
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
        return DomainSpace(self.dir, self.manifest, entries=[d for d in self._entries if d["field"] in fields])

    def without(self, names: Sequence[str]) -> DomainSpace:
        """This space less the domains named in `names`, by name or by the prepared domain they are part of
        (names it does not hold are ignored)."""
        return DomainSpace(self.dir, self.manifest, entries=[
            d for d in self._entries if d["name"] not in names and d.get("part_of", d["name"]) not in names])

    def split(self, parts: int, heldout: bool = True) -> DomainSpace:
        """Every domain cut into `parts` domains by record range (records in prepared order, so a part holds
        whole documents but for at most one cut at each end): `<name>.<i>of<parts>`, i = 1..parts, with its own
        token counts. The held-out records are cut the same way, or, with `heldout=False`, every part keeps the
        whole domain's (for held-out splits too short to cut into windows). Mixing, held-out windows and
        benchmarks read the parts as domains of their own; `part_of` names the prepared domain."""
        if parts < 1:
            raise DmaError(f"domain split: parts must be >= 1, got {parts}")
        if parts == 1:
            return self
        out = []
        for d, entry in enumerate(self._entries):
            cuts = {}
            for split in ("train", "heldout") if heldout else ("train",):
                recs = self.records(d, split)
                n = len(recs)
                if n < parts:
                    raise DmaError(f"{self.dir}/manifest.json: domain {entry['name']!r} has {n} {split} records, "
                                   f"too few to split into {parts}")
                base = recs.start if isinstance(recs, RecordRange) else 0
                edges = [base + n * i // parts for i in range(parts + 1)]
                full = recs.records if isinstance(recs, RecordRange) else recs
                cuts[split] = [(a, b, count_tokens(RecordRange(full, a, b))) for a, b in zip(edges, edges[1:])]
            for i in range(parts):
                part = {k: v for k, v in entry.items() if k not in cuts}
                part.update(name=f"{entry['name']}.{i + 1}of{parts}", part_of=entry.get("part_of", entry["name"]))
                for split, pieces in cuts.items():
                    a, b, tokens = pieces[i]
                    part[split] = {**entry[split], "records": [a, b], "tokens": tokens}
                out.append(part)
        return DomainSpace(self.dir, self.manifest, entries=out)

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

    def records(self, domain: int, split: str = "train") -> PackedRecords | RecordRange:
        info = self._entries[domain][split]
        base = self.dir / info["dir"]
        recs = read_records([base / s["path"] for s in info["shards"]], self.record_len)
        return RecordRange(recs, *info["records"]) if "records" in info else recs

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
