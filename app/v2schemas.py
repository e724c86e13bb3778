"""The Open Inference Protocol's inference request as pydantic types, built per model,
and its validation errors worded as the protocol's 400s.

Every input tensor is typed by its field: its ``name`` is the tag of a union with one
member per field, so the member fixes the ``datatype`` (BYTES for a sparse field,
FP32 for a dense one) and the type of every value (a string or null; a finite number
or null). What JSON Schema cannot say stays in ``app.kserve``: every input's data is
as long as its shape, all inputs share one batch size, no input is given twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, NotRequired, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
)

from app.errors import ProtocolError
from app.schemas import DenseValue, typed_dict
from model.features import FeatureSpec
from model.features import Field as FeatureField

MODEL_NAME = "ctr"
OUTPUT = "probability"

Parameters = dict[str, Any]
BytesValue = Annotated[str, Strict()] | None  # "" or null: missing
Shape = Annotated[
    list[Annotated[int, Strict(), Field(ge=1)]],
    Field(min_length=1, max_length=1, description="[n]: the batch size"),
]
RequestedOutput = typed_dict(
    "RequestedOutput",
    {"name": Literal["probability"], "parameters": NotRequired[Parameters]},
    extra="ignore",
)


class OutputTensor(BaseModel):
    name: Literal["probability"]
    datatype: Literal["FP32"]
    shape: list[int] = Field(description="[n]: one probability per row")
    data: list[float] | None = Field(None, description="the probabilities, when in JSON")
    parameters: Parameters | None = Field(
        None, description='in binary: {"binary_data_size": bytes after the JSON header}'
    )


class InferResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, when it gave one")
    outputs: list[OutputTensor]


class ErrorObject(BaseModel):
    """The protocol's error object: every error under /v2."""

    error: str


def datatype(kind: str) -> Literal["BYTES", "FP32"]:
    """The tensor datatype of a field of ``kind`` (sparse or dense)."""
    return "BYTES" if kind == "sparse" else "FP32"


def _tensor(field: FeatureField) -> Any:
    """The input tensor of ``field``: its data inline (``data``), or in binary after the
    JSON header (``parameters.binary_data_size``, ``app.tensordata``)."""
    value = BytesValue if field.kind == "sparse" else DenseValue
    what = "strings; empty or null: missing" if field.kind == "sparse" else "numbers; null: missing"
    return typed_dict(
        f"Input_{field.name}",
        {
            "name": Literal[field.name],
            "datatype": Literal[datatype(field.kind)],
            "shape": Shape,
            "parameters": NotRequired[Parameters],
            "data": NotRequired[
                Annotated[list[value], Field(min_length=1, description=f"n {what}")]  # type: ignore[valid-type]
            ],
        },
        extra="ignore",
    )


@dataclass(frozen=True)
class InferSchema:
    """The compiled validator of one model's inference requests, and its error wording."""

    adapter: TypeAdapter[Any]
    kinds: dict[str, str]  # field name -> "sparse" or "dense"
    tagged: bool  # whether inputs are a union tagged by name (more than one field)

    @classmethod
    def build(cls, spec: FeatureSpec) -> InferSchema:
        tensors = tuple(_tensor(f) for f in spec.fields)
        tensor: Any = tensors[0]
        if len(tensors) > 1:
            tensor = Annotated[Union[tensors], Discriminator("name")]  # noqa: UP007
        request = typed_dict(
            "InferenceRequest",
            {
                "id": NotRequired[Annotated[str, Strict()] | None],
                "parameters": NotRequired[Parameters],
                "inputs": Annotated[
                    list[tensor],
                    Field(min_length=1, description="one tensor per field given"),
                ],
                "outputs": NotRequired[list[RequestedOutput]],  # type: ignore[valid-type]
            },
            extra="ignore",
        )
        return cls(TypeAdapter(request), {f.name: f.kind for f in spec.fields}, len(tensors) > 1)

    def validate(self, body: Any) -> dict[str, Any]:
        """A request from its JSON bytes, or already parsed (a binary request's header
        with its data attached), else ``ProtocolError`` (400) saying what is wrong."""
        try:
            if isinstance(body, bytes):
                valid: dict[str, Any] = self.adapter.validate_json(body)
            else:
                valid = self.adapter.validate_python(body)
        except ValidationError as exc:
            raise ProtocolError(self.word(exc)) from None
        return valid

    def word(self, exc: ValidationError) -> str:
        """The first error of ``exc``, said as the protocol's error message."""
        error = exc.errors(include_url=False)[0]
        loc, kind, given = error["loc"], error["type"], error.get("input")
        if kind == "json_invalid":
            return f"the body is not valid JSON: {error['msg']}"
        top = loc[0] if loc else None
        if top == "inputs" and len(loc) == 1 and kind == "too_short":
            return "no inputs"
        if top is None or (top == "inputs" and len(loc) == 1):
            return 'an inference request is an object with an "inputs" array'
        if top == "inputs":
            return self._word_input(loc[2:], kind, given)
        if top == "id":
            return '"id" must be a string'
        if top == "outputs":
            return f'"outputs" lists requested outputs; the only one is "{OUTPUT}"'
        if top == "parameters":
            return '"parameters" must be an object'
        return f"{'.'.join(map(str, loc))}: {error['msg']}"  # (no other key is checked)

    def _word_input(self, loc: tuple[int | str, ...], kind: str, given: Any) -> str:
        """An input tensor's error; ``loc`` is within the tensor (after the tag)."""
        if kind == "union_tag_invalid" and isinstance(given, dict):
            given = given.get("name")
        if kind == "union_tag_invalid" and isinstance(given, str):
            return f"unknown input {given!r}: GET /v2/models/{MODEL_NAME} lists them"
        if not loc or kind.startswith("union_tag"):
            return 'every input is an object with a string "name"'
        if self.tagged:
            name, loc = str(loc[0]), loc[1:]
        else:
            name = next(iter(self.kinds))
        key = loc[0] if loc else None
        if key == "name":  # (one field, no union: the name is a literal)
            return f"unknown input {given!r}: GET /v2/models/{MODEL_NAME} lists them"
        expected = datatype(self.kinds[name])
        if key == "datatype":
            return f"input {name!r} has datatype {_short(given)}, expected {expected}"
        if key == "shape":
            return f"input {name!r} must have shape [n], n >= 1"
        if key == "parameters":
            return f'input {name!r}: "parameters" must be an object'
        if key == "data" and len(loc) == 1:
            if kind == "too_short":
                return f"input {name!r} has no values"
            return f'input {name!r} of shape [n] needs a flat "data" array'
        if key == "data":
            if isinstance(given, list | dict):
                return f'input {name!r} of shape [n] needs a flat "data" array'
            if expected == "BYTES":
                return f"input {name!r} (BYTES) takes strings, not {_short(given)}"
            return f"input {name!r} (FP32) takes finite numbers, not {_short(given)}"
        return f"input {name!r} is malformed"  # (every key of a tensor is handled above)


def _short(value: Any) -> str:
    """A value as a message quotes it: its repr, cut to 64 characters."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."
