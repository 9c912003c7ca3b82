"""`dma eval`: lm-evaluation-harness (the `eval` extra) on our JAX LM, scored as the in-loop scorer scores."""

import json
import math
import os
import shutil
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import yaml

from dma_jax import eval_harness, evaluation
from dma_jax.checkpoint import Checkpointer
from dma_jax.cli import main
from dma_jax.config import load_config
from dma_jax.data.benchmarks import write_benchmarks_jsonl
from dma_jax.data.domains import DomainSpace
from dma_jax.errors import DmaError
from dma_jax.models import hf
from dma_jax.models.lm import LMDef
from dma_jax.runs import RunDir
from dma_jax.train import init_state, load_base_params, make_optimizer
from tests.paths import DEMO

FIT = "dma_fit"  # a local task: every item whose choices fit eval.max_len, all fields


@pytest.fixture(autouse=True)
def _test_xla_cache(monkeypatch):
    monkeypatch.setenv("DMA_JAX_CACHE", os.environ.get("DMA_TEST_JAX_CACHE", "/tmp/dma_jax_test_jax_cache"))


@pytest.fixture(scope="module")
def world(prepared_world, tmp_path_factory):
    """A run over a copy of the world's data (dma eval writes its task YAMLs there) with the base proxy linked;
    the in-loop scorer's log-likelihoods [I, C] of every item that fits, and that item set as a local task."""
    root = tmp_path_factory.mktemp("eval_harness")
    data = root / "data"
    shutil.copytree(prepared_world.data_dir, data)
    out = prepared_world.link_base(root / "run", ("proxy",))
    overrides = [*prepared_world.overrides, f"data.dir={data}", f"run.out_dir={out}"]
    cfg = load_config(DEMO, overrides, variant="tiny")
    space = DomainSpace.for_config(cfg)
    tok, L = space.tokenizer(), cfg.eval.max_len
    benches = {f: [it for it in space.benchmarks(f) if all(len(tok.encode(c)) <= L for c in it["choices"])]
               for f in space.fields}
    items = [it for f in space.fields for it in benches[f]]
    # The in-loop scorer's rows (as `evaluation.build_eval_set` lays them out) and its scoring (`_target_ll`)
    I, C = len(items), max(len(it["choices"]) for it in items)
    tokens_IxCxL1 = np.full((I, C, L + 1), tok.pad_id, np.int32)
    answer_IxCxL = np.zeros((I, C, L), np.float32)
    for i, it in enumerate(items):
        for c, choice in enumerate(it["choices"]):
            ids, n = evaluation._row(tok, it["context"], choice, L, "test")
            tokens_IxCxL1[i, c, : len(ids)] = ids
            answer_IxCxL[i, c, len(ids) - 1 - n: len(ids) - 1] = 1.0
    lm = LMDef.build(cfg.proxy)
    params = load_base_params(cfg, "proxy", RunDir(cfg).pretrain_checkpoints("proxy"))
    ll_IxC = np.asarray(evaluation._target_ll(lm, params, tokens_IxCxL1.reshape(I * C, L + 1), None,
                                              answer_IxCxL.reshape(I * C, L), 16)).reshape(I, C)
    tasks = root / "tasks"
    tasks.mkdir()
    write_benchmarks_jsonl(items, tasks / "fit.jsonl")
    (tasks / "fit.yaml").write_text(yaml.safe_dump(eval_harness.task_config(FIT, tasks / "fit.jsonl")))
    return {"cfg": cfg, "overrides": overrides, "items": items, "ll": ll_IxC, "tasks": tasks, "lm": lm,
            "params": params, "tok": tok, "math_items": space.benchmarks("math")}


def test_harness_loglikelihoods_equal_the_in_loop_scorer(world):
    items, tok, L = world["items"], world["tok"], world["cfg"].eval.max_len
    # Some rows are cut from the left (context + choice longer than max_len + 1 tokens with its eos).
    assert sum(1 + len(tok.encode(it["context"])) + len(tok.encode(c)) > L + 1
               for it in items for c in it["choices"]) >= 4
    lm_eval = eval_harness.import_lm_eval()
    scorer = eval_harness.JaxScorer(world["lm"], world["params"], tok, L, batch_size=5)  # several padded batches
    tm = lm_eval.tasks.TaskManager(include_path=str(world["tasks"]), include_defaults=False)
    res = lm_eval.simple_evaluate(model=eval_harness.harness_lm(scorer), tasks=[FIT], task_manager=tm,
                                  log_samples=True, bootstrap_iters=0)
    samples = res["samples"][FIT]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(items)))
    for s in samples:
        item = items[s["doc_id"]]
        # lm-eval's requests are exactly the (context, choice) pairs our scorer scores ...
        assert [tuple(a) for a in s["arguments"]] == [(item["context"], c) for c in item["choices"]]
        # ... and its log-likelihoods are the in-loop scorer's
        got = [float(r[0][0]) for r in s["resps"]]
        np.testing.assert_allclose(got, world["ll"][s["doc_id"], : len(got)], atol=1e-5, rtol=0)
    # The scorer alone: the same numbers, and a continuation longer than max_len is scored on its last max_len
    pairs = [(it["context"], c) for it in items[:3] for c in it["choices"]]
    lls = [ll for ll, _ in scorer.loglikelihood(pairs)]
    np.testing.assert_allclose(lls, world["ll"][:3].reshape(-1), atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="1 of 1 continuations are longer than max_len"):
        (ll, greedy), = scorer.loglikelihood([("x", " y" * L)])
    assert np.isfinite(ll) and ll < 0 and isinstance(greedy, bool)
    with pytest.raises(eval_harness.HarnessNotSupported, match="generate_until"):
        eval_harness.harness_lm(scorer).generate_until([])
    # Perplexity (loglikelihood_rolling): a text's windows of max_len targets, each after the max_len tokens before
    # its end, are exactly the (preceding text, chunk) pairs the pair scorer scores (byte tokens: 1 char = 1 token)
    text = "".join(ch for it in items for ch in it["context"] if ord(ch) < 128)[: 2 * L + 7]
    assert len(scorer.tokenizer.encode(text)) == len(text) == 2 * L + 7
    chunks = [(text[:a], text[a: a + L]) for a in range(0, len(text), L)]
    want = sum(ll for ll, _ in scorer.loglikelihood(chunks))
    short = text[: L // 2]
    got = eval_harness.harness_lm(scorer).loglikelihood_rolling(
        [SimpleNamespace(args=(text,)), SimpleNamespace(args=(short,)), SimpleNamespace(args=("",))])
    np.testing.assert_allclose(got, [want, scorer.loglikelihood([("", short)])[0][0], 0.0], rtol=1e-6, atol=1e-4)


def _acc(ll_IxC, items, norm=False):
    correct = []
    for i, it in enumerate(items):
        ll = ll_IxC[i, : len(it["choices"])]
        if norm:  # lm-eval's acc_norm: per character of the choice
            ll = ll / np.array([len(c) for c in it["choices"]], np.float64)
        correct.append(float(int(np.argmax(ll)) == it["gold"]))
    n = len(correct)
    mean = sum(correct) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in correct) / (n - 1)) / math.sqrt(n)


def test_dma_eval_end_to_end_writes_lm_eval_results(world, capsys):
    cfg = world["cfg"]
    rc = main(["eval", "--variant", "tiny", "--model", "proxy", "--tasks", FIT, "--tasks", "dma_math",
               "--include-path", str(world["tasks"]), *world["overrides"]])
    assert rc == 0
    path = RunDir(cfg).eval_results("base-proxy")
    res = json.loads(path.read_text())
    ll, items = world["ll"], world["items"]
    acc, stderr = _acc(ll, items)
    r = res["results"][FIT]
    assert r["acc,none"] == pytest.approx(acc, abs=1e-9) and r["acc_stderr,none"] == pytest.approx(stderr)
    assert r["acc_norm,none"] == pytest.approx(_acc(ll, items, norm=True)[0], abs=1e-9)
    assert res["n-samples"][FIT]["effective"] == len(items) and res["dma"]["what"] == "base-proxy"
    # dma_math comes from the prepared data (its YAML written there): the math items, all of which fit
    math_items = world["math_items"]
    start = next(i for i, it in enumerate(items) if it["domain"].startswith("math/"))
    assert items[start: start + len(math_items)] == math_items
    assert res["results"]["dma_math"]["acc,none"] == pytest.approx(_acc(ll[start: start + len(math_items)],
                                                                        math_items)[0], abs=1e-9)
    assert (RunDir(cfg).data / eval_harness.TASKS_DIR / "dma_math.yaml").is_file()
    out = capsys.readouterr().out
    assert f"eval: {FIT}: acc {acc:.4f} ± {stderr:.4f}" in out and f"results in {path}" in out


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("dma: error: ") and match in err, err


def test_unknown_task_missing_checkpoint_and_missing_extra_are_one_line_errors(world, capsys, monkeypatch, tmp_path):
    base = ["eval", "--variant", "tiny", *world["overrides"]]
    _one_line_error(capsys, [*base, "--model", "proxy", "--tasks", "no_such_task"], "unknown task no_such_task")
    _one_line_error(capsys, [*base, "--policy", "uniform", "--seed", "3"], "no CPT checkpoint")
    _one_line_error(capsys, [*base, "--model", "target"], "no base target checkpoint")
    _one_line_error(capsys, [*base, "--include-path", "/nonexistent/tasks"], "is not a folder")
    broken = tmp_path / "tasks"
    broken.mkdir()
    (broken / "b.yaml").write_text("task: broken\ndataset_path: [unclosed\n")
    (broken / "ok.yaml").write_text("task: fine\nprocess_docs: !function utils.process\n")  # lm-eval's own tag
    _one_line_error(capsys, [*base, "--model", "proxy", "--tasks", "broken", "--include-path", str(broken)],
                    f"not valid YAML, so skipped by lm-eval: {broken / 'b.yaml'}")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    eval_harness.import_lm_eval.cache_clear()
    try:
        _one_line_error(capsys, [*base, "--model", "proxy"], "pip install -e '.[eval]'")
    finally:
        eval_harness.import_lm_eval.cache_clear()
    with pytest.raises(DmaError, match="one of --model, --policy, --hf-dir"):
        eval_harness.load_model(world["cfg"], model="proxy", policy="uniform")


def test_dma_eval_scores_a_hugging_face_folder_and_a_cpt_run(world, tmp_path):
    cfg, local = world["cfg"], ["--tasks", FIT, "--include-path", str(world["tasks"])]
    # The base proxy written in the Hugging Face layout scores exactly as the base proxy does
    hf.export_hf(cfg.proxy, jax.tree.map(np.asarray, world["params"]), tmp_path / "proxy-hf")
    assert main(["eval", "--variant", "tiny", "--hf-dir", str(tmp_path / "proxy-hf"), *local,
                 *world["overrides"]]) == 0
    res = json.loads(RunDir(cfg).eval_results("hf-proxy-hf").read_text())
    assert res["results"][FIT]["acc,none"] == pytest.approx(_acc(world["ll"], world["items"])[0], abs=1e-9)
    # A CPT run's final checkpoint (here: a fresh target state saved where `dma cpt` saves it)
    lm = LMDef.build(cfg.target)
    steps = cfg.cpt.num_stages * cfg.cpt.steps_per_stage
    ck = Checkpointer(RunDir(cfg).cpt_checkpoints("fake", 1))
    ck.save(steps, init_state(lm, make_optimizer(cfg.optim, steps), 0))
    ck.close()
    assert main(["eval", "--variant", "tiny", "--policy", "fake", "--seed", "1", *local, *world["overrides"]]) == 0
    res = json.loads(RunDir(cfg).eval_results("cpt-fake-seed1").read_text())
    assert res["dma"]["what"] == "cpt-fake-seed1" and res["n-samples"][FIT]["effective"] == len(world["items"])
    assert 0.0 <= res["results"][FIT]["acc,none"] <= 1.0

