import math
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from model.checkpoint import Checkpoint
from model.data import (
    CRITEO_SCHEMA,
    Chunk,
    count_rows,
    criteo_json_rows,
    encode_to_disk,
    guess_format,
    read_chunks,
    take_rows,
)
from model.predict import Predictor


def read_all(path: Path, fmt: str, **kwargs: int) -> Chunk:
    chunks = list(read_chunks([path], fmt, CRITEO_SCHEMA, **kwargs))  # type: ignore[arg-type]
    return Chunk(
        np.concatenate([c.labels for c in chunks]),
        {k: np.concatenate([c.columns[k] for c in chunks]) for k in chunks[0].columns},
    )


def assert_same_rows(a: Chunk, b: Chunk) -> None:
    np.testing.assert_array_equal(a.labels, b.labels)
    for name in CRITEO_SCHEMA.dense:
        np.testing.assert_array_equal(a.columns[name], b.columns[name])
    for name in CRITEO_SCHEMA.sparse:
        assert a.columns[name].tolist() == b.columns[name].tolist()


def test_criteo_tsv_parses(criteo_tsv: Path) -> None:
    rows = read_all(criteo_tsv, "criteo")
    assert len(rows) == 200 == count_rows([criteo_tsv], "criteo")
    assert set(np.unique(rows.labels)) <= {0.0, 1.0}
    # The first line: 0, I1 empty, I2 = 3, I3 = 260, ..., C1 = 05db9164, C20 empty.
    assert math.isnan(rows.columns["I1"][0])
    assert rows.columns["I2"][0] == 3.0 and rows.columns["I3"][0] == 260.0
    assert rows.columns["C1"][0] == "05db9164" and rows.columns["C20"][0] is None
    assert rows.columns["I2"][1] == -1.0


def test_criteo_csv_with_header_gives_the_same_rows(criteo_tsv: Path, criteo_csv: Path) -> None:
    assert count_rows([criteo_csv], "csv") == 200
    assert_same_rows(read_all(criteo_csv, "csv"), read_all(criteo_tsv, "criteo"))


def test_parquet_gives_the_same_rows(criteo_csv: Path, tmp_path: Path) -> None:
    path = tmp_path / "sample.parquet"
    pq.write_table(pacsv.read_csv(criteo_csv), path)
    assert count_rows([path], "parquet") == 200
    assert_same_rows(read_all(path, "parquet"), read_all(criteo_csv, "csv"))


def test_small_blocks_stream_the_same_rows(criteo_tsv: Path) -> None:
    chunks = list(read_chunks([criteo_tsv], "criteo", CRITEO_SCHEMA, block_bytes=4096))
    assert len(chunks) > 5
    assert_same_rows(
        read_all(criteo_tsv, "criteo", block_bytes=4096), read_all(criteo_tsv, "criteo")
    )


def test_format_from_suffix() -> None:
    assert guess_format(Path("a.parquet")) == "parquet"
    assert guess_format(Path("a.CSV")) == "csv"
    assert guess_format(Path("day_0")) == "criteo"


def test_count_rows_without_a_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "x.tsv"
    path.write_bytes(b"1\tA\n0\tB")
    assert count_rows([path], "criteo") == 2


def test_count_rows_skips_blank_lines_as_the_parser_does(criteo_tsv: Path, tmp_path: Path) -> None:
    """A trailing blank line used to be counted, and training stopped with a mismatch."""
    lines = criteo_tsv.read_bytes().split(b"\n")[:3]
    path = tmp_path / "blank.tsv"
    path.write_bytes(b"\n" + lines[0] + b"\n\n\n" + lines[1] + b"\n" + lines[2] + b"\n\n")
    read = sum(len(c) for c in read_chunks([path], "criteo", CRITEO_SCHEMA))
    assert count_rows([path], "criteo") == read == 3


def test_missing_label_is_an_error(tmp_path: Path, criteo_tsv: Path) -> None:
    path = tmp_path / "nolabel.tsv"
    path.write_text("\t" + criteo_tsv.read_text().split("\n")[0].split("\t", 1)[1] + "\n")
    with pytest.raises(ValueError, match="no label"):
        list(read_chunks([path], "criteo", CRITEO_SCHEMA))


def test_take_rows_slices_across_chunks(criteo_tsv: Path) -> None:
    chunks = list(read_chunks([criteo_tsv], "criteo", CRITEO_SCHEMA, block_bytes=4096))
    whole = read_all(criteo_tsv, "criteo")
    taken = list(take_rows(iter(chunks), 17, 133))
    assert sum(len(c) for c in taken) == 116
    np.testing.assert_array_equal(np.concatenate([c.labels for c in taken]), whole.labels[17:133])


def test_encoded_rows_on_disk_match_direct_encoding(
    tiny_checkpoint: Checkpoint, criteo_tsv: Path, tmp_path: Path
) -> None:
    spec = tiny_checkpoint.features
    chunks = list(read_chunks([criteo_tsv], "criteo", CRITEO_SCHEMA, block_bytes=4096))
    data = encode_to_disk(chunks, spec, tmp_path)
    whole = read_all(criteo_tsv, "criteo")
    ids, dense = spec.encode(whole.columns, len(whole))
    got_ids, got_dense, got_labels = data.rows(0, 200)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_dense, dense)
    np.testing.assert_array_equal(got_labels, whole.labels)
    # Shuffled batches cover every row once, in another order.
    rng = np.random.default_rng(0)
    batches = list(data.batches(0, 200, 32, rng=rng, block_rows=16, buffer_blocks=3))
    seen = np.concatenate([b[1] for b in batches])  # dense values tell rows apart here
    assert len(seen) == 200 and max(len(b[2]) for b in batches) == 32
    assert not np.array_equal(seen, dense)
    key = lambda a: sorted(map(tuple, a.tolist()))  # noqa: E731
    assert key(seen) == key(dense)
    # In order, without an rng.
    ordered = np.concatenate([b[1] for b in data.batches(50, 150, 40)])
    np.testing.assert_array_equal(ordered, dense[50:150])


def test_sample_rows_predict_alike_from_tsv_csv_and_json_rows(
    tiny_checkpoint: Checkpoint, criteo_tsv: Path, criteo_csv: Path
) -> None:
    predictor = Predictor(tiny_checkpoint)
    tsv, csv = read_all(criteo_tsv, "criteo"), read_all(criteo_csv, "csv")
    from_tsv = predictor.predict_columns(tsv.columns, 200)
    from_csv = predictor.predict_columns(csv.columns, 200)
    rows = criteo_json_rows(criteo_tsv)
    from_rows = predictor.predict_rows(rows)
    assert from_tsv.shape == (200,)
    assert np.all((from_tsv > 0) & (from_tsv < 1))
    np.testing.assert_array_equal(from_tsv, from_csv)
    np.testing.assert_allclose(from_rows, from_tsv, rtol=0, atol=1e-7)
