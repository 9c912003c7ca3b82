"""Typed, validated, frozen configs: YAML files plus `key.sub=value` overrides.

A config file is a YAML mapping with one section per component (`model`, `optim`,
`mesh`, `pretrain`, ...). It may carry `variants:`, a mapping of variant name to
a partial config deep-merged on top (every config in `configs/` has a `tiny`
variant that tests and CI use). Any error is a `DmaError` whose one line names the
file and the key.

Layout: `sections.py` (every component's section), `agent.py` (the agent's sections), this file (the
root `Config`, loading, overrides). One package, so the agent's config needs no import of a layer above.
"""

from __future__ import annotations

import copy
import math
import typing
from pathlib import Path
from typing import Any

import pydantic
import yaml

from dma_jax.config.agent import AgentConfig, AgentModelConfig, CqlConfig, SftConfig
from dma_jax.config.headroom import HeadroomConfig
from dma_jax.config.sections import (BALANCED_HOW, BenchmarkInput, CptConfig, DataConfig, DomainInput, EvalConfig, MeshConfig,
                                     ModelConfig, OptimConfig, PretrainConfig, RunConfig, SamplerConfig, Section,
                                     SweepConfig, TokenizerConfig)
from dma_jax.config.study import StudyConfig
from dma_jax.errors import DmaError

__all__ = ["BALANCED_HOW", "AgentConfig", "AgentModelConfig", "BenchmarkInput", "Config", "CptConfig", "CqlConfig", "DataConfig",
           "DomainInput", "EvalConfig", "HeadroomConfig", "MeshConfig", "ModelConfig", "OptimConfig", "PretrainConfig", "RunConfig",
           "SamplerConfig", "Section", "SftConfig", "StudyConfig", "SweepConfig", "TokenizerConfig", "config_from_dict",
           "config_variants", "dump_config", "load_config", "parse_override"]



class Config(Section):
    run: RunConfig = RunConfig()
    proxy: ModelConfig = ModelConfig()
    target: ModelConfig = ModelConfig(d_model=128, n_layers=4, n_heads=4, d_ff=344)
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sweep: SweepConfig = SweepConfig()
    cpt: CptConfig = CptConfig()
    agent: AgentConfig = AgentConfig()
    eval: EvalConfig = EvalConfig()
    headroom: HeadroomConfig = HeadroomConfig()
    # `dma study`'s pre-registration; left out of the dumped config at its default (run folders, config hashes
    # and the golden run of every other command stay as they were)
    study: StudyConfig = StudyConfig()

    @pydantic.model_serializer(mode="wrap")
    def _drop_default_study(self, handler):
        out = handler(self)
        if self.study == StudyConfig():
            out.pop("study", None)
        return out

    @pydantic.model_validator(mode="after")
    def _check_cross(self) -> Config:
        for which in ("proxy", "target"):
            m = getattr(self, which)
            for name, length in (("data.record_len-1", self.data.record_len - 1), ("eval.max_len", self.eval.max_len)):
                if length > m.max_seq_len:
                    raise ValueError(f"{name}={length} exceeds {which}.max_seq_len={m.max_seq_len}")
        if self.sweep.seq_len > self.data.record_len - 1:
            raise ValueError(f"sweep.seq_len={self.sweep.seq_len} exceeds data.record_len-1={self.data.record_len - 1} "
                             "(proxies train on windows cut from packed records)")
        if self.sweep.seq_len > self.proxy.max_seq_len:
            raise ValueError(f"sweep.seq_len={self.sweep.seq_len} exceeds proxy.max_seq_len={self.proxy.max_seq_len}")
        return self

    @pydantic.model_validator(mode="after")
    def _check_dirs(self) -> Config:
        if "://" in self.run.out_dir:
            _check_remote_support(f"run.out_dir={self.run.out_dir}")
        if self.data.dir and "://" in self.data.dir:
            raise ValueError(f"data.dir={self.data.dir}: the prepared shards must be on a local disk (ArrayRecord "
                             "reads and writes local files only); `dma prepare` on every host writes the same bytes")
        return self

    @property
    def data_dir(self) -> str:
        """`data.dir`; default `<run.out_dir>/data`, or `runs/<run.name>/data` when `run.out_dir` is `gs://...`
        (the shards stay on each host's disk)."""
        if self.data.dir:
            return self.data.dir
        if "://" in self.run.out_dir:
            return f"runs/{self.run.name}/data"
        return f"{self.run.out_dir}/data"


def _check_remote_support(what: str) -> None:
    """A `gs://` (s3://, ...) path needs its fsspec filesystem (gcsfs for gs://): say so at load time."""
    import fsspec

    scheme = what.split("=", 1)[1].split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as e:
        raise ValueError(f"{what}: {scheme}:// paths need an extra package ({str(e).splitlines()[0]}); "
                         'pip install -e ".[gcs]"') from None


# ---------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently: a second
    `run:` section would drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _item_model(ann) -> type[pydantic.BaseModel] | None:
    """The model of a `tuple[Model, ...]` / `list[Model]` field's entries (None for other fields)."""
    args = typing.get_args(ann)
    if typing.get_origin(ann) in (tuple, list) and args and isinstance(args[0], type) \
            and issubclass(args[0], pydantic.BaseModel):
        return args[0]
    return None


def _set_dotted(tree: dict, dotted: str, value: Any, where: str) -> None:
    """Set `a.b.c` in the raw config; an integer part indexes a list of sections (`data.domains.0.paths`)."""
    keys = dotted.split(".")
    node: Any = tree
    model: type[pydantic.BaseModel] | None = Config
    entries: type[pydantic.BaseModel] | None = None  # the entry model of the list `node` is, if it is one
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise DmaError(f"{where}: '{'.'.join(keys[:i])}' has {len(node)} entries (0-{len(node) - 1}); "
                               f"no entry {k!r}")
            if last:
                node[int(k)] = value
                return
            if not isinstance(node[int(k)], dict):
                node[int(k)] = {}
            node, model, entries = node[int(k)], entries, None
            continue
        fields = model.model_fields if model is not None else {}
        if model is not None and k not in fields:
            raise DmaError(f"{where}: unknown key '{'.'.join(keys[: i + 1])}'")
        ann = fields[k].annotation if model is not None else None
        entries = _item_model(ann)
        model = ann if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel) else None
        if last:
            node[k] = value
        elif isinstance(node.get(k), (list, tuple)) and keys[i + 1].isdigit():
            node[k] = list(node[k])
            node = node[k]
        else:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]


def parse_override(text: str) -> tuple[str, Any]:
    """`model.d_model=128` -> ("model.d_model", 128); the value is parsed as YAML."""
    if "=" not in text:
        raise DmaError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise DmaError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise DmaError(f"override '{text}': value is not valid YAML ({str(e).splitlines()[0]})") from None
    return key, value


def _format_validation_error(err: pydantic.ValidationError, where: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        return f"{where}: unknown key '{loc}'"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    got_s = "" if isinstance(got, dict) or not loc else f" (got {got!r})"
    extra = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {loc + ': ' if loc else ''}{msg}{got_s}{extra}"


def _non_finite(tree: Any, path: str = "") -> tuple[str, float] | None:
    """(dotted path, value) of the first NaN/inf float in the raw config, or None."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if (hit := _non_finite(v, f"{path}.{k}" if path else str(k))) is not None:
                return hit
    elif isinstance(tree, float) and not math.isfinite(tree):
        return path, tree
    return None


def config_from_dict(raw: dict, where: str = "<config>", overrides: tuple[str, ...] = ()) -> Config:
    """Validate `raw`; an error names `where`, or the override (`key.sub=value`) that set the offending key."""
    def blame(loc: str) -> str:
        hits = [t for t in overrides if (k := t.split("=", 1)[0].strip()) == loc or loc.startswith(k + ".")
                or k.startswith(loc + ".")]
        return f"{where}: override '{hits[-1]}'" if hits else where

    if (bad := _non_finite(raw)) is not None:
        raise DmaError(f"{blame(bad[0])}: {bad[0]}: value must be finite (got {bad[1]})")
    try:
        return Config.model_validate(raw)
    except pydantic.ValidationError as e:
        loc = ".".join(str(p) for p in e.errors()[0]["loc"])
        raise DmaError(_format_validation_error(e, blame(loc))) from None


def load_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    variant: str | None = None,
) -> Config:
    """Load a YAML config, apply a named variant, then `key.sub=value` overrides."""
    raw: dict = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise DmaError(f"{where}: " + ("a folder, not a config file" if p.is_dir() else "config file not found"))
        try:
            raw = _load_yaml(p.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise DmaError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
        if raw is None:
            raise DmaError(f"{where}: the config file is empty (expected a mapping of sections: run, data, ...)")
        if not isinstance(raw, dict):
            raise DmaError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    variants = raw.pop("variants", {}) or {}
    if not isinstance(variants, dict):
        raise DmaError(f"{where}: 'variants' must be a mapping of name to partial config")
    if variant is not None:
        if variant not in variants:
            known = ", ".join(sorted(variants)) or "none"
            raise DmaError(f"{where}: no variant '{variant}' (known: {known})")
        if not isinstance(variants[variant], dict):
            raise DmaError(f"{where}: variant '{variant}' must be a mapping of sections (a partial config), got "
                           f"{type(variants[variant]).__name__}")
        raw = _deep_merge(raw, variants[variant])
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value, f"{where}: override '{text}'")
    return config_from_dict(raw, where, tuple(overrides))


def config_variants(path: str | Path) -> list[str]:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return sorted((raw.get("variants") or {}).keys())


def dump_config(cfg: Config) -> dict:
    """A JSON/YAML-safe dict of the full config (all defaults filled in)."""
    return cfg.model_dump(mode="json")
