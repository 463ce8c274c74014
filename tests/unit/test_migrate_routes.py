"""
Tests for changing the static route table while the proxy runs:
L{mailproxy.routers._tomledit} and L{StaticRouter}'s L{IRouteStore} methods.
"""

from __future__ import annotations

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from mailproxy.interfaces import IRouteStore, RouteStoreError
from mailproxy.model import Route
from mailproxy.routers._tomledit import EditError, deleteEntry, replaceFile, setEntry
from mailproxy.routers.static import StaticRouter
from mailproxy.testing import makeBackend, makeRequest

TABLE = """\
# The migration's route table.
default = "old"   # everyone else

[domains]
"example.org" = "old"

[accounts]
# Located only.
"alice@example.org" = "old"    # moves in week 2
"carol@example.org" = { backend = "old", password = "s3cret", login_user = "carol" }

# Leave this comment where it is.
[accounts."dave@example.org"]
backend = "old"
password = "d4ve"
"""

BACKENDS = {name: makeBackend(name) for name in ("old", "new")}


class SetEntryTests(SynchronousTestCase):
    """
    L{setEntry} and L{deleteEntry} change one line and keep the rest.
    """

    def test_stringValue(self) -> None:
        """
        An account written as a backend name gets the new name on the same
        line, its comment kept.
        """
        self.assertEqual(
            setEntry(TABLE, "accounts", "ALICE@example.org", "new"),
            TABLE.replace('"alice@example.org" = "old"    #', '"alice@example.org" = "new"    #'),
        )

    def test_inlineTable(self) -> None:
        """
        An account written as an inline table gets its C{backend} key
        changed; its password and login rewrite stay.
        """
        self.assertEqual(
            setEntry(TABLE, "accounts", "carol@example.org", "new"),
            TABLE.replace('{ backend = "old", password', '{ backend = "new", password'),
        )

    def test_subTable(self) -> None:
        """
        An account written as its own table gets its C{backend} line changed.
        """
        self.assertEqual(
            setEntry(TABLE, "accounts", "dave@example.org", "new"),
            TABLE.replace('backend = "old"\npassword = "d4ve"', 'backend = "new"\npassword = "d4ve"'),
        )

    def test_newAccount(self) -> None:
        """
        A new account is added after the last entry of C{[accounts]}, before
        the comments that belong to what follows.
        """
        self.assertEqual(
            setEntry(TABLE, "accounts", "bob@example.org", "new"),
            TABLE.replace(
                'login_user = "carol" }\n',
                'login_user = "carol" }\n"bob@example.org" = "new"\n',
            ),
        )

    def test_newTable(self) -> None:
        """
        A table the file does not have yet is added at the end.
        """
        self.assertEqual(
            setEntry('default = "old"\n', "accounts", "bob@example.org", "new"),
            'default = "old"\n\n[accounts]\n"bob@example.org" = "new"\n',
        )

    def test_domainAndDefault(self) -> None:
        """
        Domains and the default are edited the same way.
        """
        self.assertEqual(
            setEntry(TABLE, "domains", "example.org", "new"),
            TABLE.replace('"example.org" = "old"', '"example.org" = "new"'),
        )
        self.assertEqual(
            setEntry(TABLE, None, "", "new"),
            TABLE.replace('default = "old"   #', 'default = "new"   #'),
        )

    def test_delete(self) -> None:
        """
        Deleting removes the entry's line, or its whole table.
        """
        self.assertEqual(
            deleteEntry(TABLE, "accounts", "alice@example.org"),
            TABLE.replace('"alice@example.org" = "old"    # moves in week 2\n', ""),
        )
        self.assertEqual(
            deleteEntry(TABLE, "accounts", "dave@example.org"),
            TABLE.replace('[accounts."dave@example.org"]\nbackend = "old"\npassword = "d4ve"\n', ""),
        )

    def test_deleteMissing(self) -> None:
        """
        Deleting an entry that does not exist is an error.
        """
        error = self.assertRaises(EditError, deleteEntry, TABLE, "accounts", "zed@example.org")
        self.assertEqual(str(error), "there is no entry 'zed@example.org' in accounts")

    def test_formNotEdited(self) -> None:
        """
        An entry written as a dotted key is not rewritten: the edit is
        refused rather than risked.
        """
        text = 'accounts."erin@example.org" = "old"\n'
        error = self.assertRaises(EditError, setEntry, text, "accounts", "erin@example.org", "new")
        self.assertIn("change it by hand", str(error))


class ReplaceFileTests(SynchronousTestCase):
    """
    L{replaceFile}.
    """

    def test_atomicKeepsMode(self) -> None:
        """
        The file is replaced by a new one (another inode) with the old
        one's mode, and no temporary file is left behind.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "routes.toml")
        with open(path, "w") as f:
            f.write("old\n")
        os.chmod(path, 0o600)
        before = os.stat(path).st_ino
        replaceFile(path, "new\n")
        with open(path) as f:
            self.assertEqual(f.read(), "new\n")
        self.assertNotEqual(os.stat(path).st_ino, before)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(os.listdir(directory), ["routes.toml"])

    def test_followsSymlink(self) -> None:
        """
        A route table reached through a symbolic link is replaced where it
        really is; the link stays a link.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "real"))
        real = os.path.join(directory, "real", "routes.toml")
        with open(real, "w") as f:
            f.write("old\n")
        link = os.path.join(directory, "routes.toml")
        os.symlink(real, link)
        replaceFile(link, "new\n")
        self.assertTrue(os.path.islink(link))
        with open(real) as f:
            self.assertEqual(f.read(), "new\n")


class StaticRouteStoreTests(SynchronousTestCase):
    """
    L{StaticRouter} as an L{IRouteStore}.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.path = os.path.join(directory, "routes.toml")
        with open(self.path, "w") as f:
            f.write(TABLE)
        self.router = StaticRouter(self.path, BACKENDS)

    def read(self) -> str:
        """
        The route table file's text now.
        """
        with open(self.path) as f:
            return f.read()

    def backendFor(self, user: str) -> str:
        """
        The backend the router sends C{user} to now.
        """
        answer = self.router.route(makeRequest(user, b"s3cret" if user.startswith("carol") else b"x"))
        assert isinstance(answer, Route), answer
        return answer.backend.name

    def test_provides(self) -> None:
        """
        The static router is a route store.
        """
        self.assertTrue(IRouteStore.providedBy(self.router))

    def test_routes(self) -> None:
        """
        The entries are listed with domains as C{@domain} and the default
        as C{*}.
        """
        self.assertEqual(
            self.router.routes(),
            {
                "alice@example.org": "old",
                "carol@example.org": "old",
                "dave@example.org": "old",
                "@example.org": "old",
                "*": "old",
            },
        )

    def test_setRouteTakesEffect(self) -> None:
        """
        After C{setRoute} the file holds the change and the next login is
        routed by it, without waiting for the file watcher.
        """
        self.router.setRoute("alice@example.org", "new")
        self.assertEqual(self.backendFor("alice@example.org"), "new")
        self.assertIn('"alice@example.org" = "new"    # moves in week 2', self.read())
        self.router.setRoute("bob@example.org", "new")
        self.assertEqual(self.backendFor("bob@example.org"), "new")
        self.router.setRoute("@example.org", "new")
        self.assertEqual(self.backendFor("erin@example.org"), "new")
        self.router.setRoute("*", "new")
        self.assertEqual(self.backendFor("someone@example.com"), "new")

    def test_setRouteKeepsPassword(self) -> None:
        """
        Moving an authenticated account keeps its password check.
        """
        self.router.setRoute("carol@example.org", "new")
        self.assertEqual(self.backendFor("carol@example.org"), "new")
        self.assertFalse(isinstance(self.router.route(makeRequest("carol@example.org", b"wrong")), Route))

    def test_deleteRoute(self) -> None:
        """
        Deleting an account's entry sends it to its domain's backend again.
        """
        self.router.setRoute("@example.org", "new")
        self.router.deleteRoute("alice@example.org")
        self.assertEqual(self.backendFor("alice@example.org"), "new")
        self.assertNotIn("alice@example.org", self.read())

    def test_unknownBackend(self) -> None:
        """
        A backend that is not configured is refused, the file untouched.
        """
        error = self.assertRaises(RouteStoreError, self.router.setRoute, "alice@example.org", "elsewhere")
        self.assertEqual(str(error), "unknown backend 'elsewhere'; configured backends: new, old")
        self.assertEqual(self.read(), TABLE)

    def test_badKeys(self) -> None:
        """
        Keys that are neither an account, a domain nor C{*} are refused.
        """
        self.assertRaises(RouteStoreError, self.router.setRoute, "@", "new")
        self.assertRaises(RouteStoreError, self.router.setRoute, "@a@b", "new")
        self.assertRaises(RouteStoreError, self.router.setRoute, "", "new")

    def test_refusedEditLeavesFile(self) -> None:
        """
        An entry the router cannot edit in place gives an error naming the
        file, and leaves the file as it was.
        """
        error = self.failureResultOf(self.router.deleteRoute("zed@example.org"), RouteStoreError).value
        self.assertEqual(str(error), f"{self.path}: there is no entry 'zed@example.org' in accounts")
        self.assertEqual(self.read(), TABLE)
