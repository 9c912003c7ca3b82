"""HF parity without transformers: a checkpoint the real LlamaForCausalLM saved, and its own logits.

tests/fixtures/hf_tiny_llama/ was written by tests/fixtures/make_hf_fixture.py with torch + transformers
(VERSIONS.json says which): save_pretrained's config.json + model.safetensors of a tiny random LLaMA with
GQA and an untied head, and the float32 logits transformers computed for tokens.npy. Here we import it,
compare logits, export it back and compare the files, and run `dma import target` on it.
"""

import json
import math

import jax
import numpy as np
import pytest
from safetensors import safe_open

from dma_jax.cli import main
from dma_jax.config import load_config
from dma_jax.models.hf import export_hf, import_hf
from dma_jax.models.lm import LMDef
from dma_jax.runs import RunDir
from dma_jax.train import load_base_params
from tests import test_hf
from tests.paths import DEMO, TESTS

FIXTURE = TESTS / "fixtures" / "hf_tiny_llama"
# config.json fields that define the network (the rest: token ids, use_cache, versions, ...).
ARCH_FIELDS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings",
               "rms_norm_eps", "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias")
TOL = 1e-4  # max abs logit difference (logits reach ~6)


def read_safetensors(path) -> tuple[dict, dict[str, np.ndarray]]:
    with safe_open(path, framework="numpy") as f:
        return f.metadata(), {n: f.get_tensor(n) for n in f.keys()}


def rope(config: dict) -> tuple[float, str]:
    """(theta, type) whether the config has transformers<5 `rope_theta`/`rope_scaling` or v5 `rope_parameters`."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta", params.get("rope_theta"))
    return float(theta), params.get("rope_type", params.get("type", "default"))


def logits_of(cfg, params, tokens_BxL) -> np.ndarray:
    return np.asarray(jax.jit(LMDef.build(cfg).apply)(params, tokens_BxL))


@pytest.fixture(scope="module")
def fixture():
    config = json.loads((FIXTURE / "config.json").read_text())
    metadata, tensors = read_safetensors(FIXTURE / "model.safetensors")
    return config, metadata, tensors, np.load(FIXTURE / "tokens.npy"), np.load(FIXTURE / "logits.npy")


def test_fixture_is_a_tiny_gqa_untied_llama(fixture):
    config, metadata, tensors, tokens_BxL, logits_BxLxV = fixture
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["num_key_value_heads"] < config["num_attention_heads"] and not config["tie_word_embeddings"]
    assert metadata == {"format": "pt"}
    assert "lm_head.weight" in tensors and not np.array_equal(tensors["lm_head.weight"],
                                                              tensors["model.embed_tokens.weight"])
    assert tokens_BxL.shape == (2, 12) and tokens_BxL.dtype == np.int32
    assert logits_BxLxV.shape == (2, 12, config["vocab_size"]) and logits_BxLxV.dtype == np.float32
    assert np.abs(logits_BxLxV).max() > 1.0  # not trivially small weights
    versions = json.loads((FIXTURE / "VERSIONS.json").read_text())
    assert {"python", "torch", "transformers", "numpy", "command"} <= versions.keys()
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) < 300_000


def test_numpy_reference_of_test_hf_matches_transformers(fixture):
    """tests/test_hf.py's float64 numpy LlamaForCausalLM (its CI reference) agrees with the real one."""
    config, _, tensors, tokens_BxL, logits_BxLxV = fixture
    dims = (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"])
    assert dims == (test_hf.D, test_hf.H, test_hf.G)  # hf_forward reads its head counts from test_hf
    numpy_config = {**config, "rope_theta": rope(config)[0]}
    ref = test_hf.hf_forward(numpy_config, tensors, tokens_BxL)
    assert np.abs(ref - logits_BxLxV).max() < TOL


def test_import_matches_transformers_logits(fixture):
    config, _, _, tokens_BxL, logits_BxLxV = fixture
    cfg, params = import_hf(FIXTURE)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.d_ff, cfg.vocab_size) == (
        config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
        config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"])
    assert (cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (rope(config)[0], config["rms_norm_eps"], False)
    ours = logits_of(cfg, params, tokens_BxL)
    assert ours.dtype == np.float32
    err = np.abs(ours - logits_BxLxV).max()
    assert err < TOL, err
    # The tolerance tells RoPE conventions apart: q/k rows in the interleaved (Meta) order, which HF's
    # half-split (rotate_half) layout must not be read as, move the logits far past it.
    K = cfg.head_dim
    perm = np.arange(K).reshape(2, K // 2).T.reshape(-1)
    wrong = jax.tree.map(lambda x: x, params)
    for block in wrong["blocks"].values():
        block["attn"]["wq_DxHxK"] = block["attn"]["wq_DxHxK"][..., perm]
        block["attn"]["wk_DxGxK"] = block["attn"]["wk_DxGxK"][..., perm]
    assert np.abs(logits_of(cfg, wrong, tokens_BxL) - logits_BxLxV).max() > 100 * TOL


def test_export_is_byte_compatible_with_save_pretrained(fixture, tmp_path):
    config, metadata, tensors, _, _ = fixture
    cfg, params = import_hf(FIXTURE)
    export_hf(cfg, params, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    out_metadata, exported = read_safetensors(tmp_path / "out" / "model.safetensors")
    assert out_metadata == metadata
    assert sorted(exported) == sorted(tensors)
    for name, x in tensors.items():
        y = exported[name]
        assert (y.shape, y.dtype) == (x.shape, x.dtype), name
        assert y.tobytes() == x.tobytes(), name  # bit for bit
    # Both files come from safetensors' own serializer (header sorted by dtype then name), so the whole file
    # matches too; a failure here alone (tensors equal) would mean a safetensors header-format change.
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (FIXTURE / "model.safetensors").read_bytes()
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: written[k] for k in ARCH_FIELDS} == {k: config[k] for k in ARCH_FIELDS}
    assert rope(written) == rope(config) == (500.0, "default")
    dtype = lambda c: c.get("dtype", c.get("torch_dtype"))  # noqa: E731  (transformers 5 renamed it)
    assert dtype(written) == dtype(config) == "float32"
    assert import_hf(tmp_path / "out")[0] == cfg


def _target_overrides(config: dict) -> list[str]:
    return [f"target.vocab_size={config['vocab_size']}", f"target.d_model={config['hidden_size']}",
            f"target.n_layers={config['num_hidden_layers']}", f"target.n_heads={config['num_attention_heads']}",
            f"target.d_ff={config['intermediate_size']}",
            f"target.max_seq_len={config['max_position_embeddings']}", f"target.rope_theta={rope(config)[0]}",
            f"target.norm_eps={config['rms_norm_eps']}", "target.tie_embeddings=false"]


def test_cli_import_target(fixture, tmp_path, capsys):
    """`dma import target --hf-dir FIXTURE`: the base target checkpoint gives transformers' logits."""
    config, _, _, tokens_BxL, logits_BxLxV = fixture
    over = _target_overrides(config) + [f"run.out_dir={tmp_path / 'run'}"]
    argv = ["import", "target", "--hf-dir", str(FIXTURE), "--config", str(DEMO), "--variant", "tiny"]
    assert main(argv + over) == 2  # GQA not set in the config: refused, saying what to set
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"set target.n_kv_heads={config['num_key_value_heads']}" in err
    over.append(f"target.n_kv_heads={config['num_key_value_heads']}")
    assert main(argv + over) == 0
    assert "is now the base target model" in capsys.readouterr().out
    cfg = load_config(DEMO, over, "tiny")
    params = load_base_params(cfg, "target", RunDir(cfg).pretrain_checkpoints("target"))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    assert n_params == sum(math.prod(x.shape) for x in fixture[2].values())
    assert np.abs(logits_of(cfg.target, params, tokens_BxL) - logits_BxLxV).max() < TOL
