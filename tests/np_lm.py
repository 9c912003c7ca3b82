"""An independent numpy implementation of the LM's maths (LLaMA: RMSNorm, RoPE, SwiGLU, GQA).

Written from the LLaMA equations, not from dma_jax.models.lm: tests compare the two.
"""

import numpy as np


def rmsnorm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x, pos, theta):
    # x: [L, H, K]; rotate pairs (i, i + K/2) by angle pos * theta^(-2i/K).
    K = x.shape[-1]
    half = K // 2
    freqs = theta ** (-np.arange(half) * 2.0 / K)
    ang = pos[:, None] * freqs[None, :]  # [L, K/2]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(p, cfg, tokens, segments=None):
    """p: the pure params dict (numpy); tokens [B, L] -> logits [B, L, V]."""
    B, L = tokens.shape
    H, G = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    K = cfg.d_model // H
    out = np.zeros((B, L, cfg.vocab_size))
    for b in range(B):
        seg = np.zeros(L, int) if segments is None else np.asarray(segments[b])
        pos = np.zeros(L)
        for i in range(1, L):
            pos[i] = 0 if seg[i] != seg[i - 1] else pos[i - 1] + 1
        allowed = np.array([[j <= i and seg[j] == seg[i] for j in range(L)] for i in range(L)])
        x = p["embed_VxD"][tokens[b]].astype(np.float64)
        for blk in [p["blocks"][k] for k in sorted(p["blocks"])]:
            h = rmsnorm(x, blk["attn_norm"]["scale"], cfg.norm_eps)
            q = np.einsum("ld,dhk->lhk", h, blk["attn"]["wq_DxHxK"])
            k = np.einsum("ld,dgk->lgk", h, blk["attn"]["wk_DxGxK"])
            v = np.einsum("ld,dgk->lgk", h, blk["attn"]["wv_DxGxK"])
            q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
            heads = []
            for hh in range(H):
                g = hh // (H // G)
                s = q[:, hh, :] @ k[:, g, :].T / np.sqrt(K)
                s = np.where(allowed, s, -np.inf)
                s = np.exp(s - s.max(-1, keepdims=True))
                s /= s.sum(-1, keepdims=True)
                heads.append(s @ v[:, g, :])
            att = np.stack(heads, axis=1)  # [L, H, K]
            x = x + np.einsum("lhk,hkd->ld", att, blk["attn"]["wo_HxKxD"])
            h = rmsnorm(x, blk["mlp_norm"]["scale"], cfg.norm_eps)
            m = silu(h @ blk["mlp"]["w_gate_DxF"]) * (h @ blk["mlp"]["w_up_DxF"])
            x = x + m @ blk["mlp"]["w_down_FxD"]
        x = rmsnorm(x, p["final_norm"]["scale"], cfg.norm_eps)
        head = p["embed_VxD"].T if cfg.tie_embeddings else p["lm_head_DxV"]
        out[b] = x @ head
    return out
