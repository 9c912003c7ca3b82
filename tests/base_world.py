"""The prepared world the pipeline-level tests start from: the tiny demo data and the base proxy/target.

Made once per test session by the `prepared_world` fixture (tests/conftest.py), once for all pytest-xdist
workers; a test never writes into it: it links (or copies) the base models into its own `run.out_dir`
(`World.link_base` / `World.copy_base`) and reads the data from `World.data_dir`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from tests.paths import DEMO

# What the world is made with, on top of the tiny variant: the only settings its data and base models depend on
# (the data: data.*; the base models: the data, the model sections, optim, pretrain and run.seed). A test adds
# its own settings for later stages (sweep.*, cpt.*, mesh.*, ...), which leave the world as it is.
OVERRIDES = ("data.demo_fields=[source, math]", "pretrain.steps=2")
MODELS = ("proxy", "target")


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
