"""
HTTP through the proxy, end to end: two real Cyrus IMAP 3.6 servers ("old"
and "new", whose C{httpd} serves JMAP, CalDAV and CardDAV), an nginx in
front of each (the push event stream, WebDAV files, a port behind a PROXY
header, and an access log of what the proxy told it about the client), the
proxy as a subprocess with an
implicit-TLS C{protocol = "http"} listener, and real clients: the C{jmapc}
and C{caldav} libraries, and C{http.client} where the exact response or
the client's source address matters.

Every account exists on both Cyrus servers with the same password; its
INBOX holds one message with the Subject C{"<account> on <server>"} and a
mailbox C{"Archive <server>"}, so what a client reads shows which server
answered.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.parse
import uuid
from base64 import b64encode
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Mapping

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from .common import CLIENT_ADDRESS, TIMEOUT, routesText, tomlTable
from .cyrus import Cyrus
from .nginx import NginxWeb
from .servers import Proxy, TestCA, fixtureDirectory, freePort, refusedPort, requireServer, sharedFixture

_REPOSITORY = Path(__file__).resolve().parent.parent.parent

#: Accounts on both servers.
PASSWORDS = {
    "alice@example.org": "alice secret",
    "bob@example.org": "bob-secret",
    "dave@example.org": "dave-secret",
    "erin@example.org": "erin-secret",
}

#: The static route table: alice and bob at the Cyrus servers themselves,
#: dave and erin behind the nginx in front of old; dave's entry has a
#: password, which the proxy checks (an authenticating route).
ROUTES: dict[str, Any] = {
    "accounts": {
        "alice@example.org": "old",
        "bob@example.org": "new",
        "dave@example.org": {"backend": "webold", "password": PASSWORDS["dave@example.org"]},
        "erin@example.org": "webold",
        "zed@example.org": "dead",
    },
}

TOKEN = "http-token-0123456789abcdef0123456789abcdef"

#: The key both Cyrus servers check bearer tokens (JWT, HS256) with.
JWT_KEY = b"cyrus-jwt-test-key-0123456789abcdef"

#: The proxy's answer when a router refuses credentials (its realm is the
#: [http] default, "mail").
PROXY_CHALLENGE = 'Basic realm="mail"'


def message(account: str, server: str) -> bytes:
    """
    The message in C{account}'s INBOX on C{server}.
    """
    return (
        f"From: postmaster@example.org\r\nTo: {account}\r\nSubject: {account} on {server}\r\n"
        f"Message-ID: <{account}.{server}@example.org>\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
        f"\r\nThis is {account}'s mail on {server}.\r\n"
    ).encode()


class HTTPServers:
    """
    Cyrus old and new, each with an nginx in front (C{webold},
    C{webnew}), and the CA that signs the proxy's certificate.
    """

    def __init__(self, directory: str) -> None:
        self.ca = TestCA(os.path.join(directory, "ca"))
        self.old = Cyrus(os.path.join(directory, "old"), "old", PASSWORDS, jwtKey=JWT_KEY)
        self.new = Cyrus(os.path.join(directory, "new"), "new", PASSWORDS, jwtKey=JWT_KEY)
        self.webold: NginxWeb
        self.webnew: NginxWeb
        self._directory = directory

    @classmethod
    def start(cls) -> HTTPServers:
        """
        Start both Cyrus servers, put each account's mail in place, and
        start the nginx in front of each.
        """
        requireServer("openssl", "nginx")
        servers = cls(fixtureDirectory("cyrus-http"))
        try:
            for cyrus in (servers.old, servers.new):
                cyrus.start()
                for account in PASSWORDS:
                    cyrus.provision(account, message(account, cyrus.name), mailboxes=[f"Archive {cyrus.name}"])
            servers.webold = NginxWeb(os.path.join(servers._directory, "webold"), "old", servers.old.http)
            servers.webold.start()
            servers.webnew = NginxWeb(os.path.join(servers._directory, "webnew"), "new", servers.new.http)
            servers.webnew.start()
        except BaseException:
            servers.stop()
            raise
        return servers

    def stop(self) -> None:
        """
        Stop everything.
        """
        for server in ("webold", "webnew"):
            if hasattr(self, server):
                getattr(self, server).stop()
        self.old.stop()
        self.new.stop()


class HTTPProxy:
    """
    The proxy: one implicit-TLS HTTP listener, the static router, backends
    C{old} and C{new} (Cyrus), C{webold} and C{webnew} (nginx in front of
    them), C{dead} (nobody listens), the management endpoint and the JSON
    event log. Requests without credentials go to C{webold}; C{/files/pinned/}
    is pinned to C{webnew}, C{/files/proxied/} to C{webproxied} (webold's
    port that wants a PROXY v2 header).
    """

    def __init__(self, servers: HTTPServers, router: Mapping[str, object] | None = None) -> None:
        """
        @param router: the C{[router]} table; by default the static router
            reading L{ROUTES}.
        """
        directory = fixtureDirectory("http-proxy")
        certificate, key = servers.ca.issue("http-proxy")
        self.admin = freePort()
        backends = {
            "old": servers.old.http,
            "new": servers.new.http,
            "webold": servers.webold.port,
            "webnew": servers.webnew.port,
            "dead": refusedPort(),
        }
        options: dict[str, dict[str, object]] = {"webproxied": {"forward": "proxy-v2"}}
        backends["webproxied"] = servers.webold.proxyPort
        self.text = (
            tomlTable("proxy", {"hostname": "proxy.example.org"})
            + tomlTable("limits", {"failure_delay": 0.1, "backend_timeout": 10})
            + tomlTable("tls", {"certificate": certificate, "key": key})
            + '[[listener]]\nprotocol = "http"\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "implicit"\n'
            + '[http]\ncookie_secret_file = "cookie.secret"\ndefault_backend = "webold"\n'
            + 'pins = { "/files/pinned/" = "webnew", "/files/proxied/" = "webproxied" }\n'
            + tomlTable("router", router or {"type": "static", "path": "routes.toml"})
            + "".join(
                tomlTable(f"backend.{name}", {"host": "127.0.0.1", "ports": {"http": port}, **options.get(name, {})})
                for name, port in backends.items()
            )
            + f'[admin]\nendpoint = "tcp:{self.admin}:interface=127.0.0.1"\ntoken_file = "admin.token"\n'
            + '[log]\nformat = "json"\npath = "events.jsonl"\n'
        )
        self.proxy = Proxy(directory, self.text)
        self.directory = self.proxy.directory
        (self.directory / "admin.token").write_text(TOKEN + "\n")
        (self.directory / "cookie.secret").write_text("http-test-cookie-secret-0123456789\n")
        (self.directory / "routes.toml").write_text(routesText(ROUTES))

    def start(self) -> None:
        """
        Start the proxy and learn its listener's port.
        """
        self.proxy.start(choosePorts=self.chooseAdminPort)
        (self.port,) = self.proxy.ports

    def chooseAdminPort(self) -> None:
        """
        Move the management endpoint to another free port.
        """
        old, self.admin = self.admin, freePort()
        self.text = self.text.replace(f'"tcp:{old}:', f'"tcp:{self.admin}:')
        self.proxy.configPath.write_text(self.text)

    def stop(self) -> None:
        """
        Stop the proxy.
        """
        self.proxy.stop()

    def events(self) -> list[dict[str, Any]]:
        """
        The JSON events the proxy wrote so far.
        """
        path = self.directory / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def baseURL(self) -> str:
        """
        The proxy's HTTPS URL, without a trailing slash.
        """
        return f"https://127.0.0.1:{self.port}"


class CyrusJMAPClient:
    """
    Makes a L{jmapc.Client} that reads the session resource at
    C{BASE/jmap/}.

    jmapc asks C{https://HOST/.well-known/jmap} and uses the URLs of the
    session resource as they are; Cyrus 3.6 answers the well-known URL with
    a redirect to its own scheme and gives relative URLs (C{"apiUrl":
    "/jmap/"}). The client here asks the session resource's own URL and
    resolves those URLs against it, as RFC 8620 clients that follow
    redirects do; every request is still jmapc's.
    """

    @staticmethod
    def make(
        base: str, user: str | None, password: str | None, verify: str | bool, wellKnown: bool = False, token: str = ""
    ) -> Any:
        """
        A jmapc client of the JMAP server at C{base} (C{https://host:port}).

        @param verify: the CA file that signed the server's certificate.
        @param wellKnown: read the session resource as jmapc does (from
            C{/.well-known/jmap}, URLs as they are), for a test of that
            step alone.
        @param token: a bearer token to send instead of C{user} and
            C{password}.
        """
        from jmapc import Client
        from jmapc.session import Session

        class Adapted(Client):  # type: ignore[misc]
            @functools.cached_property
            def requests_session(self) -> Any:
                session = super().requests_session
                session.verify = verify
                # Else requests prefers REQUESTS_CA_BUNDLE to verify.
                session.trust_env = False
                return session

            @functools.cached_property
            def jmap_session(self) -> Any:
                url = base + "/jmap/"
                response = self.requests_session.get(url, timeout=TIMEOUT)
                response.raise_for_status()
                data = response.json()
                for key in ("apiUrl", "downloadUrl", "uploadUrl", "eventSourceUrl"):
                    data[key] = urllib.parse.urljoin(url, data[key])
                return Session.from_dict(data)

        if wellKnown:
            del Adapted.jmap_session
        if token:
            return Adapted.create_with_api_token(base.removeprefix("https://"), token)
        return Adapted.create_with_password(base.removeprefix("https://"), user, password)


def mailboxesAndSubjects(client: Any) -> tuple[set[str], list[str]]:
    """
    The names of the account's mailboxes and the Subjects of its emails,
    read with JMAP C{Mailbox/get}, C{Email/query} and C{Email/get}.
    """
    from jmapc import Ref
    from jmapc.methods import EmailGet, EmailQuery, MailboxGet

    mailboxes = client.request(MailboxGet(ids=None))
    emails = client.request([EmailQuery(), EmailGet(ids=Ref("/ids"), properties=["subject"])])
    return {mailbox.name for mailbox in mailboxes.data}, sorted(email.subject for email in emails[1].response.data)


def basic(user: str, password: str) -> str:
    """
    An C{Authorization: Basic} value.
    """
    return "Basic " + b64encode(f"{user}:{password}".encode()).decode()


class Response:
    """
    What C{http.client} read: status, headers (all values of a name, in
    order, by lower-case name) and body.
    """

    def __init__(self, response: http.client.HTTPResponse, body: bytes) -> None:
        self.status = response.status
        self.headers: dict[str, list[str]] = {}
        for name, value in response.getheaders():
            self.headers.setdefault(name.lower(), []).append(value)
        self.body = body

    def header(self, name: str) -> str | None:
        """
        The first value of header C{name}, or L{None}.
        """
        return self.headers.get(name.lower(), [None])[0]

    def challenges(self) -> list[str]:
        """
        Every C{WWW-Authenticate} value, in order.
        """
        return self.headers.get("www-authenticate", [])


def challenges(server: str) -> list[str]:
    """
    The challenges of a 401 from Cyrus C{server} (with bearer tokens on).
    """
    return [f'Bearer realm="{server}.example.org"', f'Basic realm="{server}.example.org"']


def mailproxyCommand(*arguments: str) -> subprocess.CompletedProcess[str]:
    """
    Run the C{mailproxy} command of this checkout.
    """
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPOSITORY), environment.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", "import sys; from mailproxy.cli import main; sys.exit(main(sys.argv[1:]))", *arguments],
        capture_output=True,
        text=True,
        env=environment,
        timeout=TIMEOUT * 2,
    )


def peakMemoryReset(pid: int) -> int:
    """
    Start measuring C{pid}'s peak resident memory afresh; its resident
    memory now, in KiB.
    """
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def peakMemoryGrowth(pid: int, before: int) -> int:
    """
    How far C{pid}'s peak resident memory since L{peakMemoryReset} rose
    above C{before}, in KiB.
    """
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) - before  # type: ignore[union-attr]


class HTTPTestsMixin(SynchronousTestCase):
    """
    The shared servers and proxy, and clients of the proxy.
    """

    def setUp(self) -> None:
        self.servers = sharedFixture("cyrus servers", __name__, HTTPServers.start)
        self.proxy = sharedFixture("http proxy", __name__, self._startProxy)
        self.context = ssl.create_default_context(cafile=self.servers.ca.caPath)

    def _startProxy(self) -> HTTPProxy:
        proxy = HTTPProxy(self.servers)
        proxy.start()
        return proxy

    def connect(self, source: str | None = None) -> http.client.HTTPSConnection:
        """
        A connection to the proxy (from C{source}), closed after the test.
        """
        connection = http.client.HTTPSConnection(
            "127.0.0.1",
            self.proxy.port,
            timeout=TIMEOUT,
            context=self.context,
            source_address=(source, 0) if source else None,
        )
        self.addCleanup(connection.close)
        return connection

    def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] = {},
        body: Any = None,
        connection: http.client.HTTPConnection | None = None,
    ) -> Response:
        """
        One request (on C{connection}, by default a new one to the proxy);
        the whole response.
        """
        if connection is None:
            connection = self.connect()
        connection.request(method, path, body=body, headers=dict(headers))
        response = connection.getresponse()
        return Response(response, response.read())

    def direct(self, cyrus: Cyrus, method: str, path: str, headers: Mapping[str, str] = {}) -> Response:
        """
        One request straight to C{cyrus}'s C{httpd}.
        """
        connection = http.client.HTTPConnection("127.0.0.1", cyrus.http, timeout=TIMEOUT)
        self.addCleanup(connection.close)
        return self.request(method, path, headers, connection=connection)

    def accessLines(self, server: NginxWeb, mark: int, fragment: str) -> list[str]:
        """
        The lines C{server}'s access log added after C{mark}, once one of
        them contains C{fragment} (nginx writes a line after the response).
        """
        deadline = time.monotonic() + 10
        while True:
            lines = server.accessLog()[mark:].splitlines()
            if any(fragment in line for line in lines):
                return lines
            if time.monotonic() > deadline:
                self.fail(f"no line with {fragment!r} in {server.name}'s access log; it added: {lines}")
            time.sleep(0.05)

    def proxyLogLine(self, mark: int, *fragments: str) -> str:
        """
        The first line of the proxy's log after C{mark} that holds every one
        of C{fragments}, waiting for it.
        """
        deadline = time.monotonic() + 10
        while True:
            added = self.proxy.proxy.logText()[mark:]
            for line in added.splitlines():
                if all(fragment in line for fragment in fragments):
                    return line
            if time.monotonic() > deadline:
                self.fail(f"no line with {fragments} in the proxy's log; it added:\n{added}")
            time.sleep(0.05)

    def jmap(self, user: str, password: str | None = None) -> Any:
        """
        A jmapc client of the proxy for C{user}.
        """
        return CyrusJMAPClient.make(
            self.proxy.baseURL(), user, PASSWORDS[user] if password is None else password, self.servers.ca.caPath
        )

    def mailproxy(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """
        Run C{mailproxy ARGUMENTS --config} with the proxy's configuration.
        """
        return mailproxyCommand(*arguments, "--config", str(self.proxy.proxy.configPath))


class JMAPTests(HTTPTestsMixin):
    """
    jmapc reads the session resource, mailboxes and emails through the
    proxy, from the account's own server.
    """

    def test_accountOnOld(self) -> None:
        """
        alice (routed to old) gets her session resource, her mailboxes and
        her email as Cyrus old has them.
        """
        client = self.jmap("alice@example.org")
        self.assertEqual(client.jmap_session.username, "alice@example.org")
        self.assertEqual(client.account_id, "alice@example.org")
        mailboxes, subjects = mailboxesAndSubjects(client)
        self.assertEqual(mailboxes, {"Inbox", "Archive old"})
        self.assertEqual(subjects, ["alice@example.org on old"])

    def test_accountOnNew(self) -> None:
        """
        bob (routed to new) gets his session resource, his mailboxes and
        his email as Cyrus new has them.
        """
        client = self.jmap("bob@example.org")
        self.assertEqual(client.jmap_session.username, "bob@example.org")
        mailboxes, subjects = mailboxesAndSubjects(client)
        self.assertEqual(mailboxes, {"Inbox", "Archive new"})
        self.assertEqual(subjects, ["bob@example.org on new"])

    def test_keepAliveAcrossAccounts(self) -> None:
        """
        One client connection asks for alice's session resource, then
        bob's: each request goes to its own account's server.
        """
        connection = self.connect()
        for user, server in (("alice@example.org", "old"), ("bob@example.org", "new"), ("alice@example.org", "old")):
            response = self.request(
                "POST",
                "/jmap/",
                {"Authorization": basic(user, PASSWORDS[user]), "Content-Type": "application/json"},
                json.dumps(
                    {
                        "using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"],
                        "methodCalls": [
                            ["Email/query", {"accountId": user}, "q"],
                            [
                                "Email/get",
                                {
                                    "accountId": user,
                                    "#ids": {"resultOf": "q", "name": "Email/query", "path": "/ids"},
                                    "properties": ["subject"],
                                },
                                "g",
                            ],
                        ],
                    }
                ),
                connection=connection,
            )
            self.assertEqual(response.status, 200, response.body)
            emails = json.loads(response.body)["methodResponses"][1][1]["list"]
            self.assertEqual([email["subject"] for email in emails], [f"{user} on {server}"])

    def test_wellKnownRedirect(self) -> None:
        """
        Cyrus answers C{/.well-known/jmap} with a redirect to its own scheme
        (C{http:}); through the TLS listener the client is sent to
        C{https:} on the same host, and jmapc's own discovery (which starts
        there) reads the session resource.
        """
        user = "alice@example.org"
        response = self.request("GET", "/.well-known/jmap", {"Authorization": basic(user, PASSWORDS[user])})
        self.assertEqual(response.status, 301)
        self.assertEqual(response.header("Location"), f"https://127.0.0.1:{self.proxy.port}/jmap")
        client = CyrusJMAPClient.make(self.proxy.baseURL(), user, PASSWORDS[user], self.servers.ca.caPath, wellKnown=True)
        self.assertEqual(client.jmap_session.username, user)

    def test_routingCookie(self) -> None:
        """
        The response to bob's authenticated request sets the signed routing
        cookie; a request without credentials that carries it goes to new
        (Cyrus new's challenge names its realm), one without it to the
        default backend (old's).
        """
        response = self.request("GET", "/jmap/", {"Authorization": basic("bob@example.org", PASSWORDS["bob@example.org"])})
        self.assertEqual(response.status, 200)
        cookie = response.header("Set-Cookie")
        assert cookie is not None
        name, _, rest = cookie.partition("=")
        self.assertEqual(name, "mailproxy_backend")
        value, _, attributes = rest.partition(";")
        self.assertEqual(attributes.strip(), "Path=/; Secure; HttpOnly; SameSite=Lax")
        withCookie = self.request("GET", "/jmap/", {"Cookie": f"mailproxy_backend={value}"})
        self.assertEqual((withCookie.status, withCookie.challenges()), (401, challenges("new")))
        without = self.request("GET", "/jmap/")
        self.assertEqual((without.status, without.challenges()), (401, challenges("old")))
        forged = self.request("GET", "/jmap/", {"Cookie": f"mailproxy_backend={value[:-2]}xx"})
        self.assertEqual(forged.challenges(), challenges("old"))


class BearerTests(HTTPTestsMixin):
    """
    Bearer tokens, through a proxy whose (Python) router places a token by
    its C{sub} claim; Cyrus checks the token (C{http_jwt_key_dir}).
    """

    def setUp(self) -> None:
        super().setUp()
        self.proxy = sharedFixture("http token proxy", __name__, self._startTokenProxy)

    def _startTokenProxy(self) -> HTTPProxy:
        homes = {"alice@example.org": "old", "bob@example.org": "new"}
        proxy = HTTPProxy(self.servers, {"type": "python:tests.integration.tokenrouter.TokenRouter", "homes": homes})
        proxy.start()
        return proxy

    def token(self, account: str, key: bytes = JWT_KEY) -> str:
        """
        A JWT for C{account} as Cyrus accepts it (HS256, only C{sub}).
        """
        import jwt

        return jwt.encode({"sub": account}, key, algorithm="HS256")

    def test_tokenRoutedByItsAccount(self) -> None:
        """
        jmapc with alice's token reads her mail on old, with bob's his on
        new: the token reached the account's own server unchanged, which
        accepted it.
        """
        for user, server in (("alice@example.org", "old"), ("bob@example.org", "new")):
            client = CyrusJMAPClient.make(
                self.proxy.baseURL(), None, None, self.servers.ca.caPath, token=self.token(user)
            )
            self.assertEqual(client.jmap_session.username, user)
            self.assertEqual(mailboxesAndSubjects(client), ({"Inbox", f"Archive {server}"}, [f"{user} on {server}"]))

    def test_badTokenBackendsWords(self) -> None:
        """
        A token for bob signed with another key goes to new, whose 401 and
        challenges reach the client as Cyrus words them.
        """
        forged = self.token("bob@example.org", b"not-the-key-0123456789abcdef0123")
        headers = {"Authorization": f"Bearer {forged}", "Host": f"127.0.0.1:{self.proxy.port}"}
        proxied = self.request("GET", "/jmap/", headers)
        direct = self.direct(self.servers.new, "GET", "/jmap/", headers)
        self.assertEqual((proxied.status, direct.status), (401, 401))
        self.assertEqual(proxied.challenges(), challenges("new"))
        self.assertEqual(proxied.challenges(), direct.challenges())
        self.assertEqual(proxied.body, direct.body)


class MetricsTests(HTTPTestsMixin):
    """
    What an operator's monitoring sees of HTTP.
    """

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """
        The management endpoint's C{/metrics}, parsed with
        prometheus_client's own parser.
        """
        connection = http.client.HTTPConnection("127.0.0.1", self.proxy.admin, timeout=TIMEOUT)
        self.addCleanup(connection.close)
        response = self.request("GET", "/metrics", {"Authorization": f"Bearer {TOKEN}"}, connection=connection)
        self.assertEqual(response.status, 200)
        samples = {}
        for family in text_string_to_metric_families(response.body.decode()):
            for sample in family.samples:
                samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        return samples

    def test_loginsAndOpenSessions(self) -> None:
        """
        A Basic login new accepts counts as an HTTP login C{ok} on new, a
        wrong password old refuses as C{auth} on old (as for IMAP), and an
        open client connection is an open HTTP session on its backend.
        """
        ok = ("mailproxy_logins_total", (("backend", "new"), ("protocol", "http"), ("result", "ok")))

        refused = ("mailproxy_logins_total", (("backend", "old"), ("protocol", "http"), ("result", "auth")))
        before = self.metrics()
        connection = self.connect()
        response = self.request(
            "GET", "/jmap/", {"Authorization": basic("bob@example.org", PASSWORDS["bob@example.org"])}, connection=connection
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(self.request("GET", "/jmap/", {"Authorization": basic("alice@example.org", "wrong")}).status, 401)
        after = self.metrics()
        self.assertEqual(after.get(ok, 0) - before.get(ok, 0), 1)
        self.assertEqual(after.get(refused, 0) - before.get(refused, 0), 1)
        self.assertGreaterEqual(after.get(("mailproxy_sessions_open", (("backend", "new"), ("protocol", "http"))), 0), 1)


class DAVTests(HTTPTestsMixin):
    """
    The caldav library, and CardDAV requests, through the proxy: what they
    write lands on the account's own server only.
    """

    def caldavRoundTrip(self, user: str, home: Cyrus, other: Cyrus) -> None:
        """
        Create an event for C{user} through the proxy, read it back there,
        and find it on C{home} but not on C{other} (asked directly).
        """
        import caldav

        client = caldav.DAVClient(
            url=f"{self.proxy.baseURL()}/dav/principals/user/{user}/",
            username=user,
            password=PASSWORDS[user],
            ssl_verify_cert=self.servers.ca.caPath,
        )
        self.addCleanup(client.close)
        principal = client.principal()
        calendar = principal.calendar(cal_id="Default")
        uid = f"{uuid.uuid4()}@example.org"
        summary = f"Migration review for {user}"
        event = calendar.save_event(
            dtstart=datetime(2026, 12, 10, 9, 0), dtend=datetime(2026, 12, 10, 10, 0), summary=summary, uid=uid
        )
        found = calendar.event_by_uid(uid)
        self.assertEqual(str(found.icalendar_component["summary"]), summary)
        path = urllib.parse.urlsplit(str(event.url)).path
        authorization = {"Authorization": basic(user, PASSWORDS[user])}
        there = self.direct(home, "GET", path, authorization)
        self.assertEqual(there.status, 200)
        self.assertIn(f"SUMMARY:{summary}", there.body.decode())
        self.assertEqual(self.direct(other, "GET", path, authorization).status, 404)

    def test_calendarEventOnOld(self) -> None:
        """
        alice's new event is on old, not on new.
        """
        self.caldavRoundTrip("alice@example.org", self.servers.old, self.servers.new)

    def test_calendarEventOnNew(self) -> None:
        """
        bob's new event is on new, not on old.
        """
        self.caldavRoundTrip("bob@example.org", self.servers.new, self.servers.old)

    def test_contactOnNew(self) -> None:
        """
        A vCard bob PUTs into his address book through the proxy is on new
        (and read back through the proxy), not on old.
        """
        uid = str(uuid.uuid4())
        path = f"/dav/addressbooks/user/bob@example.org/Default/{uid}.vcf"
        card = (
            f"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:{uid}\r\nFN:Carol Contact\r\nN:Contact;Carol;;;\r\n"
            "EMAIL:carol@example.net\r\nEND:VCARD\r\n"
        )
        authorization = {"Authorization": basic("bob@example.org", PASSWORDS["bob@example.org"])}
        put = self.request("PUT", path, {**authorization, "Content-Type": "text/vcard; charset=utf-8"}, card.encode())
        self.assertEqual(put.status, 201, put.body)
        self.assertIn("FN:Carol Contact", self.request("GET", path, authorization).body.decode())
        self.assertIn("FN:Carol Contact", self.direct(self.servers.new, "GET", path, authorization).body.decode())
        self.assertEqual(self.direct(self.servers.old, "GET", path, authorization).status, 404)


class FailureTests(HTTPTestsMixin):
    """
    Wrong passwords and dead backends: what the client sees.
    """

    def test_wrongPasswordBackendsWords(self) -> None:
        """
        With a locating route, a wrong password gets Cyrus's own 401:
        status, challenge and page exactly as Cyrus answers the same
        request directly; the proxy logs it as a failed login.
        """
        headers = {"Authorization": basic("alice@example.org", "wrong"), "Host": f"127.0.0.1:{self.proxy.port}"}
        mark = len(self.proxy.proxy.logText())
        proxied = self.request("GET", "/jmap/", headers)
        direct = self.direct(self.servers.old, "GET", "/jmap/", headers)
        self.assertEqual(direct.status, 401)
        self.assertEqual(proxied.status, 401)
        self.assertEqual(proxied.challenges(), challenges("old"))
        self.assertEqual(proxied.challenges(), direct.challenges())
        self.assertEqual(proxied.header("Content-Type"), direct.header("Content-Type"))
        self.assertEqual(proxied.body, direct.body)
        self.assertIn(b"Authentication failed", proxied.body)
        # A failed login all the same: the line fail2ban reads.
        self.proxyLogLine(mark, "authentication failed:", 'protocol=http user="alice@example.org"')

    def test_wrongPasswordRouterRefuses(self) -> None:
        """
        With an authenticating route, a wrong password gets the proxy's own
        401 and its challenge (logged as a failed login), and reaches no
        backend; the right one is served by the account's server.
        """
        mark = len(self.servers.webold.accessLog())
        logMark = len(self.proxy.proxy.logText())
        refused = self.request("GET", "/jmap/", {"Authorization": basic("dave@example.org", "wrong")})
        self.assertEqual(refused.status, 401)
        self.assertEqual(refused.challenges(), [PROXY_CHALLENGE])
        self.assertNotIn(b"Cyrus", refused.body)
        self.proxyLogLine(logMark, "authentication failed:", 'protocol=http user="dave@example.org"')
        unknown = self.request("GET", "/jmap/", {"Authorization": basic("nobody@example.org", "whatever")})
        self.assertEqual(
            (unknown.status, unknown.challenges(), unknown.body), (401, [PROXY_CHALLENGE], refused.body)
        )
        dave = basic("dave@example.org", PASSWORDS["dave@example.org"])
        accepted = self.request("GET", "/jmap/", {"Authorization": dave})
        self.assertEqual(accepted.status, 200)
        self.assertEqual(json.loads(accepted.body)["username"], "dave@example.org")
        self.assertEqual(accepted.header("X-Backend"), "old")
        # Only the accepted request reached the backend.
        (line,) = self.accessLines(self.servers.webold, mark, 'user="dave@example.org"')
        self.assertIn('user="dave@example.org" request="GET /jmap/ HTTP/1.1" status=200', line)

    def test_deadBackend(self) -> None:
        """
        An account whose backend refuses connections gets 503 with
        C{Retry-After}.
        """
        response = self.request("GET", "/jmap/", {"Authorization": basic("zed@example.org", "anything")})
        self.assertEqual(response.status, 503)
        self.assertIsNotNone(response.header("Retry-After"))
        self.assertTrue(response.header("Retry-After").isdigit())  # type: ignore[union-attr]


class ForwardingTests(HTTPTestsMixin):
    """
    What the backend learns about the client.
    """

    def test_clientHeadersReplaced(self) -> None:
        """
        A client's own C{X-Forwarded-For}, C{Forwarded}, C{X-Real-IP} and
        C{X-Forwarded-Host} never reach the backend: its log shows the
        address the client connected from, as the proxy forwarded it.
        """
        mark = len(self.servers.webold.accessLog())
        forged = "203.0.113.9"
        response = self.request(
            "GET",
            "/files/forwarded-check",
            {
                "X-Forwarded-For": forged,
                "Forwarded": f"for={forged};proto=http",
                "X-Real-IP": forged,
                "X-Forwarded-Host": "evil.example",
                "X-Forwarded-Proto": "http",
            },
            connection=self.connect(source=CLIENT_ADDRESS),
        )
        self.assertEqual(response.status, 404)
        self.assertEqual(response.header("X-Backend"), "old")
        lines = self.accessLines(self.servers.webold, mark, "/files/forwarded-check")
        (line,) = [line for line in lines if "/files/forwarded-check" in line]
        self.assertNotIn(forged, line)
        self.assertNotIn("evil.example", line)
        self.assertIn(f'xff="{CLIENT_ADDRESS}"', line)
        self.assertIn(f"for=\\x22{CLIENT_ADDRESS}:", line)
        self.assertIn('proto="https"', line)
        self.assertIn('real="-"', line)

    def test_proxyHeader(self) -> None:
        """
        To a backend with C{forward = "proxy-v2"} the client's address and
        port go in a PROXY header (nginx logs them from it) as well as in
        the proxy's own headers; the client's forged ones are gone.
        """
        mark = len(self.servers.webold.accessLog())
        connection = self.connect(source=CLIENT_ADDRESS)
        response = self.request(
            "GET", "/files/proxied/check", {"X-Forwarded-For": "203.0.113.9"}, connection=connection
        )
        self.assertEqual(response.status, 404)
        clientPort = connection.sock.getsockname()[1]
        lines = self.accessLines(self.servers.webold, mark, "/files/proxied/check")
        (line,) = [line for line in lines if "/files/proxied/check" in line]
        self.assertIn(f'proxied="{CLIENT_ADDRESS}:{clientPort}"', line)
        self.assertIn(f'xff="{CLIENT_ADDRESS}"', line)
        self.assertNotIn("203.0.113.9", line)

    def test_pinnedPath(self) -> None:
        """
        A pinned path prefix goes to its backend whatever the credentials
        say: alice's (old) PUT under C{/files/pinned/} lands on webnew.
        """
        response = self.request(
            "PUT",
            "/files/pinned/note.txt",
            {"Authorization": basic("alice@example.org", PASSWORDS["alice@example.org"])},
            b"pinned to new\n",
        )
        self.assertEqual((response.status, response.header("X-Backend")), (201, "new"))
        self.assertEqual((self.servers.webnew.filesPath / "pinned" / "note.txt").read_bytes(), b"pinned to new\n")
        self.assertFalse((self.servers.webold.filesPath / "pinned" / "note.txt").exists())


#: The size of the large upload and download.
LARGE = 100 * 1024 * 1024

#: How far the proxy's resident memory may grow while a large body passes.
MEMORY_BOUND = 20 * 1024


def largeBody() -> Iterator[bytes]:
    """
    L{LARGE} octets in 1 MiB blocks, each block different.
    """
    for index in range(LARGE // (1 << 20)):
        yield hashlib.sha256(str(index).encode()).digest() * ((1 << 20) // 32)


def largeBlobId() -> str:
    """
    The JMAP blob id Cyrus gives L{largeBody}: C{G} and its SHA-1.
    """
    digest = hashlib.sha1()
    for block in largeBody():
        digest.update(block)
    return "G" + digest.hexdigest()


class LargeBodyTests(HTTPTestsMixin):
    """
    A 100 MB JMAP blob through the proxy each way, streamed.
    """

    user = "alice@example.org"

    def upload(self, connection: http.client.HTTPConnection) -> dict[str, Any]:
        """
        Upload L{largeBody} as alice's JMAP blob on C{connection}, a block
        at a time; Cyrus's answer.
        """
        connection.putrequest("POST", f"/jmap/upload/{self.user}/")
        connection.putheader("Authorization", basic(self.user, PASSWORDS[self.user]))
        connection.putheader("Content-Type", "application/octet-stream")
        connection.putheader("Content-Length", str(LARGE))
        connection.endheaders()
        for block in largeBody():
            connection.send(block)
        response = connection.getresponse()
        body = response.read()
        self.assertEqual(response.status, 201, body)
        return json.loads(body)  # type: ignore[no-any-return]

    def download(self, connection: http.client.HTTPConnection, blobId: str) -> tuple[int, str]:
        """
        Download alice's blob C{blobId} on C{connection}, reading 64 KiB at
        a time; its size and SHA-1 blob id.
        """
        connection.request(
            "GET",
            f"/jmap/download/{self.user}/{blobId}/large.bin?accept=application/octet-stream",
            headers={"Authorization": basic(self.user, PASSWORDS[self.user])},
        )
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        digest = hashlib.sha1()
        size = 0
        while block := response.read(1 << 16):
            digest.update(block)
            size += len(block)
        return size, "G" + digest.hexdigest()

    def test_upload(self) -> None:
        """
        A 100 MB blob uploaded through the proxy arrives byte-identical at
        Cyrus (its blob id is the content's SHA-1; read back directly), and
        the proxy's resident memory grows by less than 20 MB meanwhile.
        """
        before = peakMemoryReset(self.proxy.proxy.pid)
        blob = self.upload(self.connect())
        self.assertLess(peakMemoryGrowth(self.proxy.proxy.pid, before), MEMORY_BOUND)
        self.assertEqual((blob["size"], blob["blobId"]), (LARGE, largeBlobId()))
        direct = http.client.HTTPConnection("127.0.0.1", self.servers.old.http, timeout=TIMEOUT)
        self.addCleanup(direct.close)
        self.assertEqual(self.download(direct, blob["blobId"]), (LARGE, largeBlobId()))

    def test_download(self) -> None:
        """
        A 100 MB blob uploaded straight to Cyrus comes out of the proxy
        byte-identical, read slowly (64 KiB at a time), and the proxy's
        resident memory grows by less than 20 MB meanwhile.
        """
        direct = http.client.HTTPConnection("127.0.0.1", self.servers.old.http, timeout=TIMEOUT)
        self.addCleanup(direct.close)
        blob = self.upload(direct)
        before = peakMemoryReset(self.proxy.proxy.pid)
        self.assertEqual(self.download(self.connect(), blob["blobId"]), (LARGE, largeBlobId()))
        self.assertLess(peakMemoryGrowth(self.proxy.proxy.pid, before), MEMORY_BOUND)


class PushMoveTests(HTTPTestsMixin):
    """
    An account's push connection and C{mailproxy move}.
    """

    def openEventSource(self, user: str) -> tuple[http.client.HTTPResponse, str]:
        """
        Open C{user}'s JMAP event source through the proxy; the response
        (still streaming) and its first event.
        """
        connection = self.connect()
        connection.request(
            "GET",
            "/jmap/eventsource/?types=*&closeafter=no&ping=0",
            headers={"Authorization": basic(user, PASSWORDS[user]), "Accept": "text/event-stream"},
        )
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.getheader("Content-Type"), "text/event-stream")
        lines = []
        while (line := response.readline()) != b"\n":
            lines.append(line.decode())
        return response, "".join(lines)

    def test_cookieFollowsMove(self) -> None:
        """
        bob's routing cookie, issued while he was on new, sends a request
        without credentials to old once C{mailproxy move} has moved him
        there (old's challenge names its realm), not back to new.
        """
        user = "bob@example.org"
        response = self.request("GET", "/jmap/", {"Authorization": basic(user, PASSWORDS[user])})
        self.assertEqual(response.status, 200)
        cookie = response.header("Set-Cookie")
        assert cookie is not None
        value = cookie.partition(";")[0]
        before = self.request("GET", "/jmap/", {"Cookie": value})
        self.assertEqual(before.challenges(), challenges("new"))
        moved = self.mailproxy("move", user, "old")
        self.addCleanup(self.mailproxy, "move", user, "new")
        self.assertEqual(moved.returncode, 0, moved.stderr)
        after = self.request("GET", "/jmap/", {"Cookie": value})
        self.assertEqual((after.status, after.challenges()), (401, challenges("old")))

    def test_moveDropsPushAndNextRequestGoesToNew(self) -> None:
        """
        erin's event source (served through webold) is listed as an HTTP
        session of hers; C{mailproxy move erin@example.org webnew} drops it
        (the stream ends, the session log says it was dropped), her next
        event source comes from webnew, and jmapc then reads her mail on
        Cyrus new.
        """
        user = "erin@example.org"
        before = self.jmap(user)
        self.assertEqual(mailboxesAndSubjects(before)[1], [f"{user} on old"])
        stream, first = self.openEventSource(user)
        self.assertIn('"server":"old"', first)
        listed = self.mailproxy("sessions", "--account", user, "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        sessions = json.loads(listed.stdout)
        sessions = sessions.get("sessions", sessions) if isinstance(sessions, dict) else sessions
        self.assertIn(("http", "webold"), [(s["protocol"], s["backend"]) for s in sessions])

        moved = self.mailproxy("move", user, "webnew")
        self.addCleanup(self.mailproxy, "move", user, "webold")
        self.assertEqual(moved.returncode, 0, moved.stderr)
        self.assertIn(f"changed: {user}: webold -> webnew", moved.stdout)
        self.assertNotIn("0 open sessions dropped", moved.stdout)
        # The rest of the stream, up to its end: the proxy closed it.
        rest = b""
        try:
            while block := stream.read1(65536):
                rest += block
        except (http.client.IncompleteRead, ConnectionError, ssl.SSLError):
            pass
        self.assertNotIn(b'"server":"new"', rest)

        # The session log says why the stream's session ended.
        deadline = time.monotonic() + 10
        while True:
            ended = [
                (event["backend"], event["requests"], event["reason"])
                for event in self.proxy.events()
                if event.get("event") == "session_end" and event.get("user") == user
            ]
            if ("webold", 1, "dropped: Your mailbox has moved, please reconnect.") in ended:
                break
            self.assertLess(time.monotonic(), deadline, ended)
            time.sleep(0.05)

        _, again = self.openEventSource(user)
        self.assertIn('"server":"new"', again)
        after = self.jmap(user)
        self.assertEqual(mailboxesAndSubjects(after), ({"Inbox", "Archive new"}, [f"{user} on new"]))
