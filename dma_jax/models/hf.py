"""Bring your own model: Hugging Face LLaMA checkpoints (config.json + safetensors) <-> our LM.

`import_hf(dir)` reads a `LlamaForCausalLM` (or plain, sliding-window-free Mistral)
checkpoint: `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Weights are read with safetensors' numpy loader,
never pickle, and converted to float32. `export_hf` writes the same layout back.

Layout: an HF linear weight is [out, in] (y = x W^T); ours keeps the input axes
first and splits heads, e.g. q_proj [H*K, D] <-> wq_DxHxK, o_proj [D, H*K] <->
wo_HxKxD. Both use RoPE in the half-split (rotate_half) layout, so no permutation
of q/k rows is needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pydantic
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from dma_jax.config import ModelConfig
from dma_jax.errors import DmaError
from dma_jax.io_utils import atomic_write_bytes, atomic_write_json, read_json_file, upath
from dma_jax.models.lm import LMDef, Params

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Our block leaf (module, name) -> (HF suffix under model.layers.{i}., number of leading input axes).
# n_in=None: the tensor is copied as is; otherwise HF holds [prod(out axes), prod(in axes)].
_BLOCK_LEAVES = {
    ("attn", "wq_DxHxK"): ("self_attn.q_proj.weight", 1),
    ("attn", "wk_DxGxK"): ("self_attn.k_proj.weight", 1),
    ("attn", "wv_DxGxK"): ("self_attn.v_proj.weight", 1),
    ("attn", "wo_HxKxD"): ("self_attn.o_proj.weight", 2),
    ("mlp", "w_gate_DxF"): ("mlp.gate_proj.weight", 1),
    ("mlp", "w_up_DxF"): ("mlp.up_proj.weight", 1),
    ("mlp", "w_down_FxD"): ("mlp.down_proj.weight", 1),
    ("attn_norm", "scale"): ("input_layernorm.weight", None),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", None),
}
_TOP_LEAVES = {
    ("embed_VxD",): ("model.embed_tokens.weight", None),
    ("final_norm", "scale"): ("model.norm.weight", None),
    ("lm_head_DxV",): ("lm_head.weight", 1),
}
# Our ModelConfig field -> the HF config field it comes from (for error messages).
_HF_FIELD = {
    "vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "d_ff": "intermediate_size",
    "max_seq_len": "max_position_embeddings", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings", "init_std": "initializer_range",
}


def config_from_hf(hf_config: dict, where: str | Path = CONFIG_NAME) -> ModelConfig:
    """Map a LlamaConfig dict to our ModelConfig; refuse features our LM does not implement."""
    if not isinstance(hf_config, dict):
        raise DmaError(f"{where}: expected a JSON object, got {type(hf_config).__name__}")
    get = hf_config.get
    model_type = get("model_type")
    if model_type not in ("llama", "mistral"):
        raise DmaError(f"{where}: model_type={model_type!r} is not supported (only 'llama' and 'mistral')")
    refusals = (
        ("hidden_act", get("hidden_act", "silu") not in ("silu", "swish"), "only silu (SwiGLU) is supported"),
        ("attention_bias", bool(get("attention_bias", False)), "biases in attention are not supported"),
        ("mlp_bias", bool(get("mlp_bias", False)), "biases in the MLP are not supported"),
        ("sliding_window", _limits_attention(get("sliding_window"), get("max_position_embeddings", 2048)),
         "sliding-window attention is not supported"),
    )
    for field, bad, why in refusals:
        if bad:
            raise DmaError(f"{where}: {field}={get(field)!r}: {why}")
    rope_theta = get("rope_theta")
    for field in ("rope_scaling", "rope_parameters"):  # rope_parameters: newer transformers
        rope = get(field)
        if rope is None:
            continue
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) != "default":
            raise DmaError(f"{where}: {field}={json.dumps(rope)}: only unscaled (default) RoPE is supported")
        rope_theta = rope_theta if rope_theta is not None else rope.get("rope_theta")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if get(field) is None:
            raise DmaError(f"{where}: missing required field {field}")
    fields = {
        "vocab_size": get("vocab_size"),
        "d_model": get("hidden_size"),
        "n_layers": get("num_hidden_layers"),
        "n_heads": get("num_attention_heads"),
        "n_kv_heads": get("num_key_value_heads") or get("num_attention_heads"),
        "d_ff": get("intermediate_size"),
        "max_seq_len": get("max_position_embeddings", 2048),  # LlamaConfig defaults below
        "rope_theta": 10000.0 if rope_theta is None else rope_theta,
        "norm_eps": get("rms_norm_eps", 1e-6),
        "tie_embeddings": get("tie_word_embeddings", False),
        "init_std": get("initializer_range", 0.02),
    }
    try:
        cfg = ModelConfig(**fields)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        field = _HF_FIELD.get(str(err["loc"][0]), "") if err["loc"] else ""
        value = f"{field}={fields[err['loc'][0]]!r}: " if field else ""
        raise DmaError(f"{where}: {value}{err['msg']}".replace("\n", " ")) from None
    head_dim = get("head_dim")
    if head_dim is not None and head_dim != cfg.head_dim:
        raise DmaError(
            f"{where}: head_dim={head_dim} != hidden_size/num_attention_heads={cfg.head_dim}: "
            "a decoupled head dim is not supported"
        )
    return cfg


def _limits_attention(window, max_positions) -> bool:
    """Whether a Mistral sliding window actually restricts attention (null or >= the context does not)."""
    if window is None:
        return False
    return not (isinstance(window, int) and isinstance(max_positions, int) and window >= max_positions)


def _leaf_map(cfg: ModelConfig) -> list[tuple[tuple, str, tuple[int, ...], int | None]]:
    """(our path, HF name, our shape, n_in) for every parameter of the LM built from cfg."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(LMDef.build(cfg).abstract_params):
        keys = tuple(k.key for k in path)
        if keys[0] == "blocks":
            suffix, n_in = _BLOCK_LEAVES[keys[2:]]
            name = f"model.layers.{keys[1]}.{suffix}"
        else:
            name, n_in = _TOP_LEAVES[keys]
        out.append((keys, name, tuple(leaf.shape), n_in))
    return out


def _hf_shape(shape: tuple[int, ...], n_in: int | None) -> tuple[int, ...]:
    return shape if n_in is None else (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _to_ours(w: np.ndarray, shape: tuple[int, ...], n_in: int | None) -> np.ndarray:
    return np.ascontiguousarray(w if n_in is None else w.T.reshape(shape))


def _to_hf(x: np.ndarray, n_in: int | None) -> np.ndarray:
    if n_in is None:
        return np.ascontiguousarray(x)
    return np.ascontiguousarray(x.reshape(math.prod(x.shape[:n_in]), -1).T)


def _set(tree: dict, keys: tuple, value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _weight_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (one file, or the shards of the index)."""
    if (ckpt / WEIGHTS_NAME).is_file():
        return [ckpt / WEIGHTS_NAME]
    index = ckpt / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise DmaError(f"{index}: not a safetensors index (expected a JSON object with 'weight_map')") from None
        for name in names:
            if Path(name).name != name or not (ckpt / name).is_file():
                raise DmaError(f"{index}: shard {name!r} is not a file in {ckpt}")
        return [ckpt / name for name in names]
    if any(ckpt.glob("pytorch_model*.bin")):
        raise DmaError(
            f"{ckpt}: only pytorch_model*.bin weights found: they are pickle files, which we never load; "
            "convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))"
        )
    raise DmaError(f"{ckpt}: no {WEIGHTS_NAME} and no {INDEX_NAME}")


def _open_tensors(files: list[Path]) -> tuple[dict[str, Path], dict[str, tuple[tuple[int, ...], str]]]:
    """Where each tensor lives and its (shape, safetensors dtype), from the file headers only."""
    where, info = {}, {}
    for path in files:
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    if name in where:
                        raise DmaError(f"{path}: tensor {name} is also in {where[name].name}")
                    sl = f.get_slice(name)
                    where[name], info[name] = path, (tuple(sl.get_shape()), str(sl.get_dtype()))
        except SafetensorError as e:
            raise DmaError(f"{path}: not a readable safetensors file ({e})") from None
    return where, info


def import_hf(checkpoint_dir: str | Path) -> tuple[ModelConfig, Params]:
    """Read a HF LLaMA checkpoint directory -> (ModelConfig, params).

    params has the pure-dict structure of `LMDef.build(cfg).abstract_params`, with
    numpy float32 leaves on the host (`jax.device_put` them with the shardings you want).
    """
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise DmaError(f"{ckpt}: checkpoint directory not found")
    config_path = ckpt / CONFIG_NAME
    hf_config = read_json_file(config_path, "not found (a Hugging Face checkpoint needs its config.json)")
    cfg = config_from_hf(hf_config, config_path)
    files = _weight_files(ckpt)
    location, info = _open_tensors(files)
    leaves = _leaf_map(cfg)
    expected = {name: _hf_shape(shape, n_in) for _, name, shape, n_in in leaves}
    tied_head = cfg.tie_embeddings and "lm_head.weight" in info
    for name, shape in expected.items():
        if name not in info:
            raise DmaError(f"{ckpt}: tensor {name} is missing (expected shape {list(shape)})")
        if info[name][0] != shape:
            raise DmaError(f"{location[name]}: tensor {name} has shape {list(info[name][0])}, expected {list(shape)}")
    extra = sorted(n for n in info if n not in expected and not n.endswith("rotary_emb.inv_freq")
                   and not (tied_head and n == "lm_head.weight"))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise DmaError(f"{location[extra[0]]}: unexpected tensor {extra[0]}{more}: not part of a LLaMA model")
    for name in expected.keys() | ({"lm_head.weight"} if tied_head else set()):
        if info[name][1].lower() not in ("f16", "bf16", "f32", "f64"):
            raise DmaError(f"{location[name]}: tensor {name} has dtype {info[name][1]}, expected a float type")

    def load(name: str) -> np.ndarray:
        with safe_open(location[name], framework="numpy") as f:
            x = f.get_tensor(name).astype(np.float32)
        if not np.isfinite(x).all():
            raise DmaError(f"{location[name]}: tensor {name} holds NaN/Inf values")
        return x

    params: Params = {}
    for keys, name, shape, n_in in leaves:
        _set(params, keys, _to_ours(load(name), shape, n_in))
    if tied_head and not np.array_equal(load("lm_head.weight"), params["embed_VxD"]):
        raise DmaError(f"{location['lm_head.weight']}: tie_word_embeddings is true but lm_head.weight "
                       "differs from model.embed_tokens.weight")
    return cfg, params


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The LlamaConfig (config.json) of our LM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def export_hf(cfg: ModelConfig, params: Params, out_dir: str | Path) -> None:
    """Write params as a HF LLaMA checkpoint (config.json + float32 model.safetensors).

    Each file is written to a temporary name and renamed; the weights go first, so a
    config.json next to them always describes complete weights.
    """
    out = upath(out_dir)
    stale = [p.name for p in (*out.glob("model-*-of-*.safetensors"), *out.glob(INDEX_NAME),
                              *out.glob("pytorch_model*.bin"))]
    if stale:
        raise DmaError(f"{out}: already holds other weights ({stale[0]}): export into an empty directory")
    leaves = _leaf_map(cfg)
    got = {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    extra = sorted(got - {keys for keys, *_ in leaves}, key=str)
    if extra:
        raise DmaError(f"params: unexpected {'/'.join(map(str, extra[0]))} for this ModelConfig")
    tensors = {}
    for keys, name, shape, n_in in leaves:
        node = params
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                raise DmaError(f"params: missing {'/'.join(map(str, keys))} for this ModelConfig")
            node = node[k]
        x = np.asarray(jax.device_get(node))
        if x.shape != shape:
            raise DmaError(f"params: {'/'.join(map(str, keys))} has shape {list(x.shape)}, expected {list(shape)}")
        tensors[name] = _to_hf(x.astype(np.float32), n_in)
    atomic_write_bytes(out / WEIGHTS_NAME, safetensors.numpy.save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out / CONFIG_NAME, hf_config_dict(cfg))
