"""Pre-authentication and abuse measurements, one module per attacked surface.

Each module defines ``run(quick: bool = False) -> list[Row]`` and may be run on
its own; ``scripts/bench_attacks.py`` runs them all and prints one table. Every
attack sends traffic to 127.0.0.1 only, is bounded in count and time, and tears
down every process and socket it started.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class Row:
    """One measured figure: what was attacked, what was measured, and its target."""

    attack: str
    metric: str
    value: float
    unit: str
    target: str = ""
    ok: bool | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
