"""A tiny exported agent for the public-API tests: 10 SFT steps on a `ToyEnv` offline dataset (seconds on a CPU).

Its domain space: `source_0` .. `source_3` (field source), `math_4`, `math_5` (field math, the target), horizon 3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dma_jax import offline_data as od
from dma_jax.agent import AgentConfig, export_agent, run_train_agent
from tests.toy_env import ToyEnv

N_SOURCE, N_TARGET, HORIZON = 4, 2, 3
TINY = {"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32},
        "sft": {"steps": 10, "batch_size": 8, "top_percent": 50.0},
        "updates_per_dispatch": 10, "checkpoint_every": 10}


def toy_env() -> ToyEnv:
    share_T1 = np.linspace(0.2, 0.7, HORIZON)[:, None]
    best_TxD = np.concatenate([np.repeat((1 - share_T1) / N_SOURCE, N_SOURCE, 1),
                               np.repeat(share_T1 / N_TARGET, N_TARGET, 1)], axis=1)
    return ToyEnv(["source"] * N_SOURCE + ["math"] * N_TARGET, "math", best_TxD)


def export_tiny_agent(root: Path) -> Path:
    """Train the tiny agent's SFT stage under `root` and export it; returns the export folder."""
    d = N_SOURCE + N_TARGET
    actions = np.random.default_rng(0).dirichlet(np.full(d, 3.0), size=(16, HORIZON)).astype(np.float32)
    od.save(toy_env().dataset(actions), root / "offline")
    run_train_agent(AgentConfig.model_validate(TINY), root / "offline", root / "agent", "sft", seed=0, progress=False)
    export_agent(root / "agent" / "sft", root / "export")
    return root / "export"
