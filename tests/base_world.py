"""The prepared data and base proxy/target (tiny demo variant) that the pipeline-level tests start from."""

from pathlib import Path

import jax

from dma_jax.config import load_config
from dma_jax.prepare import run_prepare
from dma_jax.pretrain import run_pretrain

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def prepared_base(root: Path, over: list[str]) -> Path:
    """`<root>/data` prepared and `<root>/base/pretrain-{proxy,target}` trained (on one device); returns root."""
    cfg = load_config(DEMO, over + [f"data.dir={root}/data", f"run.out_dir={root}/base"], variant="tiny")
    run_prepare(cfg, progress=False)
    for which in ("proxy", "target"):
        run_pretrain(cfg, which, devices=jax.devices()[:1], progress=False)
    return root
