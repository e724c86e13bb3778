import json
import logging
import sys

import pytest

from app.logs import JsonFormatter


def test_one_json_object_per_event_with_extra_fields_and_exceptions() -> None:
    formatter = JsonFormatter()
    record = logging.makeLogRecord(
        {
            "name": "app.x",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": "redis %s",
            "args": ("down",),
            "episode": 3,
        }
    )
    event = json.loads(formatter.format(record))
    assert event["level"] == "warning" and event["logger"] == "app.x"
    assert event["message"] == "redis down" and event["episode"] == 3
    assert event["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.makeLogRecord({"msg": "failed", "exc_info": sys.exc_info()})
    line = formatter.format(record)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exception"]


def test_unserialisable_extras_are_written_as_text() -> None:
    record = logging.makeLogRecord({"msg": "x", "path": pytest})
    assert "module 'pytest'" in json.loads(JsonFormatter().format(record))["path"]
