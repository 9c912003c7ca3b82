"""The Data Mixing Agent: features, networks, SFT warm-up, CQL, training runner and exported policies."""

from dma_jax.config import AgentConfig, AgentModelConfig, CqlConfig, SftConfig
from dma_jax.agent.features import FeedbackLayout, History
from dma_jax.agent.runner import LoadedAgent, export_agent, load_exported_agent, run_train_agent

__all__ = [
    "AgentConfig", "AgentModelConfig", "LoadedAgent", "CqlConfig", "FeedbackLayout", "History", "SftConfig",
    "export_agent", "load_exported_agent", "run_train_agent",
]
