"""API keys of the HTTP front door (`gristmill serve`): where they come from, how they are kept and
checked, and whom each one makes the owner of what it creates.

Keys come from GRISTMILL_API_KEYS / GRISTMILL_ADMIN_API_KEYS (comma-separated) and from a keys
file (GRISTMILL_API_KEYS_FILE), one key a line: the key itself or, better, `sha256:<hex>` of it, then
optionally the word `admin`. Only SHA-256 digests are held in memory, and a presented key is
compared with every one of them with `hmac.compare_digest`, so neither the time taken nor a log line
gives a key away. SHA-256 without salt or stretching is enough here: keys are 256-bit random tokens
(`gristmill keys new`), not passwords a person chose.

The owner of a file or batch is a short digest of the key that created it: another key gets 404
for it and never sees it in a list; an admin key sees everything.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigurationError

KEY_PREFIX = "gm-"  # generated keys; any string of 16+ characters is accepted
_MIN_KEY_CHARS = 16
_HEX_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")


@dataclass(frozen=True)
class Principal:
    """Who a request is: the owner id of its key, and whether that key may see everything."""
    owner: str
    admin: bool = False


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    admin: bool


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def owner_of(key_digest: bytes) -> str:
    """The owner id stored with what a key creates: not the key, and not enough to guess it."""
    return "key_" + key_digest.hex()[:16]


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _parse_line(line: str, where: str) -> _Entry | None:
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    parts = text.split()
    if len(parts) > 2 or (len(parts) == 2 and parts[1] != "admin"):
        raise ConfigurationError(f"{where}: write a key (or sha256:<hex>) optionally followed by 'admin'")
    m = _HEX_DIGEST.match(parts[0])
    if m:
        d = bytes.fromhex(m.group(1))
    elif len(parts[0]) >= _MIN_KEY_CHARS:
        d = digest(parts[0])
    else:
        raise ConfigurationError(f"{where}: an API key needs at least {_MIN_KEY_CHARS} characters "
                                 f"(`gristmill keys new` makes one)")
    return _Entry(d, len(parts) == 2)


class ApiKeys:
    """The configured keys, as digests. `authenticate` answers in time independent of which key
    matched, or whether one did."""

    def __init__(self, entries: list[_Entry]):
        self._entries = entries

    @classmethod
    def from_sources(cls, keys: str | None = None, admin_keys: str | None = None,
                     keys_file: Path | None = None) -> "ApiKeys":
        entries: list[_Entry] = []
        for source, admin in ((keys, False), (admin_keys, True)):
            for i, k in enumerate(filter(None, (x.strip() for x in (source or "").split(",")))):
                what = "GRISTMILL_ADMIN_API_KEYS" if admin else "GRISTMILL_API_KEYS"
                e = _parse_line(k + (" admin" if admin else ""), f"{what} entry {i + 1}")
                if e is not None:
                    entries.append(e)
        if keys_file is not None:
            try:
                lines = Path(keys_file).read_text().splitlines()
            except OSError as exc:
                raise ConfigurationError(f"GRISTMILL_API_KEYS_FILE {keys_file}: {exc.strerror}") from None
            for n, line in enumerate(lines, 1):
                e = _parse_line(line, f"{keys_file} line {n}")
                if e is not None:
                    entries.append(e)
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, presented: str | None) -> Principal | None:
        if not presented:
            return None
        d = digest(presented)
        found: _Entry | None = None
        for e in self._entries:  # every entry compared, whichever matches
            if hmac.compare_digest(e.digest, d):
                found = e
        return None if found is None else Principal(owner_of(found.digest), found.admin)


def local_key_file(home: Path) -> Path:
    return home / "api-key"


def ensure_local_key(home: Path) -> str:
    """The key of a server that has none configured and listens on loopback: made once, kept in a
    0600 file under the state directory for local tools, like the embedded Redis's password."""
    path = local_key_file(home)
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def add_to_file(keys_file: Path, admin: bool = False) -> str:
    """Make a key, append its digest line to `keys_file` (0600 when new) and return the key: the
    file never holds it."""
    key = new_key()
    line = f"sha256:{digest(key).hex()}{' admin' if admin else ''}\n"
    fd = os.open(keys_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line)
    return key
