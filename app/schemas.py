"""Request and response models, generated from a checkpoint's feature spec.

The request models are what /docs shows and what validates every call: they are
compiled once per model into pydantic-core validators that read the raw body
bytes (``TypeAdapter.validate_json``), the fast path; FastAPI's default body
handling (parse to Python, then validate) is not used on the prediction routes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NotRequired

from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)
from typing_extensions import TypedDict

from model.features import FeatureSpec

DenseValue = Annotated[float | None, Strict(), AllowInfNan(False)]
# A sparse integer is an int64, as ids are: its decimal string is at most 20 characters.
SparseInt = Annotated[int, Strict(), Field(ge=-(2**63), le=2**63 - 1)]


def sparse_value(max_chars: int) -> Any:
    """A string of at most ``max_chars`` characters, an int64, or null.

    left_to_right: a string is tried first and most values are strings (about 20% faster
    than the smart mode on a 1000-row body). The bound on strings bounds what a cached
    value costs (the Redis store's cache keeps the values it has seen).
    """
    text = Annotated[str, Strict(), StringConstraints(max_length=max_chars)]
    return Annotated[text | SparseInt | None, Field(union_mode="left_to_right")]


SPARSE_MEMBERS = frozenset({"constrained-str", "constrained-int"})
SPARSE_MEMBER_ERRORS = frozenset(
    {"string_type", "int_type", "string_too_long", "greater_than_equal", "less_than_equal"}
)
SPARSE_MESSAGE = "a sparse value must be a string, an integer or null"
DENSE_MESSAGE = "a dense value must be a finite number or null"


class Explanation(BaseModel):
    """A row's logit split into parts that sum to it (to float32 rounding)."""

    logit: float = Field(description="log-odds of a click: the sum of every part below")
    bias: float
    first_order: dict[str, float] = Field(
        description="per field: its first-order term (w_f[x] for a sparse or bucketed "
        "field, u_d z_d for a dense one)"
    )
    fm: dict[str, float] = Field(
        description="per embedded field: its share of the FM term, half its pairwise "
        "interactions with every other field"
    )
    dnn: float = Field(description="the deep part's term")


class PredictResponse(BaseModel):
    probability: float = Field(description="click probability")
    model_version: str
    explanation: Explanation | None = Field(None, description='with "explain": true')


class PredictManyResponse(BaseModel):
    probabilities: list[float] = Field(description="the i-th belongs to the i-th instance")
    explanations: list[Explanation] | None = Field(None, description='with "explain": true')
    model_version: str


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_dir: Path | None = Field(
        None, description="checkpoint directory to load (default: CTR_MODEL_DIR)"
    )


class ReloadResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_version: str = Field(description="the version now serving")
    previous_version: str


def features_type(spec: FeatureSpec, max_value_chars: int) -> Any:
    """A TypedDict with one optional key per field; unknown keys are refused.

    Validation yields plain dicts (field name -> raw value), no model objects.
    """
    fields: dict[str, Any] = {}
    sparse = sparse_value(max_value_chars)
    for f in spec.fields:
        kind = DenseValue if f.kind == "dense" else sparse
        missing = "the transform's missing value" if f.kind == "dense" else "the OOV row"
        description = f"{f.kind} ({f.transform}); missing or null: {missing}"
        fields[f.name] = Annotated[kind, Field(description=description)]
    return _typed_dict("Features", fields, total=False)


def _typed_dict(name: str, fields: dict[str, Any], *, total: bool = True) -> Any:
    """A TypedDict built at run time (its keys are the model's field names) that refuses
    unknown keys."""
    factory: Any = TypedDict
    typed = factory(name, fields, total=total)
    typed.__pydantic_config__ = ConfigDict(extra="forbid")
    return typed


@dataclass(frozen=True)
class RequestSchemas:
    """The compiled validators of one model's requests."""

    predict: TypeAdapter[Any]
    predict_many: TypeAdapter[Any]

    @classmethod
    def build(cls, spec: FeatureSpec, max_value_chars: int) -> RequestSchemas:
        features = features_type(spec, max_value_chars)
        described = Annotated[features, Field(description="field name -> raw value")]  # type: ignore[valid-type]
        explain = NotRequired[
            Annotated[bool, Strict(), Field(description="also split each logit into parts")]
        ]
        predict = _typed_dict("PredictRequest", {"features": described, "explain": explain})
        instances = Annotated[list[features], Field(min_length=1)]  # type: ignore[valid-type]
        predict_many = _typed_dict(
            "PredictManyRequest", {"instances": instances, "explain": explain}
        )
        return cls(TypeAdapter(predict), TypeAdapter(predict_many))


def error_details(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic errors in FastAPI's shape (``loc`` starts with "body"), one per bad value."""
    details: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for error in exc.errors(include_url=False, include_context=False):
        loc = tuple(error["loc"])
        kind, msg = error["type"], error["msg"]
        if loc and loc[-1] in SPARSE_MEMBERS and kind in SPARSE_MEMBER_ERRORS:
            # One error per member of the sparse union (the last loc item names it): say
            # the one about what the value is ("too long", "not 64-bit"), else the type.
            loc, value = loc[:-1], error.get("input")
            if (kind == "string_type" and type(value) is int) or (
                kind == "int_type" and type(value) is str
            ):
                continue
            if kind in ("string_type", "int_type"):
                msg, kind = SPARSE_MESSAGE, "sparse_type"
            elif kind in ("greater_than_equal", "less_than_equal"):
                msg, kind = "a sparse integer must fit in 64 bits", "sparse_type"
        elif kind in ("float_type", "finite_number"):
            msg, kind = DENSE_MESSAGE, "dense_type"
        elif kind == "extra_forbidden":
            msg = f"unknown field {loc[-1]!r}: GET /model lists the model's fields"
        if loc in seen:
            continue
        seen.add(loc)
        detail: dict[str, Any] = {"type": kind, "loc": ["body", *loc], "msg": msg}
        if kind != "json_invalid" and "input" in error and _small(error["input"]):
            detail["input"] = error["input"]
        details.append(detail)
    return details


def _small(value: Any) -> bool:
    """Echo an input back only when it is a short scalar (never a whole body)."""
    if isinstance(value, float):
        return math.isfinite(value)  # NaN and infinities are not JSON
    return (
        value is None
        or isinstance(value, bool | int)
        or (isinstance(value, str) and len(value) <= 64)
    )
