"""`dma pretrain`: train a base LM on a token stream, with checkpoints, metrics and resume.

Outputs under `<run.out_dir>/pretrain-<proxy|target>/`: `config.yaml`, `metrics.jsonl` (its TensorBoard
events in `tb/`: `tb_log`), and Orbax checkpoints in `checkpoints/<step>/`. Re-running the same command resumes
from the last checkpoint and ends where an uninterrupted run would. SIGTERM
(a preemption notice) saves a checkpoint at the next step and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np
import yaml

from dma_jax import sharding as shd
from dma_jax.checkpoint import Checkpointer
from dma_jax.config import Config, dump_config
from dma_jax.data.domains import DomainSpace
from dma_jax.data.record_stream import RecordStream
from dma_jax.errors import DmaError
from dma_jax.faults import stop_on_sigterm
from dma_jax.io_utils import AnyPath, atomic_write_text, read_jsonl
from dma_jax.models.lm import param_count_formula
from dma_jax.numerics import LossGuard, last_good
from dma_jax.runs import RunDir
from dma_jax.stage_loop import StageLoop
from dma_jax.tb_log import stage_log
from dma_jax.train import Trainer, check_model_meta, format_bytes, lr_schedule

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PretrainResult:
    out_dir: AnyPath
    steps: int
    n_params: int
    final_eval_loss: float | None  # None on processes other than 0 (they write no metrics)
    memory_per_device: dict


@stop_on_sigterm
def run_pretrain(cfg: Config, which: str = "proxy", devices=None, progress: bool = True) -> PretrainResult:
    """Train (or resume) the base `which` model ("proxy" or "target"). SIGTERM: checkpoint, raise `Preempted`."""
    if which not in ("proxy", "target"):
        raise DmaError(f"pretrain: unknown model '{which}' (proxy or target)")
    pc = cfg.pretrain
    model_cfg = getattr(cfg, which)
    steps = pc.steps_for(which)
    pc = pc.model_copy(update={"steps": steps})
    out = RunDir(cfg).pretrain(which)
    out.mkdir(parents=True, exist_ok=True)
    primary = shd.is_primary()  # multi-host: every process trains, process 0 writes the files
    if primary:
        atomic_write_text(out / "config.yaml", yaml.safe_dump(dump_config(cfg), sort_keys=False))
    space = DomainSpace.for_config(cfg)
    if space.tokenizer().vocab_size > model_cfg.vocab_size:
        raise DmaError(f"{which}.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                       f"{space.tokenizer().vocab_size}")
    if pc.exclude_unscored:
        space = space.without(cfg.eval.unscored_domains)
    stream = RecordStream(space, pc.fields, "train")
    eval_np = RecordStream(space, pc.fields, "heldout").eval_batches(pc.eval_batches, pc.batch_size)
    seq_len = space.record_len - 1

    optim = cfg.optim if pc.warmup_steps is None else cfg.optim.model_copy(update={"warmup_steps": pc.warmup_steps})
    trainer = Trainer(model_cfg, optim, cfg.mesh, pc.steps, pc.batch_size, seq_len, devices)
    n_params = param_count_formula(model_cfg)
    mem = trainer.memory
    log.info(
        "LM %.2fM params on mesh %s; compiled train step needs %s per device (temp %s)",
        n_params / 1e6, dict(trainer.mesh.shape), format_bytes(mem.get("total", 0)), format_bytes(mem.get("temp", 0)),
    )
    ckpt = Checkpointer(RunDir(cfg).pretrain_checkpoints(which), keep=pc.keep_checkpoints)
    metrics_log = stage_log(out / "metrics.jsonl", primary)  # and its TensorBoard events in tb/
    start = ckpt.latest_step()
    resumed = {}
    if start is not None:
        resumed = ckpt.read_meta(start)
        check_model_meta(resumed, dump_config(cfg)[which], which, ckpt.directory)
        state, _, _ = ckpt.restore(trainer.abstract_state, start)
        log.info("resumed from step %d", start)
    else:
        start = 0
        state = trainer.init(cfg.run.seed)
    metrics_log.truncate_after(start)
    meta = {"model": dump_config(cfg)[which], "n_params": n_params, "which": which}

    def evaluate(params) -> float:
        losses = [trainer.eval_loss(params, trainer.put_batch(b)) for b in eval_np]
        return float(np.mean(jax.device_get(losses)))

    tokens_per_step = pc.batch_size * seq_len
    # step s's learning rate is lr_S[s - 1] (the optimizer's count before it); computed once, not between steps
    lr_S = np.asarray(lr_schedule(optim, pc.steps)(np.arange(pc.steps)))
    guard = LossGuard(f"pretrain {which}", cfg.optim.on_nonfinite, cfg.optim.max_loss_spike)
    guard.restore(resumed.get("loss_guard"))
    loop = StageLoop(f"pretrain {which}", ckpt, pc.steps, "step", progress,
                     due=lambda done: done % pc.checkpoint_every == 0, event_before_save="pretrain.step",
                     log=metrics_log)
    pending = None  # (step, device metrics, max_loss used) read only after the next step is dispatched
    t_last, steps_since = time.perf_counter(), 0
    last_loss = float("nan")

    def flush() -> None:
        nonlocal pending, t_last, steps_since, last_loss
        if pending is None:
            return
        (step_done, m, max_loss), pending = pending, None
        m = jax.device_get(m)
        if not guard.check(step_done, float(m["loss"]), last_good(ckpt), max_loss):
            return  # skipped on device (optim.on_nonfinite=skip): the state is the previous step's
        last_loss = float(m["loss"])
        steps_since += 1
        if step_done % pc.log_every == 0 or step_done == pc.steps:
            now = time.perf_counter()
            tps = steps_since * tokens_per_step / max(now - t_last, 1e-9)
            t_last, steps_since = now, 0
            rec = {"step": step_done, "loss": last_loss, "grad_norm": float(m["grad_norm"]), "tokens_per_s": tps,
                   "lr": float(lr_S[step_done - 1])}
            metrics_log.append(rec)
            loop.bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:,.0f}")

    def unit(step: int) -> None:
        nonlocal state, pending
        batch = trainer.put_batch(stream.batch(step, pc.batch_size, cfg.run.seed))
        max_loss = guard.max_loss()
        state, metrics = trainer.step(state, batch, max_loss)
        flush()  # the previous step's metrics, read after this step is dispatched
        pending = (step + 1, metrics, max_loss)
        done = step + 1
        if done % pc.eval_every == 0 or done == pc.steps:
            flush()
            eval_loss = evaluate(state.params)
            metrics_log.append({"step": done, "eval_loss": eval_loss})
            if progress:
                loop.bar.write(f"step {done}: train loss {last_loss:.4f}, held-out loss {eval_loss:.4f}")

    def save(done: int) -> None:
        flush()
        metrics_log.flush()
        ckpt.save(done, state, meta=meta | {"loss_guard": guard.state()})

    loop.run(start, unit, save)
    flush()
    metrics_log.flush()
    final_eval = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r] if primary else []
    return PretrainResult(out, int(jax.device_get(state.step)), n_params,
                          final_eval[-1]["eval_loss"] if final_eval else None, mem)
