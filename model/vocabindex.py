"""The vocabulary index: (field, lookup key) -> index, in flat arrays a file can hold.

One index covers every embedded field of a checkpoint. Each vocabulary value's
lookup key (``model.features.value_key``: the value, or past ``KEY_CHARS`` its
digest key) is hashed to a 128-bit xxh3 digest seeded by the field's position
``j`` among the embedded fields, ``xxh3_128(UTF-8 (surrogatepass) of key,
seed=field_seed(j))``, so one value in two fields gives two unrelated digests.
The seed is ``(j + 1)`` times 2^64 over the golden ratio (mod 2^64), not ``j``:
xxh3 adds the seed into a short key's 32-bit word, so with seeds 0, 1, 2... the
digests of 1-3-byte keys of different fields share hi words by the thousand
(and could collide whole); seeds that differ in their high 32 bits keep them
apart, while with one seed each half of a short key's digest is a bijection.
The index is three arrays of one length, sorted by ``hi``:

    hi   uint64   the digest's first 8 bytes (a little-endian word)
    lo   uint64   its last 8 bytes
    ids  int32    the value's index in its vocabulary (1-based; 0 is OOV)

A fourth array, ``starts`` (uint32), holds where each bucket of the top
``bucket_bits(n)`` bits of ``hi`` begins (about 2-4 entries a bucket). A lookup
hashes its keys the same way, goes to each key's bucket, steps to the first
``hi`` not below the key's (a couple of reads, where a binary search over
millions of entries makes two dozen cache misses) and is a match only when
``lo`` is equal too. Equal ``hi`` words of different digests (about n^2 / 2^65
pairs) are searched through exactly. The index is exact for the vocabulary's
own keys; a key that is not in it is taken for one that is only when their
128-bit digests collide (about n / 2^128 per lookup: never, in practice). A
key that appears twice in one field's vocabulary gives its last index, as the
dict it replaces did.

It costs 20 bytes per value and at most 2 of bucket starts, whatever the
values' length. Saved to a file (``save``: written beside it and renamed into
place), it is opened as a read-only memory map (``open``): every process that
opens the same file shares its pages through the page cache instead of holding
a copy.

    <file>  magic (8 bytes) | header length (8 bytes, little-endian) | JSON header
            (count, sizes, label, shared_hi), padded to 64 bytes | hi | lo | ids
            | starts (2^bucket_bits(count) + 1 of them)
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
from collections.abc import Iterable, Sequence
from itertools import repeat
from pathlib import Path

import numpy as np
import numpy.typing as npt
from xxhash import xxh3_128_digest

MAGIC = b"CTRVIDX\x02"  # the last byte is the format version
ALIGN = 64
GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio
MASK64 = (1 << 64) - 1
# No lookup key is "\n": a vocabulary holds one value a line (no value contains "\n")
# and a digest key is "\n#" and 32 hex digits. A missing value is looked up as it.
NOT_A_KEY = "\n"

U64 = npt.NDArray[np.uint64]


class IndexFileError(ValueError):
    """A vocabulary index file is missing, truncated or not an index file."""


def field_seed(field: int) -> int:
    """The xxh3 seed of embedded field ``field``: a multiple of 2^64 / golden ratio, so
    that any two fields' seeds differ in their high 32 bits (see the module doc)."""
    return ((field + 1) * GOLDEN) & MASK64


MAX_FIELDS = 1 << 12
CACHED_ENTRIES = 1 << 17  # an index this small (its hi words: 1 MiB) stays in cache
SEEDS = tuple(map(field_seed, range(MAX_FIELDS)))  # looked up in C, per key


def digests(keys: Sequence[str], fields: Iterable[int]) -> npt.NDArray[np.uint64]:
    """The digest of every key in its field (``fields`` runs along ``keys``, and may be
    longer): ``len(keys) x 2`` (hi, lo) uint64. One pass in C: no Python code runs per
    key. (A missing value's key is ``NOT_A_KEY``: ``model.features.lookup_keys``.)
    """
    encoded = list(map(str.encode, keys, repeat("utf-8"), repeat("surrogatepass")))
    joined = b"".join(map(xxh3_128_digest, encoded, map(SEEDS.__getitem__, fields)))
    return np.frombuffer(joined, dtype="<u8").astype(np.uint64, copy=False).reshape(-1, 2)


class VocabIndex:
    """The lookup keys of every embedded field's vocabulary, sorted by digest."""

    def __init__(
        self,
        hi: U64,
        lo: U64,
        ids: npt.NDArray[np.int32],
        sizes: tuple[int, ...],
        *,
        label: str = "",
        shared_hi: bool,
        starts: npt.NDArray[np.uint32] | None = None,
    ) -> None:
        """Arrays as ``build`` makes them (sorted by ``hi``, equal ``hi`` by ``lo``);
        ``starts``: the buckets' (``bucket_bits``), worked out when not given."""
        if not len(hi) == len(lo) == len(ids):
            raise ValueError("hi, lo and ids differ in length")
        self.hi, self.lo, self.ids = hi, lo, ids
        self.bits = bucket_bits(len(hi))
        if starts is None:
            bounds = np.arange(1 << self.bits, dtype=np.uint64) << np.uint64(64 - self.bits)
            found = np.searchsorted(hi, bounds) if self.bits else np.zeros(1, dtype=np.intp)
            starts = np.append(found, len(hi)).astype(np.uint32)
        if len(starts) != (1 << self.bits) + 1:
            raise ValueError(f"{len(starts)} bucket starts, expected {(1 << self.bits) + 1}")
        self.starts = starts
        self.sizes = sizes  # values per field
        self.label = label  # what the index is of (a checkpoint version)
        self.shared_hi = shared_hi  # whether two entries share a hi word

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, vocabularies: Iterable[Sequence[str]], *, label: str = "") -> VocabIndex:
        """The index of each field's lookup keys (in order: key ``i`` has index ``i + 1``).

        ``vocabularies`` is read one field at a time, so a generator keeps one field's
        keys in memory at most.
        """
        parts: list[npt.NDArray[np.uint64]] = []
        sizes: list[int] = []
        for j, keys in enumerate(vocabularies):
            if j >= MAX_FIELDS:
                raise ValueError(f"more than {MAX_FIELDS} fields")
            if NOT_A_KEY in keys:
                raise ValueError(f"field {j}: {NOT_A_KEY!r} is no lookup key")
            parts.append(digests(keys, repeat(j)))
            sizes.append(len(keys))
        both = np.concatenate(parts) if parts else np.empty((0, 2), dtype=np.uint64)
        ids = np.concatenate([np.arange(1, n + 1, dtype=np.int32) for n in [0, *sizes]])
        field = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        # Stable: equal digests keep their order, so the last of a repeated key is last.
        order = np.argsort(both[:, 0], kind="stable")
        hi, lo, ids, field = (
            both[order, 0],
            both[order, 1],
            ids[order].astype(np.int32),
            field[order],
        )
        shared = np.flatnonzero(hi[1:] == hi[:-1])
        if len(shared):
            hi, lo, ids = _order_equal_hi(hi, lo, ids, field, shared)
        return cls(
            np.ascontiguousarray(hi),
            np.ascontiguousarray(lo),
            ids,
            tuple(sizes),
            label=label,
            shared_hi=bool(len(hi) > 1 and np.any(hi[1:] == hi[:-1])),
        )

    def find(self, keys: Sequence[str], fields: Iterable[int]) -> npt.NDArray[np.int64]:
        """The index of every key in its field (``fields`` runs along ``keys``); a key
        not in the field's vocabulary (``NOT_A_KEY`` among them) gives 0."""
        if not len(keys) or not len(self.ids):
            return np.zeros(len(keys), dtype=np.int64)
        query = digests(keys, fields)
        q_hi, q_lo = query[:, 0], query[:, 1]
        at = self._first_at_least(q_hi)
        np.minimum(at, len(self.hi) - 1, out=at)
        same_hi = self.hi[at] == q_hi
        found = same_hi & (self.lo[at] == q_lo)
        out = np.where(found, self.ids[at], 0).astype(np.int64)
        if self.shared_hi:
            # A hi word shared by several entries: the one at ``at`` is the run's first.
            for i in np.flatnonzero(same_hi & ~found).tolist():
                stop = int(np.searchsorted(self.hi, q_hi[i], side="right"))
                match = np.flatnonzero(self.lo[at[i] : stop] == q_lo[i])
                if len(match):
                    out[i] = self.ids[at[i] + match[0]]
        return out

    def _first_at_least(self, q_hi: U64) -> npt.NDArray[np.intp]:
        """``np.searchsorted(self.hi, q_hi)``, but from each key's bucket: a couple of
        reads a key where a binary search over millions makes two dozen cache misses.

        Each round costs a few array operations of about a microsecond each, which a
        call of one row pays in full: an index small enough to stay in the CPU's cache
        is searched by ``np.searchsorted`` at once instead."""
        hi = self.hi
        if len(hi) <= CACHED_ENTRIES:  # in cache: a binary search is one operation
            return np.searchsorted(hi, q_hi)
        if self.bits:
            bucket = (q_hi >> np.uint64(64 - self.bits)).astype(np.intp)
        else:
            bucket = np.zeros(len(q_hi), dtype=np.intp)
        at = self.starts[bucket].astype(np.intp)
        stop = self.starts[bucket + 1].astype(np.intp)
        pending = np.flatnonzero(at < stop)
        while len(pending):  # as many rounds as the fullest bucket asked for has entries
            pending = pending[hi[at[pending]] < q_hi[pending]]
            at[pending] += 1
            pending = pending[at[pending] < stop[pending]]
        return at

    def lookup(self, field: int, keys: Sequence[str]) -> npt.NDArray[np.int64]:
        """The index of every key in field ``field`` (0: unseen, or ``NOT_A_KEY``)."""
        return self.find(keys, repeat(field))

    def save(self, path: Path) -> None:
        """Write the index to ``path``, beside it first, then renamed into place: a
        reader sees the whole file or none."""
        header = json.dumps(
            {
                "count": len(self),
                "sizes": list(self.sizes),
                "label": self.label,
                "shared_hi": self.shared_hi,
            }
        ).encode()
        start = -(-(len(MAGIC) + 8 + len(header)) // ALIGN) * ALIGN
        header += b" " * (start - len(MAGIC) - 8 - len(header))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + len(header).to_bytes(8, "little") + header)
                for array in (self.hi, self.lo, self.ids, self.starts):
                    f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
                f.flush()
                os.fsync(f.fileno())
            Path(tmp).chmod(0o644)  # mkstemp's 0600: workers may run as another user
            Path(tmp).replace(path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def open(cls, path: Path) -> VocabIndex:
        """The index in ``path``, as read-only views on a shared memory map of it."""
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except (OSError, ValueError) as exc:
            raise IndexFileError(f"{path}: {exc}") from None
        if mapping is None or mapping[: len(MAGIC)] != MAGIC:
            raise IndexFileError(f"{path}: not a vocabulary index (format {MAGIC[-1]})")
        try:
            length = int.from_bytes(mapping[len(MAGIC) : len(MAGIC) + 8], "little")
            start = len(MAGIC) + 8 + length
            header = json.loads(mapping[len(MAGIC) + 8 : start])
            count, sizes = int(header["count"]), tuple(int(n) for n in header["sizes"])
            label, shared_hi = str(header["label"]), bool(header["shared_hi"])
        except (ValueError, KeyError, TypeError) as exc:
            raise IndexFileError(f"{path}: a malformed header: {exc}") from None
        buckets = (1 << bucket_bits(count)) + 1
        if size != start + 20 * count + 4 * buckets or count != sum(sizes):
            expected = start + 20 * count + 4 * buckets
            raise IndexFileError(f"{path}: {size} bytes, not the {expected} of its header")
        hi = np.frombuffer(mapping, dtype="<u8", count=count, offset=start)
        lo = np.frombuffer(mapping, dtype="<u8", count=count, offset=start + 8 * count)
        ids = np.frombuffer(mapping, dtype="<i4", count=count, offset=start + 16 * count)
        starts = np.frombuffer(mapping, dtype="<u4", count=buckets, offset=start + 20 * count)
        return cls(hi, lo, ids, sizes, label=label, shared_hi=shared_hi, starts=starts)


def bucket_bits(count: int) -> int:
    """How many high bits of ``hi`` pick an entry's bucket: about 2 to 4 entries a
    bucket, at most 2 bytes of bucket starts a value."""
    return max(count.bit_length() - 2, 0)


def _order_equal_hi(
    hi: U64,
    lo: U64,
    ids: npt.NDArray[np.int32],
    field: npt.NDArray[np.int32],
    shared: npt.NDArray[np.intp],
) -> tuple[U64, U64, npt.NDArray[np.int32]]:
    """Sort each run of equal hi words by lo, and keep the last of a repeated key.

    ``shared``: the positions ``i`` where ``hi[i] == hi[i + 1]``. Two equal digests in
    one field are one key twice (its last index wins, as in a dict); in two fields they
    would be a 128-bit collision, which an index cannot tell apart: refused.
    """
    keep = np.ones(len(hi), dtype=bool)
    starts = shared[np.r_[True, shared[1:] != shared[:-1] + 1]]
    for start in starts.tolist():
        stop = start + 1
        while stop < len(hi) and hi[stop] == hi[start]:
            stop += 1
        run = slice(start, stop)
        order = np.argsort(lo[run], kind="stable")
        lo[run], ids[run], field[run] = lo[run][order], ids[run][order], field[run][order]
        for i in range(start, stop - 1):
            if lo[i] == lo[i + 1]:
                if field[i] != field[i + 1]:
                    raise ValueError(
                        f"a value of field {field[i]} and one of field {field[i + 1]} share "
                        "a 128-bit digest"
                    )
                keep[i] = False
    return hi[keep], lo[keep], ids[keep]
