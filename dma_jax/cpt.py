"""`dma cpt`: continual pre-training of the target model under a mixing policy.

Every `steps_per_stage` optimizer steps the target is evaluated (the sweep's
evaluation environment), the feedback is appended to the history, the policy
emits the next mixture and the Grain mixer (`data.mixer.DomainMixer`) switches
to it at the very next batch. Resumable: after each re-weighting step the model,
optimizer, mixer state (step, cursors, weight history) and history are
checkpointed together (Orbax, atomic); re-running continues from there and ends
where an uninterrupted run would, with no training record repeated or skipped.

Output per run: `<run.out_dir>/cpt/<policy>/seed<k>/history.json` (format
`dma-cpt-history-v2`, read by `dma report`), `records.jsonl` (the (domain,
record id) of every training example, by step), `checkpoints/`, and TensorBoard events in `tb/` (`tb_log`;
`eval_metrics` says which tags, at which steps).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dma_jax import evaluation as ev
from dma_jax import history as hist_format
from dma_jax import sharding as shd
from dma_jax.checkpoint import Checkpointer
from dma_jax.config import Config, dump_config
from dma_jax.data.domains import DomainSpace
from dma_jax.data.mixer import DomainMixer
from dma_jax.errors import DmaError
from dma_jax.history import RunHistory
from dma_jax.faults import maybe_fault, stop_on_sigterm
from dma_jax.io_utils import JsonlLog, NullLog
from dma_jax.numerics import LossGuard, last_good
from dma_jax.policies import PolicyInput, SafePolicy, SpaceInfo, make_policy
from dma_jax.runs import RunDir
from dma_jax.stage_loop import StageLoop
from dma_jax.tb_log import events
from dma_jax.train import Trainer, TrainState, load_base_params, lr_schedule, shared_trainer

log = logging.getLogger(__name__)

def _decode(record) -> dict:
    return {"tokens": record["tokens"], "segment_ids": record["segment_ids"]}


class _CurrentWeights:
    """The mixer's policy: the mixture the CPT loop set for the current re-weighting step."""

    def __init__(self):
        self.weights = None

    def __call__(self, step: int):
        return self.weights


@stop_on_sigterm
def run_cpt(cfg: Config, policy_name: str, seed: int, devices=None, progress: bool = True,
            space: DomainSpace | None = None) -> RunHistory:
    cc = cfg.cpt
    space = space or DomainSpace.for_config(cfg).subset(["source", cc.target_field])
    info = SpaceInfo.of(space, cc.target_field)
    run = RunDir(cfg)
    policy = make_policy(policy_name, info, sweep_dir=run.offline, agent_dirs=run.agent_exports(), spread=cc.spread, curriculum_end=cc.curriculum_end,
                         seed=seed, exclude=cfg.eval.unscored_domains, num_stages=cc.num_stages,
                         steps_per_stage=cc.steps_per_stage)
    safe = SafePolicy(policy, space.num_domains, info.spread("source", cc.spread))
    out = run.cpt_run(policy_name, seed)
    out.mkdir(parents=True, exist_ok=True)
    if hist_format.is_finished(out, dump_config(cfg)["cpt"]):
        return hist_format.load(out / hist_format.FILE)  # finished with this config: nothing to redo
    T, S = cc.num_stages, cc.steps_per_stage

    shape = (cfg.target, cfg.optim, cfg.mesh, T * S, cc.batch_size, space.record_len - 1)
    trainer = shared_trainer(*shape) if devices is None else Trainer(*shape, devices)
    ec = cfg.eval
    eval_set = shd.put_global(ev.EvalSet.for_space(space, ec), shd.replicated(trainer.mesh))
    evaluate = ev.shared_evaluate(trainer, ec.batch_size)

    current = _CurrentWeights()
    mixer = DomainMixer([space.records(d) for d in range(space.num_domains)], space.names, cc.batch_size,
                        current, seed, num_threads=cc.num_threads, decode=_decode)
    ckpt = Checkpointer(run.cpt_checkpoints(policy_name, seed), keep=2)
    records_log = JsonlLog(out / "records.jsonl") if shd.is_primary() else NullLog()  # process 0 writes files
    metrics_log = events(out, shd.is_primary())  # TensorBoard: see `eval_metrics`

    def raw_of(params):  # the full raw metrics, per-item / per-window arrays included (for the SEs)
        return shd.to_host(evaluate(params, eval_set))

    start = ckpt.latest_step()
    if start is not None:
        meta = ckpt.read_meta(start)
        if meta.get("domain_names") != space.names:
            raise DmaError(f"{ckpt.directory}: checkpoint is for another domain space")
        state, meta, data_state = ckpt.restore(trainer.abstract_state, start)
        mixer.set_state(data_state)
        hist = meta["history"]
        # float32 as computed (JSON gives float64): same bits into normalise and the policy as without the restart
        history = PolicyInput([np.array(w) for w in hist["weights"]],
                          [np.array(f, np.float32) for f in hist["feedback"]], T)
        base_raw = {k: np.array(v, np.float32) for k, v in meta["base_raw"].items()}
        raws = [{k: np.array(v, np.float32) for k, v in r.items()} for r in meta["raws"]]
        safe.rejected = int(meta.get("rejected", 0))
        guard_state = meta.get("loss_guard")
        timings = meta["timings"]
        log.info("resuming %s seed %d at re-weighting step %d", policy_name, seed, start)
    else:
        params = shd.put_global(load_base_params(cfg, "target", run.pretrain_checkpoints("target")), trainer.state_sharding.params)
        state = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, trainer.tx.init(p)),
                        out_shardings=trainer.state_sharding)(params)
        base_full = raw_of(state.params)
        base_raw = ev.summary(base_full)  # the reference every later evaluation is normalised against
        history = PolicyInput([], [np.asarray(ev.feedback_vector(ev.normalise(base_full, base_raw, ec)))], T)
        raws = [base_raw]
        timings = {"policy_s": [], "stage_s": []}
        start = 0
        guard_state = None
    records_log.truncate_after(start * S)
    metrics_log.truncate_after(start * S if start else -1)  # a fresh start logs step 0 (the base model) anew
    if start == 0:
        metrics_log.append(eval_metrics(0, history.feedback[0], base_raw, space, ec.balanced))
    lr_TS = np.asarray(lr_schedule(cfg.optim, T * S)(np.arange(T * S)))  # step i's rate: lr_TS[i - 1]
    tokens_per_stage = S * cc.batch_size * (space.record_len - 1)
    guard = LossGuard(f"cpt {policy_name} seed {seed}", cfg.optim.on_nonfinite, cfg.optim.max_loss_spike)
    guard.restore(guard_state)

    loop = StageLoop(f"cpt {policy_name} seed {seed}", ckpt, T, "stage", progress, event_after_save="cpt.stage_done",
                     describe_stop=lambda done: f"after re-weighting step {done}/{T}", log=metrics_log)

    def unit(t: int) -> None:
        nonlocal state
        t0 = time.perf_counter()
        w = safe(history)
        t1 = time.perf_counter()
        history.weights.append(np.asarray(w, np.float64))
        current.weights = history.weights[-1]
        metrics_log.append({"step": t * S + 1, "mixture": dict(zip(space.names, history.weights[-1].tolist()))})
        max_loss, losses_S = guard.max_loss(), []
        for s in range(S):
            batch = next(mixer)
            records_log.append({"step": t * S + s + 1, "domain": batch["domain"].tolist(),
                                "record_id": batch["record_id"].tolist()})
            state, metrics = trainer.step(state, trainer.put_batch(batch), max_loss)
            losses_S.append(metrics["loss"])
            maybe_fault("cpt.step")
        raw = raw_of(state.params)
        # NaN/spike: stop before the checkpoint (or the steps were skipped on device); read after the eval's sync
        losses_S = np.asarray(jax.device_get(losses_S))
        guard.check_many(t * S + np.arange(1, S + 1), losses_S, last_good(ckpt), max_loss)
        t2 = time.perf_counter()
        raws.append(ev.summary(raw))  # per field / domain: what the history keeps
        history.feedback.append(np.asarray(ev.feedback_vector(ev.normalise(raw, base_raw, ec))))
        timings["policy_s"].append(t1 - t0)
        timings["stage_s"].append(t2 - t1)
        for s, step in enumerate(range(t * S + 1, (t + 1) * S + 1)):
            metrics_log.append({"step": step, "train": {"loss": float(losses_S[s]), "lr": float(lr_TS[step - 1])}})
        metrics_log.append(eval_metrics((t + 1) * S, history.feedback[-1], raws[-1], space, ec.balanced)
                           | {"time": {"policy_s": t1 - t0, "stage_s": t2 - t1},
                              "tokens_per_s": tokens_per_stage / max(t2 - t1, 1e-9)})
        loop.bar.set_postfix(loss=f"{float(losses_S[-1]):.3f}")

    def save(done: int) -> None:
        meta = {"domain_names": space.names, "history": {"weights": [w.tolist() for w in history.weights],
                                                         "feedback": [f.tolist() for f in history.feedback]},
                "base_raw": {k: v.tolist() for k, v in base_raw.items()},
                "raws": [{k: v.tolist() for k, v in r.items()} for r in raws], "timings": timings,
                "policy": policy_name, "seed": seed, "rejected": safe.rejected, "loss_guard": guard.state()}
        records_log.flush()
        metrics_log.flush()
        ckpt.save(done, state, meta=meta, data=mixer.get_state())

    loop.run(start, unit, save)
    # the policy's own name: `schedule:FILE` is recorded as its folder's name (`runs.policy_folder`)
    return _write_history(cfg, space, policy.name, seed, history, raws, timings, safe.rejected, out)


def eval_metrics(step: int, feedback_M, summary: dict, space: DomainSpace, balanced_how: str) -> dict:
    """The TensorBoard record of one evaluation (row t of the history, at optimizer step t * S):
    `eval/<feedback name>` (`evaluation.feedback_names`: score/<field>, score_se/<field>, loss/<domain>, ...),
    `eval/balanced` and `eval/balanced_se`, and the raw metrics `raw/<summary key>/<field or domain>`.

    The other CPT tags: `mixture/<domain>` (the weights of re-weighting step t, at its first step t * S + 1),
    `train/loss` and `train/lr` (every optimizer step), `time/policy_s`, `time/stage_s` and `tokens_per_s` (of the
    S steps with their evaluation, at (t + 1) * S)."""
    names = ev.feedback_names(space.names, space.fields)
    fb_M = np.asarray(feedback_M, np.float32)
    scores_F = fb_M[ev.field_score_index(space.names, space.fields)]
    se_F = fb_M[ev.field_score_se_index(space.names, space.fields)]
    scored = dict(zip(names, fb_M.tolist()), balanced=float(ev.balanced_score(scores_F, balanced_how)),
                  balanced_se=float(ev.balanced_se(scores_F, se_F, balanced_how)))
    raw = {key: dict(zip(space.names if key == "domain_loss" else space.fields, np.asarray(v).tolist()))
           for key, v in summary.items()}
    return {"step": step, "eval": scored, "raw": raw}


def _write_history(cfg, space, policy_name, seed, history, raws, timings, rejected, out: Path) -> RunHistory:
    idx = ev.field_score_index(space.names, space.fields)
    se_idx = ev.field_score_se_index(space.names, space.fields)
    doc = hist_format.make(
        policy=policy_name, seed=seed, domain_names=space.names, domain_fields=space.fields_of_domain,
        fields=space.fields, target_field=cfg.cpt.target_field, steps_per_stage=cfg.cpt.steps_per_stage,
        weights_TxD=history.weights, feedback_names=ev.feedback_names(space.names, space.fields),
        field_scores_T1xF=np.stack(history.feedback)[:, idx], balanced_how=cfg.eval.balanced,
        accuracy_T1xF=[r["accuracy"] for r in raws], domain_loss_T1xD=[r["domain_loss"] for r in raws],
        timings=timings, rejected=rejected, cpt_config=dump_config(cfg)["cpt"],
        field_score_se_T1xF=np.stack(history.feedback)[:, se_idx], acc_norm_T1xF=[r["acc_norm"] for r in raws],
        answer_bpb_T1xF=[r["answer_bpb"] for r in raws], field_loss_T1xF=[r["field_loss"] for r in raws],
        chance_F=raws[0]["chance"], eval_items=ev.in_loop_items(space, cfg.eval))
    if shd.is_primary():
        hist_format.write(out, doc)
    return hist_format.from_doc(doc, str(out / hist_format.FILE), out / hist_format.FILE)
