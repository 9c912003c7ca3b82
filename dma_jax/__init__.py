"""dma_jax: the Data Mixing Agent (arXiv 2507.15640) in JAX / Flax NNX."""

from dma_jax.config import Config, load_config
from dma_jax.errors import DmaError

__version__ = "0.1.0"
__all__ = ["Config", "DmaError", "load_config", "__version__"]
