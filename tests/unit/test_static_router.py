"""
Tests for L{mailproxy.routers.static}, L{mailproxy.routers.buildRouter} and
L{mailproxy.routers.callRouter}.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.config import ROUTER_TYPES, Config, ConfigError, parseConfig
from mailproxy.interfaces import IReloadable, IRouter
from mailproxy.model import (
    Backend,
    ClientInfo,
    Credentials,
    Rejection,
    Route,
    RouteRequest,
)
from mailproxy.routers import _BUILDERS, buildRouter, callRouter
from mailproxy.routers.static import StaticRouter

OLD = Backend(name="old", host="127.0.0.1", ports={"imap": 143})
NEW = Backend(name="new", host="127.0.0.1", ports={"imap": 1143, "pop3": 1110})
MASTERED = Backend(
    name="mastered",
    host="127.0.0.1",
    ports={"imap": 2143},
    masterUser="proxy",
    masterPassword=b"master-secret",
)
SMTPONLY = Backend(name="smtponly", host="127.0.0.1", ports={"smtp": 587})
BACKENDS = {b.name: b for b in (OLD, NEW, MASTERED, SMTPONLY)}

TABLE = """\
default = "old"

[domains]
"Example.NET" = "new"
"example.com" = "smtponly"

[accounts]
"Alice@Example.org" = "new"
"carol@example.org" = { backend = "new", password = "s3cret", login_user = "carol", login_password = "backend-pw" }
"dave@example.org" = { backend = "new", password = "d4ve" }
"erin@example.org" = { backend = "mastered", password = "3rin", master = true }
"frank" = "new"
"""

CLIENT = ClientInfo(
    sessionId="s1", address="192.0.2.1", port=50000, localAddress="127.0.0.1", localPort=143
)


def login(user: str, password: bytes = b"pw", protocol: str = "imap") -> RouteRequest:
    """
    A request for a cleartext login.
    """
    return RouteRequest(
        protocol=protocol,  # type: ignore[arg-type]
        credentials=Credentials(mechanism="LOGIN", user=user, password=password),
        client=CLIENT,
    )


def cramMD5(user: str, secret: bytes) -> RouteRequest:
    """
    A request for a CRAM-MD5 login that proves knowledge of C{secret}.
    """
    challenge = b"<1896.697170952@mail.example.org>"
    response = hmac.new(secret, challenge, hashlib.md5).hexdigest().encode("ascii")
    return RouteRequest(
        protocol="imap",
        credentials=Credentials(
            mechanism="CRAM-MD5", user=user, challenge=challenge, response=response
        ),
        client=CLIENT,
    )


def apop(user: str, secret: bytes) -> RouteRequest:
    """
    A request for a POP3 APOP login that proves knowledge of C{secret}.
    """
    challenge = b"<1896.697170952@mail.example.org>"
    response = hashlib.md5(challenge + secret).hexdigest().encode("ascii")
    return RouteRequest(
        protocol="pop3",
        credentials=Credentials(mechanism="APOP", user=user, challenge=challenge, response=response),
        client=CLIENT,
    )


class RouterTestCase(SynchronousTestCase):
    """
    Writes route tables into a fresh directory.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "routes.toml")
        self.write(TABLE)
        self.events: list[dict[str, Any]] = []

    def write(self, text: str, path: str | None = None) -> None:
        """
        Write C{text} to the route table (or C{path}).
        """
        with open(path or self.path, "w") as f:
            f.write(text)

    def router(self, **kwargs: Any) -> StaticRouter:
        """
        A L{StaticRouter} for the route table whose log goes to
        C{self.events}.
        """
        router = StaticRouter(self.path, BACKENDS, **kwargs)
        router.log = Logger(observer=self.events.append)  # type: ignore[misc, arg-type]
        return router

    def logText(self) -> str:
        """
        All logged messages, formatted, one per line.
        """
        return "\n".join(formatEvent(event) for event in self.events)


class LookupTests(RouterTestCase):
    """
    Which rule a login matches, and what route it gets.
    """

    def test_interfaces(self) -> None:
        """
        L{StaticRouter} provides L{IRouter} and L{IReloadable}.
        """
        router = self.router()
        self.assertTrue(verifyObject(IRouter, router))
        self.assertTrue(verifyObject(IReloadable, router))

    def test_account(self) -> None:
        """
        An account that is only a backend name is located, not
        authenticated: the client's login goes on unchanged.
        """
        self.assertEqual(
            self.router().route(login("alice@example.org")),
            Route(backend=NEW, rule="accounts['Alice@Example.org'] -> new"),
        )

    def test_accountCase(self) -> None:
        """
        Accounts match whatever the case of the login or of the table key.
        """
        router = self.router()
        for user in ("alice@example.org", "ALICE@EXAMPLE.ORG", "Alice@Example.org"):
            self.assertEqual(router.explain(user), "accounts['Alice@Example.org'] -> new")

    def test_accountWithoutDomain(self) -> None:
        """
        Login names without C{@} can be accounts.
        """
        self.assertEqual(self.router().explain("Frank"), "accounts['frank'] -> new")

    def test_domain(self) -> None:
        """
        A login without an account rule matches its domain, in any case.
        """
        router = self.router()
        self.assertEqual(
            router.route(login("zoe@EXAMPLE.net")),
            Route(backend=NEW, rule="domains['Example.NET'] -> new"),
        )

    def test_domainAfterLastAt(self) -> None:
        """
        The domain is the part after the last C{@}.
        """
        router = self.router()
        self.assertEqual(router.explain("a@example.org@example.net"), "domains['Example.NET'] -> new")
        self.assertEqual(router.explain("a@example.net@example.org"), "default -> old")

    def test_default(self) -> None:
        """
        Everything else goes to the default.
        """
        self.assertEqual(
            self.router().route(login("bob@example.org")),
            Route(backend=OLD, rule="default -> old"),
        )

    def test_noRule(self) -> None:
        """
        Without a default, an unknown login is refused as a failed login
        marked C{unknown} (so that a chain asks its next router), and
        explained as C{"no rule"}.
        """
        self.write('[accounts]\n"alice@example.org" = "new"\n')
        router = self.router()
        self.assertEqual(
            router.route(login("bob@example.org")), Rejection("Authentication failed.", unknown=True)
        )
        self.assertEqual(router.explain("bob@example.org"), "no rule")
        self.assertIn('No route for "bob@example.org"', self.logText())

    def test_emptyTable(self) -> None:
        """
        An empty table is valid and routes nothing.
        """
        self.write("")
        self.assertEqual(self.router().explain("alice@example.org"), "no rule")

    def test_noCredentials(self) -> None:
        """
        A request without credentials can match only the default.
        """
        request = RouteRequest(protocol="imap", credentials=None, client=CLIENT)
        self.assertEqual(self.router().route(request), Route(backend=OLD, rule="default -> old"))

    def test_protocolNotServed(self) -> None:
        """
        A rule whose backend does not serve the protocol gives a temporary
        refusal, and the log says why.
        """
        result = self.router().route(login("x@example.com"))
        self.assertEqual(result, Rejection("Service temporarily unavailable.", temporary=True))
        self.assertIn(
            "domains['example.com'] sends \"x@example.com\" to backend smtponly, which has no imap port",
            self.logText(),
        )


class PasswordTests(RouterTestCase):
    """
    Accounts with a C{password} are authenticated by the router.
    """

    def test_right(self) -> None:
        """
        The right password gives an authenticated route with the rewritten
        login.
        """
        self.assertEqual(
            self.router().route(login("carol@example.org", b"s3cret")),
            Route(
                backend=NEW,
                user="carol",
                password=b"backend-pw",
                authenticated=True,
                rule="accounts['carol@example.org'] -> new",
            ),
        )

    def test_rightKeepsLogin(self) -> None:
        """
        Without C{login_user} and C{login_password} a cleartext login goes on
        with the client's own name and password.
        """
        route = self.router().route(login("dave@example.org", b"d4ve"))
        self.assertEqual(route, Route(backend=NEW, authenticated=True, rule="accounts['dave@example.org'] -> new"))

    def test_wrong(self) -> None:
        """
        A wrong password is refused as a failed login (not a temporary
        problem), and the log names the account but not the password.
        """
        result = self.router().route(login("carol@example.org", b"guess"))
        self.assertEqual(result, Rejection("Authentication failed.", temporary=False))
        text = self.logText()
        self.assertIn('Wrong password for "carol@example.org"', text)
        self.assertNotIn("guess", text)
        self.assertNotIn("s3cret", text)

    def test_caseOfPassword(self) -> None:
        """
        Passwords are compared exactly, unlike names.
        """
        self.assertIsInstance(self.router().route(login("CAROL@example.org", b"S3CRET")), Rejection)

    def test_master(self) -> None:
        """
        C{master = true} asks for a master user login after the password was
        checked.
        """
        self.assertEqual(
            self.router().route(login("erin@example.org", b"3rin")),
            Route(
                backend=MASTERED,
                useMaster=True,
                authenticated=True,
                rule="accounts['erin@example.org'] -> mastered",
            ),
        )

    def test_cramMD5(self) -> None:
        """
        A right CRAM-MD5 response is accepted; the backend login uses
        C{login_password}.
        """
        route = self.router().route(cramMD5("carol@example.org", b"s3cret"))
        self.assertIsInstance(route, Route)
        assert isinstance(route, Route)
        self.assertEqual((route.authenticated, route.user, route.password), (True, "carol", b"backend-pw"))

    def test_digestUsesStoredPassword(self) -> None:
        """
        Without C{login_password}, a digest login reaches the backend with the
        stored password, since the client sent none.
        """
        route = self.router().route(cramMD5("dave@example.org", b"d4ve"))
        self.assertEqual(
            route,
            Route(backend=NEW, password=b"d4ve", authenticated=True, rule="accounts['dave@example.org'] -> new"),
        )

    def test_apop(self) -> None:
        """
        APOP works the same way.
        """
        route = self.router().route(apop("dave@example.org", b"d4ve"))
        self.assertEqual(
            route,
            Route(backend=NEW, password=b"d4ve", authenticated=True, rule="accounts['dave@example.org'] -> new"),
        )

    def test_cramMD5Wrong(self) -> None:
        """
        A CRAM-MD5 response for another secret is refused.
        """
        self.assertEqual(
            self.router().route(cramMD5("dave@example.org", b"wrong")), Rejection("Authentication failed.")
        )

    def test_digestWithoutStoredPassword(self) -> None:
        """
        A digest login for an account without a stored password cannot be
        verified nor passed on: it is refused with the generic text, and the
        log says why.
        """
        router = self.router()
        for user in ("alice@example.org", "zoe@example.net", "bob@example.org"):
            self.assertEqual(router.route(cramMD5(user, b"pw")), Rejection("Authentication failed."))
        self.assertIn(
            "CRAM-MD5 login for \"alice@example.org\" refused: accounts['Alice@Example.org'] has no password",
            self.logText(),
        )

    def test_oauthPassThrough(self) -> None:
        """
        An OAuth token login is routed to the account's backend without a
        password or the master user, whatever the table stores for the
        account: the table cannot judge a token, the backend does.
        """
        router = self.router()
        for user, backend, loginUser in (
            ("alice@example.org", NEW, None),
            ("carol@example.org", NEW, "carol"),
            ("erin@example.org", MASTERED, None),
        ):
            request = RouteRequest(
                protocol="imap", credentials=Credentials("OAUTHBEARER", user, token=b"a-token"), client=CLIENT
            )
            route = router.route(request)
            assert isinstance(route, Route), route
            self.assertEqual(
                (route.backend, route.user, route.password, route.useMaster, route.authenticated),
                (backend, loginUser, None, False, False),
                user,
            )

    def test_ruleRepr(self) -> None:
        """
        The repr of a loaded rule does not show its passwords.
        """
        router = self.router()
        text = repr(router._table)
        self.assertIn("carol", text)
        self.assertNotIn("s3cret", text)
        self.assertNotIn("backend-pw", text)


class TableErrorTests(RouterTestCase):
    """
    A route table with a mistake is refused at start, naming the file and
    the key.
    """

    def assertTableError(self, text: str, key: str, *fragments: str) -> str:
        """
        Assert that loading C{text} raises L{ConfigError} about C{key}, with
        every one of C{fragments} in the message.
        """
        self.write(text)
        message = str(self.assertRaises(ConfigError, StaticRouter, self.path, BACKENDS))
        self.assertTrue(message.startswith(f"{self.path}: {key}: "), message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_missingFile(self) -> None:
        """
        A route table that does not exist is refused.
        """
        os.remove(self.path)
        message = str(self.assertRaises(ConfigError, StaticRouter, self.path, BACKENDS))
        self.assertEqual(message, f"{self.path}: cannot read: No such file or directory")

    def test_syntax(self) -> None:
        """
        A syntax error names the line.
        """
        self.write('default = "old"\n[accounts\n')
        message = str(self.assertRaises(ConfigError, StaticRouter, self.path, BACKENDS))
        self.assertTrue(message.startswith(f"{self.path}: line 2, column "), message)

    def test_unknownTopLevel(self) -> None:
        """
        Unknown top-level keys are refused, listing the allowed ones.
        """
        self.assertTableError('[account]\n', "account", "default, domains, accounts")

    def test_unknownBackend(self) -> None:
        """
        A backend name that is not configured is refused with the configured
        ones listed, and the closest one suggested if one is close.
        """
        self.assertTableError(
            '[accounts]\n"alice@example.org" = "neww"\n',
            'accounts."alice@example.org"',
            "unknown backend 'neww'; configured backends: mastered, new, old, smtponly (did you mean 'new'?)",
        )
        message = self.assertTableError('default = "gone"\n', "default", "unknown backend 'gone'")
        self.assertNotIn("did you mean", message)
        self.assertTableError('[domains]\n"a.example" = "gone"\n', 'domains."a.example"', "'gone'")
        self.assertTableError(
            '[accounts]\n"a@b" = { backend = "gone" }\n', 'accounts."a@b".backend', "'gone'"
        )

    def test_backendType(self) -> None:
        """
        Backend names are strings; a domain cannot take an account's table.
        """
        self.assertTableError("default = 1\n", "default", "must be a backend name")
        self.assertTableError(
            '[domains]\n"a.example" = { backend = "old" }\n', 'domains."a.example"', "must be a backend name"
        )

    def test_domainWithAt(self) -> None:
        """
        A domain key with C{@} would never match and is refused.
        """
        self.assertTableError('[domains]\n"@a.example" = "old"\n', 'domains."@a.example"', "without @")

    def test_duplicateByCase(self) -> None:
        """
        Two keys that differ only in case are refused.
        """
        self.assertTableError(
            '[accounts]\n"a@b" = "old"\n"A@B" = "new"\n',
            'accounts."A@B"',
            "same entry as accounts['a@b']",
        )

    def test_accountKeys(self) -> None:
        """
        Account tables take only the documented keys and need a backend.
        """
        self.assertTableError(
            '[accounts]\n"a@b" = { backend = "old", pasword = "x" }\n',
            'accounts."a@b".pasword',
            "backend, password, login_user, login_password, master",
        )
        self.assertTableError('[accounts]\n"a@b" = { password = "x" }\n', 'accounts."a@b".backend', "required")
        self.assertTableError('[accounts]\n"a@b" = 5\n', 'accounts."a@b"', "must be a backend name or a table")

    def test_accountTypes(self) -> None:
        """
        Passwords must be non-empty strings, master a boolean; the message
        does not show the value.
        """
        self.assertTableError(
            '[accounts]\n"a@b" = { backend = "old", password = 12345 }\n',
            'accounts."a@b".password',
            "must be a string, not an integer",
        )
        message = self.assertTableError(
            '[accounts]\n"a@b" = { backend = "old", password = "" }\n',
            'accounts."a@b".password',
            "must not be empty",
        )
        self.assertTableError(
            '[accounts]\n"a@b" = { backend = "mastered", password = "pw", master = "yes" }\n',
            'accounts."a@b".master',
            "true or false",
        )
        self.assertNotIn("12345", message)

    def test_loginPasswordNeedsPassword(self) -> None:
        """
        A backend password without a check of the client's would let anyone
        in: refused.
        """
        self.assertTableError(
            '[accounts]\n"a@b" = { backend = "old", login_password = "x" }\n',
            'accounts."a@b".login_password',
            "needs password",
        )

    def test_masterNeedsPassword(self) -> None:
        """
        A master login without a check of the client's password would let
        anyone in: refused.
        """
        self.assertTableError(
            '[accounts]\n"a@b" = { backend = "mastered", master = true }\n',
            'accounts."a@b".master',
            "needs password",
        )

    def test_masterNeedsMasterUser(self) -> None:
        """
        C{master = true} needs a backend with a master user.
        """
        self.assertTableError(
            '[accounts]\n"a@b" = { backend = "old", password = "x", master = true }\n',
            'accounts."a@b".master',
            "backend 'old' has no master_user",
        )


class ReloadTests(RouterTestCase):
    """
    Tests for L{StaticRouter.reload}.
    """

    def test_reload(self) -> None:
        """
        A reload applies the new table and logs it.
        """
        router = self.router()
        self.write('default = "new"\n')
        router.reload()
        self.assertEqual(router.explain("alice@example.org"), "default -> new")
        self.assertIsNone(router.lastError)
        self.assertIn(f"Loaded route table {self.path}: 0 accounts, 0 domains, default new", self.logText())

    def test_brokenKeepsTable(self) -> None:
        """
        A half-written file keeps the previous table, and the log and
        C{lastError} say why.
        """
        router = self.router()
        self.write(TABLE[: TABLE.index("carol") + 10])
        router.reload()
        self.assertEqual(router.explain("alice@example.org"), "accounts['Alice@Example.org'] -> new")
        self.assertTrue(router.lastError and router.lastError.startswith(f"{self.path}: line "))
        self.assertIn(f"Keeping the previous route table: {self.path}: line ", self.logText())

    def test_unknownBackendKeepsTable(self) -> None:
        """
        A table naming an unknown backend keeps the previous table.
        """
        router = self.router()
        self.write('default = "nowhere"\n')
        router.reload()
        self.assertEqual(router.explain("bob@example.org"), "default -> old")
        self.assertIn("unknown backend 'nowhere'", self.logText())

    def test_missingKeepsTable(self) -> None:
        """
        A table that has disappeared keeps the previous one.
        """
        router = self.router()
        os.remove(self.path)
        router.reload()
        self.assertEqual(router.explain("bob@example.org"), "default -> old")

    def test_fixedAfterBroken(self) -> None:
        """
        After a failed reload, the next good file is applied.
        """
        router = self.router()
        self.write("default = ")
        router.reload()
        self.write('default = "new"\n')
        router.reload()
        self.assertEqual(router.explain("bob@example.org"), "default -> new")
        self.assertIsNone(router.lastError)


class WatchTests(RouterTestCase):
    """
    Tests for L{StaticRouter.startWatching}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.watched = self.router(reactor=self.clock, watchInterval=2.0)
        self.watched.startWatching()

    def reloads(self) -> int:
        """
        How many reloads, good or bad, have been logged.
        """
        return sum(
            1
            for event in self.events
            if event["log_format"].startswith(("Loaded route table", "Keeping the previous"))
        )

    def test_change(self) -> None:
        """
        A changed file is applied at the next look.
        """
        self.write('default = "new"\n')
        self.clock.advance(1.9)
        self.assertEqual(self.watched.explain("bob@example.org"), "default -> old")
        self.clock.advance(0.1)
        self.assertEqual(self.watched.explain("bob@example.org"), "default -> new")

    def test_noChange(self) -> None:
        """
        An unchanged file is not re-read.
        """
        self.clock.advance(10)
        self.assertEqual(self.reloads(), 0)

    def test_sameSizeAndTime(self) -> None:
        """
        A file replaced by a rename is noticed by its inode, even with the
        same size and modification time.
        """
        info = os.stat(self.path)
        replacement = self.path + ".new"
        self.write(TABLE.replace('default = "old"', 'default = "new"'), replacement)
        os.utime(replacement, ns=(info.st_atime_ns, info.st_mtime_ns))
        os.rename(replacement, self.path)
        self.clock.advance(2)
        self.assertEqual(self.watched.explain("bob@example.org"), "default -> new")

    def test_modifiedInPlace(self) -> None:
        """
        A file rewritten in place with the same size is noticed by its
        modification time.
        """
        info = os.stat(self.path)
        self.write(TABLE.replace('default = "old"', 'default = "new"'))
        os.utime(self.path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))
        self.clock.advance(2)
        self.assertEqual(self.watched.explain("bob@example.org"), "default -> new")

    def test_brokenOnce(self) -> None:
        """
        A broken file is reported once, not at every look, and the fixed file
        is applied when it appears.
        """
        self.write("default = ")
        self.clock.advance(2)
        self.clock.advance(2)
        self.clock.advance(2)
        self.assertEqual(self.reloads(), 1)
        self.assertEqual(self.watched.explain("bob@example.org"), "default -> old")
        self.write('default = "new"\n')
        self.clock.advance(2)
        self.assertEqual(self.watched.explain("bob@example.org"), "default -> new")

    def test_removed(self) -> None:
        """
        A removed file keeps the table and is reported once; a new file is
        applied.
        """
        os.remove(self.path)
        self.clock.advance(2)
        self.clock.advance(2)
        self.assertEqual(self.logText().count("is gone"), 1)
        self.assertEqual(self.watched.explain("bob@example.org"), "default -> old")
        self.write('default = "new"\n')
        self.clock.advance(2)
        self.assertEqual(self.watched.explain("bob@example.org"), "default -> new")

    def test_stop(self) -> None:
        """
        After L{StaticRouter.stopWatching} nothing is scheduled and changes
        are not applied.
        """
        self.watched.stopWatching()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.write('default = "new"\n')
        self.clock.advance(10)
        self.assertEqual(self.watched.explain("bob@example.org"), "default -> old")

    def test_startTwice(self) -> None:
        """
        Starting twice schedules one look, not two.
        """
        self.watched.startWatching()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_noReactor(self) -> None:
        """
        Watching needs a reactor.
        """
        self.assertRaises(RuntimeError, self.router().startWatching)


@implementer(IRouter)
class RecordingRouter:
    """
    A Python router for the tests: records how it was made.
    """

    def __init__(self, *, backends: dict[str, Backend], reactor: object, **options: Any) -> None:
        self.backends = backends
        self.reactor = reactor
        self.options = options

    def route(self, request: RouteRequest) -> Rejection:
        """
        Refuse everything.
        """
        return Rejection()


@implementer(IRouter)
class PickyRouter:
    """
    A Python router that accepts no options and refuses a bad backend set.
    """

    def __init__(self, *, backends: dict[str, Backend], reactor: object) -> None:
        if "old" in backends:
            raise ConfigError("custom: no old backends please")

    def route(self, request: RouteRequest) -> Rejection:
        """
        Refuse everything.
        """
        return Rejection()


class NotARouter:
    """
    A class without a route method.
    """

    def __init__(self, **kwargs: Any) -> None:
        pass


notAClass = 42


class BuildRouterTests(SynchronousTestCase):
    """
    Tests for L{buildRouter}.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "mailproxy.toml")
        with open(os.path.join(self.directory, "routes.toml"), "w") as f:
            f.write('default = "old"\n')

    def config(self, router: str) -> Config:
        """
        A configuration with one backend, C{old}, and C{router} as its
        C{[router]} table.
        """
        return parseConfig(
            '[[listener]]\nprotocol = "imap"\nendpoint = "tcp:0"\ntls = "none"\n'
            + router
            + '[backend.old]\nhost = "127.0.0.1"\nports = { imap = 143 }\n',
            self.path,
        )

    def assertBuildError(self, router: str, key: str, *fragments: str) -> None:
        """
        Assert that building the router fails with a message about C{key}.
        """
        message = str(self.assertRaises(ConfigError, buildRouter, self.config(router), Clock()))
        self.assertTrue(message.startswith(f"{self.path}: {key}: "), message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_typesMatch(self) -> None:
        """
        Every router type the configuration accepts has a builder.
        """
        self.assertEqual(set(_BUILDERS), set(ROUTER_TYPES))

    def test_static(self) -> None:
        """
        C{static} builds a L{StaticRouter} for the resolved path that watches
        with the given reactor and interval.
        """
        clock = Clock()
        router = buildRouter(
            self.config('[router]\ntype = "static"\npath = "routes.toml"\nwatch_interval = 5\n'), clock
        )
        assert isinstance(router, StaticRouter)
        self.assertEqual(router.path, os.path.join(self.directory, "routes.toml"))
        self.assertEqual(router.watchInterval, 5.0)
        router.startWatching()
        self.assertEqual([call.getTime() for call in clock.getDelayedCalls()], [5.0])
        router.stopWatching()

    def test_staticOptions(self) -> None:
        """
        The static router refuses options it does not know, and a bad
        interval.
        """
        self.assertBuildError(
            '[router]\ntype = "static"\npath = "routes.toml"\nwatch = 5\n',
            "router.watch",
            "allowed keys here: path, watch_interval",
        )
        self.assertBuildError(
            '[router]\ntype = "static"\npath = "routes.toml"\nwatch_interval = 0\n',
            "router.watch_interval",
            "greater than 0",
        )

    def test_staticTableError(self) -> None:
        """
        A wrong route table is reported with the table's file.
        """
        routes = os.path.join(self.directory, "routes.toml")
        with open(routes, "w") as f:
            f.write('default = "new"\n')
        config = self.config('[router]\ntype = "static"\npath = "routes.toml"\n')
        message = str(self.assertRaises(ConfigError, buildRouter, config, Clock()))
        self.assertTrue(message.startswith(f"{routes}: default: unknown backend 'new'"), message)

    def test_python(self) -> None:
        """
        A Python router is made with the backends, the reactor and the other
        C{[router]} keys as keyword arguments.
        """
        clock = Clock()
        config = self.config(
            f'[router]\ntype = "python:{__name__}.RecordingRouter"\nlevel = 3\nservers = ["a"]\n'
        )
        router = buildRouter(config, clock)
        assert isinstance(router, RecordingRouter)
        self.assertEqual(router.backends, config.backends)
        self.assertIs(router.reactor, clock)
        self.assertEqual(router.options, {"level": 3, "servers": ["a"]})

    def test_pythonModuleMissing(self) -> None:
        """
        A module that cannot be imported is named.
        """
        self.assertBuildError(
            '[router]\ntype = "python:no_such_module_here.Router"\n',
            "router.type",
            "cannot import 'no_such_module_here' (is it on PYTHONPATH?)",
        )

    def test_pythonClassMissing(self) -> None:
        """
        A class the module does not have is named.
        """
        self.assertBuildError(
            f'[router]\ntype = "python:{__name__}.Nothing"\n',
            "router.type",
            f"module '{__name__}' has no class 'Nothing'",
        )
        self.assertBuildError(
            f'[router]\ntype = "python:{__name__}.notAClass"\n', "router.type", "has no class 'notAClass'"
        )

    def test_pythonBadOption(self) -> None:
        """
        An option the class does not take is reported as the router's.
        """
        self.assertBuildError(
            f'[router]\ntype = "python:{__name__}.PickyRouter"\ncolour = "red"\n',
            "router",
            "PickyRouter refused its options: TypeError",
            "colour",
        )

    def test_pythonConfigError(self) -> None:
        """
        A L{ConfigError} raised by the router's constructor is passed on
        unchanged.
        """
        error = self.assertRaises(
            ConfigError,
            buildRouter,
            self.config(f'[router]\ntype = "python:{__name__}.PickyRouter"\n'),
            Clock(),
        )
        self.assertEqual(str(error), "custom: no old backends please")

    def test_pythonNoRoute(self) -> None:
        """
        An object without a C{route} method is refused.
        """
        self.assertBuildError(
            f'[router]\ntype = "python:{__name__}.NotARouter"\n', "router.type", "has no route method"
        )


@implementer(IRouter)
class FunctionRouter:
    """
    A router whose C{route} is the function given.
    """

    def __init__(self, route: Any) -> None:
        self.route = route


class CallRouterTests(SynchronousTestCase):
    """
    Tests for L{callRouter}.
    """

    request = login("alice@example.org")
    answer = Route(backend=OLD)

    def test_plain(self) -> None:
        """
        A plain answer is wrapped in a fired Deferred.
        """
        d = callRouter(FunctionRouter(lambda request: self.answer), self.request)
        self.assertIs(self.successResultOf(d), self.answer)

    def test_deferred(self) -> None:
        """
        A Deferred answer fires the result when it fires.
        """
        pending: Deferred[Route] = Deferred()
        d = callRouter(FunctionRouter(lambda request: pending), self.request)
        self.assertNoResult(d)
        pending.callback(self.answer)
        self.assertIs(self.successResultOf(d), self.answer)

    def test_coroutine(self) -> None:
        """
        An C{async def route} is run; its answer arrives when it returns.
        """
        pending: Deferred[Route] = Deferred()
        seen = []

        async def route(request: RouteRequest) -> Route:
            seen.append(request)
            return await pending

        d = callRouter(FunctionRouter(route), self.request)
        self.assertEqual(seen, [self.request])
        self.assertNoResult(d)
        pending.callback(self.answer)
        self.assertIs(self.successResultOf(d), self.answer)

    def test_exception(self) -> None:
        """
        An exception raised by C{route} becomes a failed Deferred.
        """

        def route(request: RouteRequest) -> Route:
            raise ValueError("directory down")

        failure = self.failureResultOf(callRouter(FunctionRouter(route), self.request), ValueError)
        self.assertEqual(str(failure.value), "directory down")

    def test_coroutineException(self) -> None:
        """
        An exception raised inside an C{async def route} fails the Deferred.
        """

        async def route(request: RouteRequest) -> Route:
            raise ValueError("directory down")

        self.failureResultOf(callRouter(FunctionRouter(route), self.request), ValueError)

    def test_failedDeferred(self) -> None:
        """
        A failed Deferred fails the result.
        """
        pending: Deferred[Route] = Deferred()
        d = callRouter(FunctionRouter(lambda request: pending), self.request)
        pending.errback(ValueError("no"))
        self.failureResultOf(d, ValueError)

    def test_wrongAnswer(self) -> None:
        """
        An answer that is neither a Route nor a Rejection fails with a
        L{TypeError} naming the router and the type.
        """
        failure = self.failureResultOf(
            callRouter(FunctionRouter(lambda request: None), self.request), TypeError
        )
        self.assertEqual(
            str(failure.value), "FunctionRouter.route answered with NoneType, not a Route or Rejection"
        )

    def test_otherAwaitable(self) -> None:
        """
        Any awaitable that is not a coroutine is awaited too.
        """

        class Answer:
            def __await__(self) -> Any:
                return CallRouterTests.answer
                yield

        d = callRouter(FunctionRouter(lambda request: Answer()), self.request)
        self.assertIs(self.successResultOf(d), self.answer)

    def test_staticRouter(self) -> None:
        """
        A L{StaticRouter}'s plain answers come through.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "routes.toml")
        with open(path, "w") as f:
            f.write('default = "old"\n')
        d = callRouter(StaticRouter(path, BACKENDS), self.request)
        self.assertEqual(self.successResultOf(d), Route(backend=OLD, rule="default -> old"))
