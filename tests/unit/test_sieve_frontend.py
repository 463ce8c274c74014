"""
The ManageSieve front end and its backend login, over in-memory transports.

The client is a L{TLSStringTransport}; the backend is another, whose
replies the tests write by hand in Dovecot's (Pigeonhole's) dialect.
"""

from __future__ import annotations

from base64 import b64encode

from attrs import evolve
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailproxy._contract import ILoginFrontend
from mailproxy.config import Limits
from mailproxy.model import Rejection, TLSInfo
from mailproxy.sieve._frontend import DEFAULT_SIEVE_EXTENSIONS
from mailproxy.testing import FakeRouter, makeBackend, makeFrontend

from .frontendhelpers import FrontendTestsMixin

SIEVE = b'"SIEVE" "' + DEFAULT_SIEVE_EXTENSIONS.encode() + b'"\r\n'

#: Pigeonhole's greeting to a trusted peer (it offers XCLIENT).
GREETING = (
    b'"IMPLEMENTATION" "Dovecot (Debian) Pigeonhole"\r\n'
    b'"SIEVE" "fileinto reject envelope"\r\n'
    b'"NOTIFY" "mailto"\r\n'
    b'"SASL" "PLAIN LOGIN CRAM-MD5"\r\n'
    b'"STARTTLS"\r\n'
    b'"VERSION" "1.0"\r\n'
    b'"XCLIENT"\r\n'
    b'OK "Dovecot (Debian) ready."\r\n'
)
#: The same greeting to an untrusted peer.
UNTRUSTED_GREETING = GREETING.replace(b'"XCLIENT"\r\n', b"")

ALICE_PLAIN = b64encode(b"\x00alice\x00secret")


def capabilityBlock(sasl: bytes = b"PLAIN LOGIN", startTLS: bool = False, ok: bytes = b"") -> bytes:
    """
    The proxy's capability lines followed by C{OK "<ok>"}.
    """
    return (
        b'"IMPLEMENTATION" "mailproxy"\r\n'
        + SIEVE
        + b'"NOTIFY" "mailto"\r\n'
        + b'"SASL" "' + sasl + b'"\r\n'
        + (b'"STARTTLS"\r\n' if startTLS else b"")
        + b'"VERSION" "1.0"\r\n'
        + b'OK "' + ok + b'"\r\n'
    )


class SieveFrontendTestsMixin(FrontendTestsMixin):
    """
    Helpers: a ManageSieve front end with a fake router and an in-memory
    backend.
    """

    protocol = "sieve"

    def authenticate(self, command: bytes = b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n') -> bytes:
        """
        Send C{command} and play an untrusted backend's greeting; return
        what the proxy then sent the backend.
        """
        self.send(command)
        return self.backendSays(UNTRUSTED_GREETING)


class GreetingTests(SieveFrontendTestsMixin, SynchronousTestCase):
    """
    What a client learns before logging in, and the commands that need no
    login.
    """

    def test_greetingOnStartTLSPort(self) -> None:
        """
        The greeting is the capability list with STARTTLS and both SASL
        mechanisms, then OK.
        """
        _, client, _ = makeFrontend("sieve", FakeRouter(), tls="starttls")
        self.assertEqual(
            client.value(), capabilityBlock(startTLS=True, ok=b"proxy.test ManageSieve proxy ready.")
        )

    def test_contract(self) -> None:
        """
        The ManageSieve front end implements the protocol side of the
        core's contract for a front end whose clients log in.
        """
        frontend, _, _ = makeFrontend("sieve", FakeRouter())
        self.assertTrue(verifyObject(ILoginFrontend, frontend))

    def test_startTLSRequiredHidesMechanisms(self) -> None:
        """
        Before TLS on a starttls-required port the SASL list is empty (RFC
        5804 allows that only with STARTTLS offered).
        """
        self.build(tls="starttls-required")
        self.assertEqual(
            self.send(b"CAPABILITY\r\n"), capabilityBlock(sasl=b"", startTLS=True, ok=b"Capability completed.")
        )

    def test_implicitTLS(self) -> None:
        """
        On an implicit TLS port STARTTLS is neither offered nor accepted.
        """
        self.build(tls="implicit")
        self.assertEqual(self.send(b"capability\r\n"), capabilityBlock(ok=b"Capability completed."))
        self.assertEqual(self.send(b"STARTTLS\r\n"), b'NO "TLS is already active."\r\n')

    def test_noTLSListener(self) -> None:
        """
        On a listener without TLS, STARTTLS is refused.
        """
        self.build(tls="none")
        self.assertEqual(self.send(b"STARTTLS\r\n"), b'NO "STARTTLS is not available on this port."\r\n')

    def test_capabilityTakesNoArguments(self) -> None:
        """
        CAPABILITY with an argument gets NO.
        """
        self.build()
        self.assertEqual(self.send(b'CAPABILITY "x"\r\n'), b'NO "CAPABILITY takes no arguments."\r\n')

    def test_noop(self) -> None:
        """
        NOOP answers OK; with a string, the string comes back in a TAG
        response code, re-quoted as needed; anything else gets NO.
        """
        self.build()
        self.assertEqual(self.send(b"NOOP\r\n"), b'OK "NOOP completed."\r\n')
        self.assertEqual(
            self.send(b'NOOP "STARTTLS-RESYNC-CAPA"\r\n'), b'OK (TAG "STARTTLS-RESYNC-CAPA") "Done"\r\n'
        )
        self.assertEqual(self.send(b'NOOP "a\\"b"\r\n'), b'OK (TAG "a\\"b") "Done"\r\n')
        self.assertEqual(self.send(b"NOOP {3+}\r\na\nb\r\n"), b'OK (TAG {3}\r\na\nb) "Done"\r\n')
        self.assertEqual(self.send(b"NOOP atom\r\n"), b'NO "NOOP takes one optional string."\r\n')
        self.assertEqual(self.send(b'NOOP "a" "b"\r\n'), b'NO "NOOP takes one optional string."\r\n')

    def test_logout(self) -> None:
        """
        LOGOUT answers OK and closes the connection; nothing after it is
        read.
        """
        self.build()
        self.assertEqual(self.send(b"LOGOUT\r\nNOOP\r\n"), b'OK "Logout completed."\r\n')
        self.assertTrue(self.client.disconnecting)

    def test_otherCommands(self) -> None:
        """
        Commands of an authenticated session get NO "Authenticate first.",
        unknown commands, empty lines, syntax errors and non-atom command
        names get NO too.
        """
        self.build()
        self.assertEqual(self.send(b"LISTSCRIPTS\r\n"), b'NO "Authenticate first."\r\n')
        self.assertEqual(self.send(b'putscript "a" {5+}\r\nkeep;\r\n'), b'NO "Authenticate first."\r\n')
        self.assertEqual(self.send(b"UNAUTHENTICATE\r\n"), b'NO "Authenticate first."\r\n')
        self.assertEqual(self.send(b"FROB\r\n"), b'NO "Unknown command."\r\n')
        self.assertEqual(self.send(b"\r\n"), b'NO "Empty command."\r\n')
        self.assertEqual(self.send(b'"NOOP"\r\n'), b'NO "Invalid command name."\r\n')
        self.assertEqual(self.send(b'NOOP "open\r\n'), b'NO "Missing closing quote."\r\n')
        self.assertFalse(self.client.disconnecting)

    def test_tooManyBadCommands(self) -> None:
        """
        After ten invalid commands the connection is closed with BYE.
        """
        self.build()
        out = self.send(b"FROB\r\n" * 10 + b"NOOP\r\n")
        self.assertTrue(out.endswith(b'NO "Unknown command."\r\nBYE "Too many invalid MANAGESIEVE commands."\r\n'))
        self.assertNotIn(b"NOOP completed", out)
        self.assertTrue(self.client.disconnecting)

    def test_longLine(self) -> None:
        """
        A line beyond the limit, even without its end, gets BYE and the
        connection closes.
        """
        self.build(limits=Limits(lineLength=600))
        self.assertEqual(self.send(b"NOOP " + b"x" * 700), b'BYE "Input buffer full."\r\n')
        self.assertTrue(self.client.disconnecting)

    def test_literalTooBig(self) -> None:
        """
        A literal over C{literal_size} gets BYE: its octets cannot be told
        from commands.
        """
        self.build(limits=Limits(literalSize=100))
        self.assertEqual(self.send(b'AUTHENTICATE "PLAIN" {101+}\r\n'), b'BYE "Literal too big."\r\n')
        self.assertTrue(self.client.disconnecting)


class StartTLSTests(SieveFrontendTestsMixin, SynchronousTestCase):
    """
    STARTTLS towards the client.
    """

    def test_startTLS(self) -> None:
        """
        STARTTLS is answered OK and TLS starts right after the reply;
        after the handshake the proxy re-sends its capabilities, now
        without STARTTLS, followed by OK (RFC 5804 section 2.2).
        """
        self.build(tls="starttls-required")
        self.assertEqual(self.send(b"STARTTLS\r\n"), b'OK "Begin TLS negotiation now."\r\n')
        self.assertIsNotNone(self.client.tlsOptions)
        self.assertEqual(self.client.writtenBeforeTLS, b'OK "Begin TLS negotiation now."\r\n')
        self.client.clear()
        self.frontend.handshakeCompleted()
        self.assertEqual(self.client.value(), capabilityBlock(ok=b"TLS negotiation successful."))
        self.assertEqual(self.send(b"STARTTLS\r\n"), b'NO "TLS is already active."\r\n')

    def test_injectionDiscarded(self) -> None:
        """
        Commands pipelined in plaintext behind STARTTLS are discarded, not
        executed after the handshake (CVE-2011-0411).
        """
        self.build(tls="starttls")
        out = self.send(b'STARTTLS\r\nAUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\nNOOP\r\n')
        self.assertEqual(out, b'OK "Begin TLS negotiation now."\r\n')
        self.assertEqual(self.router.requests, [])
        self.frontend.handshakeCompleted()
        self.assertEqual(self.send(b'NOOP "t"\r\n'), b'OK (TAG "t") "Done"\r\n')

    def test_implicitHandshakeSendsNothing(self) -> None:
        """
        On an implicit TLS port the handshake is not followed by a second
        capability list: the greeting came after it already.
        """
        self.build(tls="implicit")
        self.frontend.handshakeCompleted()
        self.assertEqual(self.client.value(), b"")

    def test_authenticateRequiresTLS(self) -> None:
        """
        AUTHENTICATE before TLS on a starttls-required port gets
        NO (ENCRYPT-NEEDED) and the router is never asked.
        """
        self.build(tls="starttls-required")
        self.assertEqual(
            self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n'),
            b'NO (ENCRYPT-NEEDED) "Plaintext authentication disallowed on non-secure (SSL/TLS) connections."\r\n',
        )
        self.assertEqual(self.router.requests, [])


class AuthenticateTests(SieveFrontendTestsMixin, SynchronousTestCase):
    """
    The client's AUTHENTICATE, in every form.
    """

    def credentials(self) -> tuple[str, str, bytes]:
        """
        The mechanism, user and password the router was asked about.
        """
        [request] = self.router.requests
        credentials = request.credentials
        return credentials.mechanism, credentials.user, credentials.password

    def test_plainQuoted(self) -> None:
        """
        PLAIN with a quoted initial response reaches the router at once.
        """
        self.build()
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        self.assertEqual(self.credentials(), ("PLAIN", "alice", b"secret"))
        self.assertEqual(self.router.requests[0].protocol, "sieve")

    def test_plainLiteral(self) -> None:
        """
        PLAIN with the initial response as a C{{n+}} literal (as
        sieve-connect sends it) or a C{{n}} literal works the same.
        """
        for marker in (b"{%d+}", b"{%d}"):
            self.build()
            self.send(b'AUTHENTICATE "PLAIN" ' + marker % (len(ALICE_PLAIN),) + b"\r\n" + ALICE_PLAIN + b"\r\n")
            self.assertEqual(self.credentials(), ("PLAIN", "alice", b"secret"))

    def test_mechanismCaseAndAtom(self) -> None:
        """
        The mechanism name is case-insensitive and, leniently, may be an
        atom.
        """
        self.build()
        self.send(b"AUTHENTICATE plain " + b'"' + ALICE_PLAIN + b'"\r\n')
        self.assertEqual(self.credentials(), ("PLAIN", "alice", b"secret"))

    def test_plainChallenge(self) -> None:
        """
        PLAIN without an initial response gets an empty challenge and takes
        the response as a quoted string or a literal.
        """
        self.build()
        self.assertEqual(self.send(b'AUTHENTICATE "PLAIN"\r\n'), b'""\r\n')
        self.assertEqual(self.send(b'"' + ALICE_PLAIN + b'"\r\n'), b"")
        self.assertEqual(self.credentials(), ("PLAIN", "alice", b"secret"))
        self.build()
        self.send(b'AUTHENTICATE "PLAIN"\r\n')
        self.send(b"{%d+}\r\n" % (len(ALICE_PLAIN),) + ALICE_PLAIN + b"\r\n")
        self.assertEqual(self.credentials(), ("PLAIN", "alice", b"secret"))

    def test_login(self) -> None:
        """
        LOGIN prompts for the user name and the password as base64 quoted
        strings.
        """
        self.build()
        self.assertEqual(self.send(b'AUTHENTICATE "LOGIN"\r\n'), b'"' + b64encode(b"Username:") + b'"\r\n')
        self.assertEqual(
            self.send(b"{8+}\r\n" + b64encode(b"alice") + b"\r\n"), b'"' + b64encode(b"Password:") + b'"\r\n'
        )
        self.send(b'"' + b64encode(b"se cr\"et") + b'"\r\n')
        self.assertEqual(self.credentials(), ("LOGIN", "alice", b'se cr"et'))

    def test_loginInitialResponse(self) -> None:
        """
        LOGIN with an initial response takes it as the user name.
        """
        self.build()
        self.assertEqual(
            self.send(b'AUTHENTICATE "LOGIN" "' + b64encode(b"alice") + b'"\r\n'),
            b'"' + b64encode(b"Password:") + b'"\r\n',
        )
        self.send(b'"' + b64encode(b"secret") + b'"\r\n')
        self.assertEqual(self.credentials(), ("LOGIN", "alice", b"secret"))

    def test_cancel(self) -> None:
        """
        The string C{"*"} (or, leniently, a bare C{*}) cancels the exchange
        with NO; the connection stays usable and nothing is counted bad.
        """
        self.build()
        for cancel in (b'"*"', b"*"):
            self.send(b'AUTHENTICATE "PLAIN"\r\n')
            self.assertEqual(self.send(cancel + b"\r\n"), b'NO "Authentication aborted by client."\r\n')
        self.assertEqual(self.frontend.badCommands, 0)
        self.assertEqual(self.send(b"NOOP\r\n"), b'OK "NOOP completed."\r\n')
        self.assertEqual(self.router.requests, [])

    def test_invalidResponses(self) -> None:
        """
        A response that is not exactly one string, or not base64, ends the
        exchange with NO.
        """
        self.build()
        for response in (b'"a" "b"', b"", b"abc", b'"open', b"(x)"):
            self.send(b'AUTHENTICATE "LOGIN"\r\n')
            self.assertEqual(
                self.send(response + b"\r\n"), b'NO "Invalid AUTHENTICATE client response."\r\n', response
            )
        self.send(b'AUTHENTICATE "LOGIN"\r\n')
        self.assertEqual(self.send(b'"!!!!"\r\n'), b'NO "Invalid base64 data in AUTHENTICATE response."\r\n')
        self.assertEqual(
            self.send(b'AUTHENTICATE "PLAIN" "!!!!"\r\n'), b'NO "Invalid base64 data in AUTHENTICATE response."\r\n'
        )
        self.assertEqual(
            self.send(b'AUTHENTICATE "PLAIN" (x)\r\n'), b'NO "Invalid AUTHENTICATE initial response."\r\n'
        )
        self.assertEqual(self.send(b"NOOP\r\n"), b'OK "NOOP completed."\r\n')
        self.assertEqual(self.router.requests, [])

    def test_badArguments(self) -> None:
        """
        AUTHENTICATE without a mechanism, with too many arguments or with a
        list for a mechanism gets NO; an unknown mechanism gets NO.
        """
        self.build()
        self.assertEqual(
            self.send(b"AUTHENTICATE\r\n"), b'NO "AUTHENTICATE takes a mechanism and an optional initial response."\r\n'
        )
        self.assertEqual(
            self.send(b'AUTHENTICATE "PLAIN" "a" "b"\r\n'),
            b'NO "AUTHENTICATE takes a mechanism and an optional initial response."\r\n',
        )
        self.assertEqual(self.send(b"AUTHENTICATE (PLAIN)\r\n"), b'NO "Invalid mechanism name."\r\n')
        self.assertEqual(self.send(b'AUTHENTICATE "CRAM-MD5"\r\n'), b'NO "Unsupported authentication mechanism."\r\n')

    def test_invalidPlain(self) -> None:
        """
        A PLAIN response without two NULs or without a user gets NO; one
        that asks to act as another user gets NO too.
        """
        self.build()
        for response in (b"alice\x00secret", b"\x00\x00secret", b"a\x00b\x00c\x00d"):
            self.assertEqual(
                self.send(b'AUTHENTICATE "PLAIN" "' + b64encode(response) + b'"\r\n'),
                b'NO "Invalid PLAIN response."\r\n',
            )
        self.assertEqual(
            self.send(b'AUTHENTICATE "PLAIN" "' + b64encode(b"bob\x00alice\x00secret") + b'"\r\n'),
            b'NO "Authorization identity not supported."\r\n',
        )
        self.send(b'AUTHENTICATE "PLAIN" "' + b64encode(b"alice\x00alice\x00secret") + b'"\r\n')
        self.assertEqual(self.credentials(), ("PLAIN", "alice", b"secret"))


class BackendLoginTests(SieveFrontendTestsMixin, SynchronousTestCase):
    """
    The proxy's login at the backend, and the hand-over.
    """

    def test_xclientWhenOffered(self) -> None:
        """
        With C{forward = "auto"} and XCLIENT offered, the proxy sends
        XCLIENT with the client's addresses and AUTHENTICATE PLAIN in one
        write, and waits for both replies.
        """
        self.build()
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        sid = self.frontend.client.sessionId.encode()
        self.assertEqual(
            self.backendSays(GREETING),
            b"XCLIENT ADDR=192.0.2.10 PORT=50000 DESTADDR=192.0.2.1 DESTPORT=143 SESSION=" + sid
            + b" TTL=5 CLIENT-TRANSPORT=insecure\r\n"
            + b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n',
        )
        self.assertEqual(self.backendSays(b'OK "Updated"\r\n'), b"")
        self.assertEqual(self.frontend.transport.value(), b"")

    def test_xclientTLSAndServerName(self) -> None:
        """
        For a TLS client, XCLIENT says C{CLIENT-TRANSPORT=TLS} and passes
        the SNI name as C{DESTNAME}.
        """
        self.build(tls="implicit")
        self.frontend.client = evolve(self.frontend.client, tls=TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", "sieve.example.org"))
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        sent = self.backendSays(GREETING)
        self.assertIn(b" CLIENT-TRANSPORT=TLS DESTNAME=sieve.example.org\r\n", sent)

    def test_noXClientWhenNotOffered(self) -> None:
        """
        With C{forward = "auto"} and no XCLIENT offered (an untrusted
        proxy), the proxy logs in straight away.
        """
        self.build()
        self.assertEqual(self.authenticate(), b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')

    def test_xclientForced(self) -> None:
        """
        With C{forward = "xclient"} the proxy sends XCLIENT even if it is
        not offered; a refusal fails the login as unavailable.
        """
        self.build(backend=makeBackend("old", forward="xclient"))
        self.assertTrue(self.authenticate().startswith(b"XCLIENT ADDR=192.0.2.10 "))
        self.backendSays(b'NO "You are not from trusted IP"\r\n')
        self.assertEqual(
            self.client.value(), b'NO (TRYLATER) "Service temporarily unavailable, try again later."\r\n'
        )
        self.assertTrue(self.connector.transports[-1].disconnecting)

    def test_noForwarding(self) -> None:
        """
        With C{forward = "none"} (or C{"id"}, which is IMAP's) no XCLIENT
        is sent even if offered.
        """
        for forward in ("none", "id"):
            self.build(backend=makeBackend("old", forward=forward))
            self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
            self.assertEqual(self.backendSays(GREETING), b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')

    def test_proxyHeader(self) -> None:
        """
        With C{forward = "proxy-v1"} the PROXY header comes first and no
        XCLIENT follows.
        """
        self.build(backend=makeBackend("old", forward="proxy-v1"))
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        self.assertEqual(self.connector.transports[-1].value(), b"PROXY TCP4 192.0.2.10 192.0.2.1 50000 143\r\n")
        self.assertEqual(self.backendSays(GREETING), b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')

    def test_success(self) -> None:
        """
        The backend's OK line (its response code included) is the client's
        reply; then bytes flow unchanged both ways, so CAPABILITY is
        answered by the backend.
        """
        self.build()
        self.authenticate()
        self.backendSays(b'OK (SASL "c2VydmVy") "Logged in."\r\n')
        self.assertEqual(self.client.value(), b'OK (SASL "c2VydmVy") "Logged in."\r\n')
        backendTransport = self.connector.transports[-1]
        backendTransport.clear()
        self.send(b"CAPABILITY\r\n")
        self.assertEqual(backendTransport.value(), b"CAPABILITY\r\n")
        self.client.clear()
        self.connector.protocols[-1].dataReceived(b'"SIEVE" "fileinto"\r\nOK "Capability completed."\r\n')
        self.assertEqual(self.client.value(), b'"SIEVE" "fileinto"\r\nOK "Capability completed."\r\n')
        self.assertEqual(self.frontend.result, "logged in")

    def test_pipelined(self) -> None:
        """
        Commands the client pipelined behind AUTHENTICATE go to the backend
        after the hand-over, and backend bytes after its OK reach the
        client.
        """
        self.build()
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\nLISTSCRIPTS\r\n')
        self.backendSays(UNTRUSTED_GREETING)
        backendTransport = self.connector.transports[-1]
        backendTransport.clear()
        self.backendSays(b'OK "Logged in."\r\n"a" ACTIVE\r\n')
        self.assertEqual(backendTransport.value(), b"LISTSCRIPTS\r\n")
        self.assertEqual(self.client.value(), b'OK "Logged in."\r\n"a" ACTIVE\r\n')

    def test_chunkedBackend(self) -> None:
        """
        The backend's greeting and reply may arrive an octet at a time.
        """
        self.build()
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        for octet in UNTRUSTED_GREETING + b'OK "Logged in."\r\n':
            self.connector.protocols[-1].dataReceived(bytes([octet]))
        self.assertEqual(self.client.value(), b'OK "Logged in."\r\n')

    def test_masterUser(self) -> None:
        """
        A route with C{useMaster} logs in with the master user as
        authentication identity and the account as authorization identity.
        """
        self.build(backend=makeBackend("old", masterUser="proxy", masterPassword=b"masterpw"), useMaster=True)
        self.assertEqual(
            self.authenticate(),
            b'AUTHENTICATE "PLAIN" "' + b64encode(b"alice\x00proxy\x00masterpw") + b'"\r\n',
        )

    def test_longCredentials(self) -> None:
        """
        A PLAIN response too long for a quoted string is sent as a
        non-synchronizing literal.
        """
        password = b"p" * 900
        self.build(password=password)
        response = b64encode(b"\x00alice\x00" + password)
        self.assertEqual(self.authenticate(), b'AUTHENTICATE "PLAIN" {%d+}\r\n' % (len(response),) + response + b"\r\n")

    def test_backendStartTLS(self) -> None:
        """
        With C{tls = "starttls"} the proxy sends STARTTLS first, writes no
        credentials before the handshake, then reads the capabilities the
        server re-sends and forgets the ones from before TLS: an XCLIENT
        offered only in clear is not used.
        """
        self.build(backend=makeBackend("old", tls="starttls"))
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        self.assertEqual(self.backendSays(GREETING), b"STARTTLS\r\n")
        self.assertEqual(self.backendSays(b'OK "Begin TLS negotiation now."\r\n'), b"")
        transport = self.connector.transports[-1]
        self.assertIsNotNone(transport.tlsOptions)
        self.connector.protocols[-1].handshakeCompleted()
        self.assertEqual(transport.value(), b"")
        afterTLS = UNTRUSTED_GREETING.replace(b'"STARTTLS"\r\n', b"").replace(b"ready.", b"TLS negotiation successful.")
        self.assertEqual(self.backendSays(afterTLS), b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        self.backendSays(b'OK "Logged in."\r\n')
        self.assertEqual(self.client.value(), b'OK "Logged in."\r\n')

    def test_backendStartTLSThenXClient(self) -> None:
        """
        XCLIENT offered in the capabilities re-sent after TLS is used.
        """
        self.build(backend=makeBackend("old", tls="starttls"))
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        self.backendSays(GREETING)
        self.backendSays(b'OK "Begin TLS negotiation now."\r\n')
        self.connector.protocols[-1].handshakeCompleted()
        self.assertTrue(self.backendSays(GREETING.replace(b'"STARTTLS"\r\n', b"")).startswith(b"XCLIENT "))


class BackendFailureTests(SieveFrontendTestsMixin, SynchronousTestCase):
    """
    Everything a backend can do wrong during the login.
    """

    UNAVAILABLE = b'NO (TRYLATER) "Service temporarily unavailable, try again later."\r\n'

    def assertUnavailable(self) -> None:
        """
        The client got the temporary failure and the backend connection is
        closed.
        """
        self.assertEqual(self.client.value(), self.UNAVAILABLE)
        transport = self.connector.transports[-1]
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.assertEqual(self.send(b"NOOP\r\n"), b'OK "NOOP completed."\r\n')

    def test_endlessCapabilityLines(self) -> None:
        """
        A backend whose capability greeting never ends fails the login as
        temporary (TRYLATER) once it sent 256 KiB, and is disconnected.
        """
        self.build()
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        line = b'"X-CAPABILITY" "' + b"y" * 100 + b'"\r\n'
        self.assertFloodBounded(self.floodBackend(line), line, self.UNAVAILABLE)

    def test_wrongPassword(self) -> None:
        """
        A backend NO becomes the generic failure, only after the
        failed-login delay; the client may try again.
        """
        self.build(limits=Limits(failureDelay=2.0))
        self.authenticate()
        self.backendSays(b'NO "Authentication failed."\r\n')
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(2.0)
        self.assertEqual(self.client.value(), b'NO "Authentication failed."\r\n')
        self.assertEqual(self.send(b"NOOP\r\n"), b'OK "NOOP completed."\r\n')

    def test_endlessCapabilityGreeting(self) -> None:
        """
        A backend whose capability greeting never ends is a temporary
        failure once it has named more capabilities than any server has,
        not a table the proxy keeps growing until C{backend_timeout}.
        """
        self.build()
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        self.backendSays(b"".join(b'"X-%d" "value"\r\n' % (n,) for n in range(1000)))
        self.assertUnavailable()

    def test_backendTextNotShown(self) -> None:
        """
        Whatever text or code (other than TRYLATER) the backend's NO
        carries, the client sees only the generic failure.
        """
        self.build(limits=Limits(failureDelay=0))
        self.authenticate()
        self.backendSays(b'NO (NONEXISTENT) "No such user alice."\r\n')
        self.assertEqual(self.client.value(), b'NO "Authentication failed."\r\n')

    def test_tryLater(self) -> None:
        """
        A backend C{NO (TRYLATER)} is a temporary failure, without delay.
        """
        self.build()
        self.authenticate()
        self.backendSays(b'NO (TRYLATER) "Account is temporarily unavailable."\r\n')
        self.assertUnavailable()

    def test_encryptNeeded(self) -> None:
        """
        A backend that wants TLS before PLAIN (ENCRYPT-NEEDED) is a set-up
        problem, not a wrong password.
        """
        self.build()
        self.authenticate()
        self.backendSays(b'NO (ENCRYPT-NEEDED) "Use TLS."\r\n')
        self.assertUnavailable()
        self.assertEqual(self.frontend.failures, 0)

    def test_byeToLogin(self) -> None:
        """
        A backend BYE in reply to the login is a temporary failure.
        """
        self.build()
        self.authenticate()
        self.backendSays(b'BYE "Shutting down."\r\n')
        self.assertUnavailable()

    def test_unexpectedChallenge(self) -> None:
        """
        A SASL challenge in reply to PLAIN with an initial response is a
        temporary failure.
        """
        self.build()
        self.authenticate()
        self.backendSays(b'""\r\n')
        self.assertUnavailable()

    def test_rudeGreetings(self) -> None:
        """
        A greeting that is BYE, NO, unparsable or not capability lines
        fails as unavailable.
        """
        for greeting in (
            b'BYE (TRYLATER) "Too busy."\r\n',
            b'NO "Go away."\r\n',
            b'"SASL" "PLAIN" "extra"\r\n',
            b'"SASL" ("PLAIN")\r\n',
            b"* OK IMAP4rev1 ready\r\n",
            b'"open\r\n',
        ):
            self.build()
            self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
            self.backendSays(greeting)
            self.assertUnavailable()

    def test_noPlain(self) -> None:
        """
        A backend that does not offer SASL PLAIN cannot be logged in to.
        """
        self.build()
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        self.backendSays(UNTRUSTED_GREETING.replace(b"PLAIN LOGIN CRAM-MD5", b""))
        self.assertUnavailable()

    def test_startTLSNotOffered(self) -> None:
        """
        A backend configured for STARTTLS that does not offer it is not
        logged in to in clear.
        """
        self.build(backend=makeBackend("old", tls="starttls"))
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        self.assertEqual(self.backendSays(UNTRUSTED_GREETING.replace(b'"STARTTLS"\r\n', b"")), b"")
        self.assertUnavailable()

    def test_startTLSRefused(self) -> None:
        """
        A backend that refuses STARTTLS is not logged in to.
        """
        self.build(backend=makeBackend("old", tls="starttls"))
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        self.backendSays(GREETING)
        self.assertEqual(self.backendSays(b'NO "TLS unavailable."\r\n'), b"")
        self.assertUnavailable()

    def test_startTLSInjection(self) -> None:
        """
        Octets after the backend's STARTTLS reply, before the handshake,
        are an injection: the login fails and TLS is never started.
        """
        self.build(backend=makeBackend("old", tls="starttls"))
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        self.backendSays(GREETING)
        self.backendSays(b'OK "Begin TLS negotiation now."\r\n"SASL" "PLAIN"\r\n')
        self.assertIsNone(self.connector.transports[-1].tlsOptions)
        self.assertUnavailable()

    def test_deadBackend(self) -> None:
        """
        A backend that cannot be reached gives NO (TRYLATER) at once.
        """
        self.build()
        self.connector.refuse = True
        self.assertEqual(self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n'), self.UNAVAILABLE)

    def test_silentBackend(self) -> None:
        """
        A backend that never greets is given up after the backend timeout.
        """
        self.build(limits=Limits(backendTimeout=5))
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        self.clock.advance(4.9)
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(0.1)
        self.assertUnavailable()


class RouterFailureTests(SieveFrontendTestsMixin, SynchronousTestCase):
    """
    Refusals by the router, delays and limits.
    """

    def test_unknownUser(self) -> None:
        """
        A router rejection gives the same reply as a wrong password, after
        the delay, and no backend is contacted.
        """
        self.build(limits=Limits(failureDelay=1.0))
        self.send(b'AUTHENTICATE "PLAIN" "' + b64encode(b"\x00nobody\x00secret") + b'"\r\n')
        self.clock.advance(0.9)
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(0.1)
        self.assertEqual(self.client.value(), b'NO "Authentication failed."\r\n')
        self.assertEqual(self.connector.protocols, [])

    def test_temporaryRejection(self) -> None:
        """
        A temporary router rejection says TRYLATER with its text, on one
        line whatever the router wrote.
        """
        self.build()
        self.router.answers["alice"] = Rejection("Directory\r\ndown", temporary=True)
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        self.assertEqual(self.client.value(), b'NO (TRYLATER) "Directory down"\r\n')

    def test_growingDelayAndClose(self) -> None:
        """
        The n-th failure waits n times the delay; after the limit the
        connection closes with BYE.
        """
        self.build(limits=Limits(failureDelay=1.0, loginFailures=3))
        command = b'AUTHENTICATE "PLAIN" "' + b64encode(b"\x00nobody\x00x") + b'"\r\n'
        for attempt in (1, 2):
            self.send(command)
            self.clock.advance(attempt - 0.5)
            self.assertEqual(self.client.value(), b"")
            self.clock.advance(0.5)
            self.assertEqual(self.client.value(), b'NO "Authentication failed."\r\n')
        self.send(command)
        self.clock.advance(3.0)
        self.assertEqual(
            self.client.value(),
            b'NO "Authentication failed."\r\nBYE "Too many invalid authentication attempts."\r\n',
        )
        self.assertTrue(self.client.disconnecting)

    def test_rejectionThatCloses(self) -> None:
        """
        A rejection with C{close} ends the connection after the reply.
        """
        self.build(limits=Limits(failureDelay=0))
        self.router.answers["alice"] = Rejection(close=True)
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        self.assertEqual(self.client.value(), b'NO "Authentication failed."\r\nBYE "Closing connection."\r\n')
        self.assertTrue(self.client.disconnecting)

    def test_commandsWaitForTheLogin(self) -> None:
        """
        Commands sent while the login runs are answered after its outcome,
        in order.
        """
        self.build(limits=Limits(failureDelay=1.0))
        self.send(b'AUTHENTICATE "PLAIN" "' + b64encode(b"\x00nobody\x00x") + b'"\r\nNOOP\r\n')
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(1.0)
        self.assertEqual(self.client.value(), b'NO "Authentication failed."\r\nOK "NOOP completed."\r\n')

    def test_preauthTimeout(self) -> None:
        """
        A client that does not log in within the pre-auth timeout gets BYE.
        """
        self.build(limits=Limits(preauthTimeout=30))
        self.clock.advance(30)
        self.assertEqual(self.client.value(), b'BYE "Disconnected for inactivity."\r\n')
        self.assertTrue(self.client.disconnecting)

    def test_connectionsPerAddress(self) -> None:
        """
        Connections beyond the per-address limit are greeted with BYE.
        """
        self.build(limits=Limits(connectionsPerAddress=1))
        _, transport = self.connectAgain()
        self.assertEqual(transport.value(), b'BYE "Too many connections from your address."\r\n')
        self.assertTrue(transport.disconnecting)

    def test_clientLeavesDuringLogin(self) -> None:
        """
        A client that disconnects while the backend login runs makes the
        proxy drop the backend connection.
        """
        self.build()
        self.send(b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n')
        self.frontend.connectionLost(None)
        transport = self.connector.transports[-1]
        self.assertTrue(transport.disconnected or transport.disconnecting)

    def test_passwordNeverLogged(self) -> None:
        """
        Neither a failed nor a successful login puts the password (or its
        base64 form) in a log event.
        """
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.build(password=b"Sup3rSecretPw")
        command = b'AUTHENTICATE "PLAIN" "' + b64encode(b"\x00alice\x00Sup3rSecretPw") + b'"\r\n'
        self.send(command)
        self.backendSays(UNTRUSTED_GREETING)
        self.backendSays(b'NO "Authentication failed."\r\n')
        self.clock.advance(10)
        self.send(command)
        self.backendSays(UNTRUSTED_GREETING)
        self.backendSays(b'OK "Logged in."\r\n')
        self.frontend.connectionLost(None)
        self.assertTrue(events)
        for event in events:
            self.assertNotIn("Sup3rSecretPw", repr(event))
            self.assertNotIn(b64encode(b"\x00alice\x00Sup3rSecretPw").decode(), repr(event))


class RelayTests(SieveFrontendTestsMixin, SynchronousTestCase):
    """
    The relay after login.
    """

    def loggedIn(self, limits: Limits | None = None) -> None:
        """
        A front end whose client is logged in and relayed.
        """
        self.build(limits=limits)
        self.authenticate()
        self.backendSays(b'OK "Logged in."\r\n')
        self.client.clear()

    def test_backendCloseClosesClient(self) -> None:
        """
        When the backend goes away, the client connection is closed too.
        """
        self.loggedIn()
        self.connector.protocols[-1].connectionLost(None)
        self.assertTrue(self.client.disconnecting)

    def test_idleTimeout(self) -> None:
        """
        A session silent in both directions for the idle timeout is closed
        with a ManageSieve BYE.
        """
        self.loggedIn(Limits(idleTimeout=600))
        self.clock.advance(600)
        self.assertEqual(self.client.value(), b'BYE "Idle timeout."\r\n')
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.connector.transports[-1].disconnecting)


    def test_xclientRefused(self) -> None:
        """
        XCLIENT after login never reaches the backend: the client gets the
        proxy's C{NO} after the backend's responses to the commands before
        it (a script in a server literal included, whatever its lines look
        like); commands after it go on.
        """
        self.loggedIn()
        backendTransport = self.connector.transports[-1]
        backendTransport.clear()
        self.send(b'GETSCRIPT "a"\r\nXCLIENT ADDR=1.2.3.4\r\nNOOP\r\n')
        self.assertEqual(backendTransport.value(), b'GETSCRIPT "a"\r\n')
        self.assertEqual(self.client.producerState, "paused")
        backend = self.connector.protocols[-1]
        backend.dataReceived(b"{10}\r\nOK\r\nNO x\r\n")
        self.assertEqual(self.client.value(), b"{10}\r\nOK\r\nNO x\r\n")
        backend.dataReceived(b'\r\nOK "Getscript completed."\r\n')
        self.assertEqual(
            self.client.value(),
            b'{10}\r\nOK\r\nNO x\r\n\r\nOK "Getscript completed."\r\nNO "Insufficient authorization."\r\n',
        )
        self.assertEqual(backendTransport.value(), b'GETSCRIPT "a"\r\nNOOP\r\n')
        self.assertEqual(self.client.producerState, "producing")

    def test_loginCommandsRefused(self) -> None:
        """
        AUTHENTICATE, UNAUTHENTICATE and STARTTLS after login are answered
        by the proxy; a refused command's literal is dropped with it.
        """
        self.loggedIn()
        backendTransport = self.connector.transports[-1]
        backendTransport.clear()
        out = self.send(b'AUTHENTICATE "PLAIN" {8+}\r\nAGJvYgB4\r\nUNAUTHENTICATE\r\nSTARTTLS\r\n')
        self.assertEqual(backendTransport.value(), b"")
        self.assertEqual(
            out,
            b'NO "Already authenticated."\r\nNO "Not allowed through this proxy."\r\n'
            b'NO "TLS is not available after login."\r\n',
        )

    def test_scriptLiteralNotParsed(self) -> None:
        """
        A script sent as a literal passes untouched, even a line of it that
        looks like a refused command; the command after it is read as one.
        """
        self.loggedIn()
        backendTransport = self.connector.transports[-1]
        backendTransport.clear()
        script = b'# STARTTLS\r\nAuthenticate me\r\nkeep;\r\n'
        command = b'PUTSCRIPT "a" {%d+}\r\n' % (len(script),) + script + b"\r\n"
        self.send(command[:20])
        self.send(command[20:] + b"STARTTLS\r\n")
        self.assertEqual(backendTransport.value(), command)
        self.connector.protocols[-1].dataReceived(b'OK "Putscript completed."\r\n')
        self.assertEqual(
            self.client.value(), b'OK "Putscript completed."\r\nNO "TLS is not available after login."\r\n'
        )

    def test_xclientInLiteralCloses(self) -> None:
        """
        A line starting with XCLIENT inside a literal, or right after one,
        however it is spaced, ends the session: a backend that refused the
        command without reading its literal would take it for a command.
        """
        for sent, rest in (
            (b'FOO {22+}\r\nXCLIENT ADDR=1.2.3.4\r\n\r\n', b"ENT ADDR=1.2.3.4\r\n"),
            (b'FOO {0+}\r\nxclient ADDR=1.2.3.4\r\n', b"ENT ADDR=1.2.3.4\r\n"),
            (b'PUTSCRIPT "a" {16+}\r\nkeep;\r\nXCLI', b"ENT ADDR=1.2.3.4\r\n"),
            (b'PUTSCRIPT "x {10}\r\nXCLIENT\r\n', b"ADDR=1.2.3.4\r\n"),
            (b'FOO {30+}\r\n\x0cXCLIENT\x0bADDR=1.2.3.4\r\n', b"\r\n"),
            (b'FOO {40+}\r\n\r\nXCLIENT ADDR=1.2.3.4\r\n', b"\r\n"),
        ):
            self.loggedIn()
            backendTransport = self.connector.transports[-1]
            backendTransport.clear()
            out = self.send(sent) + self.send(rest)
            self.assertNotIn(b"ADDR=1.2.3.4", backendTransport.value(), sent)
            self.assertEqual(out, b'BYE "XCLIENT is not allowed."\r\n', sent)
            self.assertTrue(self.client.disconnecting)


class PipelinedLoginTests(SieveFrontendTestsMixin, SynchronousTestCase):
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
        self.router.answers["alice"] = Rejection("Directory down", temporary=True)
        out = self.send((b'AUTHENTICATE "PLAIN" "' + ALICE_PLAIN + b'"\r\n') * 400 + b"NOOP\r\n")
        self.assertEqual(out, b'NO (TRYLATER) "Directory down"\r\n' * 400 + b'OK "NOOP completed."\r\n')
