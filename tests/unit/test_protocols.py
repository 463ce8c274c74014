"""
Tests for L{mailproxy.protocols}, the registry of protocol descriptors, and
for what reads it: listeners, route requests, the routers' backend ports
and the health probes.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy.admin import HealthChecker
from mailproxy.config import splitEndpoint
from mailproxy.model import Backend, ClientInfo, Credentials, Rejection, Route, RouteRequest
from mailproxy.protocols import (
    APPLICATION_PROTOCOLS,
    BACKEND_PROTOCOLS,
    DIGEST_AUTH_PROTOCOLS,
    LISTENER_MODES,
    LISTENER_PROTOCOLS,
    MODE_PORTS,
    PROTOCOLS,
    ProtocolDescriptor,
    protocolForPort,
    protocolNamed,
)
from mailproxy.routers._backends import BackendDefaults, BackendResolver
from mailproxy.settings import Listener

CLIENT = ClientInfo(sessionId="s1", address="192.0.2.7", port=50000, localAddress="192.0.2.1", localPort=25)


class RegistryTests(SynchronousTestCase):
    """
    The descriptors and what is derived from them.
    """

    def test_derivedConstants(self) -> None:
        """
        The constants derived from the registry have the values and the
        order (which configuration errors list them in) they had when they
        were written out by hand.
        """
        self.assertEqual(LISTENER_PROTOCOLS, ("http", "imap", "pop3", "sieve", "smtp"))
        self.assertEqual(BACKEND_PROTOCOLS, ("imap", "pop3", "smtp", "sieve", "http", "mx"))
        self.assertEqual(DIGEST_AUTH_PROTOCOLS, ("imap", "pop3", "smtp"))
        self.assertEqual(LISTENER_MODES, {"smtp": ("submission", "mx")})
        self.assertEqual(MODE_PORTS, {("smtp", "mx"): "mx"})
        self.assertEqual(
            APPLICATION_PROTOCOLS,
            {
                "imap": (b"imap",),
                "pop3": (b"pop3",),
                "smtp": (b"smtp",),
                "sieve": (b"managesieve",),
                "http": (b"http/1.1",),
            },
        )

    def test_referencesResolve(self) -> None:
        """
        Every front end and backend login the registry names (for SMTP,
        one per mode) is importable under that name and callable.
        """
        for protocol in PROTOCOLS:
            self.assertTrue(callable(protocol.backendLoginFactory()), protocol.name)
            self.assertTrue(callable(protocol.frontendFactory()), protocol.name)
            for mode in protocol.modes:
                self.assertTrue(callable(protocol.frontendFactory(mode.name)), (protocol.name, mode.name))

    def test_smtpModes(self) -> None:
        """
        An SMTP listener in mode mx gets the MX front end, in mode
        submission (or made without a mode) the submission front end.
        """
        from mailproxy.smtp import MXFrontend, SubmissionFrontend

        smtp = protocolNamed("smtp")
        self.assertIs(smtp.frontendFactory("mx"), MXFrontend)
        self.assertIs(smtp.frontendFactory("submission"), SubmissionFrontend)
        self.assertIs(smtp.frontendFactory(None), SubmissionFrontend)

    def test_importLoadsNoProtocolCode(self) -> None:
        """
        Importing the registry, and the modules that read it (the
        configuration, the listeners' settings, the model, the routers, the
        service builder), loads no protocol package: the references are
        resolved only on use.
        """
        program = (
            "import sys\n"
            "import mailproxy.protocols, mailproxy.config, mailproxy.settings, mailproxy.model\n"
            "import mailproxy.routers, mailproxy.admin, mailproxy.tap, mailproxy.testing\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[:2] in "
            "(['mailproxy', 'imap'], ['mailproxy', 'pop3'], ['mailproxy', 'sieve'], ['mailproxy', 'smtp'], "
            "['mailproxy', 'http']))))\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        done = subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, check=True, cwd=root, timeout=60
        )
        self.assertEqual(done.stdout.strip(), "")

    def test_portKeys(self) -> None:
        """
        Each backend C{ports} key belongs to one protocol: C{mx} to SMTP;
        a protocol's first key is its own, named as it.
        """
        self.assertEqual(protocolForPort("mx").name, "smtp")
        self.assertEqual(protocolForPort("imap").name, "imap")
        self.assertEqual([protocol.ownPort for protocol in PROTOCOLS], [protocol.name for protocol in PROTOCOLS])
        self.assertRaises(KeyError, protocolForPort, "nntp")

    def test_receivingProtocol(self) -> None:
        """
        A protocol of one kind that receives mail (LMTP, say) is described
        by its entry alone: its sessions ask about recipients, on its own
        port.
        """
        lmtp = ProtocolDescriptor(
            name="lmtp",
            ports={"lmtp": 24},
            frontend="example.lmtp.LMTPFrontend",
            backendLogin="example.lmtp.LMTPBackend",
            applicationProtocols=(b"lmtp",),
            greeting=(b"220",),
            lookup="recipient",
        )
        self.assertEqual((lmtp.portFor(None), lmtp.lookupFor(None)), ("lmtp", "recipient"))
        self.assertEqual((lmtp.portForLookup("recipient"), lmtp.portForLookup("login")), ("lmtp", "lmtp"))
        self.assertTrue(lmtp.greets(b"220 lmtp.example.org LMTP"))
        self.assertFalse(lmtp.greets(b"* OK"))

    def test_listener(self) -> None:
        """
        A listener reads its port, its lookup and its ALPN ids from its
        protocol's entry.
        """
        mx = Listener(protocol="smtp", endpoint="tcp:25", tls="none", mode="mx")
        submission = Listener(protocol="smtp", endpoint="tcp:587", tls="none", mode="submission")
        imap = Listener(protocol="imap", endpoint="tcp:143", tls="none")
        self.assertEqual((mx.portName, mx.lookup, mx.applicationProtocols), ("mx", "recipient", (b"smtp",)))
        self.assertEqual((submission.portName, submission.lookup), ("smtp", "login"))
        self.assertEqual((imap.portName, imap.lookup, imap.applicationProtocols), ("imap", "login", (b"imap",)))
        self.assertIs(imap.descriptor, protocolNamed("imap"))

    def test_splitEndpoint(self) -> None:
        """
        L{splitEndpoint} splits at colons but not at escaped ones, which
        keep their backslash.
        """
        self.assertEqual(splitEndpoint("tcp6:993:interface=\\:\\:1"), ["tcp6", "993", "interface=\\:\\:1"])
        self.assertEqual(splitEndpoint("tcp:1:a=b:c=d", maxsplit=2), ["tcp", "1", "a=b:c=d"])


class RouteRequestTests(SynchronousTestCase):
    """
    L{RouteRequest.lookup} and L{RouteRequest.port}.
    """

    def test_defaults(self) -> None:
        """
        A request made without saying asks about a recipient when it has
        no credentials (SMTP MX: the C{mx} port), about a login otherwise
        (the protocol's own port).
        """
        mx = RouteRequest(protocol="smtp", credentials=None, client=CLIENT, rcptTo="bob@example.org")
        submission = RouteRequest(protocol="smtp", credentials=Credentials("PLAIN", "bob", password=b"pw"), client=CLIENT)
        imap = RouteRequest(protocol="imap", credentials=Credentials("LOGIN", "bob", password=b"pw"), client=CLIENT)
        self.assertEqual((mx.lookup, mx.port), ("recipient", "mx"))
        self.assertEqual((submission.lookup, submission.port), ("login", "smtp"))
        self.assertEqual((imap.lookup, imap.port), ("login", "imap"))

    def test_given(self) -> None:
        """
        What the caller says is kept; a protocol the registry does not know
        connects to the port named like it.
        """
        request = RouteRequest(protocol="smtp", credentials=None, client=CLIENT, lookup="recipient", port="lmtp")
        self.assertEqual((request.lookup, request.port), ("recipient", "lmtp"))
        other = RouteRequest(protocol="nntp", credentials=Credentials("LOGIN", "bob", password=b"pw"), client=CLIENT)
        self.assertEqual(other.port, "nntp")

    def test_routersUseTheRequestsPort(self) -> None:
        """
        The static router checks the port the request names, not one it
        works out from the protocol: a recipient whose backend lacks that
        port is refused as temporarily unavailable.
        """
        from mailproxy.routers.static import StaticRouter

        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "routes.toml")
        with open(path, "w") as f:
            f.write('[domains]\n"example.org" = "store"\n')
        store = Backend(name="store", host="192.0.2.2", ports={"mx": 25})
        router = StaticRouter(path, {"store": store}, reactor=None)
        request = RouteRequest(protocol="smtp", credentials=None, client=CLIENT, rcptTo="bob@example.org")
        self.assertEqual(router.route(request), Route(backend=store, rule="domains['example.org'] -> store"))
        elsewhere = RouteRequest(
            protocol="smtp", credentials=None, client=CLIENT, rcptTo="bob@example.org", lookup="recipient", port="lmtp"
        )
        self.assertEqual(router.route(elsewhere), Rejection("Service temporarily unavailable.", temporary=True))

    def test_resolverSharesAddressByProtocol(self) -> None:
        """
        A backend named by address serves every port key of the request's
        protocol there (SMTP: submission and MX), and only those.
        """
        resolver = BackendResolver({}, BackendDefaults())
        self.assertEqual(resolver.at("mx.example.org", 2525, "mx").ports, {"mx": 2525, "smtp": 2525})
        self.assertEqual(resolver.at("imap.example.org", None, "imap").ports, {"imap": 143})


class _Greeter(Protocol):
    """
    Sends one line on connect, as a server's greeting.
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.factory.greeting)  # type: ignore[attr-defined]


class _Answerer(Protocol):
    """
    Says nothing until asked, then answers as an HTTP server does.
    """

    def dataReceived(self, data: bytes) -> None:
        self.factory.asked += data  # type: ignore[attr-defined]
        if b"\r\n\r\n" in self.factory.asked:  # type: ignore[attr-defined]
            assert self.transport is not None
            self.transport.write(b"HTTP/1.0 200 OK\r\n\r\n")


class HealthProbeTests(TestCase):
    """
    L{HealthChecker.probe} judges each backend port's greeting by the
    protocol that port belongs to (a real loopback server greets).
    """

    @inlineCallbacks
    def probe(self, port: str, greeting: bytes, factory: Factory | None = None) -> Deferred[dict]:
        """
        Probe a loopback server that greets with C{greeting} (or one that
        C{factory} makes), as the backend port C{port}.
        """
        if factory is None:
            factory = Factory.forProtocol(_Greeter)
            factory.greeting = greeting  # type: ignore[attr-defined]
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(listening.stopListening)
        number = listening.getHost().port
        backend = Backend(name="store", host="127.0.0.1", ports={port: number})
        result = yield HealthChecker(reactor, lambda: {"store": backend}).probe(backend, port, number)
        return result

    @inlineCallbacks
    def test_quiet(self) -> None:
        """
        A probe logs nothing of its own: /health and every /metrics scrape
        run one per backend port, and Twisted's factories would log two
        lines each ("Starting factory", "Stopping factory").
        """
        factory = Factory.forProtocol(_Greeter)
        factory.greeting = b"* OK ready\r\n"  # type: ignore[attr-defined]
        factory.noisy = False
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(listening.stopListening)
        number = listening.getHost().port
        backend = Backend(name="store", host="127.0.0.1", ports={"imap": number})
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        well = yield HealthChecker(reactor, lambda: {"store": backend}).probe(backend, "imap", number)
        self.assertTrue(well["ok"], well)
        # The probe hangs up once it has the greeting; let that finish.
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual([formatEvent(event) for event in events], [])

    @inlineCallbacks
    def test_mxPortIsSMTP(self) -> None:
        """
        An MX port that greets as SMTP servers do is well; one that greets
        otherwise (here a refusal) is reported with its greeting.
        """
        well = yield self.probe("mx", b"220 mx.example.org ESMTP\r\n")
        self.assertTrue(well["ok"], well)
        refused = yield self.probe("mx", b"554 5.7.1 not for you\r\n")
        self.assertEqual(refused, {"ok": False, "error": "unexpected greeting: 554 5.7.1 not for you"})

    @inlineCallbacks
    def test_imapPort(self) -> None:
        """
        An IMAP port is well when it greets with C{* OK}, not with SMTP's.
        """
        well = yield self.probe("imap", b"* OK ready\r\n")
        self.assertTrue(well["ok"], well)
        wrong = yield self.probe("imap", b"220 smtp\r\n")
        self.assertEqual(wrong, {"ok": False, "error": "unexpected greeting: 220 smtp"})

    @inlineCallbacks
    def test_probeRequest(self) -> None:
        """
        For a protocol whose servers speak only when asked (an HTTP entry,
        made up here), the probe sends the entry's request first and judges
        the answer's first line.
        """
        import mailproxy.protocols

        http = ProtocolDescriptor(
            name="http",
            ports={"http": 80},
            frontend="example.http.HTTPFrontend",
            backendLogin="example.http.HTTPBackend",
            applicationProtocols=(b"http/1.1",),
            greeting=(b"HTTP/1.0 200", b"HTTP/1.1 200"),
            probe=b"HEAD / HTTP/1.0\r\n\r\n",
        )
        self.patch(mailproxy.protocols, "_BY_PORT", {**mailproxy.protocols._BY_PORT, "http": http})
        factory = Factory.forProtocol(_Answerer)
        factory.asked = b""  # type: ignore[attr-defined]
        result = yield self.probe("http", b"", factory)
        self.assertTrue(result["ok"], result)
        self.assertEqual(factory.asked, b"HEAD / HTTP/1.0\r\n\r\n")  # type: ignore[attr-defined]
