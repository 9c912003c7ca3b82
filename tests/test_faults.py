"""Fault injection: SIGKILL / SIGTERM `dma prepare`, `sweep`, `train-agent` and `cpt` at fixed points, re-run the
same command, and check the outputs equal an uninterrupted run's, bit for bit.

Each stage runs as a CLI subprocess; `DMA_FAULT_AT` (dma_jax/faults.py) places every kill at the same event on
every run. The kills of a stage are chained (kill, re-run killed later, ..., re-run to the end), so each re-run
also resumes from the state the previous kill left. Inputs are made once, in-process: the data, the base models
and the reference sweep are the session's prepared world (tests/conftest.py). What is not compared bit for bit,
and why: wall-clock fields (prepare_seconds, CPT timings, agent updates_per_s) and the offline dataset's
data.npz bytes / sha256 (np.savez stamps the zip entries with the time); the arrays inside are compared bit
for bit.
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from dma_jax.config import load_config
from dma_jax.faults import PREEMPTED_EXIT_CODE as PREEMPTED
from dma_jax.prepare import run_prepare
from dma_jax.pretrain import run_pretrain
from tests import base_world
from tests.mixer_ref import carried_counts
from tests.fault_harness import SIGKILLED, arrays, assert_same_arrays, dma, expect, files, jsonl, steps, uncommitted
from tests.paths import DEMO

pytestmark = pytest.mark.slow


def _run_dir(world, out: Path, *linked: str) -> list[str]:
    """A fresh run.out_dir whose `linked` stage outputs point at the prepared world's base run (tests/conftest.py);
    returns the overrides of every run here (the CLI's too)."""
    out.mkdir(parents=True)
    for name in linked:
        (out / name).symlink_to(world.base_dir / name)
    return world.run_overrides(out, "mesh.data=1")


def _cfg(over: list[str]):
    return load_config(DEMO, over, variant="tiny")


@pytest.fixture(scope="module")
def sweep_ref(swept_world):
    """An uninterrupted sweep, run in-process as the CLI runs it (the session's, tests/base_world.py: the same
    overrides as `_run_dir`'s): the sweep test's reference, the agent's input; the run folder holding it."""
    assert base_world.SWEEP_OVERRIDES == ("mesh.data=1",)
    return swept_world.base_dir


def test_fault_hook_is_inert_without_the_variable():
    from dma_jax import faults

    assert "DMA_FAULT_AT" not in os.environ
    faults.maybe_fault("cpt.step")  # returns: nothing is armed
    assert not faults.armed("ckpt.save_mid")


def _user_domains(root: Path) -> list[str]:
    """Overrides for 4 small JSONL domains (2 source, 2 math) and a benchmark: prepare's own work, not the demo's."""
    rng = np.random.default_rng(0)
    words = np.array("the of a to in is that for it as with was on be by at this from or an".split())
    domains = []
    for name, field in (("s1", "source"), ("s2", "source"), ("m1", "math"), ("m2", "math")):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{name} {i}: " + " ".join(rng.choice(words, 300))}) + "\n"
                                for i in range(40)))
        domains.append({"name": name, "field": field, "kind": "jsonl", "paths": [str(path)]})
    bench = root / "bench.jsonl"
    items = [{"context": f"{i} + 1 =", "choices": [f" {i + 1}", f" {i}"], "gold": 0, "domain": "m1"} for i in range(3)]
    bench.write_text("".join(json.dumps(item) + "\n" for item in items))
    return ["data.demo=false", f"data.domains={json.dumps(domains)}",
            f"data.benchmarks={json.dumps([{'field': 'math', 'path': str(bench)}])}"]


def test_prepare_survives_sigkill_mid_domain_after_a_domain_and_before_the_manifest(tmp_path):
    inputs = _user_domains(tmp_path)

    def over(d):
        return inputs + [f"data.dir={d}", f"run.out_dir={tmp_path / 'run'}"]

    ref, data = tmp_path / "ref", tmp_path / "killed"
    run_prepare(_cfg(over(ref)), progress=False)
    done = []
    for fault in ("prepare.document:60", "prepare.domain_done:2", "prepare.manifest:1"):
        expect(dma(["prepare"], over(data), fault), SIGKILLED)
        assert not (data / "manifest.json").exists()
        done.append(len(list(data.glob("domains/*/done.json"))))
    assert done == [1, 3, 4]  # domain 1 done, killed in domain 2; then after domain 3; then all but the manifest
    expect(dma(["prepare"], over(data)), 0)
    want, got = files(ref), files(data)
    m_want, m_got = (json.loads(f.pop("manifest.json")) for f in (want, got))
    assert m_want.pop("prepare_seconds") >= 0 and m_got.pop("prepare_seconds") >= 0  # wall clock
    assert m_want["config"].pop("dir") == str(ref) and m_got["config"].pop("dir") == str(data)
    assert m_got == m_want
    assert got.keys() == want.keys()  # no leftover temporaries, no missing shard
    assert sum(k.endswith(".array_record") for k in want) > 8  # several shards per domain
    assert [k for k in want if got[k] != want[k]] == []  # shards, done.json, benchmarks: bit for bit


def _offline(run: Path) -> tuple[dict, dict]:
    d = run / "sweep" / "offline"
    with np.load(io.BytesIO((d / "data.npz").read_bytes()), allow_pickle=False) as z:
        arrs = {k: z[k] for k in z.files}
    meta = json.loads((d / "meta.json").read_text())
    meta.pop("data_sha256")  # hashes the npz bytes, which carry np.savez's zip timestamps
    return arrs, meta


def test_sweep_survives_three_sigkills_and_a_sigterm(prepared_world, sweep_ref, tmp_path):
    run = tmp_path / "killed"
    over = _run_dir(prepared_world, run, "pretrain-proxy")
    ck = run / "sweep" / "checkpoints"  # tiny: 2 chunks x 2 re-weighting steps = checkpoint steps 1..4
    expect(dma(["sweep"], over, "sweep.stage_done:1"), SIGKILLED)  # mid-chunk
    assert steps(ck) == [1]
    expect(dma(["sweep"], over, "ckpt.save_mid:2"), SIGKILLED)  # steps 2, then 3 written but not committed
    assert steps(ck) == [1, 2] and uncommitted(ck)
    expect(dma(["sweep"], over, "ckpt.save_begin:1:TERM"), PREEMPTED)  # SIGTERM during the save of step 3
    assert steps(ck) == [2, 3] and not uncommitted(ck)  # finished that save, stopped; the stale temporary is gone
    expect(dma(["sweep"], over, "sweep.stage_done:1"), SIGKILLED)  # all proxies done, dataset not yet written
    assert steps(ck) == [3, 4] and not (run / "sweep" / "offline" / "meta.json").exists()
    expect(dma(["sweep"], over), 0)
    (a_want, m_want), (a_got, m_got) = _offline(sweep_ref), _offline(run)
    assert_same_arrays(a_got, a_want)
    for m in (m_got, m_want):
        m.pop("config_hash"), m["config"]["run"].pop("out_dir")  # the only difference: where each run lives
    assert m_got == m_want


def _agent_outputs(run: Path) -> dict:
    agent = run / "agent"
    out = {}
    for stage in ("sft", "cql"):
        export = agent / f"export-{stage}"
        out[f"{stage} actor"] = arrays(export / "checkpoint", 0)
        out[f"{stage} spec"] = json.loads((export / "agent_spec.json").read_text())
        out[f"{stage} metrics"] = jsonl(agent / stage / "metrics.jsonl", drop=("updates_per_s",))
    return out


def test_train_agent_survives_three_sigkills_and_a_sigterm(prepared_world, sweep_ref, tmp_path):
    from dma_jax.agent.runner import export_agent, run_train_agent

    extra = ["agent.checkpoint_every=10", "agent.sft.steps=20", "agent.cql.steps=20"]  # 5 updates per dispatch

    def run_dir(out):
        over = _run_dir(prepared_world, out) + extra
        (out / "sweep").symlink_to(sweep_ref / "sweep")
        return over

    ref = tmp_path / "ref"
    cfg = _cfg(run_dir(ref))
    for stage in ("sft", "cql"):  # what `dma train-agent` does, in-process
        run_train_agent(cfg.agent, ref / "sweep" / "offline", ref / "agent", stage, cfg.run.seed, progress=False)
        export_agent(ref / "agent" / stage, ref / "agent" / f"export-{stage}")
    run = tmp_path / "killed"
    over = run_dir(run)
    sft, cql = run / "agent" / "sft" / "checkpoints", run / "agent" / "cql" / "checkpoints"
    expect(dma(["train-agent"], over, "agent.dispatch:3"), SIGKILLED)  # SFT at update 15 of 20
    assert steps(sft) == [10]
    expect(dma(["train-agent"], over, "agent.dispatch:3:TERM"), PREEMPTED)  # SFT 15, 20, export, CQL 5: SIGTERM
    assert steps(sft) == [10, 20] and steps(cql) == [5]  # saved at 5, off the checkpoint_every grid
    assert not (run / "agent" / "export-cql").exists()
    expect(dma(["train-agent"], over, "ckpt.save_mid:2"), SIGKILLED)  # save 1: SFT export; 2: CQL step 10
    assert steps(cql) == [5] and uncommitted(cql)
    expect(dma(["train-agent"], over, "ckpt.save_mid:4"), SIGKILLED)  # SFT export, CQL 10, 20, the CQL export
    assert steps(cql) == [10, 20] and not (run / "agent" / "export-cql" / "agent_spec.json").exists()
    expect(dma(["train-agent"], over), 0)
    want, got = _agent_outputs(ref), _agent_outputs(run)
    for key in want:
        if key.endswith("actor"):
            assert_same_arrays(got[key], want[key])
        else:
            assert got[key] == want[key], key


def _cpt_outputs(run: Path, T: int) -> tuple[dict, str, dict]:
    d = run / "cpt" / "curriculum" / "seed0"
    hist = json.loads((d / "history.json").read_text())
    hist.pop("timings")  # wall clock
    return hist, (d / "records.jsonl").read_text(), arrays(d / "checkpoints", T)


def test_cpt_survives_three_sigkills_and_a_sigterm_without_repeating_records(prepared_world, tmp_path):
    from dma_jax.cpt import run_cpt

    extra = ["cpt.num_stages=3", "cpt.steps_per_stage=2"]
    cmd = ["cpt", "--policy", "curriculum", "--seed", "0"]
    ref = tmp_path / "ref"
    run_cpt(_cfg(_run_dir(prepared_world, ref, "pretrain-target") + extra), "curriculum", 0, progress=False)
    run = tmp_path / "killed"
    over = _run_dir(prepared_world, run, "pretrain-target") + extra
    ck = run / "cpt" / "curriculum" / "seed0" / "checkpoints"
    expect(dma(cmd, over, "cpt.step:3"), SIGKILLED)  # first step of re-weighting step 2
    assert steps(ck) == [1]
    expect(dma(cmd, over, "cpt.step:1:TERM"), PREEMPTED)  # SIGTERM mid-step 2: finishes it, saves, stops
    assert steps(ck) == [1, 2]
    expect(dma(cmd, over, "ckpt.save_mid:1"), SIGKILLED)  # the save of re-weighting step 3
    assert steps(ck) == [1, 2] and uncommitted(ck)
    expect(dma(cmd, over, "cpt.stage_done:1"), SIGKILLED)  # step 3 saved, history.json not yet written
    assert steps(ck) == [2, 3] and not (ck.parent / "history.json").exists()
    expect(dma(cmd, over), 0)

    (h_want, r_want, p_want), (h_got, r_got, p_got) = _cpt_outputs(ref, 3), _cpt_outputs(run, 3)
    assert h_got == h_want
    assert r_got == r_want
    assert_same_arrays(p_got, p_want)
    # Independently of the reference: every step trained once, on the batch counts its mixture asks for, and no
    # record of a domain was read twice (each domain has more records than the run reads from it).
    recs = jsonl(ck.parent / "records.jsonl")
    S, B = 2, 4
    assert [r["step"] for r in recs] == list(range(1, 3 * S + 1))
    want = carried_counts([h_got["weights"][(r["step"] - 1) // S] for r in recs], B)
    for r, want_counts in zip(recs, want):
        np.testing.assert_array_equal(np.bincount(r["domain"], minlength=len(want_counts)), want_counts)
    ids = [(d, i) for r in recs for d, i in zip(r["domain"], r["record_id"])]
    assert len(set(ids)) == len(ids) == 3 * S * B


def test_pretrain_sigterm_exits_143_and_resumes_bitwise(prepared_world, tmp_path):
    extra = ["pretrain.steps=4", "pretrain.checkpoint_every=2", "pretrain.eval_every=2"]
    ref = tmp_path / "ref"
    run_pretrain(_cfg(_run_dir(prepared_world, ref) + extra), "proxy", progress=False)
    run = tmp_path / "killed"
    over = _run_dir(prepared_world, run) + extra
    ck = run / "pretrain-proxy" / "checkpoints"
    expect(dma(["pretrain", "--model", "proxy"], over, "ckpt.save_begin:1:TERM"), PREEMPTED)  # during the step-2 save
    assert steps(ck) == [2]
    expect(dma(["pretrain", "--model", "proxy"], over), 0)
    assert_same_arrays(arrays(ck, 4), arrays(ref / "pretrain-proxy" / "checkpoints", 4))
    assert jsonl(ck.parent / "metrics.jsonl", ("tokens_per_s",)) == jsonl(ref / "pretrain-proxy" / "metrics.jsonl",
                                                                           ("tokens_per_s",))
