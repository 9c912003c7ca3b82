"""Pulse: `dma demo` runs every stage of the pipeline end to end on the tiny variant (a few steps each)."""

from pathlib import Path

import pytest

from dma_jax.cli import main
from dma_jax.report import collect


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path, capsys):
    over = [f"run.out_dir={tmp_path}", "data.demo_fields=[source, math]", "pretrain.steps=2", "mesh.data=1",
            "cpt.policies=[fixed-0.5, regmix, replay-best, agent-sft, agent-cql]"]
    assert main(["--no-progress", "demo", "--variant", "tiny", *over]) == 0
    out = capsys.readouterr().out
    assert "wall time per stage" in out
    report = Path(tmp_path) / "report" / "report.md"
    text = report.read_text()
    for policy in ("fixed-0.5", "regmix", "replay-best", "agent-sft", "agent-cql"):
        assert f"| {policy} |" in text
    runs = collect(Path(tmp_path) / "cpt")
    assert len(runs) == 5 and all(r.complete for r in runs)
    # A second run reuses every finished stage.
    assert main(["--no-progress", "demo", "--variant", "tiny", *over]) == 0
