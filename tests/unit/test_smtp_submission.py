"""
The ESMTP submission front end and its backend login, over in-memory
transports.

The client is a L{TLSStringTransport}; the backend is another, whose
replies the tests write by hand in Postfix's dialect.
"""

from __future__ import annotations

from base64 import b64decode, b64encode
import hmac
import hashlib
import sys

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailproxy._contract import ILoginFrontend
from mailproxy._outcomes import EndReason
from mailproxy.config import Limits
from mailproxy.model import Backend, ClientInfo, Rejection, Route
from mailproxy.smtp._backend import xclientAttributes, xclientCommands
from mailproxy.smtp._ehlo import Extensions
from mailproxy.smtp._base import backendExtensions
from mailproxy.testing import FakeRouter, MemoryConnector, makeBackend, makeFrontend

from .frontendhelpers import FrontendTestsMixin

GREETING = b"220 old.test ESMTP Postfix\r\n"
XCLIENT_ATTRIBUTES = b"NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT"
POSTFIX_EHLO = (
    b"250-old.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n"
    b"250-STARTTLS\r\n250-XCLIENT " + XCLIENT_ATTRIBUTES + b"\r\n"
    b"250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n"
    b"250-SMTPUTF8\r\n250 CHUNKING\r\n"
)
#: What the proxy sends as XCLIENT for the default client of makeFrontend.
XCLIENT = (
    b"XCLIENT PROTO=ESMTP HELO=client.example PORT=50000 DESTADDR=192.0.2.1 DESTPORT=143 "
    b"REVERSE_NAME=[UNAVAILABLE] NAME=[UNAVAILABLE] ADDR=192.0.2.10\r\n"
)
KEYWORDS = Extensions(
    {
        "PIPELINING": "",
        "SIZE": "10240000",
        "8BITMIME": "",
        "ENHANCEDSTATUSCODES": "",
        "SMTPUTF8": "",
        "DSN": "",
        "CHUNKING": "",
        "XCLIENT": "ADDR",
    }
)


def plain(user: bytes, password: bytes, authzid: bytes = b"") -> bytes:
    """
    A PLAIN response, base64-encoded.
    """
    return b64encode(authzid + b"\0" + user + b"\0" + password)


class SubmissionTestsMixin(FrontendTestsMixin):
    """
    Helpers: a submission front end with a fake router, in-memory
    backends, and the backends' extensions already known.
    """

    protocol = "smtp"

    def build(
        self,
        tls: str = "none",
        limits: Limits | None = None,
        backend: Backend | None = None,
        extensions: Extensions = KEYWORDS,
        router: object = None,
        digestAuth: bool = False,
        **routeArgs: object,
    ) -> None:
        self.backend = backend or makeBackend("old", ports={"smtp": 587}, forward="xclient")
        self.connect(
            router or FakeRouter({"alice": Route(self.backend, **routeArgs)}),  # type: ignore[arg-type]
            tls=tls,
            limits=limits,
            mode="submission",
            digestAuth=digestAuth,
        )
        self.frontend.context.backends[self.backend.name] = self.backend
        backendExtensions(self.frontend.context, "smtp").learn(self.backend.name, extensions)

    def ehlo(self) -> bytes:
        """
        Greet with EHLO; return the reply.
        """
        return self.send(b"EHLO client.example\r\n")

    def toXCLIENT(self, command: bytes = b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n") -> None:
        """
        Log in with C{command} and play the backend up to its reply to
        XCLIENT.
        """
        self.ehlo()
        self.send(command)
        self.assertEqual(self.backendSays(GREETING), b"EHLO proxy.test\r\n")
        self.assertEqual(self.backendSays(POSTFIX_EHLO), XCLIENT)
        self.assertEqual(self.backendSays(GREETING), b"EHLO client.example\r\n")


class GreetingAndEHLOTests(SubmissionTestsMixin, SynchronousTestCase):
    """
    What a client sees before it logs in.
    """

    def test_greeting(self) -> None:
        """
        The greeting names the proxy.
        """
        _, client, _ = makeFrontend("smtp", FakeRouter(), mode="submission")
        self.assertEqual(client.value(), b"220 proxy.test ESMTP mailproxy\r\n")

    def test_contract(self) -> None:
        """
        The submission front end implements the protocol side of the
        core's contract for a front end whose clients log in.
        """
        frontend, _, _ = makeFrontend("smtp", FakeRouter(), mode="submission")
        self.assertTrue(verifyObject(ILoginFrontend, frontend))

    def test_ehloBeforeTLS(self) -> None:
        """
        Before TLS on a STARTTLS-required port: the common extensions and
        STARTTLS, no AUTH, never the backend's XCLIENT.
        """
        self.build(tls="starttls-required")
        self.assertEqual(
            self.ehlo(),
            b"250-proxy.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-STARTTLS\r\n"
            b"250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-DSN\r\n250 CHUNKING\r\n",
        )

    def test_ehloAfterTLS(self) -> None:
        """
        After STARTTLS: AUTH PLAIN LOGIN, no STARTTLS.
        """
        self.build(tls="starttls-required")
        self.ehlo()
        self.assertEqual(self.send(b"STARTTLS\r\n"), b"220 2.0.0 Ready to start TLS\r\n")
        self.assertIsNotNone(self.client.tlsOptions)
        reply = self.ehlo()
        self.assertIn(b"250-AUTH PLAIN LOGIN\r\n", reply)
        self.assertNotIn(b"STARTTLS", reply)

    def test_ehloAtOnce(self) -> None:
        """
        With every backend's keywords known, an EHLO is answered at once:
        no Deferred is made for it, and each session's reply lists the
        same keywords.
        """
        self.build()
        made: list[Deferred[object]] = []
        original = Deferred.__init__

        def counting(d: Deferred[object], *args: object, **kwargs: object) -> None:
            made.append(d)
            original(d, *args, **kwargs)  # type: ignore[arg-type]

        self.patch(Deferred, "__init__", counting)
        expected = (
            b"250-proxy.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-AUTH PLAIN LOGIN\r\n"
            b"250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-DSN\r\n250 CHUNKING\r\n"
        )
        self.assertEqual(self.ehlo(), expected)
        self.assertEqual(self.send(b"EHLO again.example\r\n"), expected)
        self.assertEqual(made, [])

    def test_authOfferedInPlaintextWhenAllowed(self) -> None:
        """
        On a port with optional STARTTLS, AUTH is offered before TLS; with
        C{digest_auth} CRAM-MD5 too.
        """
        self.build(tls="starttls", digestAuth=True)
        reply = self.ehlo()
        self.assertIn(b"250-STARTTLS\r\n250-AUTH PLAIN LOGIN CRAM-MD5\r\n", reply)

    def test_helo(self) -> None:
        """
        HELO gets one line; EHLO and HELO need a name.
        """
        self.build()
        self.assertEqual(self.send(b"HELO client.example\r\n"), b"250 proxy.test\r\n")
        self.assertEqual(self.send(b"EHLO\r\n"), b"501 5.5.4 Syntax: EHLO hostname\r\n")
        self.assertEqual(self.send(b"HELO a b\r\n"), b"501 5.5.4 Syntax: HELO hostname\r\n")

    def test_simpleCommands(self) -> None:
        """
        NOOP, RSET, HELP, VRFY; EXPN and ETRN are not offered; XCLIENT from
        a client is refused; unknown commands get 500; QUIT closes.
        """
        self.build()
        self.assertEqual(self.send(b"NOOP\r\n"), b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.send(b"RSET\r\n"), b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.send(b"HELP\r\n"), b"214 2.0.0 See RFC 5321\r\n")
        self.assertEqual(
            self.send(b"VRFY alice\r\n"), b"252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"
        )
        self.assertEqual(self.send(b"EXPN staff\r\n"), b"502 5.5.1 Error: command not implemented\r\n")
        self.assertEqual(self.send(b"ETRN example.org\r\n"), b"502 5.5.1 Error: command not implemented\r\n")
        self.assertEqual(self.send(b"XCLIENT ADDR=10.0.0.1\r\n"), b"550 5.7.0 Error: insufficient authorization\r\n")
        self.assertEqual(self.send(b"FROB\r\n"), b"500 5.5.2 Error: command not recognized\r\n")
        self.assertEqual(self.send(b"\x00\r\n"), b"500 5.5.2 Error: bad syntax\r\n")
        self.assertEqual(self.send(b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")
        self.assertTrue(self.client.disconnecting)

    def test_lineTooLong(self) -> None:
        """
        An over-long command line gets 500 and the session goes on.
        """
        self.build()
        self.assertEqual(self.send(b"NOOP " + b"x" * 9000 + b"\r\nNOOP\r\n"), b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n")

    def test_tooManyErrors(self) -> None:
        """
        The twentieth error closes the connection with 421.
        """
        self.build()
        out = self.send(b"FROB\r\n" * 20)
        self.assertTrue(out.endswith(b"421 4.7.0 proxy.test Error: too many errors\r\n"), out[-80:])
        self.assertTrue(self.client.disconnecting)

    def test_httpRequestCloses(self) -> None:
        """
        An HTTP request (a cross-protocol attack) closes the connection at
        once.
        """
        self.build()
        self.assertEqual(self.send(b"GET / HTTP/1.1\r\nHost: x\r\n"), b"521 5.5.1 Protocol error\r\n")
        self.assertTrue(self.client.disconnecting)

    def test_pipelinedRepliesInOrder(self) -> None:
        """
        Commands pipelined in one chunk are answered in order.
        """
        self.build()
        self.assertEqual(
            self.send(b"NOOP\r\nEHLO client.example\r\nNOOP\r\n"),
            b"250 2.0.0 Ok\r\n250-proxy.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
            b"250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-DSN\r\n250 CHUNKING\r\n"
            b"250 2.0.0 Ok\r\n",
        )

    def test_dropped(self) -> None:
        """
        A session dropped from outside hears 421 with the reason; shutdown
        says 4.3.2 (service not available).
        """
        self.build()
        self.frontend.drop("Server shutting down.", EndReason.SHUTDOWN)
        self.assertEqual(self.client.value(), b"421 4.3.2 proxy.test Server shutting down.\r\n")
        self.assertTrue(self.client.disconnecting)

    def test_preauthTimeout(self) -> None:
        """
        A client that does not log in in time is told 421 and dropped.
        """
        self.build(limits=Limits(preauthTimeout=30))
        self.clock.advance(30)
        self.assertEqual(self.client.value(), b"421 4.4.2 proxy.test Disconnected for inactivity.\r\n")
        self.assertTrue(self.client.disconnecting)


class ProbeTests(SubmissionTestsMixin, SynchronousTestCase):
    """
    The first EHLO learns the backends' extensions when nothing is known.
    """

    def setUp(self) -> None:
        self.backend = makeBackend("old", ports={"smtp": 587}, forward="xclient")
        self.connector = MemoryConnector()
        self.frontend, self.client, self.clock = makeFrontend(
            "smtp", FakeRouter(), self.connector, mode="submission"
        )
        self.frontend.context.backends["old"] = self.backend
        self.client.clear()

    def test_ehloWaitsForProbe(self) -> None:
        """
        The EHLO is answered once the probe (greeting, EHLO, QUIT) has the
        backend's list; commands pipelined behind it wait their turn.
        """
        self.assertEqual(self.send(b"EHLO client.example\r\nNOOP\r\n"), b"")
        self.assertEqual(self.backendSays(GREETING), b"EHLO proxy.test\r\n")
        self.assertEqual(self.connector.protocols[0].job.client.sessionId[:6], "probe-")
        self.client.clear()
        self.assertEqual(self.backendSays(POSTFIX_EHLO), b"QUIT\r\n")
        self.assertTrue(self.connector.transports[0].disconnecting)
        self.assertEqual(
            self.client.value(),
            b"250-proxy.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-AUTH PLAIN LOGIN\r\n"
            b"250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-DSN\r\n250 CHUNKING\r\n250 2.0.0 Ok\r\n",
        )

    def test_probeFails(self) -> None:
        """
        While no backend can be asked, submission offers the proxy's own
        keywords (the login then gets the backend's temporary failure);
        only MX refuses the EHLO then.
        """
        self.connector.refuse = True
        self.assertEqual(self.send(b"EHLO client.example\r\n"), b"250-proxy.test\r\n250 AUTH PLAIN LOGIN\r\n")
        self.flushLoggedErrors()


class StartTLSTests(SubmissionTestsMixin, SynchronousTestCase):
    """
    STARTTLS towards the client.
    """

    def test_injectionDiscarded(self) -> None:
        """
        Commands pipelined in plaintext behind STARTTLS are discarded
        (CVE-2011-0411), and the EHLO before TLS is forgotten.
        """
        self.build(tls="starttls")
        self.ehlo()
        out = self.send(b"STARTTLS\r\nAUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.assertEqual(out, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(self.client.writtenBeforeTLS, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(self.router.requests, [])
        self.assertEqual(
            self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n"),
            b"503 5.5.1 Error: send HELO/EHLO first\r\n",
        )

    def test_refusals(self) -> None:
        """
        STARTTLS with arguments, twice, or where TLS is not offered.
        """
        self.build(tls="starttls")
        self.assertEqual(self.send(b"STARTTLS now\r\n"), b"501 5.5.4 Syntax: STARTTLS\r\n")
        self.send(b"STARTTLS\r\n")
        self.assertEqual(self.send(b"STARTTLS\r\n"), b"554 5.5.1 Error: TLS already active\r\n")
        self.build(tls="none")
        self.assertEqual(self.send(b"STARTTLS\r\n"), b"502 5.5.1 Error: command not implemented\r\n")

    def test_authBeforeTLS(self) -> None:
        """
        AUTH before TLS where TLS is required is refused; the router is not
        asked.
        """
        self.build(tls="starttls-required")
        self.ehlo()
        self.assertEqual(
            self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n"),
            b"530 5.7.0 Must issue a STARTTLS command first\r\n",
        )
        self.assertEqual(self.router.requests, [])


class MailBeforeAuthTests(SubmissionTestsMixin, SynchronousTestCase):
    """
    Mail commands before AUTH (RFC 6409 §4.3).
    """

    def test_mailRcptData(self) -> None:
        """
        MAIL, RCPT and DATA get 530 5.7.0.
        """
        self.build()
        self.ehlo()
        for command in (b"MAIL FROM:<a@b.example>", b"RCPT TO:<a@b.example>", b"DATA"):
            self.assertEqual(self.send(command + b"\r\n"), b"530 5.7.0 Authentication required\r\n")

    def test_bdatChunkSkipped(self) -> None:
        """
        A BDAT chunk before AUTH is skipped whole, then refused: its octets
        are never read as commands.
        """
        self.build()
        self.ehlo()
        self.assertEqual(self.send(b"BDAT 12\r\nQUIT\r\nQUIT"), b"")
        self.assertEqual(self.send(b"\r\nNOOP\r\n"), b"530 5.7.0 Authentication required\r\n250 2.0.0 Ok\r\n")
        self.assertFalse(self.client.disconnecting)

    def test_badBDAT(self) -> None:
        """
        A BDAT without a usable size ends the session: nobody can tell where
        its chunk would end.
        """
        self.build()
        self.assertEqual(
            self.send(b"BDAT lots\r\n"), b"421 4.7.0 proxy.test Error: bad BDAT syntax, closing connection\r\n"
        )
        self.assertTrue(self.client.disconnecting)


class AuthSyntaxTests(SubmissionTestsMixin, SynchronousTestCase):
    """
    AUTH commands that never reach the router.
    """

    def test_refusals(self) -> None:
        """
        AUTH before EHLO, without a mechanism, with an unknown or
        unoffered one, with bad base64.
        """
        self.build()
        self.assertEqual(self.send(b"AUTH PLAIN\r\n"), b"503 5.5.1 Error: send HELO/EHLO first\r\n")
        self.ehlo()
        self.assertEqual(self.send(b"AUTH\r\n"), b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n")
        self.assertEqual(self.send(b"AUTH GSSAPI\r\n"), b"504 5.5.4 Unrecognized authentication type\r\n")
        self.assertEqual(self.send(b"AUTH CRAM-MD5\r\n"), b"504 5.5.4 Unrecognized authentication type\r\n")
        self.assertEqual(self.send(b"AUTH PLAIN !!!\r\n"), b"501 5.5.2 Cannot decode response\r\n")
        self.assertEqual(self.router.requests, [])

    def test_cancel(self) -> None:
        """
        C{*} cancels an exchange.
        """
        self.build()
        self.ehlo()
        self.assertEqual(self.send(b"AUTH LOGIN\r\n"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(self.send(b"*\r\n"), b"501 5.7.0 Authentication aborted\r\n")
        self.assertEqual(self.send(b"NOOP\r\n"), b"250 2.0.0 Ok\r\n")

    def test_responseTooLong(self) -> None:
        """
        A response line over 12288 octets gets 500 5.5.6.
        """
        self.build()
        self.ehlo()
        self.send(b"AUTH PLAIN\r\n")
        self.assertEqual(
            self.send(b"A" * 13000 + b"\r\n"), b"500 5.5.6 Authentication Exchange line is too long\r\n"
        )

    def test_badResponses(self) -> None:
        """
        A PLAIN response without two NULs, an empty LOGIN user name and a
        CRAM-MD5 response without a digest are refused.
        """
        self.build(digestAuth=True)
        self.ehlo()
        self.assertEqual(self.send(b"AUTH PLAIN " + b64encode(b"alice") + b"\r\n"), b"501 5.5.2 Invalid PLAIN response\r\n")
        self.assertEqual(self.send(b"AUTH LOGIN =\r\n"), b"501 5.5.2 Invalid LOGIN response\r\n")
        self.assertTrue(self.send(b"AUTH CRAM-MD5\r\n").startswith(b"334 "))
        self.assertEqual(self.send(b64encode(b"alice nohex") + b"\r\n"), b"501 5.5.2 Invalid CRAM-MD5 response\r\n")
        self.assertEqual(self.send(b"AUTH CRAM-MD5 " + b64encode(b"x") + b"\r\n"), b"501 5.5.4 CRAM-MD5 takes no initial response\r\n")

    def test_authzidRefused(self) -> None:
        """
        Acting as another user (a PLAIN authzid) is refused.
        """
        self.build()
        self.ehlo()
        self.assertEqual(
            self.send(b"AUTH PLAIN " + plain(b"alice", b"secret", b"bob") + b"\r\n"),
            b"535 5.7.8 Authorization identity not supported\r\n",
        )


class LoginTests(SubmissionTestsMixin, SynchronousTestCase):
    """
    From the client's AUTH to the relay.
    """

    def test_plainWithBackendAuth(self) -> None:
        """
        AUTH PLAIN with an initial response: the backend gets EHLO,
        XCLIENT with the client's identity, EHLO with the client's name and
        AUTH PLAIN; the client gets 235 only after the backend's 235, and
        then talks to the backend.
        """
        self.build()
        self.toXCLIENT()
        self.assertEqual(self.client.value(), b"")
        self.assertEqual(self.backendSays(POSTFIX_EHLO), b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.assertEqual(self.client.value(), b"")
        self.backendSays(b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(self.client.value(), b"235 2.7.0 Authentication successful\r\n")
        request = self.router.requests[0]
        self.assertEqual((request.protocol, request.credentials.user), ("smtp", "alice"))
        self.assertEqual(self.send(b"MAIL FROM:<alice@example.org>\r\n"), b"")
        self.assertEqual(self.connector.transports[-1].value(), b"MAIL FROM:<alice@example.org>\r\n")

    def test_pipelinedAfterAuthForwarded(self) -> None:
        """
        Commands pipelined behind AUTH with an initial response are kept and
        reach the backend after the login, in order.
        """
        self.build()
        self.ehlo()
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
        self.backendSays(GREETING)
        self.backendSays(POSTFIX_EHLO)
        self.backendSays(GREETING)
        self.backendSays(POSTFIX_EHLO)
        self.assertEqual(self.client.value(), b"")
        self.assertEqual(
            self.backendSays(b"235 2.7.0 Ok\r\n"), b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
        )
        self.assertEqual(self.client.value(), b"235 2.7.0 Authentication successful\r\n")

    def test_plainChallenge(self) -> None:
        """
        AUTH PLAIN without an initial response gets an empty challenge.
        """
        self.build()
        self.ehlo()
        self.assertEqual(self.send(b"AUTH PLAIN\r\n"), b"334 \r\n")
        self.send(plain(b"alice", b"secret") + b"\r\n")
        self.assertEqual(self.router.requests[0].credentials.password, b"secret")

    def test_login(self) -> None:
        """
        AUTH LOGIN asks for the user name and password; with an initial
        response only for the password. The backend gets AUTH LOGIN when it
        has no PLAIN.
        """
        self.build()
        self.ehlo()
        self.assertEqual(self.send(b"AUTH LOGIN " + b64encode(b"alice") + b"\r\n"), b"334 UGFzc3dvcmQ6\r\n")
        self.send(b64encode(b"secret") + b"\r\n")
        self.backendSays(GREETING)
        self.backendSays(POSTFIX_EHLO)
        self.backendSays(GREETING)
        loginOnly = POSTFIX_EHLO.replace(b"AUTH PLAIN LOGIN", b"AUTH LOGIN")
        self.assertEqual(self.backendSays(loginOnly), b"AUTH LOGIN\r\n")
        self.assertEqual(self.backendSays(b"334 VXNlcm5hbWU6\r\n"), b64encode(b"alice") + b"\r\n")
        self.assertEqual(self.backendSays(b"334 UGFzc3dvcmQ6\r\n"), b64encode(b"secret") + b"\r\n")
        self.backendSays(b"235 2.7.0 Ok\r\n")
        self.assertEqual(self.client.value(), b"235 2.7.0 Authentication successful\r\n")

    def test_xclientLogin(self) -> None:
        """
        A route whose router checked the password: XCLIENT carries LOGIN
        and the backend needs no AUTH.
        """
        self.build(authenticated=True)
        self.ehlo()
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.backendSays(GREETING)
        xclient = self.backendSays(POSTFIX_EHLO)
        self.assertIn(b" LOGIN=alice ", xclient)
        self.assertEqual(self.backendSays(GREETING), b"EHLO client.example\r\n")
        self.assertEqual(self.backendSays(POSTFIX_EHLO), b"")
        self.assertEqual(self.client.value(), b"235 2.7.0 Authentication successful\r\n")

    def test_cramMD5(self) -> None:
        """
        CRAM-MD5 (with digest_auth) hands the router the challenge and the
        digest, which it can check against a stored password.
        """
        self.build(digestAuth=True, authenticated=True)
        self.ehlo()
        challenge = b64decode(self.send(b"AUTH CRAM-MD5\r\n")[4:].strip())
        self.assertTrue(challenge.startswith(b"<") and challenge.endswith(b"@proxy.test>"), challenge)
        digest = hmac.new(b"secret", challenge, hashlib.md5).hexdigest().encode()
        self.send(b64encode(b"alice " + digest) + b"\r\n")
        credentials = self.router.requests[0].credentials
        self.assertEqual((credentials.mechanism, credentials.challenge), ("CRAM-MD5", challenge))
        self.assertTrue(credentials.check(b"secret"))

    def test_masterUser(self) -> None:
        """
        A route with the master user logs in with PLAIN, the user as
        authorization identity.
        """
        backend = makeBackend(
            "old", ports={"smtp": 587}, forward="xclient", masterUser="proxy", masterPassword=b"mpw"
        )
        self.build(backend=backend, useMaster=True)
        self.toXCLIENT()
        self.assertEqual(self.backendSays(POSTFIX_EHLO), b"AUTH PLAIN " + plain(b"proxy", b"mpw", b"alice") + b"\r\n")

    def test_xclientOnlyAdvertisedAttributes(self) -> None:
        """
        Only attributes the backend listed are sent; IPv6 addresses get the
        IPV6: prefix; values are xtext.
        """
        self.backend = makeBackend("old", ports={"smtp": 587}, forward="xclient")
        self.router = FakeRouter({"alice": Route(self.backend)})
        self.connector = MemoryConnector()
        self.frontend, self.client, self.clock = makeFrontend(
            "smtp", self.router, self.connector, mode="submission", peer=("2001:db8::5", 40000)
        )
        from twisted.internet.address import IPv6Address

        # makeFrontend speaks IPv4: connect once more as an IPv6 client.
        self.client.peerAddress = IPv6Address("TCP", "2001:db8::5", 40000)
        self.client.unregisterProducer()  # connectionMade registers it again
        self.frontend.connectionMade()
        self.frontend.context.backends["old"] = self.backend
        backendExtensions(self.frontend.context, "smtp").learn("old", KEYWORDS)
        self.send(b"EHLO we+ird=name\r\nAUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.backendSays(GREETING)
        ehlo = POSTFIX_EHLO.replace(XCLIENT_ATTRIBUTES, b"ADDR HELO")
        self.assertEqual(self.backendSays(ehlo), b"XCLIENT HELO=we+2Bird+3Dname ADDR=IPV6:2001:db8::5\r\n")

    def test_proxyHeaderInsteadOfXCLIENT(self) -> None:
        """
        A backend that takes a PROXY header gets it first and no XCLIENT.
        """
        self.build(backend=makeBackend("old", ports={"smtp": 587}, forward="proxy-v1"))
        self.ehlo()
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.assertEqual(self.connector.transports[-1].value(), b"PROXY TCP4 192.0.2.10 192.0.2.1 50000 143\r\n")
        self.backendSays(GREETING)
        self.assertEqual(self.backendSays(POSTFIX_EHLO), b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")

    def test_backendStartTLS(self) -> None:
        """
        A STARTTLS backend: STARTTLS after the first EHLO, the list learned
        before TLS forgotten, EHLO again once the handshake is verified;
        bytes sent right after the 220 in clear fail the login.
        """
        self.build(backend=makeBackend("old", ports={"smtp": 587}, forward="xclient", tls="starttls"))
        self.ehlo()
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.backendSays(GREETING)
        self.assertEqual(self.backendSays(POSTFIX_EHLO), b"STARTTLS\r\n")
        self.assertEqual(self.backendSays(b"220 2.0.0 Ready to start TLS\r\n"), b"")
        self.assertIsNotNone(self.connector.transports[-1].tlsOptions)
        self.connector.transports[-1].clear()
        self.connector.protocols[-1].handshakeCompleted()
        self.assertEqual(self.connector.transports[-1].value(), b"EHLO proxy.test\r\n")
        self.assertEqual(self.backendSays(POSTFIX_EHLO.replace(b"250-STARTTLS\r\n", b"")), XCLIENT)

    def test_backendStartTLSInjection(self) -> None:
        """
        A reply injected behind the backend's 220 to STARTTLS fails the
        login as temporary.
        """
        self.build(backend=makeBackend("old", ports={"smtp": 587}, forward="xclient", tls="starttls"))
        self.ehlo()
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.backendSays(GREETING)
        self.backendSays(POSTFIX_EHLO)
        self.backendSays(b"220 2.0.0 Ready to start TLS\r\n235 2.7.0 Ok\r\n")
        self.assertEqual(self.client.value(), b"454 4.7.0 Temporary authentication failure\r\n")


class LoginFailureTests(SubmissionTestsMixin, SynchronousTestCase):
    """
    Every way a login fails, and what the client is told.
    """

    def test_backendRefusesCredentials(self) -> None:
        """
        The backend's 535 becomes 535 5.7.8 after the failure delay; the
        third failure closes the connection.
        """
        self.build(limits=Limits(failureDelay=1.0, loginFailures=3))
        for attempt in (1, 2, 3):
            self.toXCLIENT() if attempt == 1 else self._again(attempt - 1.0)
            self.backendSays(POSTFIX_EHLO)
            self.backendSays(b"535 5.7.8 Error: authentication failed: bad\r\n")
            self.assertEqual(self.client.value(), b"")
            # The n-th failure answered n delays after its AUTH, of which
            # the first n - 1 passed before it was routed.
            self.clock.advance(0.5)
            self.assertEqual(self.client.value(), b"")
            self.clock.advance(0.5)
            if attempt < 3:
                self.assertEqual(self.client.value(), b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual(
            self.client.value(),
            b"535 5.7.8 Authentication credentials invalid\r\n"
            b"421 4.7.0 proxy.test Error: too many failed authentication attempts\r\n",
        )
        self.assertTrue(self.client.disconnecting)

    def test_refusalThatClosesIsNotTooMany(self) -> None:
        """
        A refusal that closes the session before the limit (an auth_http
        answer without Auth-Wait) says goodbye without claiming too many
        attempts.
        """
        self.build(router=FakeRouter(default=Rejection(close=True)), limits=Limits(failureDelay=0, loginFailures=3))
        self.ehlo()
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.assertEqual(
            self.client.value(),
            b"535 5.7.8 Authentication credentials invalid\r\n421 4.7.0 proxy.test Closing connection.\r\n",
        )
        self.assertTrue(self.client.disconnecting)

    def _again(self, penalty: float = 0.0) -> None:
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        # After failures the login waits before it is routed.
        self.clock.advance(penalty)
        # The backend offered XCLIENT on the first connection: XCLIENT
        # follows the greeting, no EHLO before it.
        self.assertEqual(self.backendSays(GREETING)[:8], b"XCLIENT ")
        self.backendSays(GREETING)

    def test_routerRefuses(self) -> None:
        """
        An unknown account gets the same 535 as a wrong password.
        """
        self.build()
        self.ehlo()
        self.send(b"AUTH PLAIN " + plain(b"mallory", b"x") + b"\r\n")
        self.clock.advance(1)
        self.assertEqual(self.client.value(), b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual(self.connector.protocols, [])

    def test_routerTemporary(self) -> None:
        """
        A temporary refusal (a directory down) gets 454 4.7.0 at once.
        """
        self.build(router=FakeRouter(default=Rejection(message="Directory unavailable.", temporary=True)))
        self.ehlo()
        self.assertEqual(
            self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n"), b"454 4.7.0 Directory unavailable.\r\n"
        )

    def test_backendTemporary(self) -> None:
        """
        A 4xx to AUTH, a backend that cannot be reached, one without
        XCLIENT for the proxy, or one that refuses EHLO: 454 4.7.0.
        """
        self.build()
        self.toXCLIENT()
        self.backendSays(POSTFIX_EHLO)
        self.backendSays(b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(self.client.value(), b"454 4.7.0 Temporary authentication failure\r\n")
        self.connector.refuse = True
        self.assertEqual(
            self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n"),
            b"454 4.7.0 Temporary authentication failure\r\n",
        )
        self.connector.refuse = False
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.backendSays(GREETING)
        # It offered XCLIENT before: the proxy sends it unasked, and asks
        # with EHLO when it is refused.
        self.assertEqual(
            self.backendSays(b"550 5.7.0 Error: insufficient authorization\r\n"), b"EHLO proxy.test\r\n"
        )
        self.backendSays(POSTFIX_EHLO.replace(b"250-XCLIENT " + XCLIENT_ATTRIBUTES + b"\r\n", b""))
        self.assertEqual(self.client.value(), b"454 4.7.0 Temporary authentication failure\r\n")
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.backendSays(b"554 5.7.1 go away\r\n")
        self.assertEqual(self.client.value(), b"454 4.7.0 Temporary authentication failure\r\n")

    def test_clientRefusedAfterXCLIENT(self) -> None:
        """
        A backend that refuses the client once XCLIENT told it who the
        client is: its refusal is the client's answer.
        """
        self.build()
        self.ehlo()
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.backendSays(GREETING)
        self.backendSays(POSTFIX_EHLO)
        self.backendSays(b"554 5.7.1 Client host rejected: blocked\r\n")
        self.assertEqual(self.client.value(), b"554 5.7.1 Client host rejected: blocked\r\n")

    def test_xclientRefusedIsTemporary(self) -> None:
        """
        A backend that refuses the XCLIENT command itself (a value it
        cannot take, as an IPv6 address where its C{inet_protocols} leaves
        IPv6 out): a fault between proxy and backend, answered as a
        temporary failure, not with the backend's permanent reply.
        """
        self.build()
        self.ehlo()
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.backendSays(GREETING)
        self.backendSays(POSTFIX_EHLO)
        self.backendSays(b"501 5.5.4 Bad DESTADDR syntax: IPV6:::1\r\n")
        self.assertEqual(self.client.value(), b"454 4.7.0 Temporary authentication failure\r\n")

    def test_clientRefusedAtXCLIENTSentUnasked(self) -> None:
        """
        A backend known to offer XCLIENT gets it right after the greeting;
        if it refuses that XCLIENT and then the EHLO, the client is what it
        refuses: the client gets its refusal, as when XCLIENT was offered.
        """
        self.build()
        self.toXCLIENT()
        self.backendSays(POSTFIX_EHLO)
        self.backendSays(b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(self.client.value(), b"454 4.7.0 Temporary authentication failure\r\n")
        self.client.clear()
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.assertEqual(self.backendSays(GREETING)[:8], b"XCLIENT ")
        self.assertEqual(
            self.backendSays(b"554 5.7.1 Client host rejected: blocked\r\n"), b"EHLO proxy.test\r\n"
        )
        self.backendSays(b"503 5.5.0 Error: access denied for unknown[192.0.2.7]\r\n")
        self.assertEqual(self.client.value(), b"554 5.7.1 Client host rejected: blocked\r\n")

    def test_noUsableMechanism(self) -> None:
        """
        A backend offering neither PLAIN nor LOGIN (and no XCLIENT LOGIN for
        the route) fails the login as temporary.
        """
        self.build()
        self.toXCLIENT()
        self.backendSays(POSTFIX_EHLO.replace(b"AUTH PLAIN LOGIN", b"AUTH GSSAPI"))
        self.assertEqual(self.client.value(), b"454 4.7.0 Temporary authentication failure\r\n")

    def test_endlessEHLOReply(self) -> None:
        """
        A backend whose multi-line EHLO reply never ends fails the login as
        temporary once it sent 256 KiB, well before the reply's own limit
        of 200 lines of 16 KiB, and is disconnected.
        """
        self.build()
        self.ehlo()
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.backendSays(GREETING)
        self.client.clear()
        line = b"250-X-" + b"Y" * 8000 + b"\r\n"
        sent = self.floodBackend(line, limit=100 * len(line))
        self.assertFloodBounded(sent, line, b"454 4.7.0 Temporary authentication failure\r\n")

    def test_backendGarbage(self) -> None:
        """
        A backend that speaks no SMTP fails the login as temporary.
        """
        self.build()
        self.ehlo()
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.backendSays(b"* OK IMAP4rev1\r\n")
        self.assertEqual(self.client.value(), b"454 4.7.0 Temporary authentication failure\r\n")

    def test_backendTimeout(self) -> None:
        """
        A backend that does not answer in time fails the login.
        """
        self.build(limits=Limits(backendTimeout=5))
        self.ehlo()
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.clock.advance(5)
        self.assertEqual(self.client.value(), b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertTrue(self.connector.transports[-1].disconnecting)


class XCLIENTCommandTests(SynchronousTestCase):
    """
    L{xclientCommands}: the XCLIENT lines for a set of attributes.
    """

    def test_splitNameAndAddressLast(self) -> None:
        """
        Attributes that do not fit on one 512-octet line are split over
        several commands; NAME and ADDR come last.
        """
        attributes = xclientAttributes(
            ClientInfo("s", "192.0.2.10", 1, "192.0.2.1", 25), "h" * 250, True, "ü" * 40
        )
        lines = xclientCommands(attributes, XCLIENT_ATTRIBUTES.decode().split())
        self.assertEqual(len(lines), 2)
        self.assertTrue(all(len(line) + 2 <= 512 and line.startswith(b"XCLIENT ") for line in lines))
        self.assertTrue(lines[-1].endswith(b"NAME=[UNAVAILABLE] ADDR=192.0.2.10"))
        self.assertIn(b" LOGIN=" + b"+C3+BC" * 40, b" ".join(lines))

    def test_longValueAlone(self) -> None:
        """
        An attribute whose xtext alone passes 512 octets goes on a line of
        its own rather than not at all.
        """
        lines = xclientCommands({"LOGIN": "ü" * 127, "ADDR": "192.0.2.10"}, ["LOGIN", "ADDR"])
        self.assertEqual(lines, [b"XCLIENT LOGIN=" + b"+C3+BC" * 127, b"XCLIENT ADDR=192.0.2.10"])

    def test_noCallPerOctet(self) -> None:
        """
        The XCLIENT line of a login is built without a Python call per
        octet of its values: a few calls per attribute at most.
        """
        attributes = xclientAttributes(ClientInfo("s", "192.0.2.10", 50000, "192.0.2.1", 143), "client.example", True, None)
        calls: list[str] = []

        def profile(frame: object, event: str, argument: object) -> None:
            if event == "call":
                calls.append(frame.f_code.co_name)  # type: ignore[attr-defined]

        sys.setprofile(profile)
        try:
            lines = xclientCommands(attributes, XCLIENT_ATTRIBUTES.decode().split())
        finally:
            sys.setprofile(None)
        self.assertEqual(lines, [XCLIENT[:-2]])
        self.assertLessEqual(len(calls), 2 * len(attributes), calls)

    def test_tooLong(self) -> None:
        """
        A value over 255 octets cannot be sent.
        """
        attributes = {"LOGIN": "x" * 256}
        self.assertRaises(ValueError, xclientCommands, attributes, ["LOGIN"])


class PipelinedLoginTests(SubmissionTestsMixin, SynchronousTestCase):
    """
    Logins pipelined in one read, each refused at once.
    """

    def test_manyImmediateFailures(self) -> None:
        """
        Every one of hundreds of pipelined logins that fail without delay
        (a temporary refusal) is answered: handling one failure does not
        nest the command loop once more per login until the stack runs out.
        """
        self.build(router=FakeRouter(default=Rejection(message="Directory down.", temporary=True)))
        self.ehlo()
        out = self.send((b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n") * 400 + b"NOOP\r\n")
        self.assertEqual(out, b"454 4.7.0 Directory down.\r\n" * 400 + b"250 2.0.0 Ok\r\n")


class BackendTextTests(SubmissionTestsMixin, SynchronousTestCase):
    """
    A backend refusal passed on to the client is one safe line.
    """

    def test_refusalControl(self) -> None:
        """
        A bare CR and control characters in the backend's refusal become
        spaces.
        """
        self.build()
        self.ehlo()
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n")
        self.backendSays(GREETING)
        self.backendSays(POSTFIX_EHLO)
        self.backendSays(b"554 5.7.1 blocked\r250 2.0.0\x00 Ok\r\n")
        self.assertEqual(self.client.value(), b"554 5.7.1 blocked 250 2.0.0 Ok\r\n")
