"""A user's preferences: what their new sessions start with (template, the LLM provider tried
first, how long idle before hibernating and before ending). Stored per user; each unset one
is the system's default, read when a session starts, so a changed default applies to it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlmodel import Session

import vm_templates
from api.deps import DbDep, IpDep, Problem, SettingsDep, UserDep
from api.problems import problems
from api.schemas import PreferenceDefaults, Preferences, PreferencesOut
from config.settings import Settings
from llm.providers import model_names, provider_configs
from store import audit
from store.models import User, UserPreferences, utcnow

# Every route under /api may be refused for its input (as api/routes.py).
router = APIRouter(prefix="/api", tags=["preferences"], responses=problems(422))


def load(db: Session, user: User) -> UserPreferences:
    """The user's preferences; a user who never set any has every default."""
    return db.get(UserPreferences, user.id) or UserPreferences(user_id=user.id)


def models(settings: Settings) -> list[str]:
    """The models a user may prefer: the configured providers' names and models."""
    return model_names(provider_configs(settings))


def problems_with(settings: Settings, wanted: Preferences) -> list[dict[str, Any]]:
    """What the configuration refuses in ``wanted``, as a problem document's ``errors``."""
    found: list[tuple[str, str]] = []
    if wanted.template is not None and wanted.template not in vm_templates.names():
        found.append(("template", f"no such template; known: {', '.join(vm_templates.names())}"))
    if wanted.model is not None and wanted.model not in models(settings):
        known = ", ".join(models(settings)) or "none: no LLM provider is configured"
        found.append(("model", f"no such model or provider; known: {known}"))
    hibernate = wanted.hibernate_after_s or settings.session_hibernate_after_s
    idle = wanted.idle_timeout_s or settings.session_idle_timeout_s
    chosen = wanted.hibernate_after_s is not None or wanted.idle_timeout_s is not None
    if chosen and hibernate is not None and hibernate >= idle:
        # Otherwise the session would end before its sandbox ever hibernated.
        field = "hibernate_after_s" if wanted.hibernate_after_s is not None else "idle_timeout_s"
        found.append((field, f"hibernate after ({hibernate:g} s) must be shorter than the "
                             f"idle timeout ({idle:g} s)"))  # fmt: skip
    return [{"loc": ["body", name], "msg": msg, "type": "value_error"} for name, msg in found]


def save(db: Session, settings: Settings, user: User, wanted: Preferences, ip: str) -> None:
    errors = problems_with(settings, wanted)
    if errors:
        where = ", ".join(str(e["loc"][-1]) for e in errors)
        raise Problem(422, f"invalid preferences: {where}", errors=errors)
    row = load(db, user)
    row.sqlmodel_update(wanted.model_dump())
    row.updated_at = utcnow()
    db.add(row)
    db.commit()
    audit.record(db, user.id, "preferences.update", user.id, wanted.model_dump(), ip=ip)


def preferences_out(db: Session, settings: Settings, user: User) -> PreferencesOut:
    row = load(db, user)
    return PreferencesOut(
        **Preferences.model_validate(row, from_attributes=True).model_dump(),
        defaults=PreferenceDefaults(
            template=vm_templates.DEFAULT,
            hibernate_after_s=settings.session_hibernate_after_s,
            idle_timeout_s=settings.session_idle_timeout_s,
        ),
        templates=vm_templates.names(),
        models=models(settings),
    )


@router.get("/preferences", responses=problems(401))
def get_preferences(db: DbDep, settings: SettingsDep, user: UserDep) -> PreferencesOut:
    """The caller's preferences (null: the default, given in ``defaults``), and the
    templates and models they may choose from."""
    return preferences_out(db, settings, user)


@router.put("/preferences", responses=problems(401))
def put_preferences(
    body: Preferences, db: DbDep, settings: SettingsDep, user: UserDep, ip: IpDep
) -> PreferencesOut:
    """Replaces the caller's preferences (a field left out is the default again). They
    apply to sessions started from now on."""
    save(db, settings, user, body, ip)
    return preferences_out(db, settings, user)
