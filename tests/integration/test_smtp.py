"""
ESMTP through the proxy, end to end: two real Postfix servers ("old" and
"new"), each delivering by LMTP into its own Dovecot, the proxy as a
subprocess, and real clients (C{smtplib}, C{swaks}, C{curl}, and a bare
socket where the exact reply matters).

Every account exists on both Dovecots and both Postfixes accept mail for
every account, so a message that reached the wrong server would land in the
wrong mailbox: which server took it is visible with C{imaplib}, reading
Dovecot directly.
"""

from __future__ import annotations

import base64
import imaplib
import os
import random
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from twisted.trial.unittest import SynchronousTestCase

from . import common
from .common import CLIENT_ADDRESS, TIMEOUT, listenerTable, routesText, staticProxyConfig
from .postfix import Postfix, dovecotSASLConfig
from .servers import Dovecot, Proxy, TestCA, fixtureDirectory, freePort, requireServer, sharedFixture

#: Accounts, on both Dovecots (which also check SASL for both Postfixes).
PASSWORDS = {
    "alice@example.org": "alice secret",
    "bob@example.org": "bob-secret",
    "carol@example.org": "carol-secret",
    "dave@example.org": "dave-secret",
    "erin@example.net": "erin-secret",
}

#: alice and bob are located only (the proxy logs in at the backend with
#: AUTH); carol and dave have passwords in the route table, so the proxy
#: checks them and logs them in with XCLIENT LOGIN. example.net has
#: accounts but no domain entry: other addresses there are unknown users.
ROUTES: dict[str, Any] = {
    "domains": {"example.org": "old"},
    "accounts": {
        "alice@example.org": "old",
        "bob@example.org": "new",
        "carol@example.org": {"backend": "old", "password": PASSWORDS["carol@example.org"]},
        "dave@example.org": {"backend": "new", "password": PASSWORDS["dave@example.org"]},
        "erin@example.net": "new",
    },
}

#: The MX listener's C{local_domains}: example.com is local but has no
#: route, as a domain whose directory lookups find nobody.
LOCAL_DOMAINS = ["example.org", "example.net", "example.com"]

#: Where each account's mail goes by L{ROUTES}.
HOMES = {
    "alice@example.org": "old",
    "bob@example.org": "new",
    "carol@example.org": "old",
    "dave@example.org": "new",
    "erin@example.net": "new",
}

#: The SIZE both Postfixes declare; the proxy offers the smaller one.
SIZE_LIMITS = {"old": 100 * 1024 * 1024, "new": 120 * 1024 * 1024}

#: Each Postfix's C{inet_protocols}: old takes IPv4 only (as the fixture
#: does by default), so it refuses an IPv6 client's address in XCLIENT;
#: new takes both, so it accepts it (though it listens on 127.0.0.1 only).
INET_PROTOCOLS = {"old": "ipv4", "new": "all"}

if TYPE_CHECKING:
    _MixinBase = SynchronousTestCase
else:
    _MixinBase = object


def newMessageId() -> str:
    """
    A Message-ID no other test uses.
    """
    return f"<{uuid.uuid4().hex}@test.example>"


def message(sender: str, recipients: list[str], messageId: str, body: str = "Hello.\r\n") -> bytes:
    """
    A small RFC 5322 message.
    """
    return (
        f"From: {sender}\r\n"
        f"To: {', '.join(recipients)}\r\n"
        f"Subject: test {messageId}\r\n"
        f"Message-ID: {messageId}\r\n"
        f"\r\n"
        f"{body}"
    ).encode("utf-8")


def largeMessage(sender: str, recipient: str, messageId: str, size: int) -> bytes:
    """
    A message of more than C{size} octets: random bytes in base64 lines.
    """
    header = message(sender, [recipient], messageId, body="").replace(
        b"\r\n\r\n",
        b"\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n",
    )
    content = random.Random(4).randbytes(size * 3 // 4 + 1)
    return header + base64.encodebytes(content).replace(b"\n", b"\r\n")


class MailSystem:
    """
    Two mail servers, each a Postfix in front of a Dovecot, and the CA that
    signs their certificates.
    """

    def __init__(self, directory: str) -> None:
        """
        Make the CA and configure (not start) the servers in C{directory}.
        """
        self.ca = TestCA(os.path.join(directory, "ca"))
        self.dovecots = {
            name: Dovecot(
                os.path.join(directory, f"dovecot-{name}"), name, PASSWORDS, ca=self.ca, extraConfig=dovecotSASLConfig()
            )
            for name in ("old", "new")
        }
        self.postfixes: dict[str, Postfix] = {}
        self._directory = directory

    @classmethod
    def start(cls) -> MailSystem:
        """
        Start both Dovecots, then both Postfixes.
        """
        requireServer("dovecot", "postfix", "openssl", "curl", "swaks")
        system = cls(fixtureDirectory("smtp-servers"))
        try:
            for name, dovecot in system.dovecots.items():
                dovecot.start()
                sasl = os.path.join(os.path.realpath(dovecot.directory / "runtime"), "run", "postfix-auth")
                postfix = Postfix(
                    os.path.join(system._directory, f"postfix-{name}"),
                    name,
                    domains=["example.org", "example.net"],
                    mailboxes=list(PASSWORDS),
                    lmtpPort=dovecot.lmtp,
                    saslPath=sasl,
                    ca=system.ca,
                    messageSizeLimit=SIZE_LIMITS[name],
                    inetProtocols=INET_PROTOCOLS[name],
                )
                system.postfixes[name] = postfix
                postfix.start()
        except BaseException:
            system.stop()
            raise
        return system

    def stop(self) -> None:
        """
        Stop every server.
        """
        for postfix in self.postfixes.values():
            postfix.stop()
        for dovecot in self.dovecots.values():
            dovecot.stop()

    def _imap(self, server: str, user: str) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.dovecots[server].imap, timeout=TIMEOUT)
        client.login(user, PASSWORDS[user])
        client.select("INBOX", readonly=True)
        return client

    def copies(self, server: str, user: str, messageId: str) -> list[bytes]:
        """
        Every message with C{messageId} in C{user}'s INBOX on C{server}
        (read from Dovecot directly), whole.
        """
        client = self._imap(server, user)
        try:
            status, found = client.uid("SEARCH", "HEADER", "Message-ID", messageId)
            assert status == "OK", found
            messages = []
            for uid in found[0].split():
                status, data = client.uid("FETCH", uid.decode("ascii"), "(BODY.PEEK[])")
                assert status == "OK", data
                messages.append(next(item[1] for item in data if isinstance(item, tuple)))
            return messages
        finally:
            client.logout()

    def waitForCopy(self, server: str, user: str, messageId: str) -> bytes:
        """
        Wait until the message with C{messageId} is in C{user}'s INBOX on
        C{server}; return it.

        @raise AssertionError: it did not arrive within L{TIMEOUT} seconds.
        """
        deadline = time.monotonic() + TIMEOUT
        while True:
            copies = self.copies(server, user, messageId)
            if copies:
                return copies[0]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{messageId} did not reach {user} on {server}; Postfix log:\n"
                    + self.postfixes[server].logText()[-3000:]
                )
            time.sleep(0.1)


class RunningProxy:
    """
    The proxy under test: a submission listener with STARTTLS required, a
    submission listener with implicit TLS (465-style) and an MX listener
    with opportunistic STARTTLS; the static router reads C{routes.toml}.
    """

    def __init__(
        self, directory: str, backends: Mapping[str, Mapping[str, object]], ca: TestCA, endpoint: str | None = None
    ) -> None:
        """
        Write the configuration and the route table into C{directory}.

        @param endpoint: the listeners' endpoint (port 0), if not
            127.0.0.1.
        """
        certificate, key = ca.issue("smtp-proxy")
        listeners = [("submission", "starttls-required"), ("submission", "implicit"), ("mx", "starttls")]
        where = {} if endpoint is None else {"endpoint": endpoint}
        # Port 0: the proxy logs the ports the kernel chose (see start).
        tables = [
            listenerTable(
                "smtp", 0, tls, mode=mode, **({"local_domains": LOCAL_DOMAINS} if mode == "mx" else {}), **where
            )
            for mode, tls in listeners
        ]
        config = staticProxyConfig(certificate, key, tables, backends)
        self.proxy = Proxy(directory, config)
        (self.proxy.directory / "routes.toml").write_text(routesText(ROUTES))

    def start(self) -> None:
        """
        Start the proxy and learn its listeners' ports.
        """
        self.proxy.start()
        self.submission, self.submissions, self.mx = self.proxy.ports

    def stop(self) -> None:
        """
        Stop the proxy.
        """
        self.proxy.stop()

    def rss(self) -> int:
        """
        The proxy process's resident memory, in octets, from C{/proc}.
        """
        status = Path(f"/proc/{self.proxy.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert match is not None
        return int(match.group(1)) * 1024


class SMTPFixtureMixin(_MixinBase):
    """
    Tests against the proxy and the mail servers, both shared (the servers
    by the whole module, the proxy by a test class).
    """

    system: MailSystem
    running: RunningProxy

    def backendOptions(self, postfix: Postfix) -> dict[str, object]:
        """
        The settings of the C{[backend.NAME]} table for C{postfix}: plain
        SMTP, the client's identity by XCLIENT.
        """
        return {"ports": {"smtp": postfix.submission, "mx": postfix.mx}, "tls": "none", "forward": "xclient"}

    def setUp(self) -> None:
        """
        Get the running servers and this class's running proxy, starting
        them if this is the first test to need them.
        """
        self.system = sharedFixture("smtp servers", __name__, MailSystem.start)
        self.running = sharedFixture("smtp proxy", type(self).__qualname__, self._startProxy)
        self.context = ssl.create_default_context(cafile=self.system.ca.caPath)

    #: The proxy's listeners' endpoint, if not on 127.0.0.1.
    endpoint: str | None = None

    def _startProxy(self) -> RunningProxy:
        backends = {
            name: {"host": "127.0.0.1", "connect_timeout": 5, **self.backendOptions(postfix)}
            for name, postfix in self.system.postfixes.items()
        }
        running = RunningProxy(fixtureDirectory(type(self).__name__), backends, self.system.ca, self.endpoint)
        running.start()
        return running

    def logMark(self, server: str) -> int:
        """
        Where C{server}'s Postfix log ends now.
        """
        return len(self.system.postfixes[server].logText())

    def postfixLine(self, server: str, mark: int, *fragments: str) -> str:
        """
        Wait for a line with every one of C{fragments} in C{server}'s
        Postfix log after C{mark}; return it.
        """
        deadline = time.monotonic() + TIMEOUT
        while True:
            added = self.system.postfixes[server].logText()[mark:]
            for line in added.splitlines():
                if all(fragment in line for fragment in fragments):
                    return line
            if time.monotonic() > deadline:
                self.fail(f"no line with {fragments} in {server}'s Postfix log; it added:\n{added}")
            time.sleep(0.05)

    def smtp(self, port: int, implicit: bool = False) -> smtplib.SMTP:
        """
        An C{smtplib} client of the proxy from L{CLIENT_ADDRESS}, greeted,
        closed after the test.
        """
        client: smtplib.SMTP
        if implicit:
            client = smtplib.SMTP_SSL(
                "127.0.0.1", port, timeout=TIMEOUT, source_address=(CLIENT_ADDRESS, 0), context=self.context
            )
        else:
            client = smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT, source_address=(CLIENT_ADDRESS, 0))
        self.addCleanup(_close, client)
        return client

    def raw(self, port: int, implicit: bool = False) -> LineClient:
        """
        A bare client of the proxy, its greeting read, closed after the
        test.
        """
        client = LineClient.connect(port, self.context if implicit else None, source=CLIENT_ADDRESS)
        self.addCleanup(client.close)
        self.assertTrue(client.reply()[0].startswith(b"220 "))
        return client

    def submitTo(self, client: LineClient, user: str) -> None:
        """
        On submission: C{EHLO}, C{AUTH PLAIN} as C{user} and a transaction
        from and to C{user}, its C{MAIL} and C{RCPT} accepted.
        """
        client.command(b"EHLO client.example")
        response = base64.b64encode(b"\0" + user.encode() + b"\0" + PASSWORDS[user].encode())
        self.assertEqual(client.command(b"AUTH PLAIN " + response), [b"235 2.7.0 Authentication successful"])
        self.assertEqual(client.command(b"MAIL FROM:<" + user.encode() + b">"), [b"250 2.1.0 Ok"])
        self.assertEqual(client.command(b"RCPT TO:<" + user.encode() + b">"), [b"250 2.1.5 Ok"])

    def sendMessage(self, client: LineClient, sender: str, user: str, messageId: str, parameters: bytes = b"") -> list[bytes]:
        """
        One MX transaction up to the message's final dot, sent: C{EHLO},
        C{MAIL} (with C{parameters}) and C{RCPT} accepted, C{DATA}; the
        reply to the message is the caller's to read.

        @return: the reply to C{EHLO}.
        """
        ehlo = client.command(b"EHLO mta.remote.example")
        self.assertEqual(client.command(b"MAIL FROM:<" + sender.encode() + b">" + parameters), [b"250 2.1.0 Ok"])
        self.assertEqual(client.command(b"RCPT TO:<" + user.encode() + b">"), [b"250 2.1.5 Ok"])
        self.assertTrue(client.command(b"DATA")[0].startswith(b"354 "))
        client.send(message(sender, [user], messageId) + b".\r\n")
        return ehlo

    def assertSubmitted(self, server: str, user: str, mark: int, messageId: str, method: str) -> None:
        """
        The message C{messageId} went through C{server}'s Postfix, which
        logged the client's address and C{user} as the SASL user (logged in
        with C{method}), and arrived in C{user}'s mailbox there, once.
        """
        self.postfixLine(server, mark, f"[{CLIENT_ADDRESS}]", f"sasl_method={method}", f"sasl_username={user}")
        self.system.waitForCopy(server, user, messageId)
        self.assertEqual(len(self.system.copies(server, user, messageId)), 1)


def _close(client: smtplib.SMTP) -> None:
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


class LineClient(common.LineClient):
    """
    A bare SMTP client that sends lines and reads whole replies, for tests
    that assert exact replies.
    """

    serverName = "localhost"

    def line(self) -> bytes:
        """
        The next reply line, without CRLF.

        @raise EOFError: the server closed the connection.
        """
        return self._nextLine()

    def reply(self) -> list[bytes]:
        """
        The lines of the next (multi-line) reply.
        """
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return lines

    def send(self, data: bytes) -> None:
        """
        Send C{data} as it is.
        """
        self.connection.sendall(data)

    def command(self, line: bytes) -> list[bytes]:
        """
        Send C{line} with CRLF; return the reply's lines.
        """
        self.send(line + b"\r\n")
        return self.reply()

    def startTLS(self, context: ssl.SSLContext) -> None:
        """
        Start TLS (after a 220 to STARTTLS).
        """
        self._wrapTLS(context)


class SubmissionTests(SMTPFixtureMixin, SynchronousTestCase):
    """
    Message submission through the proxy to Postfix with XCLIENT: the
    client's address and login reach the server, the message its mailbox.
    """

    def test_smtplibStartTLSBackendAuth(self) -> None:
        """
        C{smtplib} over STARTTLS as alice (located only): the proxy logs in
        at old's Postfix with AUTH, which checks the password with Dovecot;
        Postfix logs the client's address and alice, and the message reaches
        the mailbox.
        """
        user, messageId, mark = "alice@example.org", newMessageId(), self.logMark("old")
        client = self.smtp(self.running.submission)
        client.starttls(context=self.context)
        client.login(user, PASSWORDS[user])
        self.assertEqual(client.sendmail(user, [user], message(user, [user], messageId)), {})
        self.assertSubmitted("old", user, mark, messageId, "PLAIN")

    def test_smtplibImplicitTLSXCLIENTLogin(self) -> None:
        """
        C{smtplib} over implicit TLS as carol, whose route holds her
        password: the proxy checks it and logs her in with XCLIENT LOGIN.
        """
        user, messageId, mark = "carol@example.org", newMessageId(), self.logMark("old")
        client = self.smtp(self.running.submissions, implicit=True)
        client.login(user, PASSWORDS[user])
        self.assertEqual(client.sendmail(user, [user], message(user, [user], messageId)), {})
        self.assertSubmitted("old", user, mark, messageId, "XCLIENT")

    def swaks(self, port: int, user: str, messageId: str, *options: str) -> str:
        """
        Submit a message to C{user} as C{user} with C{swaks}.
        """
        result = subprocess.run(
            [
                "swaks", "--server", f"127.0.0.1:{port}", "--local-interface", CLIENT_ADDRESS,
                "--from", user, "--to", user, "--auth", "PLAIN",
                "--auth-user", user, "--auth-password", PASSWORDS[user],
                "--header", f"Message-ID: {messageId}", "--timeout", str(int(TIMEOUT)),
                "--tls-verify", "--tls-ca-path", self.system.ca.caPath, *options,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=TIMEOUT * 2,
        )
        output = result.stdout.decode("utf-8", "replace")
        if result.returncode != 0:
            self.fail(f"swaks failed ({result.returncode}):\n{output}\n{result.stderr.decode(errors='replace')}")
        return output

    def test_swaksStartTLS(self) -> None:
        """
        C{swaks} with STARTTLS as bob reaches new's Postfix (AUTH at the
        backend) and bob's mailbox there.
        """
        user, messageId, mark = "bob@example.org", newMessageId(), self.logMark("new")
        self.swaks(self.running.submission, user, messageId, "--tls")
        self.assertSubmitted("new", user, mark, messageId, "PLAIN")

    def test_swaksImplicitTLS(self) -> None:
        """
        C{swaks} on the implicit-TLS port as dave (XCLIENT LOGIN) reaches
        new's Postfix and dave's mailbox there.
        """
        user, messageId, mark = "dave@example.org", newMessageId(), self.logMark("new")
        self.swaks(self.running.submissions, user, messageId, "--tls-on-connect")
        self.assertSubmitted("new", user, mark, messageId, "XCLIENT")

    def curl(self, url: str, user: str, messageId: str, *options: str) -> None:
        """
        Submit a message to C{user} as C{user} with C{curl}.
        """
        result = subprocess.run(
            [
                "curl", "--silent", "--show-error", "--max-time", str(int(TIMEOUT)),
                "--interface", CLIENT_ADDRESS, "--cacert", self.system.ca.caPath,
                "--user", f"{user}:{PASSWORDS[user]}", "--mail-from", user, "--mail-rcpt", user,
                "--upload-file", "-", *options, url,
            ],
            input=message(user, [user], messageId),
            capture_output=True,
            timeout=TIMEOUT * 2,
        )
        if result.returncode != 0:
            self.fail(
                f"curl {url} failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
                f"\nproxy log:\n{self.running.proxy.logText()[-3000:]}"
            )

    def test_curlStartTLS(self) -> None:
        """
        C{curl smtp://} with C{--ssl-reqd} (STARTTLS) as alice.
        """
        user, messageId, mark = "alice@example.org", newMessageId(), self.logMark("old")
        self.curl(f"smtp://localhost:{self.running.submission}", user, messageId, "--ssl-reqd")
        self.assertSubmitted("old", user, mark, messageId, "PLAIN")

    def test_curlImplicitTLS(self) -> None:
        """
        C{curl smtps://} (implicit TLS) as carol, with XCLIENT LOGIN.
        """
        user, messageId, mark = "carol@example.org", newMessageId(), self.logMark("old")
        self.curl(f"smtps://localhost:{self.running.submissions}", user, messageId)
        self.assertSubmitted("old", user, mark, messageId, "XCLIENT")

    def test_ehloOffersWhatEveryBackendHas(self) -> None:
        """
        Before TLS the proxy offers STARTTLS and no AUTH; after it, AUTH and
        no STARTTLS; always the extensions both Postfixes have, SIZE the
        smaller limit, and never XCLIENT, VRFY or ETRN.
        """
        client = self.raw(self.running.submission)
        self.assertEqual(
            client.command(b"EHLO client.example"),
            [
                b"250-proxy.example.org",
                b"250-PIPELINING",
                b"250-SIZE %d" % (min(SIZE_LIMITS.values()),),
                b"250-8BITMIME",
                b"250-STARTTLS",
                b"250-ENHANCEDSTATUSCODES",
                b"250-SMTPUTF8",
                b"250-DSN",
                b"250 CHUNKING",
            ],
        )
        self.assertEqual(client.command(b"STARTTLS"), [b"220 2.0.0 Ready to start TLS"])
        client.startTLS(self.context)
        after = client.command(b"EHLO client.example")
        self.assertIn(b"250-AUTH PLAIN LOGIN", after)
        self.assertNotIn(b"250-STARTTLS", after)

    def test_authRequiresTLS(self) -> None:
        """
        On the STARTTLS-required port, AUTH before TLS is refused and the
        router is never asked.
        """
        client = self.raw(self.running.submission)
        client.command(b"EHLO client.example")
        self.assertEqual(
            client.command(b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.org\0alice secret")),
            [b"530 5.7.0 Must issue a STARTTLS command first"],
        )

    def test_mailBeforeAuth(self) -> None:
        """
        MAIL before AUTH gets C{530 5.7.0}.
        """
        client = self.raw(self.running.submissions, implicit=True)
        client.command(b"EHLO client.example")
        self.assertEqual(client.command(b"MAIL FROM:<alice@example.org>"), [b"530 5.7.0 Authentication required"])

    def test_wrongPassword(self) -> None:
        """
        A wrong password gets C{535 5.7.8}, for a located account (the
        backend refused) and for one the proxy checks.
        """
        for user in ("alice@example.org", "carol@example.org"):
            client = self.raw(self.running.submissions, implicit=True)
            client.command(b"EHLO client.example")
            response = base64.b64encode(b"\0" + user.encode() + b"\0wrong")
            self.assertEqual(
                client.command(b"AUTH PLAIN " + response), [b"535 5.7.8 Authentication credentials invalid"]
            )

    def test_pipelinedAfterAuth(self) -> None:
        """
        MAIL, RCPT and DATA pipelined right behind AUTH PLAIN with an
        initial response are kept and reach the backend after the login:
        every reply comes, in order, and the message is delivered.
        """
        user, messageId, mark = "bob@example.org", newMessageId(), self.logMark("new")
        client = self.raw(self.running.submissions, implicit=True)
        client.command(b"EHLO client.example")
        response = base64.b64encode(b"\0" + user.encode() + b"\0" + PASSWORDS[user].encode())
        client.send(
            b"AUTH PLAIN " + response + b"\r\n"
            b"MAIL FROM:<" + user.encode() + b">\r\n"
            b"RCPT TO:<" + user.encode() + b">\r\n"
            b"DATA\r\n"
        )
        self.assertEqual(client.reply(), [b"235 2.7.0 Authentication successful"])
        self.assertEqual(client.reply(), [b"250 2.1.0 Ok"])
        self.assertEqual(client.reply(), [b"250 2.1.5 Ok"])
        self.assertTrue(client.reply()[0].startswith(b"354 "))
        client.send(message(user, [user], messageId) + b".\r\n")
        self.assertTrue(client.reply()[0].startswith(b"250 2.0.0 Ok: queued"))
        self.assertSubmitted("new", user, mark, messageId, "PLAIN")


    def test_xclientWithoutEHLOOnceKnown(self) -> None:
        """
        Once Postfix has offered the proxy XCLIENT, and its EHLO keywords
        are known, a later login sends XCLIENT right after the greeting and
        AUTH right after XCLIENT: Postfix counts no EHLO where a first
        connection has two, takes the AUTH (XCLIENT gave it the client's
        EHLO name), logs no improper pipelining, and both messages arrive.
        """
        user = "alice@example.org"
        for _ in range(2):
            messageId, mark = newMessageId(), self.logMark("old")
            client = self.smtp(self.running.submission)
            client.starttls(context=self.context)
            client.login(user, PASSWORDS[user])
            self.assertEqual(client.sendmail(user, [user], message(user, [user], messageId)), {})
            client.quit()
            self.assertSubmitted("old", user, mark, messageId, "PLAIN")
        line = self.postfixLine("old", mark, f"disconnect from unknown[{CLIENT_ADDRESS}]", "auth=1")
        self.assertIn("] xclient=", line)
        self.assertNotIn(" ehlo=", line)
        self.assertNotIn("improper command pipelining", self.system.postfixes["old"].logText()[mark:])


class AfterLoginTests(SMTPFixtureMixin, SynchronousTestCase):
    """
    What a logged-in submission client may not say to Postfix, which trusts
    XCLIENT from the proxy's address: the proxy answers it and Postfix
    never sees it, so the session stays the client's own.
    """

    #: The identity an attacker logged in as alice would take.
    SPOOF = b"XCLIENT ADDR=6.6.6.6 LOGIN=bob@example.org"

    def loggedIn(self, user: str = "alice@example.org", then: bytes = b"") -> LineClient:
        """
        A client on the implicit-TLS port logged in as C{user}, with
        C{then} pipelined behind its AUTH.
        """
        client = self.raw(self.running.submissions, implicit=True)
        client.command(b"EHLO client.example")
        response = base64.b64encode(b"\0" + user.encode() + b"\0" + PASSWORDS[user].encode())
        client.send(b"AUTH PLAIN " + response + b"\r\n" + then)
        self.assertEqual(client.reply(), [b"235 2.7.0 Authentication successful"])
        return client

    def assertNotSpoofed(self, mark: int) -> None:
        """
        Once the session's end is in old's Postfix log, nothing after
        C{mark} shows the spoofed address or bob as a SASL user.
        """
        self.postfixLine("old", mark, "disconnect from")
        added = self.system.postfixes["old"].logText()[mark:]
        self.assertNotIn("sasl_method=XCLIENT", added)
        self.assertNotIn("sasl_username=bob@example.org", added)
        self.assertNotIn("6.6.6.6", added)

    def submit(self, client: LineClient, user: str, messageId: str) -> None:
        """
        Send a message from C{user} to C{user} on C{client}.
        """
        self.assertEqual(client.command(b"MAIL FROM:<" + user.encode() + b">"), [b"250 2.1.0 Ok"])
        self.assertEqual(client.command(b"RCPT TO:<" + user.encode() + b">"), [b"250 2.1.5 Ok"])
        self.assertTrue(client.command(b"DATA")[0].startswith(b"354 "))
        client.send(message(user, [user], messageId) + b".\r\n")
        self.assertTrue(client.reply()[0].startswith(b"250 2.0.0 Ok: queued"))

    def submitAsOwnUser(self, client: LineClient, user: str, messageId: str, mark: int) -> None:
        """
        Send a message as C{user} and quit; Postfix's log shows it submitted
        by C{user} with PLAIN and nothing spoofed.
        """
        self.submit(client, user, messageId)
        self.assertEqual(client.command(b"QUIT")[0][:3], b"221")
        self.assertSubmitted("old", user, mark, messageId, "PLAIN")
        self.assertNotSpoofed(mark)

    def test_xclientRefused(self) -> None:
        """
        XCLIENT ADDR/LOGIN after login gets the proxy's C{550 5.7.0}; the
        message that follows is alice's in Postfix's log, and no line shows
        C{sasl_method=XCLIENT} for bob or the spoofed address.
        """
        user, messageId, mark = "alice@example.org", newMessageId(), self.logMark("old")
        client = self.loggedIn(user)
        self.assertEqual(client.command(self.SPOOF), [b"550 5.7.0 Error: insufficient authorization"])
        self.assertEqual(client.command(b"XFORWARD ADDR=6.6.6.6"), [b"550 5.7.0 Error: insufficient authorization"])
        self.submitAsOwnUser(client, user, messageId, mark)

    def test_xclientOtherWhiteSpace(self) -> None:
        """
        XCLIENT spaced with characters Postfix's tokenizer takes for white
        space (vertical tab, form feed, a leading CR) is refused the same:
        Postfix never sees it.
        """
        user, messageId, mark = "alice@example.org", newMessageId(), self.logMark("old")
        client = self.loggedIn(user)
        refused = [b"550 5.7.0 Error: insufficient authorization"]
        for spoof in (
            b"XCLIENT\x0bADDR=6.6.6.6 LOGIN=bob@example.org",
            b"\x0cXCLIENT ADDR=6.6.6.6 LOGIN=bob@example.org",
            b"\rXCLIENT ADDR=6.6.6.6 LOGIN=bob@example.org",
        ):
            self.assertEqual(client.command(spoof), refused, spoof)
        self.submitAsOwnUser(client, user, messageId, mark)

    def test_xclientPipelinedBehindAuth(self) -> None:
        """
        XCLIENT pipelined behind AUTH, with MAIL and RCPT after it: every
        reply comes in order, the proxy's refusal in XCLIENT's place.
        """
        user, mark = "alice@example.org", self.logMark("old")
        client = self.loggedIn(
            user, self.SPOOF + b"\r\nMAIL FROM:<" + user.encode() + b">\r\nRCPT TO:<" + user.encode() + b">\r\n"
        )
        self.assertEqual(client.reply(), [b"550 5.7.0 Error: insufficient authorization"])
        self.assertEqual(client.reply(), [b"250 2.1.0 Ok"])
        self.assertEqual(client.reply(), [b"250 2.1.5 Ok"])
        self.assertEqual(client.command(b"QUIT")[0][:3], b"221")
        self.assertNotSpoofed(mark)

    def test_xclientBehindRefusedData(self) -> None:
        """
        DATA that Postfix refuses (no transaction), with XCLIENT in the same
        packet: the proxy waits for Postfix's reply to DATA, which is no
        C{354}, so XCLIENT is a command, and refused.
        """
        user, mark = "alice@example.org", self.logMark("old")
        client = self.loggedIn(user)
        client.send(b"DATA\r\n" + self.SPOOF + b"\r\nNOOP\r\n")
        self.assertEqual(client.reply()[0][:4], b"503 ")
        self.assertEqual(client.reply(), [b"550 5.7.0 Error: insufficient authorization"])
        self.assertEqual(client.reply()[0][:4], b"250 ")
        self.assertEqual(client.command(b"QUIT")[0][:3], b"221")
        self.assertNotSpoofed(mark)

    def test_xclientBehindBareLineFeedDot(self) -> None:
        """
        A message whose data "ends" at LF . LF, which this Postfix takes for
        the end, followed by XCLIENT: the proxy refuses the message with
        C{554 5.6.0} and closes before Postfix sees any of it, so nothing
        is queued and XCLIENT never arrives.
        """
        user, mark = "alice@example.org", self.logMark("old")
        client = self.loggedIn(user)
        self.assertEqual(client.command(b"MAIL FROM:<" + user.encode() + b">"), [b"250 2.1.0 Ok"])
        self.assertEqual(client.command(b"RCPT TO:<" + user.encode() + b">"), [b"250 2.1.5 Ok"])
        self.assertTrue(client.command(b"DATA")[0].startswith(b"354 "))
        client.send(b"Subject: smuggled\r\n\r\nHello.\n.\n" + self.SPOOF + b"\r\nNOOP\r\n")
        self.assertEqual(
            client.reply(), [b"554 5.6.0 Message refused: bare CR or LF in message data; end lines with CRLF"]
        )
        self.assertRaises(EOFError, client.line)
        self.assertNotSpoofed(mark)
        self.assertNotIn("status=sent", self.system.postfixes["old"].logText()[mark:])


class MXTests(SMTPFixtureMixin, SynchronousTestCase):
    """
    Inbound mail on the MX listener, each recipient routed to its server.
    """

    def test_splitTransaction(self) -> None:
        """
        One transaction for alice and carol (old) and bob (new) delivers to
        alice and carol on old and defers bob with 452 4.5.3; a second
        transaction delivers to bob on new. Every copy lands once, in the
        right mailbox; old's Postfix saw the real client's address.
        """
        sender = "someone@remote.example"
        recipients = ["alice@example.org", "bob@example.org", "carol@example.org"]
        messageId, mark = newMessageId(), self.logMark("old")
        data = message(sender, recipients, messageId)
        client = self.smtp(self.running.mx)
        client.ehlo("mta.remote.example")
        refused = client.sendmail(sender, recipients, data)
        self.assertEqual(list(refused), ["bob@example.org"])
        code, text = refused["bob@example.org"]
        self.assertEqual(code, 452)
        self.assertTrue(text.startswith(b"4.5.3 "), text)
        self.assertEqual(client.sendmail(sender, ["bob@example.org"], data), {})
        for user in recipients:
            home = HOMES[user]
            other = "new" if home == "old" else "old"
            self.system.waitForCopy(home, user, messageId)
            self.assertEqual(len(self.system.copies(home, user, messageId)), 1, user)
            self.assertEqual(self.system.copies(other, user, messageId), [], user)
        self.postfixLine("old", mark, f"client=unknown[{CLIENT_ADDRESS}]")

    def test_refusedRecipients(self) -> None:
        """
        A domain the proxy does not serve gets 550 5.7.1 (no relaying); an
        unknown user in a domain known only by its accounts gets 550 5.1.1
        from the router; an unknown user of a domain routed as a whole gets
        the backend's own refusal.
        """
        client = self.raw(self.running.mx)
        client.command(b"EHLO mta.remote.example")
        self.assertEqual(client.command(b"MAIL FROM:<someone@remote.example>"), [b"250 2.1.0 Ok"])
        self.assertEqual(
            client.command(b"RCPT TO:<victim@elsewhere.example>"),
            [b"550 5.7.1 <victim@elsewhere.example>: Relay access denied"],
        )
        self.assertEqual(
            client.command(b"RCPT TO:<nobody@example.net>"),
            [b"550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown"],
        )
        [line] = client.command(b"RCPT TO:<nobody@example.org>")
        self.assertTrue(line.startswith(b"550 5.1.1 <nobody@example.org>: Recipient address rejected"), line)
        self.assertEqual(client.command(b"DATA"), [b"554 5.5.1 Error: no valid recipients"])

    def test_localDomainUnknownUser(self) -> None:
        """
        A recipient of a local domain (C{local_domains}) that the router
        does not know gets 550 5.1.1 User unknown, not 5.7.1; a known
        recipient of the same transaction still reaches its mailbox through
        Postfix.
        """
        sender, user, messageId = "someone@remote.example", "erin@example.net", newMessageId()
        client = self.raw(self.running.mx)
        client.command(b"EHLO mta.remote.example")
        self.assertEqual(client.command(b"MAIL FROM:<someone@remote.example>"), [b"250 2.1.0 Ok"])
        self.assertEqual(
            client.command(b"RCPT TO:<ghost@example.com>"),
            [b"550 5.1.1 <ghost@example.com>: Recipient address rejected: User unknown"],
        )
        self.assertEqual(client.command(b"RCPT TO:<erin@example.net>"), [b"250 2.1.5 Ok"])
        self.assertTrue(client.command(b"DATA")[0].startswith(b"354 "))
        [done] = client.command(message(sender, [user], messageId) + b".")
        self.assertTrue(done.startswith(b"250 2.0.0 Ok: queued as "), done)
        self.system.waitForCopy("new", user, messageId)

    def test_chunking(self) -> None:
        """
        BDAT chunks (pipelined, the last with LAST) reach the backend and
        the message its mailbox.
        """
        sender, user, messageId = "someone@remote.example", "erin@example.net", newMessageId()
        data = message(sender, [user], messageId, body="Chunked.\r\n")
        client = self.raw(self.running.mx)
        self.assertIn(b"250 CHUNKING", client.command(b"EHLO mta.remote.example"))
        client.send(b"MAIL FROM:<someone@remote.example>\r\nRCPT TO:<erin@example.net>\r\n")
        self.assertEqual(client.reply(), [b"250 2.1.0 Ok"])
        self.assertEqual(client.reply(), [b"250 2.1.5 Ok"])
        half = len(data) // 2
        client.send(b"BDAT %d\r\n%sBDAT %d LAST\r\n%s" % (half, data[:half], len(data) - half, data[half:]))
        self.assertEqual(client.reply(), [b"250 2.0.0 Ok: %d bytes" % (half,)])
        [last] = client.reply()
        self.assertTrue(last.startswith(b"250 2.0.0 Ok: %d bytes queued as " % (len(data),)), last)
        self.system.waitForCopy("new", user, messageId)

    def test_bareLineFeedRefused(self) -> None:
        """
        A message with a bare LF (what SMTP smuggling needs) is refused and
        never delivered; the commands hidden after C{LF . LF} are message
        data to the proxy, never commands to a backend.
        """
        sender, user, messageId = "someone@remote.example", "alice@example.org", newMessageId()
        smuggledId = newMessageId()
        client = self.raw(self.running.mx)
        client.command(b"EHLO mta.remote.example")
        client.command(b"MAIL FROM:<someone@remote.example>")
        self.assertEqual(client.command(b"RCPT TO:<alice@example.org>"), [b"250 2.1.5 Ok"])
        self.assertTrue(client.command(b"DATA")[0].startswith(b"354 "))
        client.send(
            message(sender, [user], messageId)
            + b"\n.\nMAIL FROM:<someone@remote.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
            + message(sender, [user], smuggledId)
            + b"\r\n.\r\n"
        )
        [line] = client.reply()
        self.assertTrue(line.startswith(b"550 5.6.0 "), line)
        self.assertEqual(client.command(b"NOOP"), [b"250 2.0.0 Ok"])
        # Nothing reached alice, neither the message nor the smuggled one.
        marker = newMessageId()
        fresh = self.smtp(self.running.mx)
        self.assertEqual(fresh.sendmail(sender, [user], message(sender, [user], marker)), {})
        self.system.waitForCopy("old", user, marker)
        self.assertEqual(self.system.copies("old", user, messageId), [])
        self.assertEqual(self.system.copies("old", user, smuggledId), [])

    def test_largeMessageMemoryFlat(self) -> None:
        """
        A 50 MB message streams through the MX listener without the proxy
        holding it: its resident memory grows by less than 30 MB, and the
        message arrives whole, once.
        """
        sender, user, messageId = "someone@remote.example", "dave@example.org", newMessageId()
        data = largeMessage(sender, user, messageId, 50 * 1024 * 1024)
        client = self.smtp(self.running.mx)
        client.ehlo("mta.remote.example")
        before = self.running.rss()
        self.assertEqual(client.sendmail(sender, [user], data), {})
        after = self.running.rss()
        self.assertLess(after - before, 30 * 1024 * 1024, f"RSS {before} -> {after}")
        delivered = self.system.waitForCopy("new", user, messageId)
        self.assertIn(data.rstrip(b"\r\n")[-1000:], delivered)
        self.assertGreater(len(delivered), len(data))
        self.assertEqual(len(self.system.copies("new", user, messageId)), 1)


class ProxyHeaderTests(SMTPFixtureMixin, SynchronousTestCase):
    """
    Backends that learn the client from a PROXY v2 header instead of
    XCLIENT (Postfix's C{smtpd_upstream_proxy_protocol}).
    """

    def backendOptions(self, postfix: Postfix) -> dict[str, object]:
        """
        The MX port that requires a PROXY header (no submission: its port
        takes none).
        """
        return {"ports": {"smtp": postfix.submission, "mx": postfix.mxProxy}, "tls": "none", "forward": "proxy-v2"}

    def test_mxClientAddress(self) -> None:
        """
        Mail through the MX listener reaches old's Postfix, which logs the
        client's address from the header.
        """
        sender, user, messageId, mark = "someone@remote.example", "alice@example.org", newMessageId(), self.logMark("old")
        client = self.smtp(self.running.mx)
        self.assertEqual(client.sendmail(sender, [user], message(sender, [user], messageId)), {})
        self.system.waitForCopy("old", user, messageId)
        self.postfixLine("old", mark, f"[{CLIENT_ADDRESS}]")


class IPv6ClientTests(SMTPFixtureMixin, SynchronousTestCase):
    """
    Clients on IPv6 (the proxy listens on ::1): XCLIENT gives the backend
    their address as C{IPV6:::1}, in ADDR and DESTADDR alike.
    """

    endpoint = "tcp6:0:interface=\\:\\:1"

    def raw6(self, port: int, implicit: bool = False) -> LineClient:
        """
        A bare client of the proxy from ::1, its greeting read, closed after
        the test.
        """
        connection = socket.create_connection(("::1", port), TIMEOUT)
        if implicit:
            connection = self.context.wrap_socket(connection, server_hostname=LineClient.serverName)
        client = LineClient(connection)
        self.addCleanup(client.close)
        self.assertTrue(client.reply()[0].startswith(b"220 "))
        return client

    def test_mxDelivered(self) -> None:
        """
        Mail from ::1 to bob reaches new's Postfix, which logs the client
        as C{[::1]}, and his mailbox.
        """
        sender, user, messageId, mark = "someone@remote.example", "bob@example.org", newMessageId(), self.logMark("new")
        client = self.raw6(self.running.mx)
        self.sendMessage(client, sender, user, messageId)
        self.assertTrue(client.reply()[0].startswith(b"250 2.0.0 Ok: queued"))
        self.postfixLine("new", mark, "client=unknown[::1]")
        self.system.waitForCopy("new", user, messageId)

    def test_submissionDelivered(self) -> None:
        """
        Submission from ::1 (bob, logged in at new with AUTH) reaches new's
        Postfix, which logs the client as C{[::1]} with bob as SASL user.
        """
        user, messageId, mark = "bob@example.org", newMessageId(), self.logMark("new")
        client = self.raw6(self.running.submissions, implicit=True)
        self.submitTo(client, user)
        self.assertTrue(client.command(b"DATA")[0].startswith(b"354 "))
        client.send(message(user, [user], messageId) + b".\r\n")
        self.assertTrue(client.reply()[0].startswith(b"250 2.0.0 Ok: queued"))
        self.postfixLine("new", mark, "[::1]", f"sasl_username={user}")
        self.system.waitForCopy("new", user, messageId)

    def test_backendWithoutIPv6Defers(self) -> None:
        """
        old's Postfix leaves IPv6 out of C{inet_protocols} and refuses the
        XCLIENT (C{501 5.5.4 Bad DESTADDR syntax}): a fault between proxy
        and backend, so the recipient gets a temporary 451, which a sending
        MTA retries, never a permanent refusal it would bounce.
        """
        mark = self.logMark("old")
        client = self.raw6(self.running.mx)
        client.command(b"EHLO mta.remote.example")
        self.assertEqual(client.command(b"MAIL FROM:<someone@remote.example>"), [b"250 2.1.0 Ok"])
        self.assertEqual(
            client.command(b"RCPT TO:<alice@example.org>"),
            [b"451 4.4.1 <alice@example.org>: Mail server temporarily unavailable, try again later"],
        )
        self.postfixLine("old", mark, "disconnect from")


class BackendDownTests(SMTPFixtureMixin, SynchronousTestCase):
    """
    A third backend, "down", that no one listens for: the proxy cannot
    learn its extensions, and offers what the two Postfixes have.
    """

    def _startProxy(self) -> RunningProxy:
        backends: dict[str, Mapping[str, object]] = {
            name: {"host": "127.0.0.1", "connect_timeout": 5, **self.backendOptions(postfix)}
            for name, postfix in self.system.postfixes.items()
        }
        dead = freePort()
        backends["down"] = {"host": "127.0.0.1", "connect_timeout": 5, "ports": {"smtp": dead, "mx": dead}, "tls": "none"}
        running = RunningProxy(fixtureDirectory(type(self).__name__), backends, self.system.ca)
        running.start()
        return running

    def test_smtputf8MailDelivered(self) -> None:
        """
        The MX EHLO still offers SMTPUTF8 (a sending MTA bounces SMTPUTF8
        mail at once where it is missing), and such mail for bob reaches
        new's Postfix.
        """
        sender, user, messageId, mark = "jörg@remote.example", "bob@example.org", newMessageId(), self.logMark("new")
        client = self.raw(self.running.mx)
        ehlo = self.sendMessage(client, sender, user, messageId, b" SMTPUTF8")
        self.assertIn(b"250-SMTPUTF8", ehlo)
        self.assertTrue(client.reply()[0].startswith(b"250 2.0.0 Ok: queued"))
        # Dovecot's LMTP offers no SMTPUTF8: the copy stops at new's queue.
        self.postfixLine("new", mark, f"message-id={messageId}")


class HeldPolicy:
    """
    A Postfix policy service (C{check_policy_service}) on 127.0.0.1 that
    holds every request until L{release}: a backend's reply to the end of
    a message then waits for the test, with the message in its hands.

    @ivar asked: set once a request has arrived.
    """

    def __init__(self) -> None:
        self.asked = threading.Event()
        self._released = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            reader = connection.makefile("rb")
            while True:
                # A request is attribute lines up to an empty one.
                while True:
                    line = reader.readline()
                    if not line:
                        return
                    if line in (b"\n", b"\r\n"):
                        break
                self.asked.set()
                self._released.wait(TIMEOUT)
                connection.sendall(b"action=DUNNO\n\n")

    def release(self) -> None:
        """
        Answer the held requests, and later ones at once.
        """
        self._released.set()

    def close(self) -> None:
        """
        Stop listening; release whatever is held.
        """
        self.release()
        self._server.close()


class ShutdownTests(SMTPFixtureMixin, SynchronousTestCase):
    """
    SIGTERM while a message's end waits for the backend's reply: a third
    Postfix ("held", delivering into new's Dovecot) holds that reply in a
    policy service until the proxy has begun closing its sessions; the
    client must get the backend's 250 before the goodbye, and the message
    must arrive once (cut there, a sender would send it again).
    """

    def setUp(self) -> None:
        # The servers are shared; the proxy is each test's own (SIGTERM
        # ends it).
        self.system = sharedFixture("smtp servers", __name__, MailSystem.start)
        self.context = ssl.create_default_context(cafile=self.system.ca.caPath)
        self.policy = HeldPolicy()
        self.addCleanup(self.policy.close)
        dovecot = self.system.dovecots["new"]
        sasl = os.path.join(os.path.realpath(dovecot.directory / "runtime"), "run", "postfix-auth")
        self.held = Postfix(
            fixtureDirectory(f"{type(self).__name__}-postfix-{self._testMethodName}"),
            "held",
            domains=["example.org", "example.net"],
            mailboxes=list(PASSWORDS),
            lmtpPort=dovecot.lmtp,
            saslPath=sasl,
            ca=self.system.ca,
            extraMainCf=f"smtpd_end_of_data_restrictions = check_policy_service inet:127.0.0.1:{self.policy.port}\n",
        )
        self.held.start()
        self.addCleanup(self.held.stop)
        backends = {
            "old": {"host": "127.0.0.1", "connect_timeout": 5, **self.backendOptions(self.system.postfixes["old"])},
            "new": {"host": "127.0.0.1", "connect_timeout": 5, **self.backendOptions(self.held)},
        }
        self.proxy = RunningProxy(fixtureDirectory(f"{type(self).__name__}-{self._testMethodName}"), backends, self.system.ca)
        config = self.proxy.proxy.configPath
        # The goodbyes come at once after SIGTERM.
        config.write_text(config.read_text().replace("[limits]\n", '[limits]\n"shutdown_grace" = 0\n', 1))
        self.proxy.start()
        self.addCleanup(self.proxy.stop)

    def stopWhileHeld(self, client: LineClient, messageId: str, user: str) -> None:
        """
        With the message's end sent on C{client}, wait for the backend to
        hold it, send the proxy SIGTERM, release the reply once the proxy
        is closing its sessions; the client gets the 250, then the goodbye,
        and C{user} the message once.
        """
        self.assertTrue(self.policy.asked.wait(TIMEOUT), "the backend never asked the policy service")
        os.kill(self.proxy.proxy.pid, signal.SIGTERM)
        deadline = time.monotonic() + TIMEOUT
        while "closing 1 sessions" not in self.proxy.proxy.logText():
            self.assertLess(time.monotonic(), deadline, "the proxy did not begin closing its session")
            time.sleep(0.05)
        self.policy.release()
        # DATA's "Ok: queued as X", BDAT's "Ok: N bytes queued as X".
        queued = client.reply()
        self.assertTrue(queued[0].startswith(b"250 2.0.0 Ok: ") and b"queued as " in queued[0], queued)
        self.assertEqual(client.reply(), [b"421 4.3.2 proxy.example.org Server shutting down."])
        self.system.waitForCopy("new", user, messageId)
        self.assertEqual(len(self.system.copies("new", user, messageId)), 1)

    def test_mx(self) -> None:
        """
        An MX session after the final dot.
        """
        sender, user, messageId = "someone@remote.example", "bob@example.org", newMessageId()
        client = self.raw(self.proxy.mx)
        self.sendMessage(client, sender, user, messageId)
        self.stopWhileHeld(client, messageId, user)

    def test_submission(self) -> None:
        """
        A submission session (bob, relayed after login) after the last
        BDAT chunk.
        """
        user, messageId = "bob@example.org", newMessageId()
        client = self.raw(self.proxy.submissions, implicit=True)
        self.submitTo(client, user)
        data = message(user, [user], messageId)
        client.send(b"BDAT %d LAST\r\n" % len(data) + data)
        self.stopWhileHeld(client, messageId, user)


class TLSBackendTests(SMTPFixtureMixin, SynchronousTestCase):
    """
    Backends reached over TLS: STARTTLS on submission, verified against the
    test CA.
    """

    def backendOptions(self, postfix: Postfix) -> dict[str, object]:
        """
        STARTTLS to every Postfix port, the certificate checked.
        """
        return {
            "ports": {"smtp": postfix.submission, "mx": postfix.mx},
            "tls": "starttls",
            "ca_file": self.system.ca.caPath,
            "server_name": "localhost",
            "forward": "xclient",
        }

    def test_submissionOverTLS(self) -> None:
        """
        A submission reaches new's Postfix over TLS, which logs the
        connection as TLS and the client's address and user.
        """
        user, messageId, mark = "bob@example.org", newMessageId(), self.logMark("new")
        client = self.smtp(self.running.submissions, implicit=True)
        client.login(user, PASSWORDS[user])
        self.assertEqual(client.sendmail(user, [user], message(user, [user], messageId)), {})
        self.assertSubmitted("new", user, mark, messageId, "PLAIN")
        self.postfixLine("new", mark, "Anonymous TLS connection established from localhost[127.0.0.1]")

    def test_mxOverTLS(self) -> None:
        """
        Inbound mail reaches old's Postfix over TLS.
        """
        sender, user, messageId = "someone@remote.example", "carol@example.org", newMessageId()
        client = self.smtp(self.running.mx)
        client.starttls(context=self.context)
        self.assertEqual(client.sendmail(sender, [user], message(sender, [user], messageId)), {})
        self.system.waitForCopy("old", user, messageId)


    def test_probeThroughSTARTTLS(self) -> None:
        """
        C{check --probe} on the running proxy's configuration reads each
        Postfix's greeting (its last line), says EHLO and STARTTLS and
        makes the handshake: OK with the test CA; with another CA every
        port fails as every login would.
        """
        configPath = self.running.proxy.configPath
        done = self._check(configPath)
        lines = [line for line in done.stdout.splitlines() if line.startswith("backend ")]
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertTrue(lines, done.stdout)
        for line in lines:
            self.assertIn(": OK, greeting in ", line)
        other = TestCA(os.path.join(os.path.dirname(configPath), "other-ca"))
        wrong = configPath.with_name("wrong-ca.toml")
        wrong.write_text(configPath.read_text().replace(self.system.ca.caPath, other.caPath))
        done = self._check(wrong)
        lines = [line for line in done.stdout.splitlines() if line.startswith("backend ")]
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        self.assertTrue(lines, done.stdout)
        for line in lines:
            self.assertIn(": FAILED: TLS handshake failed: ", line)
            self.assertIn("certificate verify failed", line)

    def _check(self, path: Path) -> subprocess.CompletedProcess[str]:
        environment = dict(os.environ)
        repository = str(Path(__file__).resolve().parents[2])
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [repository, environment.get("PYTHONPATH")]))
        return subprocess.run(
            [sys.executable, "-c", "import sys; from mailproxy.cli import main; sys.exit(main())", "check", str(path), "--probe"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
        )


class ImplicitTLSBackendTests(SMTPFixtureMixin, SynchronousTestCase):
    """
    Submission to a backend port with implicit TLS (Postfix's
    C{smtpd_tls_wrappermode}), verified against the test CA.
    """

    def backendOptions(self, postfix: Postfix) -> dict[str, object]:
        """
        The implicit-TLS submission port; no MX is used here.
        """
        return {
            "ports": {"smtp": postfix.submissions, "mx": postfix.submissions},
            "tls": "implicit",
            "ca_file": self.system.ca.caPath,
            "server_name": "localhost",
            "forward": "xclient",
        }

    def test_submissionOverImplicitTLS(self) -> None:
        """
        carol's submission (XCLIENT LOGIN) reaches old's Postfix over TLS.
        """
        user, messageId, mark = "carol@example.org", newMessageId(), self.logMark("old")
        client = self.smtp(self.running.submission)
        client.starttls(context=self.context)
        client.login(user, PASSWORDS[user])
        self.assertEqual(client.sendmail(user, [user], message(user, [user], messageId)), {})
        self.assertSubmitted("old", user, mark, messageId, "XCLIENT")
        self.postfixLine("old", mark, "TLS connection established from localhost[127.0.0.1]")


class PortTLSBackendTests(SMTPFixtureMixin, SynchronousTestCase):
    """
    One backend reached two ways (C{port_tls}): STARTTLS on its submission
    port, plain SMTP on its MX port.
    """

    def backendOptions(self, postfix: Postfix) -> dict[str, object]:
        """
        STARTTLS by default, verified against the test CA; the MX port
        plain.
        """
        return {
            "ports": {"smtp": postfix.submission, "mx": postfix.mx},
            "tls": "starttls",
            "port_tls": {"mx": "none"},
            "ca_file": self.system.ca.caPath,
            "server_name": "localhost",
            "forward": "xclient",
        }

    def test_submissionOverTLSAndMXPlain(self) -> None:
        """
        A submission reaches new's Postfix over TLS, which logs the TLS
        connection; inbound mail reaches old's Postfix, which logs no TLS
        connection for it.
        """
        user, messageId, mark = "bob@example.org", newMessageId(), self.logMark("new")
        client = self.smtp(self.running.submissions, implicit=True)
        client.login(user, PASSWORDS[user])
        self.assertEqual(client.sendmail(user, [user], message(user, [user], messageId)), {})
        self.assertSubmitted("new", user, mark, messageId, "PLAIN")
        self.postfixLine("new", mark, "TLS connection established from localhost[127.0.0.1]")

        sender, user, messageId, mark = "someone@remote.example", "carol@example.org", newMessageId(), self.logMark("old")
        client = self.smtp(self.running.mx)
        client.starttls(context=self.context)
        self.assertEqual(client.sendmail(sender, [user], message(sender, [user], messageId)), {})
        self.system.waitForCopy("old", user, messageId)
        self.postfixLine("old", mark, f"client=unknown[{CLIENT_ADDRESS}]")
        self.assertNotIn("TLS connection established", self.system.postfixes["old"].logText()[mark:])
