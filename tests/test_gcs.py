"""`run.out_dir` and domain inputs on `gs://`, against a fake GCS (tests/fake_gcs.py: a local folder
that refuses appends, reached through etils.epath and Orbax exactly as a real bucket would be).

The pipeline test runs sample -> sweep -> cpt -> report once with a local `run.out_dir` (the session's run,
tests/conftest.py `local_pipeline`) and once with `gs://bkt/run`, each in a fresh process, and compares every
output file byte for byte (CPT histories but for wall-clock timings): the gs:// code path is checked against
the local one, not against itself.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dma_jax.config import load_config
from dma_jax.data import sources
from dma_jax.errors import DmaError
from dma_jax.io_utils import JsonlLog, atomic_write_json, read_json_file, read_jsonl, upath
from tests import fake_gcs
from tests.base_world import PIPELINE_OVERRIDES, World, cli_env, output_files
from tests.paths import DEMO, REPO

# The gs:// run: the pipeline of tests/base_world.py (sample, sweep, cpt regmix, report) and the stages only the
# gs:// run exercises, each twice (the second run finds it done).
GCS_DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[4])  # the repository: tests/ is a package
from tests import fake_gcs
from tests.base_world import PIPELINE_STAGES
from dma_jax.cli import main
config, over, gcs_root = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
cfg = ["--config", config, "--variant", "tiny", *over]
commands = [list(s) for s in PIPELINE_STAGES]
commands += [["train-agent", "--stage", "sft"], ["cpt", "--policy", "agent-sft", "--seed", "0"],
             ["export", "target", "--policy", "agent-sft", "--seed", "0"]] * 2
with fake_gcs.install(gcs_root):
    for cmd in commands:
        rc = main(["--no-progress", *cmd, *cfg])
        if rc:
            sys.exit(rc)
"""


def _run_on_gcs(world: World, gcs_root: Path, cwd: Path) -> subprocess.CompletedProcess:
    """GCS_DRIVER on one device with run.out_dir=gs://bkt/run (the fake bucket under `gcs_root`)."""
    over = world.run_overrides("gs://bkt/run", *PIPELINE_OVERRIDES)
    r = subprocess.run([sys.executable, "-c", GCS_DRIVER, str(DEMO), json.dumps(over), str(gcs_root), str(REPO)],
                       env=cli_env(1), cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_pipeline_on_gcs_equals_local(prepared_world, local_pipeline, tmp_path):
    local = local_pipeline.out  # the session's run of the same pipeline on one device, in a local folder
    bucket = prepared_world.copy_base(tmp_path / "gcs" / "bkt" / "run")  # objects, no links
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = _run_on_gcs(prepared_world, tmp_path / "gcs", cwd)
    assert "gs://bkt/run/report/report.md" in r.stdout
    assert fake_gcs.stray_local_paths(cwd) == []  # nothing took gs://... for a local path

    on_gcs, on_disk = output_files(bucket), local_pipeline.files()
    agent_cpt = {"cpt/agent-sft/seed0/history.json", "cpt/agent-sft/seed0/records.jsonl"}
    assert "sweep/offline/data.npz" in on_disk and set(on_gcs) == set(on_disk) | agent_cpt
    for name, data in on_disk.items():
        other = on_gcs[name]
        if name.endswith((".json", ".md")):  # meta.json and report.md name the run folder
            other = other.replace(b"gs://bkt/run", str(local).encode())
        if name.endswith("history.json"):  # wall-clock timings are the one thing allowed to differ
            a, b = json.loads(data), json.loads(other)
            assert a.pop("timings") and b.pop("timings")
            assert a == b, name
        else:
            assert data == other, f"{name}: the gs:// run wrote other bytes than the local run"

    # The stages only the gs:// run had: their outputs are there, and the second pass found them done.
    spec = json.loads((bucket / "agent" / "export-sft" / "agent_spec.json").read_text())
    assert spec and (bucket / "agent" / "export-sft" / "checkpoint").is_dir()
    steps = [r["step"] for r in read_jsonl(bucket / "agent" / "sft" / "metrics.jsonl")]
    assert steps and len(steps) == len(set(steps))  # the second pass logged nothing twice
    hist = json.loads((bucket / "cpt" / "agent-sft" / "seed0" / "history.json").read_text())
    assert np.isfinite(hist["balanced"]).all()
    assert (bucket / "export" / "target-agent-sft-seed0" / "hf").is_dir()
    assert r.stdout.count("train-agent sft:") == 2 and r.stdout.count("export: target model") == 2


@pytest.fixture
def gcs(tmp_path):
    with fake_gcs.install(tmp_path / "gcs") as root:
        yield root


def test_jsonl_log_on_gcs_writes_what_a_local_log_writes(gcs, tmp_path):
    remote = gcs / "bkt" / "run" / "m.jsonl"
    logs = [JsonlLog(tmp_path / "local" / "m.jsonl"), JsonlLog("gs://bkt/run/m.jsonl", flush_every_s=float("inf"))]
    for log in logs:
        for step in (1, 2, 3):
            log.append({"step": step, "loss": 1.0 / step})
    assert not remote.exists()  # buffered: a GCS object is rewritten whole, not per line
    for log in logs:
        log.flush()  # what the stages do before a checkpoint save
        log.truncate_after(2)  # a resume from the step-2 checkpoint
        log.append({"step": 3, "loss": 0.25})
        log.flush()
    local = (tmp_path / "local" / "m.jsonl").read_bytes()
    assert remote.read_bytes() == local and [r["step"] for r in read_jsonl("gs://bkt/run/m.jsonl")] == [1, 2, 3]
    again = JsonlLog("gs://bkt/run/m.jsonl", flush_every_s=0)  # a new process picks the object up; writes at once
    again.append({"step": 4})
    assert [r["step"] for r in read_jsonl("gs://bkt/run/m.jsonl")] == [1, 2, 3, 4]
    with pytest.raises(PermissionError):  # the fake really refuses appends: the log did not use them
        upath("gs://bkt/run/m.jsonl").open("a")


def test_json_and_paths_on_gcs(gcs):
    atomic_write_json("gs://bkt/a/b.json", {"x": 1})
    assert json.loads((gcs / "bkt" / "a" / "b.json").read_text()) == {"x": 1}
    assert read_json_file("gs://bkt/a/b.json", "missing") == {"x": 1}
    with pytest.raises(DmaError, match=r"^gs://bkt/a/nope.json: missing$"):
        read_json_file("gs://bkt/a/nope.json", "missing")
    assert str(upath("gs://bkt/a") / "b.json") == "gs://bkt/a/b.json"


def test_domain_inputs_on_gcs_read_like_local_files(gcs, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    local = tmp_path / "corpus"
    (local / "txt").mkdir(parents=True)
    for i in range(3):
        (local / "txt" / f"doc{i}.txt").write_text(f"document {i} \u00e9")
    (local / "d.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    w = ArrayRecordWriter(str(local / "d.array_record"), "group_size:1")
    for doc in ("alpha", "beta", "gamma"):
        w.write(doc.encode())
    w.close()
    shutil.copytree(local, gcs / "bkt" / "corpus")
    for read in (lambda root: list(sources.iter_text_files([f"{root}/txt/*.txt"])),
                 lambda root: list(sources.iter_jsonl(f"{root}/d.jsonl")),
                 lambda root: list(sources.iter_array_record_texts([f"{root}/*.array_record"]))):
        assert read("gs://bkt/corpus") == read(str(local)) and read(str(local))
    assert sources.expand_patterns(["gs://bkt/corpus/txt/doc1.txt", "gs://bkt/corpus/txt/*.txt"]) == [
        f"gs://bkt/corpus/txt/doc{i}.txt" for i in (1, 0, 2)]
    with pytest.raises(DmaError, match=r"^gs://bkt/corpus/\*\.parquet: pattern matches no file$"):
        sources.expand_patterns(["gs://bkt/corpus/*.parquet"])
    with pytest.raises(DmaError, match=r"^gs://bkt/nope.txt: file not found$"):
        sources.expand_patterns(["gs://bkt/nope.txt"])


def test_gs_paths_without_gcsfs_are_a_clear_error():
    with pytest.raises(DmaError, match=r'run\.out_dir=gs://bkt/run: gs:// paths need an extra package .*"\.\[gcs\]"'):
        load_config(DEMO, ["run.out_dir=gs://bkt/run"], variant="tiny")  # (gcsfs is not a test dependency)


def test_data_dir_stays_local(gcs):
    cfg = load_config(DEMO, ["run.out_dir=gs://bkt/run", "run.name=r1"], variant="tiny")
    assert cfg.data_dir == "runs/r1/data"
    with pytest.raises(DmaError, match=r"data\.dir=gs://bkt/data: the prepared shards must be on a local disk"):
        load_config(DEMO, ["data.dir=gs://bkt/data"], variant="tiny")


def test_study_says_it_runs_locally(gcs):
    from dma_jax.study import run_study

    with pytest.raises(DmaError, match=r"^run\.out_dir=gs://bkt/s: the study runs in a local folder"):
        run_study(None, ["run.out_dir=gs://bkt/s"], None, quick=True, progress=False)
