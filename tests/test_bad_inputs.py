"""Bad-input suite: every file dma reads and every CLI argument, broken in every way we could think of.

Each case breaks one input of a copy of a small, finished run (prepared data, base
models, trajectories, sweep, SFT agent and its export, a Hugging Face checkpoint, user
text/JSONL/ArrayRecord inputs), runs one `dma` command in-process and checks:
- the exit code is non-zero;
- stderr is exactly one line, `dma: error: ...`, naming the thing and what is wrong
  (the expected fragments of each case), with no traceback;
- every file that existed before the command has the same bytes and mtime after it.
Two subprocesses check that `--debug` shows the traceback and that without it none appears.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from dma_jax.cli import main
from tests.bad_input_world import (build_world, ckpt_files, corrupt_ckpt, edit_json, edit_yaml, empty,
                                   first_shard, garble, nan_checkpoint, put, rewrite_npz, truncate, write_ar)


# ------------------------------------------------------------------------------------------ the cases


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]  # fragments of the one error line (the thing named, what is wrong)
    mutate: Callable[[Path], None] | None = None  # breaks an input in the case's copy of the world


def C(id, argv, expect, mutate=None) -> Case:  # noqa: N802
    return Case(id, tuple(argv.split()) if isinstance(argv, str) else tuple(argv),
                (expect,) if isinstance(expect, str) else tuple(expect), mutate)


SAMPLE = "sample --config cfg.yaml"
SWEEP = "sweep --config cfg.yaml"
SFT = "train-agent --config cfg.yaml --stage sft"
CPT_AGENT = "cpt --config cfg.yaml --policy agent-sft --seed 0"
IMPORT = "import target --config cfg.yaml --hf-dir hf"
UPREP = "prepare --config user.yaml"
MANIFEST = "run/data/manifest.json"
TRAJ = "run/sweep/trajectories.npz"
OFFLINE = "run/sweep/offline"
EXPORT = "run/agent/export-sft"
PROXY_CKPT = "run/pretrain-proxy/checkpoints"


def _p(rel: str) -> Callable[[Path], Path]:
    return lambda root: root / rel


def _on(rel: str, fn) -> Callable[[Path], None]:
    return lambda root: fn(root / rel)


def _rm(rel: str) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        p = root / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return go


def _renorm(w):
    return w / w.sum(-1, keepdims=True)


def _set_cfg(**changes) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        def fn(c):
            for dotted, v in changes.items():
                sec, key = dotted.split("__")
                c[sec][key] = v
        edit_yaml(root / "cfg.yaml", fn)
    return go


def _write(rel: str, text: str | bytes) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        put(p, text if isinstance(text, bytes) else text.encode())
    return go


def _traj_edit(fn) -> Callable[[Path], None]:
    return lambda root: rewrite_npz(root / TRAJ, fn)


def _offline_edit(fn) -> Callable[[Path], None]:
    return lambda root: rewrite_npz(root / OFFLINE / "data.npz", fn, fix_sha=root / OFFLINE / "meta.json")


def _hf_weights_edit(fn) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        import safetensors.numpy

        path = root / "hf" / "model.safetensors"
        tensors = safetensors.numpy.load_file(str(path))
        fn(tensors)
        put(path, safetensors.numpy.save(tensors))
    return go


def _nan_first(tensors: dict) -> None:
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.nan


def _wrong_shape_first(tensors: dict) -> None:
    name = sorted(tensors)[0]
    tensors[name] = tensors[name][:-1]


CASES = [
    # --- configs (YAML) and overrides
    C("config-missing", "sample --config nope.yaml", ("nope.yaml", "config file not found")),
    C("config-is-a-directory", "sample --config run", ("run", "a folder, not a config file")),
    C("config-duplicate-key", SAMPLE, ("cfg.yaml", "duplicate key 'run'"), _on("cfg.yaml", lambda p: put(p,
        p.read_text() + "\nrun: {seed: 1}\n"))),
    C("config-variant-not-a-mapping", SAMPLE + " --variant tiny", ("cfg.yaml", "variant 'tiny'", "mapping"),
      _on("cfg.yaml", lambda p: put(p, p.read_text() + "\nvariants: {tiny: 5}\n"))),
    C("config-empty", SAMPLE, ("cfg.yaml", "empty"), _on("cfg.yaml", empty)),
    C("config-truncated", SAMPLE, ("cfg.yaml", "not valid YAML"), _on("cfg.yaml", lambda p: put(p,
        p.read_text()[:60] + "\n  [unclosed: {"))),
    C("config-corrupted-bytes", SAMPLE, ("cfg.yaml", "not valid YAML"), _on("cfg.yaml", garble)),
    C("config-top-level-list", SAMPLE, ("cfg.yaml", "expected a mapping"), _write("cfg.yaml", "- a\n- b\n")),
    C("config-wrong-type", SAMPLE, ("cfg.yaml", "proxy.d_model", "abc"), _set_cfg(proxy__d_model="abc")),
    C("config-out-of-range", SAMPLE, ("cfg.yaml", "sweep.num_trajectories"), _set_cfg(sweep__num_trajectories=0)),
    C("config-nan", SAMPLE, ("cfg.yaml", "optim.lr", "finite"), _set_cfg(optim__lr=float("nan"))),
    C("config-unknown-key", SAMPLE, ("cfg.yaml", "unknown key", "proxy.depth"), _set_cfg(proxy__depth=3)),
    C("config-unknown-variant", SAMPLE + " --variant huge", ("cfg.yaml", "no variant 'huge'")),
    C("config-record-len-mismatch", SAMPLE, ("manifest.json", "record_len"), _set_cfg(data__record_len=17, sweep__seq_len=16)),
    C("override-inf", SAMPLE + " optim.lr=.inf", ("optim.lr", "finite")),
    C("override-no-equals", SAMPLE + " pretrain.steps", ("pretrain.steps", "expected key.sub=value")),
    C("override-unknown-key", SAMPLE + " proxy.depth=3", ("unknown key 'proxy.depth'",)),
    C("override-bad-yaml", SAMPLE + " proxy.d_model=[1", ("proxy.d_model=[1", "not valid YAML")),
    C("override-wrong-type", SAMPLE + " sweep.num_stages=two", ("sweep.num_stages", "two")),
    C("override-boolean-for-a-number", SAMPLE + " optim.lr=true", ("optim", "lr=true", "boolean")),
    C("override-empty-cpt-seeds", "cpt --config cfg.yaml cpt.seeds=[]", ("cpt.seeds", "nothing to run")),
    C("override-headroom-ramp-out-of-range", "headroom --config cfg.yaml headroom.high_low=[5,-1]",
      ("headroom.high_low", "[0, 1]")),
    C("override-headroom-no-seeds", "headroom --config cfg.yaml --on target headroom.seeds=[]",
      ("headroom", "seeds is empty")),
    # --- CLI arguments
    C("cli-unknown-command", "frobnicate", ("invalid choice", "frobnicate")),
    C("cli-seed-not-int", "cpt --config cfg.yaml --seed abc", ("--seed", "abc")),
    C("cli-seed-negative", "cpt --config cfg.yaml --policy fixed-0.3 --seed -1", ("--seed", "-1")),
    C("cli-model-unknown", "pretrain --config cfg.yaml --model giant", ("--model", "giant")),
    C("cli-stage-unknown", "train-agent --config cfg.yaml --stage rl", ("--stage", "rl")),
    C("cli-pretrain-no-config", "pretrain", ("--config is required",)),
    C("cli-policy-unknown", "cpt --config cfg.yaml --policy magic", ("unknown policy 'magic'",)),
    C("cli-policy-fixed-out-of-range", "cpt --config cfg.yaml --policy fixed-1.5", ("fixed-1.5", "[0, 1]")),
    C("cli-bench-n-zero", "bench --config cfg.yaml --n 0", ("--n", "0")),
    C("cli-bench-budget-nan", "bench --config cfg.yaml --memory-budget-gb nan", ("--memory-budget-gb", "nan")),
    C("cli-bench-budget-negative", "bench --config cfg.yaml --memory-budget-gb -2", ("--memory-budget-gb", "-2")),
    C("cli-export-no-cpt-run", "export target --config cfg.yaml --policy nope", ("nope", "no CPT checkpoint")),
    C("cli-export-seed-negative", "export schedule --config cfg.yaml --policy fixed-0.3 --seed -1", ("--seed", "-1")),
    C("base-unfinished", "cpt --config cfg.yaml --policy fixed-0.3 --seed 0 pretrain.steps=100",
      ("pretrain-target", "at step", "did not finish")),
    C("import-over-a-base", IMPORT, ("pretrain-target", "already holds a base target")),
    C("sample-over-a-finished-sweep", SAMPLE + " sweep.num_trajectories=3", ("trajectories.npz", "a sweep has run")),
    C("cli-import-hf-dir-missing", "import target --config cfg.yaml --hf-dir nowhere", ("nowhere", "not found")),
    # --- the data manifest
    C("manifest-missing", SAMPLE, ("manifest.json", "no manifest"), _rm(MANIFEST)),
    C("manifest-empty", SAMPLE, ("manifest.json", "not valid JSON"), _on(MANIFEST, empty)),
    C("manifest-truncated", SAMPLE, ("manifest.json", "not valid JSON"), _on(MANIFEST, truncate)),
    C("manifest-corrupted-bytes", SAMPLE, ("manifest.json", "not valid JSON"), _on(MANIFEST, garble)),
    C("manifest-wrong-type", SAMPLE, ("manifest.json", "'domains' must be a non-empty list"),
      _on(MANIFEST, lambda p: edit_json(p, lambda m: m.update(domains="all")))),
    C("manifest-nan-tokens", SAMPLE, ("manifest.json", "tokens"),
      _on(MANIFEST, lambda p: edit_json(p, lambda m: m["domains"][0]["train"].update(tokens=float("nan"))))),
    # --- prepared ArrayRecord shards (read by the sweep's token pools)
    C("shard-missing", SWEEP, ("array_record", "not found"), lambda r: first_shard(r / "run/data").unlink()),
    C("shard-empty", SWEEP, ("array_record", "no readable records"), lambda r: empty(first_shard(r / "run/data"))),
    C("shard-truncated", SWEEP, ("array_record",), lambda r: truncate(first_shard(r / "run/data"))),
    C("shard-corrupted-bytes", SWEEP, ("array_record",), lambda r: garble(first_shard(r / "run/data"))),
    # --- trajectories.npz
    C("trajectories-empty", SWEEP, ("trajectories.npz", "not a trajectories file"), _on(TRAJ, empty)),
    C("trajectories-truncated", SWEEP, ("trajectories.npz", "not a trajectories file"), _on(TRAJ, truncate)),
    C("trajectories-corrupted-bytes", SWEEP, ("trajectories.npz", "not a trajectories file"), _on(TRAJ, garble)),
    C("trajectories-wrong-shape", SWEEP, ("trajectories.npz", "shape"),
      _traj_edit(lambda a: a.update(weights_NxTxD=a["weights_NxTxD"][:2]))),
    C("trajectories-wrong-domains", SWEEP, ("trajectories.npz", "other domains"),
      _traj_edit(lambda a: a.update(weights_NxTxD=_renorm(a["weights_NxTxD"][..., 1:]),
                                    domain_names=a["domain_names"][1:], domain_fields=a["domain_fields"][1:]))),
    C("trajectories-nan", SWEEP, ("trajectories.npz", "finite"),
      _traj_edit(lambda a: a["weights_NxTxD"].__setitem__((0, 0, 0), np.nan))),
    C("trajectories-wrong-type", SWEEP, ("trajectories.npz", "not a trajectories file"),
      _traj_edit(lambda a: a.update(weights_NxTxD=np.array(["a", "b"])))),
    # --- the offline dataset
    C("offline-missing", SFT, ("meta.json", "missing"), _rm(OFFLINE)),
    C("offline-meta-corrupted", SFT, ("meta.json", "not valid JSON"), _on(OFFLINE + "/meta.json", garble)),
    C("offline-data-truncated", SFT, ("data.npz", "sha256"), _on(OFFLINE + "/data.npz", truncate)),
    C("offline-data-empty", SFT, ("data.npz", "sha256"), _on(OFFLINE + "/data.npz", empty)),
    C("offline-nan-rewards", SFT, ("offline", "rewards", "NaN"),
      _offline_edit(lambda a: a["rewards"].__setitem__((0, 0), np.nan))),
    C("offline-wrong-shape", SFT, ("offline", "rewards", "shape"),
      _offline_edit(lambda a: a.update(rewards=a["rewards"][:, :1]))),
    C("offline-wrong-dtype", SFT, ("offline", "actions", "float32"),
      _offline_edit(lambda a: a.update(actions=a["actions"].astype(np.float64)))),
    C("offline-wrong-domain-count", SFT, ("offline", "domain_names"),
      lambda r: edit_json(r / OFFLINE / "meta.json", lambda m: m.update(domain_names=m["domain_names"][1:]))),
    # --- checkpoints (the base proxy, read by the sweep)
    C("checkpoint-missing", SWEEP, ("checkpoints", "no base proxy checkpoint"), _rm(PROXY_CKPT)),
    C("checkpoint-truncated", SWEEP, ("checkpoints", "cannot restore"),
      lambda r: corrupt_ckpt(r / PROXY_CKPT, truncate)),
    C("checkpoint-corrupted-bytes", SWEEP, ("checkpoints", "cannot restore"),
      lambda r: corrupt_ckpt(r / PROXY_CKPT, garble)),
    C("checkpoint-meta-corrupted", SWEEP, ("checkpoints", "meta"),
      lambda r: [garble(p) for p in ckpt_files(r / PROXY_CKPT, "meta")]),
    C("checkpoint-other-model", SWEEP + " proxy.d_ff=80", ("differs in proxy.d_ff",)),
    C("checkpoint-nan", SWEEP, ("checkpoints", "NaN"), lambda r: nan_checkpoint(r / PROXY_CKPT)),
    # --- exported agents (read by `dma cpt --policy agent-*`)
    C("agent-spec-missing", CPT_AGENT, ("agent_spec.json", "missing"), _rm(EXPORT + "/agent_spec.json")),
    C("agent-spec-corrupted", CPT_AGENT, ("agent_spec.json", "not valid JSON"),
      _on(EXPORT + "/agent_spec.json", garble)),
    C("agent-spec-wrong-format", CPT_AGENT, ("agent_spec.json", "format"),
      _on(EXPORT + "/agent_spec.json", lambda p: edit_json(p, lambda s: s.update(format="dma-agent-v0")))),
    C("agent-spec-wrong-type", CPT_AGENT, ("agent_spec.json", "model"),
      _on(EXPORT + "/agent_spec.json", lambda p: edit_json(p, lambda s: s["model"].update(d_model="wide")))),
    C("agent-spec-wrong-shape", CPT_AGENT, ("agent_spec.json", "feature_stats"),
      _on(EXPORT + "/agent_spec.json", lambda p: edit_json(
          p, lambda s: s["feature_stats"].update(domain_mean=s["feature_stats"]["domain_mean"][:-1])))),
    C("agent-spec-nan-stats", CPT_AGENT, ("agent_spec.json", "feature_stats", "finite"),
      _on(EXPORT + "/agent_spec.json", lambda p: edit_json(
          p, lambda s: s["feature_stats"]["domain_std"].__setitem__(0, float("nan"))))),
    C("agent-checkpoint-missing", CPT_AGENT, ("export-sft/checkpoint", "no checkpoint"), _rm(EXPORT + "/checkpoint")),
    C("agent-checkpoint-truncated", CPT_AGENT, ("export-sft/checkpoint", "cannot restore"),
      lambda r: corrupt_ckpt(r / EXPORT / "checkpoint", truncate)),
    # --- Hugging Face checkpoints (dma import)
    C("hf-config-missing", IMPORT, ("config.json", "not found"), _rm("hf/config.json")),
    C("hf-config-empty", IMPORT, ("config.json", "not valid JSON"), _on("hf/config.json", empty)),
    C("hf-config-wrong-type", IMPORT, ("config.json", "hidden_size"),
      _on("hf/config.json", lambda p: edit_json(p, lambda c: c.update(hidden_size="big")))),
    C("hf-config-weights-disagree", IMPORT, ("model.safetensors", "shape", "expected"),
      _on("hf/config.json", lambda p: edit_json(p, lambda c: c.update(intermediate_size=2 * c["intermediate_size"])))),
    C("hf-other-model-than-config", IMPORT + " target.d_ff=96", ("hf", "target.d_ff=128")),
    C("hf-weights-missing", IMPORT, ("hf", "no model.safetensors"), _rm("hf/model.safetensors")),
    C("hf-weights-truncated", IMPORT, ("model.safetensors", "safetensors"), _on("hf/model.safetensors", truncate)),
    C("hf-weights-corrupted-bytes", IMPORT, ("model.safetensors", "safetensors"),
      _on("hf/model.safetensors", garble)),
    C("hf-weights-wrong-shape", IMPORT, ("model.safetensors", "shape"), _hf_weights_edit(_wrong_shape_first)),
    C("hf-weights-nan", IMPORT, ("model.safetensors", "NaN"), _hf_weights_edit(_nan_first)),
    C("hf-pickle-only", IMPORT, ("hf", "pytorch_model*.bin", "pickle"),
      lambda r: (_rm("hf/model.safetensors")(r), _write("hf/pytorch_model.bin", b"\x80\x02pickle")(r))),
    # --- user inputs for dma prepare: text, JSONL, ArrayRecord, benchmark JSONL
    C("text-missing", UPREP, ("in/prose/*.txt", "matches no"), lambda r: shutil.rmtree(r / "in/prose")),
    C("text-empty", UPREP, ("prose", "fewer than 2 non-empty documents"),
      lambda r: [empty(p) for p in (r / "in/prose").glob("*.txt")]),
    C("text-corrupted-bytes", UPREP, ("in/prose/3.txt", "UTF-8"), _on("in/prose/3.txt", garble)),
    C("jsonl-missing", UPREP, ("in/sums.jsonl", "not found"), _rm("in/sums.jsonl")),
    C("jsonl-truncated", UPREP, ("sums.jsonl", "malformed JSON"), _on("in/sums.jsonl", lambda p: put(p,
        p.read_text()[:-20]))),
    C("jsonl-corrupted-bytes", UPREP, ("sums.jsonl",), _on("in/sums.jsonl", garble)),
    C("jsonl-wrong-type", UPREP, ("sums.jsonl", "'text'", "int"), _write("in/sums.jsonl", '{"text": 5}\n')),
    C("jsonl-not-an-object", UPREP, ("sums.jsonl", "expected a JSON object"), _write("in/sums.jsonl", "[1, 2]\n")),
    C("array-record-input-empty", UPREP, ("notes.ar", "no readable records"), _on("in/notes.ar", empty)),
    C("array-record-input-truncated", UPREP, ("notes.ar",), _on("in/notes.ar", truncate)),
    C("array-record-input-not-utf8", UPREP, ("notes.ar", "UTF-8"),
      _on("in/notes.ar", lambda p: write_ar(p, [b"\xff\xfe" * 40, b"ok"]))),
    C("benchmark-missing", UPREP, ("bench.jsonl", "cannot read"), _rm("in/bench.jsonl")),
    C("benchmark-truncated", UPREP, ("bench.jsonl", "invalid JSON"), _on("in/bench.jsonl", lambda p: put(p,
        p.read_text()[:-10]))),
    C("benchmark-corrupted-bytes", UPREP, ("bench.jsonl",), _on("in/bench.jsonl", garble)),
    C("benchmark-wrong-type", UPREP, ("bench.jsonl:1", "'choices'"),
      _write("in/bench.jsonl", '{"context": "a", "choices": "b", "gold": 0, "domain": "d"}\n')),
    C("benchmark-gold-out-of-range", UPREP, ("bench.jsonl:1", "'gold'", "out of range"),
      _write("in/bench.jsonl", '{"context": "a", "choices": ["b", "c"], "gold": 2, "domain": "d"}\n')),
    C("benchmark-nan-gold", UPREP, ("bench.jsonl:1", "'gold'"),
      _write("in/bench.jsonl", '{"context": "a", "choices": ["b", "c"], "gold": NaN, "domain": "d"}\n')),
    C("tokenizer-file-missing", UPREP + " data.tokenizer.kind=sentencepiece data.tokenizer.path=no.model",
      ("no.model",)),
]


# ------------------------------------------------------------------------------------------ the test


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, built: Path, tmp_path: Path, monkeypatch, capsys):
    root = tmp_path / "w"
    shutil.copytree(built, root, copy_function=os.link)  # cheap; mutations replace files (see bad_input_world.put)
    if case.mutate is not None:
        case.mutate(root)
    before = _snapshot(root)
    monkeypatch.chdir(root)
    try:
        rc = main(["--no-progress", *case.argv])
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    print(f"{case.id}: rc {rc}: {err.strip()}")  # the suite's messages, shown with -s
    assert rc not in (0, None), f"{case.id}: exit code {rc}, stderr {err!r}"
    assert len(lines) == 1, f"{case.id}: expected one line, got {err!r}"
    assert lines[0].startswith("dma: error: "), lines[0]
    assert "Traceback" not in err
    for fragment in case.expect:
        assert fragment in lines[0], f"{case.id}: {fragment!r} not in {lines[0]!r}"
    after = _snapshot(root)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"{case.id}: earlier outputs changed: {changed[:5]}"


def test_debug_shows_the_traceback_and_without_it_none_appears(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "dma_jax.cli", "sample", "--config", str(tmp_path / "nope.yaml")]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [f"dma: error: {tmp_path / 'nope.yaml'}: config file not found"]
    debug = subprocess.run([*cmd[:3], "--debug", *cmd[3:]], capture_output=True, text=True, env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DmaError" in debug.stderr


def test_a_failed_checkpoint_read_ends_in_one_line_at_exit_too(built, tmp_path):
    # In a real process, to its exit: Orbax's clean-up thread, started by every reader before, printed a traceback
    # at interpreter exit after the one-line error in some runs (a race; the deterministic check of its cause is
    # tests/test_checkpoint.py::test_a_reader_leaves_a_writers_temporary_folder_alone).
    root = tmp_path / "w"
    shutil.copytree(built, root, copy_function=os.link)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "dma_jax.cli", "--no-progress", "export", "target", "--config",
                          "cfg.yaml", "--policy", "nope"], capture_output=True, text=True, env=env, cwd=root)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and "Traceback" not in run.stderr
    assert run.stderr.startswith("dma: error: ") and "no CPT checkpoint" in run.stderr
    assert not (root / "run" / "cpt" / "nope").exists()
