"""The Open Inference Protocol's binary tensor data extension, as Triton's clients send it.

A request with the header ``Inference-Header-Content-Length: n`` has a JSON header
in its first n bytes, then the raw data of every input whose ``parameters`` give a
``binary_data_size``, in the order the inputs are listed. FP32 data is little-endian
float32; BYTES data is, per element, a 4-byte little-endian length and the bytes.
An answer in binary is the same: a JSON header, whose outputs give their
``binary_data_size`` instead of ``data``, then their bytes.
"""

from __future__ import annotations

import re
import struct
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import orjson

from app.errors import ProtocolError

HEADER = "inference-header-content-length"
EXTENSION = "binary_tensor_data"
_LENGTH = struct.Struct("<I")
_EMPTY = "\0\0\0\0"  # the prefix of an empty element (as ASCII text)
T = TypeVar("T", str, bytes)


class BinaryDataError(ProtocolError):
    """The binary part of a request does not match what its header says (400)."""


def split(raw: bytes, header: str) -> tuple[bytes, bytes]:
    """The JSON header and the binary data of a request, by the header's length."""
    if not (header.isascii() and header.isdigit() and len(header) <= 18):
        raise BinaryDataError(f"{HEADER} must be a byte count, not {header!r}")
    length = int(header)
    if length > len(raw):
        raise BinaryDataError(f"{HEADER} is {length}, past the body's {len(raw)} bytes")
    return raw[:length], raw[length:]


def attach(inputs: list[dict[str, Any]], data: bytes) -> None:
    """Give each input (of a validated request header) whose parameters name a
    ``binary_data_size`` its decoded values as ``data``, taken from ``data`` in order;
    every byte must be used. FP32 values come as a float64 array, BYTES as strings."""
    offset = 0
    for tensor in inputs:
        parameters = tensor.get("parameters")
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is None:
            continue
        name = tensor.get("name")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BinaryDataError(f"input {name!r}: binary_data_size must be a byte count")
        if "data" in tensor:
            raise BinaryDataError(f"input {name!r} has both data and binary_data_size")
        if offset + size > len(data):
            raise BinaryDataError(
                f"input {name!r}: {size} bytes of binary data, {len(data) - offset} left"
            )
        chunk = data[offset : offset + size]
        offset += size
        # (the header's validation let through only a field's own datatype)
        if tensor["datatype"] == "FP32":
            tensor["data"] = _floats(chunk, name)
        else:
            tensor["data"] = _strings(chunk, name)
    if offset != len(data):
        raise BinaryDataError(f"{len(data) - offset} bytes of binary data belong to no input")


def _floats(chunk: bytes, name: Any) -> npt.NDArray[np.float64]:
    if len(chunk) % 4:
        raise BinaryDataError(f"input {name!r}: FP32 data of {len(chunk)} bytes")
    values = np.frombuffer(chunk, dtype="<f4").astype(np.float64)
    if not np.isfinite(values).all():
        raise BinaryDataError(f"input {name!r} (FP32) takes finite numbers, not NaN or inf")
    return values


def _strings(chunk: bytes, name: Any) -> list[str]:
    """The elements of a BYTES chunk. ASCII elements all of one length or empty (ids,
    hashes, some missing: the common case): split with no Python step per element.
    Else one pass over the length prefixes that slices each element out of the chunk
    decoded once (when it is ASCII), or out of the bytes, each then decoded."""
    if chunk.isascii():
        text = chunk.decode("ascii")
        one = _one_length_or_empty(chunk, text)
        return one if one is not None else _elements(chunk, text, name)
    try:
        return [element.decode() for element in _elements(chunk, chunk, name)]
    except UnicodeDecodeError:
        raise BinaryDataError(f"input {name!r}: a BYTES element is not UTF-8") from None


def _elements(chunk: bytes, source: T, name: Any) -> list[T]:
    """The elements of a BYTES chunk, sliced out of ``source``: the chunk, or its text
    when every byte is a character (ASCII)."""
    size, unpack = len(chunk), _LENGTH.unpack_from
    elements: list[T] = []
    append = elements.append
    offset = 0
    while offset < size:
        if offset + 4 > size:
            raise BinaryDataError(f"input {name!r}: a BYTES element's length is cut off")
        (length,) = unpack(chunk, offset)
        offset += 4
        append(source[offset : offset + length])
        offset += length
    if offset > size:
        raise BinaryDataError(f"input {name!r}: a BYTES element is cut off")
    return elements


def _one_length_or_empty(chunk: bytes, text: str) -> list[str] | None:
    """The elements of an ASCII BYTES chunk (``text``, the chunk decoded) when each is
    of one length or empty, matched in C by one regular expression; else None.

    The matches are an element of that length (its prefix, then as many characters)
    or an empty one (a zero prefix), left to right; they are the chunk's elements
    exactly when they cover all of it with no gap."""
    offset, size = 0, len(chunk)
    length = 0
    while offset + 4 <= size and not (length := _LENGTH.unpack_from(chunk, offset)[0]):
        offset += 4  # (leading empty elements)
    empty = re.escape(_EMPTY)
    if length:
        prefix = re.escape(_LENGTH.pack(length).decode("latin-1"))
        found: list[str] = re.findall(f"{prefix}(.{{{length}}})|{empty}", text, re.DOTALL)
    else:
        found = re.findall(f"{empty}()", text)
    if sum(map(len, found)) + 4 * len(found) != size:
        return None
    return found


def wants_binary(body: dict[str, Any]) -> bool:
    """Whether the answer's outputs go in binary: asked per output, or for all."""
    parameters = body.get("parameters")
    if isinstance(parameters, dict) and parameters.get("binary_data_output") is True:
        return True
    outputs = body.get("outputs")
    return isinstance(outputs, list) and any(
        isinstance(o, dict)
        and isinstance(o.get("parameters"), dict)
        and o["parameters"].get("binary_data") is True
        for o in outputs
    )


def encode(answer: dict[str, Any], values: np.ndarray) -> tuple[bytes, int]:
    """An answer with its one output in binary: the body and its JSON header's length."""
    data = values.astype("<f4").tobytes()
    output = answer["outputs"][0]
    output.pop("data", None)
    output["parameters"] = {"binary_data_size": len(data)}
    header = orjson.dumps(answer)
    return header + data, len(header)
