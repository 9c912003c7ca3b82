"""The study's reproducibility record (dma_jax/study/fingerprint.py): array digests, environments in study.json."""

from __future__ import annotations

import hashlib

import numpy as np

from dma_jax.study import fingerprint


def test_arrays_digest_is_sha256_of_names_dtypes_shapes_and_bytes():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1, 2], np.int64)
    h = hashlib.sha256()  # independently: names sorted, then "name|dtype|shape|" and the C-order bytes
    for name, x in (("a", a), ("b", b)):
        h.update(f"{name}|{x.dtype.str}|{x.shape}|".encode() + x.tobytes())
    assert fingerprint.arrays_digest({"b": b, "a": a}) == h.hexdigest()
    assert fingerprint.arrays_digest({"a": a.T.copy().T, "b": b}) == h.hexdigest()  # layout does not matter
    flipped = a.copy()
    flipped.view(np.uint32)[0, 0] ^= 1  # one last bit
    assert fingerprint.arrays_digest({"a": flipped, "b": b}) != h.hexdigest()
    assert fingerprint.arrays_digest({"a": a.astype(np.float64), "b": b}) != h.hexdigest()
    assert fingerprint.arrays_digest({"a": a.reshape(3, 2), "b": b}) != h.hexdigest()


def test_environments_are_recorded_once_each_and_keep_the_rest_of_study_json():
    doc = {"seconds": {"main": 3.0}, "command": "dma study"}
    env = fingerprint.environment()
    assert env["devices"] >= 1 and env["backend"] == "cpu" and env["jax"] and "|" in env["cpu"]
    doc = fingerprint.record_environment(doc, "main", env)
    doc = fingerprint.record_environment(doc, "main", dict(env))
    other = dict(env, xla_flags="--xla_cpu_experimental_ynn_fusion_type=dot")
    doc = fingerprint.record_environment(doc, "main", other)
    doc = fingerprint.record_environment(doc, "gen-code", env)
    assert doc["seconds"] == {"main": 3.0} and doc["command"] == "dma study"
    assert doc[fingerprint.ENV_KEY] == {"main": [env, other], "gen-code": [env]}
    text = "\n".join(fingerprint.section(doc[fingerprint.ENV_KEY], {"main: offline data": "ab" * 32}))
    assert "- Environment 1 (main, gen-code):" in text and "- Environment 2 (main):" in text
    assert "xla_flags '--xla_cpu_experimental_ynn_fusion_type=dot'" in text
    assert "| main: offline data | `abababababababab` |" in text
