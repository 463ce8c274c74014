"""
How many round trips each backend login dialogue takes, over a real
loopback TCP connection to a scripted server in this process that answers
like Dovecot or Postfix and records every read it makes.

A command the proxy may pipeline arrives in the same read as the one before
it; a command that waits for a reply arrives in a read of its own. So the
number of reads is the number of times the login waited on the network.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from typing import Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase

from mailproxy import _backend
from mailproxy._backend import BackendProtocol, LoginJob, connectBackend
from mailproxy._relay import socketOf
from mailproxy._tls import makeSelfSigned
from mailproxy.imap._backend import IMAPBackendLogin
from mailproxy.model import ClientInfo, Credentials, Route
from mailproxy.pop3._backend import CapabilityMemory, POP3BackendLogin
from mailproxy.sieve._backend import SieveBackendLogin
from mailproxy.smtp._backend import SMTPBackendLogin
from mailproxy.smtp._ehlo import Extensions
from mailproxy.testing import makeBackend

#: What a server answers: the command line (without CRLF, IMAP literals
#: joined in) to its reply and whether to start TLS once it is written.
Script = Callable[[bytes], "tuple[bytes, bool]"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_LITERAL = re.compile(rb"\{(\d+)\+?\}$")


def unackedSegments(sock: socket.socket) -> int:
    """
    Segments C{sock} has sent that its peer has not acknowledged yet
    (C{tcpi_unacked} of Linux's C{TCP_INFO}).
    """
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, 24)[0])


class ScriptedServer(Protocol):
    """
    A line-based mail server: greets, answers each complete command with
    its script, starts TLS when the script says so, and records each read.

    @ivar reads: what each read returned, in order (after TLS, decrypted).
    """

    def __init__(self, greeting: bytes, script: Script, options: object, headerFirst: bool = False) -> None:
        self.greeting = greeting
        self.script = script
        self.options = options
        self.headerFirst = headerFirst
        self.reads: list[bytes] = []
        self.buffer = b""
        self.literal = 0
        self.pending = b""

    def connectionMade(self) -> None:
        if not self.headerFirst:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)
        if self.headerFirst:
            # The PROXY header comes alone, before the greeting.
            self.headerFirst = False
            self.transport.write(self.greeting)
            return
        self.buffer += data
        while True:
            if self.literal:
                if len(self.buffer) < self.literal:
                    return
                self.pending += self.buffer[: self.literal]
                self.buffer = self.buffer[self.literal :]
                self.literal = 0
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            match = _LITERAL.search(line)
            if match:
                # An IMAP literal: the command goes on after its octets.
                self.pending += line + b"\r\n"
                self.literal = int(match.group(1))
                if not line.endswith(b"+}"):
                    self.transport.write(b"+ OK\r\n")
                continue
            line, self.pending = self.pending + line, b""
            reply, startTLS = self.script(line)
            self.transport.write(reply)
            if startTLS:
                self.transport.startTLS(self.options)


class ServerFactory(Factory):
    """
    Makes one L{ScriptedServer} and keeps it.
    """

    def __init__(self, make: Callable[[], ScriptedServer]) -> None:
        self.make = make
        self.server: ScriptedServer | None = None

    def buildProtocol(self, addr: object) -> ScriptedServer:
        self.server = self.make()
        return self.server


# Scripts answering like the real servers.

POP3_CAPA = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nSTLS\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"


def pop3Script(capa: bytes = POP3_CAPA) -> Script:
    """
    Dovecot's POP3 login: C{capa} to CAPA, C{+OK} to the rest.
    """

    def answer(line: bytes) -> tuple[bytes, bool]:
        word = line.split(b" ")[0].upper()
        if word == b"STLS":
            return b"+OK Begin TLS negotiation now.\r\n", True
        replies = {
            b"CAPA": capa,
            b"XCLIENT": b"+OK Updated\r\n",
            b"AUTH": b"+OK Logged in.\r\n",
            b"USER": b"+OK\r\n",
            b"PASS": b"+OK Logged in.\r\n",
        }
        return replies.get(word, b"-ERR Unknown command.\r\n"), False

    return answer


IMAP_CAPS = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN AUTH=LOGIN"
IMAP_POST_CAPS = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFERENCES LITERAL+ MOVE"


def imapScript(caps: bytes = IMAP_CAPS, capsInLoginReply: bool = True) -> Script:
    """
    Dovecot's IMAP login: C{caps} before login; the login's OK carries
    the post-login capabilities unless C{capsInLoginReply} is false.
    """

    state = {"loggedIn": False}

    def answer(line: bytes) -> tuple[bytes, bool]:
        tag, _, rest = line.partition(b" ")
        command = rest.split(b" ")[0].upper()
        if command == b"STARTTLS":
            return tag + b" OK Begin TLS negotiation now.\r\n", True
        if command == b"ID":
            return b'* ID ("name" "Dovecot")\r\n' + tag + b" OK ID completed.\r\n", False
        if command == b"CAPABILITY":
            current = IMAP_POST_CAPS if state["loggedIn"] else caps
            return b"* CAPABILITY " + current + b"\r\n" + tag + b" OK Pre-login capabilities listed.\r\n", False
        if command in (b"LOGIN", b"AUTHENTICATE"):
            state["loggedIn"] = True
            code = b"[CAPABILITY " + IMAP_POST_CAPS + b"] " if capsInLoginReply else b""
            return tag + b" OK " + code + b"Logged in\r\n", False
        return tag + b" BAD Error in IMAP command.\r\n", False

    return answer


SIEVE_GREETING = (
    b'"IMPLEMENTATION" "Dovecot Pigeonhole"\r\n"SIEVE" "fileinto reject"\r\n"NOTIFY" "mailto"\r\n'
    b'"SASL" "PLAIN LOGIN"\r\n"STARTTLS"\r\n"VERSION" "1.0"\r\n"XCLIENT"\r\nOK "Dovecot ready."\r\n'
)


def sieveScript() -> Script:
    """
    Dovecot's ManageSieve login (it re-sends its capabilities after TLS:
    see L{RoundTripTestsMixin.login}'s C{afterTLS}).
    """

    def answer(line: bytes) -> tuple[bytes, bool]:
        command = line.split(b" ")[0].upper()
        if command == b"STARTTLS":
            return b'OK "Begin TLS negotiation now."\r\n', True
        if command == b"XCLIENT":
            return b'OK "Updated"\r\n', False
        if command == b"AUTHENTICATE":
            return b'OK "Logged in."\r\n', False
        return b'NO "Unknown command."\r\n', False

    return answer


SMTP_EHLO = (
    b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n"
    b"250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
)
SMTP_XCLIENT_ATTRIBUTES = ["NAME", "ADDR", "PROTO", "HELO", "REVERSE_NAME", "PORT", "LOGIN", "DESTADDR", "DESTPORT"]


def smtpScript() -> Script:
    """
    Postfix's submission: XCLIENT answered with a new greeting.
    """

    def answer(line: bytes) -> tuple[bytes, bool]:
        command = line.split(b" ")[0].upper()
        if command == b"STARTTLS":
            return b"220 2.0.0 Ready to start TLS\r\n", True
        replies = {
            b"EHLO": SMTP_EHLO,
            b"XCLIENT": b"220 mx.test ESMTP Postfix\r\n",
            b"AUTH": b"235 2.7.0 Authentication successful\r\n",
        }
        return replies.get(command, b"502 5.5.2 Error: command not recognized\r\n"), False

    return answer


class RoundTripTestsMixin:
    """
    Runs one login against a scripted server on a loopback socket.
    """

    def setUp(self) -> None:
        directory = self.mktemp()  # type: ignore[attr-defined]
        os.makedirs(directory)
        # The self-signed certificate is its own CA: the backend's is
        # verified as in production.
        certificate, key = makeSelfSigned(directory)
        self.caFile = certificate
        with open(certificate) as c, open(key) as k:
            self.serverOptions = PrivateCertificate.loadPEM(c.read() + k.read()).options()

    @inlineCallbacks
    def login(
        self,
        protocol: str,
        greeting: bytes,
        script: Script,
        loginClass: Callable[..., BackendProtocol],
        *,
        tls: str = "none",
        forward: str = "auto",
        master: bool = False,
        afterTLS: bytes = b"",
        again: bool = False,
        **extra: object,
    ):
        """
        Log in with C{loginClass} at a scripted server; fires with the
        server (its C{reads}) once the login succeeded.

        @param afterTLS: what the server sends unprompted once TLS is up
            (ManageSieve's capabilities).
        @param again: log in at the server and backend of the last call
            (the other settings are ignored).
        """
        if again:
            loggedIn = yield connectBackend(reactor, loginClass(self.job, reactor, 10, **extra))
            self.addCleanup(loggedIn.transport.abortConnection)  # type: ignore[attr-defined]
            assert self.factory.server is not None
            return self.factory.server
        options = self.serverOptions

        def make() -> ScriptedServer:
            server = ScriptedServer(greeting, script, options, headerFirst=forward.startswith("proxy-"))
            if afterTLS:
                original = server.script

                def withGreeting(line: bytes) -> tuple[bytes, bool]:
                    reply, startTLS = original(line)
                    if startTLS:
                        reactor.callLater(0, lambda: server.transport.write(afterTLS))
                    return reply, startTLS

                server.script = withGreeting
            return server

        factory = self.factory = ServerFactory(make)
        listening: Factory = factory
        if tls == "implicit":
            listening = TLSMemoryBIOFactory(options, False, factory)
        port = reactor.listenTCP(0, listening, interface="127.0.0.1")
        self.addCleanup(port.stopListening)  # type: ignore[attr-defined]
        backendOptions: dict[str, object] = {}
        if master:
            backendOptions = {"masterUser": "proxy", "masterPassword": b"masterpw"}
        backend = makeBackend(
            "scripted", host="127.0.0.1", ports={protocol: port.getHost().port}, tls=tls,
            forward=forward, caFile=self.caFile, serverName="localhost", **backendOptions,
        )  # fmt: skip
        client = ClientInfo(sessionId="s1", address="192.0.2.10", port=50000, localAddress="192.0.2.1", localPort=993)
        job = LoginJob(
            route=Route(backend, useMaster=master) if master else Route(backend),
            protocol=protocol,
            client=client,
            credentials=Credentials("PLAIN", "alice", password=b"secret"),
            user="alice",
            password=b"secret",
            masterUser="proxy" if master else None,
            masterPassword=b"masterpw" if master else None,
        )
        self.job = job
        login = loginClass(job, reactor, 10, **extra)
        loggedIn = yield connectBackend(reactor, login)
        self.addCleanup(loggedIn.transport.abortConnection)  # type: ignore[attr-defined]
        self.loggedIn = loggedIn
        assert factory.server is not None
        return factory.server

    def assertReads(self, server: ScriptedServer, expected: list[bytes], header: bool = False) -> None:
        """
        The server read the commands whose first words C{expected} lists,
        one read per entry (the words of one read joined by C{" | "}).

        @param header: the first read was a PROXY v2 header, alone.
        """
        reads = server.reads
        if header:
            self.assertTrue(reads[0].startswith(V2_SIGNATURE))  # type: ignore[attr-defined]
            self.assertNotIn(b"\r\n", reads[0][len(V2_SIGNATURE) :])  # type: ignore[attr-defined]
            reads = reads[1:]
        words = [b" | ".join(line.split(b" ")[0] for line in read.split(b"\r\n") if line) for read in reads]
        self.assertEqual(words, expected)  # type: ignore[attr-defined]


class POP3RoundTripTests(RoundTripTestsMixin, TestCase):
    """
    POP3: CAPA, then the forwarding and the login in one write.
    """

    GREETING = b"+OK [XCLIENT] Dovecot (Debian) ready.\r\n"

    @inlineCallbacks
    def test_xclient(self):
        """
        Against Dovecot trusting the proxy: two round trips, CAPA and then
        XCLIENT with AUTH PLAIN in one read.
        """
        server = yield self.login("pop3", self.GREETING, pop3Script(), POP3BackendLogin)
        self.assertReads(server, [b"CAPA", b"XCLIENT | AUTH"])

    @inlineCallbacks
    def test_noForwarding(self):
        """
        With C{forward = "none"}: CAPA, then AUTH PLAIN.
        """
        server = yield self.login("pop3", self.GREETING, pop3Script(), POP3BackendLogin, forward="none")
        self.assertReads(server, [b"CAPA", b"AUTH"])

    @inlineCallbacks
    def test_masterUser(self):
        """
        A master user login is one AUTH PLAIN, pipelined with XCLIENT.
        """
        server = yield self.login("pop3", self.GREETING, pop3Script(), POP3BackendLogin, master=True)
        self.assertReads(server, [b"CAPA", b"XCLIENT | AUTH"])

    @inlineCallbacks
    def test_userPassPipelined(self):
        """
        Without SASL PLAIN but with PIPELINING, USER and PASS go together.
        """
        capa = POP3_CAPA.replace(b"SASL PLAIN LOGIN\r\n", b"")
        server = yield self.login("pop3", self.GREETING, pop3Script(capa), POP3BackendLogin)
        self.assertReads(server, [b"CAPA", b"XCLIENT | USER | PASS"])

    @inlineCallbacks
    def test_proxyHeader(self):
        """
        A PROXY v2 header is one read of its own before the greeting; the
        dialogue after it is the same two round trips.
        """
        server = yield self.login("pop3", b"+OK Dovecot ready.\r\n", pop3Script(), POP3BackendLogin, forward="proxy-v2")
        self.assertReads(server, [b"CAPA", b"AUTH"], header=True)

    @inlineCallbacks
    def test_startTLS(self):
        """
        With STLS: STLS, then (after the handshake) CAPA, then the login.
        """
        server = yield self.login("pop3", self.GREETING, pop3Script(), POP3BackendLogin, tls="starttls")
        self.assertReads(server, [b"STLS", b"CAPA", b"XCLIENT | AUTH"])

    @inlineCallbacks
    def test_implicitTLS(self):
        """
        With implicit TLS the greeting comes inside TLS: the same two round
        trips after the handshake.
        """
        server = yield self.login("pop3", self.GREETING, pop3Script(), POP3BackendLogin, tls="implicit")
        self.assertReads(server, [b"CAPA", b"XCLIENT | AUTH"])

    @inlineCallbacks
    def test_capabilitiesRemembered(self):
        """
        The next login to the same backend port goes by the CAPA list the
        first one read: one round trip, XCLIENT with AUTH PLAIN; with STLS
        two, STLS and then the login.
        """
        for tls in ("none", "starttls", "implicit"):
            memory = CapabilityMemory()
            server = yield self.login("pop3", self.GREETING, pop3Script(), POP3BackendLogin, tls=tls, memory=memory)
            self.assertReads(server, ([b"STLS"] if tls == "starttls" else []) + [b"CAPA", b"XCLIENT | AUTH"])
            server = yield self.login("pop3", b"", pop3Script(), POP3BackendLogin, again=True, memory=memory)
            self.assertReads(server, ([b"STLS"] if tls == "starttls" else []) + [b"XCLIENT | AUTH"])

    @inlineCallbacks
    def test_noDelay(self):
        """
        The connection to the backend has C{TCP_NODELAY} set, in plain
        text, after STLS and with implicit TLS: the proxy's small commands
        are never held back waiting for an ACK.
        """
        for tls in ("none", "starttls", "implicit"):
            yield self.login("pop3", self.GREETING, pop3Script(), POP3BackendLogin, tls=tls)
            handle = getattr(socketOf(self.loggedIn.transport), "socket")
            self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), tls)

    @inlineCallbacks
    def test_acknowledgedAtOnce(self):
        """
        The proxy acknowledges each backend reply as soon as it has read
        it, even when it has nothing to send back: after reading the reply
        to XCLIENT (the login's reply still to come), nothing the server
        sent is unacknowledged. Otherwise the kernel's delayed ACK (40 ms)
        holds a server's next small reply under Nagle's algorithm, as
        Dovecot's pop3 process does with its C{+OK Logged in.}.
        """
        unacked: list[int] = []
        case = self

        def answer(line: bytes) -> tuple[bytes, bool]:
            if line.startswith(b"AUTH "):
                # Dovecot answers the login later, from another process.
                return b"", False
            return pop3Script()(line)

        class Login(POP3BackendLogin):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                if data == b"+OK Updated\r\n":
                    server = case.factory.server
                    assert server is not None
                    unacked.append(unackedSegments(server.transport.getHandle()))
                    server.transport.write(b"+OK Logged in.\r\n")

        yield self.login("pop3", self.GREETING, answer, Login)
        self.assertEqual(unacked, [0])


class IMAPRoundTripTests(RoundTripTestsMixin, TestCase):
    """
    IMAP: with the capabilities in the greeting, ID and the login go in
    one write.
    """

    GREETING = b"* OK [CAPABILITY " + IMAP_CAPS + b"] Dovecot (Debian) ready.\r\n"

    @inlineCallbacks
    def test_id(self):
        """
        Against Dovecot: one round trip, ID and AUTHENTICATE PLAIN (SASL-IR)
        together; the reply carries the post-login capabilities.
        """
        server = yield self.login("imap", self.GREETING, imapScript(), IMAPBackendLogin)
        self.assertReads(server, [b"P1 | P2"])
        self.assertIn(b"P1 ID (", server.reads[0])
        self.assertIn(b"P2 AUTHENTICATE PLAIN ", server.reads[0])

    @inlineCallbacks
    def test_noCapabilitiesInLoginReply(self):
        """
        A server whose login reply carries no post-login capabilities costs
        one more round trip: CAPABILITY after the login.
        """
        server = yield self.login("imap", self.GREETING, imapScript(capsInLoginReply=False), IMAPBackendLogin)
        self.assertReads(server, [b"P1 | P2", b"P3"])
        self.assertIn(b"P3 CAPABILITY", server.reads[1])

    @inlineCallbacks
    def test_noForwarding(self):
        """
        With C{forward = "none"}: the login alone, one round trip.
        """
        server = yield self.login("imap", self.GREETING, imapScript(), IMAPBackendLogin, forward="none")
        self.assertReads(server, [b"P1"])

    @inlineCallbacks
    def test_answerAcknowledges(self):
        """
        A backend reply the dialogue answers with a command is acknowledged
        by that command (the ACK goes with it): no separate ACK is asked of
        the kernel (one system call per such read). The greeting, answered
        by the login, is the only read before the login's reply.
        """
        acknowledged: list[object] = []
        original = _backend.acknowledgeNow

        def acknowledgeNow(transport: object) -> None:
            acknowledged.append(transport)
            original(transport)

        self.patch(_backend, "acknowledgeNow", acknowledgeNow)
        server = yield self.login("imap", self.GREETING, imapScript(), IMAPBackendLogin, forward="none")
        self.assertReads(server, [b"P1"])
        self.assertEqual(acknowledged, [])

    @inlineCallbacks
    def test_loginWithLiterals(self):
        """
        Without SASL-IR, LOGIN with non-synchronizing literals (LITERAL+)
        still goes in the one write with ID.
        """
        caps = IMAP_CAPS.replace(b"SASL-IR ", b"")
        greeting = b"* OK [CAPABILITY " + caps + b"] ready.\r\n"
        server = yield self.login("imap", greeting, imapScript(caps), IMAPBackendLogin)
        self.assertEqual(len(server.reads), 1)
        self.assertIn(b"P2 LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n", server.reads[0])

    @inlineCallbacks
    def test_masterUser(self):
        """
        A master user login is AUTHENTICATE PLAIN with an authorization
        identity: one round trip with ID.
        """
        server = yield self.login("imap", self.GREETING, imapScript(), IMAPBackendLogin, master=True)
        self.assertReads(server, [b"P1 | P2"])

    @inlineCallbacks
    def test_proxyHeader(self):
        """
        A PROXY v1 header is one read of its own; the login one more.
        """
        server = yield self.login("imap", self.GREETING, imapScript(), IMAPBackendLogin, forward="proxy-v1")
        self.assertReads(server, [b"PROXY", b"P1"])

    @inlineCallbacks
    def test_startTLS(self):
        """
        With STARTTLS: STARTTLS, then CAPABILITY (what was said in clear is
        forgotten), then ID with the login.
        """
        server = yield self.login("imap", self.GREETING, imapScript(), IMAPBackendLogin, tls="starttls")
        self.assertReads(server, [b"P1", b"P2", b"P3 | P4"])
        self.assertIn(b"CAPABILITY", server.reads[1])


class SieveRoundTripTests(RoundTripTestsMixin, TestCase):
    """
    ManageSieve: XCLIENT and AUTHENTICATE in one write.
    """

    @inlineCallbacks
    def test_xclient(self):
        """
        Against Dovecot trusting the proxy: one round trip, XCLIENT and
        AUTHENTICATE together.
        """
        server = yield self.login("sieve", SIEVE_GREETING, sieveScript(), SieveBackendLogin)
        self.assertReads(server, [b"XCLIENT | AUTHENTICATE"])

    @inlineCallbacks
    def test_noForwarding(self):
        """
        With C{forward = "none"}: AUTHENTICATE alone.
        """
        server = yield self.login("sieve", SIEVE_GREETING, sieveScript(), SieveBackendLogin, forward="none")
        self.assertReads(server, [b"AUTHENTICATE"])

    @inlineCallbacks
    def test_masterUser(self):
        """
        A master user: still one round trip.
        """
        server = yield self.login("sieve", SIEVE_GREETING, sieveScript(), SieveBackendLogin, master=True)
        self.assertReads(server, [b"XCLIENT | AUTHENTICATE"])

    @inlineCallbacks
    def test_proxyHeader(self):
        """
        A PROXY v1 header is one read of its own; the login one more.
        """
        server = yield self.login("sieve", SIEVE_GREETING, sieveScript(), SieveBackendLogin, forward="proxy-v1")
        self.assertReads(server, [b"PROXY", b"AUTHENTICATE"])

    @inlineCallbacks
    def test_startTLS(self):
        """
        With STARTTLS: STARTTLS, then (the capabilities sent again after
        the handshake) XCLIENT with AUTHENTICATE.
        """
        server = yield self.login(
            "sieve", SIEVE_GREETING, sieveScript(), SieveBackendLogin, tls="starttls",
            afterTLS=SIEVE_GREETING,
        )  # fmt: skip
        self.assertReads(server, [b"STARTTLS", b"XCLIENT | AUTHENTICATE"])


class SMTPRoundTripTests(RoundTripTestsMixin, TestCase):
    """
    ESMTP: XCLIENT resets the session, so EHLO follows its reply (Postfix
    calls an EHLO pipelined behind XCLIENT "improper command pipelining").
    """

    GREETING = b"220 mx.test ESMTP Postfix\r\n"

    def smtpLogin(self, **kwargs: object) -> Deferred[ScriptedServer]:
        return self.login(
            "smtp", self.GREETING, smtpScript(), SMTPBackendLogin, hostname="proxy.test",
            helo="client.example", **kwargs,
        )  # fmt: skip

    @inlineCallbacks
    def test_xclient(self):
        """
        Against Postfix trusting the proxy: EHLO, XCLIENT, EHLO with the
        client's name, AUTH.
        """
        server = yield self.smtpLogin()
        self.assertReads(server, [b"EHLO", b"XCLIENT", b"EHLO", b"AUTH"])

    @inlineCallbacks
    def test_noForwarding(self):
        """
        With C{forward = "none"}: EHLO, AUTH.
        """
        server = yield self.smtpLogin(forward="none")
        self.assertReads(server, [b"EHLO", b"AUTH"])

    @inlineCallbacks
    def test_proxyHeader(self):
        """
        A PROXY v2 header is one read of its own before the greeting.
        """
        server = yield self.smtpLogin(forward="proxy-v2")
        self.assertReads(server, [b"EHLO", b"AUTH"], header=True)

    @inlineCallbacks
    def test_startTLS(self):
        """
        With STARTTLS: EHLO, STARTTLS, EHLO inside TLS, then XCLIENT, EHLO,
        AUTH.
        """
        server = yield self.smtpLogin(tls="starttls")
        self.assertReads(server, [b"EHLO", b"STARTTLS", b"EHLO", b"XCLIENT", b"EHLO", b"AUTH"])

    @inlineCallbacks
    def test_xclientRemembered(self):
        """
        A first connection asks with EHLO and remembers the XCLIENT
        attributes offered; a later one sends XCLIENT right after the
        greeting: XCLIENT, EHLO with the client's name, AUTH.
        """
        remembered: list[list[str] | None] = []
        server = yield self.smtpLogin(rememberXCLIENT=remembered.append)
        self.assertReads(server, [b"EHLO", b"XCLIENT", b"EHLO", b"AUTH"])
        self.assertEqual(remembered, [SMTP_XCLIENT_ATTRIBUTES])
        server = yield self.smtpLogin(knownXCLIENT=remembered[0], rememberXCLIENT=remembered.append)
        self.assertReads(server, [b"XCLIENT", b"EHLO", b"AUTH"])
        self.assertTrue(server.reads[0].startswith(b"XCLIENT PROTO=ESMTP HELO=client.example PORT=50000 "))
        self.assertTrue(server.reads[1].startswith(b"EHLO client.example\r\n"))
        self.assertEqual(len(remembered), 1)

    @inlineCallbacks
    def test_authAfterXCLIENTWhenKnown(self):
        """
        A backend whose XCLIENT attributes and EHLO keywords an earlier
        login learned: XCLIENT (with the client's EHLO name and protocol),
        then AUTH at once, no EHLO: two reads.
        """
        learned: list[Extensions] = []
        server = yield self.smtpLogin(learn=learned.append)
        self.assertReads(server, [b"EHLO", b"XCLIENT", b"EHLO", b"AUTH"])
        server = yield self.smtpLogin(knownXCLIENT=SMTP_XCLIENT_ATTRIBUTES, knownExtensions=learned[0])
        self.assertReads(server, [b"XCLIENT", b"AUTH"])
        self.assertTrue(server.reads[0].startswith(b"XCLIENT PROTO=ESMTP HELO=client.example "))

    @inlineCallbacks
    def test_authWithoutEHLORefused(self):
        """
        A backend that wants the EHLO after XCLIENT refuses the AUTH sent
        without it (503): the proxy sends the EHLO, with the client's
        name, and the AUTH again, and the login succeeds.
        """
        greeted = []

        def answer(line: bytes) -> tuple[bytes, bool]:
            command = line.split(b" ")[0].upper()
            if command == b"XCLIENT":
                greeted.clear()
            elif command == b"EHLO":
                greeted.append(line)
            elif command == b"AUTH" and not greeted:
                return b"503 5.5.1 Error: send HELO/EHLO first\r\n", False
            return smtpScript()(line)

        learned: list[Extensions] = []
        yield self.smtpLogin(learn=learned.append)
        server = yield self.login(
            "smtp", self.GREETING, answer, SMTPBackendLogin, hostname="proxy.test", helo="client.example",
            knownXCLIENT=SMTP_XCLIENT_ATTRIBUTES, knownExtensions=learned[0],
        )  # fmt: skip
        self.assertReads(server, [b"XCLIENT", b"AUTH", b"EHLO", b"AUTH"])
        self.assertTrue(server.reads[2].startswith(b"EHLO client.example\r\n"))

    @inlineCallbacks
    def test_xclientKnownRefused(self):
        """
        A backend that no longer offers XCLIENT refuses the one sent
        without asking: the proxy forgets it, asks with EHLO and logs in
        without forwarding (C{forward = "auto"}).
        """
        remembered: list[list[str] | None] = []
        noXCLIENT = SMTP_EHLO.replace(b"250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n", b"")

        def answer(line: bytes) -> tuple[bytes, bool]:
            command = line.split(b" ")[0].upper()
            if command == b"EHLO":
                return noXCLIENT, False
            if command == b"XCLIENT":
                return b"550 5.7.0 Error: insufficient authorization\r\n", False
            return smtpScript()(line)

        server = yield self.login(
            "smtp", self.GREETING, answer, SMTPBackendLogin, hostname="proxy.test", helo="client.example",
            knownXCLIENT=SMTP_XCLIENT_ATTRIBUTES, rememberXCLIENT=remembered.append,
        )  # fmt: skip
        self.assertReads(server, [b"XCLIENT", b"EHLO", b"AUTH"])
        self.assertTrue(server.reads[1].startswith(b"EHLO proxy.test\r\n"))
        self.assertEqual(remembered, [None])

    @inlineCallbacks
    def test_xclientKnownStartTLS(self):
        """
        Where STARTTLS comes first, XCLIENT waits for TLS and the EHLO
        inside it, known or not.
        """
        server = yield self.smtpLogin(tls="starttls", knownXCLIENT=SMTP_XCLIENT_ATTRIBUTES)
        self.assertReads(server, [b"EHLO", b"STARTTLS", b"EHLO", b"XCLIENT", b"EHLO", b"AUTH"])
