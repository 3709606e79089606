"""The NAT lab says why it cannot run (it is skipped with that message, the suite goes on)."""

from __future__ import annotations

import pytest

from tests.netns import nat_lab


def test_not_root_is_a_clear_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nat_lab.os, "geteuid", lambda: 1000)
    reason = nat_lab.lab_unavailable_reason()
    assert reason is not None and "needs root" in reason


def test_missing_tool_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nat_lab.os, "geteuid", lambda: 0)
    monkeypatch.setattr(nat_lab.shutil, "which",
                        lambda tool: None if tool == "iptables" else "/usr/sbin/" + tool)
    reason = nat_lab.lab_unavailable_reason()
    assert reason is not None and "iptables" in reason and "apt-get install" in reason
