"""The agent's networks (Flax NNX): a causal Transformer over re-weighting steps, an actor and twin critics.

Encoder: each domain's features go through a shared MLP (a per-domain embedding);
the embeddings are pooled over domains (mean and max) and joined with the global
features into one token per step; a causal Transformer (no position embedding:
progress t/T is a feature, so any horizon works) turns tokens 0..t into a context
for step t. Nothing is sized by D, so the same parameters run on any number of
domains, and permuting the domains permutes the output.

Actor: a logit per domain from (its embedding, the context), softmax -> mean m;
a concentration kappa in `concentration_range` from the context; the policy is
Dirichlet(1 + kappa * D * m) (alpha > 1: bounded density, finite log-density).

Critics: twin Q heads on one critic encoder. A head pools per-domain value
vectors weighted by features of each domain's action weight and maps the pools
and the context to Q (see `TwinQ`). The actor has its own encoder: the critic loss
never moves the policy's representation, and SFT trains the actor alone.

Shapes: B batch, L steps (tokens), D domains, F / G domain / global features,
H d_model, N heads, K head dim, A sampled actions per state, E = 2 twin critics.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dma_jax.config import AgentModelConfig
from dma_jax.agent.features import DOMAIN_FEATURES, GLOBAL_FEATURES

Params = dict
# LeCun-uniform weights, zero biases; `AgentDef.init` draws the same distributions on the host.
_KERNEL_INIT = nnx.initializers.lecun_uniform()


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, kernel_init=_KERNEL_INIT, rngs=rngs)


class Mlp(nnx.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, rngs: nnx.Rngs):
        self.fc1 = _linear(d_in, d_hidden, rngs)
        self.fc2 = _linear(d_hidden, d_out, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: AgentModelConfig, rngs: nnx.Rngs):
        self.n_heads = cfg.n_heads
        self.qkv = _linear(cfg.d_model, 3 * cfg.d_model, rngs)
        self.out = _linear(cfg.d_model, cfg.d_model, rngs)

    def __call__(self, x_BxLxH: jax.Array) -> jax.Array:
        B, L, H = x_BxLxH.shape
        N = self.n_heads
        qkv_BxLx3xNxK = self.qkv(x_BxLxH).reshape(B, L, 3, N, H // N)
        q_BxLxNxK, k_BxLxNxK, v_BxLxNxK = (qkv_BxLx3xNxK[:, :, i] for i in range(3))
        logits_BxNxLxL = jnp.einsum("blnk,bmnk->bnlm", q_BxLxNxK, k_BxLxNxK) / math.sqrt(H // N)
        causal_LxL = jnp.tril(jnp.ones((L, L), bool))
        logits_BxNxLxL = jnp.where(causal_LxL[None, None], logits_BxNxLxL, jnp.finfo(jnp.float32).min)
        probs_BxNxLxL = jax.nn.softmax(logits_BxNxLxL, axis=-1)
        out_BxLxNxK = jnp.einsum("bnlm,bmnk->blnk", probs_BxNxLxL, v_BxLxNxK)
        return self.out(out_BxLxNxK.reshape(B, L, H))


class Block(nnx.Module):
    def __init__(self, cfg: AgentModelConfig, rngs: nnx.Rngs):
        self.attn_norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.attn = CausalSelfAttention(cfg, rngs)
        self.mlp_norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.mlp = Mlp(cfg.d_model, cfg.d_ff, cfg.d_model, rngs)

    def __call__(self, x_BxLxH: jax.Array) -> jax.Array:
        x_BxLxH = x_BxLxH + self.attn(self.attn_norm(x_BxLxH))
        return x_BxLxH + self.mlp(self.mlp_norm(x_BxLxH))


class HistoryEncoder(nnx.Module):
    """(domain features [B, L, D, F], global features [B, L, G]) -> (context [B, L, H], embeddings [B, L, D, H])."""

    def __init__(self, cfg: AgentModelConfig, rngs: nnx.Rngs):
        H = cfg.d_model
        self.domain_embed = Mlp(len(DOMAIN_FEATURES), H, H, rngs)
        self.token_in = Mlp(2 * H + len(GLOBAL_FEATURES), H, H, rngs)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.norm = nnx.LayerNorm(H, rngs=rngs)

    def __call__(self, dom_BxLxDxF: jax.Array, glob_BxLxG: jax.Array) -> tuple[jax.Array, jax.Array]:
        emb_BxLxDxH = self.domain_embed(dom_BxLxDxF)
        pooled_BxLxP = jnp.concatenate([emb_BxLxDxH.mean(2), emb_BxLxDxH.max(2), glob_BxLxG], axis=-1)
        x_BxLxH = self.token_in(pooled_BxLxP)
        for block in self.blocks:
            x_BxLxH = block(x_BxLxH)
        return self.norm(x_BxLxH), emb_BxLxDxH


def _with_context(emb_xDxH: jax.Array, ctx_xH: jax.Array) -> jax.Array:
    """Concatenate the context onto every domain's embedding: [..., D, 2H]."""
    return jnp.concatenate([emb_xDxH, jnp.broadcast_to(ctx_xH[..., None, :], emb_xDxH.shape)], axis=-1)


class Actor(nnx.Module):
    """History features -> Dirichlet concentrations alpha [B, L, D] of the next mixture at every step."""

    def __init__(self, cfg: AgentModelConfig, rngs: nnx.Rngs):
        H = cfg.d_model
        self.encoder = HistoryEncoder(cfg, rngs)
        self.logit_head = Mlp(2 * H, H, 1, rngs)
        self.concentration_head = Mlp(H, H, 1, rngs)
        self.log_kappa_range = tuple(math.log(c) for c in cfg.concentration_range)

    def __call__(self, dom_BxLxDxF: jax.Array, glob_BxLxG: jax.Array) -> jax.Array:
        ctx_BxLxH, emb_BxLxDxH = self.encoder(dom_BxLxDxF, glob_BxLxG)
        D = emb_BxLxDxH.shape[2]
        mean_BxLxD = jax.nn.softmax(self.logit_head(_with_context(emb_BxLxDxH, ctx_BxLxH))[..., 0], axis=-1)
        lo, hi = self.log_kappa_range
        log_kappa_BxLx1 = lo + (hi - lo) * jax.nn.sigmoid(self.concentration_head(ctx_BxLxH))
        return 1.0 + jnp.exp(log_kappa_BxLx1) * D * mean_BxLxD


def _stacked(rngs: nnx.Rngs, shape: tuple[int, ...]) -> nnx.Param:
    """Weights [E, fan_in, fan_out] of E independent layers, LeCun-uniform per layer."""
    init = nnx.initializers.lecun_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    return nnx.Param(init(rngs.params(), shape, jnp.float32))


class TwinQ(nnx.Module):
    """Two independent Q heads, stacked on a leading axis E = 2: Q(context, action) [E, A, B, L].

    Each domain gets value vectors v_jd from its embedding and the context; the action
    enters through J = 3 features of each weight, f(a_d) = (a_d, log(D a_d + 0.01) / D,
    (D a_d)^2 / D), pooled as sum_d f_j(a_d) v_jd (averages of the vectors, nothing sized
    by D); an MLP maps the pools and the context to Q. Pooling contracts D directly, so
    no [A, B, L, D, H] tensor is built: cheap enough for 3n sampled actions per state.
    C = 2H: embedding + context.
    """

    n_features = 3

    def __init__(self, cfg: AgentModelConfig, rngs: nnx.Rngs):
        H, E, J = cfg.d_model, 2, self.n_features
        self.w_value_ExCxJH = _stacked(rngs, (E, 2 * H, J * H))
        self.b_value_ExJH = nnx.Param(jnp.zeros((E, J * H), jnp.float32))
        self.w_pooled_ExJHxH = _stacked(rngs, (E, J * H, H))
        self.w_context_ExHxH = _stacked(rngs, (E, H, H))
        self.b_hidden_ExH = nnx.Param(jnp.zeros((E, H), jnp.float32))
        self.w_out_ExHx1 = _stacked(rngs, (E, H, 1))
        self.b_out_E = nnx.Param(jnp.zeros((E,), jnp.float32))

    def __call__(self, ctx_BxLxH: jax.Array, emb_BxLxDxH: jax.Array, actions_AxBxLxD: jax.Array) -> jax.Array:
        A, D = actions_AxBxLxD.shape[0], actions_AxBxLxD.shape[-1]
        B, L, H = ctx_BxLxH.shape
        E, J = self.b_out_E.shape[0], self.n_features
        state_BxLxDxC = _with_context(emb_BxLxDxH, ctx_BxLxH)
        value_ExBxLxDxJH = (jnp.einsum("bldc,ecv->ebldv", state_BxLxDxC, self.w_value_ExCxJH[...])
                            + self.b_value_ExJH[...][:, None, None, None, :])
        value_ExBxLxDxJxH = value_ExBxLxDxJH.reshape(E, B, L, D, J, H)
        scaled_AxBxLxD = D * actions_AxBxLxD
        f_AxBxLxDxJ = jnp.stack([actions_AxBxLxD, jnp.log(scaled_AxBxLxD + 1e-2) / D, scaled_AxBxLxD**2 / D], axis=-1)
        pooled_ExAxBxLxJxH = jnp.einsum("abldj,ebldjh->eabljh", f_AxBxLxDxJ, value_ExBxLxDxJxH)
        from_pool_ExAxBxLxH = jnp.einsum("eablv,evh->eablh", pooled_ExAxBxLxJxH.reshape(E, A, B, L, J * H),
                                         self.w_pooled_ExJHxH[...])
        from_ctx_ExBxLxH = jnp.einsum("blc,ech->eblh", ctx_BxLxH, self.w_context_ExHxH[...])  # once per state
        hidden_ExAxBxLxH = jax.nn.gelu(from_pool_ExAxBxLxH + from_ctx_ExBxLxH[:, None]
                                       + self.b_hidden_ExH[...][:, None, None, None, :])
        q_ExAxBxL = jnp.einsum("eablh,eho->eablo", hidden_ExAxBxLxH, self.w_out_ExHx1[...])[..., 0]
        return q_ExAxBxL + self.b_out_E[...][:, None, None, None]


class Critic(nnx.Module):
    """Twin critics sharing one history encoder."""

    def __init__(self, cfg: AgentModelConfig, rngs: nnx.Rngs):
        self.encoder = HistoryEncoder(cfg, rngs)
        self.twin_q = TwinQ(cfg, rngs)

    def encode(self, dom_BxLxDxF: jax.Array, glob_BxLxG: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encoder(dom_BxLxDxF, glob_BxLxG)

    def q(self, ctx_BxLxH: jax.Array, emb_BxLxDxH: jax.Array, actions_AxBxLxD: jax.Array) -> jax.Array:
        """Both critics' Q: [2, A, B, L]."""
        return self.twin_q(ctx_BxLxH, emb_BxLxDxH, actions_AxBxLxD)


def _host_init(abstract: Params, rng: np.random.Generator) -> Params:
    """LeCun-uniform weights, zero biases, unit norm scales (the modules' initializers), as float32 numpy arrays."""

    def draw(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(x.shape, np.float32)
        if name == "bias" or name.startswith("b_"):
            return np.zeros(x.shape, np.float32)
        if name == "kernel" or name.startswith("w_"):
            limit = math.sqrt(3.0 / x.shape[-2])
            return rng.uniform(-limit, limit, size=x.shape).astype(np.float32)
        raise ValueError(f"no init rule for parameter {jax.tree_util.keystr(path)}")

    return jax.tree_util.tree_map_with_path(draw, abstract)


@dataclasses.dataclass(frozen=True)
class AgentDef:
    """Graphs of the actor and critic; every method is a pure function of parameter pytrees (jit-friendly)."""

    cfg: AgentModelConfig
    actor_graph: Any
    critic_graph: Any
    abstract_actor: Params  # ShapeDtypeStruct leaves
    abstract_critic: Params

    @classmethod
    def build(cls, cfg: AgentModelConfig) -> AgentDef:
        actor_graph, actor = nnx.split(nnx.eval_shape(lambda: Actor(cfg, nnx.Rngs(0))), nnx.Param)
        critic_graph, critic = nnx.split(nnx.eval_shape(lambda: Critic(cfg, nnx.Rngs(0))), nnx.Param)
        return cls(cfg, actor_graph, critic_graph, nnx.to_pure_dict(actor), nnx.to_pure_dict(critic))

    def init(self, seed: int) -> tuple[Params, Params]:
        """Fresh (actor, critic) parameters as host arrays, drawn with the modules' own init rules.

        Why numpy: XLA on CPU compiles every random op of a jitted init separately
        (about 13 s for this small model on 2 cores); these draws cost milliseconds.
        """
        return (_host_init(self.abstract_actor, np.random.default_rng([seed, 0])),
                _host_init(self.abstract_critic, np.random.default_rng([seed, 1])))

    def concentrations(self, actor: Params, dom_BxLxDxF: jax.Array, glob_BxLxG: jax.Array) -> jax.Array:
        return nnx.merge(self.actor_graph, actor)(dom_BxLxDxF, glob_BxLxG)

    def encode(self, critic: Params, dom_BxLxDxF: jax.Array, glob_BxLxG: jax.Array) -> tuple[jax.Array, jax.Array]:
        return nnx.merge(self.critic_graph, critic).encode(dom_BxLxDxF, glob_BxLxG)

    def q(self, critic: Params, ctx_BxLxH: jax.Array, emb_BxLxDxH: jax.Array, actions_AxBxLxD: jax.Array):
        return nnx.merge(self.critic_graph, critic).q(ctx_BxLxH, emb_BxLxDxH, actions_AxBxLxD)
