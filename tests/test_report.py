"""report.py: table numbers against numpy on known final scores, markdown bolding, plots, bad files."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from dma_jax.errors import DmaError
from dma_jax.history import collect
from dma_jax.report import paired_comparison, summary_table, write_report

SE = 0.003  # each run's evaluation SE of each field score (every step): no ties in FINAL's table

FIELDS = ["source", "math"]
DOMAINS = [("plays", "source"), ("docs", "source"), ("poems", "source"), ("arith", "math"), ("algebra", "math")]
T = 4
# Final (source, math) field scores per complete run; balanced = mean of the two.
FINAL = {
    ("agent-cql", 0): (0.99, 1.21), ("agent-cql", 1): (1.00, 1.19), ("agent-cql", 2): (0.98, 1.24),
    ("fixed-0.5", 0): (0.97, 1.15), ("fixed-0.5", 1): (0.98, 1.17), ("fixed-0.5", 2): (0.96, 1.16),
    ("target-only", 0): (0.80, 1.30), ("target-only", 1): (0.80, 1.31),
}
# In progress: scores far above everything else, so including them would change the table.
RUNNING = {("agent-cql", 3): (1.5, 1.9), ("curriculum", 0): (1.6, 1.8)}


def _history(policy: str, seed: int, final: tuple, steps: int = T, complete: bool = True, how: str = "mean",
             se: float = SE) -> dict:
    rng = np.random.default_rng([seed, len(policy)])
    frac_T1 = np.linspace(0.0, 1.0, steps + 1)[:, None]
    scores = 1.0 + frac_T1 * (np.array(final) - 1.0)
    balanced = {"mean": scores.mean(axis=1), "min": scores.min(axis=1)}[how]
    return {
        "format": "dma-cpt-history-v2", "policy": policy, "seed": seed,
        "domain_names": [n for n, _ in DOMAINS], "domain_fields": [f for _, f in DOMAINS],
        "fields": FIELDS, "target_field": "math", "steps_per_stage": 20,
        "weights": rng.dirichlet(np.ones(len(DOMAINS)), size=steps).tolist(),
        "feedback_names": [f"loss/{n}" for n, _ in DOMAINS] + [f"score/{f}" for f in FIELDS],
        "field_scores": scores.tolist(), "balanced": balanced.tolist(), "balanced_how": how,
        "field_score_se": np.full_like(scores, se).tolist(),
        "accuracy": rng.uniform(0.1, 0.6, size=(steps + 1, len(FIELDS))).tolist(),
        "domain_loss": rng.uniform(1.0, 3.0, size=(steps + 1, len(DOMAINS))).tolist(),
        "complete": complete,
    }


def _write(cpt_dir, obj: dict, seed_dir: str | None = None):
    path = cpt_dir / obj["policy"] / (seed_dir or f"seed{obj['seed']}") / "history.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture()
def cpt_dir(tmp_path):
    root = tmp_path / "cpt"
    for (policy, seed), final in FINAL.items():
        _write(root, _history(policy, seed, final))
    for (policy, seed), final in RUNNING.items():
        _write(root, _history(policy, seed, final, steps=2, complete=False))
    return root


def _expected():
    """policy -> column -> (mean, std ddof=1, combined SE) of the final scores, straight from FINAL."""
    out = {}
    for policy in sorted({p for p, _ in FINAL}):
        finals = np.array([FINAL[k] for k in sorted(FINAL) if k[0] == policy])
        cols = {"source": (finals[:, 0], SE), "math": (finals[:, 1], SE), "balanced": (finals.mean(axis=1), SE / math.sqrt(2))}
        out[policy] = {c: (np.mean(v), np.std(v, ddof=1), math.sqrt(np.var(v, ddof=1) / len(v) + se ** 2))
                       for c, (v, se) in cols.items()}
    return out


def _markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in rows]
    return split[0], split[2:]


def test_collect_reads_every_run(cpt_dir):
    runs = collect(cpt_dir)
    assert [(r.policy, r.seed) for r in runs] == sorted([*FINAL, *RUNNING])
    assert {(r.policy, r.seed) for r in runs if not r.complete} == set(RUNNING)
    run = runs[0]
    assert run.weights_TxD.shape == (T, 5) and run.field_scores_T1xF.shape == (T + 1, 2)
    assert run.domain_loss_T1xD.shape == (T + 1, 5) and run.balanced_T1.shape == (T + 1,)


def test_summary_table_matches_numpy(cpt_dir):
    table = summary_table(collect(cpt_dir))
    expected = _expected()
    ranking = sorted(expected, key=lambda p: -expected[p]["balanced"][0])
    assert [row["policy"] for row in table] == ranking == ["agent-cql", "fixed-0.5", "target-only"]
    assert [row["rank"] for row in table] == [1, 2, 3]
    for row in table:
        assert row["n"] == (2 if row["policy"] == "target-only" else 3)  # the running seed 3 is left out
        for col, (mean, std, se) in expected[row["policy"]].items():
            assert row["mean"][col] == pytest.approx(mean, abs=1e-12)
            assert row["std"][col] == pytest.approx(std, abs=1e-12)
            assert row["se"][col] == pytest.approx(se, rel=1e-6)


def test_report_markdown_table_bold_and_note(cpt_dir, tmp_path):
    out = tmp_path / "out"
    path = write_report(cpt_dir, out, title="Demo CPT")
    text = path.read_text()
    assert path == out / "report.md" and text.startswith("# Demo CPT")
    header, rows = _markdown_table(text)
    assert header == ["policy", "seeds", "source", "math", "balanced"]
    expected = _expected()
    assert [r[0] for r in rows] == ["agent-cql", "fixed-0.5", "target-only"]
    for col_i, col in enumerate(header[2:], start=2):
        best = max(expected, key=lambda p: expected[p][col][0])
        for r in rows:
            cell = r[col_i]
            assert cell.startswith("**") == (r[0] == best), (col, r[0], cell)
            mean, se = cell.strip("*").split(" ± ")
            assert float(mean) == pytest.approx(expected[r[0]][col][0], abs=5e-5)
            assert float(se) == pytest.approx(expected[r[0]][col][2], abs=5e-5)
    assert [r[1] for r in rows] == ["3", "3", "2"]
    # agent-cql is best in source and balanced, target-only in math
    assert rows[0][2].startswith("**") and rows[0][4].startswith("**") and rows[2][3].startswith("**")
    note = text[text.index("runs in progress"):]
    assert "curriculum seed 0" in note and "agent-cql seed 3" in note
    assert "curriculum" not in text[:text.index("runs in progress")].split("## How to read")[0]
    assert "1.000" in text and "mean of the field scores" in text
    assert "](mixtures.png)" in text and "](scores.png)" in text
    assert set(os.listdir(out)) == {"report.md", "mixtures.png", "scores.png"}  # no temp files left
    for name in ("mixtures.png", "scores.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_paired_comparison_against_best_other(cpt_dir):
    paired = paired_comparison(collect(cpt_dir), "agent-cql")
    diff = [sum(FINAL[("agent-cql", s)]) / 2 - sum(FINAL[("fixed-0.5", s)]) / 2 for s in range(3)]
    assert paired["other"] == "fixed-0.5" and paired["seeds"] == [0, 1, 2]
    assert paired["mean_diff"] == pytest.approx(np.mean(diff), abs=1e-12)
    assert paired["std_diff"] == pytest.approx(np.std(diff, ddof=1), abs=1e-12)
    assert paired["wins"] == 3
    want_se = math.sqrt(np.var(diff, ddof=1) / 3 + SE ** 2)  # per pair sqrt(2 (SE / sqrt 2)^2) = SE
    assert paired["se_diff"] == pytest.approx(want_se, rel=1e-6) and not paired["tie"]
    assert "agent-cql is ahead (beyond two standard errors)" in write_report(cpt_dir, cpt_dir / "r2").read_text()
    assert "fixed-0.5 (the best other policy)" in write_report(cpt_dir, cpt_dir / "report").read_text()
    assert paired_comparison(collect(cpt_dir), "no-such-policy") is None


def test_single_seed_has_zero_std_and_the_evaluation_se(tmp_path):
    _write(tmp_path, _history("fixed-0.5", 0, (0.9, 1.1)))
    _write(tmp_path, _history("agent-cql", 0, (1.0, 1.3)))
    table = summary_table(collect(tmp_path))
    assert [r["policy"] for r in table] == ["agent-cql", "fixed-0.5"]
    assert all(r["std"][c] == 0.0 for r in table for c in ("source", "math", "balanced"))
    assert table[0]["se"]["source"] == pytest.approx(SE) and table[0]["se"]["balanced"] == pytest.approx(SE / math.sqrt(2))
    _, rows = _markdown_table(write_report(tmp_path, tmp_path / "r").read_text())
    assert rows[0][4] == "**1.1500 ± 0.0021**" and rows[1][4] == "1.0000 ± 0.0021"


def test_ties_within_two_standard_errors_are_marked(tmp_path):
    """B is 0.005 below A in math and balanced; with an evaluation SE of 0.01 that is a tie (both bold, the paired
    line says tie); with 0.0001 it is not. C is far below in every column."""
    for se, tie in ((0.01, True), (0.0001, False)):
        root = tmp_path / f"se{se}"
        _write(root, _history("agent-cql", 0, (1.00, 1.20), se=se))
        _write(root, _history("fixed-0.5", 0, (1.00, 1.19), se=se))
        _write(root, _history("source-only", 0, (0.90, 1.00), se=se))
        table = summary_table(collect(root))
        assert [r["policy"] for r in table] == ["agent-cql", "fixed-0.5", "source-only"]
        assert table[0]["tied_best"] == ["source", "math", "balanced"]
        assert table[1]["tied_best"] == (["source", "math", "balanced"] if tie else ["source"])  # equal source
        assert table[2]["tied_best"] == []
        text = write_report(root, root / "r").read_text()
        _, rows = _markdown_table(text.split("### Raw")[0])
        assert [c.startswith("**") for c in rows[1][2:]] == [True, tie, tie]
        paired = paired_comparison(collect(root), "agent-cql")
        assert paired["other"] == "fixed-0.5" and paired["tie"] is tie
        assert paired["se_diff"] == pytest.approx(math.hypot(se / math.sqrt(2), se / math.sqrt(2)), rel=1e-5)
        assert ("tie (within two standard errors)" in text) is tie


def _mutations():
    def drop(key):
        return lambda o: o.pop(key)

    def setp(key, i, j, value):
        return lambda o: o[key][i].__setitem__(j, value)

    return {
        "missing key": (drop("balanced"), "missing key(s) balanced"),
        "ragged weights": (lambda o: o["weights"][1].pop(), "weights"),
        "short field_scores": (lambda o: o["field_scores"].pop(), "field_scores has shape [4, 2], expected [5, 2]"),
        "extra domain_loss column": (lambda o: [r.append(2.0) for r in o["domain_loss"]], "domain_loss has shape"),
        "NaN score": (setp("field_scores", 2, 1, math.nan), "NaN"),
        "infinite loss": (setp("domain_loss", 1, 0, math.inf), "NaN or infinite"),
        "off simplex": (lambda o: o["weights"][0].__setitem__(0, o["weights"][0][0] + 0.5), "weights[0] is not on"),
        "balanced inconsistent": (lambda o: o["balanced"].__setitem__(3, o["balanced"][3] + 0.01), "balanced[3]"),
        "base not 1": (setp("field_scores", 0, 0, 1.1), "base model"),
        "wrong format": (lambda o: o.update(format="dma-cpt-history-v0"), "format"),
        "v1 history": (lambda o: [o.update(format="dma-cpt-history-v1"), o.pop("field_score_se")],
                       "format is 'dma-cpt-history-v1', this version reads 'dma-cpt-history-v2'"),
        "negative se": (setp("field_score_se", 2, 0, -0.01), "field_score_se must be non-negative"),
        "short se": (lambda o: o["field_score_se"].pop(), "field_score_se has shape [4, 2], expected [5, 2]"),
        "unknown field": (lambda o: o["domain_fields"].__setitem__(0, "code"), "domain_fields"),
        "accuracy above 1": (setp("accuracy", 1, 1, 1.2), "accuracy must lie in [0, 1]"),
        "seed is bool": (lambda o: o.update(seed=True), "seed must be"),
        "bad balanced_how": (lambda o: o.update(balanced_how="max"), "balanced_how"),
    }


@pytest.mark.parametrize("case", list(_mutations()))
def test_malformed_history_raises_naming_file(tmp_path, case):
    mutate, needle = _mutations()[case]
    obj = _history("fixed-0.5", 0, (0.9, 1.1))
    mutate(obj)
    path = tmp_path / "fixed-0.5" / "seed0" / "history.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(obj))  # json.dumps writes NaN / Infinity literals, which json.loads accepts
    with pytest.raises(DmaError) as err:
        collect(tmp_path)
    msg = str(err.value)
    assert str(path) in msg and needle in msg and "\n" not in msg


def test_non_json_and_non_object_files(tmp_path):
    path = tmp_path / "a" / "seed0" / "history.json"
    path.parent.mkdir(parents=True)
    for text, needle in (('{"format": "dma-cpt-history-v1", ', "not valid JSON"), ("[1, 2]", "JSON object")):
        path.write_text(text)
        with pytest.raises(DmaError, match=re.escape(str(path)) + ".*" + needle):
            collect(tmp_path)


def test_duplicates_mixed_settings_and_empty_dir(tmp_path):
    _write(tmp_path, _history("fixed-0.5", 0, (0.9, 1.1)))
    dup = _write(tmp_path, _history("fixed-0.5", 0, (0.9, 1.1)), seed_dir="seed7")
    with pytest.raises(DmaError, match="also in"):
        collect(tmp_path)
    dup.unlink()
    other = _write(tmp_path, _history("agent-cql", 0, (1.0, 1.2), how="min"))
    with pytest.raises(DmaError, match=re.escape(str(other)) + ".*not comparable"):
        summary_table(collect(tmp_path))
    with pytest.raises(DmaError, match="does not exist"):
        collect(tmp_path / "nowhere")
    only_running = tmp_path / "running"
    _write(only_running, _history("agent-cql", 0, (1.0, 1.2), steps=1, complete=False))
    with pytest.raises(DmaError, match="no complete CPT run"):
        write_report(only_running, tmp_path / "r")


def test_raw_metrics_table_when_histories_carry_them(tmp_path):
    for policy, final in (("agent-cql", (1.0, 1.2)), ("fixed-0.5", (0.9, 1.1))):
        obj = _history(policy, 0, final)
        obj.update(acc_norm=np.full((T + 1, 2), 0.5).tolist(), answer_bpb=np.full((T + 1, 2), 2.0).tolist(),
                   field_loss=np.full((T + 1, 2), 3.0).tolist(), chance=[0.25, 0.5])
        obj["accuracy"] = np.full((T + 1, 2), 0.625).tolist()
        _write(tmp_path, obj)
    text = write_report(tmp_path, tmp_path / "r").read_text()
    raw = text[text.index("### Raw metrics"):text.index("## How to read")]
    # centred accuracy (0.625 - chance) / (1 - chance): source 0.5, math 0.25
    assert "| base model | source | 2.0000 | 3.0000 | 0.625 | 0.500 | +0.500 |" in raw
    assert "| fixed-0.5 | math | 2.0000 | 3.0000 | 0.625 | 0.500 | +0.250 |" in raw
    run = collect(tmp_path)[0]
    np.testing.assert_array_equal(run.chance_F, [0.25, 0.5])
    assert run.acc_norm_T1xF.shape == run.answer_bpb_T1xF.shape == run.field_loss_T1xF.shape == (T + 1, 2)
