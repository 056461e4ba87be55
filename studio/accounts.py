"""Who may log in to a shared studio, and how often they may try.

Accounts come from ``--auth user:password`` (repeatable) and from an auth file of salted password hashes
(``--auth-file``; one ``user:pbkdf2_sha256$iterations$salt$hash`` line each, made with ``studio add-user``).
Passwords are compared as hashes, in constant time; plain ones given on the command line are hashed when the
studio starts and not kept.

Guessing is bounded twice: per client address (5 failures in a row lock that address out, for 30 s, then
doubling up to an hour) and per account (20 failures in a row lock the account for 5 minutes, whoever tries,
which slows a spread-out guesser without letting one client lock a person out for long). While locked out,
even the right password is refused. A success clears the client's and the account's count.

This module knows nothing about the web server; ``ui/launch.py`` puts ``LoginGuard`` in front of it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import StudioError

ITERATIONS = 100_000
CLIENT_FAILURES, CLIENT_LOCK_S, CLIENT_LOCK_MAX_S = 5, 30.0, 3600.0
ACCOUNT_FAILURES, ACCOUNT_LOCK_S = 20, 300.0


def hash_password(password: str, salt: str | None = None, iterations: int = ITERATIONS) -> str:
    salt = salt or secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), iterations).hex()
    return f"pbkdf2_sha256${iterations}${salt}${digest}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != "pbkdf2_sha256":
            return False
        candidate = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(iterations)).hex()
    except ValueError:
        return False
    return hmac.compare_digest(candidate, digest)


class Accounts:
    """User name -> password hash, from plain --auth pairs and an auth file."""

    def __init__(self, hashes: dict[str, str] | None = None):
        self.hashes = dict(hashes or {})

    @classmethod
    def from_options(cls, pairs: list[tuple[str, str]], auth_file: str | Path | None) -> "Accounts":
        accounts = cls()
        if auth_file:
            for user, stored in read_auth_file(auth_file).items():
                accounts.add(user, stored, source=str(auth_file))
        for user, password in pairs:
            accounts.add(user, hash_password(password), source="--auth")
        return accounts

    def add(self, user: str, stored: str, source: str) -> None:
        if user in self.hashes:
            raise StudioError(f"The user {user!r} is given twice (again in {source}); give each account once.")
        self.hashes[user] = stored

    def __bool__(self) -> bool:
        return bool(self.hashes)

    def verify(self, user: str, password: str) -> bool:
        stored = self.hashes.get(user)
        if stored is None:
            check_password(password, hash_password("-", "00" * 16))  # the same work either way: no timing hint
            return False
        return check_password(password, stored)


def read_auth_file(path: str | Path) -> dict[str, str]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise StudioError(f"The auth file {path} cannot be read ({err.strerror}). Make one with: studio add-user "
                          f"{path} USER") from None
    found: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user or stored.count("$") != 3:
            raise StudioError(f"{path}, line {number}: expected user:pbkdf2_sha256$... (made by studio add-user).")
        if user in found:
            raise StudioError(f"{path}, line {number}: the user {user!r} is there twice.")
        found[user] = stored
    return found


def add_user(path: str | Path, user: str, password: str) -> None:
    """Add (or replace) `user` in the auth file, keeping the other lines."""
    if not user or ":" in user or user.strip() != user:
        raise StudioError("A user name must be non-empty, without ':' or surrounding spaces.")
    if len(password) < 8:
        raise StudioError("Use a password of at least 8 characters.")
    path = Path(path)
    kept = [line for line in (path.read_text(encoding="utf-8").splitlines() if path.exists() else [])
            if line.partition(":")[0] != user]
    path.write_text("\n".join([*kept, f"{user}:{hash_password(password)}"]) + "\n", encoding="utf-8")
    path.chmod(0o600)


@dataclass
class _Count:
    failures: int = 0
    locked_until: float = 0.0
    lock_s: float = 0.0


@dataclass
class Throttle:
    """Failed logins per client address and per account, and the lock-outs they earn."""
    clock: object = time.monotonic
    clients: dict = field(default_factory=dict)
    users: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_s(self, client: str, user: str) -> float:
        """Seconds until this client may try this account again (0: now)."""
        now = self.clock()
        with self.lock:
            waits = [c.locked_until - now for c in (self.clients.get(client), self.users.get(user)) if c]
        return max([0.0, *waits])

    def failed(self, client: str, user: str) -> None:
        now = self.clock()
        with self.lock:
            c = self.clients.setdefault(client, _Count())
            c.failures += 1
            if c.failures >= CLIENT_FAILURES:
                c.lock_s = min(CLIENT_LOCK_MAX_S, c.lock_s * 2 if c.lock_s else CLIENT_LOCK_S)
                c.locked_until, c.failures = now + c.lock_s, 0
            u = self.users.setdefault(user, _Count())
            u.failures += 1
            if u.failures >= ACCOUNT_FAILURES:
                u.locked_until, u.failures = now + ACCOUNT_LOCK_S, 0

    def succeeded(self, client: str, user: str) -> None:
        with self.lock:
            self.clients.pop(client, None)
            self.users.pop(user, None)
