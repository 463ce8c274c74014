"""
The configuration file: TOML text in, a validated frozen L{Config} out.

Everything is checked before anything listens: unknown keys, value types,
ranges, enumerations, endpoint strings, that the files named exist and can be
read, and that the parts fit together (a TLS listener needs C{[tls]}, a
listener's protocol needs a backend that serves it).  Every problem is a
L{ConfigError} whose text is C{"<file>: <key>: <what is wrong>"}, where
C{<key>} is written as in TOML (C{listener[0].tls}, C{backend.old.ports.imap},
C{accounts."alice@example.org".backend}); indexes into arrays of tables count
from 0.  Secrets (the master password) never appear in an error.

Relative paths resolve against the directory of the configuration file.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import shlex
import socket
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NoReturn, TypeVar, get_args

import idna
from attrs import evolve, field, frozen

from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

from mailproxy._endpoints import serverEndpoint, splitDescription
from mailproxy._tls import CertificateSource, _normalName
from mailproxy.migration import MigrationSettings
from mailproxy.migration._tools import TOOLS as MIGRATION_TOOLS
from mailproxy.model import Backend, BackendTLS, Forwarding
from mailproxy.protocols import (
    APPLICATION_PROTOCOLS,
    BACKEND_PROTOCOLS,
    DIGEST_AUTH_PROTOCOLS,
    OAUTH_PROTOCOLS,
    LISTENER_MODES,
    LISTENER_PROTOCOLS,
    MODE_PORTS,
    PROTOCOLS,
    protocolNamed,
)
from mailproxy.settings import HTTPSettings, Limits, Listener

__all__ = [
    "ConfigError",
    "Problems",
    "suggest",
    "Limits",
    "Listener",
    "AdminConfig",
    "LogConfig",
    "MIN_TOKEN_LENGTH",
    "MAX_WORKERS",
    "workerCount",
    "LOG_FORMATS",
    "RouterConfig",
    "Config",
    "loadConfig",
    "parseConfig",
    "LISTENER_PROTOCOLS",
    "BACKEND_PROTOCOLS",
    "DIGEST_AUTH_PROTOCOLS",
    "OAUTH_PROTOCOLS",
    "LISTENER_MODES",
    "MODE_PORTS",
    "APPLICATION_PROTOCOLS",
    "LISTENER_TLS_MODES",
    "ENDPOINT_TYPES",
    "ROUTER_TYPES",
    "formatKey",
    "tokenFilePermissions",
    "Table",
    "parseTOML",
    "readTOML",
    "readSecretLine",
    "readNameAndSecret",
    "parsePortTLS",
    "isPathKey",
    "recordingReads",
    "noteRead",
    "journalPath",
    "JOURNAL_NAME",
    "splitEndpoint",
    "parseAdmin",
]

LISTENER_TLS_MODES: tuple[str, ...] = ("implicit", "starttls", "starttls-required", "none")
"""
The values of a listener's C{tls} key.
"""

ENDPOINT_TYPES: tuple[str, ...] = ("tcp", "tcp6")
"""
The Twisted server endpoint types a listener may use.  TLS is never part of
the endpoint: it is the listener's C{tls} key, so that the proxy owns the
certificates and the STARTTLS logic; likewise a PROXY header from a load
balancer is the listener's C{proxy_protocol} key, not Twisted's C{haproxy:}.
A listener may also take a socket systemd passes (socket activation):
C{systemd:domain=INET6:name=imaps} or C{systemd:domain=INET:index=0}.
"""

MIN_TOKEN_LENGTH = 32
"""
The shortest management token accepted (C{openssl rand -hex 32} makes 64).
"""

LOG_FORMATS: tuple[str, ...] = ("text", "json")
"""
The values of C{[log] format}.
"""

ROUTER_TYPES: tuple[str, ...] = ("static", "http", "ldap", "sql", "chain")
"""
The built-in router types; C{python:package.module.Class} names any other.
Each validates its own options when built (L{mailproxy.routers.buildRouter}).
"""

_BACKEND_TLS: tuple[str, ...] = get_args(BackendTLS)
_FORWARDING: tuple[str, ...] = get_args(Forwarding)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_COOKIE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z")
_PYTHON_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+\Z")
_TOML_POSITION = re.compile(r"\s*\(at (line \d+, column \d+|end of document)\)\Z")
_UNESCAPED_COLON = re.compile(r"(?<!\\):")

Key = tuple[str | int, ...]


class ConfigError(Exception):
    """
    The configuration (or a file it names) is wrong.

    C{str(error)} is C{"<file>: <key>: <what is wrong>"}, ready for an
    operator; it never contains a secret.  When several things are wrong it
    is one such line for each, and L{problems} holds them one by one.

    @ivar problems: the lines of C{str(error)}.
    @ivar warnings: what else was found that works but should be fixed.
    @ivar routerParts: when a whole configuration is refused but its
        C{[router]} and every backend were read without a problem, those
        (C{check} builds the router from them, to report its problems in
        the same run); else L{None}.
    """

    routerParts: tuple[RouterConfig, Mapping[str, Backend]] | None = None

    def __init__(self, message: str, problems: Sequence[str] = (), warnings: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)
        self.warnings: tuple[str, ...] = tuple(warnings)


_T = TypeVar("_T")
_D = TypeVar("_D")


class Problems:
    """
    Collects the problems of a whole configuration, so that one run of
    C{mailproxy check} reports every one of them instead of the first.

    @ivar found: the problems so far, each C{"<file>: <key>: <why>"}.
    @ivar warnings: things that work but should be fixed (a token file
        others can read), in the same form.
    """

    def __init__(self) -> None:
        self.found: list[str] = []
        self.warnings: list[str] = []

    def collect(self, read: Callable[[], _T], default: _D) -> _T | _D:
        """
        Call C{read}; if it raises L{ConfigError}, keep its problems and
        return C{default} so that the caller goes on with the next key.
        """
        try:
            return read()
        except ConfigError as e:
            self.found.extend(e.problems)
            return default

    def check(self) -> None:
        """
        @raise ConfigError: with every problem found, if there is one.
        """
        if self.found:
            raise ConfigError("\n".join(self.found), self.found, self.warnings)


def suggest(word: str, choices: Iterable[str]) -> str:
    """
    A hint naming the choice closest to a misspelt C{word}, or C{""}.

    @return: e.g. C{" (did you mean 'endpoint'?)"}, to append to a message.
    """
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def formatKey(key: Iterable[str | int]) -> str:
    """
    Write a key path the way TOML would: bare keys joined by dots, other keys
    quoted, array indexes in brackets.

    @param key: the path, e.g. C{("listener", 1, "tls")}.
    @return: e.g. C{"listener[1].tls"} or C{'accounts."a@b".backend'}.
    """
    text = ""
    for part in key:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        if not _BARE_KEY.match(part):
            part = '"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"'
        text += ("." if text else "") + part
    return text


def _optionsRepr(options: Mapping[str, Any]) -> str:
    # Options may hold a directory's bind password: show only the names.
    return "{" + ", ".join(f"{name!r}: ..." for name in options) + "}"


@frozen
class RouterConfig:
    """
    The C{[router]} table.

    @ivar type: C{"static"} (see L{ROUTER_TYPES}) or
        C{"python:package.module.Class"}.
    @ivar options: every other key of C{[router]}.  Relative paths are
        resolved against the configuration directory for the key C{path}
        and for keys ending in C{_path}, C{_file} or C{_dir}.
    """

    type: str
    options: dict[str, Any] = field(factory=dict, hash=False, repr=_optionsRepr)


@frozen
class AdminConfig:
    """
    The C{[admin]} table: the management endpoint.

    @ivar endpoint: a Twisted server endpoint string; loopback unless it
        names an interface.
    @ivar token: the bearer token (from C{token_file}), never shown.
    @ivar tokenFile: where the token was read, to re-read it on reload.
    @ivar tls: the certificate to serve HTTPS with, or L{None} for HTTP.
    @ivar healthDetails: C{GET /health} without the token names each
        backend port and its trouble, not only the status.
    """

    endpoint: str
    token: bytes = field(repr=False)
    tokenFile: str
    tls: CertificateSource | None = None
    healthDetails: bool = False


@frozen
class LogConfig:
    """
    The C{[log]} table.

    @ivar format: C{"text"} or C{"json"} (one JSON object per line).
    @ivar path: a file the proxy writes its events to, C{"-"} for standard
        output, or L{None} to leave logging to twistd alone.
    """

    format: str = "text"
    path: str | None = None


@frozen
class ClusterConfig:
    """
    The C{[cluster]} table: the Redis server the proxies of a fleet share
    their state through (L{mailproxy._fleet}).

    @ivar host: the Redis server's host name or address.
    @ivar port: its port.
    @ivar db: the database number (the URL's path).
    @ivar tls: C{rediss://}: TLS to Redis, the server's certificate checked
        against C{caFile} (else the system's authorities).
    @ivar caFile: the authorities for C{rediss://}, or L{None}.
    @ivar password: from C{password_file}'s first line, or L{None}.
    @ivar passwordFile: that file, or L{None}.
    @ivar keyPrefix: the start of every key and channel name, so several
        fleets (or other programs) can share one Redis.
    @ivar name: this proxy's name in the fleet (C{/sessions} shows it);
        unique per proxy.
    @ivar connectTimeout: seconds to connect to Redis.
    @ivar timeout: seconds Redis may take to answer before the proxy
        calls it slow, goes on with what it knows itself and reconnects.
    @ivar heartbeat: seconds between two renewals of this proxy's entry;
        an entry not renewed for three of them expires (a proxy that died).
    """

    host: str
    port: int = 6379
    db: int = 0
    tls: bool = False
    caFile: str | None = None
    password: bytes | None = field(default=None, repr=False)
    passwordFile: str | None = None
    keyPrefix: str = "mailproxy:"
    name: str = ""
    connectTimeout: float = 5.0
    timeout: float = 2.0
    heartbeat: float = 10.0


@frozen
class Config:
    """
    A whole, validated configuration.

    @ivar path: the absolute path of the configuration file.
    @ivar hostname: the proxy's name in greetings and session ids.
    @ivar tls: the default certificate, or L{None} without C{[tls]}.
    @ivar sni: extra certificates chosen by the name the client asks for.
    @ivar backends: the C{[backend.NAME]} tables by NAME.
    @ivar admin: the management endpoint, or L{None} without C{[admin]}.
    @ivar log: where and how the proxy's events are written.
    @ivar migration: the C{[migration]} table (defaults without it).
    @ivar warnings: things that work but should be fixed (a token file
        others can read), each C{"<file>: <key>: <why>"}.
    @ivar workers: C{[proxy] workers}: how many worker processes serve
        the listeners, or L{None} for one per CPU the process may use
        (L{mailproxy._workers.workerCount}).
    """

    path: str
    hostname: str
    limits: Limits
    tls: CertificateSource | None
    sni: tuple[CertificateSource, ...]
    listeners: tuple[Listener, ...]
    router: RouterConfig
    backends: dict[str, Backend] = field(hash=False)
    admin: AdminConfig | None = None
    log: LogConfig = field(factory=LogConfig)
    migration: MigrationSettings = field(factory=MigrationSettings)
    warnings: tuple[str, ...] = field(default=(), eq=False)
    workers: int | None = None
    cluster: ClusterConfig | None = None


_MISSING: Any = object()


_reads: ContextVar[dict[tuple[str, Key], Any] | None] = ContextVar("_reads", default=None)


@contextmanager
def recordingReads() -> Iterator[dict[tuple[str, Key], Any]]:
    """
    Note, while active, what every L{Table} read took without the file
    saying it: each default, and each path made absolute, by file and key.

    How a router reads its options is known only to its builder: building
    it under this tells C{config show} the defaults and paths it ran with.
    """
    reads: dict[tuple[str, Key], Any] = {}
    token = _reads.set(reads)
    try:
        yield reads
    finally:
        _reads.reset(token)


def noteRead(table: Table, name: str, value: Any) -> None:
    """
    Note, for L{recordingReads}, that C{name} in C{table} took C{value}
    without the file saying it all: a default, a path made absolute, a
    table of defaults the file changes in part. Only what TOML can show is
    noted (a default may also be L{None}, unset, or an object only the
    code knows).
    """
    reads = _reads.get()
    if reads is None:
        return
    if isinstance(value, tuple):
        value = list(value)
    scalar = (str, bool, int, float)
    if (
        isinstance(value, scalar)
        or (isinstance(value, list) and all(isinstance(item, scalar) for item in value))
        or (isinstance(value, dict) and all(isinstance(item, scalar) for item in value.values()))
    ):
        reads[(table.file, table.key + (name,))] = value


class Table:
    """
    A reader for one TOML table that turns every problem into a
    L{ConfigError} naming the file and the key.

    Also used by the route table of L{mailproxy.routers.static}.

    @ivar file: the file the table came from, for messages.
    @ivar key: the path of this table inside the file.
    @ivar base: the directory relative paths resolve against.
    @ivar problems: where a whole configuration's problems are collected
        (shared with the sub-tables), or L{None} to raise at the first.
    """

    def __init__(
        self, file: str, key: Key, data: Mapping[str, Any], base: str, problems: Problems | None = None
    ) -> None:
        self.file = file
        self.key = key
        self.data = data
        self.base = base
        self.problems = problems

    def problem(self, name: str | int | None, what: str) -> str:
        """
        The text of a problem with C{name} in this table (or with the table
        itself when C{name} is L{None}).
        """
        key = self.key if name is None else self.key + (name,)
        return f"{self.file}: {formatKey(key) or '(top level)'}: {what}"

    def fail(self, name: str | int | None, what: str) -> NoReturn:
        """
        Raise a L{ConfigError} about C{name} in this table (or about the table
        itself when C{name} is L{None}).
        """
        raise ConfigError(self.problem(name, what))

    def warn(self, name: str | int | None, what: str) -> None:
        """
        Note something that works but should be fixed, if this table's
        problems are collected.
        """
        if self.problems is not None:
            self.problems.warnings.append(self.problem(name, what))

    def collect(self, read: Callable[[], _T], default: _D) -> _T | _D:
        """
        C{read()}; when problems are collected, a L{ConfigError} it raises
        is kept and C{default} returned instead.
        """
        if self.problems is None:
            return read()
        return self.problems.collect(read, default)

    def allow(self, *names: str) -> None:
        """
        Refuse every key not in C{names}, listing the allowed ones and
        suggesting the closest.  When problems are collected they are only
        noted, so that the table's known keys are still read.
        """
        allowed = ", ".join(names) if names else "none"
        unknown = [
            self.problem(name, f"unknown key; allowed keys here: {allowed}{suggest(name, names)}")
            for name in self.data
            if name not in names
        ]
        if not unknown:
            return
        if self.problems is not None:
            self.problems.found.extend(unknown)
            return
        raise ConfigError("\n".join(unknown), unknown)

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def _get(self, name: str, default: Any) -> Any:
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            self.fail(name, "required")
        noteRead(self, name, default)
        return default

    def string(
        self,
        name: str,
        default: Any = _MISSING,
        choices: Sequence[str] | None = None,
    ) -> Any:
        """
        A non-empty string, or C{default} when absent.

        @param choices: if given, the value must be one of these.
        """
        value = self._get(name, default)
        if name not in self.data:
            return value
        if not isinstance(value, str):
            self.fail(name, f"must be a string, not {_typeName(value)}")
        if choices is not None and value not in choices:
            self.fail(name, f"must be one of {', '.join(choices)}, not {value!r}{suggest(value, choices)}")
        if not value:
            self.fail(name, "must not be empty")
        return value

    def secret(self, name: str, default: Any = _MISSING) -> Any:
        """
        A non-empty string returned as UTF-8 bytes; messages never show it.
        """
        value = self._get(name, default)
        if name not in self.data:
            return value
        if not isinstance(value, str):
            self.fail(name, f"must be a string, not {_typeName(value)}")
        if not value:
            self.fail(name, "must not be empty")
        return value.encode("utf-8")

    def boolean(self, name: str, default: Any = _MISSING) -> Any:
        """
        C{true} or C{false}, or C{default} when absent.
        """
        value = self._get(name, default)
        if name in self.data and not isinstance(value, bool):
            self.fail(name, f"must be true or false, not {_typeName(value)}")
        return value

    def integer(
        self,
        name: str,
        default: Any = _MISSING,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> Any:
        """
        An integer in C{[minimum, maximum]}, or C{default} when absent.
        """
        value = self._get(name, default)
        if name not in self.data:
            return value
        # bool is an int subclass, but TOML true is no number.
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"must be an integer, not {_typeName(value)}")
        self._range(name, value, minimum, maximum)
        return value

    def number(
        self,
        name: str,
        default: Any = _MISSING,
        minimum: float | None = None,
        maximum: float | None = None,
        positive: bool = False,
    ) -> Any:
        """
        A finite integer or float as a float, or C{default} when absent.

        @param positive: the value must be greater than 0.
        """
        value = self._get(name, default)
        if name not in self.data:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(name, f"must be a number, not {_typeName(value)}")
        if not math.isfinite(value):
            self.fail(name, "must be a finite number")
        if positive and value <= 0:
            self.fail(name, f"must be greater than 0, not {value}")
        self._range(name, value, minimum, maximum)
        return float(value)

    def _range(
        self, name: str, value: float, minimum: float | None, maximum: float | None
    ) -> None:
        if minimum is not None and value < minimum:
            self.fail(name, f"must be at least {minimum}, not {value}")
        if maximum is not None and value > maximum:
            self.fail(name, f"must be at most {maximum}, not {value}")

    def path(self, name: str, default: Any = _MISSING, readable: bool = True) -> Any:
        """
        A file name resolved against L{base}; with C{readable}, the file
        must exist and be readable now.
        """
        value = self.string(name, default)
        if name not in self.data:
            return value
        resolved = os.path.normpath(os.path.join(self.base, os.path.expanduser(value)))
        if readable:
            problem = _unreadable(resolved)
            if problem:
                self.fail(name, problem)
        noteRead(self, name, resolved)
        return resolved

    def table(self, name: str, required: bool = False) -> Table | None:
        """
        The sub-table C{name}, or L{None} when absent and not required.
        """
        value = self._get(name, _MISSING if required else None)
        if value is None:
            return None
        return self._subTable(name, value)

    def tableOrEmpty(self, name: str) -> Table:
        """
        The sub-table C{name}, or an empty one in its place when absent: for
        a table whose every key has a default, read the same either way
        (and so shown with its defaults by C{config show}).
        """
        value = self._get(name, None)
        return self._subTable(name, {} if value is None else value)

    def _subTable(self, name: str, value: Any) -> Table:
        if not isinstance(value, dict):
            self.fail(name, f"must be a table, not {_typeName(value)}")
        return Table(self.file, self.key + (name,), value, self.base, self.problems)

    def tables(self, name: str) -> list[Table]:
        """
        The array of tables C{name} (C{[[name]]}); empty when absent.
        """
        value = self._get(name, [])
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            self.fail(name, f"must be an array of tables ([[{formatKey(self.key + (name,))}]])")
        return [
            Table(self.file, self.key + (name, index), item, self.base, self.problems)
            for index, item in enumerate(value)
        ]

    def strings(self, name: str, default: Any = _MISSING) -> Any:
        """
        A non-empty array of non-empty strings, as a tuple.
        """
        value = self._get(name, default)
        if name not in self.data:
            return value
        if not isinstance(value, list) or not value:
            self.fail(name, "must be a non-empty array of strings")
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.fail(name, f"item {index} must be a non-empty string")
        return tuple(value)


def _typeName(value: object) -> str:
    """
    The TOML name of C{value}'s type, for messages that must not show the
    value itself.
    """
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _unreadable(path: str) -> str | None:
    """
    Why C{path} cannot be read as a file, or L{None} if it can.
    """
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return f"cannot read {path!r}: {e.strerror or e}"
    return None


def parseTOML(text: str | bytes, path: str) -> dict[str, Any]:
    """
    Parse TOML, reporting syntax errors with the file and line.

    @raise ConfigError: on a syntax error or bytes that are not UTF-8.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        match = _TOML_POSITION.search(message)
        if match is None:
            raise ConfigError(f"{path}: {message}") from None
        where = match.group(1)
        if where == "end of document":
            where = f"line {text.count(chr(10)) + 1} (end of file)"
        raise ConfigError(f"{path}: {where}: {message[: match.start()]}") from None


def readTOML(path: str) -> dict[str, Any]:
    """
    Read and parse the TOML file C{path}.

    @raise ConfigError: if it cannot be read or parsed.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    return parseTOML(data, path)


def loadConfig(path: str) -> Config:
    """
    Read, parse and validate the configuration file C{path}.

    @raise ConfigError: if anything is wrong; see the module docstring.
    """
    path = os.path.abspath(path)
    return _build(readTOML(path), path)


def parseConfig(text: str, path: str) -> Config:
    """
    Parse and validate configuration C{text} as if read from C{path}.

    @param path: used in messages, as L{Config.path} (made absolute) and to
        resolve relative paths.
    @raise ConfigError: if anything is wrong.
    """
    path = os.path.abspath(path)
    return _build(parseTOML(text, path), path)


def _build(data: dict[str, Any], path: str, problems: Problems | None = None) -> Config:
    # Each section, and inside one each key that others do not depend on,
    # is read even when an earlier one is wrong: one run reports them all.
    problems = Problems() if problems is None else problems
    root = Table(path, (), data, os.path.dirname(path), problems)
    root.allow("proxy", "limits", "tls", "listener", "router", "backend", "admin", "log", "migration", "cluster", "http")
    hostname, workers = root.collect(lambda: _parseProxy(root.table("proxy")), ("", None))
    limits = root.collect(lambda: _parseLimits(root.table("limits")), Limits())
    tls, sni = root.collect(lambda: _parseTLS(root.table("tls")), (None, ()))
    before = len(problems.found)
    backends = root.collect(lambda: _parseBackends(root.table("backend")), {})
    # Which protocols the backends serve is only known when all of them
    # were read; otherwise a listener would be blamed for a backend's typo.
    backendsRead = len(problems.found) == before
    listeners = _parseListeners(root, "tls" in root, backends if backendsRead else None)
    listeners = root.collect(
        lambda: _withHTTP(root, listeners, backends if backendsRead else None, workers), listeners
    )
    router = root.collect(lambda: _parseRouter(root.table("router", required=True)), None)  # type: ignore[arg-type]
    routerTable = root.table("router")
    if router is not None and routerTable is not None and backendsRead:
        _warnOAuthWithoutMaster(routerTable, backends)
    admin = root.collect(lambda: parseAdmin(root.table("admin"), listeners), None)
    log = root.collect(lambda: _parseLog(root.table("log")), LogConfig())
    migration = root.collect(
        lambda: _parseMigration(root.table("migration"), backends if backendsRead else None), MigrationSettings()
    )
    if migration.journal is None:
        migration = evolve(migration, journal=journalPath(path, None))
    cluster = root.collect(lambda: parseCluster(root.table("cluster")), None)
    try:
        problems.check()
    except ConfigError as e:
        if router is not None and backendsRead:
            e.routerParts = (router, backends)
        raise
    assert router is not None
    return Config(
        path=path,
        hostname=hostname,
        limits=limits,
        tls=tls,
        sni=sni,
        listeners=listeners,
        router=router,
        backends=backends,
        admin=admin,
        log=log,
        migration=migration,
        warnings=tuple(problems.warnings),
        workers=workers,
        cluster=cluster,
    )


#: The most worker processes C{[proxy] workers} may ask for.
MAX_WORKERS = 256


def workerCount(config: Config) -> int:
    """
    How many worker processes serve C{config}'s listeners: C{[proxy]
    workers}, else one per CPU this process may run on (its affinity, which
    C{taskset}, cgroups' cpusets and systemd's C{CPUAffinity=} narrow), as
    nginx's C{worker_processes auto} counts them.
    """
    if config.workers is not None:
        return config.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _parseProxy(table: Table | None) -> tuple[str, int | None]:
    if table is None:
        return socket.getfqdn(), None
    table.allow("hostname", "workers")
    workers = table.collect(lambda: table.integer("workers", None, 1, MAX_WORKERS), None)
    hostname = table.string("hostname", None)
    if hostname is None:
        return socket.getfqdn(), workers
    # It is written into greetings: no spaces, CR or LF may reach the wire.
    if not _HOSTNAME.match(hostname):
        table.fail("hostname", f"not a host name: {hostname!r}")
    return hostname, workers


# (TOML key, Limits attribute, integer?, minimum, maximum, must be > 0)
_LIMITS: tuple[tuple[str, str, bool, float | None, float | None, bool], ...] = (
    ("line_length", "lineLength", True, 512, 1 << 20, False),
    ("literal_size", "literalSize", True, 1, 1 << 20, False),
    ("preauth_timeout", "preauthTimeout", False, None, None, True),
    ("connections_per_address", "connectionsPerAddress", True, 0, None, False),
    ("login_failures", "loginFailures", True, 1, None, False),
    ("failure_delay", "failureDelay", False, 0, None, False),
    ("idle_timeout", "idleTimeout", False, None, None, True),
    ("backend_timeout", "backendTimeout", False, None, None, True),
    ("shutdown_grace", "shutdownGrace", False, 0, None, False),
)


def _parseLimits(table: Table | None) -> Limits:
    if table is None:
        return Limits()
    table.allow(*(key for key, *_ in _LIMITS))
    values: dict[str, Any] = {}
    for key, attribute, isInteger, minimum, maximum, positive in _LIMITS:
        if key not in table:
            continue
        if isInteger:
            value = table.collect(lambda: table.integer(key, None, minimum, maximum), None)  # type: ignore[arg-type]
        else:
            value = table.collect(lambda: table.number(key, None, minimum, maximum, positive), None)
        if value is not None:
            values[attribute] = value
    return Limits(**values)


def _parseTLS(table: Table | None) -> tuple[CertificateSource | None, tuple[CertificateSource, ...]]:
    if table is None:
        return None, ()
    table.allow("certificate", "key", "sni")
    problems = table.problems
    before = len(problems.found) if problems is not None else 0
    # Each file and each SNI entry is checked even when another is wrong.
    certificate = table.collect(lambda: table.path("certificate"), "")
    key = table.collect(lambda: table.path("key"), "")
    seen: dict[str, int] = {}
    sni = [
        table.collect(lambda: _parseSNI(entry, index, seen), None)
        for index, entry in enumerate(table.collect(lambda: table.tables("sni"), []))
    ]
    if problems is not None and len(problems.found) > before:
        # Collected: the configuration will not be made.
        return None, ()
    where = f"{table.file}: {formatKey(table.key)}"
    return CertificateSource(certificate=certificate, key=key, where=where), tuple(entry for entry in sni if entry is not None)


def _parseSNI(entry: Table, index: int, seen: dict[str, int]) -> CertificateSource:
    """
    One C{[[tls.sni]]} entry.

    @param seen: the SNI entry that has each name (folded) so far; this
        entry's names are added.
    """
    entry.allow("names", "certificate", "key")
    names = entry.strings("names")
    for name in names:
        if any(c.isspace() for c in name):
            entry.fail("names", f"not a host name: {name!r}")
        if "*" in name.removeprefix("*."):
            entry.fail("names", f"a wildcard is a whole first label (*.example.com), not {name!r}")
        folded = name.lower()
        if folded in seen:
            entry.fail("names", f"{name!r} is already in tls.sni[{seen[folded]}]")
        seen[folded] = index
    return CertificateSource(
        certificate=entry.path("certificate"),
        key=entry.path("key"),
        names=tuple(name.lower() for name in names),
        where=f"{entry.file}: {formatKey(entry.key)}",
    )


def _parseBackends(table: Table | None) -> dict[str, Backend]:
    if table is None:
        return {}
    backends = {}
    for name in table.data:
        backend = table.collect(lambda: _parseBackend(name, table), None)
        if backend is not None:
            backends[name] = backend
    return backends


def _parseBackend(name: str, parent: Table) -> Backend | None:
    """
    One C{[backend.NAME]}, or L{None} when its problems were collected.
    """
    table = parent.table(name)
    assert table is not None
    table.allow(
        "host",
        "ports",
        "tls",
        "verify",
        "ca_file",
        "server_name",
        "forward",
        "master_user",
        "master_password_file",
        "master_separator",
        "connect_timeout",
        "port_tls",
    )
    problems = table.problems
    before = len(problems.found) if problems is not None else 0
    host = table.collect(lambda: _parseHost(table), "")
    ports = table.collect(lambda: _parsePorts(table), {})
    masterUser, masterPassword = table.collect(
        lambda: readNameAndSecret(table, "master_user", "master_password_file"), (None, None)
    )
    # Without its ports, which port_tls may name is unknown.
    portTLS = table.collect(lambda: parsePortTLS(table, set(ports)), {}) if ports else {}
    values: dict[str, Any] = {
        attribute: table.collect(read, None)
        for attribute, read in (
            ("tls", lambda: table.string("tls", "none", _BACKEND_TLS)),
            ("verify", lambda: table.boolean("verify", True)),
            ("caFile", lambda: table.path("ca_file", None)),
            ("serverName", lambda: table.string("server_name", None)),
            ("forward", lambda: table.string("forward", "auto", _FORWARDING)),
            ("masterSeparator", lambda: table.string("master_separator", "*")),
            ("connectTimeout", lambda: table.number("connect_timeout", 10.0, positive=True)),
        )
    }
    if "http" in ports and portTLS.get("http", values["tls"]) == "starttls":
        # HTTP has no STARTTLS: the requests, credentials included, would
        # go in clear to a backend the operator configured for TLS.
        if "http" in portTLS:
            table.collect(lambda: table.fail("port_tls", 'http: HTTP has no STARTTLS: "implicit" or "none"'), None)
        else:
            table.collect(
                lambda: table.fail("tls", 'its http port has no STARTTLS: set port_tls = { http = "none" } or "implicit"'),
                None,
            )
    if values["forward"] == "id" and ports and "imap" not in ports:
        table.warn(
            "forward",
            '"id" is IMAP\'s and this backend serves no IMAP: its sessions tell it nothing of the client '
            '(use "auto" or "xclient")',
        )
    if problems is not None and len(problems.found) > before:
        # Collected: the caller leaves this backend out.
        return None
    return Backend(
        name=name,
        host=host,
        ports=ports,
        masterUser=masterUser,
        masterPassword=masterPassword,
        portTLS=portTLS,
        **values,
    )


def _parseHost(table: Table) -> str:
    host: str = table.string("host")
    if not _HOSTNAME.match(host) and ":" not in host:
        table.fail("host", f"not a host name or address: {host!r}")
    return host


def _parsePorts(table: Table) -> dict[str, int]:
    portsTable = table.table("ports", required=True)
    assert portsTable is not None
    portsTable.allow(*BACKEND_PROTOCOLS)
    ports = {protocol: portsTable.integer(protocol, None, 1, 65535) for protocol in portsTable.data}
    if not ports:
        table.fail("ports", f"must name at least one of {', '.join(BACKEND_PROTOCOLS)}")
    return ports


def parsePortTLS(table: Table, ports: Iterable[str]) -> dict[str, BackendTLS]:
    """
    A backend's C{port_tls}: the TLS mode of single ports where it differs
    from the backend's C{tls} (C{port_tls = { mx = "none" }}).  Also read
    by routers for their C{backend_defaults}.

    @param table: the table holding C{port_tls}.
    @param ports: the C{ports} keys the backend has; no other may be named.
    @raise ConfigError: naming the key that is wrong.
    """
    portTable = table.table("port_tls")
    if portTable is None:
        return {}
    known = [name for name in BACKEND_PROTOCOLS if name in set(ports)]
    for name in portTable.data:
        if name not in known:
            portTable.fail(name, f"not a port of this backend; its ports: {', '.join(known)}")
    return {name: portTable.string(name, None, _BACKEND_TLS) for name in portTable.data}


def readSecretLine(table: Table, name: str) -> bytes:
    """
    The first line of the file named by the key C{name} of C{table} (a
    password file), without its line ending; errors never show it.

    @raise ConfigError: the file cannot be read, or its first line is empty.
    """
    path = table.path(name)
    try:
        with open(path, "rb") as f:
            line = f.readline()
    except OSError as e:
        table.fail(name, f"cannot read {path!r}: {e.strerror or e}")
    secret = line.rstrip(b"\r\n")
    if not secret:
        table.fail(name, f"the first line of {path!r} is empty")
    return secret


def readNameAndSecret(table: Table, name: str, secretFile: str) -> tuple[str | None, bytes | None]:
    """
    An optional name (a master user, a bind DN) and its secret, read from
    the file named by C{secretFile}: each of the two keys needs the other.

    @param name: the key of the name in C{table}.
    @param secretFile: the key of the secret's file (see L{readSecretLine}).
    @return: both, or C{(None, None)} when neither is set.
    @raise ConfigError: one key without the other, or an unreadable file.
    """
    value = table.string(name, None)
    secret = None
    if secretFile in table:
        if value is None:
            table.fail(secretFile, f"needs {name}")
        secret = readSecretLine(table, secretFile)
    elif value is not None:
        table.fail(name, f"needs {secretFile}")
    return value, secret


def _parseListeners(root: Table, haveTLS: bool, backends: Mapping[str, Backend] | None) -> tuple[Listener, ...]:
    """
    The C{[[listener]]} entries that are right; the problems of the others
    are collected.

    @param backends: every backend, or L{None} if some could not be read
        (then whether a backend serves a listener is not checked).
    """
    entries: list[Table] | None = root.collect(lambda: root.tables("listener"), None)
    if entries == []:
        root.collect(lambda: root.fail("listener", "at least one [[listener]] is required"), None)
    listeners = []
    bound: dict[tuple[str, int], int] = {}
    for index, entry in enumerate(entries or ()):
        listener = entry.collect(lambda: _parseListener(entry, index, haveTLS, backends, bound), None)
        if listener is not None:
            listeners.append(listener)
    return tuple(listeners)


def _parseListener(
    entry: Table,
    index: int,
    haveTLS: bool,
    backends: Mapping[str, Backend] | None,
    bound: dict[tuple[str, int], int],
) -> Listener | None:
    """
    One C{[[listener]]}, or L{None} if something in it is wrong: each of its
    keys is checked and every problem collected.

    @param bound: the addresses the listeners before this one bind, by
        index; this one's are added.
    """
    problems = entry.problems
    before = len(problems.found) if problems is not None else 0
    entry.allow(
        "protocol", "endpoint", "tls", "proxy_protocol", "proxy_trusted", "digest_auth", "oauth", "mode", "local_domains"
    )
    protocol = entry.collect(lambda: entry.string("protocol", choices=LISTENER_PROTOCOLS), None)
    mode = entry.collect(lambda: _parseMode(entry, protocol), None) if protocol is not None else None
    endpoint = entry.collect(lambda: entry.string("endpoint"), None)
    tls = entry.collect(lambda: entry.string("tls", choices=LISTENER_TLS_MODES), None)
    digestAuth = entry.collect(lambda: _parseDigestAuth(entry, protocol, mode), False)
    oauth = entry.collect(lambda: _parseOAuth(entry, protocol, mode, tls), False)
    # Whether local_domains may be set depends on the mode: not judged
    # while the protocol or mode is itself wrong.
    kindKnown = protocol is not None and (mode is not None or protocol not in LISTENER_MODES)
    localDomains = entry.collect(lambda: _parseLocalDomains(entry, protocol, mode), frozenset()) if kindKnown else frozenset()
    proxyProtocol, proxyTrusted = entry.collect(lambda: _parseProxyProtocol(entry), (False, ()))
    if protocol == "http" and tls is not None and tls.startswith("starttls"):
        entry.collect(lambda: entry.fail("tls", 'HTTP has no STARTTLS: "implicit" or "none"'), None)
    if tls is not None and tls != "none" and not haveTLS:
        entry.collect(lambda: entry.fail("tls", f"{tls!r} needs a [tls] table with certificate and key"), None)
    if kindKnown and backends is not None:
        assert protocol is not None
        portName = protocolNamed(protocol).portFor(mode)
        if not any(portName in backend.ports for backend in backends.values()):
            served = repr(protocol) if mode is None else f"{protocol!r} in mode {mode!r}"
            entry.collect(
                lambda: entry.fail(
                    "protocol",
                    f"no backend serves {served}; add ports.{portName} to a [backend.NAME] table",
                ),
                None,
            )
    if endpoint is not None:
        for address in entry.collect(lambda: _checkEndpoint(entry, endpoint), []):
            if address in bound:
                entry.collect(lambda: entry.fail("endpoint", f"same address and port as listener[{bound[address]}]"), None)
            bound[address] = index
    if problems is not None and len(problems.found) > before:
        return None
    assert protocol is not None and endpoint is not None and tls is not None
    return Listener(
        protocol=protocol,
        endpoint=endpoint,
        tls=tls,
        proxyProtocol=proxyProtocol,
        proxyTrusted=proxyTrusted,
        digestAuth=digestAuth,
        mode=mode,
        localDomains=localDomains,
        oauth=oauth,
    )


# (TOML key, HTTPSettings attribute, integer?, minimum)
_HTTP_LIMITS: tuple[tuple[str, str, bool, float], ...] = (
    ("max_header_size", "maxHeaderSize", True, 1024),
    ("max_headers", "maxHeaders", True, 8),
    ("keepalive_timeout", "keepaliveTimeout", False, 0),
    ("header_timeout", "headerTimeout", False, 0),
    ("response_timeout", "responseTimeout", False, 0),
)


def _withHTTP(
    root: Table, listeners: tuple[Listener, ...], backends: Mapping[str, Backend] | None, workers: int | None
) -> tuple[Listener, ...]:
    """
    The listeners, the HTTP ones given the C{[http]} section: required
    (for its C{default_backend}) when a listener has C{protocol = "http"},
    refused without one.
    """
    table = root.table("http")
    serving = [listener for listener in listeners if listener.protocol == "http"]
    if not serving:
        # A listener refused for another reason still asked for HTTP: its
        # own problem is reported; blaming [http] as unused would be false.
        declared = root.data.get("listener")
        asked = isinstance(declared, list) and any(
            isinstance(entry, dict) and entry.get("protocol") == "http" for entry in declared
        )
        if table is not None and not asked:
            root.fail("http", 'no [[listener]] has protocol = "http"')
        return listeners
    if table is None:
        root.fail("http", 'required with a protocol = "http" listener (it names default_backend)')
    settings = _parseHTTP(table, backends, workers)
    return tuple(evolve(listener, http=settings) if listener.protocol == "http" else listener for listener in listeners)


def _parseHTTP(table: Table, backends: Mapping[str, Backend] | None, workers: int | None) -> HTTPSettings:
    table.allow("cookie_secret_file", "cookie_name", "default_backend", "pins", "realm", *(key for key, *_ in _HTTP_LIMITS))

    def backendWithHTTP(where: Table, name: str) -> str:
        value = where.string(name)
        if backends is not None:
            if value not in backends:
                where.fail(name, f"no [backend.{value}]{suggest(value, backends)}")
            if "http" not in backends[value].ports:
                where.fail(name, f"backend {value!r} has no ports.http")
        return value

    secretFile = None
    if "cookie_secret_file" in table:
        secret = table.collect(lambda: readSecretLine(table, "cookie_secret_file"), b"")
        secretFile = table.path("cookie_secret_file", readable=False)
    else:
        secret = os.urandom(32)
        if workers is None or workers > 1:
            table.warn(
                "cookie_secret_file",
                "unset: each worker process signs cookies with a key of its own, so a cookie set by one is "
                "refused by the others (and by every one after a restart); set it, or [proxy] workers = 1",
            )
    cookieName = table.collect(lambda: table.string("cookie_name", "mailproxy_backend"), "mailproxy_backend")
    if not _COOKIE_NAME.match(cookieName):
        table.collect(lambda: table.fail("cookie_name", "not a cookie name (letters, digits, - and _)"), None)
    realm = table.collect(lambda: table.string("realm", "mail"), "mail")
    if '"' in realm or "\\" in realm or not realm.isprintable():
        table.collect(lambda: table.fail("realm", "no quote, backslash or control character"), None)
    default = table.collect(lambda: backendWithHTTP(table, "default_backend"), "")
    pins: list[tuple[str, str]] = []
    pinTable = table.collect(lambda: table.table("pins"), None)
    if pinTable is not None:
        for prefix in pinTable.data:
            if not prefix.startswith("/"):
                pinTable.collect(lambda: pinTable.fail(prefix, "a path prefix starts with /"), None)
                continue
            backend = pinTable.collect(lambda: backendWithHTTP(pinTable, prefix), None)
            if backend is not None:
                pins.append((prefix, backend))
    values: dict[str, Any] = {}
    for key, attribute, isInteger, minimum in _HTTP_LIMITS:
        if key in table:
            if isInteger:
                value = table.collect(lambda: table.integer(key, None, int(minimum)), None)
            else:
                value = table.collect(lambda: table.number(key, None, minimum, None, True), None)
            if value is not None:
                values[attribute] = value
    return HTTPSettings(
        cookieSecret=secret,
        cookieSecretFile=secretFile,
        cookieName=cookieName,
        defaultBackend=default,
        pins=tuple(sorted(pins, key=lambda pin: -len(pin[0]))),
        realm=realm,
        **values,
    )


def _parseDigestAuth(entry: Table, protocol: str | None, mode: str | None) -> bool:
    """
    A listener's C{digest_auth}: only for the protocols that have digest
    mechanisms, and never for MX.
    """
    digestAuth: bool = entry.boolean("digest_auth", False)
    if digestAuth and protocol is not None and protocol not in DIGEST_AUTH_PROTOCOLS:
        entry.fail("digest_auth", f"only {', '.join(DIGEST_AUTH_PROTOCOLS)} listeners offer digest mechanisms")
    if digestAuth and _asksRecipients(protocol, mode):
        entry.fail("digest_auth", f"{mode or protocol} listeners take no logins")
    return digestAuth


def _parseOAuth(entry: Table, protocol: str | None, mode: str | None, tls: str | None) -> bool:
    """
    A listener's C{oauth}: only for the protocols whose front ends offer
    OAuth mechanisms, never for MX, and only with TLS (they are offered
    only once it is active).
    """
    oauth: bool = entry.boolean("oauth", False)
    if oauth and protocol is not None and protocol not in OAUTH_PROTOCOLS:
        entry.fail("oauth", f"only {', '.join(OAUTH_PROTOCOLS)} listeners offer OAuth mechanisms")
    if oauth and _asksRecipients(protocol, mode):
        entry.fail("oauth", f"{mode or protocol} listeners take no logins")
    if oauth and tls == "none":
        entry.fail("oauth", 'OAuth mechanisms are offered only over TLS; this listener has tls = "none"')
    return oauth


def _parseProxyProtocol(entry: Table) -> tuple[bool, tuple[str, ...]]:
    """
    A listener's C{proxy_protocol} and the C{proxy_trusted} it needs.
    """
    proxyProtocol: bool = entry.boolean("proxy_protocol", False)
    proxyTrusted = tuple(entry.strings("proxy_trusted", ()))
    if proxyProtocol and not proxyTrusted:
        entry.fail("proxy_trusted", "proxy_protocol = true needs the balancers' addresses, e.g. [\"10.0.0.0/24\"]")
    if proxyTrusted and not proxyProtocol:
        entry.fail("proxy_trusted", "only meaningful with proxy_protocol = true")
    for network in proxyTrusted:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            entry.fail("proxy_trusted", f"{network!r} is not an address or network")
    return proxyProtocol, proxyTrusted


def _asksRecipients(protocol: str | None, mode: str | None) -> bool:
    """
    Whether listeners of C{protocol} in C{mode} receive mail (and ask the
    router about recipients) instead of taking logins.
    """
    return protocol is not None and protocolNamed(protocol).lookupFor(mode) == "recipient"


def _parseLocalDomains(entry: Table, protocol: str | None, mode: str | None) -> frozenset[str]:
    """
    An MX listener's C{local_domains}, in the form recipients are compared
    in: lower case, A-labels, no final dot.
    """
    if "local_domains" not in entry:
        return frozenset()
    if not _asksRecipients(protocol, mode):
        receiving = " or ".join(
            f"{each.name} listeners" + (f" in mode \"{kind}\"" if kind is not None else "")
            for each in PROTOCOLS
            for kind in ([mode.name for mode in each.modes] if each.modes else [None])
            if each.lookupFor(kind) == "recipient"
        )
        entry.fail("local_domains", f"only {receiving} receive mail for domains")
    domains = set()
    for name in entry.strings("local_domains"):
        if "@" in name:
            entry.fail("local_domains", f"{name!r} must be a domain name, without @")
        try:
            domain = _normalName(name)
        except idna.IDNAError:
            entry.fail("local_domains", f"{name!r} is not a domain name")
        if not _HOSTNAME.match(domain):
            entry.fail("local_domains", f"{name!r} is not a domain name")
        domains.add(domain)
    return frozenset(domains)


def _parseMode(entry: Table, protocol: str) -> str | None:
    """
    The listener's C{mode}: required for protocols in L{LISTENER_MODES},
    refused for the others.
    """
    modes = LISTENER_MODES.get(protocol)
    if modes is None:
        if "mode" in entry:
            entry.fail("mode", f"only {', '.join(LISTENER_MODES)} listeners have a mode")
        return None
    if "mode" not in entry:
        entry.fail("mode", f"required for {protocol} listeners: {' or '.join(modes)}")
    return entry.string("mode", choices=modes)  # type: ignore[no-any-return]


def splitEndpoint(endpoint: str, maxsplit: int = 0) -> list[str]:
    """
    The colon-separated parts of an endpoint string, as written: a colon
    escaped inside a value (C{interface=\\:\\:1}) does not separate, and
    its backslash is kept.

    @param maxsplit: split at most this many times; 0 for no limit.
    """
    return _UNESCAPED_COLON.split(endpoint, maxsplit=maxsplit)


def _checkEndpoint(entry: Table, endpoint: str) -> list[tuple[str, int]]:
    """
    Check that C{endpoint} is a supported server endpoint string, without
    listening anywhere.

    @return: the (interface, port) pairs it would bind, port 0 excluded.
    """
    parts = splitEndpoint(endpoint, maxsplit=2)
    kind = parts[0].strip().lower()
    if kind == "haproxy":
        # Twisted's haproxy: endpoint greets before the header arrives and
        # reads it inside TLS; the listener's own option does it right.
        entry.fail("endpoint", "do not use haproxy:; set proxy_protocol = true and proxy_trusted on the listener")
    if kind == "ssl":
        entry.fail("endpoint", "must not be an ssl: endpoint; set the listener's tls key instead")
    if kind == "systemd":
        return [(_checkSystemdEndpoint(entry, endpoint), 0)]
    if kind not in ENDPOINT_TYPES:
        allowed = ", ".join(ENDPOINT_TYPES + ("systemd",))
        entry.fail(
            "endpoint",
            f"unsupported endpoint type {kind!r} in {endpoint!r}; use {allowed}",
        )
    problem = _endpointProblem(endpoint)
    # A MemoryReactor parses and "listens" without touching the network,
    # which also reveals the port the endpoint would bind.
    reactor = MemoryReactor()
    if problem is None:
        try:
            serverEndpoint(reactor, endpoint).listen(Factory())
        except Exception:
            # Twisted's own words name its functions and arguments; say
            # what the operator can write instead.
            problem = "write it as tcp:PORT, tcp:PORT:interface=ADDRESS or tcp6:PORT:interface=ADDRESS"
    if problem is not None:
        if _unescapedColonInValue(splitEndpoint(endpoint)):
            problem += " (write a colon inside a value as \\:, e.g. interface=\\:\\:1)"
        entry.fail("endpoint", f"cannot parse {endpoint!r}: {problem}")
    addresses = []
    for port, _, _, interface in reactor.tcpServers:
        if not 0 <= port <= 65535:
            entry.fail("endpoint", f"port must be 0-65535, not {port}")
        if port:
            addresses.append((interface, port))
    return addresses


#: The arguments of Twisted's tcp: and tcp6: server endpoints, in the order
#: they may also be given without a name.
_ENDPOINT_ARGUMENTS = ("port", "interface", "backlog")


def _endpointProblem(endpoint: str) -> str | None:
    """
    What is wrong with the arguments of a tcp: or tcp6: endpoint string, in
    words, or L{None} if nothing is: Twisted's own errors for these
    (C{invalid literal for int()}, C{got multiple values for argument})
    speak of its functions, not of the string.
    """
    given: dict[str, str] = {}
    for position, segment in enumerate(splitEndpoint(endpoint)[1:]):
        if "=" in segment:
            name, value = segment.split("=", 1)
            if name not in _ENDPOINT_ARGUMENTS:
                return (
                    f"unknown option {name!r}{suggest(name, _ENDPOINT_ARGUMENTS)}; "
                    f"the options are {', '.join(_ENDPOINT_ARGUMENTS)}"
                )
        elif position < len(_ENDPOINT_ARGUMENTS):
            name, value = _ENDPOINT_ARGUMENTS[position], segment
        else:
            return f"too many values; the options are {', '.join(_ENDPOINT_ARGUMENTS)}"
        if name in given:
            return f"{name} is given twice"
        given[name] = value
    if "port" not in given:
        return "no port; e.g. tcp:993"
    for name in ("port", "backlog"):
        if name in given and not given[name].strip().isdigit():
            return f"{name} must be a number, not {given[name]!r}"
    return None


def _checkSystemdEndpoint(entry: Table, endpoint: str) -> str:
    """
    Check a C{systemd:} endpoint's syntax; the sockets themselves exist only
    when systemd starts the proxy, not when a configuration is checked.

    @return: which socket it takes (C{"systemd:name=imaps"}), so that two
        listeners cannot take the same one.
    """
    positional, arguments = splitDescription(endpoint)
    if len(positional) > 1 or set(arguments) - {"domain", "index", "name"}:
        entry.fail("endpoint", f"{endpoint!r}: expected systemd:domain=INET|INET6:index=N or :name=NAME")
    if arguments.get("domain") not in ("INET", "INET6"):
        entry.fail("endpoint", f"{endpoint!r}: domain must be INET or INET6 (a TCP socket)")
    if ("index" in arguments) == ("name" in arguments):
        entry.fail("endpoint", f"{endpoint!r}: give either index=N or name=NAME (FileDescriptorName=)")
    if "index" in arguments and not (arguments["index"].isascii() and arguments["index"].isdigit()):
        entry.fail("endpoint", f"{endpoint!r}: index must be a number, counting from 0")
    if "name" in arguments and not arguments["name"]:
        entry.fail("endpoint", f"{endpoint!r}: name must not be empty")
    which = f"index={int(arguments['index'])}" if "index" in arguments else f"name={arguments['name']}"
    return f"systemd:{which}"


def _unescapedColonInValue(segments: list[str]) -> bool:
    """
    Whether a keyword argument's value seems to go on past an unescaped
    colon, as in C{interface=::1}: the segment after it is no C{key=value}.
    """
    return any(
        "=" in segment and "=" not in following
        for segment, following in zip(segments[1:], segments[2:])
    )


_LOOPBACK = "127.0.0.1"


def parseAdmin(table: Table | None, listeners: Sequence[Listener]) -> AdminConfig | None:
    """
    The C{[admin]} table, or L{None} without one: its endpoint (loopback
    unless it names an interface, and then with TLS), its token file (read
    now) and C{health_details}.

    @param listeners: the listeners already read; the endpoint must not
        take an address and port of theirs.
    @raise ConfigError: naming the key that is wrong.
    """
    if table is None:
        return None
    table.allow("endpoint", "token_file", "certificate", "key", "health_details")
    endpoint = table.string("endpoint", f"tcp:9443:interface={_LOOPBACK}")
    parts = splitEndpoint(endpoint)
    if parts[0].strip().lower() not in ENDPOINT_TYPES:
        table.fail("endpoint", f"must be a tcp: or tcp6: endpoint, not {endpoint!r}")
    if not any(part.startswith("interface=") for part in parts[1:]):
        # Loopback unless the operator names another interface.
        endpoint += f":interface={_LOOPBACK}" if parts[0].strip().lower() == "tcp" else ":interface=\\:\\:1"
    addresses = _checkEndpoint(table, endpoint)
    for index, listener in enumerate(listeners):
        listenerTable = Table(table.file, ("listener", index), {}, table.base)
        if set(addresses) & set(_checkEndpoint(listenerTable, listener.endpoint)):
            table.fail("endpoint", f"same address and port as listener[{index}]")
    tls = None
    if "certificate" in table or "key" in table:
        tls = CertificateSource(
            certificate=table.path("certificate"), key=table.path("key"), where=f"{table.file}: {formatKey(table.key)}"
        )
    else:
        for interface in (address for address, _ in addresses):
            if not _isLoopback(interface):
                table.fail(
                    "endpoint",
                    f"listens on {interface!r}, beyond loopback, without TLS: "
                    "add certificate and key, or use interface=127.0.0.1",
                )
    tokenFile = table.path("token_file")
    token = readSecretLine(table, "token_file").strip()
    if len(token) < MIN_TOKEN_LENGTH:
        table.fail(
            "token_file",
            f"the token in {tokenFile!r} has {len(token)} characters; at least "
            f"{MIN_TOKEN_LENGTH} are required (make one with: openssl rand -hex 32)",
        )
    loose = tokenFilePermissions(tokenFile)
    if loose:
        table.warn("token_file", loose)
    return AdminConfig(
        endpoint=endpoint, token=token, tokenFile=tokenFile, tls=tls, healthDetails=table.boolean("health_details", False)
    )


_REDIS_URL = re.compile(r"^(rediss?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?(?:/(\d{1,2})?)?$")


def parseCluster(table: Table | None) -> ClusterConfig | None:
    """
    The C{[cluster]} table, or L{None} without one (the proxy keeps its
    state to itself).

    @raise ConfigError: naming the key that is wrong.
    """
    if table is None:
        return None
    table.allow("redis", "ca_file", "password_file", "key_prefix", "name", "connect_timeout", "timeout", "heartbeat")
    url = table.string("redis")
    match = _REDIS_URL.match(url)
    if match is None:
        # No user name or password in the URL: they would show in every
        # error and in `mailproxy show-config`; password_file holds it.
        table.fail("redis", f"must be redis://HOST[:PORT][/DB] or rediss://HOST[:PORT][/DB], not {url!r}")
    scheme, host, port, db = match.groups()
    if port is not None and not 1 <= int(port) <= 65535:
        table.fail("redis", f"port must be 1 to 65535, not {port}")
    tls = scheme == "rediss"
    caFile = table.collect(lambda: table.path("ca_file", None), None)
    if caFile is not None and not tls:
        table.fail("ca_file", "only for rediss:// (TLS to Redis)")
    password = readSecretLine(table, "password_file") if "password_file" in table else None
    prefix = table.string("key_prefix", "mailproxy:")
    if any(c.isspace() for c in prefix):
        table.fail("key_prefix", f"must not contain white space: {prefix!r}")
    name = table.string("name", None)
    if name is None:
        name = socket.gethostname()
    if not _HOSTNAME.match(name):
        table.fail("name", f"must be a name without spaces (a host name, say), not {name!r}")
    return ClusterConfig(
        host=host.strip("[]"),
        port=int(port) if port is not None else 6379,
        db=int(db) if db else 0,
        tls=tls,
        caFile=caFile,
        password=password,
        passwordFile=table.path("password_file") if password is not None else None,
        keyPrefix=prefix,
        name=name,
        connectTimeout=table.number("connect_timeout", 5.0, positive=True, maximum=300),
        timeout=table.number("timeout", 2.0, positive=True, maximum=300),
        heartbeat=table.number("heartbeat", 10.0, minimum=1, maximum=3600),
    )


def tokenFilePermissions(path: str) -> str | None:
    """
    Why the management token file C{path} is too open, or L{None}.

    The token gives whoever holds it the management endpoint: routes,
    sessions, reloads.  A file that users other than its owner may read or
    write still works, but is worth a warning.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return (
        f"{path!r} can be read or written by users other than its owner "
        f"(mode {mode & 0o777:04o}); make it private: chmod 600 {path}"
    )


def _isLoopback(interface: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def _parseLog(table: Table | None) -> LogConfig:
    if table is None:
        return LogConfig()
    table.allow("format", "path")
    logFormat = table.string("format", "text", LOG_FORMATS)
    path = table.string("path", None)
    if path is not None and path != "-":
        path = table.path("path", readable=False)
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            table.fail("path", f"the directory {directory!r} does not exist")
    return LogConfig(format=logFormat, path=path)


#: The most accounts a migration campaign copies at once.
MAX_MIGRATION_CONCURRENCY = 64

#: The time limits of C{[migration]}: (TOML key, L{MigrationSettings} attribute).
_MIGRATION_TIMEOUTS = (
    ("copy_timeout", "copyTimeout"),
    ("hold_timeout", "holdTimeout"),
    ("client_timeout", "clientTimeout"),
    ("session_poll", "sessionPoll"),
)


def _parseMigration(table: Table | None, backends: Mapping[str, Backend] | None) -> MigrationSettings:
    """
    The C{[migration]} table: the backend accounts migrate to when they log
    in (C{on_login}) and the domains and router rule that applies to, where the engine
    keeps its journal, how many accounts a campaign copies at once, the
    sync tools it runs (and which one per target), its time limits, how
    often it runs the final sync and verify before a difference fails an
    account, and when it looks again for mail that reached the source
    after the flip.

    @param backends: the configured backends, or L{None} if they could not
        be read (then the backends named here are not checked).
    """
    if table is None:
        return MigrationSettings()
    table.allow(
        "on_login", "on_login_domains", "on_login_rule", "journal", "concurrency", "doveadm", "mbsync", "tools",
        "doveadm_config",
        *(key for key, _ in _MIGRATION_TIMEOUTS), "sync_attempts", "late_mail_grace",
    )

    def backend(name: str, key: str | int, where: Table) -> None:
        if backends is not None and name not in backends:
            configured = ", ".join(sorted(backends)) or "none"
            where.fail(key, f"no backend named {name!r}; configured backends: {configured}{suggest(name, backends)}")

    def onLogin() -> str | None:
        target: str | None = table.string("on_login", None)
        if target is not None:
            backend(target, "on_login", table)
        return target

    def domains() -> tuple[str, ...]:
        names: tuple[str, ...] = table.strings("on_login_domains", ())
        if names and "on_login" not in table:
            table.fail("on_login_domains", "needs on_login (the backend to migrate to)")
        for name in names:
            if "@" in name or not _HOSTNAME.match(name):
                table.fail("on_login_domains", f"not a domain: {name!r}")
        return tuple(name.lower() for name in names)

    def rule() -> str | None:
        pattern: str | None = table.string("on_login_rule", None)
        if pattern is not None and "on_login" not in table:
            table.fail("on_login_rule", "needs on_login (the backend to migrate to)")
        return pattern

    def journal() -> str | None:
        path: str | None = table.path("journal", None, readable=False)
        if path is not None and not os.path.isdir(os.path.dirname(path)):
            table.fail("journal", f"the directory {os.path.dirname(path)!r} does not exist")
        return path

    def tool(name: str) -> str:
        # A command line, split like a shell would when run (it may start
        # with a wrapper: "sudo -n /usr/bin/doveadm").  Its first word, if a
        # relative path, is resolved against the configuration's directory
        # as other paths are; a bare name is looked up in PATH when run.
        command: str = table.string(name, name)
        try:
            words = shlex.split(command)
        except ValueError as error:
            table.fail(name, f"not a command line: {error}")
        if not words:
            table.fail(name, "must name a command")
        first = os.path.expanduser(words[0])
        if "/" in first:
            first = os.path.normpath(os.path.join(table.base, first))
        if first == words[0]:
            return command
        words[0] = first
        return shlex.join(words)

    def perBackend(key: str, read: Callable[[Table, str], str]) -> dict[str, str]:
        # A table keyed by target backend: tools = { new = "doveadm" }.
        entries = table.table(key)
        if entries is None:
            return {}
        values = {}
        for name in entries.data:
            backend(name, name, entries)
            values[name] = read(entries, name)
        return values

    defaults = MigrationSettings()
    values: dict[str, Any] = {
        attribute: table.collect(lambda: table.number(key, None, positive=True), None)
        for key, attribute in _MIGRATION_TIMEOUTS
    }
    return MigrationSettings(
        onLogin=table.collect(onLogin, None),
        onLoginDomains=table.collect(domains, ()),
        onLoginRule=table.collect(rule, None),
        journal=table.collect(journal, None),
        concurrency=table.collect(lambda: table.integer("concurrency", defaults.concurrency, 1, MAX_MIGRATION_CONCURRENCY), 1),
        doveadm=table.collect(lambda: tool("doveadm"), "doveadm"),
        mbsync=table.collect(lambda: tool("mbsync"), "mbsync"),
        tools=table.collect(lambda: perBackend("tools", lambda t, n: t.string(n, None, MIGRATION_TOOLS)), {}),
        doveadmConfig=table.collect(lambda: perBackend("doveadm_config", lambda t, n: t.path(n)), {}),
        syncAttempts=table.collect(lambda: table.integer("sync_attempts", defaults.syncAttempts, 1, 10), 1),
        lateMailGrace=table.collect(lambda: table.number("late_mail_grace", defaults.lateMailGrace, 0), 0.0),
        **{attribute: value for attribute, value in values.items() if value is not None},
    )


def _parseRouter(table: Table) -> RouterConfig:
    kind = table.string("type")
    if kind.startswith("python:"):
        if not _PYTHON_NAME.match(kind[len("python:") :]):
            table.fail("type", f"must be python:package.module.Class, not {kind!r}")
    elif kind not in ROUTER_TYPES:
        allowed = ", ".join(ROUTER_TYPES + ("python:package.module.Class",))
        table.fail("type", f"must be one of {allowed}, not {kind!r}")
    if kind == "static":
        table.path("path")
    options = {}
    for name, value in table.data.items():
        if name == "type":
            continue
        if isPathKey(name) and isinstance(value, str):
            value = table.path(name, readable=False)
        options[name] = value
    return RouterConfig(type=kind, options=options)


def _warnOAuthWithoutMaster(table: Table, backends: Mapping[str, Backend]) -> None:
    """
    Warn about the backends a validating C{oauth} sub-table (of the router,
    or of a chain's routers) cannot log in to: it logs in as the backend's
    master user, and they have none.
    """
    lacking = sorted(name for name, backend in backends.items() if backend.masterUser is None)
    if not lacking:
        return
    try:
        members = table.tables("routers") if table.data.get("type") == "chain" else []
    except ConfigError:
        # The chain's builder says what is wrong with it.
        members = []
    for routerTable in [table, *members]:
        if isinstance(routerTable.data.get("oauth"), dict):
            names = ", ".join(lacking)
            routerTable.warn(
                "oauth",
                f"validates tokens and logs in to the backend as its master_user; "
                f"backend{'s' if len(lacking) > 1 else ''} {names} {'have' if len(lacking) > 1 else 'has'} none, "
                "so an OAuth login routed there fails",
            )


JOURNAL_NAME = "migrations.json"
"""
The migration journal's file name when C{[migration] journal} is unset: in
the configuration file's directory.
"""


def journalPath(configPath: str, journal: str | None) -> str:
    """
    Where the migration engine keeps its journal: C{journal} if set, else
    L{JOURNAL_NAME} in the configuration file's directory.
    """
    return journal if journal is not None else os.path.join(os.path.dirname(configPath), JOURNAL_NAME)


def isPathKey(name: str) -> bool:
    """
    Whether a router option named C{name} holds a file name, resolved
    against the configuration's directory: C{path}, and names ending in
    C{_path}, C{_file} or C{_dir}.
    """
    return name == "path" or name.endswith(("_path", "_file", "_dir"))
