"""The short CI run of scripts/chaos_folders.py: real nodes, random edits and kill -9.

The long run is by hand (`python scripts/chaos_folders.py --duration 300`); this
one only has to show that the trees converge and no version is lost while nodes
die mid-sync.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "chaos_folders.py"


@pytest.mark.slow
def test_a_short_chaos_run_converges_and_loses_nothing(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--nodes", "4", "--duration", "15", "--kill-every", "5",
         "--seed", "7", "--dir", str(tmp_path / "chaos"), "--json"],
        capture_output=True, text=True, timeout=240, check=False)
    assert res.stdout.strip(), f"no output; stderr:\n{res.stderr[-2000:]}"
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["ops"]["kill"] >= 1, result  # nodes really died mid-run
    assert sum(result["ops"].values()) > 40, result
    assert result["converged_s"] is not None, result
    assert result["lost"] == 0, result
    assert res.returncode == 0, res.stderr[-2000:]
