"""
The command line's client for the management endpoint of a running proxy.

It finds the endpoint and the token in the proxy's configuration (or is
told them), and speaks plain blocking HTTP: a command makes one request and
exits.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import ssl
import tomllib
from typing import Any
from urllib.parse import quote, urlsplit

from .config import AdminConfig, Config, ConfigError, Table, loadConfig, parseAdmin, splitEndpoint

__all__ = ["AdminClient", "AdminError", "EndpointUnreachable", "endpointURL", "clientFromConfig", "adminFromFile"]


class AdminError(Exception):
    """
    The proxy could not be reached, or refused the request; C{str(error)}
    says why.
    """


class EndpointUnreachable(AdminError):
    """
    The management endpoint could not be reached (or broke off): the proxy
    may be down or restarting.
    """


def _unescape(value: str) -> str:
    return value.replace("\\:", ":").replace("\\=", "=").replace("\\\\", "\\")


def endpointURL(endpoint: str, tls: bool) -> str:
    """
    The URL that reaches a server endpoint string from this machine: an
    all-interfaces address becomes loopback.
    """
    parts = [_unescape(part) for part in splitEndpoint(endpoint)]
    kind, port = parts[0], parts[1]
    options = dict(part.split("=", 1) for part in parts[2:] if "=" in part)
    if port.startswith("port="):
        port = port[len("port=") :]
    host = options.get("interface", "")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


class AdminClient:
    """
    Makes requests to one management endpoint.

    @ivar url: e.g. C{http://127.0.0.1:9443}.
    @ivar certificate: for HTTPS, the PEM file of the certificate to trust
        (the one the proxy serves, or its CA).
    """

    def __init__(self, url: str, token: bytes, certificate: str | None = None, timeout: float = 120.0) -> None:
        self.url = url
        self.token = token
        self.certificate = certificate
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        parts = urlsplit(self.url)
        host, port = parts.hostname or "127.0.0.1", parts.port
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=self.certificate)
            if self.certificate is not None:
                # The proxy's own certificate (not only a root) is trusted,
                # pinned: its name need not match the loopback address.
                context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
                context.check_hostname = False
            return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=context)
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """
        Make one request.

        @return: the status and the decoded JSON body (or text for other
            content).
        @raise AdminError: the endpoint could not be reached.
        """
        connection = self._connection()
        headers = {"Authorization": "Bearer " + self.token.decode("ascii", "replace")}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            content = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise EndpointUnreachable(f"cannot reach the management endpoint at {self.url}: {e}") from None
        finally:
            connection.close()
        if response.getheader("Content-Type", "").startswith("application/json"):
            return response.status, json.loads(content)
        return response.status, content.decode("utf-8", "replace")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """
        Like L{request}, but a status other than 200 is an L{AdminError}
        with the endpoint's reason.
        """
        status, data = self.request(method, path, body)
        if status != 200:
            reason = data.get("error") if isinstance(data, dict) else None
            raise AdminError(f"{method} {path}: {status} {reason or data}")
        return data


def quoteKey(key: str) -> str:
    """
    A route key as a path segment.
    """
    return quote(key, safe="@*")


def clientFromConfig(config: Config | str, url: str | None = None, token: bytes | None = None) -> AdminClient:
    """
    A client for the endpoint of the proxy that runs C{config} (a loaded
    configuration, or the path of one, which may be broken elsewhere than
    in C{[admin]}).

    @raise AdminError: the configuration has no C{[admin]} and no URL and
        token were given.
    """
    if isinstance(config, str):
        path = os.path.abspath(config)
        admin, _ = adminFromFile(path)
    else:
        path, admin = config.path, config.admin
    if admin is None and (url is None or token is None):
        raise AdminError(f"{path}: no [admin] table: the proxy has no management endpoint")
    certificate = admin.tls.certificate if admin is not None and admin.tls is not None else None
    return AdminClient(
        url or endpointURL(admin.endpoint, admin.tls is not None),  # type: ignore[union-attr]
        token or admin.token,  # type: ignore[union-attr]
        certificate,
    )


_HEADER = re.compile(r"^\s*\[")
_ADMIN_HEADER = re.compile(r"^\s*\[\s*admin\s*\]\s*(#.*)?$")


def adminFromFile(path: str) -> tuple[AdminConfig | None, str | None]:
    """
    The C{[admin]} table of the configuration at C{path}, even when the rest
    of the file is broken: that is when an operator runs C{mailproxy reload}
    to hear from the running proxy why.

    @return: the management endpoint (or L{None} without C{[admin]}), and
        why the whole file does not load (or L{None} if it does).
    @raise AdminError: not even the C{[admin]} table can be read.
    """
    path = os.path.abspath(path)
    try:
        return loadConfig(path).admin, None
    except ConfigError as e:
        problem = str(e)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        raise AdminError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text).get("admin")
    except tomllib.TOMLDecodeError:
        # Only the [admin] table's own lines, which may well be intact.
        lines, inside = [], False
        for line in text.splitlines():
            if _HEADER.match(line):
                inside = bool(_ADMIN_HEADER.match(line))
            elif inside:
                lines.append(line)
        try:
            data = tomllib.loads("\n".join(lines)) if lines else None
        except tomllib.TOMLDecodeError:
            raise AdminError(problem) from None
    if not isinstance(data, dict):
        return None, problem
    try:
        return parseAdmin(Table(path, ("admin",), data, os.path.dirname(path)), ()), problem
    except ConfigError as e:
        raise AdminError(str(e)) from None
