"""The balanced score B has one owner (`evaluation.balanced_score`, ways in `config.BALANCED_HOW`): the same field
scores fed through every consumer give the B of an independent numpy reference, for every way, a 0.0 score
included (the harmonic mean clips scores at 1e-6, so it stays finite)."""

import numpy as np
import pytest

from dma_jax import history
from dma_jax.config import BALANCED_HOW
from dma_jax.errors import DmaError
from dma_jax.evaluation import balanced_score
from tests.toy_env import ToyEnv


def _reference(scores_xF: np.ndarray, how: str) -> np.ndarray:
    """B over the last axis, in float64: mean, min, or F / sum(1 / max(score, 1e-6))."""
    s = np.asarray(scores_xF, np.float64)
    if how == "mean":
        return s.sum(-1) / s.shape[-1]
    if how == "min":
        return np.min(s, axis=-1)
    assert how == "harmonic"
    return s.shape[-1] / np.sum(1.0 / np.clip(s, 1e-6, None), axis=-1)


# A toy domain space (3 fields) whose field scores reach 0.0: trajectory 0 is the best schedule (B = 1 all
# along), 1 is near it, 2 is far off (scores of exp(-100) and below: subnormal or 0.0 in float32).
DOMAIN_FIELDS = ["source", "source", "math", "code"]
BEST_TxD = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
ACTIONS_NxTxD = np.array([BEST_TxD, [[0.4, 0.3, 0.25, 0.05], [0.1, 0.2, 0.3, 0.4]],
                          [[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]], np.float32)
HAND_T1xF = np.array([[1.0, 1.0, 1.0], [0.5, 2.0, 0.0], [0.25, 1.5, 0.8]], np.float32)  # a score above 1 too


def _toy(how: str) -> ToyEnv:
    return ToyEnv(DOMAIN_FIELDS, "math", BEST_TxD, penalty=400.0, balanced_how=how)


def _history_doc(scores_T1xF: np.ndarray, how: str, weights_TxD: np.ndarray) -> dict:
    """A finished CPT history of these field scores (`history.make` computes its B)."""
    names = [f"d{i}" for i in range(len(DOMAIN_FIELDS))]
    fields = list(dict.fromkeys(DOMAIN_FIELDS))
    t1 = scores_T1xF.shape[0]
    return history.make(
        policy="toy", seed=0, domain_names=names, domain_fields=DOMAIN_FIELDS, fields=fields, target_field="math",
        steps_per_stage=1, weights_TxD=weights_TxD, feedback_names=[f"score/{f}" for f in fields],
        field_scores_T1xF=scores_T1xF, balanced_how=how, accuracy_T1xF=np.full((t1, len(fields)), 0.5),
        domain_loss_T1xD=np.ones((t1, len(names))), timings={}, rejected=0, cpt_config={},
        field_score_se_T1xF=np.full_like(scores_T1xF, 0.01))


@pytest.mark.parametrize("how", BALANCED_HOW)
def test_every_consumer_gives_the_reference_balanced_score(how):
    assert BALANCED_HOW == ("mean", "min", "harmonic")
    toy = _toy(how)
    field_idx = toy.meta()["field_score_index"]
    toy_scores_NxT1xF = toy.feedback(ACTIONS_NxTxD)[..., field_idx]
    assert (toy_scores_NxT1xF == 0.0).any() and (HAND_T1xF == 0.0).any()
    np.testing.assert_array_equal(toy_scores_NxT1xF[0], 1.0)  # the best schedule
    ref_NxT1 = _reference(toy_scores_NxT1xF, how)

    # evaluation.balanced_score, over any leading axes
    for scores in (toy_scores_NxT1xF, HAND_T1xF):
        np.testing.assert_allclose(np.asarray(balanced_score(scores, how)), _reference(scores, how), rtol=1e-6, atol=0)
    want = {"mean": 1.25, "min": 0.5, "harmonic": 2 / (1 / 0.5 + 1 / 2.0)}[how]  # by hand
    assert float(balanced_score(np.array([0.5, 2.0]), how)) == pytest.approx(want, rel=1e-6)
    if how == "harmonic":  # the clip: a 0.0 score counts as 1e-6
        assert float(balanced_score(np.array([0.0, 1.0]), how)) == pytest.approx(2 / (1e6 + 1), rel=1e-6)

    # history.make writes the reference B; from_doc (validating a CPT history) accepts it and rejects one off by 1e-3
    for scores, weights in ((toy_scores_NxT1xF[2], ACTIONS_NxTxD[2]), (HAND_T1xF, ACTIONS_NxTxD[1])):
        ref = _reference(scores, how)
        doc = _history_doc(scores, how, weights)
        np.testing.assert_allclose(doc["balanced"], ref, rtol=1e-6, atol=0)
        np.testing.assert_allclose(history.from_doc(doc, "made").balanced_T1, ref, rtol=1e-6, atol=0)
        # its SE (every field score's SE 0.01), by the delta method: numpy gradient of the reference B
        f = scores.shape[1]
        if how == "mean":
            want_se = np.full(len(ref), 0.01 * np.sqrt(f) / f)
        elif how == "min":
            want_se = np.full(len(ref), 0.01)
        else:
            clipped = np.maximum(scores.astype(np.float64), 1e-6)
            want_se = 0.01 * np.sqrt(((ref[:, None] ** 2 / (f * clipped ** 2)) ** 2).sum(1))
        np.testing.assert_allclose(history.from_doc(doc, "made").balanced_se_T1, want_se, rtol=1e-4)
        exact = dict(doc, balanced=ref.tolist())
        np.testing.assert_array_equal(history.from_doc(exact, "exact").balanced_T1, ref)
        off = dict(doc, balanced=(ref + np.array([0.0, 1e-3, 0.0])).tolist())
        with pytest.raises(DmaError, match=rf"off: balanced\[1\]=.* but the {how} of field_scores\[1\] is "):
            history.from_doc(off, "off")

    # ToyEnv (the offline data's analytic stand-in): rewards are the steps of the reference B, returns telescope
    ds = toy.dataset(ACTIONS_NxTxD)
    np.testing.assert_allclose(ds.rewards, np.diff(ref_NxT1, axis=1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ds.returns, ref_NxT1[:, -1] - ref_NxT1[:, 0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ds.rewards.sum(axis=1), ds.returns, rtol=0, atol=1e-6)
    np.testing.assert_allclose(toy.returns(ACTIONS_NxTxD), ds.returns, rtol=0, atol=1e-6)
    assert ds.returns[0] == pytest.approx(0.0, abs=1e-6) and (ds.returns[1:] < 0).all()

    # ... and its best schedule is the maximum of B, whichever way B is taken
    env = ToyEnv(["source", "source", "math"], "math", np.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]), penalty=2.0,
                 loss_rate=0.5, balanced_how=how)
    others = np.random.default_rng(1).dirichlet(np.ones(3), size=(200, 2))
    assert env.returns(env.best_TxD[None])[0] == pytest.approx(0.0, abs=1e-6)
    assert (env.returns(others) < 0).all()
