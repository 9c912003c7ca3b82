"""The examples in examples/ run on a tiny exported agent: exit 0, valid mixtures, the agent's own answers to the
feedback they gave; the numpy trainer never imports JAX."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from dma_jax import Feedback, MixingAgent
from tests.paths import REPO
from tests.tiny_agent import HORIZON, export_tiny_agent


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_tiny_agent(tmp_path_factory.mktemp("tiny_agent"))


def _run(script: str, *args: str, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *python_flags, str(REPO / "examples" / script), *args,
           "--pretrain-steps", "20", "--steps-per-mixture", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check_run(out: dict, agent: MixingAgent, num_steps: int) -> None:
    """Valid mixtures over the agent's domains, and each one what the agent answers to the feedback before it."""
    w_TxD = np.array([[m[d] for d in agent.domains] for m in out["mixtures"]])
    assert out["domains"] == list(agent.domains) and all(list(m) == list(agent.domains) for m in out["mixtures"])
    assert w_TxD.shape == (num_steps, len(agent.domains)) and (w_TxD >= 0).all()
    np.testing.assert_allclose(w_TxD.sum(1), 1.0, atol=1e-6)
    assert len(out["feedback"]) == num_steps
    want = [agent.initial_mixture()] + [agent.next_mixture(Feedback(**fb)) for fb in out["feedback"][:-1]]
    np.testing.assert_allclose(w_TxD, [[m[d] for d in agent.domains] for m in want], rtol=1e-6, atol=1e-7)
    losses = np.array([list(fb["domain_losses"].values()) for fb in out["feedback"]])
    assert np.isfinite(losses).all() and (losses < 1.0).mean() > 0.5  # training on more data lowers the losses


def test_optax_loop(export_dir, tmp_path):
    _run("optax_loop.py", "--agent", str(export_dir), "--num-steps", "4", "--out", str(tmp_path / "out.json"))
    _check_run(json.loads((tmp_path / "out.json").read_text()), MixingAgent.load(export_dir, num_steps=4), 4)


def test_numpy_trainer_never_imports_jax(export_dir, tmp_path):
    # -X importtime: this process (not the agent's, which does not inherit the flag) lists every module it imports
    proc = _run("numpy_trainer.py", "--agent", str(export_dir), "--out", str(tmp_path / "out.json"),
                python_flags=("-X", "importtime"))
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", proc.stderr, re.M)
    assert "numpy" in imported and "json" in imported
    assert not [m for m in imported if m.split(".")[0] in ("jax", "jaxlib", "dma_jax")]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["jax_imported"] is False
    domains = out["domain_fields"]  # the trainer's own, pre-trained on its source domains uniformly
    assert sorted(set(domains.values())) == ["math", "source"]
    agent = MixingAgent.load(export_dir, domains=domains, pretraining_mixture={d: float(f == "source")
                                                                              for d, f in domains.items()})
    _check_run(out, agent, HORIZON)
