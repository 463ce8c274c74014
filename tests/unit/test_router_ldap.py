"""
Tests for L{mailproxy.routers.ldap}: filter escaping (RFC 4515), the
router's decisions, and the directory half against ldap3's in-memory mock
server.  The real OpenLDAP is in C{tests/integration/test_routers.py}.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._routing import explainRoute
from mailproxy.config import ConfigError, Table
from mailproxy.model import Backend, Credentials, Rejection, Route, RouteRequest
from mailproxy.routers._backends import BackendDefaults, BackendResolver
from mailproxy.routers.ldap import (
    DirectoryEntry,
    DirectoryUnavailable,
    FilterTemplate,
    LDAPDirectory,
    LDAPRouter,
    LDAPSettings,
    buildLDAPRouter,
    escapeFilterValue,
)

from .routerhelpers import CLIENT, result

OLD = Backend(name="old", host="10.0.0.1", ports={"imap": 143})
NEW = Backend(name="new", host="10.0.0.2", ports={"imap": 143})
BACKENDS = {"old": OLD, "new": NEW}
UNAVAILABLE = Rejection("Service temporarily unavailable, try again later.", temporary=True)
ALICE_DN = "uid=alice,ou=people,dc=example,dc=org"


def login(user: str = "alice@example.org", password: bytes = b"alice secret") -> RouteRequest:
    """
    A plain IMAP login request.
    """
    return RouteRequest(protocol="imap", credentials=Credentials("LOGIN", user, password=password), client=CLIENT)


def cram(user: str, secret: bytes) -> RouteRequest:
    """
    A CRAM-MD5 login proving knowledge of C{secret}.
    """
    challenge = b"<9.9@mail.example.org>"
    response = hmac.new(secret, challenge, hashlib.md5).hexdigest().encode()
    return RouteRequest(
        protocol="imap",
        credentials=Credentials("CRAM-MD5", user, challenge=challenge, response=response),
        client=CLIENT,
    )


class InlineRunner:
    """
    Runs the blocking call at once, in the test's thread.
    """

    def run(self, timeout: float, f: Any, *args: Any) -> Deferred[Any]:
        return maybeDeferred(f, *args)


class EscapingTests(SynchronousTestCase):
    """
    Tests for L{escapeFilterValue} and L{FilterTemplate}.
    """

    def test_specials(self) -> None:
        """
        The five characters RFC 4515 requires are escaped as C{\\XX}.
        """
        self.assertEqual(escapeFilterValue("a*b(c)d\\e\x00f"), "a\\2ab\\28c\\29d\\5ce\\00f")

    def test_utf8Kept(self) -> None:
        """
        UTF-8 text is sent as it is.
        """
        self.assertEqual(escapeFilterValue("j\u00fcrgen@example.org"), "j\u00fcrgen@example.org")

    def test_rawBytes(self) -> None:
        """
        Bytes that were not UTF-8 (kept as surrogates) are escaped byte by
        byte.
        """
        user = b"x\xff(y".decode("utf-8", "surrogateescape")
        self.assertEqual(escapeFilterValue(user), "x\\ff\\28y")

    def test_fill(self) -> None:
        """
        C{{user}}, C{{local}} and C{{domain}} are the login name and its
        parts around the last C{@}, each escaped; without C{@} the domain is
        empty.
        """
        template = FilterTemplate("(&(uid={local})(mailDomain={domain})(mail={user}))")
        self.assertEqual(
            template.fill("a*b@c@example.org"),
            "(&(uid=a\\2ab@c)(mailDomain=example.org)(mail=a\\2ab@c@example.org))",
        )
        self.assertEqual(template.fill("*"), "(&(uid=\\2a)(mailDomain=)(mail=\\2a))")

    def test_injection(self) -> None:
        """
        A login name crafted to widen the filter stays one value.
        """
        self.assertEqual(FilterTemplate("(mail={user})").fill("*)(uid=*"), "(mail=\\2a\\29\\28uid=\\2a)")

    def test_check(self) -> None:
        """
        Templates with unknown or formatted placeholders or unbalanced
        parentheses are refused.
        """
        FilterTemplate.check("(|(mail={user})(uid={local}))")
        for bad in ("(mail={name})", "(mail={user!r})", "(mail={user:10})", "mail={user}", "((mail={user})", "(a=b))(("):
            self.assertRaises(ValueError, FilterTemplate.check, bad)


class FakeDirectory:
    """
    A directory for the router tests: entries by filter, passwords by DN.
    """

    def __init__(self) -> None:
        self.entries: dict[str, list[DirectoryEntry]] = {}
        self.passwords: dict[str, bytes] = {}
        self.down = False
        self.filters: list[str] = []
        self.binds: list[str] = []

    def find(self, search: str) -> list[DirectoryEntry]:
        self.filters.append(search)
        if self.down:
            raise DirectoryUnavailable("ldap://x: connection refused")
        return self.entries.get(search, [])

    def checkPassword(self, dn: str, password: bytes) -> bool:
        self.binds.append(dn)
        if self.down:
            raise DirectoryUnavailable("ldap://x: connection refused")
        return self.passwords.get(dn) == password


class RouterTests(SynchronousTestCase):
    """
    Tests for L{LDAPRouter}'s decisions.
    """

    def setUp(self) -> None:
        self.directory = FakeDirectory()
        self.directory.entries["(mail=alice@example.org)"] = [
            DirectoryEntry(dn=ALICE_DN, backend="old", user="alice", password=b"{PLAIN}alice secret")
        ]
        self.directory.passwords[ALICE_DN] = b"alice secret"
        self.logged: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def router(self, auth: str = "bind", **kwargs: Any) -> LDAPRouter:
        """
        A router over L{directory}.
        """
        return LDAPRouter(
            self.directory,
            FilterTemplate("(mail={user})"),
            BackendResolver(BACKENDS, BackendDefaults()),
            runner=InlineRunner(),
            auth=auth,
            **kwargs,
        )

    def logText(self) -> str:
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(event) for event in self.logged)

    def test_bind(self) -> None:
        """
        With C{auth = "bind"} the found entry is bound with the client's
        password; the route rewrites the login to the user attribute.
        """
        route = result(self.router().route(login()))
        self.assertEqual(
            route,
            Route(backend=OLD, user="alice", authenticated=True, rule=f"ldap {ALICE_DN} -> old"),
        )
        self.assertEqual(self.directory.binds, [ALICE_DN])

    def test_bindWrongPassword(self) -> None:
        """
        A failed bind refuses the login (no backend is ever named).
        """
        self.assertEqual(result(self.router().route(login(password=b"guess"))), Rejection())
        self.assertIn('wrong password for "alice@example.org"', self.logText())
        self.assertNotIn("guess", self.logText())

    def test_bindNeedsCleartext(self) -> None:
        """
        Digest mechanisms cannot bind.
        """
        self.assertEqual(result(self.router().route(cram("alice@example.org", b"alice secret"))), Rejection())
        self.assertEqual(self.directory.binds, [])

    def test_compare(self) -> None:
        """
        With C{auth = "compare"} the stored cleartext (C{{PLAIN}} prefix
        removed) is checked, which also serves CRAM-MD5; the backend then
        gets the stored password.
        """
        route = result(self.router("compare").route(login()))
        self.assertEqual((route.backend, route.authenticated, route.password), (OLD, True, None))
        route = result(self.router("compare").route(cram("alice@example.org", b"alice secret")))
        self.assertEqual((route.authenticated, route.password), (True, b"alice secret"))
        self.assertEqual(result(self.router("compare").route(login(password=b"x"))), Rejection())
        self.assertEqual(self.directory.binds, [])

    def test_compareHashed(self) -> None:
        """
        A hashed stored password cannot be compared: refused and logged.
        """
        self.directory.entries["(mail=alice@example.org)"] = [DirectoryEntry(dn=ALICE_DN, backend="old", password=b"{SSHA}abc")]
        self.assertEqual(result(self.router("compare").route(login())), Rejection())
        self.assertIn("no usable cleartext password", self.logText())

    def test_none(self) -> None:
        """
        With C{auth = "none"} the router only locates.
        """
        route = result(self.router("none").route(login(password=b"anything")))
        self.assertEqual((route.backend, route.authenticated), (OLD, False))
        self.assertEqual(self.directory.binds, [])

    def test_unknown(self) -> None:
        """
        No entry: unknown here (a chain asks its next router).
        """
        self.assertEqual(result(self.router().route(login("zed@example.org"))), Rejection(unknown=True))

    def test_ambiguous(self) -> None:
        """
        More than one entry is refused without binding.
        """
        self.directory.entries["(mail=alice@example.org)"].append(DirectoryEntry(dn="uid=other"))
        self.assertEqual(result(self.router().route(login())), Rejection())
        self.assertEqual(self.directory.binds, [])

    def test_down(self) -> None:
        """
        A directory that cannot be reached is a temporary failure.
        """
        self.directory.down = True
        self.assertEqual(result(self.router().route(login())), UNAVAILABLE)
        self.assertIn('directory unavailable for "alice@example.org"', self.logText())

    def test_downDuringBind(self) -> None:
        """
        A directory lost between search and bind is a temporary failure too.
        """
        directory = self.directory

        def failing(dn: str, password: bytes) -> bool:
            raise DirectoryUnavailable("gone")

        directory.checkPassword = failing  # type: ignore[method-assign]
        self.assertEqual(result(self.router().route(login())), UNAVAILABLE)

    def test_hostPortAttribute(self) -> None:
        """
        A C{host:port} attribute value makes an ad-hoc backend.
        """
        self.directory.entries["(mail=alice@example.org)"] = [DirectoryEntry(dn=ALICE_DN, backend="imap9.internal:1143")]
        route = result(self.router("none").route(login()))
        self.assertEqual((route.backend.host, route.backend.ports), ("imap9.internal", {"imap": 1143}))

    def test_defaultBackend(self) -> None:
        """
        An entry without the attribute goes to C{default_backend}; without
        one it is a temporary failure, logged.
        """
        self.directory.entries["(mail=alice@example.org)"] = [DirectoryEntry(dn=ALICE_DN)]
        self.assertEqual(result(self.router("none", defaultBackend="new").route(login())).backend, NEW)
        self.assertEqual(result(self.router("none").route(login())), UNAVAILABLE)
        self.assertIn("no backend attribute and there is no default_backend", self.logText())

    def test_recipient(self) -> None:
        """
        Without credentials (SMTP MX) the recipient is looked up and nothing
        is bound.
        """
        request = RouteRequest(protocol="imap", credentials=None, client=CLIENT, rcptTo="alice@example.org")
        self.assertEqual(result(self.router().route(request)).backend, OLD)
        self.assertEqual(self.directory.binds, [])


class MockServerTests(SynchronousTestCase):
    """
    L{LDAPDirectory} against ldap3's in-memory mock server: the searches and
    binds it makes are real ldap3 operations.
    """

    def setUp(self) -> None:
        import ldap3

        self.ldap3 = ldap3
        self.server = ldap3.Server("mock")
        setup = ldap3.Connection(self.server, client_strategy=ldap3.MOCK_SYNC)
        add = setup.strategy.add_entry
        add("cn=search,dc=example,dc=org", {"objectClass": "person", "sn": "s", "userPassword": "search-pw"})
        add(
            ALICE_DN,
            {
                "objectClass": ["inetOrgPerson", "inetLocalMailRecipient"],
                "sn": "a",
                "cn": "a",
                "uid": "alice",
                "mail": "alice@example.org",
                "mailHost": "old",
                "userPassword": "alice secret",
            },
        )
        add(
            "uid=star,ou=people,dc=example,dc=org",
            {"objectClass": "inetOrgPerson", "sn": "s", "cn": "s", "uid": "star", "mail": "*@example.org"},
        )

    def directory(self, **settings: Any) -> LDAPDirectory:
        """
        A directory on the mock server.
        """
        settings.setdefault("bindDN", "cn=search,dc=example,dc=org")
        settings.setdefault("bindPassword", b"search-pw")
        mock = self.ldap3.MOCK_SYNC

        def connection(server: Any, **kwargs: Any) -> Any:
            return self.ldap3.Connection(server, client_strategy=mock, **kwargs)

        directory = LDAPDirectory(
            LDAPSettings(
                servers=("ldap://mock",),
                base="dc=example,dc=org",
                backendAttribute="mailHost",
                userAttribute="uid",
                **settings,
            ),
            connectionFactory=connection,
            serverFactory=lambda url, **kwargs: self.server,
        )
        self.addCleanup(directory.close)
        return directory

    def test_find(self) -> None:
        """
        The filter finds the entry with its routing and user attributes.
        """
        entries = self.directory().find(FilterTemplate("(mail={user})").fill("alice@example.org"))
        self.assertEqual(entries, [DirectoryEntry(dn=ALICE_DN, backend="old", user="alice")])

    def test_escapedAsterisk(self) -> None:
        """
        An escaped asterisk matches only the literal value, not everything.
        """
        directory = self.directory()
        self.assertEqual([e.dn for e in directory.find(FilterTemplate("(mail={user})").fill("*@example.org"))], ["uid=star,ou=people,dc=example,dc=org"])

    def test_checkPassword(self) -> None:
        """
        Binding as the entry works with its password only; an empty
        password is refused without asking (it would be an anonymous bind).
        """
        directory = self.directory()
        self.assertTrue(directory.checkPassword(ALICE_DN, b"alice secret"))
        self.assertFalse(directory.checkPassword(ALICE_DN, b"wrong"))
        self.assertFalse(directory.checkPassword(ALICE_DN, b""))
        self.assertTrue(directory.checkPassword(ALICE_DN, b"alice secret"))

    def test_passwordNotUTF8(self) -> None:
        """
        A password that is not UTF-8 (a client sending Latin-1), which
        ldap3 cannot send, is a wrong password, not a directory outage.
        """
        directory = self.directory()
        self.assertFalse(directory.checkPassword(ALICE_DN, b"p\xe4ssw\xf6rd"))
        self.assertTrue(directory.checkPassword(ALICE_DN, b"alice secret"))

    def test_badServiceAccount(self) -> None:
        """
        A service bind that fails makes the directory unavailable, saying
        why without the password.
        """
        directory = self.directory(bindPassword=b"wrong-pw")
        error = self.assertRaises(DirectoryUnavailable, directory.find, "(mail=x)")
        self.assertIn("service bind as 'cn=search,dc=example,dc=org' failed", str(error))
        self.assertNotIn("wrong-pw", str(error))

    def test_passwordAttribute(self) -> None:
        """
        With a password attribute, its first value is read raw.
        """
        entries = self.directory(passwordAttribute="userPassword").find("(uid=alice)")
        self.assertEqual(entries[0].password, b"alice secret")


class BuildTests(SynchronousTestCase):
    """
    Tests for L{buildLDAPRouter}.
    """

    def setUp(self) -> None:
        self.base = self.mktemp()
        import os

        os.makedirs(self.base)
        with open(os.path.join(self.base, "ldap.secret"), "w") as f:
            f.write("search-pw\n")

    def build(self, **options: Any) -> LDAPRouter:
        """
        Build from C{options} as C{[router]} (relative to a directory with
        C{ldap.secret}).
        """
        options.setdefault("servers", ["ldap://127.0.0.1:389"])
        options.setdefault("base", "dc=example,dc=org")
        return buildLDAPRouter(Table("/etc/mp.toml", ("router",), options, self.base), BACKENDS, Clock())

    def assertFails(self, key: str, fragment: str, **options: Any) -> None:
        """
        Building from C{options} fails naming C{key}.
        """
        error = self.assertRaises(ConfigError, self.build, **options)
        self.assertTrue(str(error).startswith(f"/etc/mp.toml: {key}: "), str(error))
        self.assertIn(fragment, str(error))

    def test_options(self) -> None:
        """
        The options are read into the directory's settings.
        """
        router = self.build(
            bind_dn="cn=search,dc=example,dc=org",
            bind_password_file="ldap.secret",
            filter="(uid={local})",
            backend_attribute="mailHost",
            user_attribute="uid",
            auth="compare",
            scope="one",
            timeout=2,
        )
        settings = router.directory.settings
        self.assertEqual(settings.bindPassword, b"search-pw")
        self.assertEqual((settings.scope, settings.passwordAttribute, settings.timeout), ("one", "userPassword", 2.0))
        self.assertEqual(router.filter.template, "(uid={local})")
        self.assertEqual(router.auth, "compare")

    def test_errors(self) -> None:
        """
        Wrong options name their key.
        """
        self.assertFails("router.backend_attribute", "required (or default_backend)")
        self.assertFails("router.servers", "not an ldap:// or ldaps:// URL", servers=["http://x"], backend_attribute="a")
        self.assertFails("router.filter", "unknown placeholder", filter="(mail={mail})", backend_attribute="a")
        self.assertFails("router.bind_dn", "needs bind_password_file", bind_dn="cn=x", backend_attribute="a")
        self.assertFails("router.auth", "must be one of bind, compare, none", auth="sasl", backend_attribute="a")
        self.assertFails("router.default_backend", "unknown backend 'x'", default_backend="x")
        self.assertFails("router.start_tls", "is ldaps://", servers=["ldaps://x"], start_tls=True, backend_attribute="a")
        self.assertFails("router.password_attribute", 'only used with auth = "compare"', password_attribute="p", backend_attribute="a")


class ExplainTests(SynchronousTestCase):
    """
    C{route explain} and C{check --probe} with the LDAP router: with
    C{auth = "none"} the entry alone routes, so it is shown without a
    password; with C{bind} there is nothing to show before a login.
    """

    setUp = RouterTests.setUp
    router = RouterTests.router

    def test_authNone(self) -> None:
        """
        The entry's backend and DN; two entries, or one routed nowhere, say
        logins are refused; no entry is for the next router.
        """
        router = self.router(auth="none")
        answer = result(explainRoute(router, "ldap", "alice@example.org"))
        self.assertEqual((answer["explained"], answer["rule"], answer["backend"]), (True, f"ldap {ALICE_DN}", "old"))
        self.assertEqual(result(explainRoute(router, "ldap", "nobody@example.org"))["backend"], None)
        self.directory.entries["(mail=twin@example.org)"] = [
            DirectoryEntry(dn="uid=a", backend="old", user="a"),
            DirectoryEntry(dn="uid=b", backend="new", user="b"),
        ]
        answer = result(explainRoute(router, "ldap", "twin@example.org"))
        self.assertEqual((answer["rule"], answer["backend"]), ("ldap: more than one entry (logins are refused)", None))
        self.directory.entries["(mail=lost@example.org)"] = [DirectoryEntry(dn="uid=lost", backend=None, user="lost")]
        answer = result(explainRoute(router, "ldap", "lost@example.org"))
        self.assertIsNone(answer["backend"])
        self.assertIn("no backend attribute and no default_backend", answer["rule"])
        answer = result(explainRoute(self.router(auth="none", defaultBackend="new"), "ldap", "lost@example.org"))
        self.assertEqual(answer["backend"], "new")

    def test_authBind(self) -> None:
        """
        With C{auth = "bind"} the password decides too: not explained.
        """
        answer = result(explainRoute(self.router(), "ldap", "alice@example.org"))
        self.assertEqual((answer["explained"], answer["backend"]), (False, None))
        self.assertEqual(self.directory.filters, [])

    def test_directoryDown(self) -> None:
        """
        A directory that does not answer fails the explanation, saying so.
        """
        self.directory.down = True
        failure = self.failureResultOf(explainRoute(self.router(auth="none"), "ldap", "alice@example.org"))
        self.assertIn("LDAP: the search failed", failure.getErrorMessage())
