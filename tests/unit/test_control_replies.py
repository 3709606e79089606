"""Typed control replies of `events` and `log`: round trips, what was cut, bad replies."""

from __future__ import annotations

import pytest

from node.control import EventsPage, LogPage
from node.errors import ProtocolError


def test_events_page_round_trips_and_says_more() -> None:
    page = EventsPage(last_id=1000, shown=1000, older=0, newer=234)
    obj = page.to_json()
    assert obj["more"] is True and obj["next_since"] == 1000
    assert EventsPage.from_json(obj) == page
    assert not EventsPage(5, 5, 0, 0).more


def test_log_page_round_trips_and_reads_older_nodes() -> None:
    rows = [{"path": "a"}, {"path": "b"}]
    page = LogPage(rows, total=4321, limit=2, limit_max=10_000)
    assert page.more and LogPage.from_json(page.to_json()) == page
    old = LogPage.from_json(rows)  # a node that answered with the rows only
    assert old.events == rows and not old.more


@pytest.mark.parametrize("bad", [None, [], {"last_id": -1}, {"shown": "3"},
                                 {"newer": True}])
def test_bad_events_replies_are_refused(bad) -> None:
    with pytest.raises(ProtocolError):
        EventsPage.from_json(bad)


@pytest.mark.parametrize("bad", [None, {"events": "x"}, {"events": [1]},
                                 {"events": [], "total": -2}])
def test_bad_log_replies_are_refused(bad) -> None:
    with pytest.raises(ProtocolError):
        LogPage.from_json(bad)
