"""TensorBoard event files (dma_jax.tb_log), read back with TensorBoard's own reader (`EventAccumulator`) and
compared with what the stage wrote for other readers, read here with json: pretrain's and the agent's
metrics.jsonl (every scalar, step by step), CPT's history.json (mixtures, scores and their standard errors, raw
metrics; the learning rate against a numpy reference of the schedule). Resumes after crashes leave one point per
step (the purge of `truncate_after`); processes other than 0 write no event file."""

import json
import math
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from dma_jax import cpt as cpt_mod
from dma_jax import offline_data as od
from dma_jax import sharding
from dma_jax import train as train_mod
from dma_jax.agent import AgentConfig, run_train_agent
from dma_jax.config import load_config
from dma_jax.io_utils import NullLog
from dma_jax.pretrain import run_pretrain
from dma_jax.tb_log import TbLog, events, scalars, stage_log
from tests import fake_gcs
from tests.crash import crash_on_call
from tests.paths import DEMO
from tests.toy_env import ToyEnv

RTOL = 1e-6  # TensorBoard keeps float32


def _points(folder) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard shows them (purges applied); tags left without points omitted."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return {tag: pts for tag, pts in out.items() if pts}


def _raw_steps(path: Path) -> list[int]:
    """The steps of every scalar written in one event file, purged or not."""
    return [ev.step for ev in EventFileLoader(str(path)).Load() if ev.HasField("summary")]


def _jsonl_points(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value)]} of every number of a flat JSONL log (booleans and strings left out)."""
    out: dict[str, list] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for key, value in rec.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(key, []).append((rec["step"], value))
    return out


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in want[tag]], rtol=RTOL, atol=1e-7,
                                   err_msg=tag)


def _wsd_lr(optim, total: int) -> np.ndarray:
    """The `wsd` schedule as OptimConfig documents it, rate of each optimizer step (index = steps before it):
    linear warm-up from 0 over min(warmup, total - 1) steps, flat at lr, then linear down to min_lr_ratio * lr,
    reached at the last step, over the last decay_fraction of the steps."""
    warm = min(optim.warmup_steps, total - 1)
    decay = min(max(round(optim.decay_fraction * total), 1), max(total - warm, 1))
    stable = total - warm - decay
    c = np.arange(total, dtype=np.float64)
    lr = np.where(c < warm, optim.lr * c / max(warm, 1), optim.lr)
    into_decay = c - warm - stable
    end = optim.lr * optim.min_lr_ratio
    return np.where(into_decay >= 0, optim.lr + (end - optim.lr) * np.minimum(into_decay / max(decay - 1, 1), 1.0), lr)


# ------------------------------------------------------------------------------------------ the log itself


def test_scalars_are_the_numbers_of_a_record_nested_dicts_as_tag_paths():
    rec = {"step": 7, "loss": 1.5, "n": 3, "f32": np.float32(0.25), "skipped": True, "stage": "sft", "ids": [1, 2],
           "none": None, "mixture": {"a": 0.75, "b": np.float64(0.125)}, "eval": {"score/math": 1.0, "raw": {"x": 2}}}
    assert scalars(rec) == {"loss": 1.5, "n": 3.0, "f32": 0.25, "mixture/a": 0.75, "mixture/b": 0.125,
                            "eval/score/math": 1.0, "eval/raw/x": 2.0}


def test_a_resumed_log_hides_every_point_past_its_checkpoint(tmp_path):
    first = TbLog(tmp_path)
    first.truncate_after(-1)
    for step in range(1, 7):
        first.append({"step": step, "a": float(step)})
    first.append({"step": 6, "only_in_the_first_run": 60.0})  # a tag the resumed run never writes again
    first.close()
    again = TbLog(tmp_path)  # the resume from a checkpoint at step 3, in the same second
    again.truncate_after(3)
    for step in (4, 5):
        again.append({"step": step, "a": 100.0 + step})
    again.close()
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2 and _raw_steps(files[0]) == [1, 2, 3, 4, 5, 6, 6]  # the first file keeps its points...
    assert _points(tmp_path) == {"a": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0)]}  # ...TB hides them
    fresh = TbLog(tmp_path)  # a fresh start (no checkpoint): nothing of before is kept
    fresh.truncate_after(-1)
    fresh.append({"step": 2, "a": -2.0})
    fresh.close()
    assert _points(tmp_path) == {"a": [(2, -2.0)]}


def test_flushed_points_survive_a_kill_right_after_the_flush(tmp_path):
    # A stage flushes its logs, then checkpoints; a kill after that must not lose the flushed points (the resume
    # writes only later steps). The child appends, flushes and dies at once (os._exit: no atexit, no close).
    import subprocess
    import sys

    code = ("import os, sys; from dma_jax.tb_log import TbLog\n"
            "log = TbLog(sys.argv[1]); log.truncate_after(-1)\n"
            "for step in range(1, 201): log.append({'step': step, 'a': float(step), 'b': -float(step)})\n"
            "log.flush()\n"
            "log.append({'step': 201, 'a': 201.0})\n"  # after the flush: may be lost, as a kill may lose it
            "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    got = _points(tmp_path)
    assert [s for s, _ in got["b"]] == list(range(1, 201))
    assert [s for s, _ in got["a"]][:200] == list(range(1, 201))
    log = TbLog(tmp_path)  # and a flushed log goes on writing, into its next file
    log.append({"step": 1, "c": 1.0})
    log.flush()
    log.append({"step": 2, "c": 2.0})
    log.close()
    assert _points(tmp_path)["c"] == [(1, 1.0), (2, 2.0)]


def test_a_log_that_writes_nothing_makes_no_file_and_other_processes_log_nothing(tmp_path):
    log = stage_log(tmp_path / "metrics.jsonl", primary=True)
    log.truncate_after(4)
    log.append({"step": 5, "stage": "sft"})  # no number: no event file
    log.close()
    assert not (tmp_path / "tb").exists()
    for other in (stage_log(tmp_path / "x" / "metrics.jsonl", primary=False), events(tmp_path / "y", primary=False)):
        assert isinstance(other, NullLog)
        other.truncate_after(0)
        other.append({"step": 1, "loss": 1.0})
        other.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_events_on_a_remote_folder_go_through_epath(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with fake_gcs.install(tmp_path / "gcs"):
        log = stage_log("gs://bkt/run/pretrain-proxy/metrics.jsonl", primary=True)
        log.truncate_after(0)
        for step in (1, 2, 3):
            log.append({"step": step, "loss": 1.0 / step})
        log.close()
        log = stage_log("gs://bkt/run/pretrain-proxy/metrics.jsonl", primary=True)
        log.truncate_after(2)
        log.append({"step": 3, "loss": 9.0})
        log.close()
    assert fake_gcs.stray_local_paths(tmp_path) == []
    stage = tmp_path / "gcs" / "bkt" / "run" / "pretrain-proxy"
    assert _points(stage / "tb") == {"loss": [(1, 1.0), (2, 0.5), (3, 9.0)]}
    assert _points(stage / "tb") == _jsonl_points(stage / "metrics.jsonl")


# ------------------------------------------------------------------------------------------ the stages


@pytest.fixture(scope="module")
def data_dir(prepared_world):
    return prepared_world.data_dir


def _pretrain_cfg(out, data_dir):
    return load_config(DEMO, [f"run.out_dir={out}", f"data.dir={data_dir}", "pretrain.steps=8",
                              "pretrain.checkpoint_every=4", "pretrain.eval_every=4", "pretrain.log_every=1",
                              "mesh.data=1"], variant="tiny")


def _crash_on_call(monkeypatch, n: int) -> None:
    """Trainer.step raises on its n-th call from now."""
    crash_on_call(monkeypatch, train_mod.Trainer, "step", n)


def test_pretrain_events_equal_its_metrics_log_after_a_crash_and_resume(data_dir, tmp_path, monkeypatch):
    cfg = _pretrain_cfg(tmp_path / "run", data_dir)
    _crash_on_call(monkeypatch, 7)  # step 7 never runs: steps 1-5 are logged, the checkpoint is at step 4
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pretrain(cfg, "proxy", devices=jax.devices()[:1], progress=False)
    monkeypatch.undo()
    run_pretrain(cfg, "proxy", devices=jax.devices()[:1], progress=False)
    out = tmp_path / "run" / "pretrain-proxy"
    files = sorted((out / "tb").iterdir())
    # the crashed run: a file closed at its checkpoint (step 4), one past it (5, purged); the resumed run: 5-8
    assert [sorted(set(_raw_steps(f))) for f in files] == [[1, 2, 3, 4], [5], [5, 6, 7, 8]]
    want = _jsonl_points(out / "metrics.jsonl")
    assert {"loss", "grad_norm", "tokens_per_s", "lr", "eval_loss"} == set(want)
    assert [s for s, _ in want["loss"]] == list(range(1, 9)) and [s for s, _ in want["eval_loss"]] == [4, 8]
    _assert_same(_points(out / "tb"), want)
    optim = cfg.optim.model_copy(update={"warmup_steps": cfg.pretrain.warmup_steps})
    np.testing.assert_allclose([v for _, v in want["lr"]], _wsd_lr(optim, 8), rtol=1e-6, atol=1e-12)

    # Another process of a multi-host run trains the same and writes neither the log nor events.
    monkeypatch.setattr(sharding, "is_primary", lambda: False)
    run_pretrain(_pretrain_cfg(tmp_path / "other", data_dir), "proxy", devices=jax.devices()[:1], progress=False)
    other = tmp_path / "other" / "pretrain-proxy"
    assert not (other / "tb").exists() and not (other / "metrics.jsonl").exists()


def test_cpt_events_match_its_history_after_two_crashes(prepared_world, tmp_path, monkeypatch):
    out = prepared_world.link_base(tmp_path / "run", which=("target",))
    cfg = load_config(DEMO, prepared_world.run_overrides(out, "cpt.num_stages=2", "mesh.data=1"), variant="tiny")
    S, T = cfg.cpt.steps_per_stage, 2
    for crash_on in (2, S + 1):  # before the first checkpoint (a fresh start again), then in re-weighting step 2
        _crash_on_call(monkeypatch, crash_on)
        with pytest.raises(RuntimeError, match="simulated crash"):
            cpt_mod.run_cpt(cfg, "fixed-0.3", 0, devices=jax.devices()[:1], progress=False)
        monkeypatch.undo()
    cpt_mod.run_cpt(cfg, "fixed-0.3", 0, devices=jax.devices()[:1], progress=False)
    run = out / "cpt" / "fixed-0.3" / "seed0"
    # crash 1 (no checkpoint yet); the fresh start's file closed at its checkpoint (step 2) and crash 2's past it;
    # the resumed run's
    assert [sorted(set(_raw_steps(f))) for f in sorted((run / "tb").iterdir())] == [[0, 1], [0, 1, 2], [3], [3, 4]]
    h = json.loads((run / "history.json").read_text())
    doms, fields = h["domain_names"], h["fields"]
    at_eval = [t * S for t in range(T + 1)]
    want: dict[str, list] = {}

    def series(tag, steps, values):
        want[tag] = list(zip(steps, np.asarray(values, np.float64).tolist()))

    for i, d in enumerate(doms):
        series(f"mixture/{d}", [t * S + 1 for t in range(T)], [w[i] for w in h["weights"]])
        loss = np.array(h["domain_loss"])[:, i]
        series(f"raw/domain_loss/{d}", at_eval, loss)
        series(f"eval/loss/{d}", at_eval, loss / loss[0])  # evaluation.normalise: relative to the base model
    for j, f in enumerate(fields):
        col = {key: np.array(h[key])[:, j] for key in ("accuracy", "acc_norm", "answer_bpb", "field_loss",
                                                        "field_scores", "field_score_se")}
        for key in ("accuracy", "acc_norm", "answer_bpb", "field_loss"):
            series(f"raw/{key}/{f}", at_eval, col[key])
        series(f"raw/chance/{f}", at_eval, [h["chance"][j]] * (T + 1))
        series(f"eval/score/{f}", at_eval, col["field_scores"])
        series(f"eval/score_se/{f}", at_eval, col["field_score_se"])
        series(f"eval/bpb_ratio/{f}", at_eval, col["answer_bpb"] / col["answer_bpb"][0])
        series(f"eval/loss_ratio/{f}", at_eval, col["field_loss"] / col["field_loss"][0])
        series(f"eval/acc_delta/{f}", at_eval, col["accuracy"] - col["accuracy"][0])
        series(f"eval/acc_norm_delta/{f}", at_eval, col["acc_norm"] - col["acc_norm"][0])
    se = np.array(h["field_score_se"])
    assert h["balanced_how"] == "mean"
    series("eval/balanced", at_eval, h["balanced"])
    series("eval/balanced_se", at_eval, np.sqrt((se ** 2).sum(axis=1)) / len(fields))  # SE of a mean of F
    stage_s = np.array(h["timings"]["stage_s"])
    series("time/policy_s", at_eval[1:], h["timings"]["policy_s"])
    series("time/stage_s", at_eval[1:], stage_s)
    series("tokens_per_s", at_eval[1:], S * cfg.cpt.batch_size * (cfg.data.record_len - 1) / stage_s)
    series("train/lr", range(1, T * S + 1), _wsd_lr(cfg.optim, T * S))

    got = _points(run / "tb")
    loss = got.pop("train/loss")  # no other record of it: one finite point per optimizer step
    assert [s for s, _ in loss] == list(range(1, T * S + 1)) and all(math.isfinite(v) and v > 0 for _, v in loss)
    # time/* and tokens_per_s: a resumed run's timings are the checkpoint's (float32 in TensorBoard)
    _assert_same(got, want)


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory):
    """test_agent_train's toy dataset and agent config (the same shapes: its compiled programs are reused)."""
    share_T1 = np.linspace(0.2, 0.7, 3)[:, None]
    best_TxD = np.concatenate([np.repeat((1 - share_T1) / 5, 5, 1), np.repeat(share_T1 / 3, 3, 1)], axis=1)
    env = ToyEnv(["source"] * 5 + ["math"] * 3, "math", best_TxD)
    actions = np.random.default_rng(0).dirichlet(np.full(8, 3.0), size=(48, 3)).astype(np.float32)
    path = tmp_path_factory.mktemp("offline")
    od.save(env.dataset(actions), path)
    return path


def test_agent_events_equal_its_metrics_log(toy_dataset, tmp_path):
    cfg = AgentConfig.model_validate({
        "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}, "sft": {"steps": 20, "batch_size": 8},
        "cql": {"steps": 20, "batch_size": 8, "n_actions": 3, "lagrange": True, "alpha": 1.0, "target_gap": 50.0,
                "target_concentration": 0.1, "alpha_lr": 0.05},
        "updates_per_dispatch": 10, "checkpoint_every": 10})
    for stage in ("sft", "cql"):
        run_train_agent(cfg, toy_dataset, tmp_path, stage, seed=0, progress=False)
        want = _jsonl_points(tmp_path / stage / "metrics.jsonl")
        assert [s for s, _ in want["entropy"]] == [10, 20]
        _assert_same(_points(tmp_path / stage / "tb"), want)
    assert {"q_data", "q_random", "cql_gap", "entropy", "critic_loss"} <= set(want)  # the CQL diagnostics
    assert os.listdir(tmp_path / "cql" / "tb")[0].startswith("events.out.tfevents.")
