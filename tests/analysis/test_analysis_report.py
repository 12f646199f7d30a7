"""The command line on a small trained run (``routing_fixtures``): ``all`` writes every analysis
and the HTML report, ``--report`` rebuilds the page, and a bad request is a one-line error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from remoe_patches.analysis import analysis_report

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent.parent


def test_command_line_all_and_report(routing_run, tmp_path):
    out = tmp_path / "analysis"
    tool = str(REPO / "tools" / "analyze_routing.py")
    result = subprocess.run(
        [
            sys.executable,
            tool,
            "all",
            str(routing_run),
            "--documents",
            "all",
            "--num-sequences",
            "4",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in analysis_report.REPORT_ORDER:
        assert (out / f"{name}.png").is_file() and (out / f"{name}.csv").is_file(), name
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    assert "Routing stability" in page and "per_domain.csv" in page
    # --report alone rebuilds the page from a run directory's analysis/ folder
    (out / "index.html").unlink()
    result = subprocess.run(
        [sys.executable, tool, "--report", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "index.html").is_file()
    bad = subprocess.run(
        [sys.executable, tool, "stability", str(routing_run / "iter_0000006")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "two or more checkpoints" in bad.stderr.strip().splitlines()[-1]
