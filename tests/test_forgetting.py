"""Forgetting is visible (issue 16, point 5) on the tiny target: from a base pre-trained on the source field,
continued training on the target field only lowers the source field score below the base by more than three
of its standard errors (and raises the math score); continued training on the source field only gains the
math field nothing comparable (its math score stays far below the math-trained model's)."""

import jax
import jax.numpy as jnp
import numpy as np

from dma_jax import evaluation as ev
from dma_jax.config import load_config
from dma_jax.data.domains import DomainSpace
from dma_jax.data.record_stream import RecordStream
from dma_jax.train import Trainer, TrainState, load_base_params
from tests.paths import DEMO

BASE_STEPS, CPT_STEPS, B = 300, 300, 16


def _train(trainer, state, stream, steps, offset):
    for step in range(steps):
        state, _ = trainer.step(state, trainer.put_batch(stream.batch(offset + step, B, 0)))
    return state


def test_target_only_forgets_the_source_field_by_more_than_three_standard_errors(prepared_world, tmp_path):
    cfg = load_config(DEMO, prepared_world.run_overrides(tmp_path, "mesh.data=1"), variant="tiny")
    space = DomainSpace.load(prepared_world.data_dir)
    assert space.fields == ["source", "math"]
    es = ev.EvalSet.for_space(space, cfg.eval)
    trainer = Trainer(cfg.target, cfg.optim.model_copy(update={"warmup_steps": 10}), cfg.mesh,
                      BASE_STEPS + CPT_STEPS, B, space.record_len - 1, jax.devices()[:1])
    evaluate = jax.jit(lambda p, e: ev.evaluate(trainer.lm, p, e, 16))
    params = jax.device_put(load_base_params(cfg, "target", prepared_world.pretrain_dir("target") / "checkpoints"),
                            trainer.state_sharding.params)
    fresh = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, trainer.tx.init(p)),
                    out_shardings=trainer.state_sharding)
    source, math = RecordStream(space, ["source"]), RecordStream(space, ["math"])
    base = _train(trainer, fresh(params), source, BASE_STEPS, 0)  # a base model that knows the source field
    base_raw = {k: np.asarray(v) for k, v in evaluate(base.params, es).items()}
    scores = {}
    for name, stream in (("target-only", math), ("source-only", source)):
        state = _train(trainer, jax.tree.map(jnp.copy, base), stream, CPT_STEPS, BASE_STEPS)
        norm = ev.normalise({k: np.asarray(v) for k, v in evaluate(state.params, es).items()}, base_raw, cfg.eval)
        scores[name] = (np.asarray(norm["field_score"]), np.asarray(norm["field_score_se"]))
        print(name, "scores", scores[name][0], "SE", scores[name][1])
    (s_t, se_t), (s_s, se_s) = scores["target-only"], scores["source-only"]
    assert s_t[0] < 1.0 - 3 * se_t[0]  # the source field is forgotten, beyond three standard errors
    assert s_t[1] > 1.0 + 3 * se_t[1]  # and the math field learnt
    assert s_s[1] < s_t[1] - 3 * np.hypot(se_s[1], se_t[1])  # source-only gains math far less than target-only
