"""The public API (`dma_jax.api`): `dma cpt`'s mixtures by name instead of by position, its one-line errors, and
the JSON-lines agent process (`python -m dma_jax.api serve`)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dma_jax import DmaError, Feedback, MixingAgent
from dma_jax import evaluation as ev
from dma_jax.agent import FeedbackLayout, History, load_exported_agent
from dma_jax.policies import PolicyInput, SpaceInfo, make_policy
from tests.tiny_agent import export_tiny_agent

T = 4  # re-weighting steps: one more than the agent's training horizon (any horizon runs)
OTHER_SPACE = {"web": "source", "books": "source", "wiki": "source", "proofs": "math", "arithmetic": "math"}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_tiny_agent(tmp_path_factory.mktemp("tiny_agent"))


def _feedback_run(names, fields, seed):
    """T - 1 evaluations after the first T - 1 steps: per-domain loss ratios [T-1, D], field scores [T-1, F]."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.6, 1.1, (T - 1, len(names))).astype(np.float32),
            rng.uniform(0.8, 1.3, (T - 1, len(fields))).astype(np.float32))


def _cpt_vector(loss_D, score_F, rng):
    """The feedback vector as `dma cpt` builds it (`evaluation.feedback_vector` of the normalised metrics), with
    random values in the entries the agent must not read (standard errors, ratios, accuracy deltas)."""
    F = len(score_F)
    norm = {"domain_loss": loss_D, "field_score": score_F, "field_score_se": rng.uniform(0.01, 0.1, F),
            "bpb_ratio": rng.uniform(0.8, 1.2, F), "field_loss_ratio": rng.uniform(0.8, 1.2, F),
            "accuracy_delta": rng.uniform(-0.1, 0.1, F), "acc_norm_delta": rng.uniform(-0.1, 0.1, F)}
    return np.asarray(ev.feedback_vector(norm))


@pytest.mark.parametrize("space", [None, OTHER_SPACE], ids=["trained-space", "other-space"])
def test_mixtures_equal_cpt_agent_policy_and_the_agent_on_a_plain_layout(export_dir, space):
    names = tuple(space) if space else tuple(f"source_{i}" for i in range(4)) + ("math_4", "math_5")
    dom_fields = tuple(space.values()) if space else ("source",) * 4 + ("math",) * 2
    fields = ("source", "math")
    sizes = tuple(float(s) for s in np.random.default_rng(1).integers(100, 1000, len(names)))
    info = SpaceInfo(names, dom_fields, "math", sizes)
    w0_D = info.spread("source", "size")  # what `dma cpt` reads the pre-training mixture as
    loss_TxD, score_TxF = _feedback_run(names, fields, seed=2)

    # path 1: the public API, by name (the dicts in reverse order: names, not positions, must count)
    agent = MixingAgent.load(export_dir, num_steps=T, domains=space,
                             pretraining_mixture={d: float(w) for d, w in reversed(list(zip(names, w0_D)))})
    assert agent.domains == names and agent.fields == fields and agent.num_steps == T and agent.step == 0
    api = [agent.initial_mixture()]
    for t in range(T - 1):
        fb = Feedback(dict(reversed(list(zip(names, loss_TxD[t].tolist())))),
                      dict(reversed(list(zip(fields, score_TxF[t].tolist())))))
        api.append(agent.next_mixture(fb))
    assert agent.step == T and all(list(w) == list(names) for w in api)
    api_TxD = np.array([[w[d] for d in names] for w in api])

    # path 2: `dma cpt`'s policy on `dma cpt`'s feedback vectors (the base model's: losses and scores exactly 1,
    # test_evaluation.test_base_model_scores_one_with_a_computed_se)
    rng = np.random.default_rng(3)
    policy = make_policy("agent-sft", info, agent_dirs={"agent-sft": export_dir})
    history = PolicyInput([], [_cpt_vector(np.ones(len(names)), np.ones(2), rng)], T)
    for t in range(T):
        history.weights.append(np.asarray(policy(history), np.float64))
        if t < T - 1:
            history.feedback.append(_cpt_vector(loss_TxD[t], score_TxF[t], rng))
    np.testing.assert_allclose(api_TxD, np.array(history.weights), rtol=1e-6, atol=1e-7)

    # path 3: the loaded agent on a plain layout (losses then scores, no other entries), history built by hand
    meta = {"fields": list(fields), "target_field": "math", "domain_fields": list(dom_fields),
            "domain_loss_index": list(range(len(names))), "field_score_index": [len(names), len(names) + 1],
            "initial_weights": w0_D.tolist()}
    loaded = load_exported_agent(export_dir)
    fb_TxM = np.concatenate([np.concatenate([np.ones((1, len(names))), loss_TxD]),
                             np.concatenate([np.ones((1, 2)), score_TxF])], axis=1).astype(np.float32)
    for t in range(T):
        want_D = loaded.act(History(api_TxD[:t], fb_TxM[:t + 1], FeedbackLayout.from_meta(meta), T))
        np.testing.assert_allclose(api_TxD[t], want_D, rtol=1e-6, atol=1e-7)
    assert np.isfinite(api_TxD).all() and (api_TxD >= 0).all()
    np.testing.assert_allclose(api_TxD.sum(1), 1.0, atol=1e-6)


def test_the_feedback_reaches_the_agent_by_domain_name(export_dir):
    """Swapping two source domains' losses swaps their next weights (the agent is permutation-equivariant and
    both had the same history), and changes the mixture: the comparisons above are not vacuous."""
    agent = MixingAgent.load(export_dir)
    losses = {d: 0.9 for d in agent.domains} | {"source_0": 0.7, "source_1": 1.05}
    scores = {"source": 1.0, "math": 1.1}
    agent.initial_mixture()
    w = agent.next_mixture(Feedback(losses, scores))
    agent.initial_mixture()  # a new run
    swapped = agent.next_mixture(Feedback(losses | {"source_0": 1.05, "source_1": 0.7}, scores))
    assert abs(w["source_0"] - w["source_1"]) > 1e-3
    assert swapped["source_0"] == pytest.approx(w["source_1"], rel=1e-5)
    assert swapped["source_1"] == pytest.approx(w["source_0"], rel=1e-5)


def _one_line_error(fn, match):
    with pytest.raises(DmaError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_bad_inputs_give_one_line_errors(export_dir, tmp_path):
    old = tmp_path / "old_export"
    shutil.copytree(export_dir, old)
    spec = json.loads((old / "agent_spec.json").read_text())
    (old / "agent_spec.json").write_text(json.dumps(dict(spec, feature_version=2)))
    _one_line_error(lambda: MixingAgent.load(old), r"agent_spec.json: feature_version is 2, this version understands 3")
    _one_line_error(lambda: MixingAgent.load(tmp_path), r"agent_spec.json: missing")
    _one_line_error(lambda: MixingAgent.load(export_dir, domains={"web": "source"}),
                    r"domains: need domains of field 'source' and of the target field 'math'")
    _one_line_error(lambda: MixingAgent.load(export_dir, target_field="code"), r"target field 'code'")
    _one_line_error(lambda: MixingAgent.load(export_dir, num_steps=0), r"num_steps must be a whole number >= 1")
    _one_line_error(lambda: MixingAgent.load(export_dir, pretraining_mixture={"source_0": 1.0}),
                    r"pretraining_mixture: missing math_4, math_5, source_1, source_2, source_3 \(")
    _one_line_error(lambda: Feedback({"a": float("nan")}, {}), r"Feedback.domain_losses\['a'\] is nan")
    _one_line_error(lambda: Feedback({"a": 1.0}, {"math": "high"}), r"Feedback.field_scores\['math'\] = 'high'")
    _one_line_error(lambda: Feedback({"a": -0.5}, {}), r"must be positive")

    agent = MixingAgent.load(export_dir, num_steps=2)
    losses, scores = {d: 0.9 for d in agent.domains}, {"source": 1.0, "math": 1.1}
    _one_line_error(lambda: agent.next_mixture(Feedback(losses, scores)), r"call initial_mixture\(\) first")
    agent.initial_mixture()
    wrong = {d: v for d, v in losses.items() if d != "math_5"} | {"code_0": 0.9}
    _one_line_error(lambda: agent.next_mixture(Feedback(wrong, scores)),
                    r"Feedback.domain_losses: missing math_5; unknown code_0 \(this agent's: source_0, ")
    _one_line_error(lambda: agent.next_mixture(Feedback(losses, {"math": 1.1})),
                    r"Feedback.field_scores: missing source \(")
    assert agent.step == 1  # a refused feedback changes nothing: the run goes on as if it never came
    w = agent.next_mixture(Feedback(losses, scores))
    fresh = MixingAgent.load(export_dir, num_steps=2)
    fresh.initial_mixture()
    assert w == fresh.next_mixture(Feedback(losses, scores))
    _one_line_error(lambda: agent.next_mixture(Feedback(losses, scores)), r"all 2 mixtures of this run were given")


def _serve(export_dir, *args):
    return subprocess.Popen([sys.executable, "-m", "dma_jax.api", "serve", "--agent", str(export_dir), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_agent_process_speaks_json_lines_and_matches_the_in_process_agent(export_dir, tmp_path):
    losses = [{d: 0.95 - 0.05 * i - 0.01 * k for k, d in enumerate(OTHER_SPACE)} for i in range(2)]
    scores = [{"source": 1.0 - 0.01 * i, "math": 1.05 + 0.03 * i} for i in range(2)]
    requests = [{"op": "initial"}, {"op": "next", "domain_losses": losses[0]},  # no field_scores: refused
                {"op": "next", "domain_losses": losses[0], "field_scores": scores[0]}, "not json",
                {"op": "next", "domain_losses": losses[1], "field_scores": scores[1]},
                {"op": "next", "domain_losses": losses[1], "field_scores": scores[1]}]  # beyond the last step
    proc = _serve(export_dir, "--num-steps", "3", "--domains", json.dumps(OTHER_SPACE), "--target-field", "math")
    out, err = proc.communicate("\n".join(r if isinstance(r, str) else json.dumps(r) for r in requests) + "\n",
                                timeout=300)
    assert proc.returncode == 0, err
    hello, *answers = [json.loads(line) for line in out.splitlines()]  # stdout: protocol lines only
    assert hello == {"domains": list(OTHER_SPACE), "domain_fields": OTHER_SPACE, "fields": ["source", "math"],
                     "target_field": "math", "num_steps": 3}
    assert [sorted(a) for a in answers] == [["mixture", "step"], ["error"], ["mixture", "step"], ["error"],
                                            ["mixture", "step"], ["error"]]
    assert "field_scores must be a mapping" in answers[1]["error"]
    assert "not valid JSON" in answers[3]["error"] and "all 3 mixtures" in answers[5]["error"]
    agent = MixingAgent.load(export_dir, num_steps=3, domains=OTHER_SPACE)
    want = [agent.initial_mixture()] + [agent.next_mixture(Feedback(losses[i], scores[i])) for i in range(2)]
    assert [a["step"] for a in answers[::2]] == [0, 1, 2]
    for a, w in zip(answers[::2], want):
        assert list(a["mixture"]) == list(OTHER_SPACE)
        np.testing.assert_allclose(list(a["mixture"].values()), list(w.values()), rtol=1e-6, atol=1e-7)

    proc = _serve(tmp_path)  # not an export: the error is the first line, exit status 2
    out, err = proc.communicate("", timeout=300)
    assert proc.returncode == 2 and json.loads(out) == {"error": f"{tmp_path}/agent_spec.json: missing (not an "
                                                        "exported agent, or the export did not finish)"}
