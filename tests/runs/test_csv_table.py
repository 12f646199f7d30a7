"""The shared CSV writer: columns in order of first appearance, empty for None, floats exact."""

from __future__ import annotations

import numpy as np

from remoe_patches.runs.csv_table import write_csv


def test_columns_values_and_line_ends(tmp_path):
    rows = [dict(a=1, b=None), dict(b=np.float64(0.1), c=np.int64(3), d="x,y")]
    path = write_csv(tmp_path / "t.csv", rows)
    assert path.read_text() == 'a,b,c,d\n1,,,\n,0.1,3,"x,y"\n'
    write_csv(tmp_path / "crlf.csv", rows, line_end="\r\n")
    assert (tmp_path / "crlf.csv").read_bytes() == b'a,b,c,d\r\n1,,,\r\n,0.1,3,"x,y"\r\n'
