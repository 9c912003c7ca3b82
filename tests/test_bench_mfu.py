"""bench/mfu_interleaved.py runs and its table is what its rounds say (speed itself is never asserted)."""

import json
import statistics

from dma_jax.config import load_config
from dma_jax.models.lm import flops_per_token
from tests.paths import DEMO, REPO


def test_interleaved_mfu_rounds_are_ratios_of_neighbouring_timings(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mfu_interleaved", REPO / "bench" / "mfu_interleaved.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "mfu.json"
    assert mod.main(["--rounds", "2", "--burst", "0.01", "--only", "demo proxy", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["models"]) == ["demo proxy"]
    m = doc["models"]["demo proxy"]
    flops = flops_per_token(load_config(DEMO).proxy, 64)
    for r in m["rounds"]:
        assert abs(r["share"] - r["step_gflops"] / r["peak_gflops"]) < 1e-12
        assert abs(r["step_gflops"] * 1e9 - r["tokens_per_s"] * flops) < 1e-6 * r["step_gflops"] * 1e9
    assert m["share_median"] == statistics.median(r["share"] for r in m["rounds"]) and len(m["rounds"]) == 2
