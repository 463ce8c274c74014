"""
The effective configuration as TOML, for C{mailproxy config show} (as
C{doveconf -n} or C{postconf} show theirs).

Every default is filled in and every path made absolute, so that what is
shown is what runs, and reading it back gives the same configuration.
Secrets never appear: a file that holds one is named, not read out, and
what a router's options might carry inline (HTTP headers, a key named like
a password) is replaced with L{HIDDEN}, a password in a URL or a DSN with
C{***}.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mailproxy._tls import CertificateSource
from mailproxy.config import Config, Key, formatKey

__all__ = ["HIDDEN", "effectiveConfig", "dumpTOML"]

HIDDEN = "(not shown)"
"""
What stands in for a value that may be a secret.
"""

_SECRET_NAME = re.compile(r"password|secret|token|passphrase", re.IGNORECASE)
_DSN_PASSWORD = re.compile(r"(\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def effectiveConfig(
    config: Config,
    masterPasswordFiles: Mapping[str, str],
    routerReads: Mapping[tuple[str, Key], Any] | None = None,
) -> dict[str, Any]:
    """
    C{config} as TOML-ready data, defaults filled in, secrets left out.

    @param masterPasswordFiles: each backend's C{master_password_file}
        (absolute), by backend name: L{Config} keeps the password it read,
        which is never shown, not the file it came from.
    @param routerReads: what building the router read that the file does
        not say (L{mailproxy.config.recordingReads}): its options'
        defaults and absolute paths, which only the router's builder knows.
    """
    limits = config.limits
    data: dict[str, Any] = {
        # Without workers, one per CPU: shown as a number it would pin this
        # host's count.
        "proxy": _withoutNone({"hostname": config.hostname, "workers": config.workers}),
        "limits": _withoutNone(
            {
                "line_length": limits.lineLength,
                "literal_size": limits.literalSize,
                "preauth_timeout": limits.preauthTimeout,
                "connections_per_address": limits.connectionsPerAddress,
                "login_failures": limits.loginFailures,
                "failure_delay": limits.failureDelay,
                "idle_timeout": limits.idleTimeout,
                "backend_timeout": limits.backendTimeout,
                "shutdown_grace": limits.shutdownGrace,
            }
        ),
    }
    if config.tls is not None:
        data["tls"] = _certificate(config.tls)
        if config.sni:
            data["tls"]["sni"] = [{"names": list(sni.names), **_certificate(sni)} for sni in config.sni]
    data["listener"] = [
        _withoutNone(
            {
                "protocol": listener.protocol,
                "mode": listener.mode,
                "endpoint": listener.endpoint,
                "tls": listener.tls,
                "proxy_protocol": listener.proxyProtocol,
                "proxy_trusted": list(listener.proxyTrusted) or None,
                "digest_auth": listener.digestAuth,
                "local_domains": sorted(listener.localDomains) or None,
            }
        )
        for listener in config.listeners
    ]
    http = next((listener.http for listener in config.listeners if listener.http is not None), None)
    if http is not None:
        data["http"] = _withoutNone(
            {
                "cookie_secret_file": http.cookieSecretFile,
                "cookie_name": http.cookieName,
                "default_backend": http.defaultBackend,
                "pins": dict(http.pins) or None,
                "realm": http.realm,
                "max_header_size": http.maxHeaderSize,
                "max_headers": http.maxHeaders,
                "keepalive_timeout": http.keepaliveTimeout,
                "header_timeout": http.headerTimeout,
                "response_timeout": http.responseTimeout,
            }
        )
    options = _withReads(config, routerReads or {})
    data["router"] = {"type": config.router.type, **_hideSecrets(options)}
    data["backend"] = {
        name: _withoutNone(
            {
                "host": backend.host,
                "ports": dict(backend.ports),
                "tls": backend.tls,
                "port_tls": dict(backend.portTLS) or None,
                "verify": backend.verify,
                "ca_file": backend.caFile,
                "server_name": backend.serverName,
                "forward": backend.forward,
                "master_user": backend.masterUser,
                "master_password_file": masterPasswordFiles.get(name) if backend.masterUser else None,
                "master_separator": backend.masterSeparator,
                "connect_timeout": backend.connectTimeout,
            }
        )
        for name, backend in config.backends.items()
    }
    if config.admin is not None:
        admin = config.admin
        data["admin"] = {
            "endpoint": admin.endpoint,
            "token_file": admin.tokenFile,
            **(_certificate(admin.tls) if admin.tls is not None else {}),
            "health_details": admin.healthDetails,
        }
    data["log"] = _withoutNone({"format": config.log.format, "path": config.log.path})
    migration = config.migration
    data["migration"] = _withoutNone(
        {
            "on_login": migration.onLogin,
            "on_login_domains": list(migration.onLoginDomains) or None,
            "on_login_rule": migration.onLoginRule,
            "journal": migration.journal,
            "concurrency": migration.concurrency,
            "doveadm": migration.doveadm,
            "mbsync": migration.mbsync,
            "tools": dict(migration.tools) or None,
            "doveadm_config": dict(migration.doveadmConfig) or None,
            "copy_timeout": migration.copyTimeout,
            "hold_timeout": migration.holdTimeout,
            "client_timeout": migration.clientTimeout,
            "session_poll": migration.sessionPoll,
            "sync_attempts": migration.syncAttempts,
            "late_mail_grace": migration.lateMailGrace,
        }
    )
    cluster = config.cluster
    if cluster is not None:
        # The URL as the operator writes it; the password stays in its file.
        data["cluster"] = _withoutNone(
            {
                "redis": f"{'rediss' if cluster.tls else 'redis'}://{_urlHost(cluster.host)}:{cluster.port}/{cluster.db}",
                "ca_file": cluster.caFile,
                "password_file": cluster.passwordFile,
                "key_prefix": cluster.keyPrefix,
                "name": cluster.name,
                "connect_timeout": cluster.connectTimeout,
                "timeout": cluster.timeout,
                "heartbeat": cluster.heartbeat,
            }
        )
    return data


def _withReads(config: Config, reads: Mapping[tuple[str, Key], Any]) -> dict[str, Any]:
    """
    The router's options as written, with what building it read added:
    each default where a key is left out, each path made absolute, in the
    table the builder read it from (C{[router]}, its C{cache}, a chain's
    C{[[router.routers]]}, ...).
    """
    options = copy.deepcopy(dict(config.router.options))
    base = os.path.dirname(config.path)
    for (file, key), value in reads.items():
        if file != config.path or key[:1] != ("router",) or len(key) < 2:
            continue
        table: Any = options
        for step in key[1:-1]:
            if isinstance(step, int) and isinstance(table, list) and step < len(table):
                table = table[step]
            elif isinstance(step, str) and isinstance(table, dict) and step not in table:
                # A table the file leaves out and the builder read all the
                # same, for its defaults.
                child: dict[str, Any] = {}
                table[step] = child
                table = child
            elif isinstance(step, str) and isinstance(table, dict) and isinstance(table.get(step), (dict, list)):
                table = table[step]
            else:
                table = None
                break
        if not isinstance(table, dict):
            continue
        name, written = key[-1], table.get(key[-1])
        if name not in table:
            table[name] = value
        elif isinstance(written, dict) and isinstance(value, dict):
            table[name] = {**value, **written}
        elif isinstance(written, str) and os.path.normpath(os.path.join(base, os.path.expanduser(written))) == value:
            table[name] = value
    return options


def _urlHost(host: str) -> str:
    # An IPv6 address goes in brackets in a URL.
    return f"[{host}]" if ":" in host else host


def _certificate(source: CertificateSource) -> dict[str, Any]:
    return {"certificate": source.certificate, "key": source.key}


def _withoutNone(table: dict[str, Any]) -> dict[str, Any]:
    # TOML has no null: an unset optional key is left out.
    return {key: value for key, value in table.items() if value is not None}


def _hideSecrets(options: Mapping[str, Any]) -> dict[str, Any]:
    """
    A router's options with whatever may be a secret replaced by
    L{HIDDEN}; keys naming a file (C{password_file}) or a directory
    attribute (C{password_attribute}) stay.
    """
    shown: dict[str, Any] = {}
    for name, value in options.items():
        if name == "headers" and isinstance(value, dict):
            shown[name] = {header: HIDDEN for header in value}
        elif _SECRET_NAME.search(name) and not name.endswith(("_file", "_path", "_dir", "_attribute")):
            shown[name] = HIDDEN
        else:
            shown[name] = _hideInValue(value)
    return shown


def _hideInValue(value: Any) -> Any:
    if isinstance(value, dict):
        return _hideSecrets(value)
    if isinstance(value, list):
        return [_hideInValue(item) for item in value]
    if isinstance(value, str):
        return _hideInString(value)
    return value


def _hideInString(text: str) -> str:
    """
    C{text} without the password of a URL (C{scheme://user:pw@host}) or of
    a key/value DSN (C{password=pw}).
    """
    text = _DSN_PASSWORD.sub(lambda match: match.group(1) + "***", text)
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if parts.scheme and parts.password is not None:
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    return text


def dumpTOML(data: Mapping[str, Any]) -> str:
    """
    Write C{data} (tables, arrays, strings, numbers, booleans) as TOML:
    top-level tables as C{[name]}, arrays of tables as C{[[name]]}, and
    small tables of plain values inside them inline (C{ports = { imap = 143 }}).
    """
    lines: list[str] = []
    _dumpTable(lines, (), data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _isPlain(value: Any) -> bool:
    return not isinstance(value, (dict, list)) or (
        isinstance(value, list) and not any(isinstance(item, dict) for item in value)
    )


def _dumpTable(lines: list[str], path: tuple[str | int, ...], table: Mapping[str, Any]) -> None:
    later: list[tuple[str, Any]] = []
    for name, value in table.items():
        if isinstance(value, dict) and path and all(_isPlain(item) for item in value.values()):
            lines.append(f"{formatKey((name,))} = {_inline(value)}")
        elif _isPlain(value):
            lines.append(f"{formatKey((name,))} = {_value(value)}")
        else:
            later.append((name, value))
    for name, value in later:
        if isinstance(value, dict):
            # A table of tables needs no header of its own ([backend]).
            if not value or any(_isPlain(item) for item in value.values()):
                lines.extend(["", f"[{formatKey(path + (name,))}]"])
            _dumpTable(lines, path + (name,), value)
        else:
            for item in value:
                lines.extend(["", f"[[{formatKey(path + (name,))}]]"])
                _dumpTable(lines, path + (name,), item)


def _inline(table: Mapping[str, Any]) -> str:
    return "{ " + ", ".join(f"{formatKey((name,))} = {_value(value)}" for name, value in table.items()) + " }"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, but for DEL, which TOML
        # wants escaped and JSON leaves alone.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return _inline(value)
    raise TypeError(f"no TOML form for {type(value).__name__}")
