"""Typed, validated, frozen configs: YAML files plus `key.sub=value` overrides.

A config file is a YAML mapping with one section per component (`model`, `optim`,
`mesh`, `pretrain`, ...). It may carry `variants:`, a mapping of variant name to
a partial config deep-merged on top (every config in `configs/` has a `tiny`
variant that tests and CI use). Any error is a `DmaError` whose one line names the
file and the key.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from dma_jax.errors import DmaError


class Section(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=False)


PosInt = pydantic.PositiveInt
NonNegInt = pydantic.NonNegativeInt
PosFloat = pydantic.PositiveFloat


class ModelConfig(Section):
    """A LLaMA-style decoder-only LM (RMSNorm, RoPE, SwiGLU, optional GQA)."""

    vocab_size: PosInt = 259
    d_model: PosInt = 64
    n_layers: PosInt = 2
    n_heads: PosInt = 4
    n_kv_heads: PosInt | None = None  # None: same as n_heads (no GQA)
    d_ff: PosInt = 172
    max_seq_len: PosInt = 256
    rope_theta: PosFloat = 10000.0
    norm_eps: PosFloat = 1e-5
    tie_embeddings: bool = True
    init_std: PosFloat = 0.02
    compute_dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @pydantic.model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim d_model/n_heads={self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        return self


class OptimConfig(Section):
    """AdamW with linear warm-up then cosine decay, and global-norm clipping."""

    lr: PosFloat = 3e-3
    warmup_steps: NonNegInt = 10
    min_lr_ratio: float = pydantic.Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = pydantic.Field(0.1, ge=0.0)
    b1: float = pydantic.Field(0.9, ge=0.0, lt=1.0)
    b2: float = pydantic.Field(0.95, ge=0.0, lt=1.0)
    eps: PosFloat = 1e-8
    grad_clip: PosFloat | None = 1.0
    # Numerical health (dma_jax.numerics): a NaN/Inf loss, or one above max_loss_spike x the running
    # mean of the earlier losses, stops the stage (last good checkpoint kept) or skips that step.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_loss_spike: float | None = pydantic.Field(None, gt=1.0)  # None: spikes are not checked


class MeshConfig(Section):
    """Device mesh for LM training: axes `data` and `model`; -1 takes all remaining devices.

    `rules` maps the LM's logical parameter axes to mesh axes (None: replicated).
    Changing the parallelism is a config change, not a code change.
    """

    data: int = -1
    model: PosInt = 1
    rules: tuple[tuple[str, str | None], ...] = (
        ("batch", "data"),
        ("vocab", "model"),
        ("embed", None),
        ("heads", "model"),
        ("kv_heads", "model"),
        ("head_dim", None),
        ("mlp", "model"),
    )

    @pydantic.field_validator("data")
    @classmethod
    def _check_data(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be a positive device count or -1 (all remaining devices)")
        return v


class TokenizerConfig(Section):
    kind: Literal["byte", "sentencepiece", "hf"] = "byte"
    path: str | None = None  # model file for sentencepiece / tokenizer.json for hf

    @pydantic.model_validator(mode="after")
    def _check_path(self) -> TokenizerConfig:
        if self.kind == "byte" and self.path is not None:
            raise ValueError("the byte tokenizer takes no path")
        if self.kind != "byte" and not self.path:
            raise ValueError(f"tokenizer kind '{self.kind}' needs a path")
        return self


class DomainInput(Section):
    """One domain of a user-defined domain space and where its documents come from."""

    name: str = pydantic.Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-/]+$")
    field: str = pydantic.Field(min_length=1, pattern=r"^[A-Za-z0-9_\-]+$")
    kind: Literal["text", "jsonl", "tfds", "array_record"]
    paths: tuple[str, ...] = ()  # globs for text / jsonl / array_record
    text_field: str = "text"  # jsonl / tfds / array_record-of-JSON
    tfds_name: str | None = None
    split: str = "train"
    data_dir: str | None = None

    @pydantic.model_validator(mode="after")
    def _check_input(self) -> DomainInput:
        if self.kind == "tfds" and not self.tfds_name:
            raise ValueError(f"domain '{self.name}': kind tfds needs tfds_name")
        if self.kind != "tfds" and not self.paths:
            raise ValueError(f"domain '{self.name}': kind {self.kind} needs paths")
        return self


class BenchmarkInput(Section):
    """Held-out multiple-choice items for one field: JSONL of {context, choices, gold}."""

    field: str
    path: str


class DataConfig(Section):
    """The domain space: `dma prepare` turns it into packed ArrayRecord shards + a manifest.

    With `demo: true` the embedded offline demo space is used (fields source, math, code);
    otherwise `domains` lists each domain's input. Records are `record_len` tokens
    (a model trains on `record_len - 1` positions).
    """

    dir: str | None = None  # default: <run.out_dir>/data (runs/<run.name>/data if run.out_dir is gs://); local only
    tokenizer: TokenizerConfig = TokenizerConfig()
    record_len: PosInt = 129
    heldout_fraction: float = pydantic.Field(0.05, gt=0.0, lt=0.5)
    records_per_shard: PosInt = 4096
    demo: bool = True
    demo_fields: tuple[str, ...] = ("source", "math", "code")
    demo_math_docs_per_domain: PosInt = 3500
    demo_max_docs_per_domain: PosInt | None = None  # cap documents per domain (tiny variants)
    demo_benchmark_items: PosInt = 200  # per field
    domains: tuple[DomainInput, ...] = ()
    benchmarks: tuple[BenchmarkInput, ...] = ()

    @pydantic.model_validator(mode="after")
    def _check_domains(self) -> DataConfig:
        if not self.demo:
            if not self.domains:
                raise ValueError("no domains: set data.demo=true or list data.domains")
            names = [d.name for d in self.domains]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"duplicate domain name(s): {', '.join(dup)}")
            if "source" not in {d.field for d in self.domains}:
                raise ValueError("no domain of field 'source' (the field the base model was trained on)")
            unknown = sorted({b.field for b in self.benchmarks} - {d.field for d in self.domains})
            if unknown:
                raise ValueError(f"benchmarks name unknown field(s): {', '.join(unknown)}")
        elif "source" not in self.demo_fields:
            raise ValueError("demo_fields must include 'source'")
        return self


class PretrainConfig(Section):
    """Pre-training of a base LM on the source field."""

    steps: PosInt = 200
    batch_size: PosInt = 16
    fields: tuple[str, ...] = ("source",)  # fields whose training records it reads
    eval_every: PosInt = 50
    eval_batches: PosInt = 4
    checkpoint_every: PosInt = 50
    keep_checkpoints: PosInt = 3
    log_every: PosInt = 10
    target_steps: PosInt | None = None  # steps for the target model (default: `steps`)


class EvalConfig(Section):
    """The evaluation environment run after every re-weighting step (sweep and CPT)."""

    balanced: Literal["mean", "min", "harmonic"] = "mean"  # aggregation of field scores into B
    heldout_windows_per_domain: PosInt = 16
    benchmark_items_per_field: PosInt = 200
    max_len: PosInt = 128  # model input length: held-out windows and benchmark rows hold max_len + 1 tokens
    batch_size: PosInt = 32  # rows per forward pass
    acc_weight: float = pydantic.Field(0.5, ge=0.0, le=1.0)  # share of accuracy in the field score
    ll_scale: PosFloat = 1.0  # nats per token of answer log-likelihood change that saturate the tanh


class SamplerConfig(Section):
    """Inductive biases of the trajectory sampler (see `dma_jax.trajectories.SamplerParams`)."""

    init_concentration: PosFloat = 200.0
    init_target_share: float = pydantic.Field(0.02, ge=0.0, lt=1.0)
    step_concentration: PosFloat = 300.0
    # per re-weighting step: a trajectory drifting at r ends near 1-(1-r)^(T-1) of the target field, so with
    # T=5 steps (demo, study) the default reaches 1-37% (RESULTS.md 2b tried (0, 0.3): no better agent)
    drift_rate_range: tuple[float, float] = (0.0, 0.1)
    wide_share: float = pydantic.Field(0.25, ge=0.0, le=1.0)
    wide_concentration: PosFloat = 30.0
    min_weight: float = pydantic.Field(1e-4, ge=0.0, lt=1.0)


class SweepConfig(Section):
    """The proxy environment: N proxies, T re-weighting steps of S optimizer steps each."""

    target_field: str = "math"
    num_trajectories: PosInt = 64
    num_stages: PosInt = 8  # T: re-weighting steps per trajectory
    steps_per_stage: PosInt = 20  # S: optimizer steps per re-weighting step
    batch_size: PosInt = 8
    seq_len: PosInt = 128
    chunk_size: PosInt | None = None  # trajectories trained at once (None: all)
    devices: int = -1  # devices on the `traj` mesh axis (-1: as many as divide the chunk)
    pool_tokens_per_domain: PosInt = 2_000_000  # cap of each domain's on-device token pool
    sampler: SamplerConfig = SamplerConfig()


class CptConfig(Section):
    """Target continual pre-training under each mixing policy (agent and baselines)."""

    target_field: str = "math"
    policies: tuple[str, ...] = ("source-only", "target-only", "fixed-0.3", "fixed-0.7", "curriculum", "regmix",
                                 "replay-best", "agent-sft", "agent-cql")
    seeds: tuple[NonNegInt, ...] = (0,)
    num_stages: PosInt = 6  # re-weighting steps
    steps_per_stage: PosInt = 20
    batch_size: PosInt = 16
    spread: Literal["size", "uniform"] = "size"  # how fixed shares spread over a field's domains
    curriculum_end: float = pydantic.Field(1.0, ge=0.0, le=1.0)
    num_threads: NonNegInt = 0  # Grain reader threads per batch


class RunConfig(Section):
    name: str = "run"
    out_dir: str = "runs/demo"
    seed: NonNegInt = 0


from dma_jax.agent.config import AgentConfig  # noqa: E402  (needs Section, defined above)


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

    @pydantic.model_validator(mode="after")
    def _check_cross(self) -> Config:
        for which in ("proxy", "target"):
            m = getattr(self, which)
            for name, length in (("data.record_len-1", self.data.record_len - 1), ("eval.max_len", self.eval.max_len)):
                if length > m.max_seq_len:
                    raise ValueError(f"{name}={length} exceeds {which}.max_seq_len={m.max_seq_len}")
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


def _deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set_dotted(tree: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    node = tree
    model: type[pydantic.BaseModel] | None = Config
    for i, k in enumerate(keys):
        fields = model.model_fields if model is not None else {}
        if model is not None and k not in fields:
            raise DmaError(f"{where}: unknown key '{'.'.join(keys[: i + 1])}'")
        ann = fields[k].annotation if model is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel) else None
        if i == len(keys) - 1:
            node[k] = value
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


def _reject_non_finite(tree: Any, where: str, path: str = "") -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _reject_non_finite(v, where, f"{path}.{k}" if path else str(k))
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise DmaError(f"{where}: {path}: value must be finite (got {tree})")


def config_from_dict(raw: dict, where: str = "<config>") -> Config:
    _reject_non_finite(raw, where)
    try:
        return Config.model_validate(raw)
    except pydantic.ValidationError as e:
        raise DmaError(_format_validation_error(e, where)) from None


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
            raise DmaError(f"{where}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text())
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
        raw = _deep_merge(raw, variants[variant])
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value, f"{where}: override '{text}'")
    return config_from_dict(raw, where)


def config_variants(path: str | Path) -> list[str]:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return sorted((raw.get("variants") or {}).keys())


def dump_config(cfg: Config) -> dict:
    """A JSON/YAML-safe dict of the full config (all defaults filled in)."""
    return cfg.model_dump(mode="json")
