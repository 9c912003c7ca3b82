"""What every config section shares: the base model (frozen, no unknown keys, no boolean where a number goes) and
the constrained types the sections use."""

from __future__ import annotations

import pydantic


class Section(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=False)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data):
        """Lax mode reads true as 1 (`optim.lr=true` -> lr 1.0): a boolean goes only where a bool is expected."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and "bool" not in str(field.annotation):
                    raise ValueError(f"{key}={str(value).lower()}: a boolean where a number or text is expected")
        return data


PosInt = pydantic.PositiveInt
NonNegInt = pydantic.NonNegativeInt
PosFloat = pydantic.PositiveFloat


def _something_to_run(v: tuple) -> tuple:
    """A list the command loops over (cpt.policies, cpt.seeds): empty would run nothing and say nothing."""
    if not v:
        raise ValueError("is empty: nothing to run")
    return v


NonEmpty = pydantic.AfterValidator(_something_to_run)
