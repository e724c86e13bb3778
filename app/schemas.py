"""Request and response models, generated from a checkpoint's feature spec.

The request models are what /docs shows and what validates every call: they are
compiled once per model into pydantic-core validators that read the raw body
bytes (``TypeAdapter.validate_json``), the fast path; FastAPI's default body
handling (parse to Python, then validate) is not used on the prediction routes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NotRequired

from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    TypeAdapter,
    ValidationError,
)
from pydantic.json_schema import SkipJsonSchema
from typing_extensions import TypedDict

from model.features import FeatureSpec

DenseValue = Annotated[float | None, Strict(), AllowInfNan(False)]
INT64 = Field(ge=-(2**63), le=2**63 - 1)
# A sparse integer is an int64, as ids are.
SparseInt = Annotated[int, Strict(), INT64]


def _integral(value: Any) -> int:
    """A JSON float that is an int64 (12.0), as that integer; not an int beyond int64's
    range, which a float member of the union would otherwise round into it."""
    if type(value) is not float or not value.is_integer() or not -(2**63) <= value < 2**63:
        raise ValueError("not an integer")
    return int(value)


# 12.0 is the integer 12: JSON Schema's "integer" admits it, and clients that only have
# doubles (JavaScript) cannot write it otherwise. Left out of the JSON schema, whose
# "integer" already says it.
IntegralFloat = SkipJsonSchema[Annotated[float, PlainValidator(_integral)]]
# left_to_right: a string is tried first and most values are strings (about 20% faster
# than the smart mode on a 1000-row body). Strings of any length: a long value is looked
# up by a digest of it (model.features.value_key), so what a cached value costs is
# bounded whatever its length.
SparseValue = Annotated[
    Annotated[str, Strict()] | SparseInt | IntegralFloat | None,
    Field(union_mode="left_to_right"),
]
SPARSE_MEMBERS = frozenset({"str", "constrained-int", "function-plain[_integral()]"})
# What the members of the union say (the loc's last item names the member; a field may
# have a member's name too, but not these errors of its own).
SPARSE_MEMBER_ERRORS = frozenset(
    {"string_type", "int_type", "greater_than_equal", "less_than_equal", "value_error"}
)
SPARSE_MESSAGE = "a sparse value must be a string, an integer or null"
INT64_MESSAGE = "a sparse integer must fit in 64 bits"
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
    probability: float = Field(
        description="the probability served for this logit: sigmoid(logit), corrected for "
        "negative down-sampling and calibrated as GET /model's calibration says"
    )


class PredictResponse(BaseModel):
    probability: float = Field(description="click probability")
    model_version: str
    explanation: Explanation | None = Field(None, description='with "explain": true')


class PredictManyResponse(BaseModel):
    probabilities: list[float] = Field(description="the i-th belongs to the i-th instance")
    explanations: list[Explanation] | None = Field(None, description='with "explain": true')
    model_version: str


class Ranked(BaseModel):
    index: int = Field(description="the candidate's position in the request")
    probability: float


class RankResponse(BaseModel):
    probabilities: list[float] = Field(description="the i-th belongs to the i-th candidate")
    top: list[Ranked] | None = Field(
        None, description='with "top_k": the top_k best candidates, most probable first'
    )
    explanations: list[Explanation] | None = Field(None, description='with "explain": true')
    model_version: str


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_dir: str | None = Field(
        None,
        description="checkpoint directory to load, relative to the models root (or an "
        "absolute path inside it); default: CTR_MODEL_DIR",
        examples=["default"],
    )


class ErrorResponse(BaseModel):
    """Every error of the native endpoints: a message, or one item per bad value."""

    detail: str | list[dict[str, Any]] = Field(
        description='a message, or items {"type", "loc", "msg"} naming each bad value'
    )


class ReloadResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_version: str = Field(description="the version now serving")
    previous_version: str
    workers: int | None = Field(
        None, description="the worker processes switched (with several workers)"
    )


def features_type(spec: FeatureSpec) -> Any:
    """A TypedDict with one optional key per field; unknown keys are refused.

    Validation yields plain dicts (field name -> raw value), no model objects.
    """
    fields: dict[str, Any] = {}
    for f in spec.fields:
        kind = DenseValue if f.kind == "dense" else SparseValue
        missing = "the transform's missing value" if f.kind == "dense" else "the OOV row"
        description = f"{f.kind} ({f.transform}); missing or null: {missing}"
        fields[f.name] = Annotated[kind, Field(description=description)]
    return typed_dict("Features", fields, total=False)


def typed_dict(
    name: str,
    fields: dict[str, Any],
    *,
    total: bool = True,
    extra: Literal["forbid", "ignore"] = "forbid",
) -> Any:
    """A TypedDict built at run time (its keys are the model's field names) that refuses
    unknown keys (or, ``extra="ignore"``, drops them). Validation yields plain dicts."""
    factory: Any = TypedDict
    typed = factory(name, fields, total=total)
    typed.__pydantic_config__ = ConfigDict(extra=extra)
    return typed


@dataclass(frozen=True)
class RequestSchemas:
    """The compiled validators of one model's requests."""

    predict: TypeAdapter[Any]
    predict_many: TypeAdapter[Any]
    rank: TypeAdapter[Any]
    # The same /predict_many and /rank in two steps, for a body too big to validate in
    # one go: the envelope with its rows unchecked, then the rows a slice at a time.
    predict_many_envelope: TypeAdapter[Any]
    rank_envelope: TypeAdapter[Any]
    instances: TypeAdapter[Any]

    @classmethod
    def build(cls, spec: FeatureSpec) -> RequestSchemas:
        features = features_type(spec)
        described = Annotated[features, Field(description="field name -> raw value")]  # type: ignore[valid-type]
        explain = NotRequired[
            Annotated[bool, Strict(), Field(description="also split each logit into parts")]
        ]
        predict = typed_dict("PredictRequest", {"features": described, "explain": explain})
        instances = Annotated[list[features], Field(min_length=1)]  # type: ignore[valid-type]
        predict_many = typed_dict(
            "PredictManyRequest", {"instances": instances, "explain": explain}
        )
        context = Annotated[
            features,  # type: ignore[valid-type]
            Field(description="the fields every candidate shares (a user, a query, a page)"),
        ]
        candidates = Annotated[
            list[features],  # type: ignore[valid-type]
            Field(min_length=1, description="each candidate's own fields"),
        ]
        top_k = NotRequired[
            Annotated[
                int,
                Strict(),
                Field(ge=1, description="also list the top_k best candidates, best first"),
            ]
        ]
        rank = typed_dict(
            "RankRequest",
            {"context": context, "candidates": candidates, "top_k": top_k, "explain": explain},
        )
        unchecked = Annotated[list[Any], Field(min_length=1)]
        envelope = typed_dict("PredictManyRequest", {"instances": unchecked, "explain": explain})
        rank_envelope = typed_dict(
            "RankRequest",
            {"context": context, "candidates": unchecked, "top_k": top_k, "explain": explain},
        )
        return cls(
            predict=TypeAdapter(predict),
            predict_many=TypeAdapter(predict_many),
            rank=TypeAdapter(rank),
            predict_many_envelope=TypeAdapter(envelope),
            rank_envelope=TypeAdapter(rank_envelope),
            instances=TypeAdapter(list[features]),  # type: ignore[valid-type]
        )


def error_details(exc: ValidationError, within: tuple[str | int, ...] = ()) -> list[dict[str, Any]]:
    """pydantic errors in FastAPI's shape (``loc`` starts with "body"), one per bad value.

    ``within``: where in the body the validated value was (a slice's errors name their
    instance in the whole body: ``("instances", 512)`` shifts ``[3, "C1"]`` to
    ``["instances", 515, "C1"]``)."""
    details: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for error in exc.errors(include_url=False, include_context=False):
        loc = tuple(error["loc"])
        kind, msg = error["type"], error["msg"]
        if loc and loc[-1] in SPARSE_MEMBERS and kind in SPARSE_MEMBER_ERRORS:
            # One error per member of the sparse union (the last loc item names it): say
            # once what is wrong with the value.
            loc, value = loc[:-1], error.get("input")
            integer = type(value) is int or (
                type(value) is float and math.isfinite(value) and value.is_integer()
            )
            # (an integer that fails every member is out of int64's range)
            msg, kind = (INT64_MESSAGE if integer else SPARSE_MESSAGE), "sparse_type"
        elif kind in ("float_type", "finite_number"):
            msg, kind = DENSE_MESSAGE, "dense_type"
        elif kind == "extra_forbidden":
            msg = f"unknown field {loc[-1]!r}: GET /model lists the model's fields"
        if loc in seen:
            continue
        seen.add(loc)
        if within and loc:  # (a slice's instance index, counted in the whole body)
            loc = (*within[:-1], int(within[-1]) + int(loc[0]), *loc[1:])
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
