#!/usr/bin/env python3
"""
An auth server in nginx's C{auth_http} dialect, the way operators write them
for nginx's mail proxy: it reads C{Auth-User} and C{Auth-Pass}, checks them
against a table, and answers C{Auth-Status}, C{Auth-Server}, C{Auth-Port}.
The same server works behind nginx and behind mailproxy's C{http} router.

Run it (Twisted is the only requirement):

    python3 examples/auth_server.py --users examples/auth_users.toml
    python3 examples/auth_server.py --listen tcp:9000:interface=127.0.0.1 --users /etc/mail/auth_users.toml

then point nginx (C{auth_http 127.0.0.1:9000/auth;}) or mailproxy
(C{[router] type = "http"}, C{url = "http://127.0.0.1:9000/auth"}) at it.

The users file (TOML, re-read when it changes) is shown in
C{examples/auth_users.toml}.  What the server does:

 - a known user with the right password: C{Auth-Status: OK}, the user's
   server (an IP address: nginx needs one) and the port of the protocol in
   C{Auth-Protocol}; C{Auth-User} if the account logs in under another name
   on its server;
 - APOP and CRAM-MD5 (C{Auth-Salt} present): the digest is checked against
   the stored password, which is then sent as C{Auth-Pass} (nginx needs it
   to log in to the server);
 - SMTP without authentication (C{Auth-Method: none}): the recipient in
   C{Auth-SMTP-To} is looked up and routed, with no password involved;
 - anything else: C{Auth-Status: Invalid login or password} with
   C{Auth-Wait: 3} so the client may try again, and without C{Auth-Wait}
   from the third attempt on, which makes the proxy close the connection.
   An unknown user also gets C{X-Mailproxy-Unknown: yes} (nginx ignores it;
   a mailproxy chain asks its next router).

A shared secret (nginx's C{auth_http_header}, mailproxy's C{headers}) keeps
others from asking: set C{[auth] header} and C{secret} in the users file;
C{[auth] wait} sets the C{Auth-Wait} seconds (default 3).  C{--record FILE}
appends every question's headers to FILE, to compare what proxies send.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import tomllib
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

#: Failures after which the answer has no Auth-Wait: the proxy then closes
#: the connection instead of letting the client try again.
MAX_ATTEMPTS = 3

FAILED = "Invalid login or password"


def unescape(value: bytes) -> bytes:
    """
    nginx escapes C{Auth-User} and C{Auth-Pass} with C{%XX} (control
    characters, space and C{%} only); undo that, and nothing else.
    """
    return unquote_to_bytes(value)


class UserTable:
    """
    The users file, re-read whenever its modification time changes.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self.users: dict[str, dict[str, Any]] = {}
        self.defaults: dict[str, Any] = {}
        self.auth: dict[str, str] = {}
        self.refresh()

    def refresh(self) -> None:
        """
        Read the file again if it changed; keep the old table if the new one
        does not parse.
        """
        info = os.stat(self.path)
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp == self._stamp:
            return
        with open(self.path, "rb") as f:
            data = tomllib.load(f)
        self.users = {name.lower(): entry for name, entry in data.get("users", {}).items()}
        self.defaults = data.get("defaults", {})
        self.auth = data.get("auth", {})
        self._stamp = stamp

    def find(self, user: str) -> dict[str, Any] | None:
        """
        The entry of C{user} (compared without case) with the defaults
        filled in, or L{None}.
        """
        entry = self.users.get(user.lower())
        if entry is None:
            return None
        merged = dict(self.defaults)
        merged.update(entry)
        merged["ports"] = {**self.defaults.get("ports", {}), **entry.get("ports", {})}
        return merged


def digestMatches(method: bytes, salt: bytes, response: bytes, secret: bytes) -> bool:
    """
    Whether an APOP or CRAM-MD5 C{response} to C{salt} proves C{secret}.
    """
    salt = salt.rstrip(b"\r\n")
    if method == b"apop":
        expected = hashlib.md5(salt + secret).hexdigest()
    elif method == b"cram-md5":
        expected = hmac.new(secret, salt, hashlib.md5).hexdigest()
    else:
        return False
    return hmac.compare_digest(expected.encode("ascii"), response.lower())


class AuthResource(Resource):
    """
    Answers nginx C{auth_http} questions from a L{UserTable}.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, table: UserTable, record: str | None = None) -> None:
        """
        @param record: a file to append each question's headers to, one
            JSON line each, in the order received, with C{Auth-Pass}
            masked: to see what a proxy sends.
        """
        super().__init__()
        self.table = table
        self.record = record

    def render_GET(self, request: Request) -> bytes:
        try:
            self.table.refresh()
        except (OSError, tomllib.TOMLDecodeError) as e:
            self.log.error("cannot read {path}: {error}", path=self.table.path, error=e)
        if self.record is not None:
            self.write(request)
        self.answer(request, self.decide(request))
        return b""

    def write(self, request: Request) -> None:
        """
        Append the question's headers to the record file.
        """
        headers = [
            [name.decode("latin-1"), "***" if name.lower() == b"auth-pass" and value else value.decode("utf-8", "replace")]
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        with open(self.record, "a", encoding="utf-8") as f:  # type: ignore[arg-type]
            f.write(json.dumps({"method": request.method.decode(), "uri": request.uri.decode("latin-1"), "headers": headers}) + "\n")

    def header(self, request: Request, name: str) -> bytes:
        """
        A request header's raw value, C{b""} if absent.
        """
        value = request.getHeader(name.encode("ascii"))
        if value is None:
            return b""
        return value if isinstance(value, bytes) else value.encode("latin-1")

    def decide(self, request: Request) -> list[tuple[str, str]]:
        """
        The answer's headers for one question.
        """
        secretHeader = self.table.auth.get("header")
        if secretHeader and not hmac.compare_digest(
            self.header(request, secretHeader), self.table.auth.get("secret", "").encode("utf-8")
        ):
            self.log.warn("refused a question without the shared secret from {peer}", peer=request.getClientAddress())
            return [("Auth-Status", "Temporary server problem, try again later"), ("Auth-Error-Code", "451 4.3.0")]
        method = self.header(request, "Auth-Method")
        protocol = self.header(request, "Auth-Protocol").decode("ascii", "replace")
        attempt = int(self.header(request, "Auth-Login-Attempt") or b"1")
        if method == b"none":
            recipient = self.header(request, "Auth-SMTP-To").decode("utf-8", "replace")
            user = recipient.partition("<")[2].partition(">")[0]
            entry = self.table.find(user)
            if entry is None:
                self.log.info("no such recipient {user}", user=user)
                return [("Auth-Status", "Recipient unknown"), ("Auth-Error-Code", "550 5.1.1")]
            return self.route(entry, "mx" if "mx" in entry["ports"] else protocol, user)
        user = unescape(self.header(request, "Auth-User")).decode("utf-8", "replace")
        password = unescape(self.header(request, "Auth-Pass"))
        salt = self.header(request, "Auth-Salt")
        entry = self.table.find(user)
        stored = str(entry.get("password", "")).encode("utf-8") if entry else b""
        if entry is None:
            good = False
        elif salt:
            good = digestMatches(method, salt, password, stored)
        else:
            good = bool(stored) and hmac.compare_digest(password, stored)
        client = self.header(request, "Client-IP").decode("ascii", "replace")
        if not good or entry is None:
            self.log.info(
                "{protocol} login failed for {user} from {client} (attempt {attempt})",
                protocol=protocol,
                user=user,
                client=client,
                attempt=attempt,
            )
            answer = [("Auth-Status", FAILED)]
            if attempt < MAX_ATTEMPTS:
                answer.append(("Auth-Wait", str(self.table.auth.get("wait", 3))))
            if protocol == "smtp":
                answer.append(("Auth-Error-Code", "535 5.7.8"))
            if entry is None:
                answer.append(("X-Mailproxy-Unknown", "yes"))
            return answer
        self.log.info("{protocol} login for {user} from {client}", protocol=protocol, user=user, client=client)
        answer = self.route(entry, protocol, user)
        if salt and answer[0] == ("Auth-Status", "OK"):
            answer.append(("Auth-Pass", stored.decode("utf-8")))
        return answer

    def route(self, entry: dict[str, Any], protocol: str, user: str) -> list[tuple[str, str]]:
        """
        The headers that send C{user} to its server.
        """
        port = entry["ports"].get(protocol)
        if port is None or "server" not in entry:
            self.log.error("{user} has no server or no {protocol} port", user=user, protocol=protocol)
            return [("Auth-Status", "Temporary server problem, try again later"), ("Auth-Error-Code", "451 4.3.0")]
        answer = [("Auth-Status", "OK"), ("Auth-Server", str(entry["server"])), ("Auth-Port", str(port))]
        if "login_user" in entry:
            answer.append(("Auth-User", str(entry["login_user"])))
        return answer

    def answer(self, request: Request, headers: list[tuple[str, str]]) -> None:
        """
        Write C{headers} into the response.
        """
        for name, value in headers:
            request.setHeader(name.encode("ascii"), value.encode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    """
    Serve until interrupted.
    """
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(description="An nginx-style auth_http server for mail proxies.")
    parser.add_argument("--listen", default="tcp:9000:interface=127.0.0.1", help="Twisted endpoint (default %(default)s)")
    parser.add_argument(
        "--users",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "auth_users.toml"),
        help="the users file (default: auth_users.toml next to this script)",
    )
    parser.add_argument("--quiet", action="store_true", help="log nothing (benchmarks)")
    parser.add_argument("--record", metavar="FILE", help="append each question's headers to FILE (JSON lines, Auth-Pass masked)")
    arguments = parser.parse_args(argv)
    table = UserTable(arguments.users)
    if not arguments.quiet:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    site = Site(AuthResource(table, arguments.record))
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    endpoint = serverFromString(reactor, arguments.listen)

    def listening(port: Any) -> None:
        print(f"auth server listening on {port.getHost().host}:{port.getHost().port}", flush=True)

    def failed(reason: Any) -> None:
        print(f"auth server cannot listen: {reason.value}", file=sys.stderr, flush=True)
        reactor.stop()

    endpoint.listen(site).addCallbacks(listening, failed)
    reactor.run()


if __name__ == "__main__":
    main()
