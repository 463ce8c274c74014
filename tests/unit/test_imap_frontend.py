"""
The IMAP front end and its backend login, over in-memory transports.

The client is a L{TLSStringTransport}; the backend is another, whose
replies the tests write by hand in Dovecot's dialect.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from base64 import b64decode, b64encode
from collections import Counter
from types import FrameType
from typing import Any

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._session import CLOSE_GRACE
from mailproxy.config import Limits
from mailproxy.imap import _backend, _frontend
from mailproxy.imap._frontend import IMAPFrontend
from mailproxy.model import Rejection, Route
from mailproxy.testing import FakeRouter, makeBackend, makeFrontend

from .frontendhelpers import FrontendTestsMixin

_PRIVACY_REQUIRED = b"[PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n"
POSTLOGIN = b"IMAP4rev1 SASL-IR ID ENABLE IDLE SORT THREAD=REFERENCES UNAUTHENTICATE LITERAL+ MOVE"


class IMAPFrontendTestsMixin(FrontendTestsMixin):
    """
    Helpers: an IMAP front end with a fake router and an in-memory backend.
    """

    protocol = "imap"


class GreetingAndCapabilityTests(IMAPFrontendTestsMixin, SynchronousTestCase):
    """
    What a client learns before logging in.
    """

    def test_greetingOnStartTLSPort(self) -> None:
        """
        The greeting carries a CAPABILITY code with STARTTLS and the AUTH
        mechanisms on a port where TLS is optional.
        """
        backend = makeBackend()
        _, client, _ = makeFrontend("imap", FakeRouter({"a": Route(backend)}), tls="starttls")
        self.assertEqual(
            client.value(),
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN AUTH=LOGIN]"
            b" proxy.test IMAP proxy ready.\r\n",
        )

    def test_capabilitiesMadeOncePerListener(self) -> None:
        """
        The pre-login capability list and the greeting are worked out once
        for the sessions of a listener in the same TLS state, and each
        session still gets the list of its state: after STARTTLS, a client
        sees the list of a TLS connection, and the next plain connection
        the plain one again.
        """
        made: list[bool] = []
        original = IMAPFrontend._capabilities

        def counted(frontend: IMAPFrontend) -> bytes:
            made.append(frontend.tlsActive)
            return original(frontend)

        self.patch(IMAPFrontend, "_capabilities", counted)
        self.build(tls="starttls-required")
        plain = b"* CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ STARTTLS LOGINDISABLED\r\n"
        self.assertIn(b"[CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ STARTTLS LOGINDISABLED]", self.greeting)
        second, client = self.connectAgain()
        self.assertEqual(client.value(), self.greeting)
        self.assertTrue(self.send(b"a CAPABILITY\r\n").startswith(plain))
        self.send(b"b STARTTLS\r\n")
        self.assertTrue(self.send(b"c CAPABILITY\r\n").startswith(b"* CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ AUTH=PLAIN AUTH=LOGIN\r\n"))
        client.clear()
        second.dataReceived(b"d CAPABILITY\r\n")
        self.assertTrue(client.value().startswith(plain))
        self.assertEqual(made, [False, True])

    def test_startTLSRequiredHidesAuth(self) -> None:
        """
        Before TLS on a starttls-required port, CAPABILITY shows STARTTLS and
        LOGINDISABLED and no AUTH= mechanism.
        """
        self.build(tls="starttls-required")
        self.assertEqual(
            self.send(b"a CAPABILITY\r\n"),
            b"* CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ STARTTLS LOGINDISABLED\r\n"
            b"a OK Pre-login capabilities listed, post-login capabilities have more.\r\n",
        )

    def test_implicitTLSHasNoStartTLS(self) -> None:
        """
        On an implicit TLS port STARTTLS is neither offered nor accepted.
        """
        self.build(tls="implicit")
        self.assertNotIn(b"STARTTLS", self.send(b"a CAPABILITY\r\n"))
        self.assertEqual(self.send(b"b STARTTLS\r\n"), b"b BAD TLS is already active.\r\n")

    def test_noopLogoutAndUnknown(self) -> None:
        """
        NOOP succeeds, commands of the authenticated state get BAD, unknown
        commands get BAD, and LOGOUT says BYE and closes.
        """
        self.build()
        self.assertEqual(self.send(b"a NOOP\r\n"), b"a OK NOOP completed.\r\n")
        self.assertEqual(self.send(b"b ENABLE UTF8=ACCEPT\r\n"), b"b BAD Command not permitted before authentication.\r\n")
        self.assertEqual(self.send(b"c SELECT INBOX\r\n"), b"c BAD Command not permitted before authentication.\r\n")
        self.assertEqual(self.send(b"d FROB\r\n"), b"d BAD Unknown command.\r\n")
        self.assertEqual(self.send(b"e LOGOUT\r\n"), b"* BYE Logging out\r\ne OK Logout completed.\r\n")
        self.assertTrue(self.client.disconnecting)

    def test_tooManyBadCommands(self) -> None:
        """
        After ten BAD replies the connection is closed with a BYE.
        """
        self.build()
        out = self.send(b"x FROB\r\n" * 10)
        self.assertTrue(out.endswith(b"* BYE Too many invalid IMAP commands.\r\n"))
        self.assertTrue(self.client.disconnecting)

    def test_id(self) -> None:
        """
        ID is answered by the proxy, and the client's pairs reach the router.
        """
        self.build()
        self.assertEqual(
            self.send(b'a ID ("name" "Thunderbird" "version" "128.0")\r\n'),
            b'* ID ("name" "mailproxy")\r\na OK ID completed.\r\n',
        )
        self.send(b"b LOGIN alice secret\r\n")
        self.assertEqual(self.router.requests[0].clientID, (("name", "Thunderbird"), ("version", "128.0")))

    def test_idNil(self) -> None:
        """
        C{ID NIL} is accepted; a malformed ID gets BAD.
        """
        self.build()
        self.assertEqual(self.send(b"a ID NIL\r\n"), b'* ID ("name" "mailproxy")\r\na OK ID completed.\r\n')
        self.assertEqual(self.send(b'b ID ("odd")\r\n'), b"b BAD Invalid ID parameters.\r\n")


class StartTLSTests(IMAPFrontendTestsMixin, SynchronousTestCase):
    """
    STARTTLS towards the client.
    """

    def test_startTLS(self) -> None:
        """
        STARTTLS is answered OK and TLS starts right after the reply.
        """
        self.build(tls="starttls")
        self.assertEqual(self.send(b"a STARTTLS\r\n"), b"a OK Begin TLS negotiation now.\r\n")
        self.assertIsNotNone(self.client.tlsOptions)
        self.assertEqual(self.client.writtenBeforeTLS, b"a OK Begin TLS negotiation now.\r\n")

    def test_injectionDiscarded(self) -> None:
        """
        Commands pipelined in plaintext behind STARTTLS are discarded, not
        executed after the handshake (CVE-2011-0411).
        """
        self.build(tls="starttls")
        out = self.send(b"a STARTTLS\r\nb LOGIN alice secret\r\nc NOOP\r\n")
        self.assertEqual(out, b"a OK Begin TLS negotiation now.\r\n")
        self.assertEqual(self.router.requests, [])
        # What arrives after the handshake is read normally.
        self.assertEqual(self.send(b"d NOOP\r\n"), b"d OK NOOP completed.\r\n")

    def test_afterTLSCapabilities(self) -> None:
        """
        After STARTTLS, STARTTLS and LOGINDISABLED disappear and AUTH= shows.
        """
        self.build(tls="starttls-required")
        self.send(b"a STARTTLS\r\n")
        caps = self.send(b"b CAPABILITY\r\n")
        self.assertIn(b"AUTH=PLAIN AUTH=LOGIN", caps)
        self.assertNotIn(b"STARTTLS", caps)
        self.assertNotIn(b"LOGINDISABLED", caps)
        self.assertEqual(self.send(b"c STARTTLS\r\n"), b"c BAD TLS is already active.\r\n")

    def test_loginRequiresTLS(self) -> None:
        """
        LOGIN and AUTHENTICATE before TLS on a starttls-required port are
        refused with PRIVACYREQUIRED and the router is never asked.
        """
        self.build(tls="starttls-required")
        self.assertEqual(
            self.send(b"a LOGIN alice secret\r\n"),
            b"a NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n",
        )
        self.assertIn(b"b NO [PRIVACYREQUIRED]", self.send(b"b AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n"))
        self.assertEqual(self.router.requests, [])


class LoginTests(IMAPFrontendTestsMixin, SynchronousTestCase):
    """
    From the client's LOGIN to the relay.
    """

    def loginAndAccept(self, command: bytes = b"a LOGIN alice secret\r\n") -> bytes:
        self.send(command)
        self.backendSays(GREETING)
        self.client.clear()
        return self.connector.transports[-1].value()

    def test_loginForwardsIdentityAndLogsIn(self) -> None:
        """
        After the backend greeting, the proxy sends ID with the client's
        addresses and AUTHENTICATE PLAIN with SASL-IR, pipelined.
        """
        self.build()
        sent = self.loginAndAccept()
        sid = self.frontend.client.sessionId.encode()
        self.assertEqual(
            sent,
            b'P1 ID ("x-session-id" "' + sid + b'" "x-originating-ip" "192.0.2.10" "x-originating-port" "50000" '
            b'"x-connected-ip" "192.0.2.1" "x-connected-port" "143" "x-proxy-ttl" "5" "x-client-transport" "insecure")\r\n'
            b"P2 AUTHENTICATE PLAIN " + b64encode(b"\x00alice\x00secret") + b"\r\n",
        )

    def test_loginRunsNoGenerators(self) -> None:
        """
        A plain LOGIN, from the client's command to its tagged OK with
        Dovecot's post-login capabilities, runs no generator in the IMAP
        front end or backend dialogue: the arguments are checked one by
        one and a capability list is upper-cased as one string, not name
        by name, at every login.
        """
        self.build()
        calls: Counter[str] = Counter()
        modules = {_frontend.__file__, _backend.__file__}

        def profile(frame: FrameType, event: str, arg: Any) -> None:
            if event == "call" and frame.f_code.co_filename in modules:
                calls[frame.f_code.co_name] += 1

        sys.setprofile(profile)
        try:
            self.loginAndAccept()
            self.backendSays(b'* ID ("name" "Dovecot")\r\nP1 OK ID completed.\r\n')
            self.backendSays(b"P2 OK [CAPABILITY " + POSTLOGIN + b"] Logged in\r\n")
        finally:
            sys.setprofile(None)
        self.assertIn(b"a OK [CAPABILITY IMAP4rev1 ", self.client.value())
        self.assertEqual((calls["do_LOGIN"], calls["<genexpr>"]), (1, 0))

    def test_successCarriesBackendCapabilities(self) -> None:
        """
        The client's tagged OK carries the backend's post-login
        capabilities, without UNAUTHENTICATE, and then bytes flow unchanged.
        """
        self.build()
        self.loginAndAccept()
        self.backendSays(b'* ID ("name" "Dovecot")\r\nP1 OK ID completed.\r\n')
        self.backendSays(b"P2 OK [CAPABILITY " + POSTLOGIN + b"] Logged in\r\n")
        self.assertEqual(
            self.client.value(),
            b"a OK [CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE SORT THREAD=REFERENCES LITERAL+ MOVE] Logged in\r\n",
        )
        backendTransport = self.connector.transports[-1]
        backendTransport.clear()
        self.send(b"b SELECT INBOX\r\n")
        self.assertEqual(backendTransport.value(), b"b SELECT INBOX\r\n")
        self.client.clear()
        self.connector.protocols[-1].dataReceived(b"* 3 EXISTS\r\nb OK [READ-WRITE] Select completed.\r\n")
        self.assertEqual(self.client.value(), b"* 3 EXISTS\r\nb OK [READ-WRITE] Select completed.\r\n")

    def test_hiddenCapabilitiesAnyCase(self) -> None:
        """
        A post-login capability the client may not see is left out in any
        case; a name that only contains one of theirs stays, and a list
        with none of them reaches the client as the backend wrote it.
        """
        for backendList, clientList in (
            (b"IMAP4rev1 unauthenticate XSTARTTLSX Move", b"IMAP4rev1 XSTARTTLSX Move"),
            (b"IMAP4rev1 SASL-IR idle MOVE", b"IMAP4rev1 SASL-IR idle MOVE"),
        ):
            self.build()
            self.loginAndAccept()
            self.backendSays(b"P1 OK ID\r\nP2 OK [CAPABILITY " + backendList + b"] Logged in\r\n")
            self.assertEqual(self.client.value(), b"a OK [CAPABILITY " + clientList + b"] Logged in\r\n")

    def test_pipelinedCommandsReachBackend(self) -> None:
        """
        Commands the client pipelined behind LOGIN go to the backend after
        the hand-over, in order; backend bytes after its OK reach the client.
        """
        self.build()
        self.loginAndAccept(b"a LOGIN alice secret\r\nb SELECT INBOX\r\n")
        backendTransport = self.connector.transports[-1]
        backendTransport.clear()
        self.backendSays(b"P1 OK ID\r\nP2 OK [CAPABILITY IMAP4rev1] Logged in\r\n* 1 EXISTS\r\n")
        self.assertEqual(backendTransport.value(), b"b SELECT INBOX\r\n")
        self.assertEqual(self.client.value(), b"a OK [CAPABILITY IMAP4rev1] Logged in\r\n* 1 EXISTS\r\n")

    def test_capabilityAskedWhenMissing(self) -> None:
        """
        A backend OK without capabilities makes the proxy ask CAPABILITY
        before answering the client; an untagged CAPABILITY is also sent to
        a client that asked for capabilities before logging in.
        """
        self.build()
        self.send(b"x CAPABILITY\r\n")
        self.loginAndAccept()
        self.assertEqual(self.backendSays(b"P1 OK\r\nP2 OK Logged in\r\n"), b"P3 CAPABILITY\r\n")
        self.assertEqual(self.client.value(), b"")
        self.backendSays(b"* CAPABILITY IMAP4rev1 IDLE\r\nP3 OK done\r\n")
        self.assertEqual(
            self.client.value(),
            b"* CAPABILITY IMAP4rev1 IDLE\r\na OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
        )

    def test_literalLogin(self) -> None:
        """
        LOGIN with synchronizing literals: the proxy sends continuations and
        the router receives the exact octets, spaces and quotes included.
        """
        self.build()
        self.assertEqual(self.send(b"a LOGIN {5}\r\n"), b"+ Ready for literal data\r\n")
        self.assertEqual(self.send(b'alice {10}\r\n'), b"+ Ready for literal data\r\n")
        self.send(b'p "w \\d\xc3\xa4x\r\n')
        credentials = self.router.requests[0].credentials
        self.assertEqual((credentials.user, credentials.password), ("alice", b'p "w \\d\xc3\xa4x'))

    def test_authenticatePlainContinuation(self) -> None:
        """
        AUTHENTICATE PLAIN without an initial response gets an empty
        continuation and takes the response on the next line.
        """
        self.build()
        self.assertEqual(self.send(b"a AUTHENTICATE PLAIN\r\n"), b"+ \r\n")
        self.send(b64encode(b"\x00alice\x00secret") + b"\r\n")
        credentials = self.router.requests[0].credentials
        self.assertEqual((credentials.mechanism, credentials.user, credentials.password), ("PLAIN", "alice", b"secret"))

    def test_authenticateLogin(self) -> None:
        """
        AUTHENTICATE LOGIN prompts for the user name and the password.
        """
        self.build()
        self.assertEqual(self.send(b"a AUTHENTICATE LOGIN\r\n"), b"+ " + b64encode(b"Username:") + b"\r\n")
        self.assertEqual(self.send(b64encode(b"alice") + b"\r\n"), b"+ " + b64encode(b"Password:") + b"\r\n")
        self.send(b64encode(b"secret") + b"\r\n")
        self.assertEqual(self.router.requests[0].credentials.password, b"secret")

    def test_authenticateCancelAndBadBase64(self) -> None:
        """
        C{*} cancels an exchange with BAD; invalid base64 gets BAD; the
        connection stays usable.
        """
        self.build()
        self.send(b"a AUTHENTICATE PLAIN\r\n")
        self.assertEqual(self.send(b"*\r\n"), b"a BAD Authentication aborted by client.\r\n")
        self.assertEqual(
            self.send(b"b AUTHENTICATE PLAIN !!!!\r\n"), b"b BAD Invalid base64 data in continued response.\r\n"
        )
        self.assertEqual(self.send(b"c NOOP\r\n"), b"c OK NOOP completed.\r\n")
        self.assertEqual(self.send(b"d AUTHENTICATE CRAM-MD5\r\n"), b"d NO Unsupported authentication mechanism.\r\n")

    def test_masterUserLogin(self) -> None:
        """
        A route with C{useMaster} logs in with the backend's master user as
        authentication identity and the account as authorization identity.
        """
        self.build(backend=makeBackend("old", masterUser="proxy", masterPassword=b"masterpw"), useMaster=True)
        sent = self.loginAndAccept()
        self.assertIn(b"AUTHENTICATE PLAIN " + b64encode(b"alice\x00proxy\x00masterpw") + b"\r\n", sent)

    def test_masterRouteWithoutMasterUser(self) -> None:
        """
        A route that logs in as the master user of a backend that has none
        (an operator's mistake) fails as unavailable, and the log says why.
        """
        from twisted.logger import formatEvent

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.build(backend=makeBackend("old"), useMaster=True)
        self.assertEqual(
            self.send(b"a LOGIN alice secret\r\n"),
            b"a NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n",
        )
        self.assertIn(
            "route for \"alice\" logs in as backend old's master user, and it has no master_user",
            [formatEvent(event) for event in events],
        )

    def test_loginWithoutSASLIR(self) -> None:
        """
        A backend without SASL-IR and LITERAL+ gets LOGIN with synchronizing
        literals, each sent after its continuation.
        """
        self.build(backend=makeBackend("old", forward="none"))
        self.send(b"a LOGIN alice s3cret\r\n")
        sent = self.backendSays(b"* OK [CAPABILITY IMAP4rev1] old server\r\n")
        self.assertEqual(sent, b"P1 LOGIN {5}\r\n")
        self.assertEqual(self.backendSays(b"+ OK\r\n"), b"alice {6}\r\n")
        self.assertEqual(self.backendSays(b"+ OK\r\n"), b"s3cret\r\n")
        self.backendSays(b"P1 OK [CAPABILITY IMAP4rev1 IDLE] done\r\n")
        self.assertEqual(self.client.value(), b"a OK [CAPABILITY IMAP4rev1 IDLE] done\r\n")

    def test_backendStartTLS(self) -> None:
        """
        With tls = starttls the proxy sends STARTTLS first and writes no
        credentials before the handshake has completed; then it asks for
        the capabilities again.
        """
        self.build(backend=makeBackend("old", tls="starttls"))
        self.send(b"a LOGIN alice secret\r\n")
        self.assertEqual(self.backendSays(GREETING.replace(b"AUTH=PLAIN", b"STARTTLS")), b"P1 STARTTLS\r\n")
        self.assertEqual(self.backendSays(b"P1 OK Begin TLS negotiation now.\r\n"), b"")
        self.assertIsNotNone(self.connector.transports[-1].tlsOptions)
        transport = self.connector.transports[-1]
        self.connector.protocols[-1].handshakeCompleted()
        self.assertEqual(transport.value(), b"P2 CAPABILITY\r\n")

    def test_backendStartTLSInjection(self) -> None:
        """
        Bytes after the backend's STARTTLS reply in the same read are an
        injection: the login fails as unavailable.
        """
        self.build(backend=makeBackend("old", tls="starttls"))
        self.send(b"a LOGIN alice secret\r\n")
        self.backendSays(GREETING.replace(b"AUTH=PLAIN", b"STARTTLS"))
        self.backendSays(b"P1 OK Begin TLS\r\n* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] evil\r\n")
        self.assertEqual(
            self.client.value(), b"a NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n"
        )


class FailureTests(IMAPFrontendTestsMixin, SynchronousTestCase):
    """
    Everything that can go wrong during login.
    """

    def test_wrongPasswordIsDelayedAndRetryable(self) -> None:
        """
        A backend refusal becomes the generic failure, only after the
        failed-login delay; the client may try again.
        """
        self.build(limits=Limits(failureDelay=2.0))
        self.send(b"a LOGIN alice wrong\r\n")
        self.backendSays(GREETING)
        self.backendSays(b"P1 OK\r\nP2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(2.0)
        self.assertEqual(self.client.value(), b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.assertEqual(self.send(b"b NOOP\r\n"), b"b OK NOOP completed.\r\n")

    def test_rightPasswordAfterFailuresWaitsToo(self) -> None:
        """
        After failures, a login waits the failed-login delay before it is
        routed (the backend is not asked meanwhile), so the right password
        is answered no sooner than that: a client that hangs up when no OK
        came at once learns nothing about its guess before the delay.  The
        failures of the address count, from other sessions too.
        """
        self.build(limits=Limits(failureDelay=1.0))
        self.send(b"a LOGIN nobody wrong\r\n")
        self.clock.advance(1.0)
        self.assertIn(b"a NO [AUTHENTICATIONFAILED]", self.client.value())
        self.client.clear()
        self.send(b"b LOGIN alice secret\r\n")
        # Not routed, no backend asked, until the delay has passed.
        self.clock.advance(0.99)
        self.assertEqual(self.connector.protocols, [])
        self.clock.advance(0.01)
        self.backendSays(GREETING)
        self.backendSays(b'* ID ("name" "Dovecot")\r\nP1 OK ID completed.\r\nP2 OK [CAPABILITY IMAP4rev1] Logged in\r\n')
        self.assertEqual(self.client.value(), b"b OK [CAPABILITY IMAP4rev1] Logged in\r\n")

        # Another session from the same address: its first attempt waits
        # for the address's failure too (alice's success forgave none of
        # it: the failure was nobody's).
        second, client = self.connectAgain()
        client.clear()
        second.dataReceived(b"c LOGIN alice secret\r\n")
        self.assertEqual(len(self.connector.protocols), 1)
        self.clock.advance(1.0)
        self.backendSays(GREETING)
        self.backendSays(b'P1 OK ID completed.\r\nP2 OK [CAPABILITY IMAP4rev1] Logged in\r\n')
        self.assertEqual(client.value(), b"c OK [CAPABILITY IMAP4rev1] Logged in\r\n")

    def test_ownFailuresForgiven(self) -> None:
        """
        A login whose password the backend accepted takes that account's
        failures from the address off the address's count (one user's
        typo must not slow everyone behind the same NAT for 15 minutes),
        and forgets the account's; the failures of other accounts from the
        address stay (a guesser logging in to its own account between
        guesses keeps its count).
        """
        from mailproxy._shared import accountKey, pairKey

        self.build(limits=Limits(failureDelay=1.0))
        failures = self.frontend.context.failures
        address = self.frontend.client.address
        for key in (address, pairKey(address, "alice"), accountKey("alice"), address, pairKey(address, "bob")):
            failures.failed(key)
        self.send(b"b LOGIN alice secret\r\n")
        self.clock.advance(2.0)
        self.backendSays(GREETING)
        self.backendSays(b'P1 OK ID completed.\r\nP2 OK [CAPABILITY IMAP4rev1] Logged in\r\n')
        self.assertEqual(self.client.value(), b"b OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        self.assertEqual(
            [failures.recent(key) for key in (address, pairKey(address, "alice"), accountKey("alice"), pairKey(address, "bob"))],
            [1, 0, 0, 1],
        )

    def test_accountFailuresWaitOneDelay(self) -> None:
        """
        Failures of the account from elsewhere (anyone who knows the name
        can cause them) make its owner's login from a clean address wait
        one delay, not one per failure; a login with no name counts under
        no account.
        """
        from mailproxy._shared import accountKey

        self.build(limits=Limits(failureDelay=1.0))
        failures = self.frontend.context.failures
        for _ in range(5):
            failures.failed(accountKey("alice"))
        self.send(b"b LOGIN alice secret\r\n")
        self.clock.advance(0.99)
        self.assertEqual(self.connector.protocols, [])
        self.clock.advance(0.01)
        self.backendSays(GREETING)
        self.backendSays(b'P1 OK ID completed.\r\nP2 OK [CAPABILITY IMAP4rev1] Logged in\r\n')
        self.assertEqual(self.client.value(), b"b OK [CAPABILITY IMAP4rev1] Logged in\r\n")

        second, client = self.connectAgain()
        second.dataReceived(b'c LOGIN "" x\r\n')
        self.clock.advance(5)
        self.assertIn(b"c NO [AUTHENTICATIONFAILED]", client.value())
        self.assertEqual(failures.recent(accountKey("")), 0)

    def test_hangUpBeforeBackendAnswers(self) -> None:
        """
        A client that hangs up while the backend has its credentials does
        not escape the count: the backend's refusal, when it comes, is a
        failed login (counted for the address, logged for fail2ban); its
        acceptance closes the backend connection nobody will use.
        """
        from twisted.logger import formatEvent

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.build(limits=Limits(failureDelay=1.0))
        self.send(b"a LOGIN alice wrong\r\n")
        self.backendSays(GREETING)
        self.frontend.connectionLost(None)
        self.backendSays(b"P1 OK\r\nP2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        failures = self.frontend.context.failures
        self.assertEqual(failures.recent(self.frontend.client.address), 1)
        self.assertTrue(any(formatEvent(e).startswith("authentication failed: ") for e in events))

        second, client = self.connectAgain()
        second.dataReceived(b"b LOGIN alice secret\r\n")
        self.clock.advance(1.0)
        self.backendSays(GREETING)
        second.connectionLost(None)
        self.backendSays(b"P1 OK ID completed.\r\nP2 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        self.assertTrue(self.connector.transports[-1].disconnecting)
        self.assertEqual(failures.recent(self.frontend.client.address), 1)

    def test_rightPasswordWithoutFailuresAtOnce(self) -> None:
        """
        Without failures, a login is answered as soon as the backend
        accepts it.
        """
        self.build(limits=Limits(failureDelay=1.0))
        self.send(b"b LOGIN alice secret\r\n")
        self.backendSays(GREETING)
        self.backendSays(b'P1 OK ID completed.\r\nP2 OK [CAPABILITY IMAP4rev1] Logged in\r\n')
        self.assertEqual(self.client.value(), b"b OK [CAPABILITY IMAP4rev1] Logged in\r\n")

    def test_unknownUserLooksLikeWrongPassword(self) -> None:
        """
        A router rejection gives the same reply as a wrong password, and no
        backend is contacted.
        """
        self.build(limits=Limits(failureDelay=1.0))
        self.send(b"a LOGIN nobody secret\r\n")
        self.clock.advance(1.0)
        self.assertEqual(self.client.value(), b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.assertEqual(self.connector.protocols, [])

    def test_failureDelayFromAttemptStart(self) -> None:
        """
        The failure delay runs from the start of the attempt: a wrong
        password the backend took a while to refuse and an unknown user the
        router took a while to refuse are both answered one delay after the
        LOGIN, not one delay after the refusal.
        """
        self.build(limits=Limits(failureDelay=1.0))
        self.send(b"a LOGIN alice wrong\r\n")
        self.clock.advance(0.3)
        self.backendSays(GREETING)
        self.backendSays(b"P1 OK\r\nP2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.clock.advance(0.69)
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(0.01)
        self.assertEqual(self.client.value(), b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")

        router = FakeRouter(manual=True)
        self.connect(router, limits=Limits(failureDelay=1.0))
        self.send(b"b LOGIN nobody secret\r\n")
        self.clock.advance(0.3)
        router.pending[0].callback(Rejection())
        self.clock.advance(0.69)
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(0.01)
        self.assertEqual(self.client.value(), b"b NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")

    def test_slowRefusalNotDelayedFurther(self) -> None:
        """
        A refusal that took longer than the delay is answered at once.
        """
        router = FakeRouter(manual=True)
        self.connect(router, limits=Limits(failureDelay=1.0))
        self.send(b"a LOGIN nobody secret\r\n")
        self.clock.advance(1.5)
        router.pending[0].callback(Rejection())
        self.assertEqual(self.client.value(), b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")

    def test_temporaryRejection(self) -> None:
        """
        A temporary router rejection says UNAVAILABLE with its text.
        """
        self.build()
        self.router.answers["alice"] = Rejection("Directory down", temporary=True)
        self.send(b"a LOGIN alice secret\r\n")
        self.assertEqual(self.client.value(), b"a NO [UNAVAILABLE] Directory down\r\n")

    def test_rejectionTextSevenBit(self) -> None:
        """
        A router's refusal text with 8-bit characters reaches the client
        as 7-bit ASCII, as IMAP's resp-text must be: accents lose their
        marks, what has no ASCII form becomes C{?}.
        """
        self.build()
        self.router.answers["alice"] = Rejection("Zugang f\u00fcr alice gesperrt \u2013 \u65e5", temporary=True)
        self.send(b"a LOGIN alice secret\r\n")
        self.assertEqual(self.client.value(), b"a NO [UNAVAILABLE] Zugang fur alice gesperrt ? ?\r\n")

    def test_growingDelayAndClose(self) -> None:
        """
        The n-th failure waits n times the delay; after the limit the
        connection closes with BYE.
        """
        self.build(limits=Limits(failureDelay=1.0, loginFailures=3))
        for attempt in (1, 2):
            self.send(b"a LOGIN nobody x\r\n")
            self.clock.advance(attempt - 0.5)
            self.assertEqual(self.client.value(), b"")
            self.clock.advance(0.5)
            self.assertIn(b"a NO [AUTHENTICATIONFAILED]", self.client.value())
        self.send(b"a LOGIN nobody x\r\n")
        self.clock.advance(3.0)
        self.assertEqual(
            self.client.value(),
            b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n* BYE Too many invalid authentication attempts.\r\n",
        )
        self.assertTrue(self.client.disconnecting)

    def test_deadBackend(self) -> None:
        """
        A backend that cannot be reached gives NO [UNAVAILABLE] at once.
        """
        self.build()
        self.connector.refuse = True
        self.assertEqual(
            self.send(b"a LOGIN alice secret\r\n"),
            b"a NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n",
        )

    def test_silentBackendTimesOut(self) -> None:
        """
        A backend that never greets is given up after the backend timeout.
        """
        self.build(limits=Limits(backendTimeout=5))
        self.send(b"a LOGIN alice secret\r\n")
        self.clock.advance(5)
        self.assertIn(b"a NO [UNAVAILABLE]", self.client.value())
        self.assertTrue(self.connector.transports[-1].disconnecting)

    def test_endlessUntaggedLines(self) -> None:
        """
        A backend that answers the login with untagged lines without end
        fails it as temporary after 64 of them, and is disconnected.
        """
        self.build()
        self.send(b"a LOGIN alice secret\r\n")
        self.backendSays(GREETING)
        line = b"* OK [ALERT] Still thinking\r\n"
        sent = self.floodBackend(line)
        self.assertFloodBounded(sent, line, b"a NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n")
        self.assertLessEqual(len(self.connector.protocols[-1].untagged), 64)

    def test_endlessCapabilityLines(self) -> None:
        """
        A backend that keeps sending (here C{* CAPABILITY} lines, which
        are not kept) fails the login as temporary once it sent 256 KiB.
        """
        self.build()
        self.send(b"a LOGIN alice secret\r\n")
        self.backendSays(GREETING)
        line = b"* CAPABILITY IMAP4rev1 " + b"X" * 1000 + b"\r\n"
        sent = self.floodBackend(line)
        self.assertFloodBounded(sent, line, b"a NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n")

    def test_rudeBackendGreeting(self) -> None:
        """
        A backend that greets with BYE gives UNAVAILABLE.
        """
        self.build()
        self.send(b"a LOGIN alice secret\r\n")
        self.backendSays(b"* BYE go away\r\n")
        self.assertIn(b"a NO [UNAVAILABLE]", self.client.value())

    def test_backendCodedRefusalPassedOn(self) -> None:
        """
        A backend NO with a code other than an authentication failure (e.g.
        LIMIT) reaches the client with the client's tag.
        """
        self.build()
        self.send(b"a LOGIN alice secret\r\n")
        self.backendSays(GREETING)
        self.backendSays(b"P1 OK\r\nP2 NO [LIMIT] Too many connections\r\n")
        self.assertEqual(self.client.value(), b"a NO [LIMIT] Too many connections\r\n")

    def test_preauthTimeout(self) -> None:
        """
        A client that does not log in within the pre-auth timeout gets BYE.
        """
        self.build(limits=Limits(preauthTimeout=30))
        self.clock.advance(30)
        self.assertEqual(self.client.value(), b"* BYE Disconnected for inactivity.\r\n")
        self.assertTrue(self.client.disconnecting)

    def test_longLine(self) -> None:
        """
        A line beyond the limit, even without CRLF, ends the connection.
        """
        self.build(limits=Limits(lineLength=100))
        self.assertEqual(self.send(b"a LOGIN " + b"x" * 200), b"* BYE Input buffer full\r\n")
        self.assertTrue(self.client.disconnecting)

    def test_longIDWithDefaults(self) -> None:
        """
        With the default limits, a 30 KB pre-auth ID (as imaptest's C{id}
        test sends, and Dovecot takes) is answered; a line beyond the
        default limit still gets BYE.
        """
        self.build()
        value = b"v" * 1000
        pairs = b" ".join(b'"k%d" "%s"' % (i, value) for i in range(30))
        line = b"a ID (" + pairs + b")\r\n"
        self.assertGreater(len(line), 30000)
        self.assertEqual(self.send(line), b'* ID ("name" "mailproxy")\r\na OK ID completed.\r\n')
        self.assertFalse(self.client.disconnecting)

        self.assertEqual(
            self.send(b"b ID (" + b'"k" "' + b"v" * 65536 + b'")\r\n'),
            b"* BYE Input buffer full\r\n",
        )
        self.assertTrue(self.client.disconnecting)

    def test_connectionsPerAddress(self) -> None:
        """
        Connections beyond the per-address limit are greeted with BYE.
        """
        self.build(limits=Limits(connectionsPerAddress=1))
        _, transport = self.connectAgain()
        self.assertEqual(transport.value(), b"* BYE Too many connections from your address.\r\n")
        self.assertTrue(transport.disconnecting)

    def test_clientLeavesDuringLogin(self) -> None:
        """
        A client that disconnects while the backend login runs makes the
        proxy drop the backend connection.
        """
        self.build()
        self.send(b"a LOGIN alice secret\r\n")
        self.frontend.connectionLost(None)
        self.assertTrue(self.connector.transports[-1].disconnected or self.connector.transports[-1].disconnecting)

    def test_passwordNeverLogged(self) -> None:
        """
        Neither a failed nor a successful login puts the password in a log
        event.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.build()
        self.send(b"a LOGIN alice Sup3rSecretPw\r\n")
        self.backendSays(GREETING)
        self.backendSays(b"P1 OK\r\nP2 NO [AUTHENTICATIONFAILED] no\r\n")
        self.clock.advance(10)
        self.send(b"b LOGIN alice Sup3rSecretPw\r\n")
        self.backendSays(GREETING, index=-1)
        self.backendSays(b"P1 OK\r\nP2 OK [CAPABILITY IMAP4rev1] ok\r\n")
        self.frontend.connectionLost(None)
        self.assertTrue(events)
        for event in events:
            self.assertNotIn("Sup3rSecretPw", repr(event))


class RelayTests(IMAPFrontendTestsMixin, SynchronousTestCase):
    """
    The relay after login.
    """

    def loggedIn(self, limits: Limits | None = None) -> None:
        self.build(limits=limits)
        self.send(b"a LOGIN alice secret\r\n")
        self.backendSays(GREETING)
        self.backendSays(b"P1 OK\r\nP2 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
        self.client.clear()

    def test_backpressure(self) -> None:
        """
        Each leg is registered as the streaming producer of the other, so a
        slow reader pauses the fast sender.
        """
        self.loggedIn()
        backendTransport = self.connector.transports[-1]
        self.assertIs(backendTransport.producer, self.client)
        self.assertIs(self.client.producer, backendTransport)
        self.assertTrue(backendTransport.streaming)

    def test_backendCloseClosesClient(self) -> None:
        """
        When the backend goes away, the client connection is closed too.
        """
        self.loggedIn()
        self.connector.protocols[-1].connectionLost(None)
        self.assertTrue(self.client.disconnecting)

    def test_clientCloseClosesBackend(self) -> None:
        """
        When the client goes away, the backend connection is closed.
        """
        self.loggedIn()
        self.frontend.connectionLost(None)
        self.assertTrue(self.connector.transports[-1].disconnecting)

    def test_idleTimeout(self) -> None:
        """
        A session silent in both directions for the idle timeout is closed
        with a BYE; traffic pushes the deadline back.
        """
        self.loggedIn(Limits(idleTimeout=1800))
        self.clock.advance(1000)
        self.send(b"b NOOP\r\n")
        self.clock.advance(1000)
        self.assertFalse(self.client.disconnecting)
        self.clock.advance(800)
        self.assertEqual(self.client.value(), b"* BYE Idle timeout.\r\n")
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.connector.transports[-1].disconnecting)

    def test_byteCounts(self) -> None:
        """
        The relay counts the octets each way.
        """
        self.loggedIn()
        self.send(b"b NOOP\r\n")
        self.connector.protocols[-1].dataReceived(b"b OK done\r\n")
        self.assertEqual((self.frontend.relay.bytesFromClient, self.frontend.relay.bytesFromBackend), (8, 11))


class ClosingTests(IMAPFrontendTestsMixin, SynchronousTestCase):
    """
    A session the proxy has decided to close reads no more commands and
    does not outlive its deadline, even when the transport still delivers
    input and waits for the peer (as TLS does: it keeps reading until the
    client answers its close alert).
    """

    def test_noCommandsAfterPreauthTimeout(self) -> None:
        """
        Input that arrives after the pre-auth timeout's BYE is not
        executed: the router is never asked.
        """
        self.build(limits=Limits(preauthTimeout=30))
        self.clock.advance(30)
        self.assertEqual(self.send(b"a LOGIN alice secret\r\n"), b"")
        self.assertEqual(self.router.requests, [])

    def test_noCommandsOverConnectionLimit(self) -> None:
        """
        A connection refused for the per-address limit does not execute
        what it sent along (a PROXY header or TLS layer may deliver it).
        """
        self.build(limits=Limits(connectionsPerAddress=1))
        second, transport = self.connectAgain()
        second.dataReceived(b"a LOGIN alice secret\r\n")
        self.assertEqual(transport.value(), b"* BYE Too many connections from your address.\r\n")
        self.assertEqual(self.router.requests, [])

    def test_timedOutConnectionAborted(self) -> None:
        """
        A connection still open a while after the pre-auth timeout closed
        it (its peer never finishes the close) is aborted and leaves the
        session registry.
        """
        self.build(limits=Limits(preauthTimeout=30))
        self.clock.advance(30)
        self.assertTrue(self.client.disconnecting)
        self.assertFalse(self.client.disconnected)
        self.clock.advance(60)
        self.assertTrue(self.client.disconnected)

    def test_loggedOutConnectionAborted(self) -> None:
        """
        After LOGOUT, a peer that keeps the connection open is cut
        C{CLOSE_GRACE} seconds later, long before the pre-auth deadline.
        """
        self.build(limits=Limits(preauthTimeout=30))
        self.send(b"a LOGOUT\r\n")
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(self.client.disconnected)

    def test_relayEndedConnectionAborted(self) -> None:
        """
        After the relay ends (here: the backend closed), a client that keeps
        the connection open is cut a while later.
        """
        self.build()
        self.send(b"a LOGIN alice secret\r\n")
        self.backendSays(GREETING)
        self.backendSays(b"P1 OK\r\nP2 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        self.connector.protocols[-1].connectionLost(None)
        self.assertTrue(self.client.disconnecting)
        self.assertFalse(self.client.disconnected)
        self.clock.advance(60)
        self.assertTrue(self.client.disconnected)

    def test_timedOutAfterStartTLS(self) -> None:
        """
        Under STARTTLS, Twisted's TCP transport reports C{disconnecting}
        only once the TLS close has finished: the pre-auth timeout still
        stops reading commands and aborts a peer that never answers.
        """
        self.build(tls="starttls", limits=Limits(preauthTimeout=30))
        self.send(b"a STARTTLS\r\n")
        # As tcp.Connection does with TLS on: the close is pending in the
        # TLS layer, the socket is not yet disconnecting.
        self.client.loseConnection = lambda: None
        self.clock.advance(30)
        self.assertEqual(self.send(b"b LOGIN alice secret\r\n"), b"")
        self.assertEqual(self.router.requests, [])
        self.clock.advance(60)
        self.assertTrue(self.client.disconnected)

    def test_loginInFlightAtPreauthTimeout(self) -> None:
        """
        A login still running when the pre-auth timeout says BYE is given
        up: the backend connection is closed and the client gets no OK.
        """
        self.build(limits=Limits(preauthTimeout=30))
        self.send(b"a LOGIN alice secret\r\n")
        self.backendSays(GREETING)
        self.clock.advance(30)
        self.assertTrue(self.connector.transports[-1].disconnecting)
        self.backendSays(b"P1 OK\r\nP2 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        self.assertEqual(self.client.value(), b"* BYE Disconnected for inactivity.\r\n")
        self.assertIsNone(self.frontend.relay)


class LogQuotingTests(IMAPFrontendTestsMixin, SynchronousTestCase):
    """
    A login name is the client's choice: in a log line it is quoted, so it
    cannot break the line or forge another (a fake "authentication failed"
    line would make fail2ban ban someone else).
    """

    USER = b'x\nauthentication failed: session=s address=203.0.113.9 protocol=imap user="x" attempt=1'

    def loggedLines(self) -> list[str]:
        from twisted.logger import formatEvent

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.send(b"a LOGIN {%d}\r\n" % (len(self.USER),))
        self.send(self.USER + b" secret\r\n")
        self.clock.advance(60)
        return [formatEvent(event) for event in events]

    def assertOneLineEach(self, lines: list[str]) -> None:
        self.assertTrue(lines)
        for line in lines:
            self.assertNotIn("\n", line)

    def test_routerRejection(self) -> None:
        """
        The line about a router's refusal quotes the login name.
        """
        self.build()
        self.assertOneLineEach(self.loggedLines())

    def test_backendFailure(self) -> None:
        """
        The line about a failed backend login quotes the login name.
        """
        self.build()
        self.router.default = Route(self.backend)
        self.connector.refuse = True
        self.assertOneLineEach(self.loggedLines())

    def test_noPasswordForBackend(self) -> None:
        """
        The warning about a route without a password quotes the login name.
        """
        from mailproxy._session import FrontendProtocol
        from mailproxy.model import Credentials

        self.build()
        self.router.default = Route(self.backend)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        from twisted.logger import formatEvent

        credentials = Credentials("CRAM-MD5", self.USER.decode(), response=b"r", challenge=b"<c>")
        FrontendProtocol.login(self.frontend, credentials).addErrback(lambda f: None)
        self.clock.advance(60)
        self.assertOneLineEach([formatEvent(event) for event in events])


class PipelinedLoginTests(IMAPFrontendTestsMixin, SynchronousTestCase):
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
        out = self.send(b"a LOGIN nobody x\r\n" * 400 + b"b NOOP\r\n")
        self.assertEqual(out, b"a NO [UNAVAILABLE] Directory down\r\n" * 400 + b"b OK NOOP completed.\r\n")


class StartTLSForgetsTests(IMAPFrontendTestsMixin, SynchronousTestCase):
    """
    What the client said in plaintext before STARTTLS does not count after
    it (RFC 9051 §6.2.1): a man in the middle could have said it.
    """

    def test_idForgotten(self) -> None:
        """
        An ID sent before STARTTLS reaches neither the router nor the
        backend; the first ID after the handshake counts.
        """
        self.build(tls="starttls")
        self.send(b'a ID ("name" "injected")\r\n')
        self.send(b"b STARTTLS\r\n")
        self.send(b'c ID ("name" "Thunderbird")\r\n')
        self.send(b"d LOGIN alice secret\r\n")
        self.assertEqual(self.router.requests[0].clientID, (("name", "Thunderbird"),))


class BackendTextTests(IMAPFrontendTestsMixin, SynchronousTestCase):
    """
    The text of the backend's tagged reply to the login reaches the client
    as one line: a literal in it, or anything after a line break, does not.
    """

    def test_okTextLiteral(self) -> None:
        """
        An OK whose text ends in a literal gives the client the text before
        the literal; the literal's octets are not written.
        """
        self.build()
        self.send(b"a LOGIN alice secret\r\n")
        self.backendSays(GREETING)
        self.backendSays(b"P1 OK\r\nP2 OK [CAPABILITY IMAP4rev1] Logged in {20}\r\n* 1 EXISTS\r\nb OK x\r\n\r\n")
        self.assertEqual(self.client.value(), b"a OK [CAPABILITY IMAP4rev1] Logged in\r\n")

    def test_okTextControl(self) -> None:
        """
        Control characters in the OK text become spaces, and the text is
        bounded.
        """
        self.build()
        self.send(b"a LOGIN alice secret\r\n")
        self.backendSays(GREETING)
        self.backendSays(b"P1 OK\r\nP2 OK [CAPABILITY IMAP4rev1] Logged\x00in\rb OK " + b"x" * 300 + b"\r\n")
        self.assertEqual(self.client.value(), b"a OK [CAPABILITY IMAP4rev1] Logged in\r\n")

    def test_refusalLiteral(self) -> None:
        """
        A passed-on refusal whose text ends in a literal reaches the client
        without it.
        """
        self.build()
        self.send(b"a LOGIN alice secret\r\n")
        self.backendSays(GREETING)
        self.backendSays(b"P1 OK\r\nP2 NO [LIMIT] Too many {14}\r\na OK injected\r\n")
        self.assertEqual(self.client.value(), b"a NO [LIMIT] Too many\r\n")
        self.assertEqual(self.send(b"b NOOP\r\n"), b"b OK NOOP completed.\r\n")


class CramMD5Tests(IMAPFrontendTestsMixin, SynchronousTestCase):
    """
    AUTHENTICATE CRAM-MD5 on listeners with C{digest_auth = true}.
    """

    def build(self, tls: str = "none", digestAuth: bool = True, **routeArgs: Any) -> None:  # type: ignore[override]
        self.backend = makeBackend("old")
        self.connect(FakeRouter({"alice": Route(self.backend, **routeArgs)}), tls=tls, digestAuth=digestAuth)

    def test_offeredWithDigestAuth(self) -> None:
        """
        The greeting and CAPABILITY list AUTH=CRAM-MD5 after PLAIN and
        LOGIN; not on a listener without C{digest_auth}, nor before TLS
        on a starttls-required one.
        """
        self.build()
        self.assertIn(b" AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5]", self.greeting)
        self.assertIn(b" AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5\r\n", self.send(b"a CAPABILITY\r\n"))
        self.build(digestAuth=False)
        self.assertNotIn(b"CRAM-MD5", self.greeting)
        self.build(tls="starttls-required")
        self.assertNotIn(b"CRAM-MD5", self.send(b"a CAPABILITY\r\n"))
        self.assertEqual(self.send(b"b AUTHENTICATE CRAM-MD5\r\n"), b"b NO " + _PRIVACY_REQUIRED + b"\r\n")

    def test_challengeAndDigest(self) -> None:
        """
        AUTHENTICATE CRAM-MD5 sends a fresh challenge; the router gets the
        challenge and the client's digest (no password), which proves the
        password; the backend gets the route's password.
        """
        self.build(password=b"backend pw")
        reply = self.send(b"a AUTHENTICATE CRAM-MD5\r\n")
        self.assertTrue(reply.startswith(b"+ ") and reply.endswith(b"\r\n"), reply)
        challenge = b64decode(reply[2:-2])
        self.assertRegex(challenge, rb"\A<[0-9a-f]{24}\.0@proxy\.test>\Z")
        digest = hmac.new(b"secret", challenge, hashlib.md5).hexdigest().encode()
        self.send(b64encode(b"alice " + digest) + b"\r\n")
        credentials = self.router.requests[-1].credentials
        self.assertEqual(
            (credentials.mechanism, credentials.user, credentials.challenge, credentials.password),
            ("CRAM-MD5", "alice", challenge, None),
        )
        self.assertTrue(credentials.check(b"secret"))
        self.assertFalse(credentials.check(b"wrong"))
        sent = self.backendSays(GREETING)
        self.assertIn(b"AUTHENTICATE PLAIN " + b64encode(b"\x00alice\x00backend pw") + b"\r\n", sent)

    def test_masterUser(self) -> None:
        """
        A route with C{useMaster} logs the CRAM-MD5 client in as the
        backend's master user on the account's behalf.
        """
        self.backend = makeBackend("old", masterUser="proxy", masterPassword=b"masterpw")
        self.connect(FakeRouter({"alice": Route(self.backend, useMaster=True)}), digestAuth=True)
        challenge = b64decode(self.send(b"a AUTHENTICATE CRAM-MD5\r\n")[2:-2])
        digest = hmac.new(b"secret", challenge, hashlib.md5).hexdigest().encode()
        self.send(b64encode(b"alice " + digest) + b"\r\n")
        sent = self.backendSays(GREETING)
        self.assertIn(b"AUTHENTICATE PLAIN " + b64encode(b"alice\x00proxy\x00masterpw") + b"\r\n", sent)

    def test_errors(self) -> None:
        """
        CRAM-MD5 takes no initial response, needs C{user digest}, and is
        refused where C{digest_auth} is off; the router is never asked.
        """
        self.build()
        self.assertEqual(self.send(b"a AUTHENTICATE CRAM-MD5 YWJj\r\n"), b"a BAD CRAM-MD5 takes no initial response.\r\n")
        self.send(b"b AUTHENTICATE CRAM-MD5\r\n")
        self.assertEqual(self.send(b64encode(b"alice nothex") + b"\r\n"), b"b BAD Invalid CRAM-MD5 response.\r\n")
        self.send(b"c AUTHENTICATE CRAM-MD5\r\n")
        self.assertEqual(self.send(b"*\r\n"), b"c BAD Authentication aborted by client.\r\n")
        self.build(digestAuth=False)
        self.assertEqual(self.send(b"d AUTHENTICATE CRAM-MD5\r\n"), b"d NO Unsupported authentication mechanism.\r\n")
        self.assertEqual(self.router.requests, [])

    def test_routerWithoutPassword(self) -> None:
        """
        A route without a password for a digest login cannot log in to the
        backend: C{NO [UNAVAILABLE]}, no backend contacted.
        """
        self.build()
        challenge = b64decode(self.send(b"a AUTHENTICATE CRAM-MD5\r\n")[2:-2])
        digest = hmac.new(b"secret", challenge, hashlib.md5).hexdigest().encode()
        reply = self.send(b64encode(b"alice " + digest) + b"\r\n")
        self.assertTrue(reply.startswith(b"a NO [UNAVAILABLE]"), reply)
        self.assertEqual(self.connector.protocols, [])
