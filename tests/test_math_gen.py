"""The generated math is correct (checked by tests/math_checker.py, independent of the generator) and
deterministic."""

import pytest

from dma_jax.data import math_gen
from dma_jax.errors import DmaError
from tests.math_checker import _checked_steps, _is_correct


def test_checker_rejects_wrong_math():
    assert _is_correct("Compute 2 + 3 * 4.", "14") and not _is_correct("Compute 2 + 3 * 4.", "20")
    assert _is_correct("Factor x^2 + 5x + 6.", "(x + 2)(x + 3)")
    assert not _is_correct("Factor x^2 + 5x + 6.", "(x - 2)(x - 3)")
    assert not _is_correct("Expand (2x + 3)(x - 4).", "2x^2 + 5x - 12")
    with pytest.raises(AssertionError):
        _checked_steps(["Multiply: 19 * 3 = 56."])


@pytest.mark.parametrize("kind", math_gen.KINDS)
def test_math_problems_are_correct(kind):
    problems = math_gen.generate_problems(kind, 400, seed=0) + math_gen.generate_problems(kind, 100, 5, "bench")
    assert len({p.subkind for p in problems}) >= 4
    for p in problems:
        assert _is_correct(p.question, p.answer), (p.question, p.answer)
        assert _checked_steps(p.steps) >= 1, p.steps
        assert len(p.distractors) == 3 and len({p.answer, *p.distractors}) == 4, p
        assert not any(_is_correct(p.question, d) for d in p.distractors), (p.question, p.distractors)
        # Training documents keep the worked solution; the benchmark prompt is the question alone.
        assert p.document == "\n".join((p.question, *p.steps, f"Answer: {p.answer}"))
        assert p.prompt == p.question + "\nAnswer:" and "\n" not in p.question


def test_math_determinism():
    a = math_gen.generate_problems("algebra", 60, seed=1)
    assert a == math_gen.generate_problems("algebra", 60, seed=1)
    assert a[:20] == math_gen.generate_problems("algebra", 20, seed=1)
    assert [p.question for p in a] != [p.question for p in math_gen.generate_problems("algebra", 60, seed=2)]
    assert len({p.question for p in a}) == 60
    with pytest.raises(DmaError, match="geometry"):
        math_gen.generate_problems("geometry", 3)
