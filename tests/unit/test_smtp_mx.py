"""
The inbound MX front end over in-memory transports: recipients routed one
by one, transactions split across backends, message data streamed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailproxy._contract import ILoginFrontend, IProtocolFrontend
from mailproxy._outcomes import EndReason
from mailproxy._session import CLOSE_GRACE, FrontendProtocol
from mailproxy.config import Limits
from mailproxy.interfaces import IRouter
from mailproxy.model import Rejection, Route, RouteRequest
from mailproxy.smtp import _mx
from mailproxy.smtp._ehlo import Extensions
from mailproxy.smtp._base import backendExtensions
from mailproxy.testing import makeBackend

from .frontendhelpers import FrontendTestsMixin

GREETING = b"220 mx.test ESMTP Postfix\r\n"
POSTFIX_EHLO = (
    b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-VRFY\r\n"
    b"250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250 CHUNKING\r\n"
)
XCLIENT = (
    b"XCLIENT PROTO=ESMTP HELO=mta.remote.example PORT=50000 DESTADDR=192.0.2.1 DESTPORT=143 "
    b"REVERSE_NAME=[UNAVAILABLE] NAME=[UNAVAILABLE] ADDR=192.0.2.10\r\n"
)
KEYWORDS = Extensions({"PIPELINING": "", "SIZE": "1000", "8BITMIME": "", "ENHANCEDSTATUSCODES": "", "DSN": "", "CHUNKING": ""})


@implementer(IRouter)
class RecipientRouter:
    """
    Answers by recipient address; records the requests.
    """

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.requests: list[RouteRequest] = []

    def route(self, request: RouteRequest) -> Any:
        self.requests.append(request)
        answer = self.answers.get(request.rcptTo or "", Rejection(reason="not-local"))
        if isinstance(answer, Exception):
            raise answer
        return answer


class MXTestsMixin(FrontendTestsMixin):
    """
    Helpers: an MX front end, two in-memory backends ("old" and "new"),
    their extensions known.
    """

    protocol = "smtp"

    def build(
        self,
        tls: str = "none",
        limits: Limits | None = None,
        extensions: Extensions = KEYWORDS,
        localDomains: frozenset[str] = frozenset(),
        **answers: Any,
    ) -> None:
        self.old = makeBackend("old", ports={"mx": 25}, forward="xclient")
        self.new = makeBackend("new", ports={"mx": 25}, forward="xclient")
        routes = {
            "alice@example.org": Route(self.old),
            "carol@example.org": Route(self.old),
            "bob@example.org": Route(self.new),
            "nobody@example.org": Rejection(reason="unknown-user"),
        }
        routes.update({k.replace("_", "@"): v for k, v in answers.items()})
        self.connect(RecipientRouter(routes), tls=tls, limits=limits, mode="mx", localDomains=localDomains)
        for backend in (self.old, self.new):
            self.frontend.context.backends[backend.name] = backend
            backendExtensions(self.frontend.context, "mx").learn(backend.name, extensions)

    def connectBackend(self, ehlo: bytes = POSTFIX_EHLO) -> bytes:
        """
        Play a new backend connection through greeting, EHLO, XCLIENT and
        EHLO; return what the proxy sent after the last EHLO reply.
        """
        self.assertEqual(self.backendSays(GREETING), b"EHLO proxy.test\r\n")
        self.assertEqual(self.backendSays(ehlo), XCLIENT)
        self.assertEqual(self.backendSays(GREETING), b"EHLO mta.remote.example\r\n")
        return self.backendSays(ehlo)

    def transaction(self, recipient: bytes = b"alice@example.org") -> None:
        """
        EHLO, MAIL and a first accepted RCPT on a new backend connection.
        """
        self.send(b"EHLO mta.remote.example\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<s@remote.example> SIZE=100\r\n"), b"250 2.1.0 Ok\r\n")
        self.send(b"RCPT TO:<" + recipient + b">\r\n")
        self.assertEqual(
            self.connectBackend(),
            b"MAIL FROM:<s@remote.example> SIZE=100\r\nRCPT TO:<" + recipient + b">\r\n",
        )
        self.backendSays(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
        self.assertEqual(self.client.value(), b"250 2.1.5 Ok\r\n")


class EHLOAndMailTests(MXTestsMixin, SynchronousTestCase):
    """
    What the proxy answers itself: EHLO and MAIL.
    """

    def test_contract(self) -> None:
        """
        The MX front end implements the protocol side of the core's
        contract, and is a session without a login: it has neither the
        login's side of the contract nor the login-capable session base.
        """
        self.build()
        self.assertTrue(verifyObject(IProtocolFrontend, self.frontend))
        self.assertFalse(ILoginFrontend.providedBy(self.frontend))
        self.assertNotIsInstance(self.frontend, FrontendProtocol)

    def test_ehlo(self) -> None:
        """
        The common extensions and STARTTLS, never AUTH.
        """
        self.build(tls="starttls")
        self.assertEqual(
            self.send(b"EHLO mta.remote.example\r\n"),
            b"250-proxy.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-STARTTLS\r\n"
            b"250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250 CHUNKING\r\n",
        )
        self.assertEqual(self.send(b"AUTH PLAIN\r\n"), b"503 5.5.1 Error: authentication not enabled\r\n")

    def test_mailChecks(self) -> None:
        """
        MAIL needs HELO first, is not nested, and carries only parameters of
        offered extensions; SIZE over the limit is refused.
        """
        self.build()
        self.assertEqual(self.send(b"MAIL FROM:<a@b.example>\r\n"), b"503 5.5.1 Error: send HELO/EHLO first\r\n")
        self.send(b"EHLO mta.remote.example\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<a@b.example> SIZE=1001\r\n"), b"552 5.3.4 Message size exceeds fixed limit\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<a@b.example> SIZE=x\r\n"), b"501 5.5.4 Bad SIZE parameter\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<a@b.example> SMTPUTF8\r\n"), b"555 5.5.4 Unsupported option: SMTPUTF8\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n"), b"501 5.5.4 Bad BODY parameter\r\n")
        self.assertEqual(self.send(b"MAIL FROM:a@b.example\r\n"), b"501 5.1.7 Bad sender address syntax\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<> BODY=8BITMIME RET=HDRS\r\n"), b"250 2.1.0 Ok\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<a@b.example>\r\n"), b"503 5.5.1 Error: nested MAIL command\r\n")
        self.assertEqual(self.send(b"RSET\r\n"), b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<a@b.example>\r\n"), b"250 2.1.0 Ok\r\n")

    def test_heloOffersNothing(self) -> None:
        """
        After HELO no parameter is allowed.
        """
        self.build()
        self.send(b"HELO mta.remote.example\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<a@b.example> SIZE=10\r\n"), b"555 5.5.4 Unsupported option: SIZE\r\n")

    def test_startTLSRequired(self) -> None:
        """
        On a STARTTLS-required MX listener, MAIL before TLS is refused.
        """
        self.build(tls="starttls-required")
        self.send(b"EHLO mta.remote.example\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<a@b.example>\r\n"), b"530 5.7.0 Must issue a STARTTLS command first\r\n")

    def test_rcptAndDataNeedMail(self) -> None:
        """
        RCPT and DATA before MAIL get 503; DATA without a recipient 554.
        """
        self.build()
        self.send(b"EHLO mta.remote.example\r\n")
        self.assertEqual(self.send(b"RCPT TO:<alice@example.org>\r\n"), b"503 5.5.1 Error: need MAIL command\r\n")
        self.assertEqual(self.send(b"DATA\r\n"), b"503 5.5.1 Error: need MAIL command\r\n")
        self.send(b"MAIL FROM:<a@b.example>\r\n")
        self.assertEqual(self.send(b"DATA\r\n"), b"554 5.5.1 Error: no valid recipients\r\n")
        self.assertEqual(self.send(b"RCPT TO:<alice@example.org> FOO=1\r\n"), b"555 5.5.4 Unsupported option: FOO\r\n")
        self.assertEqual(self.router.requests, [])


class RecipientTests(MXTestsMixin, SynchronousTestCase):
    """
    Each RCPT goes through the router and, when routed, to the backend.
    """

    def test_firstRecipient(self) -> None:
        """
        The router gets the envelope without credentials; the backend gets
        the client's identity by XCLIENT, then MAIL with its parameters and
        the RCPT pipelined; its answer is the client's.
        """
        self.build()
        self.transaction()
        [request] = self.router.requests
        self.assertEqual(
            (request.protocol, request.credentials, request.helo, request.mailFrom, request.rcptTo),
            ("smtp", None, "mta.remote.example", "s@remote.example", "alice@example.org"),
        )
        self.assertEqual(self.connector.protocols[0].job.portName, "mx")

    def test_sameBackendForwarded(self) -> None:
        """
        A later recipient on the same backend is forwarded as RCPT alone;
        its refusal by the backend is the client's.
        """
        self.build()
        self.transaction()
        self.assertEqual(self.send(b"RCPT TO:<carol@example.org> NOTIFY=NEVER\r\n"), b"")
        self.assertEqual(self.backendSays(b"550 5.1.1 <carol@example.org>: unknown\r\n"), b"")
        self.assertEqual(self.client.value(), b"550 5.1.1 <carol@example.org>: unknown\r\n")
        self.assertEqual(len(self.connector.protocols), 1)

    def test_otherBackendDeferred(self) -> None:
        """
        A recipient on another backend gets 452 4.5.3; no connection is
        made for it.
        """
        self.build()
        self.transaction()
        self.assertEqual(
            self.send(b"RCPT TO:<bob@example.org>\r\n"),
            b"452 4.5.3 <bob@example.org>: Too many recipients for this transaction, send the rest in another\r\n",
        )
        self.assertEqual(len(self.connector.protocols), 1)

    def test_refusedByRouter(self) -> None:
        """
        Unknown users get 550 5.1.1, foreign domains 550 5.7.1, a router
        outage or temporary refusal 451 4.3.0; nothing reaches a backend.
        """
        self.build(**{"temp_example.org": Rejection(temporary=True), "broken_example.org": RuntimeError("down")})
        self.send(b"EHLO mta.remote.example\r\nMAIL FROM:<s@remote.example>\r\n")
        self.assertEqual(
            self.send(b"RCPT TO:<nobody@example.org>\r\n"),
            b"550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown\r\n",
        )
        self.assertEqual(
            self.send(b"RCPT TO:<x@elsewhere.example>\r\n"), b"550 5.7.1 <x@elsewhere.example>: Relay access denied\r\n"
        )
        self.assertEqual(
            self.send(b"RCPT TO:<temp@example.org>\r\n"), b"451 4.3.0 <temp@example.org>: Temporary lookup failure\r\n"
        )
        self.assertEqual(
            self.send(b"RCPT TO:<broken@example.org>\r\n"), b"451 4.3.0 <broken@example.org>: Temporary lookup failure\r\n"
        )
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(self.connector.protocols, [])

    def test_localDomains(self) -> None:
        """
        With C{local_domains}, a recipient of a local domain that the router
        refuses without saying why (as a directory lookup that finds no
        entry does) gets 550 5.1.1 User unknown, compared without case and
        in A-labels; foreign domains still get 550 5.7.1.
        """
        self.build(
            localDomains=frozenset({"example.org", "xn--bcher-kva.example"}),
            **{"ghost_example.org": Rejection(unknown=True), "ghost_example.net": Rejection(unknown=True)},
        )
        self.send(b"EHLO mta.remote.example\r\nMAIL FROM:<s@remote.example>\r\n")
        self.assertEqual(
            self.send(b"RCPT TO:<ghost@example.org>\r\n"),
            b"550 5.1.1 <ghost@example.org>: Recipient address rejected: User unknown\r\n",
        )
        self.assertEqual(
            self.send(b"RCPT TO:<x@Example.ORG>\r\n"),
            b"550 5.1.1 <x@Example.ORG>: Recipient address rejected: User unknown\r\n",
        )
        self.assertEqual(
            self.send(b"RCPT TO:<x@xn--bcher-kva.example>\r\n"),
            b"550 5.1.1 <x@xn--bcher-kva.example>: Recipient address rejected: User unknown\r\n",
        )
        self.assertEqual(
            self.send(b"RCPT TO:<ghost@example.net>\r\n"),
            b"550 5.7.1 <ghost@example.net>: Relay access denied\r\n",
        )
        self.assertEqual(
            self.send(b"RCPT TO:<x@elsewhere.example>\r\n"), b"550 5.7.1 <x@elsewhere.example>: Relay access denied\r\n"
        )
        self.assertEqual(self.connector.protocols, [])

    def test_withoutLocalDomains(self) -> None:
        """
        Without C{local_domains}, a refusal with no reason is taken as a
        foreign domain: 550 5.7.1.
        """
        self.build(**{"ghost_example.org": Rejection(unknown=True)})
        self.send(b"EHLO mta.remote.example\r\nMAIL FROM:<s@remote.example>\r\n")
        self.assertEqual(
            self.send(b"RCPT TO:<ghost@example.org>\r\n"), b"550 5.7.1 <ghost@example.org>: Relay access denied\r\n"
        )

    def test_rejectionWaitAndClose(self) -> None:
        """
        A refusal with C{wait} comes after it; with C{close} the connection
        closes after it.
        """
        self.build(**{"slow_example.org": Rejection(wait=2.0, close=True)})
        self.send(b"EHLO mta.remote.example\r\nMAIL FROM:<s@remote.example>\r\n")
        self.assertEqual(self.send(b"RCPT TO:<slow@example.org>\r\nNOOP\r\n"), b"")
        self.clock.advance(2)
        self.assertEqual(
            self.client.value(),
            b"550 5.7.1 <slow@example.org>: Relay access denied\r\n421 4.7.0 proxy.test Closing connection\r\n",
        )
        self.assertTrue(self.client.disconnecting)

    def test_routerAnswersLater(self) -> None:
        """
        While the router thinks, pipelined commands wait and reading from
        the client pauses; replies keep their order.
        """
        self.build()
        later: Deferred[Any] = Deferred()
        self.router.answers["alice@example.org"] = later
        self.send(b"EHLO mta.remote.example\r\nMAIL FROM:<s@remote.example>\r\n")
        self.assertEqual(self.send(b"RCPT TO:<alice@example.org>\r\nRCPT TO:<x@elsewhere.example>\r\n"), b"")
        self.assertEqual(self.client.producerState, "paused")
        later.callback(Rejection(reason="unknown-user"))
        self.assertEqual(
            self.client.value(),
            b"550 5.1.1 <alice@example.org>: Recipient address rejected: User unknown\r\n"
            b"550 5.7.1 <x@elsewhere.example>: Relay access denied\r\n",
        )
        self.assertEqual(self.client.producerState, "producing")

    def test_mailRefusedByBackend(self) -> None:
        """
        A backend's refusal of MAIL is the RCPT's answer; the next RCPT
        replays MAIL.
        """
        self.build()
        self.send(b"EHLO mta.remote.example\r\nMAIL FROM:<s@remote.example>\r\n")
        self.send(b"RCPT TO:<alice@example.org>\r\n")
        self.connectBackend()
        self.backendSays(b"550 5.7.1 <s@remote.example>: Sender rejected\r\n503 5.5.1 Error: need MAIL command\r\n")
        self.assertEqual(self.client.value(), b"550 5.7.1 <s@remote.example>: Sender rejected\r\n")
        self.assertEqual(
            self.send(b"RCPT TO:<carol@example.org>\r\n"), b""
        )
        self.assertEqual(
            self.connector.transports[-1].value(),
            b"MAIL FROM:<s@remote.example>\r\nRCPT TO:<carol@example.org>\r\n",
        )

    def test_withoutPipelining(self) -> None:
        """
        A backend without PIPELINING gets MAIL, and RCPT only after MAIL's
        reply.
        """
        self.build()
        self.send(b"EHLO mta.remote.example\r\nMAIL FROM:<s@remote.example>\r\n")
        self.send(b"RCPT TO:<alice@example.org>\r\n")
        ehlo = POSTFIX_EHLO.replace(b"250-PIPELINING\r\n", b"")
        self.assertEqual(self.connectBackend(ehlo), b"MAIL FROM:<s@remote.example>\r\n")
        self.assertEqual(self.backendSays(b"250 2.1.0 Ok\r\n"), b"RCPT TO:<alice@example.org>\r\n")
        self.backendSays(b"250 2.1.5 Ok\r\n")
        self.assertEqual(self.client.value(), b"250 2.1.5 Ok\r\n")

    def test_backendUnreachable(self) -> None:
        """
        A backend that cannot be reached gets the recipient 451 4.4.1.
        """
        self.build()
        self.connector.refuse = True
        self.send(b"EHLO mta.remote.example\r\nMAIL FROM:<s@remote.example>\r\n")
        self.assertEqual(
            self.send(b"RCPT TO:<alice@example.org>\r\n"),
            b"451 4.4.1 <alice@example.org>: Mail server temporarily unavailable, try again later\r\n",
        )

    def test_clientRefusedByBackend(self) -> None:
        """
        A backend that refuses the client after XCLIENT: its refusal is the
        recipient's answer.
        """
        self.build()
        self.send(b"EHLO mta.remote.example\r\nMAIL FROM:<s@remote.example>\r\n")
        self.send(b"RCPT TO:<alice@example.org>\r\n")
        self.backendSays(GREETING)
        self.backendSays(POSTFIX_EHLO)
        self.backendSays(b"554 5.7.1 Client host blocked\r\n")
        self.assertEqual(self.client.value(), b"554 5.7.1 Client host blocked\r\n")

    def test_backendLacksOfferedExtension(self) -> None:
        """
        A backend whose EHLO lacks an extension the client was offered
        (while that backend was unknown, others had it) and uses: the
        recipient gets 451 4.3.0, nothing is sent to the backend, and later
        EHLOs no longer offer the extension.
        """
        self.build(extensions=Extensions({**KEYWORDS.keywords, "SMTPUTF8": ""}))
        self.send(b"EHLO mta.remote.example\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<s@remote.example> SMTPUTF8\r\n"), b"250 2.1.0 Ok\r\n")
        self.send(b"RCPT TO:<alice@example.org>\r\n")
        self.assertEqual(self.connectBackend(), b"")
        self.assertEqual(
            self.client.value(),
            b"451 4.3.0 <alice@example.org>: Mail server does not offer SMTPUTF8 now, try again later\r\n",
        )
        self.client.clear()
        self.assertNotIn(b"SMTPUTF8", self.send(b"EHLO mta.remote.example\r\n"))

    def test_xclientRefusedIsTemporary(self) -> None:
        """
        A backend that refuses the XCLIENT command itself (here an IPv6
        address its C{inet_protocols} leaves out; or the proxy is not
        authorized): a fault between proxy and backend, so the recipient
        gets 451 4.4.1, never the backend's permanent reply, which would
        make the sender bounce the mail.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.build()
        self.send(b"EHLO mta.remote.example\r\nMAIL FROM:<s@remote.example>\r\n")
        temporary = b"451 4.4.1 <alice@example.org>: Mail server temporarily unavailable, try again later\r\n"
        for refusal in (
            b"501 5.5.4 Bad DESTADDR syntax: IPV6:::1\r\n",
            b"550 5.7.0 Error: insufficient authorization\r\n",
        ):
            self.client.clear()
            self.send(b"RCPT TO:<alice@example.org>\r\n")
            self.backendSays(GREETING)
            self.backendSays(POSTFIX_EHLO)
            self.backendSays(refusal)
            self.assertEqual(self.client.value(), temporary, refusal)
        # The operator learns what the backend needs.
        details = [event.get("detail", "") for event in events if "unavailable for session" in event.get("log_format", "")]
        self.assertIn("inet_protocols include ipv6", details[0])
        self.assertNotIn("inet_protocols", details[1])

    def test_backendLostAfterRecipient(self) -> None:
        """
        When the backend goes away after accepting a recipient, later
        recipients and DATA get 451 4.4.2: the accepted one is gone too.
        """
        self.build()
        self.transaction()
        self.connector.protocols[0].connectionLost(None)
        lost = b"451 4.4.2 Lost connection with the mail server, try again later\r\n"
        self.assertEqual(self.send(b"RCPT TO:<carol@example.org>\r\n"), lost)
        self.assertEqual(self.send(b"DATA\r\n"), lost)
        self.assertEqual(self.send(b"RSET\r\nMAIL FROM:<s@remote.example>\r\n"), b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n")
        self.send(b"RCPT TO:<carol@example.org>\r\n")
        self.assertEqual(len(self.connector.protocols), 2)

    def test_backendLostDuringRecipient(self) -> None:
        """
        When the backend goes away while a recipient waits for its answer,
        that recipient gets 451 4.4.2 and the session goes on.
        """
        self.build()
        self.transaction()
        self.assertEqual(self.send(b"RCPT TO:<carol@example.org>\r\n"), b"")
        self.connector.protocols[0].connectionLost(None)
        self.assertEqual(
            self.client.value(),
            b"451 4.4.2 <carol@example.org>: Lost connection with the mail server, try again later\r\n",
        )
        self.assertEqual(self.send(b"NOOP\r\n"), b"250 2.0.0 Ok\r\n")
        self.assertFalse(self.client.disconnecting)

    def test_tooManyRecipients(self) -> None:
        """
        Recipients over the limit get 452 4.5.3 without a lookup.
        """
        self.patch(_mx, "MAX_RECIPIENTS", 1)
        self.build()
        self.transaction()
        self.assertEqual(self.send(b"RCPT TO:<carol@example.org>\r\n"), b"452 4.5.3 Error: too many recipients\r\n")
        self.assertEqual(len(self.router.requests), 1)


class DataTests(MXTestsMixin, SynchronousTestCase):
    """
    The message streams to the backend; its end is found; the next
    transaction is routed anew.
    """

    def startData(self) -> None:
        """
        A transaction to alice on old, DATA accepted.
        """
        self.transaction()
        self.assertEqual(self.send(b"DATA\r\n"), b"")
        self.assertEqual(self.connector.transports[0].value(), b"DATA\r\n")
        self.backendSays(b"354 End data with <CR><LF>.<CR><LF>\r\n", 0)
        self.assertEqual(self.client.value(), b"354 End data with <CR><LF>.<CR><LF>\r\n")

    def test_messageStreamed(self) -> None:
        """
        Message octets reach the backend as they come, dot-stuffing kept;
        the end is found across chunks; the backend's reply is the
        client's; commands behind the end wait for it.
        """
        self.build()
        self.startData()
        self.assertEqual(self.send(b"Subject: x\r\n\r\n..dots\r\n"), b"")
        self.assertEqual(self.connector.transports[0].value(), b"Subject: x\r\n\r\n..dots\r\n")
        self.connector.transports[0].clear()
        self.assertEqual(self.send(b"end\r\n.\r\nNOOP\r\n"), b"")
        self.assertEqual(self.connector.transports[0].value(), b"end\r\n.\r\n")
        self.backendSays(b"250 2.0.0 Ok: queued as ABC\r\n", 0)
        self.assertEqual(self.client.value(), b"250 2.0.0 Ok: queued as ABC\r\n250 2.0.0 Ok\r\n")
        self.assertEqual(self.frontend.messages, 1)

    def test_counted(self) -> None:
        """
        An MX session that reached a backend ends with result ok, the
        backend, the octets the client sent and those the backend sent, on
        its session-end line and in the metrics' counters; one that reached
        none ends as no-login.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.build()
        self.startData()
        self.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.backendSays(b"250 2.0.0 Ok: queued as ABC\r\n", 0)
        fromBackend = sum(
            len(reply)
            for reply in (
                GREETING, POSTFIX_EHLO, GREETING, POSTFIX_EHLO, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
                b"354 End data with <CR><LF>.<CR><LF>\r\n", b"250 2.0.0 Ok: queued as ABC\r\n",
            )
        )  # fmt: skip
        fromClient = len(
            b"EHLO mta.remote.example\r\nMAIL FROM:<s@remote.example> SIZE=100\r\n"
            b"RCPT TO:<alice@example.org>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
        )
        self.frontend.connectionLost(Failure(ConnectionDone()))
        (end,) = [event for event in events if event.get("event") == "session_end"]
        self.assertEqual(
            (end["protocol"], end["backend"], end["result"], end["bytesIn"], end["bytesOut"]),
            ("smtp", "old", "ok", fromClient, fromBackend),
        )
        stats = self.frontend.context.stats
        self.assertEqual(
            (stats.ended["smtp", "old"], stats.bytesFromClient["smtp", "old"], stats.bytesFromBackend["smtp", "old"]),
            (1, fromClient, fromBackend),
        )

        events.clear()
        self.build()
        self.send(b"EHLO mta.remote.example\r\n")
        self.frontend.connectionLost(Failure(ConnectionDone()))
        (end,) = [event for event in events if event.get("event") == "session_end"]
        self.assertEqual((end["backend"], end["result"], end["bytesOut"]), (None, "no-login", 0))

    def test_nextTransactionRoutedAnew(self) -> None:
        """
        After a message, a transaction for a recipient on another backend
        leaves the first connection (QUIT) and connects the other.
        """
        self.build()
        self.startData()
        self.send(b".\r\n")
        self.backendSays(b"250 2.0.0 Ok\r\n", 0)
        self.send(b"MAIL FROM:<s@remote.example>\r\nRCPT TO:<bob@example.org>\r\n")
        self.assertEqual(self.connector.transports[0].value(), b"QUIT\r\n")
        self.assertTrue(self.connector.transports[0].disconnecting)
        self.assertEqual(len(self.connector.protocols), 2)
        self.assertEqual(self.connectBackend(), b"MAIL FROM:<s@remote.example>\r\nRCPT TO:<bob@example.org>\r\n")

    def test_sameBackendReused(self) -> None:
        """
        A next transaction on the same backend reuses the connection.
        """
        self.build()
        self.startData()
        self.send(b".\r\n")
        self.backendSays(b"250 2.0.0 Ok\r\n", 0)
        self.send(b"MAIL FROM:<s@remote.example>\r\nRCPT TO:<carol@example.org>\r\n")
        self.assertEqual(len(self.connector.protocols), 1)
        self.assertEqual(
            self.connector.transports[0].value(), b"MAIL FROM:<s@remote.example>\r\nRCPT TO:<carol@example.org>\r\n"
        )

    def test_dataRefused(self) -> None:
        """
        A backend's refusal of DATA is the client's; no data is expected.
        """
        self.build()
        self.transaction()
        self.send(b"DATA\r\n")
        self.backendSays(b"554 5.5.1 Error: no valid recipients\r\n")
        self.assertEqual(self.client.value(), b"554 5.5.1 Error: no valid recipients\r\n")
        self.assertEqual(self.send(b"NOOP\r\n"), b"250 2.0.0 Ok\r\n")

    def test_bareLineFeed(self) -> None:
        """
        A bare LF in the message aborts the backend connection (no final
        dot ever reaches it) and the message is refused at its strict end.
        """
        self.build()
        self.startData()
        self.connector.transports[0].clear()
        self.assertEqual(self.send(b"a\n.\nRCPT TO:<x@y.example>\r\n"), b"")
        self.assertEqual(self.connector.transports[0].value(), b"")
        self.assertTrue(self.connector.transports[0].disconnecting)
        self.assertEqual(
            self.send(b"\r\n.\r\n"),
            b"550 5.6.0 Message refused: bare CR or LF in message data; end lines with CRLF\r\n",
        )
        self.assertEqual(self.frontend.mailFrom, None)

    def test_backendLostDuringData(self) -> None:
        """
        If the backend goes away during the message, the client hears 451
        4.4.2 at the message's end.
        """
        self.build()
        self.startData()
        self.connector.protocols[0].connectionLost(None)
        self.assertEqual(self.send(b"text\r\n"), b"")
        self.assertEqual(self.send(b".\r\n"), b"451 4.4.2 Lost connection with the mail server, try again later\r\n")

    def test_backpressure(self) -> None:
        """
        While the message streams, a full backend buffer pauses reading
        from the client; after the message, reading is normal again.
        """
        self.build()
        self.startData()
        producer = self.connector.transports[0].producer
        self.assertIsNotNone(producer)
        producer.pauseProducing()
        self.assertEqual(self.client.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(self.client.producerState, "producing")
        self.send(b".\r\n")
        self.assertIsNone(self.connector.transports[0].producer)

    def test_clientLostDuringData(self) -> None:
        """
        A client that goes away mid-message leaves the backend aborted,
        without a QUIT that would end the message.
        """
        self.build()
        self.startData()
        self.connector.transports[0].clear()
        self.send(b"partial")
        self.frontend.connectionLost(None)
        self.assertEqual(self.connector.transports[0].value(), b"partial")
        self.assertTrue(self.connector.transports[0].disconnecting)

    def test_chunks(self) -> None:
        """
        BDAT chunks are forwarded counted, pipelined or not; the LAST reply
        ends the transaction.
        """
        self.build()
        self.transaction()
        self.assertEqual(self.send(b"BDAT 5\r\nab"), b"")
        self.assertEqual(self.connector.transports[0].value(), b"BDAT 5\r\nab")
        self.send(b"cdeBDAT 3 LAST\r\nxyz")
        self.assertEqual(self.connector.transports[0].value(), b"BDAT 5\r\nabcde")
        self.assertEqual(self.backendSays(b"250 2.0.0 Ok: 5 bytes\r\n", 0), b"BDAT 3 LAST\r\nxyz")
        self.backendSays(b"250 2.0.0 Ok: 8 bytes queued as X\r\n", 0)
        self.assertEqual(self.client.value(), b"250 2.0.0 Ok: 5 bytes\r\n250 2.0.0 Ok: 8 bytes queued as X\r\n")
        self.assertEqual((self.frontend.messages, self.frontend.mailFrom), (1, None))

    def test_shutdownAwaitsMessageReply(self) -> None:
        """
        A session dropped at shutdown after the message's final dot, while
        the backend's reply is awaited, gets that reply before the goodbye
        (cut, the sender would send the message again), however long the
        reply takes within the data-reply timeout.
        """
        self.build()
        self.startData()
        self.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.client.clear()
        self.frontend.drop("Server shutting down.", EndReason.SHUTDOWN)
        self.assertEqual(self.client.value(), b"")
        self.assertFalse(self.client.disconnecting)
        self.assertEqual(self.frontend.finishing, _mx.DATA_END_TIMEOUT)
        self.clock.advance(_mx.DATA_END_TIMEOUT - 1)
        self.assertEqual(self.frontend.finishing, 1)
        self.backendSays(b"250 2.0.0 Ok: queued as ABC\r\n", 0)
        self.assertEqual(
            self.client.value(), b"250 2.0.0 Ok: queued as ABC\r\n421 4.3.2 proxy.test Server shutting down.\r\n"
        )
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.frontend.messages, 1)

    def test_shutdownAwaitsLastChunkReply(self) -> None:
        """
        The same after the last BDAT chunk.
        """
        self.build()
        self.transaction()
        self.send(b"BDAT 3 LAST\r\nxyz")
        self.client.clear()
        self.frontend.drop("Server shutting down.", EndReason.SHUTDOWN)
        self.assertEqual(self.client.value(), b"")
        self.assertGreater(self.frontend.finishing, 0)
        self.backendSays(b"250 2.0.0 Ok: 3 bytes queued as X\r\n", 0)
        self.assertEqual(
            self.client.value(), b"250 2.0.0 Ok: 3 bytes queued as X\r\n421 4.3.2 proxy.test Server shutting down.\r\n"
        )
        self.assertTrue(self.client.disconnecting)

    def test_shutdownDuringDataCuts(self) -> None:
        """
        A message whose end has not been sent is cut at once: the backend
        never got the dot, and the sender keeps its copy.
        """
        self.build()
        self.startData()
        self.send(b"Subject: x\r\n\r\nbo")
        self.client.clear()
        self.frontend.drop("Server shutting down.", EndReason.SHUTDOWN)
        self.assertEqual(self.frontend.finishing, 0)
        self.assertEqual(self.client.value(), b"421 4.3.2 proxy.test Server shutting down.\r\n")
        self.assertTrue(self.client.disconnecting)

    def messageLines(self) -> list[dict[str, Any]]:
        """
        The message log events from now on.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def loggedMessages(self, events: list[dict[str, Any]]) -> list[tuple[int, int]]:
        """
        The C{(size, reply)} of each message line in C{events}.
        """
        return [
            (event["size"], event["reply"])
            for event in events
            if event.get("log_format", "").startswith("message: ")
        ]

    def test_chunkedMessageLogged(self) -> None:
        """
        A BDAT message is logged with the octets of all its chunks.
        """
        events = self.messageLines()
        self.build()
        self.transaction()
        self.send(b"BDAT 5\r\nabcde")
        self.backendSays(b"250 2.0.0 Ok: 5 bytes\r\n", 0)
        self.send(b"BDAT 3 LAST\r\nxyz")
        self.backendSays(b"250 2.0.0 Ok: 8 bytes queued as X\r\n", 0)
        self.assertEqual(self.loggedMessages(events), [(8, 250)])

    def test_lostReplyLogged(self) -> None:
        """
        A backend lost while the reply to the message's end is awaited:
        the client gets 451 4.4.2, and the log says 451, not nothing.
        """
        events = self.messageLines()
        self.build()
        self.startData()
        self.send(b"body\r\n.\r\n")
        self.client.clear()
        self.connector.protocols[0].connectionLost(None)
        self.assertEqual(self.client.value(), b"451 4.4.2 Lost connection with the mail server, try again later\r\n")
        # The DATA size counts the end marker too (DataScanner.size).
        self.assertEqual(self.loggedMessages(events), [(9, 451)])

    def test_refusedChunkSkipped(self) -> None:
        """
        A BDAT without recipients is refused after its octets, which are
        never read as commands.
        """
        self.build()
        self.send(b"EHLO mta.remote.example\r\nMAIL FROM:<s@remote.example>\r\n")
        self.assertEqual(self.send(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n"), b"554 5.5.1 Error: no valid recipients\r\n250 2.0.0 Ok\r\n")

    def test_rsetForwarded(self) -> None:
        """
        RSET in a transaction is answered by the proxy and sent to the
        backend, whose reply is not the client's.
        """
        self.build()
        self.transaction()
        self.assertEqual(self.send(b"RSET\r\n"), b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.connector.transports[0].value(), b"RSET\r\n")
        self.client.clear()
        self.assertEqual(self.backendSays(b"250 2.0.0 Ok\r\n", 0), b"")
        self.assertEqual(self.client.value(), b"")

    def test_idleTimeout(self) -> None:
        """
        A silent client is dropped after C{preauth_timeout} seconds of
        silence, not of session: a long transfer is never cut.
        """
        self.build(limits=Limits(preauthTimeout=60))
        self.clock.advance(50)
        self.send(b"EHLO mta.remote.example\r\n")
        self.clock.advance(50)
        self.assertFalse(self.client.disconnecting)
        self.clock.advance(10)
        self.assertTrue(self.client.value().endswith(b"421 4.4.2 proxy.test Error: timeout exceeded\r\n"))
        self.assertTrue(self.client.disconnecting)

    def test_waitingForBackendIsNotIdle(self) -> None:
        """
        While the proxy waits for the backend, the client's silence does not
        count; the backend's own timeout ends the wait.
        """
        self.build(limits=Limits(preauthTimeout=60, backendTimeout=100))
        self.transaction()
        self.send(b"DATA\r\n")
        self.clock.advance(90)
        self.assertFalse(self.client.disconnecting)
        self.clock.advance(10)
        self.assertEqual(self.client.value(), b"451 4.4.2 Lost connection with the mail server, try again later\r\n")


class CloseGraceTests(MXTestsMixin, SynchronousTestCase):
    """
    A peer that never finishes a close the proxy started (a TLS peer that
    ignores the close alert) is cut after L{CLOSE_GRACE}.
    """

    def test_quitAborted(self) -> None:
        """
        After QUIT, a connection still open L{CLOSE_GRACE} seconds later is
        aborted.
        """
        self.build()
        self.assertEqual(self.send(b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")
        self.assertTrue(self.client.disconnecting)
        self.clock.advance(CLOSE_GRACE - 1)
        self.assertFalse(self.client.disconnected)
        self.clock.advance(1)
        self.assertTrue(self.client.disconnected)

    def test_timeoutAborted(self) -> None:
        """
        After the idle timeout's 421, a connection still open
        L{CLOSE_GRACE} seconds later is aborted.
        """
        self.build(limits=Limits(preauthTimeout=60))
        self.clock.advance(60)
        self.assertTrue(self.client.disconnecting)
        self.assertFalse(self.client.disconnected)
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(self.client.disconnected)

    def test_closedInTime(self) -> None:
        """
        A connection that closes within the grace is not aborted later.
        """
        self.build()
        self.send(b"QUIT\r\n")
        self.frontend.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class BackendTextTests(MXTestsMixin, SynchronousTestCase):
    """
    A backend refusal passed on to the client is one safe line.
    """

    def test_refusalControl(self) -> None:
        """
        A bare CR and control characters in the backend's refusal of the
        client become spaces.
        """
        self.build()
        self.send(b"EHLO mta.remote.example\r\nMAIL FROM:<s@remote.example>\r\n")
        self.send(b"RCPT TO:<alice@example.org>\r\n")
        self.backendSays(GREETING)
        self.backendSays(POSTFIX_EHLO)
        self.backendSays(b"554 5.7.1 blocked\r250 2.0.0\x00 Ok\r\n")
        self.assertEqual(self.client.value(), b"554 5.7.1 blocked 250 2.0.0 Ok\r\n")
