"""Schedules as artifacts: `dma export schedule` writes a CPT run's mixtures (JSON in levanter's staged-mixture
shape, CSV), `dma cpt --policy schedule:FILE` replays them; `--feedback` rolls an exported agent out on a
feedback file. Checked against the history read with plain `json`, the replayed run's records and losses, and
(for the rollout) the mixtures the CPT loop itself chose."""

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from dma_jax import evaluation as ev
from dma_jax import policies
from dma_jax.checkpoint import Checkpointer
from dma_jax.cli import main
from dma_jax.config import load_config
from dma_jax.errors import DmaError
from dma_jax.runs import RunDir
from tests.paths import DEMO

POLICY = "ramp-0.2-0.7"  # every domain weighted, a different mixture at each re-weighting step


@pytest.fixture(scope="module")
def world(prepared_world, tmp_path_factory):
    """A run folder with the session's base models linked in, and the `dma` arguments that address it."""
    root = prepared_world.link_base(tmp_path_factory.mktemp("schedules"))
    over = prepared_world.run_overrides(root, "mesh.data=1")
    cfg = load_config(DEMO, over, variant="tiny")
    args = ["--config", str(DEMO), "--variant", "tiny", *over]
    return cfg, args, root


def _dma(*argv) -> int:
    return main(["--no-progress", *argv])


@pytest.fixture(scope="module")
def original(world):
    """`dma cpt --policy POLICY --seed 0`, then `dma export schedule` of it: (history as plain JSON, json, csv)."""
    cfg, args, root = world
    assert _dma("cpt", *args, "--policy", POLICY, "--seed", "0") == 0
    hist = json.loads((RunDir(cfg).cpt_run(POLICY, 0) / "history.json").read_text())
    assert _dma("export", "schedule", *args, "--policy", POLICY, "--seed", "0") == 0
    folder = root / "export" / "schedules"
    return hist, folder / f"{POLICY}-seed0.json", folder / f"{POLICY}-seed0.csv"


def test_export_writes_the_history_mixtures_as_levanter_stages_and_csv(world, original):
    cfg, _, _ = world
    hist, json_path, csv_path = original
    names, S, w_TxD = hist["domain_names"], hist["steps_per_stage"], hist["weights"]
    T = cfg.cpt.num_stages
    assert len(w_TxD) == T and S == cfg.cpt.steps_per_stage
    assert len({tuple(w) for w in w_TxD}) == T  # the ramp: the mixtures differ, so a stage mix-up would show
    doc = json.loads(json_path.read_text())
    stages = doc["train_weights"]  # levanter: list of [start step, {domain: weight}], starts increasing from 0
    assert isinstance(stages, list) and len(stages) == T
    for stage in stages:
        assert isinstance(stage, list) and len(stage) == 2
        assert isinstance(stage[0], int) and isinstance(stage[1], dict)
        assert all(isinstance(k, str) and isinstance(v, float) for k, v in stage[1].items())
    starts = [s for s, _ in stages]
    assert starts[0] == 0 and all(b > a for a, b in zip(starts, starts[1:])) and starts == [t * S for t in range(T)]
    for (_, w), want in zip(stages, w_TxD):
        assert list(w) == names or sorted(w) == sorted(names)
        assert [w[n] for n in names] == want  # exact: JSON floats round-trip
    rows = list(csv.reader(csv_path.read_text().splitlines()))
    assert rows[0] == ["stage", "start_step", *names]
    assert [[int(r[0]), int(r[1])] for r in rows[1:]] == [[t, t * S] for t in range(T)]
    assert [[float(x) for x in r[2:]] for r in rows[1:]] == w_TxD


def test_replaying_the_schedule_reproduces_the_run(world, original):
    cfg, args, root = world
    hist, json_path, csv_path = original
    assert _dma("cpt", *args, "--policy", f"schedule:{json_path}", "--seed", "0") == 0
    folder = f"schedule-{POLICY}-seed0-{hashlib.sha256(json_path.read_bytes()).hexdigest()[:8]}"
    replay_dir = root / "cpt" / folder / "seed0"
    replay = json.loads((replay_dir / "history.json").read_text())
    assert replay["policy"] == folder
    assert replay["weights"] == hist["weights"]  # exactly the same mixtures
    # Same seed and mixtures: the same records in the same order, so the same losses and scores, bit for bit.
    orig_dir = RunDir(cfg).cpt_run(POLICY, 0)
    assert (replay_dir / "records.jsonl").read_text() == (orig_dir / "records.jsonl").read_text()
    assert replay["domain_loss"][-1] == hist["domain_loss"][-1]
    assert replay["field_scores"] == hist["field_scores"]
    # The CSV replays to the same mixtures (the policy, without another CPT run).
    info = policies.SpaceInfo(tuple(hist["domain_names"]), tuple(hist["domain_fields"]), hist["target_field"],
                              (1.0,) * len(hist["domain_names"]))
    T, S = cfg.cpt.num_stages, cfg.cpt.steps_per_stage
    from_csv = policies.make_policy(f"schedule:{csv_path}", info, num_stages=T, steps_per_stage=S)
    h = policies.PolicyInput([], [], T)
    for _ in range(T):
        h.weights.append(from_csv(h))
    assert np.asarray(h.weights).tolist() == hist["weights"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _doc(names, S, rows):
    return {"format": "dma-schedule-v1", "train_weights": [[t * S, dict(zip(names, r))] for t, r in enumerate(rows)]}


def test_bad_schedule_files_give_one_line_errors(world, original, tmp_path, capsys):
    cfg, args, _ = world
    hist, json_path, _ = original
    names, S, w = hist["domain_names"], cfg.cpt.steps_per_stage, hist["weights"]
    T = cfg.cpt.num_stages
    neg = [list(r) for r in w]
    neg[1][0], neg[1][1] = -0.1, neg[1][1] + neg[1][0] + 0.1
    off = [list(r) for r in w]
    off[0][0] += 0.01
    shifted = json.loads(json_path.read_text())
    shifted["train_weights"][1][0] = S + 1
    renamed = _doc([*names[:-1], "no-such-domain"], S, w)
    header = ",".join(["stage", "start_step", *names])
    cases = {
        "missing": (tmp_path / "nothing.json", "cannot read the schedule file"),
        "bad-json": (_write(tmp_path / "broken.json", '{"train_weights": [[0, {'), "not valid JSON"),
        "bad-csv": (_write(tmp_path / "broken.csv", "step,weights\n0,1\n"), "not a schedule CSV"),
        "csv-text": (_write(tmp_path / "text.csv", f"{header}\n0,0,{'x,' * (len(names) - 1)}x\n"),
                     "line 2 is not numbers"),
        "domains": (_write(tmp_path / "renamed.json", json.dumps(renamed)),
                    f"only in the file: ['no-such-domain']; only in the run: ['{names[-1]}']"),
        "negative": (_write(tmp_path / "neg.json", json.dumps(_doc(names, S, neg))),
                     f"stage 1: weight of '{names[0]}' is -0.1"),
        "sum": (_write(tmp_path / "off.json", json.dumps(_doc(names, S, off))),
                f"stage 0: weights sum to {sum(off[0]):.9g}, not 1"),
        "stages": (_write(tmp_path / "short.json", json.dumps(_doc(names, S, w[:1]))),
                   f"1 mixture stage(s), but this CPT has cpt.num_stages={T}"),
        "starts": (_write(tmp_path / "shifted.json", json.dumps(shifted)),
                   f"stage 1 starts at step {S + 1}, but with cpt.steps_per_stage={S} it starts at {S}"),
    }
    for case, (path, message) in cases.items():
        capsys.readouterr()
        rc = _dma("cpt", *args, "--policy", f"schedule:{path}", "--seed", "0")
        err = capsys.readouterr().err
        assert rc == 2, case
        assert err.count("\n") == 1 and err.startswith("dma: error: ") and message in err, (case, err)
        assert str(path) in err, (case, err)
    capsys.readouterr()
    assert _dma("export", "schedule", *args, "--policy", "fixed-0.9", "--seed", "0") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no finished CPT run of policy 'fixed-0.9' seed 0" in err
    # A schedule only replays inside `dma cpt`, which knows the number of re-weighting steps.
    info = policies.SpaceInfo(tuple(names), tuple(hist["domain_fields"]), hist["target_field"], (1.0,) * len(names))
    with pytest.raises(DmaError, match="replayed by `dma cpt` only"):
        policies.make_policy(f"schedule:{json_path}", info)


@pytest.mark.slow
def test_feedback_rollout_is_what_the_agent_chose_in_cpt(world, tmp_path):
    """An SFT agent (trained on an analytic toy dataset: any domain space will do) runs a CPT; its rollout on the
    feedback that CPT saw, exported with `--feedback`, is the CPT's mixtures exactly."""
    from dma_jax import offline_data as od
    from dma_jax.agent.runner import export_agent, run_train_agent
    from tests.toy_env import ToyEnv

    cfg, args, root = world
    run = RunDir(cfg)
    env = ToyEnv(["source", "source", "math", "math"], "math", np.tile([0.4, 0.3, 0.2, 0.1], (2, 1)))
    od.save(env.dataset(np.random.default_rng(0).dirichlet(np.ones(4), size=(8, 2)).astype(np.float32)),
            tmp_path / "offline")
    run_train_agent(cfg.agent, tmp_path / "offline", tmp_path / "agent", "sft", 0, progress=False)
    export_agent(tmp_path / "agent" / "sft", run.agent_export("sft"))
    assert _dma("cpt", *args, "--policy", "agent-sft", "--seed", "0") == 0
    hist = json.loads((run.cpt_run("agent-sft", 0) / "history.json").read_text())
    T = cfg.cpt.num_stages
    meta = Checkpointer(run.cpt_checkpoints("agent-sft", 0)).read_meta(T)  # the loop's feedback vectors, [T+1, M]
    names = ev.feedback_names(hist["domain_names"], hist["fields"])
    rows = [dict(zip(names, f)) for f in meta["history"]["feedback"]]
    assert len(rows) == T + 1
    feedback = _write(tmp_path / "seen.json", json.dumps({"feedback": rows}))
    assert _dma("export", "schedule", *args, "--stage", "sft", "--feedback", str(feedback), "--out",
                str(tmp_path / "out")) == 0
    doc = json.loads((tmp_path / "out" / "agent-sft-seen.json").read_text())
    assert [[w[n] for n in hist["domain_names"]] for _, w in doc["train_weights"]] == hist["weights"]
    # A feedback file that does not name this run's feedback is refused in one line.
    bad = _write(tmp_path / "bad.json", json.dumps({"feedback": [{"loss/x": 1.0}] * T}))
    assert _dma("export", "schedule", *args, "--stage", "sft", "--feedback", str(bad)) == 2
