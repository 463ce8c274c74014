"""
A move through the SQL router, end to end: the drill's two real Dovecot
servers ("old" and "new"), the proxy as a subprocess routing by an SQLite
table, and the C{mailproxy} command moving accounts by updating their rows.

The mail servers are the migration drill's (same fixture slot and key, so
they are shared when both modules run).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from .servers import Proxy, fixtureDirectory, freePort, sharedFixture
from .test_migration import ACCOUNTS, MOVED_BYE, TOKEN, DrillServers, IMAPClient, mailproxyCommand

#: Where each account starts: the first half on old, the rest on new.
HOMES = {account: ("old" if n < len(ACCOUNTS) // 2 else "new") for n, account in enumerate(ACCOUNTS)}


class SQLProxy:
    """
    The proxy with one plaintext IMAP listener, the SQL router on an
    SQLite file that it may change, and the management endpoint.
    """

    def __init__(self, servers: DrillServers) -> None:
        # The listener on port 0: the proxy logs the port the kernel chose.
        # The management endpoint's port is in the configuration, where
        # the mailproxy commands find it: it is chosen (see start).
        directory = Path(fixtureDirectory("sql-move-proxy"))
        self.admin = freePort()
        self.database = directory / "accounts.sqlite"
        with sqlite3.connect(self.database) as db:
            db.execute("CREATE TABLE accounts (address TEXT PRIMARY KEY, backend TEXT NOT NULL)")
            db.executemany("INSERT INTO accounts VALUES (?, ?)", HOMES.items())
        db.close()
        text = (
            '[proxy]\nhostname = "proxy.example.org"\n'
            "[limits]\nfailure_delay = 0.1\nshutdown_grace = 0\n"
            '[[listener]]\nprotocol = "imap"\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\n'
            '[router]\ntype = "sql"\ndriver = "sqlite3"\ndatabase = "accounts.sqlite"\n'
            'query = "SELECT backend FROM accounts WHERE address = lower(:user)"\n'
            'routes_query = "SELECT address AS account, backend FROM accounts"\n'
            'set_route = "UPDATE accounts SET backend = :backend WHERE address = lower(:user)"\n'
            "set_domain_route = \"UPDATE accounts SET backend = :backend WHERE address LIKE '%@' || lower(:domain)\"\n"
            "[router.cache]\nttl = 300\n"
            + "".join(
                f'[backend.{server.name}]\nhost = "127.0.0.1"\nports = {{ imap = {server.imap} }}\n'
                for server in (servers.old, servers.new)
            )
            + f'[admin]\nendpoint = "tcp:{self.admin}:interface=127.0.0.1"\ntoken_file = "admin.token"\n'
        )
        self.proxy = Proxy(str(directory), text)
        (self.proxy.directory / "admin.token").write_text(TOKEN + "\n")

    def start(self) -> None:
        """
        Start the proxy and wait for its listeners.
        """
        self.proxy.start(choosePorts=self.chooseAdminPort)
        [self.imap] = self.proxy.ports

    def chooseAdminPort(self) -> None:
        """
        Move the management endpoint to another free port.
        """
        old, self.admin = self.admin, freePort()
        text = self.proxy.configPath.read_text().replace(f'"tcp:{old}:', f'"tcp:{self.admin}:')
        self.proxy.configPath.write_text(text)

    def stop(self) -> None:
        """
        Stop it.
        """
        self.proxy.stop()

    def backendOf(self, account: str) -> str:
        """
        The backend the database names for C{account} now.
        """
        with sqlite3.connect(self.database) as db:
            (backend,) = db.execute("SELECT backend FROM accounts WHERE address = ?", (account,)).fetchone()
        db.close()
        return str(backend)


class SQLMoveTests(SynchronousTestCase):
    """
    C{mailproxy move} with the SQL router: rows updated, sessions dropped,
    the next login lands on the new server.
    """

    def setUp(self) -> None:
        self.servers = sharedFixture("mail servers", "tests.integration.test_migration", DrillServers.start)

        def start() -> SQLProxy:
            proxy = SQLProxy(self.servers)
            proxy.start()
            return proxy

        self.proxy = sharedFixture("proxy", type(self).__qualname__, start)

    def connect(self) -> IMAPClient:
        """
        A client of the proxy, closed after the test.
        """
        client = IMAPClient(self.proxy.imap)
        self.addCleanup(client.close)
        return client

    def mailproxy(self, *arguments: str):  # type: ignore[no-untyped-def]
        """
        Run C{mailproxy ARGUMENTS} against the proxy's configuration; it
        must succeed.
        """
        done = mailproxyCommand(*arguments, "--config", str(self.proxy.proxy.configPath))
        self.assertEqual(done.returncode, 0, done.stderr)
        return done

    def test_moveAndBack(self) -> None:
        """
        Moving an idling account updates its row, drops its session with
        the moved BYE, and its next login reads the new server's mailbox
        (not a cached route); another account's session goes on; moving
        back restores the row and the old home.
        """
        account, other = ACCOUNTS[0], ACCOUNTS[1]
        moving, staying = self.connect(), self.connect()
        self.assertEqual(moving.login(account), f"{account} on old")
        self.assertEqual(staying.login(other), f"{other} on old")
        moving.idle()
        staying.idle()

        explained = self.mailproxy("route", "explain", account)
        self.assertIn("backend: old", explained.stdout)

        moved = self.mailproxy("move", account, "new")
        self.assertIn(f"changed: {account}: old -> new", moved.stdout)
        self.assertIn("1 open session dropped", moved.stdout)
        self.assertEqual(self.proxy.backendOf(account), "new")
        self.assertEqual(moving.untilClosed(), [MOVED_BYE])
        again = self.connect()
        self.assertEqual(again.login(account), f"{account} on new")
        self.assertEqual(staying.done()[-1].split()[1], b"OK")

        back = self.mailproxy("move", account, "old")
        self.assertIn(f"changed: {account}: new -> old", back.stdout)
        self.assertEqual(again.untilClosed(), [MOVED_BYE])
        self.assertEqual(self.connect().login(account), f"{account} on old")
        self.assertEqual(self.proxy.backendOf(account), "old")

    def test_domain(self) -> None:
        """
        A domain move updates every account's row and drops the sessions of
        accounts that were elsewhere, those with rows of their own too; a
        move naming an account the database lacks is refused whole.
        """
        onOld, onNew = ACCOUNTS[2], ACCOUNTS[-1]
        client = self.connect()
        self.assertEqual(client.login(onOld), f"{onOld} on old")
        client.idle()
        try:
            moved = self.mailproxy("move", "--domain", "example.org", "new")
            self.assertIn("changed: @example.org: (no entry) -> new", moved.stdout)
            self.assertEqual(client.untilClosed(), [MOVED_BYE])
            self.assertEqual({self.proxy.backendOf(a) for a in ACCOUNTS}, {"new"})
            self.assertEqual(self.connect().login(onOld), f"{onOld} on new")
            self.assertEqual(self.connect().login(onNew), f"{onNew} on new")

            refused = mailproxyCommand(
                "move", onOld, "nobody@example.org", "old", "--config", str(self.proxy.proxy.configPath)
            )
            self.assertNotEqual(refused.returncode, 0)
            self.assertIn("set_route changed no row for 'nobody@example.org'", refused.stderr)
            self.assertEqual(self.proxy.backendOf(onOld), "new")
        finally:
            # Back through the proxy, so that its route cache forgets too.
            self.mailproxy("move", *[a for a, home in HOMES.items() if home == "old"], "old")
