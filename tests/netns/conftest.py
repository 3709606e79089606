"""Fixtures of the netns tests (real NATs in network namespaces, root only).

Every test here is marked ``netns`` (and ``slow``). Where namespaces cannot be
built (not root, no ``ip``/``iptables``, a kernel or container that refuses),
the tests are skipped with a message that says why, and the rest of the suite
runs as usual. ``.ci/run`` installs iproute2 and iptables when it runs as root.

``require_netns`` is the skip check alone (for any lab); ``nat_lab`` builds a
``NatLab`` (tests/netns/nat_lab.py) with unique namespace names and tears it
down after the test, whether it passed, failed or was interrupted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.netns.nat_lab import NatLab, lab_unavailable_reason


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.netns)
            item.add_marker(pytest.mark.slow)


@functools.cache
def _unavailable() -> str | None:
    return lab_unavailable_reason()


@pytest.fixture
def require_netns() -> None:
    reason = _unavailable()
    if reason is not None:
        pytest.skip(f"netns lab skipped: {reason}")


@pytest.fixture
def nat_lab(require_netns: None, tmp_path: Path) -> Iterator[Callable[..., NatLab]]:
    """``nat_lab(random_fully=bool)`` -> a built lab, torn down after the test."""
    labs: list[NatLab] = []

    def make(*, random_fully: bool = False) -> NatLab:
        lab = NatLab(tmp_path / f"lab{len(labs)}", random_fully=random_fully)
        labs.append(lab)  # before build(): a half-built lab is torn down too
        (tmp_path / f"lab{len(labs) - 1}").mkdir(parents=True, exist_ok=True)
        return lab.build()

    try:
        yield make
    finally:
        for lab in labs:
            lab.teardown()
