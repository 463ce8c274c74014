"""
Tests for changing the static route table while the proxy runs:
L{mailproxy.routers._tomledit} and L{StaticRouter}'s L{IRouteStore} methods.
"""

from __future__ import annotations

import os
import stat
import tomllib
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailproxy._blocking import ThreadRunner
from mailproxy.interfaces import IRouteStore, RouteStoreError
from mailproxy.model import Route
from mailproxy._files import replaceFile
from mailproxy.routers._tomledit import EditError, deleteEntry, setEntries, setEntry
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


@implementer(IReactorThreads)
class FakeThreadsReactor(Clock):
    """
    A clock that says it has threads (none is started: nothing is run).
    """


def countParses(testCase: SynchronousTestCase) -> list[int]:
    """
    Count TOML parses for the rest of C{testCase}.

    @return: a list that gets the length of each text parsed.
    """
    parses: list[int] = []
    loads = tomllib.loads

    def counting(text: str) -> dict[str, object]:
        parses.append(len(text))
        return loads(text)

    testCase.patch(tomllib, "loads", counting)
    return parses


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


class SetEntriesTests(SynchronousTestCase):
    """
    L{setEntries}: many edits in one pass over the file.
    """

    def test_sameAsOneByOne(self) -> None:
        """
        Edits of every form (a string value, an inline table, a sub-table,
        a new account, a domain, the default) give the text that making
        them one at a time gives, and what that text parses to.
        """
        edits = [
            ("accounts", "ALICE@example.org", "new"),
            ("accounts", "carol@example.org", "new"),
            ("accounts", "dave@example.org", "new"),
            ("accounts", "bob@example.org", "new"),
            ("accounts", "zed@example.org", "old"),
            ("domains", "example.org", "new"),
            ("domains", "example.net", "new"),
            (None, "", "new"),
        ]
        expected = TABLE
        for table, key, backend in edits:
            expected = setEntry(expected, table, key, backend)
        text, data = setEntries(TABLE, edits)
        self.assertEqual(text, expected)
        self.assertEqual(data, tomllib.loads(expected))

    def test_newTables(self) -> None:
        """
        Tables the file does not have yet are added at the end, each once.
        """
        text, _ = setEntries(
            'default = "old"\n',
            [("accounts", "a@x", "new"), ("domains", "x", "new"), ("accounts", "b@x", "old")],
        )
        self.assertEqual(
            text, 'default = "old"\n\n[accounts]\n"a@x" = "new"\n"b@x" = "old"\n\n[domains]\n"x" = "new"\n'
        )

    def test_lastWins(self) -> None:
        """
        Of two edits of the same entry (names compared without case), the
        last is made.
        """
        text, data = setEntries('[accounts]\n', [("accounts", "Bob@x", "old"), ("accounts", "bob@x", "new")])
        self.assertEqual(data, {"accounts": {"bob@x": "new"}})
        self.assertEqual(text, '[accounts]\n"bob@x" = "new"\n')

    def test_allOrNothing(self) -> None:
        """
        One entry that cannot be edited in place refuses the whole edit,
        naming that entry.
        """
        text = 'accounts."erin@example.org" = "old"\naccounts."a@x" = "old"\n'
        error = self.assertRaises(
            EditError, setEntries, text, [("accounts", "new@x", "new"), ("accounts", "erin@example.org", "new")]
        )
        self.assertIn("cannot change accounts['erin@example.org'] by editing its line", str(error))

    def test_oneParse(self) -> None:
        """
        However many entries change, the file is parsed twice: once as it
        is, once as edited (the check).
        """
        table = "[accounts]\n" + "".join(f'"user{i}@x" = "old"\n' for i in range(1000))
        parses = countParses(self)
        text, data = setEntries(table, [("accounts", f"user{i}@x", "new") for i in range(0, 1000, 3)])
        self.assertEqual(len(parses), 2)
        self.assertEqual(sum(1 for backend in data["accounts"].values() if backend == "new"), 334)


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

    def test_refusedTableNamesFileOnce(self) -> None:
        """
        A change the table would refuse (a master-user entry moved to a
        backend without a master user) gives its problem naming the file
        once, and leaves the file as it was.
        """
        backends = {"old": makeBackend("old", masterUser="proxy", masterPassword=b"pw"), "new": makeBackend("new")}
        text = '[accounts]\n"bob@example.org" = { backend = "old", password = "x", master = true }\n'
        with open(self.path, "w") as f:
            f.write(text)
        router = StaticRouter(self.path, backends)
        error = self.failureResultOf(router.setRoute("bob@example.org", "new"), RouteStoreError).value
        self.assertEqual(str(error).count(self.path), 1, str(error))
        self.assertIn("master: backend 'new' has no master_user", str(error))
        with open(self.path) as f:
            self.assertEqual(f.read(), text)

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


class StaticBulkEditTests(SynchronousTestCase):
    """
    Many changes to L{StaticRouter}'s file at once, and the runner its
    edits go through.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.path = os.path.join(directory, "routes.toml")
        with open(self.path, "w") as f:
            f.write('default = "old"\n[accounts]\n' + "".join(f'"user{i}@x" = "old"\n' for i in range(1000)))

    def test_parsedTwice(self) -> None:
        """
        Moving 300 accounts of a 1,000-entry table parses the file twice
        (as it is; as edited, which is also the table validated and then
        used), not once or more per account.
        """
        router = StaticRouter(self.path, BACKENDS)
        parses = countParses(self)
        self.successResultOf(router.setRoutes({f"user{i}@x": "new" for i in range(300)}))
        self.assertEqual(len(parses), 2)
        self.assertEqual(router.explain("user299@x"), "accounts['user299@x'] -> new")
        self.assertEqual(router.explain("user300@x"), "accounts['user300@x'] -> old")

    def test_editThroughRunner(self) -> None:
        """
        The edit is handed to the runner (a thread, in the proxy): until it
        is done, the file and the table are as they were and the changes'
        Deferred has not fired; the file watcher does not reload meanwhile
        nor after (the edit installs its own table).
        """
        calls: list[tuple[float, Any, tuple[Any, ...]]] = []
        finished: Deferred[Any] = Deferred()

        class Runner:
            def run(self, timeout: float, f: Any, *args: Any) -> Deferred[Any]:
                calls.append((timeout, f, args))
                return finished

        clock = Clock()
        router = StaticRouter(self.path, BACKENDS, reactor=clock, runner=Runner())
        before = open(self.path).read()
        reloads: list[None] = []
        self.patch(router, "reload", lambda: reloads.append(None))
        router.startWatching()
        moving = router.setRoutes({"user1@x": "new"})
        self.assertNoResult(moving)
        self.assertEqual(len(calls), 1)
        self.assertEqual(open(self.path).read(), before)
        # The thread's work, done: the file changes now.
        timeout, f, args = calls[0]
        edited = f(*args)
        self.assertIn('"user1@x" = "new"', open(self.path).read())
        self.assertEqual(router.explain("user1@x"), "accounts['user1@x'] -> old")
        clock.advance(router.watchInterval)
        self.assertEqual(reloads, [])
        finished.callback(edited)
        self.assertIsNone(self.successResultOf(moving))
        self.assertEqual(router.explain("user1@x"), "accounts['user1@x'] -> new")
        clock.advance(router.watchInterval)
        self.assertEqual(reloads, [])
        self.assertEqual(len(calls), 1)

    def test_watcherReadsThroughRunner(self) -> None:
        """
        A file changed by hand is read by the runner too (a large table
        takes a while to parse), one read at a time: the new table is used
        once the read is done; a broken one is reported then and the
        previous table kept.
        """
        calls: list[tuple[Any, Deferred[Any]]] = []

        class Runner:
            def run(self, timeout: float, f: Any, *args: Any) -> Deferred[Any]:
                calls.append((f, Deferred()))
                return calls[-1][1]

        clock = Clock()
        router = StaticRouter(self.path, BACKENDS, reactor=clock, runner=Runner())
        router.startWatching()
        with open(self.path, "a") as f:
            f.write('"new@x" = "new"\n')
        clock.advance(router.watchInterval)
        self.assertEqual(len(calls), 1)
        self.assertEqual(router.explain("new@x"), "default -> old")
        clock.advance(router.watchInterval)
        self.assertEqual(len(calls), 1)
        read, finished = calls[0]
        finished.callback(read())
        self.assertEqual(router.explain("new@x"), "accounts['new@x'] -> new")
        clock.advance(router.watchInterval)
        self.assertEqual(len(calls), 1)

        with open(self.path, "a") as f:
            f.write('"broken@x" = "nowhere"\n')
        clock.advance(router.watchInterval)
        read, finished = calls[1]
        finished.callback(read())
        self.assertIn("unknown backend 'nowhere'", router.lastError or "")
        self.assertEqual(router.explain("new@x"), "accounts['new@x'] -> new")

    def test_runnerTimeout(self) -> None:
        """
        An edit that does not finish in time fails with a route store
        error that says it may still take effect.
        """
        class Runner:
            def run(self, timeout: float, f: Any, *args: Any) -> Deferred[Any]:
                return fail(TimeoutError())

        router = StaticRouter(self.path, BACKENDS, runner=Runner())
        error = self.failureResultOf(router.setRoutes({"user1@x": "new"}), RouteStoreError).value
        self.assertEqual(
            str(error), f"{self.path}: the edit did not finish within 120 s; it may still take effect (see the routes)"
        )

    def test_threadsOfTheReactor(self) -> None:
        """
        Given a reactor with threads (the proxy's), the router edits in a
        thread pool of one thread (edits are made one after the other),
        which stops when the router is closed.
        """
        router = StaticRouter(self.path, BACKENDS, reactor=FakeThreadsReactor())
        self.assertIsInstance(router._runner, ThreadRunner)
        self.assertEqual(router._runner.size, 1)
        self.assertIsNone(StaticRouter(self.path, BACKENDS, reactor=Clock())._runner)
