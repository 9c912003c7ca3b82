from pathlib import Path

import pytest
import yaml

from dma_jax.config import Config, config_variants, load_config
from dma_jax.errors import DmaError

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


def _leaves(obj, prefix: str = ""):
    """(dotted key, value) for every scalar or scalar list in a YAML tree; list items are keyed by index."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for key, value in items:
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _get(cfg: Config, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[int(part)] if part.isdigit() else getattr(cfg, part)
    return cfg


def _assert_values_are(cfg: Config, obj: dict, where: str) -> None:
    for key, value in _leaves(obj):
        got = _get(cfg, key)
        got = list(got) if isinstance(got, tuple) else got
        assert got == value, f"{where}: {key} = {got!r}, the YAML says {value!r}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_and_its_tiny_variant_load(path):
    raw = yaml.safe_load(path.read_text())
    variants = raw.pop("variants", {})
    _assert_values_are(load_config(path), raw, path.name)
    assert "tiny" in config_variants(path), f"{path.name} has no tiny variant"
    tiny = load_config(path, variant="tiny")
    _assert_values_are(tiny, variants["tiny"], f"{path.name} (tiny)")
    assert tiny.pretrain.steps <= 20


def _write(tmp_path, obj):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(obj))
    return p


def test_values_and_overrides_apply(tmp_path):
    p = _write(tmp_path, {"proxy": {"d_model": 48, "n_heads": 3, "d_ff": 100}, "variants": {"v": {"proxy": {"n_layers": 3}}}})
    cfg = load_config(p, ["optim.lr=0.5", "proxy.tie_embeddings=false", "pretrain.fields=[source, math]"],
                      variant="v")
    assert cfg.proxy.d_model == 48 and cfg.proxy.n_layers == 3 and cfg.optim.lr == 0.5
    assert cfg.proxy.tie_embeddings is False and cfg.pretrain.fields == ("source", "math")
    with pytest.raises(Exception):
        cfg.proxy.d_model = 3  # frozen


@pytest.mark.parametrize(
    "obj, overrides, pattern",
    [
        ({"proxy": {"d_modle": 3}}, [], r"c\.yaml: unknown key 'proxy\.d_modle'"),
        ({"modle": {}}, [], r"c\.yaml: unknown key 'modle'"),
        ({"proxy": {"d_model": "big"}}, [], r"c\.yaml: proxy\.d_model: .*integer.*'big'"),
        ({"target": {"d_model": -4}}, [], r"c\.yaml: target\.d_model: .*greater than 0"),
        ({"optim": {"b1": 1.5}}, [], r"c\.yaml: optim\.b1: .*less than 1"),
        ({"optim": {"lr": float("nan")}}, [], r"c\.yaml: optim\.lr: value must be finite"),
        ({"proxy": {"d_model": 30, "n_heads": 4}}, [], r"c\.yaml: proxy: d_model=30 is not divisible by n_heads=4"),
        ({}, ["proxy.nope=1"], r"override 'proxy\.nope=1': unknown key 'proxy\.nope'"),
        ({}, ["pretrain.steps"], r"override 'pretrain\.steps': expected key\.sub=value"),
        ({}, ["pretrain.steps=0"], r"c\.yaml: override 'pretrain\.steps=0': pretrain\.steps: .*greater than 0"),
        ({}, ["data.record_len=4096"], r"c\.yaml: data\.record_len-1=4095 exceeds proxy\.max_seq_len"),
        ({}, ["data.demo=false"], r"c\.yaml: override 'data\.demo=false': data: no domains"),
        ({}, ["data.tokenizer.kind=hf"], r"c\.yaml: override 'data\.tokenizer\.kind=hf': data\.tokenizer: tokenizer kind 'hf' needs a path"),
    ],
)
def test_bad_configs_give_one_line_errors_naming_file_and_key(tmp_path, obj, overrides, pattern):
    p = _write(tmp_path, obj)
    with pytest.raises(DmaError, match=pattern) as e:
        load_config(p, overrides)
    assert "\n" not in str(e.value)


def test_missing_file_bad_yaml_and_unknown_variant(tmp_path):
    with pytest.raises(DmaError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(DmaError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(DmaError, match="expected a mapping"):
        load_config(lst)
    with pytest.raises(DmaError, match="no variant 'huge'"):
        load_config(_write(tmp_path, {}), variant="huge")


def test_an_override_indexes_a_list_of_sections(tmp_path):
    # data.domains is a list: `data.domains.1.paths=...` sets the second entry's paths (it used to replace the list
    # by a dict); a missing entry or an unknown key inside an entry is a one-line error naming the override
    path = tmp_path / "u.yaml"
    path.write_text("data:\n  demo: false\n  domains:\n"
                    "    - {name: a, field: source, kind: text, paths: [/a/*.txt]}\n"
                    "    - {name: b, field: math, kind: text, paths: [/b/*.txt]}\n")
    cfg = load_config(path, ["data.domains.1.paths=[/x/*.txt]"])
    assert [d.paths for d in cfg.data.domains] == [("/a/*.txt",), ("/x/*.txt",)]
    with pytest.raises(DmaError, match=r"override 'data.domains.5.paths=\[/x\]': 'data.domains' has 2 entries"):
        load_config(path, ["data.domains.5.paths=[/x]"])
    with pytest.raises(DmaError, match=r"unknown key 'data.domains.1.nope'"):
        load_config(path, ["data.domains.1.nope=1"])
