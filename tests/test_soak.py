"""A short soak: load, reloads, bad inputs and restarts with no unexpected error."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.tiny import write_tiny


def test_short_soak_reports_zero_unexpected_errors(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "cnnserve", "soak", "--minutes", "0.2",
         "--repository", str(tmp_path), "--model", "tiny", "--concurrency", "3",
         "--reload-every", "3", "--restart-every", "5"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    totals = dict(re.findall(r"^([a-z (),]+?)\s{2,}(\d+)", result.stdout, re.MULTILINE))
    assert int(totals["ok"]) > 100
    assert int(totals["expected errors"]) > 10
    assert int(totals["unexpected errors"]) == 0
    assert re.search(r"\d+ reloads, [12] restarts", result.stdout)
    assert re.search(r"max server RSS\s+\d+ MiB", result.stdout)
