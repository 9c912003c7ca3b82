"""Pulse: `dma demo` runs every stage of the pipeline end to end on the tiny variant (a few steps each),
and its outputs are byte-identical to the recorded golden run (tests/golden.py: refactors change no number)."""

import os
from pathlib import Path

import pytest

from dma_jax.cli import main
from tests import golden

POLICIES = ("source-only", "target-only", "fixed-0.3", "fixed-0.7", "curriculum", "regmix", "replay-best",
            "agent-sft", "agent-cql")


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_demo_pipeline_end_to_end_matches_golden(tmp_path, capsys):
    args = [*golden.DEMO_ARGS, f"run.out_dir={tmp_path}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "wall time per stage" in out
    text = (tmp_path / "report" / "report.md").read_text()
    for policy in POLICIES:
        assert f"| {policy} |" in text
    # Every output equals the golden run's, bit for bit (offline arrays, agents, CPT histories, records, report).
    assert golden.compare(tmp_path) == []
    # A second run reuses every finished stage: no file is rewritten except the report and the demo's own
    # config.yaml / metrics of pretrain (checked: nothing under sweep/, agent/ or cpt/ changes).
    before = _mtimes(tmp_path)
    assert main(args) == 0
    after = _mtimes(tmp_path)
    kept = [k for k in before if k.split(os.sep)[0] in ("sweep", "agent", "cpt")]
    assert kept and [k for k in kept if after.get(k) != before[k]] == []
