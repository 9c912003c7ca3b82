"""The config sections of every component but the agent: typed, validated, frozen (pydantic)."""

from __future__ import annotations

from typing import Annotated, Literal

import pydantic

from dma_jax.config.base import NonEmpty, NonNegInt, PosFloat, PosInt, Section

BALANCED_HOW = ("mean", "min", "harmonic")  # how field scores aggregate into the balanced score B


# Fields of ModelConfig that change how the model computes, not which model it is (its parameters)
EXECUTION_FIELDS = frozenset({"compute_dtype", "attention", "remat"})


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
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # parameters (master weights) stay float32
    # How, not what (dma_jax.models.attention / lm.REMAT): left out of the dumped config while at their defaults,
    # so run folders, config hashes and checkpoints of the default stay as they were.
    attention: Literal["xla", "cudnn", "splash", "auto"] = "xla"
    remat: Literal["none", "dots", "full"] = "none"

    @pydantic.model_serializer(mode="wrap")
    def _drop_default_execution(self, handler):
        out = handler(self)
        for name in ("attention", "remat"):
            if getattr(self, name) == type(self).model_fields[name].default:
                out.pop(name, None)
        return out

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
    """AdamW with global-norm clipping; the learning rate warms up linearly over `warmup_steps`, then:

    - `cosine`: cosine decay to `min_lr_ratio * lr` at the last step;
    - `constant`: stays at `lr`;
    - `wsd` (warm-up, stable, decay): stays at `lr`, then decays linearly to `min_lr_ratio * lr` over the
      last `decay_fraction` of the steps, so every re-weighting step before the decay carries the same
      learning-rate mass.
    """

    lr: PosFloat = 3e-3
    warmup_steps: NonNegInt = 10
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    decay_fraction: float = pydantic.Field(0.2, gt=0.0, le=1.0)  # wsd only: share of the steps in the decay
    min_lr_ratio: float = pydantic.Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = pydantic.Field(0.1, ge=0.0)
    b1: float = pydantic.Field(0.9, ge=0.0, lt=1.0)
    b2: float = pydantic.Field(0.95, ge=0.0, lt=1.0)
    eps: PosFloat = 1e-8
    grad_clip: PosFloat | None = 1.0
    # Numerical health (dma_jax.numerics): a NaN/Inf loss, or one above max_loss_spike x the running mean
    # m of the earlier losses (m + (ratio-1)|m| if m < 0), stops the stage (last good ckpt kept) or skips that step.
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
    warmup_steps: NonNegInt | None = None  # pre-training's warm-up from scratch (default: `optim.warmup_steps`)
    # Leave `eval.unscored_domains` (low-quality data) out of pre-training: the base model is trained on curated
    # data, the continual pre-training pool is raw and a mixing policy decides how much of it to use.
    exclude_unscored: bool = True

    def steps_for(self, which: str) -> int:
        """Optimizer steps of the base `which` model ("proxy" or "target"): the one place this rule lives."""
        return self.target_steps if which == "target" and self.target_steps else self.steps


class EvalConfig(Section):
    """The evaluation environment run after every re-weighting step (sweep and CPT).

    Field score (`evaluation.normalise`; base model = 1.0): 1 + bpb_weight * (base_bpb - bpb) / base_bpb
    + loss_weight * (base_loss - loss) / base_loss + acc_weight * (centred acc - base centred acc), with bpb
    the gold continuations' bits per byte on the field's benchmark items, loss the held-out loss on the
    field's domains, and `acc_metric` the accuracy (centred: (acc - chance) / (1 - chance)). The three weights
    sum to 1; each term is a relative change scaled by the field's own base value.
    """

    balanced: Literal[BALANCED_HOW] = "mean"  # aggregation of field scores into B
    heldout_windows_per_domain: PosInt = 16
    benchmark_items_per_field: PosInt = 200
    max_len: PosInt = 128  # model input length: held-out windows and benchmark rows hold max_len + 1 tokens
    batch_size: PosInt = 32  # rows per forward pass
    bpb_weight: float = pydantic.Field(0.5, ge=0.0, le=1.0)  # share of the benchmark bits-per-byte term
    loss_weight: float = pydantic.Field(0.5, ge=0.0, le=1.0)  # share of the field's held-out loss term
    acc_weight: float = pydantic.Field(0.0, ge=0.0, le=1.0)  # share of the (centred) accuracy term
    acc_metric: Literal["acc", "acc_norm"] = "acc_norm"  # which accuracy the acc term uses
    # domains evaluated (their held-out loss is in the feedback) but left out of their field's loss term, and
    # left out by `dma headroom`'s "clean" policies; the demo lists its low-quality domains here
    unscored_domains: tuple[str, ...] = ()

    @pydantic.model_validator(mode="after")
    def _weights_sum_to_one(self) -> EvalConfig:
        total = self.bpb_weight + self.loss_weight + self.acc_weight
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"bpb_weight + loss_weight + acc_weight = {self.bpb_weight} + {self.loss_weight} + "
                             f"{self.acc_weight} = {total:g}; they must sum to 1")
        return self


class SamplerConfig(Section):
    """Inductive biases of the trajectory sampler (`dma_jax.trajectories.sample_trajectories`).

    init_target_share_range: (lo, hi); each trajectory draws its start target-field share ~ U(lo, hi)
        (split over the target domains by size; the rest over the source domains by size).
    init_concentration: Dirichlet concentration of the t=0 mixture around that start mean.
    step_concentration: concentration c of a step: next ~ Dirichlet(c * mean).
    drift_rate_range: (lo, hi), signed; each trajectory draws r ~ U(lo, hi). r > 0: a step's mean is
        (1 - r) * current + r * target distribution; r < 0: the same with |r| toward the source distribution
        (so trajectories rise, or fall from a high start).
    turn_share: fraction of trajectories whose drift flips sign at a random step (rise then fall, fall then rise).
    emphasis_share: fraction of trajectories that down-weight some domains inside their field: each domain of
        such a trajectory is picked with probability 1/2 (at least one, never a field's last domain) and its
        weight is multiplied by `emphasis_factor` in the start mean and in the distributions the drift pulls
        toward (once: it does not compound; the field's share is kept).
    wide_share: fraction of trajectories that explore with `wide_concentration` instead.
    wide_concentration: step concentration of the wide-exploration trajectories.
    min_weight: floor on every domain weight, applied before renormalising.
    """

    init_target_share_range: tuple[float, float] = (0.0, 0.6)
    init_concentration: PosFloat = pydantic.Field(200.0, allow_inf_nan=False)
    step_concentration: PosFloat = pydantic.Field(300.0, allow_inf_nan=False)
    drift_rate_range: tuple[float, float] = (-0.15, 0.25)
    turn_share: float = pydantic.Field(0.25, ge=0.0, le=1.0)
    emphasis_share: float = pydantic.Field(0.3, ge=0.0, le=1.0)
    emphasis_factor: float = pydantic.Field(0.1, ge=0.0, le=1.0)
    wide_share: float = pydantic.Field(0.25, ge=0.0, le=1.0)
    wide_concentration: PosFloat = pydantic.Field(30.0, allow_inf_nan=False)
    min_weight: float = pydantic.Field(1e-4, ge=0.0, lt=1.0)

    @pydantic.field_validator("init_target_share_range")
    @classmethod
    def _check_start(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] <= v[1] < 1.0:
            raise ValueError(f"{list(v)} must be [lo, hi] with 0 <= lo <= hi < 1")
        return v

    @pydantic.field_validator("drift_rate_range")
    @classmethod
    def _check_rates(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not -1.0 <= v[0] <= v[1] <= 1.0:
            raise ValueError(f"{list(v)} must be [lo, hi] with -1 <= lo <= hi <= 1")
        return v


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
    policies: Annotated[tuple[str, ...], NonEmpty] = ("source-only", "target-only", "fixed-0.3", "fixed-0.7",
                                                      "curriculum", "regmix", "replay-best", "agent-sft", "agent-cql")
    seeds: Annotated[tuple[NonNegInt, ...], NonEmpty] = (0,)
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
