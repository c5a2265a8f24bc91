"""Durable records: the SQLite database of tasks and sessions, and this gpud's instance id."""

from __future__ import annotations

from gpud.state.db import SCHEMA_VERSION, Database, RecordsError, open_database
from gpud.state.instance import instance_id
from gpud.state.rows import SessionRow, TaskRow
from gpud.state.writer import RowWriter

__all__ = [
    "SCHEMA_VERSION",
    "Database",
    "RecordsError",
    "RowWriter",
    "SessionRow",
    "TaskRow",
    "instance_id",
    "open_database",
]
