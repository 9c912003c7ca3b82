"""Hugging Face LLaMA import/export: logits against a numpy forward written in HF layout.

The reference below works on the HF tensors themselves (nn.Linear y = x W^T,
rotate_half RoPE, repeat_kv), so it checks the weight mapping independently of
dma_jax.models.hf and of tests/np_lm.py.
"""

import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

from dma_jax.errors import DmaError
from dma_jax.models.hf import config_from_hf, export_hf, import_hf
from dma_jax.models.lm import LMDef

D, H, G, N_LAYERS, F, V = 32, 4, 2, 2, 48, 61
K = D // H


def llama_config(tied: bool = False, **extra) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D,
        "num_hidden_layers": N_LAYERS, "num_attention_heads": H, "num_key_value_heads": G,
        "intermediate_size": F, "vocab_size": V, "max_position_embeddings": 64, "rope_theta": 500.0,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": tied, "hidden_act": "silu", "rope_scaling": None,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    return {**cfg, **extra}


def random_hf_tensors(seed: int, tied: bool = False) -> dict[str, np.ndarray]:
    """Random weights under HF LlamaForCausalLM names and shapes ([out, in] linears)."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: rng.normal(0.0, 0.3, shape).astype(np.float32)  # noqa: E731
    norm = lambda: (1.0 + 0.2 * rng.normal(size=D)).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": norm()}
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        t |= {
            p + "self_attn.q_proj.weight": w(H * K, D), p + "self_attn.k_proj.weight": w(G * K, D),
            p + "self_attn.v_proj.weight": w(G * K, D), p + "self_attn.o_proj.weight": w(D, H * K),
            p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D),
            p + "mlp.down_proj.weight": w(D, F),
            p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
        }
    if not tied:
        t["lm_head.weight"] = w(V, D)
    return t


def write_checkpoint(path: Path, config: dict, tensors: dict[str, np.ndarray], shards: int = 1) -> Path:
    """Write config.json + model.safetensors, or `shards` files plus model.safetensors.index.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if shards == 1:
        safetensors.numpy.save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        safetensors.numpy.save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def hf_forward(config: dict, t: dict[str, np.ndarray], tokens_BxL: np.ndarray) -> np.ndarray:
    """LlamaForCausalLM's forward in float64 numpy, on HF-layout tensors."""
    t = {n: np.asarray(x, np.float64) for n, x in t.items()}
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    L = tokens_BxL.shape[1]
    linear = lambda x, name: x @ t[name].T  # noqa: E731  (nn.Linear without bias)

    def rmsnorm(x, name):
        return t[name] * (x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps))

    inv_freq = 1.0 / theta ** (np.arange(0, K, 2) / K)
    emb_LxK = np.concatenate([np.outer(np.arange(L), inv_freq)] * 2, axis=-1)
    cos, sin = np.cos(emb_LxK)[None, None], np.sin(emb_LxK)[None, None]
    rotate_half = lambda x: np.concatenate([-x[..., K // 2:], x[..., : K // 2]], -1)  # noqa: E731
    mask_LxL = np.tril(np.ones((L, L), bool))
    x = t["model.embed_tokens.weight"][tokens_BxL]  # [B, L, D]
    B = x.shape[0]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rmsnorm(x, p + "input_layernorm.weight")
        q = linear(h, p + "self_attn.q_proj.weight").reshape(B, L, H, K).transpose(0, 2, 1, 3)
        k = linear(h, p + "self_attn.k_proj.weight").reshape(B, L, G, K).transpose(0, 2, 1, 3)
        v = linear(h, p + "self_attn.v_proj.weight").reshape(B, L, G, K).transpose(0, 2, 1, 3)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, H // G, axis=1), np.repeat(v, H // G, axis=1)  # repeat_kv
        s = np.where(mask_LxL, q @ k.transpose(0, 1, 3, 2) / np.sqrt(K), -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        o = (a / a.sum(-1, keepdims=True)) @ v  # [B, H, L, K]
        x = x + linear(o.transpose(0, 2, 1, 3).reshape(B, L, H * K), p + "self_attn.o_proj.weight")
        h = rmsnorm(x, p + "post_attention_layernorm.weight")
        gate, up = linear(h, p + "mlp.gate_proj.weight"), linear(h, p + "mlp.up_proj.weight")
        x = x + linear(gate / (1 + np.exp(-gate)) * up, p + "mlp.down_proj.weight")
    x = rmsnorm(x, "model.norm.weight")
    head = "model.embed_tokens.weight" if config["tie_word_embeddings"] else "lm_head.weight"
    return linear(x, head)


TOKENS = np.random.default_rng(7).integers(0, V, (2, 9)).astype(np.int32)


def our_logits(cfg, params) -> np.ndarray:
    lm = LMDef.build(cfg)
    return np.asarray(jax.jit(lm.apply)(params, TOKENS))


def assert_one_line_error(fn, match: str):
    with pytest.raises(DmaError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_import_untied_matches_hf_layout_reference(tmp_path):
    config, tensors = llama_config(), random_hf_tensors(0)
    cfg, params = import_hf(write_checkpoint(tmp_path / "ckpt", config, tensors))
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.d_ff, cfg.vocab_size) == (D, N_LAYERS, H, G, F, V)
    assert (cfg.max_seq_len, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (64, 500.0, 1e-5, False)
    want = jax.tree.map(lambda a: (a.shape, a.dtype), LMDef.build(cfg).abstract_params)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == want
    ref = hf_forward(config, tensors, TOKENS)
    assert np.abs(ref).max() > 1.0  # the weights are not trivially small
    np.testing.assert_allclose(our_logits(cfg, params), ref, atol=1e-4, rtol=1e-4)


def test_import_tied_sharded_matches_reference(tmp_path):
    config, tensors = llama_config(tied=True), random_hf_tensors(1, tied=True)
    cfg, params = import_hf(write_checkpoint(tmp_path / "ckpt", config, tensors, shards=3))
    assert cfg.tie_embeddings and "lm_head_DxV" not in params
    np.testing.assert_allclose(our_logits(cfg, params), hf_forward(config, tensors, TOKENS), atol=1e-4, rtol=1e-4)


def test_import_bf16_and_tied_duplicate_head(tmp_path):
    """bf16 weights are upcast to float32; a tied checkpoint may still carry an identical lm_head."""
    config = llama_config(tied=True, torch_dtype="bfloat16")
    tensors = {n: x.astype(ml_dtypes.bfloat16) for n, x in random_hf_tensors(2, tied=True).items()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    tensors["model.rotary_emb.inv_freq"] = np.ones(K // 2, np.float32)  # ignored
    cfg, params = import_hf(write_checkpoint(tmp_path / "ckpt", config, tensors))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    ref = hf_forward(config, {n: x.astype(np.float32) for n, x in tensors.items()}, TOKENS)
    np.testing.assert_allclose(our_logits(cfg, params), ref, atol=1e-4, rtol=1e-4)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 2
    write_checkpoint(tmp_path / "ckpt", config, tensors)
    assert_one_line_error(lambda: import_hf(tmp_path / "ckpt"), "lm_head.weight differs")


@pytest.mark.parametrize("tied", [False, True])
def test_export_writes_hf_layout_and_round_trips_bitwise(tmp_path, tied):
    config, tensors = llama_config(tied=tied), random_hf_tensors(3, tied=tied)
    cfg, params = import_hf(write_checkpoint(tmp_path / "ckpt", config, tensors))
    export_hf(cfg, params, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["architectures"], written["model_type"], written["torch_dtype"]) == (
        ["LlamaForCausalLM"], "llama", "float32")
    assert {k: written[k] for k in config} == config
    with safe_open(tmp_path / "out" / "model.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        exported = {n: f.get_tensor(n) for n in f.keys()}
    assert sorted(exported) == sorted(tensors)  # HF names; no lm_head when tied
    for n, x in tensors.items():
        assert exported[n].dtype == np.float32 and np.array_equal(exported[n], x), n
    cfg2, params2 = import_hf(tmp_path / "out")
    assert cfg2 == cfg
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_export_of_our_init_runs_under_hf_reference(tmp_path):
    """Params born in our layout (not imported) export to tensors the HF forward reads correctly."""
    cfg, _ = import_hf(write_checkpoint(tmp_path / "ckpt", llama_config(), random_hf_tensors(4)))
    params = LMDef.build(cfg.model_copy(update={"init_std": 0.3})).init(5)
    export_hf(cfg, params, tmp_path / "out")
    exported = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    np.testing.assert_allclose(our_logits(cfg, params), hf_forward(config, exported, TOKENS), atol=1e-4, rtol=1e-4)
    assert_one_line_error(lambda: export_hf(cfg.model_copy(update={"d_ff": 50}), params, tmp_path / "o2"),
                          r"w_down_FxD has shape \[48, 32\], expected \[50, 32\]")


def test_matches_transformers_llama(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, tensors = llama_config(), random_hf_tensors(6)
    ckpt = write_checkpoint(tmp_path / "ckpt", config, tensors)
    cfg, params = import_hf(ckpt)
    ours = our_logits(cfg, params)
    export_hf(cfg, params, tmp_path / "out")
    for path in (ckpt, tmp_path / "out"):
        model = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_checkpoint_errors(tmp_path):
    tensors = random_hf_tensors(0)
    write_checkpoint(tmp_path / "no_config", llama_config(), tensors).joinpath("config.json").unlink()
    assert_one_line_error(lambda: import_hf(tmp_path / "no_config"), r"config\.json: not found")

    missing = {n: x for n, x in tensors.items() if n != "model.layers.1.self_attn.k_proj.weight"}
    write_checkpoint(tmp_path / "missing", llama_config(), missing)
    assert_one_line_error(lambda: import_hf(tmp_path / "missing"),
                          r"model\.layers\.1\.self_attn\.k_proj\.weight is missing \(expected shape \[16, 32\]\)")

    wrong = tensors | {"model.layers.0.self_attn.o_proj.weight": np.zeros((D, H * K + 1), np.float32)}
    write_checkpoint(tmp_path / "wrong", llama_config(), wrong)
    assert_one_line_error(lambda: import_hf(tmp_path / "wrong"),
                          r"o_proj\.weight has shape \[32, 33\], expected \[32, 32\]")

    extra = tensors | {"model.layers.0.self_attn.q_proj.bias": np.zeros(H * K, np.float32)}
    write_checkpoint(tmp_path / "extra", llama_config(), extra)
    assert_one_line_error(lambda: import_hf(tmp_path / "extra"), r"unexpected tensor model\.layers\.0\.self_attn")

    untied_no_head = {n: x for n, x in tensors.items() if n != "lm_head.weight"}
    write_checkpoint(tmp_path / "nohead", llama_config(), untied_no_head)
    assert_one_line_error(lambda: import_hf(tmp_path / "nohead"), r"tensor lm_head\.weight is missing")

    pt = tmp_path / "pt"
    pt.mkdir()
    (pt / "config.json").write_text(json.dumps(llama_config()))
    (pt / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    assert_one_line_error(lambda: import_hf(pt), r"pytorch_model\*\.bin.*pickle.*safetensors")

    write_checkpoint(tmp_path / "scaled", llama_config(rope_scaling={"rope_type": "linear", "factor": 2.0}), tensors)
    assert_one_line_error(lambda: import_hf(tmp_path / "scaled"), r"config\.json: rope_scaling=.*linear")


@pytest.mark.parametrize("extra, match", [
    ({"rope_scaling": {"type": "dynamic", "factor": 4.0}}, "rope_scaling="),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope_parameters="),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "qwen2"}, "model_type='qwen2'"),
    ({"model_type": "mistral", "sliding_window": 16}, "sliding_window=16"),
    ({"head_dim": 16}, "head_dim=16"),
    ({"num_key_value_heads": 3}, "n_kv_heads|num_attention_heads"),
    ({"hidden_size": None}, "missing required field hidden_size"),
    ({"vocab_size": -1}, "vocab_size=-1"),
])
def test_config_refusals(extra, match):
    assert_one_line_error(lambda: config_from_hf(llama_config(**extra), "x/config.json"), match)


def test_config_accepts_compatible_variants():
    cfg = config_from_hf(llama_config(model_type="mistral", sliding_window=None, head_dim=K,
                                      rope_scaling={"rope_type": "default"}), "c")
    assert (cfg.head_dim, cfg.kv_heads) == (K, G)
    plain = {k: v for k, v in llama_config().items() if k not in ("num_key_value_heads", "rope_theta",
                                                                 "rms_norm_eps", "tie_word_embeddings")}
    cfg = config_from_hf(plain, "c")  # LlamaConfig defaults
    assert (cfg.kv_heads, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (H, 10000.0, 1e-6, False)
    v5 = {k: v for k, v in llama_config().items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 123.0}
    assert config_from_hf(v5, "c").rope_theta == 123.0
