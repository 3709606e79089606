"""pyproject.toml stays free of the metadata forms setuptools warns about on install."""

from __future__ import annotations

import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_license_is_an_spdx_string_and_the_backend_understands_it() -> None:
    data = tomllib.loads(PYPROJECT.read_text())
    # a table (`{ text = "MIT" }`) makes every install print a deprecation banner
    assert isinstance(data["project"]["license"], str)
    requires = data["build-system"]["requires"]
    # SPDX strings need setuptools >= 77; an older backend would reject the string
    assert any(r.replace(" ", "").startswith("setuptools>=") and
               int(r.split(">=")[1].split(".")[0]) >= 77 for r in requires)
