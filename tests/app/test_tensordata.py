"""BYTES tensor data decodes to its elements whatever their lengths and characters, by
the fast paths (one length or empty, ASCII) and the general one alike."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.tensordata import BinaryDataError, _strings


def encoded(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)


# Characters that look like length prefixes inside an element, and non-ASCII ones.
TRICKY = st.sampled_from(["a", "0", "\0", "\x08", "\x04", "\n", "é", "\u2028"])


@given(
    st.one_of(
        st.lists(st.text(TRICKY, min_size=8, max_size=8) | st.just(""), max_size=30),
        st.lists(st.text(TRICKY, max_size=12), max_size=30),
    )
)
def test_every_chunk_decodes_to_its_elements(values: list[str]) -> None:
    assert _strings(encoded(values), "C1") == values


@pytest.mark.parametrize(
    "values",
    [
        ["05db9164"] * 5,
        ["05db9164", "", "68fd1e64", "", ""],
        ["", "", "05db9164"],
        ["", ""],
        ["ab", "abc", "", "a"],
        ["\x08\0\0\0abcd", "", "x" * 8],  # an element holding a prefix's bytes
    ],
)
def test_ids_with_missing_ones(values: list[str]) -> None:
    assert _strings(encoded(values), "C1") == values


@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        (encoded(["abcd", "abcd"])[:-1], "cut off"),
        (encoded(["abcd", ""]) + b"\1\0", "length is cut off"),
        (encoded(["abcd"]) + b"\xff", "cut off"),
    ],
)
def test_a_broken_chunk_is_refused(chunk: bytes, message: str) -> None:
    with pytest.raises(BinaryDataError, match=message):
        _strings(chunk, "C1")
