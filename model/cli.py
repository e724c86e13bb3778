"""Command-line arguments shared by the training and evaluation CLIs: data files and columns."""

from __future__ import annotations

import argparse
from pathlib import Path

from model.data import CRITEO_SCHEMA, FORMATS, Format, Schema, guess_format


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", type=Path, nargs="+", required=True, help="data files, in order")
    group.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="criteo (raw TSV, no header), csv or parquet; default: from the file suffix",
    )
    group.add_argument("--label", default=None, help="label column (csv, parquet)")
    group.add_argument("--dense", default=None, help="comma-separated dense (numeric) columns")
    group.add_argument(
        "--sparse", default=None, help="comma-separated sparse (categorical) columns"
    )


def names(value: str | None) -> tuple[str, ...]:
    """A comma-separated list of names."""
    return tuple(n.strip() for n in value.split(",") if n.strip()) if value else ()


def data_format(args: argparse.Namespace) -> Format:
    fmt: Format = args.format or guess_format(args.data[0])
    return fmt


def schema_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Schema:
    """The Criteo schema for criteo files unless columns are named; else the named columns."""
    if data_format(args) == "criteo" and not (args.label or args.dense or args.sparse):
        return CRITEO_SCHEMA
    if not args.label or not (args.dense or args.sparse):
        parser.error("--label and at least one of --dense/--sparse are needed for this format")
    return Schema(args.label, names(args.dense), names(args.sparse))
