"""
OAUTHBEARER and XOAUTH2 passed through the proxy to a real Dovecot that
validates the tokens itself (C{passdb oauth2} with local JWT validation,
C{local_validation_key_dict}), with JWTs the test mints with PyJWT under a
key it generates; real clients: Python's C{imaplib} and C{poplib}, and
curl (C{--oauth2-bearer}).
"""

from __future__ import annotations

import base64
import http.server
import imaplib
import json
import os
import poplib
import re
import smtplib
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import jwt
from twisted.trial.unittest import SynchronousTestCase

from .common import TIMEOUT, listenerTable, routesText, staticProxyConfig
from .postfix import Postfix, dovecotSASLConfig
from .servers import Dovecot, Proxy, TestCA, fixtureDirectory, requireServer, sharedFixture
from .test_sieve import SieveClient

USERS = {"alice@example.org": "alice-password", "bob@example.org": "bob-password"}
MASTER = ("proxy", "master-password")


class OAuthServers:
    """
    A Dovecot that takes tokens signed with L{secret}, and the proxy in
    front of it with an C{oauth} listener (implicit TLS) per protocol.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.ca = TestCA(str(self.directory / "ca"))
        self.secret = os.urandom(32)
        # Dovecot's auth process (an unprivileged user) reads the keys: a
        # directory it can reach, removed at stop.
        self.keys = keys = Path(tempfile.mkdtemp(prefix="dovecot-oauth-keys-"))
        keys.chmod(0o755)
        # The key for tokens without azp and kid, HS256: Dovecot looks it up
        # as shared/default/HS256/default in its key dictionary.
        for path in (keys / "default" / "HS256" / "default", keys / "shared" / "default" / "HS256" / "default"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(base64.b64encode(self.secret))
            path.chmod(0o644)
            for parent in path.relative_to(keys).parents:
                (keys / parent).chmod(0o755)
        oauthConfig = self.directory / "dovecot-oauth2.conf.ext"
        oauthConfig.write_text(
            f"introspection_mode = local\nlocal_validation_key_dict = fs:posix:prefix={keys}/\nusername_attribute = email\n"
        )
        extra = (
            "auth_mechanisms = plain login oauthbearer xoauth2\n"
            f"passdb {{\n  driver = oauth2\n  mechanisms = oauthbearer xoauth2\n  args = {oauthConfig}\n}}\n"
        )
        self.dovecot = Dovecot(
            str(self.directory / "dovecot"), "oauth", USERS, ca=self.ca, masterUser=MASTER, extraConfig=extra + dovecotSASLConfig()
        )

    def start(self) -> None:
        """
        Start Dovecot, then the proxy.
        """
        self.dovecot.start()
        self.postfix: Postfix | None = None
        try:
            # Submission: Postfix asks the Dovecot for SASL, so it offers
            # and checks the same mechanisms.
            self.postfix = Postfix(
                str(self.directory / "postfix"),
                "oauth",
                domains=["example.org"],
                mailboxes=list(USERS),
                lmtpPort=self.dovecot.lmtp,
                saslPath=os.path.join(os.path.realpath(self.dovecot.directory / "runtime"), "run", "postfix-auth"),
                ca=self.ca,
            )
            self.postfix.start()
            certificate, key = self.ca.issue("proxy")
            ports = {
                "imap": self.dovecot.imap,
                "pop3": self.dovecot.pop3,
                "sieve": self.dovecot.sieve,
                "smtp": self.postfix.submission,
            }
            listeners = [listenerTable(protocol, 0, "implicit", oauth=True) for protocol in ("imap", "pop3", "sieve")]
            listeners.append(listenerTable("smtp", 0, "implicit", mode="submission", oauth=True))
            backends = {"dovecot": {"host": "127.0.0.1", "ports": ports, "tls": "none", "forward": "none"}}
            self.proxy = Proxy(str(self.directory / "proxy"), staticProxyConfig(certificate, key, listeners, backends))
            (self.proxy.directory / "routes.toml").write_text(routesText({"default": "dovecot"}))
            self.proxy.start()
            # The validating mode: a second proxy checks the tokens against
            # a JWKS file with the same key and logs in as the master user.
            jwks = {"keys": [{"kty": "oct", "k": base64.urlsafe_b64encode(self.secret).rstrip(b"=").decode(), "alg": "HS256"}]}
            validating = dict(backends["dovecot"], master_user=MASTER[0], master_password_file="master.pw")
            config = staticProxyConfig(certificate, key, listeners[:1], {"dovecot": validating})
            config += '[router.oauth]\njwks_file = "jwks.json"\nclaim = "email"\n'
            self.validating = Proxy(str(self.directory / "validating"), config)
            (self.validating.directory / "routes.toml").write_text(routesText({"default": "dovecot"}))
            (self.validating.directory / "jwks.json").write_text(json.dumps(jwks))
            (self.validating.directory / "master.pw").write_text(MASTER[1] + "\n")
            self.validating.start()
            (self.validatingIMAP,) = self.validating.ports
            # And by introspection: a third proxy asks the test's endpoint.
            self.introspection = _IntrospectionEndpoint(self.secret)
            config = staticProxyConfig(certificate, key, listeners[:1], {"dovecot": validating})
            config += (
                f'[router.oauth]\nintrospection_url = "{self.introspection.url}"\n'
                'client_id = "mailproxy"\nclient_secret_file = "introspection.secret"\n'
            )
            self.introspecting = Proxy(str(self.directory / "introspecting"), config)
            (self.introspecting.directory / "routes.toml").write_text(routesText({"default": "dovecot"}))
            (self.introspecting.directory / "master.pw").write_text(MASTER[1] + "\n")
            (self.introspecting.directory / "introspection.secret").write_text("client-secret\n")
            self.introspecting.start()
            (self.introspectingIMAP,) = self.introspecting.ports
        except BaseException:
            if self.postfix is not None:
                self.postfix.stop()
            self.dovecot.stop()
            raise
        self.imap, self.pop3, self.sieve, self.submission = self.proxy.ports

    def stop(self) -> None:
        """
        Stop both.
        """
        try:
            self.introspecting.stop()
            self.introspection.stop()
            self.validating.stop()
            self.proxy.stop()
            if self.postfix is not None:
                self.postfix.stop()
            self.dovecot.stop()
        finally:
            shutil.rmtree(self.keys, ignore_errors=True)

    def token(self, email: str, lifetime: float = 300, key: bytes | None = None) -> str:
        """
        A JWT for C{email}, valid for C{lifetime} seconds from now (expired
        if negative), signed with L{secret} or C{key}.
        """
        now = int(time.time())
        claims = {"sub": email, "email": email, "iat": now - 600, "nbf": now - 600, "exp": now + int(lifetime)}
        return jwt.encode(claims, key or self.secret, algorithm="HS256")

    def context(self) -> ssl.SSLContext:
        """
        A client TLS context that trusts the test CA.
        """
        context = ssl.create_default_context(cafile=self.ca.caPath)
        context.check_hostname = False
        return context


class _IntrospectionEndpoint:
    """
    An OAuth 2.0 token introspection endpoint (RFC 7662) in a thread: a
    token is active if it is a JWT signed with the test's key and not
    expired; it answers its claims. It records the requests.
    """

    def __init__(self, secret: bytes) -> None:
        endpoint = self
        self.requests: list[tuple[str, str]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                endpoint.requests.append((form["token"][0], self.headers.get("Authorization", "")))
                try:
                    answer = dict(jwt.decode(form["token"][0], secret, algorithms=["HS256"]), active=True)
                except jwt.PyJWTError:
                    answer = {"active": False}
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/introspect"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def servers() -> OAuthServers:
    """
    The module's servers, started on first use.
    """

    def start() -> OAuthServers:
        requireServer("dovecot")
        running = OAuthServers(fixtureDirectory("oauth"))
        running.start()
        return running

    return sharedFixture("oauth", "oauth", start)


def oauthbearer(user: str, token: str) -> bytes:
    return f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


class IMAPPassThroughTests(SynchronousTestCase):
    """
    IMAP through the proxy to Dovecot's oauth2 passdb, with imaplib.
    """

    def setUp(self) -> None:
        self.servers = servers()

    def login(self, mechanism: str, message: bytes) -> tuple[str, list[bytes]]:
        """
        AUTHENTICATE with C{message}; return the outcome and the
        challenges the client got.
        """
        challenges: list[bytes] = []

        def answer(challenge: bytes) -> bytes:
            if not challenges and challenge == b"":
                challenges.append(challenge)
                return message
            challenges.append(challenge)
            return b"\x01" if mechanism == "OAUTHBEARER" else b""

        with imaplib.IMAP4_SSL("127.0.0.1", self.servers.imap, ssl_context=self.servers.context(), timeout=TIMEOUT) as client:
            try:
                typ, data = client.authenticate(mechanism, answer)
            except imaplib.IMAP4.error as e:
                return "NO " + (e.args[0].decode() if isinstance(e.args[0], bytes) else str(e.args[0])), challenges
            typ, data = client.select("INBOX")
            return typ, challenges

    def test_capabilities(self) -> None:
        """
        Over TLS the proxy offers both mechanisms.
        """
        with imaplib.IMAP4_SSL("127.0.0.1", self.servers.imap, ssl_context=self.servers.context(), timeout=TIMEOUT) as client:
            self.assertIn("AUTH=OAUTHBEARER", client.capabilities)
            self.assertIn("AUTH=XOAUTH2", client.capabilities)

    def test_oauthbearer(self) -> None:
        """
        A valid token logs alice in with OAUTHBEARER (Dovecot validated
        it: its log shows the mechanism), and bob with XOAUTH2.
        """
        outcome, _ = self.login("OAUTHBEARER", oauthbearer("alice@example.org", self.servers.token("alice@example.org")))
        self.assertEqual(outcome, "OK")
        outcome, _ = self.login("XOAUTH2", xoauth2("bob@example.org", self.servers.token("bob@example.org")))
        self.assertEqual(outcome, "OK")
        log = self.servers.dovecot.logPath.read_text()
        self.assertRegex(log, r"Login: user=<alice@example\.org>, method=OAUTHBEARER")
        self.assertRegex(log, r"Login: user=<bob@example\.org>, method=XOAUTH2")

    def test_refusedTokens(self) -> None:
        """
        An expired token, one signed with another key and one for another
        user are refused: the client gets Dovecot's RFC 7628 error JSON as
        a challenge, answers it, then NO [AUTHENTICATIONFAILED]; no token
        is in the proxy's log.
        """
        bad = [
            self.servers.token("alice@example.org", lifetime=-60),
            self.servers.token("alice@example.org", key=os.urandom(32)),
            self.servers.token("bob@example.org"),
        ]
        for token in bad:
            outcome, challenges = self.login("OAUTHBEARER", oauthbearer("alice@example.org", token))
            self.assertTrue(outcome.startswith("NO [AUTHENTICATIONFAILED]"), outcome)
            self.assertEqual(len(challenges), 2, challenges)
            self.assertIn(b'"status":"invalid_token"', challenges[1])
        # Dovecot's XOAUTH2 error differs from the proxy's own: what the
        # client gets is the backend's, relayed.
        outcome, challenges = self.login("XOAUTH2", xoauth2("alice@example.org", bad[0]))
        self.assertTrue(outcome.startswith("NO [AUTHENTICATIONFAILED]"), outcome)
        self.assertEqual(challenges[1], b'{"status":"401","schemes":"bearer","scope":"mail"}')
        log = self.servers.proxy.logPath.read_text()
        for token in bad:
            for part in token.split("."):
                self.assertNotIn(part, log)


class POP3PassThroughTests(SynchronousTestCase):
    """
    POP3 through the proxy to Dovecot's oauth2 passdb, with poplib and curl.
    """

    def setUp(self) -> None:
        self.servers = servers()

    def test_poplib(self) -> None:
        """
        poplib's AUTH XOAUTH2 with an initial response logs alice in and
        STAT works; a wrong-key token gets the error challenge, then -ERR.
        """
        client = poplib.POP3_SSL("127.0.0.1", self.servers.pop3, context=self.servers.context(), timeout=TIMEOUT)
        try:
            message = base64.b64encode(xoauth2("alice@example.org", self.servers.token("alice@example.org")))
            self.assertTrue(client._shortcmd("AUTH XOAUTH2 " + message.decode()).startswith(b"+OK"))
            self.assertEqual(client.stat()[0], 0)
        finally:
            client.quit()
        client = poplib.POP3_SSL("127.0.0.1", self.servers.pop3, context=self.servers.context(), timeout=TIMEOUT)
        try:
            message = base64.b64encode(oauthbearer("alice@example.org", self.servers.token("alice@example.org", key=b"k" * 32)))
            client._putcmd("AUTH OAUTHBEARER " + message.decode())
            challenge = client._getline()[0]
            self.assertTrue(challenge.startswith(b"+ "), challenge)
            self.assertIn(b'"status":"invalid_token"', base64.b64decode(challenge[2:]))
            client._putcmd("AQ==")
            self.assertTrue(client._getline()[0].startswith(b"-ERR"))
        finally:
            client.close()

    def test_curl(self) -> None:
        """
        curl's C{--oauth2-bearer} lists alice's (empty) mailbox over POP3S
        and IMAPS.
        """
        requireServer("curl")
        token = self.servers.token("alice@example.org")
        for scheme, port in (("pop3s", self.servers.pop3), ("imaps", self.servers.imap)):
            result = subprocess.run(
                ["curl", "-sS", "--max-time", "20", "--cacert", self.servers.ca.caPath, "-k",
                 "--user", "alice@example.org", "--oauth2-bearer", token, f"{scheme}://127.0.0.1:{port}/"],
                capture_output=True,
            )
            self.assertEqual(result.returncode, 0, result.stderr)


class SievePassThroughTests(SynchronousTestCase):
    """
    ManageSieve through the proxy to Dovecot's oauth2 passdb, with a bare
    ManageSieve client.
    """

    def setUp(self) -> None:
        self.servers = servers()

    def connect(self) -> SieveClient:
        client = SieveClient.connect(self.servers.sieve, self.servers.context())
        self.addCleanup(client.close)
        self.assertIn(b'"SASL" "PLAIN LOGIN OAUTHBEARER XOAUTH2"', client.readResponse())
        return client

    def test_login(self) -> None:
        """
        AUTHENTICATE "OAUTHBEARER" and "XOAUTH2" with a valid token log in
        (LISTSCRIPTS works after); a token signed with another key gets the
        error challenge as a string, then NO.
        """
        for mechanism, message in ((b"OAUTHBEARER", oauthbearer), (b"XOAUTH2", xoauth2)):
            client = self.connect()
            response = base64.b64encode(message("alice@example.org", self.servers.token("alice@example.org")))
            reply = client.command(b'AUTHENTICATE "' + mechanism + b'" "' + response + b'"')
            self.assertTrue(reply[-1].startswith(b"OK"), reply)
            self.assertTrue(client.command(b"LISTSCRIPTS")[-1].startswith(b"OK"))
        client = self.connect()
        bad = base64.b64encode(oauthbearer("alice@example.org", self.servers.token("alice@example.org", key=b"x" * 32)))
        client.connection.sendall(b'AUTHENTICATE "OAUTHBEARER" "' + bad + b'"\r\n')
        challenge = client.readLine()
        self.assertIn(b'"status":"invalid_token"', base64.b64decode(challenge.strip(b'"')))
        self.assertTrue(client.command(b'"AQ=="')[-1].startswith(b"NO"))


class SubmissionPassThroughTests(SynchronousTestCase):
    """
    SMTP submission through the proxy to Postfix, which asks Dovecot's
    oauth2 passdb; with smtplib and curl.
    """

    def setUp(self) -> None:
        self.servers = servers()

    def smtp(self) -> smtplib.SMTP_SSL:
        client = smtplib.SMTP_SSL("127.0.0.1", self.servers.submission, context=self.servers.context(), timeout=TIMEOUT)
        self.addCleanup(client.close)
        client.ehlo("client.example.net")
        return client

    def test_smtplib(self) -> None:
        """
        smtplib's AUTH with an initial response logs alice in with
        OAUTHBEARER and with XOAUTH2, and she can send; an expired token
        gets the error challenge (a 334 with the JSON), then 535.
        """
        self.assertIn("OAUTHBEARER", self.smtp().esmtp_features["auth"])
        for mechanism, message in (("OAUTHBEARER", oauthbearer), ("XOAUTH2", xoauth2)):
            client = self.smtp()
            token = self.servers.token("alice@example.org")
            # smtplib wants the message as text, and base64-encodes it.
            code, _ = client.auth(mechanism, lambda challenge=None: message("alice@example.org", token).decode())
            self.assertEqual(code, 235)
            client.sendmail("alice@example.org", ["bob@example.org"], b"Subject: hi\r\n\r\nHi.\r\n")
        client = self.smtp()
        challenges: list[bytes] = []

        def answer(challenge: bytes | None = None) -> str:
            if challenge is None:
                return oauthbearer("alice@example.org", self.servers.token("alice@example.org", lifetime=-60)).decode()
            challenges.append(challenge)
            return "\x01"

        with self.assertRaises(smtplib.SMTPAuthenticationError) as raised:
            client.auth("OAUTHBEARER", answer)
        self.assertEqual(raised.exception.smtp_code, 535)
        self.assertEqual(len(challenges), 1)
        self.assertIn(b'"status":"invalid_token"', challenges[0])

    def test_curl(self) -> None:
        """
        curl's C{--oauth2-bearer} sends a message over SMTPS.
        """
        requireServer("curl")
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "-k", "--user", "alice@example.org",
             "--oauth2-bearer", self.servers.token("alice@example.org"),
             "--mail-from", "alice@example.org", "--mail-rcpt", "bob@example.org", "-T", "-",
             f"smtps://127.0.0.1:{self.servers.submission}/"],
            input=b"Subject: from curl\r\n\r\nHi.\r\n",
            capture_output=True,
        )
        self.assertEqual(result.returncode, 0, result.stderr)


class ValidatingTests(SynchronousTestCase):
    """
    The validating mode: the proxy checks the JWT against a JWKS file and
    logs in to Dovecot as the master user on the account's behalf.
    """

    def setUp(self) -> None:
        self.servers = servers()

    def login(self, mechanism: str, message: bytes) -> str:
        with imaplib.IMAP4_SSL(
            "127.0.0.1", self.servers.validatingIMAP, ssl_context=self.servers.context(), timeout=TIMEOUT
        ) as client:
            try:
                client.authenticate(mechanism, lambda challenge: message if challenge == b"" else b"\x01")
            except imaplib.IMAP4.error as e:
                return "NO " + (e.args[0].decode() if isinstance(e.args[0], bytes) else str(e.args[0]))
            return client.select("INBOX")[0]

    def test_masterLogin(self) -> None:
        """
        A valid token logs alice in: Dovecot's log shows a PLAIN login for
        her by the master user (the token never reached it); an expired
        token, a wrongly signed one and one for bob naming alice are
        refused by the proxy with the error challenge, then NO.
        """
        token = self.servers.token("alice@example.org")
        self.assertEqual(self.login("OAUTHBEARER", oauthbearer("alice@example.org", token)), "OK")
        log = self.servers.dovecot.logPath.read_text()
        self.assertRegex(log, r"Login: user=<alice@example\.org>, method=PLAIN, .*auth=<proxy>")
        bad = [
            self.servers.token("alice@example.org", lifetime=-60),
            self.servers.token("alice@example.org", key=os.urandom(32)),
            self.servers.token("bob@example.org"),
        ]
        for token in bad:
            outcome = self.login("XOAUTH2", xoauth2("alice@example.org", token))
            self.assertTrue(outcome.startswith("NO [AUTHENTICATIONFAILED]"), outcome)
        self.assertEqual(self.servers.dovecot.logPath.read_text().count("auth=<proxy>"), log.count("auth=<proxy>"))


class IntrospectionTests(SynchronousTestCase):
    """
    The validating mode by token introspection: the proxy asks the test's
    RFC 7662 endpoint, keeps its answer until the token's exp, and logs in
    to Dovecot as the master user.
    """

    def setUp(self) -> None:
        self.servers = servers()

    def login(self, message: bytes) -> str:
        with imaplib.IMAP4_SSL(
            "127.0.0.1", self.servers.introspectingIMAP, ssl_context=self.servers.context(), timeout=TIMEOUT
        ) as client:
            try:
                client.authenticate("OAUTHBEARER", lambda challenge: message if challenge == b"" else b"\x01")
            except imaplib.IMAP4.error as e:
                return "NO " + (e.args[0].decode() if isinstance(e.args[0], bytes) else str(e.args[0]))
            return client.select("INBOX")[0]

    def test_introspected(self) -> None:
        """
        A valid token logs bob in as the master user after one request to
        the endpoint (with the proxy's client credentials); the same token
        again needs no request; an expired or foreign token is refused.
        """
        endpoint = self.servers.introspection
        before = len(endpoint.requests)
        token = self.servers.token("bob@example.org")
        self.assertEqual(self.login(oauthbearer("bob@example.org", token)), "OK")
        self.assertEqual(self.login(oauthbearer("bob@example.org", token)), "OK")
        self.assertEqual(len(endpoint.requests) - before, 1)
        self.assertEqual(endpoint.requests[-1], (token, "Basic " + base64.b64encode(b"mailproxy:client-secret").decode()))
        self.assertRegex(self.servers.dovecot.logPath.read_text(), r"Login: user=<bob@example\.org>, method=PLAIN, .*auth=<proxy>")
        for bad in (self.servers.token("bob@example.org", lifetime=-60), self.servers.token("alice@example.org")):
            outcome = self.login(oauthbearer("bob@example.org", bad))
            self.assertTrue(outcome.startswith("NO [AUTHENTICATIONFAILED]"), outcome)
