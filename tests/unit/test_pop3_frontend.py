"""
The POP3 front end and its backend login, over in-memory transports.

The client is a L{TLSStringTransport}; the backend is another, whose
replies the tests write by hand in Dovecot's dialect.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from base64 import b64decode, b64encode

from attrs import evolve
from twisted.logger import globalLogPublisher
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.config import Limits
from mailproxy.model import Rejection, Route, TLSInfo
from mailproxy._backend import LoginJob
from mailproxy._outcomes import FailureKind
from mailproxy.model import ClientInfo, Credentials
from mailproxy.pop3._backend import CAPA_KEPT, CapabilityMemory, POP3BackendLogin
from mailproxy.testing import FakeRouter, makeBackend

from .frontendhelpers import FrontendTestsMixin

GREETING = b"+OK [XCLIENT] Dovecot ready.\r\n"
PLAIN_GREETING = b"+OK Dovecot ready.\r\n"
CAPA = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"
CAPA_USER_ONLY = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nUSER\r\n.\r\n"
PIPELINED_CAPA = b"+OK\r\nCAPA\r\nPIPELINING\r\nUSER\r\n.\r\n"
BASIC_CAPS = b"+OK Capability list follows\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"

AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
UNAVAILABLE = b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later.\r\n"
PLAINTEXT_DISALLOWED = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"


class POP3FrontendTestsMixin(FrontendTestsMixin):
    """
    Helpers: a POP3 front end with a fake router and an in-memory backend.
    """

    protocol = "pop3"

    def build(
        self,
        tls: str = "none",
        limits: Limits | None = None,
        backend=None,
        digestAuth: bool = False,
        **routeArgs,
    ) -> None:
        self.backend = backend or makeBackend("old")
        self.connect(
            FakeRouter({"alice": Route(self.backend, **routeArgs)}), tls=tls, limits=limits, digestAuth=digestAuth
        )

    def sendLogin(self, data: bytes = b"USER alice\r\nPASS secret\r\n") -> None:
        """
        Send C{data} (a login) as the client and forget the replies to the
        commands before it, so that the client's next reply stands alone.
        """
        self.send(data)
        self.client.clear()

    def credentials(self, index: int = 0):
        """
        The credentials of the router's C{index}-th request.
        """
        return self.router.requests[index].credentials

    def xclient(self, transport: bytes = b"insecure") -> bytes:
        """
        The XCLIENT command the proxy sends for the default client.
        """
        session = self.frontend.client.sessionId.encode("ascii")
        return (
            b"XCLIENT ADDR=192.0.2.10 PORT=50000 SESSION=" + session + b" TTL=5 CLIENT-TRANSPORT=" + transport
            + b" DESTADDR=192.0.2.1 DESTPORT=" + (b"993" if transport == b"TLS" else b"143") + b"\r\n"
        )


class GreetingAndCapaTests(POP3FrontendTestsMixin, SynchronousTestCase):
    """
    What a client learns before logging in.
    """

    def test_greeting(self) -> None:
        """
        Without digest mechanisms the greeting has no APOP timestamp.
        """
        self.build()
        self.assertEqual(self.greeting, b"+OK proxy.test POP3 proxy ready.\r\n")

    def test_greetingTimestamp(self) -> None:
        """
        With digest mechanisms the greeting ends with an APOP timestamp in
        msg-id form, different on every connection.
        """
        self.build(digestAuth=True)
        first = self.greeting
        self.build(digestAuth=True)
        pattern = re.compile(rb"\+OK proxy\.test POP3 proxy ready\. (<[0-9a-f]{24}\.0@proxy\.test>)\r\n\Z")
        self.assertRegex(first, pattern)
        self.assertRegex(self.greeting, pattern)
        self.assertNotEqual(first, self.greeting)
        self.assertEqual(pattern.match(self.greeting).group(1), self.frontend.timestamp)

    def test_capaOnStartTLSPort(self) -> None:
        """
        Before TLS on a STARTTLS port, CAPA offers STLS, USER and SASL PLAIN
        and LOGIN.
        """
        self.build(tls="starttls")
        self.assertEqual(self.send(b"CAPA\r\n"), BASIC_CAPS + b"STLS\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n")

    def test_capaStartTLSRequired(self) -> None:
        """
        Before TLS on a starttls-required port, CAPA offers STLS and no way
        to log in; after STLS, USER and SASL and no STLS.
        """
        self.build(tls="starttls-required")
        self.assertEqual(self.send(b"CAPA\r\n"), BASIC_CAPS + b"STLS\r\n.\r\n")
        self.send(b"STLS\r\n")
        self.assertEqual(self.send(b"CAPA\r\n"), BASIC_CAPS + b"USER\r\nSASL PLAIN LOGIN\r\n.\r\n")

    def test_capaImplicitWithDigest(self) -> None:
        """
        Over implicit TLS with digest mechanisms on, CAPA offers CRAM-MD5
        and no STLS.
        """
        self.build(tls="implicit", digestAuth=True)
        self.assertEqual(self.send(b"capa\r\n"), BASIC_CAPS + b"USER\r\nSASL PLAIN LOGIN CRAM-MD5\r\n.\r\n")

    def test_bareAuthListsMechanisms(self) -> None:
        """
        C{AUTH} without arguments lists the usable mechanisms, one per line;
        none before TLS on a starttls-required port.
        """
        self.build(tls="starttls", digestAuth=True)
        self.assertEqual(self.send(b"AUTH\r\n"), b"+OK\r\nPLAIN\r\nLOGIN\r\nCRAM-MD5\r\n.\r\n")
        self.build(tls="starttls-required")
        self.assertEqual(self.send(b"AUTH\r\n"), b"+OK\r\n.\r\n")

    def test_noopAndQuit(self) -> None:
        """
        NOOP succeeds; QUIT says goodbye and closes.
        """
        self.build()
        self.assertEqual(self.send(b"NOOP\r\n"), b"+OK\r\n")
        self.assertEqual(self.send(b"QUIT\r\n"), b"+OK Logging out.\r\n")
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.frontend.result, "logged out")

    def test_unknownAndTransactionCommands(self) -> None:
        """
        Commands of the TRANSACTION state and unknown ones get C{-ERR}; a
        good command in between resets the count of bad ones.
        """
        self.build()
        self.assertEqual(self.send(b"STAT\r\n"), b"-ERR Command not permitted before authentication.\r\n")
        self.assertEqual(self.send(b"FROB\r\n"), b"-ERR Unknown command.\r\n")
        self.send(b"NOOP\r\n")
        self.assertEqual(self.send(b"RETR 1\r\nLIST\r\n"), b"-ERR Command not permitted before authentication.\r\n" * 2)
        self.assertFalse(self.client.disconnecting)

    def test_tooManyBadCommands(self) -> None:
        """
        Three bad commands in a row (an HTTP request, say) close the
        connection.
        """
        self.build()
        out = self.send(b"GET / HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nUSER alice\r\n")
        self.assertEqual(out, b"-ERR Unknown command.\r\n" * 3 + b"-ERR Too many invalid commands.\r\n")
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.router.requests, [])

    def test_clientXCLIENTRefused(self) -> None:
        """
        A client's own XCLIENT (or XOIP) is an unknown command: it can never
        reach a backend that trusts the proxy.
        """
        self.build()
        self.assertEqual(self.send(b"XCLIENT ADDR=10.0.0.1\r\n"), b"-ERR Unknown command.\r\n")
        self.assertEqual(self.send(b"XOIP 10.0.0.1\r\n"), b"-ERR Unknown command.\r\n")
        self.assertEqual(self.connector.protocols, [])

    def test_longLine(self) -> None:
        """
        A command line over 1024 octets gets C{-ERR} (before its end
        arrives) and the session goes on.
        """
        self.build()
        self.assertEqual(self.send(b"USER " + b"x" * 1100), b"-ERR Line too long.\r\n")
        self.assertEqual(self.send(b"x" * 1000 + b"\r\nNOOP\r\n"), b"+OK\r\n")

    def test_longPassword(self) -> None:
        """
        A PASS line of 1000 octets (as Dovecot takes directly) reaches the
        router with the whole password.
        """
        self.build()
        password = b"p" * 994
        self.send(b"USER alice\r\nPASS " + password + b"\r\n")
        [request] = self.router.requests
        self.assertEqual(request.credentials.password, password)
        self.assertFalse(self.client.disconnecting)

    def test_invalidOctets(self) -> None:
        """
        A line with NUL gets C{-ERR} and reaches no router.
        """
        self.build()
        self.assertEqual(self.send(b"USER alice\r\nPASS a\x00b\r\n"), b"+OK\r\n-ERR Invalid characters in line.\r\n")
        self.assertEqual(self.router.requests, [])


class StartTLSTests(POP3FrontendTestsMixin, SynchronousTestCase):
    """
    STLS towards the client.
    """

    def test_stls(self) -> None:
        """
        STLS is answered C{+OK} and TLS starts right after the reply.
        """
        self.build(tls="starttls")
        self.assertEqual(self.send(b"STLS\r\n"), b"+OK Begin TLS negotiation now.\r\n")
        self.assertIsNotNone(self.client.tlsOptions)
        self.assertEqual(self.client.writtenBeforeTLS, b"+OK Begin TLS negotiation now.\r\n")
        self.assertEqual(self.send(b"STLS\r\n"), b"-ERR TLS is already active.\r\n")

    def test_injectionDiscarded(self) -> None:
        """
        Commands pipelined in plaintext behind STLS are discarded, not
        executed after the handshake (CVE-2011-0411).
        """
        self.build(tls="starttls")
        out = self.send(b"STLS\r\nUSER alice\r\nPASS secret\r\n")
        self.assertEqual(out, b"+OK Begin TLS negotiation now.\r\n")
        self.assertEqual(self.router.requests, [])
        self.assertEqual(self.send(b"PASS secret\r\n"), b"-ERR No username given.\r\n")
        self.assertEqual(self.send(b"NOOP\r\n"), b"+OK\r\n")

    def test_userForgottenAfterSTLS(self) -> None:
        """
        A user name given before STLS does not count after it.
        """
        self.build(tls="starttls")
        self.send(b"USER alice\r\n")
        self.send(b"STLS\r\n")
        self.assertEqual(self.send(b"PASS secret\r\n"), b"-ERR No username given.\r\n")

    def test_stlsUnavailable(self) -> None:
        """
        STLS is refused on implicit TLS and plaintext-only ports, and with
        arguments.
        """
        self.build(tls="implicit")
        self.assertEqual(self.send(b"STLS\r\n"), b"-ERR TLS is already active.\r\n")
        self.build(tls="none")
        self.assertEqual(self.send(b"STLS\r\n"), b"-ERR STLS is not available on this port.\r\n")
        self.build(tls="starttls")
        self.assertEqual(self.send(b"STLS now\r\n"), b"-ERR STLS takes no arguments.\r\n")
        self.assertIsNone(self.client.tlsOptions)

    def test_loginRequiresTLS(self) -> None:
        """
        Before TLS on a starttls-required port, USER, PASS, AUTH and APOP
        are refused with C{[AUTH]} and the router is never asked.
        """
        self.build(tls="starttls-required", digestAuth=True)
        self.assertEqual(self.send(b"USER alice\r\n"), PLAINTEXT_DISALLOWED)
        self.assertEqual(self.send(b"PASS secret\r\n"), PLAINTEXT_DISALLOWED)
        self.assertEqual(self.send(b"AUTH PLAIN " + b64encode(b"\x00alice\x00secret") + b"\r\n"), PLAINTEXT_DISALLOWED)
        self.assertEqual(self.send(b"AUTH CRAM-MD5\r\n"), PLAINTEXT_DISALLOWED)
        self.assertEqual(
            self.send(b"APOP alice " + b"0" * 32 + b"\r\n"),
            b"-ERR [AUTH] Authentication disallowed on non-secure (SSL/TLS) connections.\r\n",
        )
        self.assertEqual(self.router.requests, [])
        self.assertFalse(self.client.disconnecting)


class LoginTests(POP3FrontendTestsMixin, SynchronousTestCase):
    """
    From the client's login command to the relay.
    """

    def test_userPass(self) -> None:
        """
        USER and PASS pipelined in one read reach the router as a LOGIN
        with the rest of the PASS line as password, spaces included.
        """
        self.build()
        self.assertEqual(self.send(b"USER alice\r\nPASS  se cret \r\n"), b"+OK\r\n")
        credentials = self.credentials()
        self.assertEqual(
            (credentials.mechanism, credentials.user, credentials.password), ("LOGIN", "alice", b" se cret ")
        )

    def test_userPassErrors(self) -> None:
        """
        USER needs a name, PASS needs a USER before it, and after a PASS the
        USER must be given again.
        """
        self.build()
        self.assertEqual(self.send(b"USER\r\n"), b"-ERR No username given.\r\n")
        self.assertEqual(self.send(b"PASS x\r\n"), b"-ERR No username given.\r\n")
        self.assertEqual(self.router.requests, [])

    def test_loginForwardsIdentityAndLogsIn(self) -> None:
        """
        After the greeting (which offers XCLIENT) and CAPA, the proxy sends
        XCLIENT with the client's addresses and AUTH PLAIN with an initial
        response, pipelined; the client gets the backend's C{+OK} verbatim.
        """
        self.build()
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.assertEqual(self.backendSays(GREETING), b"CAPA\r\n")
        sent = self.backendSays(CAPA)
        self.assertEqual(sent, self.xclient() + b"AUTH PLAIN " + b64encode(b"\x00alice\x00secret") + b"\r\n")
        self.assertEqual(self.client.value(), b"")
        self.backendSays(b"+OK Updated\r\n+OK Logged in.\r\n")
        self.assertEqual(self.client.value(), b"+OK Logged in.\r\n")

    def loginAgain(self) -> tuple[object, object]:
        """
        A second client connection logs in as alice, up to the backend's
        greeting.

        @return: its front end and its client transport.
        """
        frontend, client = self.connectAgain()
        frontend.dataReceived(b"USER alice\r\nPASS secret\r\n")
        client.clear()
        return frontend, client

    def test_capabilitiesRemembered(self) -> None:
        """
        The proxy remembers a backend's CAPA list for a minute: the next
        login there sends XCLIENT and the login right after the greeting,
        one round trip less. After the minute it asks again.
        """
        self.build()
        self.sendLogin()
        self.assertEqual(self.backendSays(GREETING), b"CAPA\r\n")
        self.backendSays(CAPA)
        self.backendSays(b"+OK Updated\r\n+OK Logged in.\r\n")
        frontend, client = self.loginAgain()
        login = b"AUTH PLAIN " + b64encode(b"\x00alice\x00secret") + b"\r\n"
        sent = self.backendSays(GREETING).split(b"\r\n")
        self.assertEqual(len(sent), 3)
        self.assertTrue(sent[0].startswith(b"XCLIENT ADDR=192.0.2.10 PORT=50001 "), sent)
        self.assertEqual(sent[1] + b"\r\n", login)
        self.backendSays(b"+OK Updated\r\n+OK Logged in.\r\n")
        self.assertEqual(client.value(), b"+OK Logged in.\r\n")
        self.clock.advance(60)
        self.loginAgain()
        self.assertEqual(self.backendSays(GREETING), b"CAPA\r\n")

    def test_rememberedListOutdated(self) -> None:
        """
        A login made by a remembered CAPA list that the server refuses
        asks CAPA again; if the server no longer offers the mechanism it
        went by, the proxy logs in the way the fresh list allows (without
        sending XCLIENT twice), and the client gets in.
        """
        self.build()
        self.sendLogin()
        self.backendSays(GREETING)
        self.backendSays(CAPA)
        self.backendSays(b"+OK Updated\r\n+OK Logged in.\r\n")
        frontend, client = self.loginAgain()
        self.assertTrue(self.backendSays(GREETING).startswith(b"XCLIENT "))
        sent = self.backendSays(b"+OK Updated\r\n-ERR Unsupported authentication mechanism.\r\n")
        self.assertEqual(sent, b"CAPA\r\n")
        self.assertEqual(self.backendSays(PIPELINED_CAPA), b"USER alice\r\nPASS secret\r\n")
        self.assertEqual(client.value(), b"")
        self.backendSays(b"+OK\r\n+OK Logged in.\r\n")
        self.assertEqual(client.value(), b"+OK Logged in.\r\n")
        # The fresh list is the one remembered now.
        self.loginAgain()
        self.assertTrue(self.backendSays(GREETING).endswith(b"USER alice\r\nPASS secret\r\n"))

    def test_rememberedRefusalStands(self) -> None:
        """
        A login made by a remembered CAPA list that the server refuses
        fails as any refused login, the password tried once: with a
        response code ([AUTH]: a wrong password) at once; without one
        (perhaps "no such mechanism") after a fresh CAPA list that still
        offers the mechanism the login used.
        """
        for refusal, capaAsked in ((b"-ERR [AUTH] Authentication failed.\r\n", False), (b"-ERR No.\r\n", True)):
            self.build(limits=Limits(failureDelay=0))
            self.sendLogin()
            self.backendSays(GREETING)
            self.backendSays(CAPA)
            self.backendSays(b"+OK Updated\r\n+OK Logged in.\r\n")
            frontend, client = self.loginAgain()
            self.backendSays(GREETING)
            sent = self.backendSays(b"+OK Updated\r\n" + refusal)
            if capaAsked:
                self.assertEqual(sent, b"CAPA\r\n")
                self.assertEqual(client.value(), b"")
                sent = self.backendSays(CAPA)
            self.assertEqual(sent, b"", refusal)
            self.assertEqual(client.value(), AUTH_FAILED)

    def test_capaInAnyPieces(self) -> None:
        """
        The CAPA list is read the same however it arrives: whole (then at
        once), or split anywhere, its lines upper-cased, a dot-stuffed line
        unstuffed, carriage returns before a line's end dropped. The proxy
        logs in as the list allows (AUTH PLAIN).
        """
        capa = b"+OK\r\nCAPA\r\n..x-dotted\r\nuser\nSASL PLAIN LOGIN\r\r\n.\r\n"
        for cut in range(len(capa) + 1):
            for pieces in ([capa[:cut], capa[cut:]], [capa[:cut], capa[cut:-1], capa[-1:]]):
                self.build()
                self.sendLogin(b"USER alice\r\nPASS secret\r\n")
                self.backendSays(GREETING)
                sent = b"".join(self.backendSays(piece) for piece in pieces if piece)
                login = self.xclient() + b"AUTH PLAIN " + b64encode(b"\x00alice\x00secret") + b"\r\n"
                self.assertEqual(sent, login, (cut, pieces))
                self.assertEqual(
                    self.connector.protocols[-1].capabilities, [b"CAPA", b".X-DOTTED", b"USER", b"SASL PLAIN LOGIN"]
                )

    def test_relayAndPipelining(self) -> None:
        """
        Commands the client pipelined behind PASS go to the backend after
        the hand-over, in order; backend bytes after its C{+OK} reach the
        client; then bytes flow unchanged both ways.
        """
        self.build()
        self.sendLogin(b"USER alice\r\nPASS secret\r\nSTAT\r\nLIST\r\n")
        self.backendSays(GREETING)
        self.backendSays(CAPA)
        backendTransport = self.connector.transports[-1]
        backendTransport.clear()
        self.backendSays(b"+OK Updated\r\n+OK Logged in.\r\n+OK 1 120\r\n")
        self.assertEqual(backendTransport.value(), b"STAT\r\nLIST\r\n")
        self.assertEqual(self.client.value(), b"+OK Logged in.\r\n+OK 1 120\r\n")
        backendTransport.clear()
        self.send(b"RETR 1\r\n")
        self.assertEqual(backendTransport.value(), b"RETR 1\r\n")

    def test_noXCLIENTUnlessOffered(self) -> None:
        """
        With C{forward = "auto"}, a greeting without C{[XCLIENT]} and a CAPA
        without XCLIENT get no XCLIENT; CAPA listing XCLIENT gets one.
        """
        self.build()
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(PLAIN_GREETING)
        self.assertEqual(self.backendSays(CAPA), b"AUTH PLAIN " + b64encode(b"\x00alice\x00secret") + b"\r\n")
        self.build()
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(PLAIN_GREETING)
        self.assertTrue(self.backendSays(CAPA.replace(b"TOP\r\n", b"XCLIENT\r\n")).startswith(b"XCLIENT ADDR="))

    def test_forwardXCLIENTAlways(self) -> None:
        """
        With C{forward = "xclient"} the proxy sends XCLIENT even when the
        server does not advertise it.
        """
        self.build(backend=makeBackend("old", forward="xclient"))
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(PLAIN_GREETING)
        self.assertTrue(self.backendSays(CAPA).startswith(self.xclient()))

    def test_forwardNone(self) -> None:
        """
        With C{forward = "none"} no XCLIENT is sent, even when offered.
        """
        self.build(backend=makeBackend("old", forward="none"))
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(GREETING)
        self.assertTrue(self.backendSays(CAPA).startswith(b"AUTH PLAIN "))

    def test_forwardProxyHeader(self) -> None:
        """
        With C{forward = "proxy-v1"} the connection starts with a PROXY
        header, and no XCLIENT follows even when offered.
        """
        self.build(backend=makeBackend("old", forward="proxy-v1"))
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.assertEqual(
            self.connector.transports[-1].value(), b"PROXY TCP4 192.0.2.10 192.0.2.1 50000 143\r\n"
        )
        self.backendSays(GREETING)
        self.assertTrue(self.backendSays(CAPA).startswith(b"AUTH PLAIN "))

    def test_xclientWithTLSAndServerName(self) -> None:
        """
        XCLIENT says the client used TLS and names the server name it asked
        for.
        """
        self.build(tls="implicit")
        self.frontend.client = evolve(self.frontend.client, tls=TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", "pop.example.org"))
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(GREETING)
        sent = self.backendSays(CAPA)
        self.assertTrue(
            sent.startswith(self.xclient(b"TLS").rstrip(b"\r\n") + b" DESTNAME=pop.example.org\r\n"), sent
        )

    def test_xclientRefused(self) -> None:
        """
        A backend that refuses XCLIENT, or ignores it because the proxy is
        not trusted, fails the login as temporary (it would count every
        client as the proxy), and the reason is logged.
        """
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for reply in (b"-ERR Invalid parameters", b"+OK You are not from trusted IP - ignoring"):
            self.build(backend=makeBackend("old", forward="xclient"))
            self.sendLogin()
            self.backendSays(PLAIN_GREETING)
            self.backendSays(CAPA)
            self.backendSays(reply + b"\r\n+OK Logged in.\r\n")
            self.assertEqual(self.client.value(), UNAVAILABLE)
            self.assertTrue(self.connector.transports[-1].disconnecting)
        self.assertTrue(any("login_trusted_networks" in str(event.get("detail", "")) for event in events))

    def test_userPassToBackendPipelined(self) -> None:
        """
        A backend without SASL PLAIN but with PIPELINING gets USER and PASS
        in one write.
        """
        self.build(backend=makeBackend("old", forward="none"))
        self.sendLogin(b"USER alice\r\nPASS s3 cret\r\n")
        self.backendSays(PLAIN_GREETING)
        self.assertEqual(self.backendSays(PIPELINED_CAPA), b"USER alice\r\nPASS s3 cret\r\n")
        self.backendSays(b"+OK\r\n+OK Logged in.\r\n")
        self.assertEqual(self.client.value(), b"+OK Logged in.\r\n")

    def test_userPassToBackendLockstep(self) -> None:
        """
        Without PIPELINING, PASS waits for the reply to USER.
        """
        self.build(backend=makeBackend("old", forward="none"))
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(PLAIN_GREETING)
        self.assertEqual(self.backendSays(CAPA_USER_ONLY), b"USER alice\r\n")
        self.assertEqual(self.backendSays(b"+OK\r\n"), b"PASS secret\r\n")
        self.backendSays(b"+OK Logged in.\r\n")
        self.assertEqual(self.client.value(), b"+OK Logged in.\r\n")

    def test_backendWithoutCAPA(self) -> None:
        """
        A backend that answers CAPA with C{-ERR} (RFC 1939 only) gets USER,
        then PASS.
        """
        self.build(backend=makeBackend("old", forward="none"))
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(PLAIN_GREETING)
        self.assertEqual(self.backendSays(b"-ERR Unknown command\r\n"), b"USER alice\r\n")
        self.assertEqual(self.backendSays(b"+OK\r\n"), b"PASS secret\r\n")

    def test_masterUserSASL(self) -> None:
        """
        A route with C{useMaster} logs in with AUTH PLAIN, the master user as
        authentication identity and the account as authorization identity.
        """
        self.build(backend=makeBackend("old", masterUser="proxy", masterPassword=b"masterpw", forward="none"), useMaster=True)
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(GREETING)
        self.assertEqual(self.backendSays(CAPA), b"AUTH PLAIN " + b64encode(b"alice\x00proxy\x00masterpw") + b"\r\n")

    def test_masterUserUSER(self) -> None:
        """
        Without SASL PLAIN, the master user logs in as C{user*master}.
        """
        self.build(backend=makeBackend("old", masterUser="proxy", masterPassword=b"masterpw", forward="none"), useMaster=True)
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(PLAIN_GREETING)
        self.assertEqual(self.backendSays(PIPELINED_CAPA), b"USER alice*proxy\r\nPASS masterpw\r\n")

    def test_rewrittenLogin(self) -> None:
        """
        A route's user and password replace the client's on the backend.
        """
        self.build(backend=makeBackend("old", forward="none"), user="alice.old", password=b"other pw")
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(PLAIN_GREETING)
        self.assertEqual(self.backendSays(PIPELINED_CAPA), b"USER alice.old\r\nPASS other pw\r\n")

    def test_rewrittenLoginWithLineBreak(self) -> None:
        """
        A route password with a line break cannot be sent: the login fails
        as unavailable, nothing is written.
        """
        self.build(backend=makeBackend("old", forward="none"), password=b"a\r\nDELE 1")
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(PLAIN_GREETING)
        self.assertEqual(self.backendSays(PIPELINED_CAPA), b"")
        self.assertEqual(self.client.value(), UNAVAILABLE)

    def test_longCredentialsUseContinuation(self) -> None:
        """
        When AUTH PLAIN with its initial response would pass 255 octets,
        the response goes on its own line after the server's C{+}.
        """
        self.build(backend=makeBackend("old", forward="none"))
        password = b"p" * 200
        self.sendLogin(b"USER alice\r\nPASS " + password + b"\r\n")
        self.backendSays(GREETING)
        self.assertEqual(self.backendSays(CAPA), b"AUTH PLAIN\r\n")
        self.assertEqual(self.backendSays(b"+ \r\n"), b64encode(b"\x00alice\x00" + password) + b"\r\n")
        self.backendSays(b"+OK Logged in.\r\n")
        self.assertEqual(self.client.value(), b"+OK Logged in.\r\n")

    def test_backendSTLS(self) -> None:
        """
        With C{tls = "starttls"} the proxy sends STLS first, writes nothing
        until the handshake has completed, then asks CAPA.
        """
        self.build(backend=makeBackend("old", tls="starttls"))
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.assertEqual(self.backendSays(GREETING), b"STLS\r\n")
        self.assertEqual(self.backendSays(b"+OK Begin TLS negotiation now.\r\n"), b"")
        transport = self.connector.transports[-1]
        self.assertIsNotNone(transport.tlsOptions)
        self.connector.protocols[-1].handshakeCompleted()
        self.assertEqual(transport.value(), b"CAPA\r\n")
        # The greeting's [XCLIENT] still counts after TLS.
        self.assertTrue(self.backendSays(CAPA).startswith(b"XCLIENT "))

    def test_backendSTLSInjection(self) -> None:
        """
        Bytes after the backend's STLS reply in the same read are an
        injection: the login fails as unavailable.
        """
        self.build(backend=makeBackend("old", tls="starttls"))
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(GREETING)
        self.backendSays(b"+OK Begin TLS\r\n+OK\r\nSASL PLAIN\r\n.\r\n")
        self.assertEqual(self.client.value(), UNAVAILABLE)

    def test_backendSTLSRefused(self) -> None:
        """
        A backend that refuses STLS gets no credentials.
        """
        self.build(backend=makeBackend("old", tls="starttls"))
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(GREETING)
        self.assertEqual(self.backendSays(b"-ERR TLS support isn't enabled.\r\n"), b"")
        self.assertEqual(self.client.value(), UNAVAILABLE)

    def test_backendImplicitTLS(self) -> None:
        """
        With C{tls = "implicit"} TLS starts at once, and the dialogue goes
        on after the greeting as in plaintext.
        """
        self.build(backend=makeBackend("old", tls="implicit"))
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        transport = self.connector.transports[-1]
        self.assertIsNotNone(transport.tlsOptions)
        self.connector.protocols[-1].handshakeCompleted()
        self.assertEqual(self.backendSays(GREETING), b"CAPA\r\n")


class SASLTests(POP3FrontendTestsMixin, SynchronousTestCase):
    """
    AUTH and APOP.
    """

    def test_plainInitialResponse(self) -> None:
        """
        AUTH PLAIN with an initial response; an authorization identity equal
        to the user is accepted.
        """
        self.build()
        self.assertEqual(self.send(b"AUTH PLAIN " + b64encode(b"alice\x00alice\x00s e\xc3\xa9") + b"\r\n"), b"")
        credentials = self.credentials()
        self.assertEqual(
            (credentials.mechanism, credentials.user, credentials.password), ("PLAIN", "alice", b"s e\xc3\xa9")
        )

    def test_plainContinuation(self) -> None:
        """
        AUTH PLAIN without an initial response gets an empty continuation
        and takes the response on the next line.
        """
        self.build()
        self.assertEqual(self.send(b"AUTH PLAIN\r\n"), b"+ \r\n")
        self.send(b64encode(b"\x00alice\x00secret") + b"\r\n")
        self.assertEqual(self.credentials().password, b"secret")

    def test_plainErrors(self) -> None:
        """
        An empty initial response (C{=}), a malformed PLAIN message and a
        foreign authorization identity are refused.
        """
        self.build()
        self.assertEqual(self.send(b"AUTH PLAIN =\r\n"), b"-ERR Invalid PLAIN response.\r\n")
        self.assertEqual(
            self.send(b"AUTH PLAIN " + b64encode(b"alice\x00secret") + b"\r\n"), b"-ERR Invalid PLAIN response.\r\n"
        )
        self.assertEqual(
            self.send(b"AUTH PLAIN " + b64encode(b"bob\x00alice\x00secret") + b"\r\n"),
            b"-ERR Authorization identity not supported.\r\n",
        )
        self.assertEqual(self.router.requests, [])

    def test_loginMechanism(self) -> None:
        """
        AUTH LOGIN prompts for the user name and the password; with an
        initial response (the user name) it prompts for the password only.
        """
        self.build()
        self.assertEqual(self.send(b"AUTH LOGIN\r\n"), b"+ " + b64encode(b"Username:") + b"\r\n")
        self.assertEqual(self.send(b64encode(b"alice") + b"\r\n"), b"+ " + b64encode(b"Password:") + b"\r\n")
        self.send(b64encode(b"secret") + b"\r\n")
        self.assertEqual((self.credentials().user, self.credentials().password), ("alice", b"secret"))
        self.build()
        self.assertEqual(
            self.send(b"auth login " + b64encode(b"alice") + b"\r\n"), b"+ " + b64encode(b"Password:") + b"\r\n"
        )

    def test_emptyInitialResponse(self) -> None:
        """
        C{=} is an empty initial response: for LOGIN, an empty user name.
        """
        self.build()
        self.send(b"AUTH LOGIN =\r\n")
        self.send(b64encode(b"pw") + b"\r\n")
        self.assertEqual(self.credentials().user, "")

    def test_cancel(self) -> None:
        """
        C{*} cancels an exchange with C{-ERR}; the session goes on.
        """
        self.build()
        self.send(b"AUTH PLAIN\r\n")
        self.assertEqual(self.send(b"*\r\n"), b"-ERR Authentication aborted by client.\r\n")
        self.send(b"AUTH LOGIN\r\n")
        self.send(b64encode(b"alice") + b"\r\n")
        self.assertEqual(self.send(b"*\r\n"), b"-ERR Authentication aborted by client.\r\n")
        self.assertEqual(self.send(b"NOOP\r\n"), b"+OK\r\n")
        self.assertEqual(self.router.requests, [])

    def test_badBase64(self) -> None:
        """
        Invalid base64, as initial response or on a continuation line, gets
        C{-ERR}.
        """
        self.build()
        self.assertEqual(self.send(b"AUTH PLAIN !!!!\r\n"), b"-ERR Invalid base64 data.\r\n")
        self.send(b"AUTH PLAIN\r\n")
        self.assertEqual(self.send(b"AGFsaWNl!\r\n"), b"-ERR Invalid base64 data.\r\n")
        self.assertEqual(self.send(b"NOOP\r\n"), b"+OK\r\n")

    def test_mechanismErrors(self) -> None:
        """
        Unknown mechanisms, CRAM-MD5 without digest mechanisms enabled, and
        too many arguments are refused.
        """
        self.build()
        self.assertEqual(self.send(b"AUTH GSSAPI\r\n"), b"-ERR Unsupported authentication mechanism.\r\n")
        self.assertEqual(self.send(b"AUTH CRAM-MD5\r\n"), b"-ERR Unsupported authentication mechanism.\r\n")
        self.assertEqual(
            self.send(b"AUTH PLAIN a b\r\n"), b"-ERR AUTH takes a mechanism and an optional initial response.\r\n"
        )

    def test_longSASLLines(self) -> None:
        """
        An AUTH line longer than 255 octets is accepted; a continuation line
        over 12 KiB is refused and ends the exchange.
        """
        self.build()
        password = b"p" * 400
        self.send(b"AUTH PLAIN " + b64encode(b"\x00alice\x00" + password) + b"\r\n")
        self.assertEqual(self.credentials().password, password)
        self.build()
        self.send(b"AUTH PLAIN\r\n")
        self.assertEqual(self.send(b"A" * 13000 + b"\r\n"), b"-ERR Line too long.\r\n")
        self.assertEqual(self.send(b"NOOP\r\n"), b"+OK\r\n")

    def test_cramMD5(self) -> None:
        """
        AUTH CRAM-MD5 sends a fresh challenge; the router gets the challenge
        and the client's digest, which proves the password.
        """
        self.build(digestAuth=True)
        reply = self.send(b"AUTH CRAM-MD5\r\n")
        self.assertTrue(reply.startswith(b"+ ") and reply.endswith(b"\r\n"), reply)
        challenge = b64decode(reply[2:-2])
        self.assertRegex(challenge, rb"\A<[0-9a-f]{24}\.0@proxy\.test>\Z")
        self.assertNotEqual(challenge, self.frontend.timestamp)
        digest = hmac.new(b"secret", challenge, hashlib.md5).hexdigest().upper().encode()
        self.send(b64encode(b"alice " + digest) + b"\r\n")
        credentials = self.credentials()
        self.assertEqual(
            (credentials.mechanism, credentials.user, credentials.challenge, credentials.password),
            ("CRAM-MD5", "alice", challenge, None),
        )
        self.assertTrue(credentials.check(b"secret"))
        self.assertFalse(credentials.check(b"wrong"))

    def test_cramMD5Errors(self) -> None:
        """
        CRAM-MD5 takes no initial response and needs C{user digest}.
        """
        self.build(digestAuth=True)
        self.assertEqual(self.send(b"AUTH CRAM-MD5 YWJj\r\n"), b"-ERR CRAM-MD5 takes no initial response.\r\n")
        self.send(b"AUTH CRAM-MD5\r\n")
        self.assertEqual(self.send(b64encode(b"alice nothex") + b"\r\n"), b"-ERR Invalid CRAM-MD5 response.\r\n")
        self.assertEqual(self.router.requests, [])

    def test_apop(self) -> None:
        """
        APOP gives the router the greeting's timestamp and the digest
        (lower-cased), which proves the password; the route's password is
        what the backend gets.
        """
        self.build(digestAuth=True, password=b"backend pw")
        digest = hashlib.md5(self.frontend.timestamp + b"secret").hexdigest().upper().encode()
        self.send(b"APOP alice " + digest + b"\r\n")
        credentials = self.credentials()
        self.assertEqual(
            (credentials.mechanism, credentials.user, credentials.challenge, credentials.response),
            ("APOP", "alice", self.frontend.timestamp, digest.lower()),
        )
        self.assertTrue(credentials.check(b"secret"))
        self.backendSays(PLAIN_GREETING)
        self.assertEqual(self.backendSays(CAPA), b"AUTH PLAIN " + b64encode(b"\x00alice\x00backend pw") + b"\r\n")

    def test_apopWithoutBackendPassword(self) -> None:
        """
        A route without a password for a digest login cannot log in to the
        backend: C{[SYS/TEMP]}, no backend contacted.
        """
        self.build(digestAuth=True)
        self.send(b"APOP alice " + b"0" * 32 + b"\r\n")
        self.assertEqual(self.client.value(), UNAVAILABLE)
        self.assertEqual(self.connector.protocols, [])

    def test_apopErrors(self) -> None:
        """
        APOP is refused when digest mechanisms are off, and with malformed
        parameters.
        """
        self.build()
        self.assertEqual(self.send(b"APOP alice " + b"0" * 32 + b"\r\n"), b"-ERR APOP is not enabled.\r\n")
        self.build(digestAuth=True)
        for line in (b"APOP\r\n", b"APOP alice\r\n", b"APOP alice " + b"g" * 32 + b"\r\n", b"APOP " + b"0" * 32 + b"\r\n"):
            self.assertEqual(self.send(line), b"-ERR Invalid APOP parameters.\r\n")
        self.assertEqual(self.router.requests, [])


class FailureTests(POP3FrontendTestsMixin, SynchronousTestCase):
    """
    Everything that can go wrong during login.
    """

    def login(self) -> None:
        """
        Log in as alice and bring the backend to the login reply.
        """
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(GREETING)
        self.backendSays(CAPA)
        self.client.clear()

    def test_wrongPasswordIsDelayedAndRetryable(self) -> None:
        """
        A backend C{-ERR [AUTH]} becomes the generic failure, only after the
        failed-login delay; the client may try again.
        """
        self.build(limits=Limits(failureDelay=2.0))
        self.login()
        self.backendSays(b"+OK Updated\r\n-ERR [AUTH] Authentication failed.\r\n")
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(2.0)
        self.assertEqual(self.client.value(), AUTH_FAILED)
        self.assertEqual(self.send(b"PASS secret\r\n"), b"-ERR No username given.\r\n")
        self.send(b"USER alice\r\nPASS secret\r\n")
        # After one failure the next login waits one delay before it is
        # routed.
        self.assertEqual(len(self.connector.protocols), 1)
        self.clock.advance(2.0)
        self.assertEqual(len(self.connector.protocols), 2)

    def test_backendWordingHidden(self) -> None:
        """
        A backend C{-ERR} without a code, or with one the proxy does not pass
        on, gets the generic failure: no backend wording can tell accounts
        apart.
        """
        for reply in (b"-ERR No such user here\r\n", b"-ERR [UTF8] odd\r\n"):
            self.build(limits=Limits(failureDelay=0))
            self.login()
            self.backendSays(b"+OK Updated\r\n" + reply)
            self.assertEqual(self.client.value(), AUTH_FAILED)

    def test_endlessCapaList(self) -> None:
        """
        A backend whose CAPA list never ends is a temporary failure once it
        has sent more lines than any server has capabilities, not a list
        the proxy keeps growing until C{backend_timeout}.
        """
        self.build()
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(GREETING)
        self.client.clear()
        self.backendSays(b"+OK\r\n" + b"X-CAPABILITY\r\n" * 1000)
        self.assertEqual(self.client.value(), UNAVAILABLE)
        self.assertTrue(self.connector.transports[-1].disconnecting)

    def test_userRefusedByBackend(self) -> None:
        """
        A C{-ERR} to USER (pipelined with PASS) fails the login at once.
        """
        self.build(backend=makeBackend("old", forward="none"), limits=Limits(failureDelay=0))
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(PLAIN_GREETING)
        self.backendSays(PIPELINED_CAPA)
        self.backendSays(b"-ERR [AUTH] Plaintext authentication disallowed.\r\n")
        self.assertEqual(self.client.value(), AUTH_FAILED)

    def test_unknownUserLooksLikeWrongPassword(self) -> None:
        """
        A router rejection gives the same reply as a wrong password, and no
        backend is contacted.
        """
        self.build(limits=Limits(failureDelay=1.0))
        self.send(b"USER nobody\r\nPASS secret\r\n")
        self.clock.advance(1.0)
        self.assertEqual(self.client.value(), b"+OK\r\n" + AUTH_FAILED)
        self.assertEqual(self.connector.protocols, [])

    def test_temporaryRejection(self) -> None:
        """
        A temporary router rejection says C{[SYS/TEMP]} with its text, at
        once.
        """
        self.build()
        self.router.answers["alice"] = Rejection("Directory down\r\n", temporary=True)
        self.assertEqual(self.send(b"USER alice\r\nPASS secret\r\n"), b"+OK\r\n-ERR [SYS/TEMP] Directory down\r\n")

    def test_rejectionTextSevenBit(self) -> None:
        """
        A router's refusal text with 8-bit characters reaches the client
        as 7-bit ASCII.
        """
        self.build()
        self.router.answers["alice"] = Rejection("Verzeichnis gest\u00f6rt", temporary=True)
        self.assertEqual(self.send(b"USER alice\r\nPASS secret\r\n"), b"+OK\r\n-ERR [SYS/TEMP] Verzeichnis gestort\r\n")

    def test_endlessCapaReply(self) -> None:
        """
        A backend whose CAPA list never ends fails the login as temporary
        ([SYS/TEMP]) once it sent 256 KiB, and is disconnected.
        """
        self.build()
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(GREETING)
        self.backendSays(b"+OK\r\n")
        self.client.clear()
        line = b"X-CAPABILITY " + b"Y" * 100 + b"\r\n"
        self.assertFloodBounded(self.floodBackend(line), line, UNAVAILABLE)

    def test_backendTemporaryFailure(self) -> None:
        """
        A backend C{-ERR [SYS/TEMP]} gives the client the proxy's own
        temporary failure, without delay.
        """
        self.build(limits=Limits(failureDelay=5.0))
        self.login()
        self.backendSays(b"+OK Updated\r\n-ERR [SYS/TEMP] Auth server down\r\n")
        self.assertEqual(self.client.value(), UNAVAILABLE)

    def test_backendCodesPassedOn(self) -> None:
        """
        C{[IN-USE]}, C{[LOGIN-DELAY]} and C{[SYS/PERM]} refusals reach the
        client as the backend wrote them, without delay.
        """
        for reply in (
            b"-ERR [IN-USE] Mailbox is locked by another POP3 session.",
            b"-ERR [LOGIN-DELAY] Too soon.",
            b"-ERR [SYS/PERM] Mailbox is corrupt.",
        ):
            self.build(limits=Limits(failureDelay=5.0))
            self.login()
            self.backendSays(b"+OK Updated\r\n" + reply + b"\r\n")
            self.assertEqual(self.client.value(), reply + b"\r\n")
            self.assertFalse(self.client.disconnecting)
        # 8-bit text in such a line reaches the client 7-bit.
        self.build()
        self.login()
        self.backendSays(b"+OK Updated\r\n-ERR [IN-USE] Postfach gesperrt f\xc3\xbcr \xff\r\n")
        self.assertEqual(self.client.value(), b"-ERR [IN-USE] Postfach gesperrt fur ?\r\n")

    def test_growingDelayAndClose(self) -> None:
        """
        The n-th failure waits n times the delay; after the limit the
        connection closes after the C{-ERR}, with nothing more.
        """
        self.build(limits=Limits(failureDelay=1.0, loginFailures=3))
        for attempt in (1, 2):
            self.send(b"USER nobody\r\nPASS x\r\n")
            self.clock.advance(attempt - 0.5)
            self.assertEqual(self.client.value(), b"+OK\r\n")
            self.clock.advance(0.5)
            self.assertEqual(self.client.value(), b"+OK\r\n" + AUTH_FAILED)
        self.send(b"USER nobody\r\nPASS x\r\n")
        self.clock.advance(3.0)
        self.assertEqual(self.client.value(), b"+OK\r\n" + AUTH_FAILED)
        self.assertTrue(self.client.disconnecting)

    def test_deadBackend(self) -> None:
        """
        A backend that cannot be reached gives C{[SYS/TEMP]} at once.
        """
        self.build()
        self.connector.refuse = True
        self.assertEqual(self.send(b"USER alice\r\nPASS secret\r\n"), b"+OK\r\n" + UNAVAILABLE)
        self.assertEqual(self.send(b"NOOP\r\n"), b"+OK\r\n")

    def test_silentBackendTimesOut(self) -> None:
        """
        A backend that never greets is given up after the backend timeout.
        """
        self.build(limits=Limits(backendTimeout=5))
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.client.clear()
        self.clock.advance(5)
        self.assertEqual(self.client.value(), UNAVAILABLE)
        self.assertTrue(self.connector.transports[-1].disconnecting)

    def test_rudeBackend(self) -> None:
        """
        A backend greeting with C{-ERR}, answering the login with nonsense,
        or sending an endless line gives C{[SYS/TEMP]}.
        """
        self.build()
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.client.clear()
        self.backendSays(b"-ERR [SYS/TEMP] Max connections reached\r\n")
        self.assertEqual(self.client.value(), UNAVAILABLE)
        self.build()
        self.login()
        self.backendSays(b"+OK Updated\r\n* what?\r\n")
        self.assertEqual(self.client.value(), UNAVAILABLE)
        self.build()
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.client.clear()
        self.backendSays(b"+OK " + b"x" * 9000)
        self.assertEqual(self.client.value(), UNAVAILABLE)

    def test_backendClosesDuringLogin(self) -> None:
        """
        A backend that closes the connection during the login gives
        C{[SYS/TEMP]}.
        """
        self.build()
        self.login()
        self.connector.protocols[-1].connectionLost(None)
        self.assertEqual(self.client.value(), UNAVAILABLE)

    def test_preauthTimeout(self) -> None:
        """
        A client that does not log in within the pre-auth timeout gets
        C{-ERR} and is disconnected.
        """
        self.build(limits=Limits(preauthTimeout=30))
        self.clock.advance(30)
        self.assertEqual(self.client.value(), b"-ERR Disconnected for inactivity.\r\n")
        self.assertTrue(self.client.disconnecting)

    def test_connectionsPerAddress(self) -> None:
        """
        Connections beyond the per-address limit get C{-ERR} instead of the
        greeting.
        """
        self.build(limits=Limits(connectionsPerAddress=1))
        _, transport = self.connectAgain()
        self.assertEqual(transport.value(), b"-ERR Too many connections from your address.\r\n")
        self.assertTrue(transport.disconnecting)

    def test_clientLeavesDuringLogin(self) -> None:
        """
        A client that disconnects while the backend login runs makes the
        proxy drop the backend connection.
        """
        self.build()
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.frontend.connectionLost(None)
        transport = self.connector.transports[-1]
        self.assertTrue(transport.disconnected or transport.disconnecting)

    def test_passwordNeverLogged(self) -> None:
        """
        Neither failed nor successful logins by PASS, AUTH PLAIN or APOP put
        the password or the digest in a log event.
        """
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.build(digestAuth=True, password=b"Sup3rSecretPw")
        self.send(b"USER alice\r\nPASS Sup3rSecretPw\r\n")
        self.backendSays(GREETING)
        self.backendSays(CAPA)
        self.backendSays(b"+OK Updated\r\n-ERR [AUTH] no\r\n")
        self.clock.advance(10)
        digest = hashlib.md5(self.frontend.timestamp + b"Sup3rSecretPw").hexdigest()
        self.send(b"APOP alice " + digest.encode() + b"\r\n")
        # The CAPA list is remembered from the first login.
        self.backendSays(GREETING)
        self.backendSays(b"+OK Updated\r\n+OK Logged in.\r\n")
        self.frontend.connectionLost(None)
        self.assertTrue(events)
        for event in events:
            text = repr(event)
            self.assertNotIn("Sup3rSecretPw", text)
            self.assertNotIn(digest, text)
            self.assertNotIn(b64encode(b"\x00alice\x00Sup3rSecretPw").decode(), text)


class RelayTests(POP3FrontendTestsMixin, SynchronousTestCase):
    """
    The relay after login.
    """

    def loggedIn(self, limits: Limits | None = None) -> None:
        self.build(limits=limits)
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(GREETING)
        self.backendSays(CAPA)
        self.backendSays(b"+OK Updated\r\n+OK Logged in.\r\n")
        self.client.clear()

    def test_bothWays(self) -> None:
        """
        After login, bytes pass unchanged both ways, even commands the front
        end refuses before login.
        """
        self.loggedIn()
        backendTransport = self.connector.transports[-1]
        backendTransport.clear()
        self.send(b"STAT\r\nRETR 1\r\n")
        self.assertEqual(backendTransport.value(), b"STAT\r\nRETR 1\r\n")
        self.connector.protocols[-1].dataReceived(b"+OK 1 5\r\n+OK 5 octets\r\nHi\r\n\r\n.\r\n")
        self.assertEqual(self.client.value(), b"+OK 1 5\r\n+OK 5 octets\r\nHi\r\n\r\n.\r\n")

    def test_xclientRefused(self) -> None:
        """
        XCLIENT after login never reaches the backend: the client gets the
        proxy's C{-ERR} after the backend's replies to the commands before
        it (a message body included, whatever its lines look like), and
        commands after it go on.
        """
        self.loggedIn()
        backendTransport = self.connector.transports[-1]
        backendTransport.clear()
        self.send(b"RETR 1\r\nXCLIENT ADDR=1.2.3.4 LOGIN=bob\r\nxoip 1.2.3.4\r\nSTAT\r\n")
        self.assertEqual(backendTransport.value(), b"RETR 1\r\n")
        self.assertEqual(self.client.producerState, "paused")
        backend = self.connector.protocols[-1]
        backend.dataReceived(b"+OK 21 octets\r\n-ERR\r\n+OK\r\n..\r\n")
        self.assertEqual(self.client.value(), b"+OK 21 octets\r\n-ERR\r\n+OK\r\n..\r\n")
        backend.dataReceived(b".\r\n")
        self.assertEqual(
            self.client.value(),
            b"+OK 21 octets\r\n-ERR\r\n+OK\r\n..\r\n.\r\n" + b"-ERR Insufficient authorization.\r\n" * 2,
        )
        self.assertEqual(backendTransport.value(), b"RETR 1\r\nSTAT\r\n")
        self.assertEqual(self.client.producerState, "producing")

    def test_loginCommandsRefused(self) -> None:
        """
        A second login (USER, PASS, APOP, AUTH) and STLS after login are
        answered by the proxy, in order after the backend's listing; a
        line over the limit too.
        """
        self.loggedIn()
        backendTransport = self.connector.transports[-1]
        backendTransport.clear()
        self.send(b"LIST\r\nUSER bob\r\nPASS x\r\nAPOP bob 0123\r\nAUTH PLAIN\r\nSTLS\r\nNOOP " + b"x" * 1100 + b"\r\n")
        self.assertEqual(backendTransport.value(), b"LIST\r\n")
        self.connector.protocols[-1].dataReceived(b"+OK 1 messages\r\n1 5\r\n.\r\n")
        self.assertEqual(
            self.client.value(),
            b"+OK 1 messages\r\n1 5\r\n.\r\n" + b"-ERR Already logged in.\r\n" * 5 + b"-ERR Line too long.\r\n",
        )

    def test_idleTimeout(self) -> None:
        """
        A session silent in both directions for the idle timeout is closed
        with C{-ERR}.
        """
        self.loggedIn(Limits(idleTimeout=600))
        self.clock.advance(600)
        self.assertEqual(self.client.value(), b"-ERR Idle timeout.\r\n")
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.connector.transports[-1].disconnecting)

    def test_backendCloseClosesClient(self) -> None:
        """
        When the backend goes away (after QUIT, say), the client connection
        is closed too.
        """
        self.loggedIn()
        self.connector.protocols[-1].connectionLost(None)
        self.assertTrue(self.client.disconnecting)


class PipelinedLoginTests(POP3FrontendTestsMixin, SynchronousTestCase):
    """
    Logins pipelined in one read, each refused at once.
    """

    def test_manyImmediateFailures(self) -> None:
        """
        Every one of hundreds of pipelined logins that fail without delay
        (a temporary refusal) is answered: handling one failure does not
        nest the command loop once more per login until the stack runs out.
        """
        self.build()
        self.router.default = Rejection("Directory down", temporary=True)
        out = self.send(b"USER nobody\r\nPASS x\r\n" * 400 + b"NOOP\r\n")
        self.assertEqual(out, b"+OK\r\n-ERR [SYS/TEMP] Directory down\r\n" * 400 + b"+OK\r\n")


class BackendTextTests(POP3FrontendTestsMixin, SynchronousTestCase):
    """
    The backend's reply to the login reaches the client as one safe line.
    """

    def test_okLineControl(self) -> None:
        """
        A bare CR or other control character in the backend's C{+OK} becomes
        a space, and the line is bounded.
        """
        self.build()
        self.sendLogin(b"USER alice\r\nPASS secret\r\n")
        self.backendSays(GREETING)
        self.backendSays(CAPA)
        self.backendSays(b"+OK Updated\r\n+OK Logged in.\r+OK\x00injected" + b"x" * 600 + b"\r\n")
        line = self.client.value()
        self.assertTrue(line.startswith(b"+OK Logged in. +OK injected"), line)
        self.assertEqual(line.count(b"\r"), 1)
        self.assertLessEqual(len(line), 512)


class CapabilityMemoryTests(SynchronousTestCase):
    """
    The memory of backends' CAPA lists: how long it keeps one, and how
    many.
    """

    def test_kept(self) -> None:
        """
        A list is given back for C{CAPA_KEPT} seconds after it was read,
        then not; nor if the clock went back.
        """
        memory = CapabilityMemory()
        memory.keep("a", [b"USER"], 100.0)
        self.assertEqual(memory.get("a", 100.0), [b"USER"])
        self.assertEqual(memory.get("a", 100.0 + CAPA_KEPT - 0.5), [b"USER"])
        self.assertIsNone(memory.get("a", 100.0 + CAPA_KEPT))
        self.assertIsNone(memory.get("a", 99.0))
        self.assertIsNone(memory.get("b", 100.0))
        memory.forget("a")
        self.assertIsNone(memory.get("a", 100.0))

    def test_bounded(self) -> None:
        """
        It keeps at most its size of lists: the oldest read goes first.
        """
        memory = CapabilityMemory(size=3)
        for key in "abcd":
            memory.keep(key, [key.encode()], 0.0)
        self.assertEqual([memory.get(key, 0.0) for key in "abcd"], [None, [b"b"], [b"c"], [b"d"]])
        memory.keep("b", [b"B"], 1.0)
        memory.keep("e", [b"e"], 1.0)
        self.assertEqual([memory.get(key, 1.0) for key in "bcde"], [[b"B"], None, [b"d"], [b"e"]])


class RememberedCapabilitiesTests(SynchronousTestCase):
    """
    The POP3 backend login going by a remembered CAPA list, when the list
    turns out to be out of date, driven line by line.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.memory = CapabilityMemory()
        self.backend = makeBackend("old", forward="none")

    def login(self, lines: list[bytes], token: bool = False) -> tuple[POP3BackendLogin, list[bytes], list]:
        """
        A login (alice's password, or her OAUTHBEARER token passed on) at
        a server that sends C{lines}, one read each.

        @return: the dialogue, what it wrote after each read, and its
            outcome (empty while there is none).
        """
        credentials = Credentials("OAUTHBEARER", "alice", token=b"tok") if token else Credentials("PLAIN", "alice", password=b"pw")
        client = ClientInfo(sessionId="s", address="192.0.2.10", port=50000, localAddress="192.0.2.1", localPort=110)
        job = LoginJob(
            route=Route(self.backend), protocol="pop3", client=client, credentials=credentials,
            user="alice", password=None if token else b"pw",
        )  # fmt: skip
        dialogue = POP3BackendLogin(job, self.clock, 10, self.memory)
        transport = StringTransport()
        dialogue.makeConnection(transport)
        outcome: list = []
        dialogue.result.addBoth(outcome.append)
        sent = []
        for line in lines:
            dialogue.dataReceived(line)
            sent.append(transport.value())
            transport.clear()
        return dialogue, sent, outcome

    def remember(self, capa: bytes) -> None:
        # A first login reads the list (USER and PASS one by one, without
        # SASL PLAIN or PIPELINING).
        replies = [b"+OK in\r\n"] if b"SASL PLAIN" in capa else [b"+OK\r\n", b"+OK in\r\n"]
        _, _, outcome = self.login([b"+OK hi\r\n", capa, *replies])
        self.assertIsInstance(outcome[0], POP3BackendLogin)

    def assertFailed(self, outcome: list, kind: FailureKind) -> None:
        self.assertEqual(len(outcome), 1)
        self.assertIsInstance(outcome[0], Failure)
        self.assertEqual(outcome[0].value.kind, kind)

    def test_tokenMechanismOfferedSince(self) -> None:
        """
        A token login whose mechanism the remembered list lacks asks CAPA
        again (once) and logs in if the fresh list offers it.
        """
        self.remember(b"+OK\r\nSASL PLAIN\r\n.\r\n")
        _, sent, outcome = self.login([b"+OK hi\r\n", b"+OK\r\nSASL PLAIN OAUTHBEARER\r\n.\r\n"], token=True)
        self.assertEqual(sent[0], b"CAPA\r\n")
        self.assertTrue(sent[1].startswith(b"AUTH OAUTHBEARER "), sent)
        self.assertEqual(outcome, [])

    def test_tokenMechanismStillMissing(self) -> None:
        """
        If the fresh list lacks it too, the login fails as temporary.
        """
        self.remember(b"+OK\r\nSASL PLAIN\r\n.\r\n")
        _, sent, outcome = self.login([b"+OK hi\r\n", b"+OK\r\nSASL PLAIN\r\n.\r\n"], token=True)
        self.assertEqual(sent, [b"CAPA\r\n", b""])
        self.assertFailed(outcome, FailureKind.UNAVAILABLE)

    def test_userPassRefusalStands(self) -> None:
        """
        A USER/PASS login refused without a code stands even when the fresh
        list offers SASL PLAIN now: USER/PASS was not refused for want of a
        mechanism, and the password is not tried a second time.
        """
        self.remember(b"+OK\r\nUSER\r\n.\r\n")
        _, sent, outcome = self.login(
            [b"+OK hi\r\n", b"+OK\r\n", b"-ERR Authentication failed.\r\n", b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n"]
        )
        self.assertEqual(sent, [b"USER alice\r\n", b"PASS pw\r\n", b"CAPA\r\n", b""])
        self.assertFailed(outcome, FailureKind.AUTH)

    def test_closedAfterRefusal(self) -> None:
        """
        A server that closes the connection after refusing the login
        (before the fresh CAPA list) has refused it: the failure is the
        refusal, not an unavailable backend.
        """
        self.remember(b"+OK\r\nSASL PLAIN\r\n.\r\n")
        dialogue, sent, outcome = self.login([b"+OK hi\r\n", b"-ERR Authentication failed.\r\n"])
        self.assertEqual(sent[1], b"CAPA\r\n")
        self.assertEqual(outcome, [])
        dialogue.connectionLost(Failure(ConnectionDone()))
        self.assertFailed(outcome, FailureKind.AUTH)
