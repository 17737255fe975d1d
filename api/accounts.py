"""Accounts: sign-up, login, API tokens, admins.

Nothing here tells whether an email is registered: sign-up answers alike for a new and a
taken email, login alike for an unknown email and a wrong password, and both cost one
password hash either way. Attempts are counted per address (and, for failed logins, per
email and address) in the database, and a key over its limit is locked out for a while.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import NoReturn

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from api.problems import Problem
from api.schemas import Credentials, PasswordChange
from api.security import Passwords, new_token_secret, token_hashes
from config.keys import keyed_hash, user_keys
from config.settings import Settings
from store import audit, counters
from store.models import ApiToken, Invite, User, utcnow

# A token's last use is written at most this often: not a database write per request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def _refuse_if_locked(db: Session, *keys: str) -> None:
    until = counters.locked_until(db, *keys)
    if until is not None:
        _refuse_until(until)


def _refuse_until(until: datetime) -> NoReturn:
    wait = max(1, int((until - utcnow()).total_seconds()))
    raise Problem(
        429, f"too many attempts; try again in {wait} s", headers={"Retry-After": str(wait)}
    )


def _limit(db: Session, key: str, most: int, window_s: int, lockout_s: int) -> None:
    """Count an attempt; past ``most`` in the window, lock the key and refuse. Refused too
    when the key was locked as it was counted (an attempt made at once, in any process,
    locked it after this one's first look)."""
    counted = counters.count(db, key, window_s)
    until = counted.locked_until
    if until is None and counted.attempts > most:
        until = counters.lock(db, key, lockout_s)
    if until is not None:
        _refuse_until(until)


def _count_failure(db: Session, settings: Settings, key: str) -> None:
    """A wrong password under ``key``: at ``login_max_failures`` in the window, a lockout."""
    if counters.count(db, key, settings.login_window_s).attempts >= settings.login_max_failures:
        counters.lock(db, key, settings.lockout_s)


def _email_key(email: str) -> str:
    return hashlib.sha256(email.encode()).hexdigest()[:32]


CLOSED = "sign-up is closed on this server (BERTH_SIGNUP=closed): ask its admin for an account"
NEEDS_INVITE = (
    "sign-up is by invite on this server (BERTH_SIGNUP=invite): {why}; ask an admin for an "
    "invite link"
)


def refuse_closed_sign_up(settings: Settings) -> None:
    if settings.signup == "closed":
        raise Problem(403, CLOSED)


async def sign_up(
    db: Session,
    passwords: Passwords,
    settings: Settings,
    credentials: Credentials,
    ip: str,
    invite: str | None = None,
) -> None:
    """Registers the email if it is free; answers the same (and as slowly) if it is not.
    Refused when sign-up is closed, and without a live invite when it is by invite (the
    invite is used up either way, so it tells nothing about the email either)."""
    refuse_closed_sign_up(settings)
    key = f"signup:{ip}"
    _refuse_if_locked(db, key)
    _limit(db, key, settings.signup_max_attempts, settings.signup_window_s, settings.lockout_s)
    if settings.signup == "invite":
        _use_invite(db, settings, invite)
    email = credentials.email.lower()
    user = User(email=email, password_hash=await passwords.hash(credentials.password))
    db.add(user)
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        audit.record(db, None, "signup.taken", _email_key(email), ip=ip)
        return
    audit.record(db, user.id, "signup", user.id, ip=ip)


async def log_in(
    db: Session, passwords: Passwords, settings: Settings, credentials: Credentials, ip: str
) -> User:
    email = credentials.email.lower()
    pair, address = f"login:{_email_key(email)}:{ip}", f"login:{ip}"
    _refuse_if_locked(db, pair, address)
    _limit(db, address, settings.login_max_attempts, settings.login_window_s, settings.lockout_s)
    user = db.exec(select(User).where(User.email == email)).first()
    verdict = await passwords.check(credentials.password, user.password_hash if user else None)
    if user is None or not verdict.ok:
        audit.record(db, user.id if user else None, "login.failed", _email_key(email), ip=ip)
        _count_failure(db, settings, pair)
        raise Problem(401, "wrong email or password")
    counters.clear(db, pair)
    if verdict.rehash:  # an old scheme or weaker parameters: bring it up to today's
        user.password_hash = await passwords.hash(credentials.password)
        db.add(user)
        db.commit()
    audit.record(db, user.id, "login", user.id, ip=ip)
    return user


def _invite_hashes(settings: Settings, code: str) -> list[str]:
    return [keyed_hash(key, "invite", code) for key in user_keys(settings).keys]


def make_invite(db: Session, settings: Settings, admin: User, ip: str | None) -> tuple[Invite, str]:
    """A single-use sign-up code, valid for ``invite_ttl_hours``; shown this once."""
    code = secrets.token_urlsafe(24)
    row = Invite(
        code_hash=_invite_hashes(settings, code)[0],
        created_by=admin.id,
        expires_at=utcnow() + timedelta(hours=settings.invite_ttl_hours),
    )
    db.add(row)
    db.commit()
    db.refresh(row)
    audit.record(db, admin.id, "invite.create", row.id, ip=ip)
    return row, code


def _use_invite(db: Session, settings: Settings, code: str | None) -> None:
    """Marks the invite used, in one statement so two sign-ups cannot both use it."""
    if not code:
        raise Problem(403, NEEDS_INVITE.format(why="this sign-up carries no invite code"))
    used = db.connection().execute(
        update(Invite)
        .where(
            col(Invite.code_hash).in_(_invite_hashes(settings, code)),
            col(Invite.used_at).is_(None),
            col(Invite.expires_at) > utcnow(),
        )
        .values(used_at=utcnow())
    )
    db.commit()
    if used.rowcount != 1:
        why = "this invite is unknown, used already or expired"
        raise Problem(403, NEEDS_INVITE.format(why=why))


def issue_token(
    db: Session, settings: Settings, user: User, name: str, ip: str | None = None
) -> tuple[ApiToken, str]:
    """A new token and its secret, which is shown this once: only its hash is kept."""
    secret = new_token_secret()
    row = ApiToken(
        user_id=user.id,
        name=name,
        token_hash=token_hashes(user_keys(settings), secret)[0],
        expires_at=utcnow() + timedelta(hours=settings.token_ttl_hours),
    )
    db.add(row)
    db.commit()
    audit.record(db, user.id, "token.create", row.id, {"name": name}, ip=ip)
    db.refresh(row)
    return row, secret


def authenticate(db: Session, settings: Settings, secret: str) -> tuple[User, ApiToken] | None:
    """The user and token a bearer secret names, if it is live."""
    hashes = token_hashes(user_keys(settings), secret)
    found = db.exec(
        select(ApiToken, User)
        .join(User, col(User.id) == ApiToken.user_id)
        .where(col(ApiToken.token_hash).in_(hashes), col(ApiToken.revoked_at).is_(None))
    ).first()
    if found is None or found[0].expires_at <= utcnow():
        return None
    token, user = found
    now, changed = utcnow(), False
    if token.token_hash != hashes[0]:
        # Hashed under a previous key: move it to the current one while the grace lasts.
        token.token_hash, changed = hashes[0], True
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        token.last_used_at, changed = now, True
    if changed:
        db.add(token)
        db.commit()
        db.refresh(user)
    return user, token


def list_tokens(db: Session, user: User, limit: int, after: str | None) -> list[ApiToken]:
    query = select(ApiToken).where(
        ApiToken.user_id == user.id,
        col(ApiToken.revoked_at).is_(None),
        col(ApiToken.expires_at) > utcnow(),
    )
    if after is not None:
        query = query.where(col(ApiToken.id) > after)
    return list(db.exec(query.order_by(col(ApiToken.id)).limit(limit)))


def revoke(db: Session, user: User, token_id: str, ip: str | None = None) -> ApiToken:
    token = db.get(ApiToken, token_id)
    if token is None or token.user_id != user.id:
        raise Problem(404, f"no token {token_id}")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        db.add(token)
        db.commit()
        audit.record(db, user.id, "token.revoke", token.id, {"name": token.name}, ip=ip)
    return token


class AccountExists(Exception):
    """``make_admin`` was asked to create an account that is already registered."""


async def change_password(
    db: Session,
    passwords: Passwords,
    settings: Settings,
    user: User,
    token: ApiToken,
    change: PasswordChange,
    ip: str,
) -> int:
    """Sets a new password if ``current`` is right, and revokes every other token and
    dashboard session of the user (whoever knew the old password may hold one); the
    caller's ``token`` stays. Failures count towards a lockout as failed logins do."""
    key = f"password:{user.id}"
    _refuse_if_locked(db, key)
    if not (await passwords.check(change.current, user.password_hash)).ok:
        audit.record(db, user.id, "password.failed", user.id, ip=ip)
        _count_failure(db, settings, key)
        raise Problem(403, "the current password is wrong")
    counters.clear(db, key)
    user.password_hash = await passwords.hash(change.new)
    db.add(user)
    db.commit()
    revoked = revoke_all(db, user, keep=token.id)
    audit.record(db, user.id, "password.change", user.id, {"tokens_revoked": revoked}, ip=ip)
    return revoked


def revoke_all(db: Session, user: User, keep: str | None = None) -> int:
    """Revokes every live token of ``user`` (API tokens and dashboard sessions alike: a
    dashboard cookie is a token), but ``keep``; how many it revoked."""
    query = select(ApiToken).where(ApiToken.user_id == user.id, col(ApiToken.revoked_at).is_(None))
    if keep is not None:
        query = query.where(ApiToken.id != keep)
    now, revoked = utcnow(), 0
    for token in db.exec(query):
        token.revoked_at, revoked = now, revoked + 1
        db.add(token)
    db.commit()
    return revoked


async def make_admin(
    db: Session, passwords: Passwords, email: str, password: str, *, promote_existing: bool = False
) -> User:
    """Creates the admin; an existing account is made one (with this password) only with
    ``promote_existing``, and then every token it had is revoked: with open sign-up anyone
    may have registered the email first and kept a token."""
    email = email.lower()
    user = db.exec(select(User).where(User.email == email)).first()
    if user is not None and not promote_existing:
        raise AccountExists(email)
    user = user or User(email=email, password_hash="")
    user.password_hash = await passwords.hash(password)
    user.is_admin = True
    db.add(user)
    db.commit()
    db.refresh(user)
    revoked = revoke_all(db, user)
    audit.record(db, None, "admin.create", user.id, {"via": "cli", "tokens_revoked": revoked})
    return user
