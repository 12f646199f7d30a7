"""Rows of dicts as a CSV file: the one CSV writer of the analyses and the sweep tables."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np


def write_csv(path: Path, rows: list, *, line_end: str = "\n") -> Path:
    """Write ``rows`` to ``path``: the columns in order of first appearance, None as empty,
    floats (numpy's too) as their shortest exact decimal; ``path`` back."""
    fields = []
    for row in rows:
        fields += [key for key in row if key not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator=line_end)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(row.get(key)) for key in fields})
    path.write_text(buffer.getvalue())
    return path


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        # numpy 2 scalars repr as np.float64(...): written as the plain float
        return repr(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value
