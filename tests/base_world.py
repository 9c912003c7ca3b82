"""The prepared world the pipeline-level tests start from: the tiny demo data and the base proxy/target; for
the tests that start later, a sweep of them; and one CLI run of the whole pipeline on them.

Made once per test session by the `prepared_world`, `swept_world` and `local_pipeline` fixtures of
tests/conftest.py, once for all pytest-xdist workers. A test never writes into the world: it links (or copies)
the base models and the sweep into its own `run.out_dir` (`World.link_base` / `World.copy_base` /
`World.link_sweep`) and reads the data from `World.data_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.paths import DEMO

# What the world is made with, on top of the tiny variant: the only settings its data and base models depend on
# (the data: data.*; the base models: the data, the model sections, optim, pretrain and run.seed). A test adds
# its own settings for later stages (sweep.*, cpt.*, mesh.*, ...), which leave the world as it is.
OVERRIDES = ("data.demo_fields=[source, math]", "pretrain.steps=2")
MODELS = ("proxy", "target")
# The world's sweep (`add_sweep`): the tiny variant's sweep settings, on every device, as `dma sweep` runs it.
SWEEP_OVERRIDES = ("mesh.data=1",)


@dataclasses.dataclass(frozen=True)
class World:
    """Prepared data under `data_dir`, pretrained base models under `base_dir/pretrain-{proxy,target}`."""

    overrides: tuple[str, ...]  # the config overrides (tiny variant) the world was made with
    data_dir: Path
    base_dir: Path  # the run.out_dir of the base models' `dma pretrain`

    def pretrain_dir(self, which: str) -> Path:
        return self.base_dir / f"pretrain-{which}"

    def run_overrides(self, out_dir, *extra: str) -> list[str]:
        """The world's overrides + its data dir + `run.out_dir=out_dir` + `extra`."""
        return [*self.overrides, f"data.dir={self.data_dir}", f"run.out_dir={out_dir}", *extra]

    def link_base(self, out: Path, which: tuple[str, ...] = MODELS) -> Path:
        """`out` (made if missing) with `pretrain-<which>` linked to the world's base models; returns `out`."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for w in which:
            (out / f"pretrain-{w}").symlink_to(self.pretrain_dir(w))
        return out

    @property
    def sweep_dir(self) -> Path:
        """The world's sweep (`add_sweep`, the `swept_world` fixture): trajectories, offline dataset."""
        return self.base_dir / "sweep"

    def link_sweep(self, out: Path) -> Path:
        """`out` (made if missing) with `sweep` linked to the world's sweep; returns `out`."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep").symlink_to(self.sweep_dir)
        return out

    def copy_base(self, out: Path, which: tuple[str, ...] = MODELS) -> Path:
        """As `link_base`, with copies (objects in a fake bucket, not links); returns `out`."""
        out = Path(out)
        for w in which:
            shutil.copytree(self.pretrain_dir(w), out / f"pretrain-{w}")
        return out


def world_at(root: Path, overrides: tuple[str, ...] = OVERRIDES) -> World:
    """The world `build_world(root, overrides)` makes (or made)."""
    return World(tuple(overrides), Path(root) / "data", Path(root) / "base")


def build_world(root: Path, overrides: tuple[str, ...] = OVERRIDES) -> World:
    """`<root>/data` prepared and `<root>/base/pretrain-{proxy,target}` trained (on one device)."""
    import jax

    from dma_jax.config import load_config
    from dma_jax.prepare import run_prepare
    from dma_jax.pretrain import run_pretrain

    world = world_at(root, overrides)
    cfg = load_config(DEMO, world.run_overrides(world.base_dir), variant="tiny")
    run_prepare(cfg, progress=False)
    for which in MODELS:
        run_pretrain(cfg, which, devices=jax.devices()[:1], progress=False)
    return world


def add_sweep(world: World) -> None:
    """`dma sweep` of the world's base proxy into `world.sweep_dir`, in-process (config: the world's overrides
    + SWEEP_OVERRIDES)."""
    from dma_jax.config import load_config
    from dma_jax.sweep import run_sweep

    run_sweep(load_config(DEMO, world.run_overrides(world.base_dir, *SWEEP_OVERRIDES), variant="tiny"), progress=False)


# ------------------------------------------------------------------------------------------ the CLI pipeline
# `dma sample`, `sweep`, `cpt --policy regmix` (which reads the sweep's offline dataset: the stages chain) and
# `report` on the world, each through the CLI in one fresh process: test_determinism runs it twice, test_gcs
# against gs://. The session's run on one device (the `local_pipeline` fixture, tests/conftest.py) serves both.
PIPELINE_OVERRIDES = ("cpt.batch_size=8", "mesh.data=-1", "agent.sft.steps=5")
PIPELINE_STAGES = (("sample",), ("sweep",), ("cpt", "--policy", "regmix", "--seed", "0"), ("report",))
OUTPUTS = ("sweep", "cpt", "report")  # the folders the pipeline writes (`output_files`)

_PIPELINE_DRIVER = """
import json, sys
from dma_jax.cli import main
config, over, stages = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
for stage in stages:
    rc = main(["--no-progress", stage[0], "--config", config, "--variant", "tiny", *over, *stage[1:]])
    if rc:
        sys.exit(rc)
"""


def cli_env(n_devices: int) -> dict[str, str]:
    """The environment of a `dma` subprocess on `n_devices` fake CPU devices (the tests' compilation cache)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
                DMA_JAX_CACHE=os.environ.get("DMA_TEST_JAX_CACHE", "/tmp/dma_jax_test_jax_cache"))


def run_pipeline(world: World, out: Path, n_devices: int) -> None:
    """PIPELINE_STAGES in one fresh process on `n_devices` fake CPU devices, in the run folder `out` (the world's
    base models linked in; config: the world's overrides + PIPELINE_OVERRIDES)."""
    over = world.run_overrides(out, *PIPELINE_OVERRIDES)
    r = subprocess.run([sys.executable, "-c", _PIPELINE_DRIVER, str(DEMO), json.dumps(over),
                        json.dumps(PIPELINE_STAGES)], env=cli_env(n_devices), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def output_files(out: Path) -> dict[str, bytes]:
    """Every file the pipeline wrote under `out` (OUTPUTS), but checkpoints and TensorBoard events (named and
    stamped with the wall clock: tb_log), by relative path, with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for sub in OUTPUTS for p in sorted((Path(out) / sub).rglob("*"))
            if p.is_file() and not {"checkpoints", "tb"} & set(p.relative_to(out).parts)}


@dataclasses.dataclass(frozen=True)
class PipelineRun:
    """A finished `run_pipeline` whose outputs were moved from its run folder `out` to `files_dir`."""

    out: Path  # the run folder (base models linked; no outputs: the same command can run there again)
    files_dir: Path

    def files(self) -> dict[str, bytes]:
        return output_files(self.files_dir)


def run_pipeline_once(world: World, root: Path, n_devices: int = 1) -> PipelineRun:
    """`run_pipeline` in `<root>/run`, its outputs then moved to `<root>/files`."""
    shutil.rmtree(root, ignore_errors=True)  # what a worker that failed half-way left
    run = PipelineRun(world.link_base(root / "run"), root / "files")
    run_pipeline(world, run.out, n_devices)
    run.files_dir.mkdir()
    for sub in OUTPUTS:
        shutil.move(run.out / sub, run.files_dir / sub)
    return run
