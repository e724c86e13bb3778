"""A safetensors file read in place: its header parsed, its float32 tensors as views on a
memory map of the file (no copy), for checkpoints whose tables every worker process
maps from the same file (``model.checkpoint``).

The format: an 8-byte little-endian header length, a JSON header of name -> {dtype,
shape, data_offsets}, then the data (offsets from its start).
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from math import prod

import torch


@dataclass(frozen=True)
class Entry:
    """One tensor in the weights file: its dtype, shape and bytes ``start:stop``."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


def header(mapping: mmap.mmap | None) -> dict[str, Entry]:
    """The tensors of a safetensors file: an 8-byte little-endian header length, a JSON
    header of name -> {dtype, shape, data_offsets}, then the data (offsets from its
    start). Raises ValueError saying what does not hold."""
    if mapping is None or len(mapping) < 8:
        raise ValueError("shorter than a header")
    length = int.from_bytes(mapping[:8], "little")
    if 8 + length > len(mapping):
        raise ValueError(f"a header of {length} bytes in a file of {len(mapping)}")
    try:
        parsed = json.loads(mapping[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the header is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValueError("the header is not a JSON object")
    entries = {}
    for name, info in parsed.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(info["dtype"]), tuple(int(n) for n in info["shape"])
            start, stop = (8 + length + int(offset) for offset in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"tensor {name!r}: a malformed entry ({exc})") from None
        size = ITEMSIZE.get(dtype)
        if size is None or min(shape, default=0) < 0:
            raise ValueError(f"tensor {name!r}: dtype {dtype} or shape {list(shape)}")
        if not 8 + length <= start <= stop <= len(mapping) or stop - start != prod(shape) * size:
            raise ValueError(f"tensor {name!r}: its bytes are out of place")
        entries[str(name)] = Entry(dtype, shape, start, stop)
    return entries


ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
ITEMSIZE |= {"U8": 1, "BOOL": 1}


def views(mapping: mmap.mmap, entries: dict[str, Entry]) -> dict[str, torch.Tensor]:
    """Every tensor of ``entries`` (all float32), a view on ``mapping``."""
    state = {}
    for name, entry in entries.items():
        count = prod(entry.shape)
        if count == 0:  # frombuffer refuses an empty view
            state[name] = torch.empty(entry.shape, dtype=torch.float32)
            continue
        flat = torch.frombuffer(mapping, dtype=torch.float32, count=count, offset=entry.start)
        state[name] = flat.view(entry.shape)
    return state
