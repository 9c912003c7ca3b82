"""bench/xla_cpu_options.py's summary: ratios are per round against that round's baseline (median over rounds),
% of peak is against the baseline process's peak, a failed variant is named, and its JSON holds the raw rounds."""

import importlib.util
import json
import sys

import numpy as np
import pytest

from tests.paths import REPO


def _module():
    spec = importlib.util.spec_from_file_location("xla_cpu_options", REPO / "bench" / "xla_cpu_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_from_fabricated_rounds(tmp_path, monkeypatch, capsys):
    mod = _module()
    rng = np.random.default_rng(0)
    made = {}  # (variant, round) -> what the fake child returned

    def fake(name, flags):
        r = sum(1 for k in made if k[0] == name)
        if name == "onednn":
            made[(name, r)] = {"error": "boom"}
            return made[(name, r)]
        doc = {"peak_flops_per_s": float(rng.uniform(1e11, 2e11)),
               "rows": [{"model": m, "tokens_per_s": float(rng.uniform(1e3, 3e4)), "mfu": float(rng.uniform(0.1, 0.5)),
                         "step_s": 0.1, "losses": [1.0 + (0.001 if name == "fast-math" else 0.0), 2.0, 3.0]}
                        for m in mod.MODELS]}
        made[(name, r)] = doc
        return doc

    monkeypatch.setattr(mod, "run_variant", fake)
    out = tmp_path / "x.json"
    monkeypatch.setattr(sys, "argv", ["x", "--rounds", "3", "--only", "ynn-dot,fast-math,onednn", "--out", str(out)])
    mod.main()
    doc = json.loads(out.read_text())
    rows = {r["variant"]: r for r in doc["table"]}
    assert set(rows) == {"baseline", "ynn-dot", "fast-math", "onednn"}
    for m in range(len(mod.MODELS)):
        want = np.median([made[("ynn-dot", r)]["rows"][m]["tokens_per_s"] / made[("baseline", r)]["rows"][m]["tokens_per_s"]
                          for r in range(3)])
        assert rows["ynn-dot"]["cells"][m]["ratio"] == pytest.approx(want, rel=1e-12)
        mfu = np.median([made[("ynn-dot", r)]["rows"][m]["mfu"] * made[("ynn-dot", r)]["peak_flops_per_s"]
                         / made[("baseline", r)]["peak_flops_per_s"] for r in range(3)])
        assert rows["ynn-dot"]["cells"][m]["mfu"] == pytest.approx(mfu, rel=1e-12)
        assert rows["baseline"]["cells"][m]["ratio"] == 1.0
        assert rows["fast-math"]["cells"][m]["max_loss_diff"] == pytest.approx(0.001)
    assert rows["onednn"]["errors"] == ["boom"] * 3
    assert "| onednn |" in capsys.readouterr().out.split("failed: boom")[0]
    assert len(doc["raw"]["baseline"]) == 3


def test_unknown_variant_is_one_line(monkeypatch):
    mod = _module()
    monkeypatch.setattr(sys, "argv", ["x", "--only", "nope"])
    with pytest.raises(SystemExit, match="--only: no variant 'nope'"):
        mod.main()


def test_variant_runs_its_flags_and_model_override(monkeypatch):
    mod = _module()
    seen = {}

    def fake_run(cmd, env, **kw):
        seen.update(cmd=cmd, flags=env["XLA_FLAGS"])
        return type("Done", (), {"returncode": 0, "stdout": '{"rows": []}\n', "stderr": ""})()

    monkeypatch.setattr(mod.subprocess, "run", fake_run)
    monkeypatch.setenv("XLA_FLAGS", "--user_flag")
    name, flags, _ = next(v for v in mod.VARIANTS if v[0] == "ynn-dot+model.attention=cudnn")
    assert mod.run_variant(name, flags) == {"rows": []}
    assert seen["cmd"][-2:] == ["--child", "attention=cudnn"]
    assert seen["flags"] == "--user_flag --xla_cpu_experimental_ynn_fusion_type=dot"
    mod.run_variant("ynn-dot", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert seen["cmd"][-2:] == ["--child", ""]
