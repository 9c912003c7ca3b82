"""Agent seeds (`agent.seeds`, `dma train-agent --agent-seed K`, policies `agent-<stage>@K`): folders, distinct
agents, seed 0 unchanged bit for bit, one-line errors, CPT pairing, and the `@` name in report / export schedule."""

import json
import types

import numpy as np
import pytest
import yaml

from dma_jax import cpt, offline_data as od
from dma_jax import evaluation as ev
from dma_jax.agent import load_exported_agent
from dma_jax.checkpoint import Checkpointer
from dma_jax.cli import main
from dma_jax.config import dump_config, load_config
from dma_jax.data.mixer import DomainMixer
from dma_jax.errors import DmaError
from dma_jax.policies import PolicyInput, SpaceInfo, make_policy
from dma_jax.runs import RunDir
from tests.golden import _arrays_digest, _orbax_arrays
from tests.test_agent_train import TINY, _env
from tests.test_report import _history, _write

NAMES = tuple(f"s{i}" for i in range(5)) + ("m0", "m1", "m2")
INFO = SpaceInfo(NAMES, ("source",) * 5 + ("math",) * 3, "math", tuple(float(x) for x in range(3, 11)))


def _config(tmp_path, root, seeds):
    path = tmp_path / f"cfg-{root.name}.yaml"
    path.write_text(yaml.safe_dump({"run": {"out_dir": str(root)}, "agent": dict(TINY, seeds=seeds)}))
    return path


def _train(tmp_path, name, seeds, *args):
    """`dma train-agent` on test_agent_train's toy dataset (its shapes: compiled programs are shared)."""
    root = tmp_path / name
    actions = np.random.default_rng(0).dirichlet(np.full(8, 3.0), size=(48, 3)).astype(np.float32)
    od.save(_env(5, 3).dataset(actions), root / "sweep" / "offline")
    cfg_path = _config(tmp_path, root, seeds)
    assert main(["--no-progress", "train-agent", "--config", str(cfg_path), *args]) == 0
    return load_config(cfg_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeds")
    today = _train(tmp, "today", [0])  # the default config: as before agent seeds
    seeded = _train(tmp, "seeded", [0, 1])  # agent.seeds: both seeds, no flag
    return RunDir(today), RunDir(seeded)


def _spec(export_dir) -> dict:
    spec = json.loads((export_dir / "agent_spec.json").read_text())
    spec["trained_on"].pop("dataset_sha256")
    return spec


def _actor(export_dir) -> str:
    steps = sorted((p for p in (export_dir / "checkpoint").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return _arrays_digest(_orbax_arrays(steps[-1] / "state"))


def test_seed_folders_distinct_agents_and_seed0_unchanged(runs, tmp_path, capsys):
    today, seeded = runs
    assert sorted(p.name for p in today.agent.iterdir()) == ["cql", "export-cql", "export-sft", "sft"]
    assert sorted(p.name for p in seeded.agent.iterdir()) == ["cql", "export-cql", "export-sft", "seed1", "sft"]
    assert sorted(p.name for p in (seeded.agent / "seed1").iterdir()) == ["cql", "export-cql", "export-sft", "sft"]
    for stage in ("sft", "cql"):
        # agent seed 0 of a seeded config is today's agent, bit for bit; seed 1 trained with training seed 1
        assert _actor(seeded.agent_export(stage)) == _actor(today.agent_export(stage))
        spec0, spec = (_spec(run.agent_export(stage)) for run in (today, seeded))
        assert spec == spec0 and spec["step"] == 20  # (the two toy datasets' npz bytes differ: np.savez's time)
        assert _actor(seeded.agent_export(stage, 1)) != _actor(seeded.agent_export(stage))
        assert Checkpointer(seeded.agent_stage(stage, 1) / "checkpoints").read_meta(20)["seed"] == 1
        assert Checkpointer(seeded.agent_stage(stage) / "checkpoints").read_meta(20)["seed"] == 0
    # `--agent-seed 1` again resumes: nothing left to train, the export is the same
    before = _actor(seeded.agent_export("cql", 1))
    capsys.readouterr()
    cfg_path = _config(tmp_path, seeded.root, [0, 1])
    assert main(["--no-progress", "train-agent", "--config", str(cfg_path), "--agent-seed", "1", "--stage", "cql"]) == 0
    out = capsys.readouterr().out
    assert out.count("train-agent cql (agent seed 1): 20 updates") == 1 and "seed1/export-cql" in out
    assert _actor(seeded.agent_export("cql", 1)) == before
    # the default is dropped from the config dump (config hashes, meta.json, config.yaml unchanged)
    assert "seeds" not in dump_config(today.cfg)["agent"] and dump_config(seeded.cfg)["agent"]["seeds"] == [0, 1]


def _feedback_history() -> PolicyInput:
    m = len(ev.feedback_names(list(NAMES), ["source", "math"]))
    rng = np.random.default_rng(3)
    return PolicyInput([np.full(8, 1 / 8)], [rng.uniform(0.5, 2.0, m).astype(np.float32) for _ in range(2)], 3)


def test_policy_at_k_loads_that_seeds_export(runs):
    _, seeded = runs
    history = _feedback_history()
    exports = seeded.agent_exports()
    assert sorted(exports) == ["agent-cql", "agent-cql@1", "agent-sft", "agent-sft@1"]
    at1 = make_policy("agent-cql@1", INFO, agent_dirs=exports)
    plain = make_policy("agent-cql", INFO, agent_dirs=exports)
    # loaded straight from seed 1's folder (another route: a plain dict naming the folder)
    direct = make_policy("agent-cql", INFO, agent_dirs={"agent-cql": seeded.agent / "seed1" / "export-cql"})
    w1, w0, wd = at1(history), plain(history), direct(history)
    assert at1.name == "agent-cql@1" and np.array_equal(w1, wd)
    assert np.abs(w1 - w0).max() > 1e-4 and w1.sum() == pytest.approx(1.0) and w0.sum() == pytest.approx(1.0)
    want = load_exported_agent(seeded.agent / "seed1" / "export-cql").spec
    assert at1.agent.spec == want


@pytest.mark.parametrize("name, needle", [
    ("agent-cql@7", "agent/seed7/export-cql/agent_spec.json: missing"),
    ("agent-sft@2", "run `dma train-agent --agent-seed 2`"),
    ("agent-cql@0", "agent seed 0 is the plain name agent-cql"),
    ("agent-cql@01", "without leading zeros"),
    ("agent-sft@x", "write agent-sft@K"),
    ("agent-bc@1", "no exported agent"),
])
def test_unknown_or_bad_agent_seed_is_one_line(runs, name, needle):
    _, seeded = runs
    with pytest.raises(DmaError) as e:
        make_policy(name, INFO, agent_dirs=seeded.agent_exports())
    assert "\n" not in str(e.value) and needle in str(e.value)


def test_cpt_seed_pairs_agent_seed_runs_with_baselines(runs, monkeypatch):
    """run_cpt seeds its data mixer with the CPT seed whatever the policy; a mixer's per-domain record order depends
    on (seed, domain) only, so agent-cql@1 seed S and fixed-0.3 seed S read each domain's records in the same order."""
    _, seeded = runs
    seen = {}

    class Stop(Exception):
        pass

    def mixer(sources, names, batch_size, policy, seed, **kw):
        seen[name] = seed
        raise Stop

    fake_space = types.SimpleNamespace(names=list(NAMES), part_of=list(NAMES), fields_of_domain=list(INFO.domain_fields),
                                       train_tokens=np.array(INFO.sizes), num_domains=8, record_len=129,
                                       records=lambda d: None)
    monkeypatch.setattr(cpt, "shared_trainer", lambda *a: types.SimpleNamespace(mesh=None))
    monkeypatch.setattr(cpt, "ev", types.SimpleNamespace(EvalSet=types.SimpleNamespace(for_space=lambda s, c: None),
                                                         shared_evaluate=lambda t, b: None))
    monkeypatch.setattr(cpt, "shd", types.SimpleNamespace(put_global=lambda x, s: x, replicated=lambda m: None))
    monkeypatch.setattr(cpt, "DomainMixer", mixer)
    for name in ("agent-cql@1", "fixed-0.3"):
        with pytest.raises(Stop):
            cpt.run_cpt.__wrapped__(seeded.cfg, name, 2, space=fake_space, progress=False)
    assert seen == {"agent-cql@1": 2, "fixed-0.3": 2}
    assert (seeded.cpt / "agent-cql@1" / "seed2").is_dir()  # the run folder: the policy's name

    def per_domain(seed, weights):
        sources = [[np.array([100 * d + i]) for i in range(40)] for d in range(8)]
        m = DomainMixer(sources, NAMES, 16, lambda step: weights, seed)
        batches = [next(m) for _ in range(4)]
        dom, rid = (np.concatenate([b[k] for b in batches]) for k in ("domain", "record_id"))
        return [set(rid[dom == d].tolist()) for d in range(8)]

    fixed, other = INFO.target_share(0.3), np.linspace(1.0, 2.0, 8) / np.linspace(1.0, 2.0, 8).sum()
    a, b, c = per_domain(2, fixed), per_domain(2, other), per_domain(3, other)
    assert all(x <= y or y <= x for x, y in zip(a, b))  # the first records of one order
    assert not all(x <= y or y <= x for x, y in zip(a, c))  # another CPT seed: another order


def test_report_history_and_export_schedule_take_the_at_name(runs, tmp_path):
    from dma_jax.export import export_schedule
    from dma_jax.history import collect
    from dma_jax.report import write_report

    _, seeded = runs
    cpt_dir = tmp_path / "out" / "cpt"
    cfg = seeded.cfg.model_copy(update={"run": seeded.cfg.run.model_copy(update={"out_dir": str(tmp_path / "out")})})
    for policy, final in (("agent-cql@1", (1.0, 1.2)), ("fixed-0.3", (0.9, 1.1))):
        _write(cpt_dir, _history(policy, 0, final, steps=2))
    assert [(r.policy, r.seed) for r in collect(cpt_dir)] == [("agent-cql@1", 0), ("fixed-0.3", 0)]
    text = write_report(cpt_dir, tmp_path / "report").read_text()
    assert "| agent-cql@1 |" in text
    json_file, csv_file = export_schedule(cfg, "agent-cql@1", 0, str(tmp_path / "sched"))
    assert json_file.name == "agent-cql@1-seed0.json" and csv_file.is_file()
    doc = json.loads(json_file.read_text())
    assert len(doc["train_weights"]) == 2
