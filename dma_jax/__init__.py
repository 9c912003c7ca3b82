"""dma_jax: the Data Mixing Agent (arXiv 2507.15640) in JAX / Flax NNX.

The public names: `MixingAgent` and `Feedback` (an exported agent in your own trainer, `dma_jax.api`), `Config`,
`load_config` and `DmaError`.
"""

from typing import TYPE_CHECKING

from dma_jax.config import Config, load_config
from dma_jax.errors import DmaError

if TYPE_CHECKING:
    from dma_jax.api import Feedback, MixingAgent

__version__ = "0.1.0"
__all__ = ["Config", "DmaError", "Feedback", "MixingAgent", "load_config", "__version__"]


def __getattr__(name: str):
    """`MixingAgent`, `Feedback`: imported on first use, so `import dma_jax` stays light and
    `python -m dma_jax.api serve` does not find its module imported already."""
    if name in ("Feedback", "MixingAgent"):
        from dma_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'dma_jax' has no attribute {name!r}")
