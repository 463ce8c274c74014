"""
OAUTHBEARER (RFC 7628) and XOAUTH2: reading the client's message, offering
the mechanisms on every login protocol once TLS is active, the credentials
the router gets, and tokens kept out of the logs.
"""

from __future__ import annotations

import json
import os
import time
from base64 import b64decode, b64encode, urlsafe_b64encode
from typing import Any

from attrs import evolve
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._sasl import Credentials, Refused, ServerExchange, oauthResponse, parseOAuthResponse
from mailproxy.model import Rejection, Route
from mailproxy.smtp._base import backendExtensions
from mailproxy.config import ConfigError
from mailproxy.routers import buildRouter
from mailproxy.routers.oauth import IntrospectionClient, TokenValidatingRouter
from mailproxy.testing import FakeRouter, MemoryConnector, makeBackend, makeFrontend, makeRequest

from .test_config import ROUTER, ConfigTestCase, configText

#: A token as long as big providers' JWTs get (8 KiB), in RFC 6750's
#: b64token alphabet.
LONG_TOKEN = (b"eyJhbGciOiJSUzI1NiJ9." + b"A" * 8000 + b".sig-_~+/").ljust(8192, b"x")


def oauthbearer(user: bytes, token: bytes, extra: bytes = b"") -> bytes:
    """
    A client's OAUTHBEARER message (not base64).
    """
    return b"n,a=" + user + b",\x01" + extra + b"auth=Bearer " + token + b"\x01\x01"


def xoauth2(user: bytes, token: bytes) -> bytes:
    """
    A client's XOAUTH2 message (not base64).
    """
    return b"user=" + user + b"\x01auth=Bearer " + token + b"\x01\x01"


class ParseTests(SynchronousTestCase):
    """
    L{parseOAuthResponse} and L{oauthResponse}.
    """

    def test_oauthbearer(self) -> None:
        """
        The user comes from the GS2 header's C{a=} (with C{=2C} and C{=3D}
        unescaped), the token from C{auth=Bearer}; C{host} and C{port} may
        come too, the scheme in any case.
        """
        self.assertEqual(
            parseOAuthResponse("OAUTHBEARER", oauthbearer(b"alice@example.org", b"tok.en-1")),
            (b"alice@example.org", b"tok.en-1"),
        )
        message = b"y,a=a=2Cb=3Dc,\x01host=imap.example.org\x01port=993\x01auth=bearer t0k==\x01\x01"
        self.assertEqual(parseOAuthResponse("OAUTHBEARER", message), (b"a,b=c", b"t0k=="))

    def test_xoauth2(self) -> None:
        """
        XOAUTH2 names the user in C{user=}.
        """
        self.assertEqual(parseOAuthResponse("XOAUTH2", xoauth2(b"bob", b"abc")), (b"bob", b"abc"))

    def test_malformed(self) -> None:
        """
        Channel binding (C{p=}), no user, no or a bad C{auth}, a missing
        final C{^A}, a repeated key, a bad port, a bad escape, or the lone
        C{^A} of a client that gave up: not credentials.
        """
        bad = [
            b"p=tls-unique,a=alice,\x01auth=Bearer t\x01\x01",
            b"n,,\x01auth=Bearer t\x01\x01",
            b"n,a=alice,\x01host=x\x01\x01",
            b"n,a=alice,\x01auth=Basic dDp0\x01\x01",
            b"n,a=alice,\x01auth=Bearer \x01\x01",
            b"n,a=alice,\x01auth=Bearer t t\x01\x01",
            b"n,a=alice,\x01auth=Bearer t\x01",
            b"n,a=alice,\x01auth=Bearer t\x01auth=Bearer u\x01\x01",
            b"n,a=alice,\x01port=99999\x01auth=Bearer t\x01\x01",
            b"n,a=al=41ice,\x01auth=Bearer t\x01\x01",
            b"n,a=alice\x01auth=Bearer t\x01\x01",
            b"\x01",
            b"",
        ]
        for message in bad:
            self.assertIsNone(parseOAuthResponse("OAUTHBEARER", message), message)
        self.assertIsNone(parseOAuthResponse("XOAUTH2", b"auth=Bearer t\x01\x01"))
        self.assertIsNone(parseOAuthResponse("XOAUTH2", b"user=bob\x01auth=Bearer t\x01"))

    def test_roundTrip(self) -> None:
        """
        What L{oauthResponse} writes, L{parseOAuthResponse} reads back, for
        both mechanisms and a user with a comma.
        """
        for mechanism in ("OAUTHBEARER", "XOAUTH2"):
            message = b64decode(oauthResponse(mechanism, b"a,b@example.org", LONG_TOKEN, b"imap.example.org", 993))
            self.assertEqual(parseOAuthResponse(mechanism, message), (b"a,b@example.org", LONG_TOKEN))

    def test_exchange(self) -> None:
        """
        The exchange starts with an empty challenge and ends in
        L{Credentials} with the token, or L{Refused} without it.
        """
        exchange = ServerExchange("OAUTHBEARER")
        self.assertEqual(exchange.start().data, b"")  # type: ignore[union-attr]
        self.assertEqual(
            exchange.respond(oauthbearer(b"alice", b"tok")), Credentials("OAUTHBEARER", "alice", token=b"tok")
        )
        refused = ServerExchange("XOAUTH2").start(b"user=alice\x01auth=Bearer secret-token")
        self.assertEqual(refused, Refused("XOAUTH2", "malformed"))
        self.assertNotIn("secret-token", repr(refused))
        self.assertNotIn("tok", repr(Credentials("OAUTHBEARER", "alice", token=b"tok")))


class OfferTestsMixin:
    """
    One protocol's front end on an C{oauth = true} listener: how it offers
    the mechanisms and what the router gets.
    """

    protocol: str
    options: dict[str, Any] = {}

    def connect(self, tls: str = "implicit", oauth: bool = True, router: Any = None) -> None:
        self.router = router if router is not None else FakeRouter({"alice@example.org": Route(makeBackend("old"))})
        self.connector = MemoryConnector()
        self.frontend, self.client, self.clock = makeFrontend(
            self.protocol, self.router, self.connector, tls=tls, oauth=oauth, **self.options
        )
        self.greeting = self.client.value()
        self.client.clear()

    def send(self, data: bytes) -> bytes:
        self.client.clear()
        self.frontend.dataReceived(data)
        return self.client.value()

    def offered(self) -> bytes:
        """
        What the client is told about the mechanisms now.
        """
        raise NotImplementedError

    def authenticate(self, mechanism: bytes, message: bytes) -> bytes:
        """
        Authenticate with an initial response; return the reply.
        """
        raise NotImplementedError

    def test_offeredOnlyOverTLS(self) -> None:
        """
        OAUTHBEARER and XOAUTH2 are listed over TLS on an C{oauth}
        listener; not without C{oauth}, nor before STARTTLS, where they are
        refused as unsupported and the router is not asked.
        """
        self.connect()
        self.assertIn(self.mechanisms, self.offered())
        self.connect(oauth=False)
        self.assertNotIn(b"OAUTHBEARER", self.offered())
        self.connect(tls="starttls")
        self.assertNotIn(b"OAUTHBEARER", self.offered())
        self.authenticate(b"OAUTHBEARER", oauthbearer(b"alice@example.org", b"tok"))
        self.assertEqual(self.router.requests, [])

    def test_credentials(self) -> None:
        """
        An 8 KiB token as initial response reaches the router with the user
        the client names, for both mechanisms.
        """
        for mechanism, message in ((b"OAUTHBEARER", oauthbearer), (b"XOAUTH2", xoauth2)):
            self.connect()
            self.authenticate(mechanism, message(b"alice@example.org", LONG_TOKEN))
            credentials = self.router.requests[-1].credentials
            self.assertEqual(
                (credentials.mechanism, credentials.user, credentials.token, credentials.password),
                (mechanism.decode(), "alice@example.org", LONG_TOKEN, None),
            )

    def test_tokenNeverLogged(self) -> None:
        """
        Neither a refused token login nor a malformed message puts the
        token, or a part of it, in any log event.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.connect(router=FakeRouter({}, default=Rejection()))
        self.authenticate(b"OAUTHBEARER", oauthbearer(b"nobody@example.org", b"SeCrEtToKeN" * 20))
        self.clock.advance(60)
        self.connect()
        self.authenticate(b"XOAUTH2", b"user=alice\x01auth=Bearer SeCrEtToKeN")
        self.assertTrue(events)
        for event in events:
            self.assertNotIn("SeCrEt", repr(event))
            self.assertNotIn("ToKeN", repr(event))


class IMAPOfferTests(OfferTestsMixin, SynchronousTestCase):
    """
    IMAP: C{AUTH=} capabilities, AUTHENTICATE with SASL-IR.
    """

    protocol = "imap"
    mechanisms = b"AUTH=PLAIN AUTH=LOGIN AUTH=OAUTHBEARER AUTH=XOAUTH2"

    def offered(self) -> bytes:
        return self.send(b"c CAPABILITY\r\n")

    def authenticate(self, mechanism: bytes, message: bytes) -> bytes:
        return self.send(b"a AUTHENTICATE " + mechanism + b" " + b64encode(message) + b"\r\n")

    def test_withoutInitialResponse(self) -> None:
        """
        Without SASL-IR the client gets an empty challenge and answers it
        with a line of its own.
        """
        self.connect()
        self.assertEqual(self.send(b"a AUTHENTICATE XOAUTH2\r\n"), b"+ \r\n")
        self.send(b64encode(xoauth2(b"alice@example.org", LONG_TOKEN)) + b"\r\n")
        self.assertEqual(self.router.requests[-1].credentials.token, LONG_TOKEN)

    def test_malformed(self) -> None:
        """
        A message not of the mechanism's form is a BAD, the router not
        asked.
        """
        self.connect()
        self.assertEqual(
            self.authenticate(b"OAUTHBEARER", b"n,,\x01auth=Bearer t\x01\x01"), b"a BAD Invalid OAUTHBEARER response.\r\n"
        )
        self.assertEqual(self.router.requests, [])


class POP3OfferTests(OfferTestsMixin, SynchronousTestCase):
    """
    POP3: the CAPA C{SASL} line, AUTH with an initial response.
    """

    protocol = "pop3"
    mechanisms = b"SASL PLAIN LOGIN OAUTHBEARER XOAUTH2\r\n"

    def offered(self) -> bytes:
        return self.send(b"CAPA\r\n")

    def authenticate(self, mechanism: bytes, message: bytes) -> bytes:
        return self.send(b"AUTH " + mechanism + b" " + b64encode(message) + b"\r\n")


class SubmissionOfferTests(OfferTestsMixin, SynchronousTestCase):
    """
    SMTP submission: the EHLO C{AUTH} keyword, AUTH with an initial
    response (a line longer than other commands may be).
    """

    protocol = "smtp"
    options = {"mode": "submission"}
    mechanisms = b"AUTH PLAIN LOGIN OAUTHBEARER XOAUTH2\r\n"

    def connect(self, tls: str = "implicit", oauth: bool = True, router: Any = None) -> None:
        super().connect(tls, oauth, router)
        backend = makeBackend("old", ports={"smtp": 587})
        self.frontend.context.backends[backend.name] = backend
        backendExtensions(self.frontend.context, "smtp").learn(backend.name, {"PIPELINING": ""})  # type: ignore[arg-type]

    def offered(self) -> bytes:
        return self.send(b"EHLO client.example\r\n")

    def authenticate(self, mechanism: bytes, message: bytes) -> bytes:
        self.send(b"EHLO client.example\r\n")
        return self.send(b"AUTH " + mechanism + b" " + b64encode(message) + b"\r\n")


class SieveOfferTests(OfferTestsMixin, SynchronousTestCase):
    """
    ManageSieve: the C{SASL} capability, AUTHENTICATE with a quoted
    initial response.
    """

    protocol = "sieve"
    mechanisms = b'"SASL" "PLAIN LOGIN OAUTHBEARER XOAUTH2"'

    def offered(self) -> bytes:
        return self.send(b"CAPABILITY\r\n")

    def authenticate(self, mechanism: bytes, message: bytes) -> bytes:
        return self.send(b'AUTHENTICATE "' + mechanism + b'" "' + b64encode(message) + b'"\r\n')


class ConfigTests(ConfigTestCase):
    """
    The listener key C{oauth}.
    """

    def oauthListener(self, protocol: str = "imap", tls: str = "implicit", extra: str = "") -> str:
        return (
            f'[[listener]]\nprotocol = "{protocol}"\nendpoint = "tcp:0"\ntls = "{tls}"\noauth = true\n{extra}'
            + ROUTER
            + '[backend.old]\nhost = "127.0.0.1"\nports = { imap = 143, pop3 = 110, sieve = 4190, smtp = 587, mx = 25 }\n'
            + '[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n'
        )

    def test_accepted(self) -> None:
        """
        C{oauth = true} is accepted on TLS listeners of every login
        protocol; it is off by default.
        """
        for protocol, extra in (("imap", ""), ("pop3", ""), ("sieve", ""), ("smtp", 'mode = "submission"\n')):
            [listener] = self.parse(self.oauthListener(protocol, "starttls", extra)).listeners
            self.assertTrue(listener.oauth, protocol)
        [listener] = self.parse(configText()).listeners
        self.assertFalse(listener.oauth)

    def test_refused(self) -> None:
        """
        C{oauth} is refused on a listener without TLS (the mechanisms are
        offered only over TLS) and on MX, and must be a boolean.
        """
        self.assertConfigError(self.oauthListener(tls="none"), "listener[0].oauth", 'tls = "none"')
        self.assertConfigError(
            self.oauthListener("smtp", extra='mode = "mx"\n'), "listener[0].oauth", "mx listeners take no logins"
        )
        self.assertConfigError(
            self.oauthListener().replace("oauth = true", 'oauth = "yes"'), "listener[0].oauth", "true or false"
        )


#: The error challenge a Dovecot backend sends for a refused token.
DOVECOT_ERROR = b'{"status":"invalid_token","schemes":"bearer","scope":"mail"}'


class PassThroughMixin:
    """
    A token login on an C{oauth} listener whose route gives no password:
    the backend gets the client's mechanism and token, and its error
    challenge reaches the client before the protocol's failure.
    """

    protocol: str
    options: dict[str, Any] = {}

    def connect(self, route: Route | None = None) -> None:
        self.backend = makeBackend("old", forward="none", ports={"imap": 143, "pop3": 110, "smtp": 587, "sieve": 4190})
        self.router = FakeRouter({"alice@example.org": route or Route(self.backend)})
        self.connector = MemoryConnector()
        self.frontend, self.client, self.clock = makeFrontend(
            self.protocol, self.router, self.connector, tls="implicit", oauth=True, **self.options
        )
        self.client.clear()

    def send(self, data: bytes) -> bytes:
        self.client.clear()
        self.frontend.dataReceived(data)
        return self.client.value()

    def backendSays(self, data: bytes) -> bytes:
        transport = self.connector.transports[-1]
        transport.clear()
        self.connector.protocols[-1].dataReceived(data)
        return transport.value()

    def startLogin(self, message: bytes) -> bytes:
        """
        The client authenticates with C{message} (OAUTHBEARER); play the
        backend up to its login command and return that command.
        """
        raise NotImplementedError

    def test_tokenPassedThrough(self) -> None:
        """
        The backend gets the client's mechanism, user and token as the
        login's initial response.
        """
        self.connect()
        sent = self.startLogin(oauthbearer(b"alice@example.org", LONG_TOKEN))
        self.assertIn(b64encode(oauthbearer(b"alice@example.org", LONG_TOKEN)), sent)
        self.assertIn(b"OAUTHBEARER", sent)


class IMAPPassThroughTests(PassThroughMixin, SynchronousTestCase):
    """
    IMAP: AUTHENTICATE with SASL-IR towards the backend, the backend's
    continuation relayed as the client's.
    """

    protocol = "imap"

    def startLogin(self, message: bytes) -> bytes:
        self.send(b"a AUTHENTICATE OAUTHBEARER " + b64encode(message) + b"\r\n")
        return self.backendSays(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=OAUTHBEARER AUTH=XOAUTH2] ready\r\n")

    def test_errorRelayed(self) -> None:
        """
        The backend's error challenge goes to the client (after the failure
        delay); the proxy answers the backend with the dummy C{^A}; the
        client's own answer brings the NO.
        """
        self.connect()
        sent = self.startLogin(oauthbearer(b"alice@example.org", b"bad"))
        self.assertTrue(sent.startswith(b"P1 AUTHENTICATE OAUTHBEARER "), sent)
        self.assertEqual(self.backendSays(b"+ " + b64encode(DOVECOT_ERROR) + b"\r\n"), b"AQ==\r\n")
        self.backendSays(b"P1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.clock.advance(10)
        self.assertEqual(self.client.value(), b"+ " + b64encode(DOVECOT_ERROR) + b"\r\n")
        self.assertEqual(self.send(b"AQ==\r\n"), b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.assertEqual(self.send(b"b NOOP\r\n"), b"b OK NOOP completed.\r\n")

    def test_routerRefusal(self) -> None:
        """
        A router's refusal gets the generic C{invalid_token} challenge
        first, then the NO to the client's dummy response; a client that
        cancels with C{*} instead gets the BAD of a cancelled exchange
        (RFC 3501 section 6.2.2).  Either way the session reads on.
        """
        self.connect()
        for answer, refusal in (
            (b"\r\n", b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            (b"*\r\n", b"a BAD Authentication aborted by client.\r\n"),
        ):
            self.send(b"a AUTHENTICATE XOAUTH2 " + b64encode(xoauth2(b"nobody@example.org", b"t")) + b"\r\n")
            self.clock.advance(10)
            self.assertEqual(self.client.value(), b"+ " + b64encode(b'{"status":"invalid_token"}') + b"\r\n")
            self.assertEqual(self.send(answer), refusal)
        self.assertEqual(self.send(b"b NOOP\r\n"), b"b OK NOOP completed.\r\n")

    def test_backendWithoutMechanism(self) -> None:
        """
        A backend that does not offer the client's mechanism cannot take
        the token: a temporary failure, no credential written.
        """
        self.connect()
        self.send(b"a AUTHENTICATE OAUTHBEARER " + b64encode(oauthbearer(b"alice@example.org", b"t")) + b"\r\n")
        sent = self.backendSays(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n")
        self.assertEqual(sent, b"")
        self.assertTrue(self.client.value().startswith(b"a NO [UNAVAILABLE]"), self.client.value())

    def test_masterUserRoute(self) -> None:
        """
        A router that validated the token itself answers with the master
        user: the backend gets PLAIN with the master user, never the token.
        """
        backend = makeBackend("old", forward="none", masterUser="proxy", masterPassword=b"masterpw")
        self.connect(Route(backend, useMaster=True))
        sent = self.startLogin(oauthbearer(b"alice@example.org", b"the-token"))
        self.assertIn(b"AUTHENTICATE PLAIN " + b64encode(b"alice@example.org\x00proxy\x00masterpw"), sent)
        self.assertNotIn(b"the-token", b64decode(sent.split()[-1]))


class POP3PassThroughTests(PassThroughMixin, SynchronousTestCase):
    """
    POP3: AUTH towards the backend (after its continuation: the line
    would be too long), the error relayed.
    """

    protocol = "pop3"

    def startLogin(self, message: bytes) -> bytes:
        self.send(b"AUTH OAUTHBEARER " + b64encode(message) + b"\r\n")
        self.backendSays(b"+OK ready\r\n")
        first = self.backendSays(b"+OK\r\nSASL PLAIN OAUTHBEARER XOAUTH2\r\n.\r\n")
        if first == b"AUTH OAUTHBEARER\r\n":
            # Too long for one line: the response follows the continuation.
            return first + self.backendSays(b"+ \r\n")
        return first

    def test_errorRelayed(self) -> None:
        """
        The backend's error challenge reaches the client, then -ERR.
        """
        self.connect()
        self.startLogin(oauthbearer(b"alice@example.org", b"bad"))
        self.assertEqual(self.backendSays(b"+ " + b64encode(DOVECOT_ERROR) + b"\r\n"), b"AQ==\r\n")
        self.backendSays(b"-ERR [AUTH] Authentication failed.\r\n")
        self.clock.advance(10)
        self.assertEqual(self.client.value(), b"+ " + b64encode(DOVECOT_ERROR) + b"\r\n")
        self.assertTrue(self.send(b"AQ==\r\n").startswith(b"-ERR [AUTH]"))


class SievePassThroughTests(PassThroughMixin, SynchronousTestCase):
    """
    ManageSieve: AUTHENTICATE towards the backend, the error challenge
    relayed as a string.
    """

    protocol = "sieve"
    GREETING = b'"IMPLEMENTATION" "Dovecot"\r\n"SASL" "PLAIN OAUTHBEARER XOAUTH2"\r\nOK "ready"\r\n'

    def startLogin(self, message: bytes) -> bytes:
        self.send(b'AUTHENTICATE "OAUTHBEARER" "' + b64encode(message) + b'"\r\n')
        return self.backendSays(self.GREETING)

    def test_errorRelayed(self) -> None:
        """
        The backend's error challenge reaches the client as a string, then
        NO.
        """
        self.connect()
        self.startLogin(oauthbearer(b"alice@example.org", b"bad"))
        self.assertEqual(self.backendSays(b'"' + b64encode(DOVECOT_ERROR) + b'"\r\n'), b'"AQ=="\r\n')
        self.backendSays(b'NO "Authentication failed."\r\n')
        self.clock.advance(10)
        self.assertEqual(self.client.value(), b'"' + b64encode(DOVECOT_ERROR) + b'"\r\n')
        self.assertTrue(self.send(b'"AQ=="\r\n').startswith(b"NO"))


class SubmissionPassThroughTests(PassThroughMixin, SynchronousTestCase):
    """
    SMTP submission: AUTH towards the backend (after a 334 when too long
    for a command line), the error relayed as a 334, then 535.
    """

    protocol = "smtp"
    options = {"mode": "submission"}

    def connect(self, route: Route | None = None) -> None:
        super().connect(route)
        self.frontend.context.backends[self.backend.name] = self.backend
        backendExtensions(self.frontend.context, "smtp").learn(self.backend.name, {"PIPELINING": ""})  # type: ignore[arg-type]

    def startLogin(self, message: bytes) -> bytes:
        self.send(b"EHLO client.example\r\n")
        self.send(b"AUTH OAUTHBEARER " + b64encode(message) + b"\r\n")
        self.backendSays(b"220 old.test ESMTP\r\n")
        first = self.backendSays(b"250-old.test\r\n250 AUTH PLAIN OAUTHBEARER XOAUTH2\r\n")
        if first == b"AUTH OAUTHBEARER\r\n":
            return first + self.backendSays(b"334 \r\n")
        return first

    def test_errorRelayed(self) -> None:
        """
        The backend's error challenge reaches the client as a 334, then
        the client's answer brings 535.
        """
        self.connect()
        self.startLogin(oauthbearer(b"alice@example.org", b"bad"))
        self.assertEqual(self.backendSays(b"334 " + b64encode(DOVECOT_ERROR) + b"\r\n"), b"AQ==\r\n")
        self.backendSays(b"535 5.7.8 Error: authentication failed\r\n")
        self.clock.advance(10)
        self.assertEqual(self.client.value(), b"334 " + b64encode(DOVECOT_ERROR) + b"\r\n")
        self.assertTrue(self.send(b"AQ==\r\n").startswith(b"535 5.7.8"))


class TokenValidatingRouterTests(SynchronousTestCase):
    """
    L{TokenValidatingRouter}: the validating mode.
    """

    SECRET = b"s" * 32

    def setUp(self) -> None:
        import jwt

        jwk = {"kty": "oct", "kid": "k1", "alg": "HS256", "k": urlsafe_b64encode(self.SECRET).rstrip(b"=").decode()}
        self.backend = makeBackend("old", masterUser="proxy", masterPassword=b"masterpw")
        self.inner = FakeRouter({"alice@example.org": Route(self.backend)})
        self.router = TokenValidatingRouter(self.inner, jwt.PyJWKSet([jwk]), claim="email")
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def token(self, email: str = "alice@example.org", lifetime: int = 300, key: bytes | None = None, kid: str = "k1") -> bytes:
        import jwt

        now = int(time.time())
        claims = {"sub": "x", "email": email, "exp": now + lifetime}
        return jwt.encode(claims, key or self.SECRET, algorithm="HS256", headers={"kid": kid}).encode()

    def route(self, token: bytes, user: str = "alice@example.org") -> Route | Rejection:
        request = evolve(makeRequest(), credentials=Credentials("OAUTHBEARER", user, token=token))
        return self.successResultOf(self.router.route(request))

    def test_valid(self) -> None:
        """
        A valid token for the account is routed by the wrapped router and
        becomes a master-user login.
        """
        route = self.route(self.token())
        assert isinstance(route, Route)
        self.assertEqual((route.backend, route.useMaster, route.password, route.authenticated), (self.backend, True, None, True))

    def test_refused(self) -> None:
        """
        An expired token, one signed with another key, one naming an
        unknown key, or one for another account is refused without asking
        the wrapped router; the log says why and never holds the token.
        """
        bad = [
            self.token(lifetime=-60),
            self.token(key=b"o" * 32),
            self.token(kid="k2"),
            self.token(email="bob@example.org"),
            b"not-a-jwt",
        ]
        for token in bad:
            self.assertIsInstance(self.route(token), Rejection, token)
        self.assertEqual(self.inner.requests, [])
        text = repr(self.events)
        for token in bad:
            for part in token.split(b"."):
                self.assertNotIn(part.decode(), text)

    def test_tokenAlone(self) -> None:
        """
        A token that comes without a user (HTTP's Authorization: Bearer)
        is routed as the account its claim names, and the route names that
        account; an invalid one is still refused.
        """
        route = self.route(self.token(), user="")
        assert isinstance(route, Route)
        self.assertEqual((route.backend, route.useMaster, route.user), (self.backend, True, "alice@example.org"))
        self.assertEqual(self.inner.requests[0].credentials.user, "alice@example.org")
        self.assertIsInstance(self.route(self.token(lifetime=-60), user=""), Rejection)

    def test_otherLogins(self) -> None:
        """
        A password login goes to the wrapped router untouched.
        """
        request = makeRequest()
        route = self.successResultOf(self.router.route(request))
        assert isinstance(route, Route)
        self.assertFalse(route.useMaster)


class ValidationConfigTests(ConfigTestCase):
    """
    The C{[router.oauth]} sub-table.
    """

    def build(self, oauth: str, jwks: str) -> Any:
        with open(os.path.join(self.directory, "jwks.json"), "w") as f:
            f.write(jwks)
        config = self.parse(configText(extra="[router.oauth]\n" + oauth))
        return buildRouter(config, Clock())

    def test_wraps(self) -> None:
        """
        With a JWKS file the router is wrapped in the validation, with the
        claim asked for.
        """
        router = self.build('jwks_file = "jwks.json"\nclaim = "sub"\n', '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
        self.assertIsInstance(router, TokenValidatingRouter)
        self.assertEqual(router.claim, "sub")

    def test_errors(self) -> None:
        """
        A file that is not a JWKS and an unknown key are refused, naming
        the key.
        """
        error = self.assertRaises(ConfigError, self.build, 'jwks_file = "jwks.json"\n', "{}")
        self.assertIn("router.oauth.jwks_file: not a usable JWKS", str(error))
        error = self.assertRaises(ConfigError, self.build, 'jwks_file = "jwks.json"\njwks_url = "x"\n', '{"keys": []}')
        self.assertIn("router.oauth", str(error))
        both = 'jwks_file = "jwks.json"\nintrospection_url = "https://id.example/introspect"\n'
        error = self.assertRaises(ConfigError, self.build, both, '{"keys": []}')
        self.assertIn("router.oauth.jwks_file: give jwks_file or introspection_url, not both", str(error))
        error = self.assertRaises(ConfigError, self.build, 'introspection_url = "ftp://x"\n', "")
        self.assertIn("router.oauth.introspection_url: must be an http:// or https:// URL", str(error))

    def test_backendWithoutMasterUser(self) -> None:
        """
        A validating C{[router.oauth]} logs in to the backend as its master
        user: a backend without one is named in a warning (an OAuth login
        routed there would fail), in a chain's routers too; with a master
        user, no warning.
        """
        oauth = '[router.oauth]\njwks_file = "jwks.json"\n'

        def warnings(text: str) -> list[str]:
            return [warning.split(": ", 1)[1] for warning in self.parse(text).warnings]

        warning = (
            "router.oauth: validates tokens and logs in to the backend as its master_user; "
            "backend old has none, so an OAuth login routed there fails"
        )
        self.assertIn(warning, warnings(configText(extra=oauth)))
        chain = '[router]\ntype = "chain"\n[[router.routers]]\ntype = "static"\npath = "routes.toml"\n'
        chained = warnings(configText(router=chain, extra='[router.routers.oauth]\njwks_file = "jwks.json"\n'))
        self.assertIn(warning.replace("router.oauth", "router.routers[0].oauth"), chained)
        master = 'master_user = "proxy"\nmaster_password_file = "master.pw"\n'
        self.assertEqual(warnings(configText(backend=master, extra=oauth)), [])
        self.assertEqual(warnings(configText()), [])

    def test_introspection(self) -> None:
        """
        With an introspection URL the router asks it.
        """
        router = self.build('introspection_url = "https://id.example/introspect"\nclient_id = "proxy"\n', "")
        self.assertIsInstance(router, TokenValidatingRouter)


class _Introspection(Resource):
    """
    An RFC 7662 endpoint: tokens it knows are active for a user until an
    expiry, others inactive; it records each request's form and
    authorization.
    """

    isLeaf = True

    def __init__(self, tokens: dict[bytes, dict[str, Any]]) -> None:
        super().__init__()
        self.tokens = tokens
        self.asked: list[tuple[bytes, bytes | None]] = []

    def render_POST(self, request: Any) -> bytes:
        token = request.args[b"token"][0]
        self.asked.append((token, request.getHeader(b"authorization")))
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.tokens.get(token, {"active": False})).encode()


class IntrospectionTests(SynchronousTestCase):
    """
    The validating mode with token introspection (RFC 7662).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.endpoint = _Introspection({b"good": {"active": True, "email": "alice@example.org", "exp": 1100}})
        self.client = IntrospectionClient(
            StubTreq(self.endpoint), "http://id.example/introspect", self.clock, clientID="proxy", clientSecret=b"pw"
        )
        backend = makeBackend("old", masterUser="proxy", masterPassword=b"masterpw")
        self.router = TokenValidatingRouter(FakeRouter({"alice@example.org": Route(backend)}), introspection=self.client)

    def route(self, token: bytes, user: str = "alice@example.org") -> Any:
        request = evolve(makeRequest(), credentials=Credentials("XOAUTH2", user, token=token))
        return self.successResultOf(self.router.route(request))

    def test_activeToken(self) -> None:
        """
        An active token naming the account is a master-user route; the
        endpoint got the token with the client's credentials; its answer
        is kept until the token's exp, then asked again.
        """
        route = self.route(b"good")
        self.assertTrue(isinstance(route, Route) and route.useMaster, route)
        self.assertEqual(self.endpoint.asked, [(b"good", b"Basic " + b64encode(b"proxy:pw"))])
        self.route(b"good")
        self.assertEqual(len(self.endpoint.asked), 1)
        self.clock.advance(100)
        self.assertIsInstance(self.route(b"good"), Rejection)
        self.assertEqual(len(self.endpoint.asked), 2)

    def test_refused(self) -> None:
        """
        An inactive token, or an active one for another account, is
        refused; an inactive answer is not kept.
        """
        self.assertIsInstance(self.route(b"unknown"), Rejection)
        self.assertIsInstance(self.route(b"unknown"), Rejection)
        self.assertEqual(len(self.endpoint.asked), 2)
        self.assertIsInstance(self.route(b"good", "bob@example.org"), Rejection)

    def test_endpointSilent(self) -> None:
        """
        An endpoint that takes the request and never answers gives a
        temporary refusal after C{timeout} seconds, logged in words.
        """
        from treq.client import HTTPClient
        from twisted.internet.testing import MemoryReactorClock, StringTransport
        from twisted.logger import formatEvent
        from twisted.web.client import Agent

        reactor = MemoryReactorClock()
        client = IntrospectionClient(HTTPClient(Agent(reactor)), "http://id.example/introspect", reactor, timeout=3.0)
        router = TokenValidatingRouter(FakeRouter({}), introspection=client)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        request = evolve(makeRequest(), credentials=Credentials("XOAUTH2", "alice@example.org", token=b"t0ken"))
        d = router.route(request)
        factory = reactor.tcpClients[0][2]
        factory.buildProtocol(None).makeConnection(StringTransport())
        reactor.advance(3)
        answer = self.successResultOf(d)
        self.assertTrue(isinstance(answer, Rejection) and answer.temporary, answer)
        [line] = [formatEvent(event) for event in events if "introspection" in formatEvent(event)]
        self.assertEqual(line, 'OAuth introspection for "alice@example.org" failed: "no answer within 3 s"')

    def test_endpointDown(self) -> None:
        """
        An endpoint that does not answer usably gives a temporary refusal.
        """
        self.endpoint.tokens[b"broken"] = ["not", "an", "object"]  # type: ignore[assignment]
        answer = self.route(b"broken")
        self.assertTrue(isinstance(answer, Rejection) and answer.temporary, answer)
