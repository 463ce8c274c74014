"""
Tests for the example auth server C{examples/auth_server.py}, asked by the
HTTP router through L{treq.testing.StubTreq}: what operators copy must work
with mailproxy (and, in the integration tests, with nginx).
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import os
import shutil
from typing import Any

from treq.testing import StubTreq

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.model import Backend, Credentials, Rejection, Route, RouteRequest
from mailproxy.routers._backends import BackendDefaults, BackendResolver
from mailproxy.routers.http import HTTPRouter

from .routerhelpers import CLIENT, result

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "examples")
SECRET = "change-me-to-a-long-random-string"
OLD = Backend(name="old", host="10.0.0.1", ports={"imap": 143, "pop3": 110})
NEW = Backend(name="new", host="10.0.0.2", ports={"imap": 143, "pop3": 110})


def loadExample() -> Any:
    """
    Import C{examples/auth_server.py} as a module.
    """
    spec = importlib.util.spec_from_file_location("auth_server_example", os.path.join(EXAMPLES, "auth_server.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def login(user: str, password: bytes, protocol: str = "imap", attempt: int = 1) -> RouteRequest:
    """
    A plain login request.
    """
    return RouteRequest(
        protocol=protocol,  # type: ignore[arg-type]
        credentials=Credentials("LOGIN", user, password=password),
        client=CLIENT,
        attempt=attempt,
    )


class ExampleAuthServerTests(SynchronousTestCase):
    """
    The example auth server answering the HTTP router.
    """

    def setUp(self) -> None:
        self.module = loadExample()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.users = os.path.join(directory, "auth_users.toml")
        shutil.copy(os.path.join(EXAMPLES, "auth_users.toml"), self.users)
        self.resource = self.module.AuthResource(self.module.UserTable(self.users))

    def router(self, secret: str = SECRET) -> HTTPRouter:
        """
        An HTTP router asking the example server in memory.
        """
        return HTTPRouter(
            "http://127.0.0.1:9000/auth",
            BackendResolver({"old": OLD, "new": NEW}, BackendDefaults()),
            reactor=Clock(),
            client=StubTreq(self.resource),
            headers=[("X-Auth-Key", secret)],
        )

    def test_routes(self) -> None:
        """
        Known users with their passwords go to their servers (the configured
        backends at those addresses), per protocol; a user's C{login_user}
        rewrites the login.
        """
        router = self.router()
        self.assertIs(result(router.route(login("alice@example.org", b"alice secret"))).backend, OLD)
        self.assertIs(result(router.route(login("bob@example.org", b"bob-secret", "pop3"))).backend, NEW)
        route = result(router.route(login("carol@example.org", b"carol-secret")))
        self.assertEqual((route.backend, route.user), (NEW, "carol"))

    def test_wrongPassword(self) -> None:
        """
        A wrong password is refused with a wait (the session stays open) on
        the first attempts, and without one (closing it) from the third.
        """
        router = self.router()
        rejection = result(router.route(login("alice@example.org", b"guess")))
        self.assertEqual(rejection, Rejection("Invalid login or password", wait=3.0))
        rejection = result(router.route(login("alice@example.org", b"guess", attempt=3)))
        self.assertEqual(rejection, Rejection("Invalid login or password", close=True))

    def test_unknownUser(self) -> None:
        """
        An unknown user is refused like a wrong password, marked unknown.
        """
        rejection = result(self.router().route(login("zed@example.org", b"x")))
        self.assertEqual(rejection, Rejection("Invalid login or password", wait=3.0, unknown=True))

    def test_escapedPassword(self) -> None:
        """
        A password with spaces reaches the server escaped and is unescaped
        there.
        """
        self.assertIsInstance(result(self.router().route(login("alice@example.org", b"alice secret"))), Route)

    def test_sharedSecret(self) -> None:
        """
        Without the shared secret the server answers with a temporary
        failure.
        """
        rejection = result(self.router(secret="wrong").route(login("alice@example.org", b"alice secret")))
        self.assertTrue(rejection.temporary)

    def test_apop(self) -> None:
        """
        An APOP digest is checked against the stored password, which comes
        back as C{Auth-Pass} for the backend login.
        """
        challenge = b"<1.2@mail.example.org>"
        response = hashlib.md5(challenge + b"bob-secret").hexdigest().encode()
        request = RouteRequest(
            protocol="pop3",
            credentials=Credentials("APOP", "bob@example.org", challenge=challenge, response=response),
            client=CLIENT,
        )
        route = result(self.router().route(request))
        self.assertEqual((route.backend, route.password), (NEW, b"bob-secret"))

    def test_cramMD5Wrong(self) -> None:
        """
        A CRAM-MD5 digest of the wrong secret is refused.
        """
        challenge = b"<3.4@mail.example.org>"
        response = hmac.new(b"wrong", challenge, hashlib.md5).hexdigest().encode()
        request = RouteRequest(
            protocol="imap",
            credentials=Credentials("CRAM-MD5", "bob@example.org", challenge=challenge, response=response),
            client=CLIENT,
        )
        self.assertIsInstance(result(self.router().route(request)), Rejection)

    def test_recipient(self) -> None:
        """
        SMTP without login routes the recipient to its server's MX port;
        an unknown recipient is refused with a 5xx code.
        """
        request = RouteRequest(protocol="smtp", credentials=None, client=CLIENT, helo="x", mailFrom="", rcptTo="bob@example.org")
        route = result(self.router().route(request))
        self.assertEqual((route.backend.host, route.backend.ports["smtp"]), ("10.0.0.2", 25))
        request = RouteRequest(protocol="smtp", credentials=None, client=CLIENT, helo="x", mailFrom="", rcptTo="zed@example.org")
        rejection = result(self.router().route(request))
        self.assertEqual((rejection.message, rejection.temporary), ("Recipient unknown", False))

    def test_reread(self) -> None:
        """
        The users file is re-read when it changes.
        """
        router = self.router()
        self.assertIsInstance(result(router.route(login("dave@example.org", b"d"))), Rejection)
        with open(self.users, "a") as f:
            f.write('\n[users."dave@example.org"]\npassword = "d"\n')
        os.utime(self.users, ns=(1, 1))
        self.assertIs(result(router.route(login("dave@example.org", b"d"))).backend, OLD)
