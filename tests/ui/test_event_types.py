"""Event types are one enumeration: the dashboard draws each member by a macro of its name,
the templates name no type the enumeration lacks, and a type it does not know raises
instead of being drawn by a fallback."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from store.events import EventType
from store.models import Event
from ui.live import render_batch
from ui.render import templates

TEMPLATES = Path(__file__).resolve().parents[2] / "ui" / "templates"


def event(type: str, **data: object) -> Event:
    return Event(session_id="s", seq=1, type=type, data=data, created_at=datetime.now(UTC))


def test_values_are_the_stored_strings() -> None:
    # Stored in databases and recorded histories: a member's name is its value, dot to '_'.
    assert all(m.name == m.value.replace(".", "_") for m in EventType)
    assert EventType("session.status") is EventType.session_status


def test_every_member_has_a_live_macro() -> None:
    fragments = templates.get_template("events.html").module
    missing = [m.name for m in EventType if not callable(getattr(fragments, m.name, None))]
    assert missing == []


def test_templates_compare_only_known_types() -> None:
    compared = {
        found
        for page in TEMPLATES.glob("*.html")
        for found in re.findall(r"""e\.type\s*==\s*["']([^"']+)["']""", page.read_text())
    }
    assert compared, "the pattern no longer finds the templates' comparisons"
    assert compared <= {m.value for m in EventType}


def test_a_timeline_only_event_is_drawn_as_a_log_line() -> None:
    message = render_batch(create_engine("sqlite://"), [event("sandbox.woken", sandbox_id="x")])
    assert "machine woke up" in message


def test_an_unknown_type_raises() -> None:
    with pytest.raises(ValueError, match=r"sandbox\.wokne"):
        render_batch(create_engine("sqlite://"), [event("sandbox.wokne")])
