"""
The migration engine against two real Dovecot servers ("old" and "new",
each with the master user the proxy uses): doveadm (imapc) and mbsync copy
real accounts with nested folders, flags, a 2 MB message and a Sieve
script; the engine holds, syncs the delta, verifies over IMAP and flips
the route in a real static route table.

The engine runs in the test's reactor with the proxy's own L{Mover},
L{LoginHold} and session registry (no proxy process: the end-to-end tests
of C{mailproxy migrate} drive that).  What is asserted is what the servers
hold afterwards (C{doveadm fetch}, C{doveadm sieve list}), the route
table's text, and what the engine reported.
"""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase

from mailproxy._migrate import LoginHold, Mover
from mailproxy._session import SessionRegistry
from mailproxy.migration import Campaign, MigrationManager, MigrationSettings
from mailproxy.migration import _clients, _manager
from mailproxy.migration._tools import ToolResult, runProcess
from mailproxy.model import Backend, ClientInfo, Credentials, RouteRequest
from mailproxy.routers.static import StaticRouter

from .servers import Dovecot, TestCA, fixtureDirectory, requireServer, sharedFixture

MASTER = ("proxy", "engine-master-secret")
WRONG_MASTER = "wrong-master-Zq8x"
ACCOUNTS = [f"mig{n}@example.org" for n in range(14)]
PASSWORD = "user-password-never-used"
SIEVE_SCRIPT = b'require "fileinto";\r\nif header :contains "subject" "report" { fileinto "Work"; }\r\n'


class EngineServers:
    """
    Old and new Dovecot with the accounts (empty until a test fills one).
    """

    def __init__(self, directory: str) -> None:
        self.ca = TestCA(os.path.join(directory, "ca"))
        users = {account: PASSWORD for account in ACCOUNTS}
        self.old = Dovecot(os.path.join(directory, "old"), "old", users, ca=self.ca, masterUser=MASTER)
        self.new = Dovecot(os.path.join(directory, "new"), "new", users, ca=self.ca, masterUser=MASTER)

    @classmethod
    def start(cls) -> EngineServers:
        """
        Start both servers.
        """
        requireServer("dovecot", "doveadm", "mbsync", "openssl")
        servers = cls(fixtureDirectory("engine-dovecot"))
        try:
            servers.old.start()
            servers.new.start()
        except BaseException:
            servers.stop()
            raise
        return servers

    def stop(self) -> None:
        """
        Stop both servers.
        """
        self.old.stop()
        self.new.stop()


def message(messageId: str, subject: str, body: bytes = b"hello\r\n") -> bytes:
    """
    A small RFC 5322 message.
    """
    return (
        f"From: someone@example.net\r\nTo: user@example.org\r\nSubject: {subject}\r\n"
        f"Message-ID: <{messageId}>\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n\r\n"
    ).encode() + body


def fill(server: Dovecot, account: str, big: bool = False) -> None:
    """
    Give C{account} on C{server} a realistic mailbox: nested folders (one
    unsubscribed), flags and a keyword, optionally a 2 MB message, and an
    active Sieve script.
    """
    tag = account.split("@")[0]
    server.doveadm("mailbox", "create", "-u", account, "-s", "Work", "Work.Projects", "Work.Projects.2026")
    server.doveadm("mailbox", "create", "-u", account, "Archive")
    for n in range(3):
        server.deliver(account, message(f"{tag}-inbox-{n}@example.net", f"inbox {n}"))
    server.doveadm("save", "-u", account, "-m", "Work.Projects.2026", input=message(f"{tag}-deep@example.net", "deep"))
    server.doveadm("save", "-u", account, "-m", "Archive", input=message(f"{tag}-old@example.net", "archived"))
    if big:
        body = (b"x" * 998 + b"\r\n") * 2100
        server.deliver(account, message(f"{tag}-big@example.net", "big attachment", body))
    server.doveadm("flags", "add", "-u", account, "\\Seen \\Flagged $Important", "mailbox", "INBOX", "uid", "1")
    server.doveadm("flags", "add", "-u", account, "\\Answered", "mailbox", "Work.Projects.2026", "all")
    server.doveadm("sieve", "put", "-u", account, "-a", "filters", input=SIEVE_SCRIPT)


def contents(server: Dovecot, account: str) -> list[tuple[str, str, str, str]]:
    """
    What C{account} holds on C{server}: per message its folder,
    Message-ID, flags (sorted, without C{\\Recent}) and size, sorted.
    """
    text = server.doveadm(
        "fetch", "-u", account, "mailbox hdr.message-id flags size.physical", "all"
    ).decode()
    found = []
    for block in text.split("\f"):
        fields = dict(re.findall(r"^([a-z.-]+): ?(.*)$", block, re.MULTILINE))
        if "mailbox" not in fields:
            continue
        flags = " ".join(sorted(f for f in fields.get("flags", "").split() if f != "\\Recent"))
        found.append((fields["mailbox"], fields.get("hdr.message-id", "").strip(), flags, fields.get("size.physical", "")))
    return sorted(found)


def uids(server: Dovecot, account: str) -> list[tuple[str, str, str]]:
    """
    Each message of C{account} on C{server} as folder, UID and Message-ID,
    sorted.
    """
    text = server.doveadm("fetch", "-u", account, "mailbox uid hdr.message-id", "all").decode()
    found = []
    for block in text.split("\f"):
        fields = dict(re.findall(r"^([a-z.-]+): ?(.*)$", block, re.MULTILINE))
        if "mailbox" in fields:
            found.append((fields["mailbox"], fields["uid"], fields.get("hdr.message-id", "").strip()))
    return sorted(found)


def subscriptions(server: Dovecot, account: str) -> set[str]:
    """
    The folders C{account} is subscribed to on C{server}.
    """
    return set(server.doveadm("mailbox", "list", "-s", "-u", account).decode().split())


class EngineTestCase(TestCase):
    """
    A migration manager with the two servers as backends and a static route
    table that puts everyone on old.
    """

    timeout = 120

    def setUp(self) -> None:
        self.servers = sharedFixture("engine", type(self).__module__, EngineServers.start)
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir(parents=True)
        self.routesPath = self.directory / "routes.toml"
        self.routesPath.write_text('default = "old"\n\n[accounts]\n')
        self.events: list[dict[str, Any]] = []
        # doveadm reads the CA file (ssl_client_ca_file) after switching to
        # the mail user: a copy that user can read, as /etc/ssl is.
        shared = Path(tempfile.mkdtemp(prefix="engine-ca-"))
        self.addCleanup(shutil.rmtree, shared, True)
        shared.chmod(0o755)
        self.caPath = str(shared / "ca.pem")
        shutil.copyfile(self.servers.ca.caPath, self.caPath)
        os.chmod(self.caPath, 0o644)
        self.backends = {
            "old": self.backend(self.servers.old),
            "new": self.backend(self.servers.new),
        }

    def backend(self, server: Dovecot, masterPassword: str = MASTER[1], tls: str = "none") -> Backend:
        """
        The backend for C{server}, with the master user; with C{tls}
        C{"implicit"} IMAP is its IMAPS port and ManageSieve uses STARTTLS,
        C{"starttls"} both use STARTTLS (the test CA is trusted).
        """
        return Backend(
            name=server.name,
            # mbsync checks the certificate's DNS names only.
            host="localhost" if tls != "none" else "127.0.0.1",
            ports={"imap": server.imaps if tls == "implicit" else server.imap, "sieve": server.sieve},
            tls=tls,  # type: ignore[arg-type]
            portTLS={"sieve": "starttls"} if tls != "none" else {},
            caFile=self.caPath if tls != "none" else None,
            masterUser=MASTER[0],
            masterPassword=masterPassword.encode(),
        )

    def manager(self, tool: str = "doveadm", runTool: Any = None) -> MigrationManager:
        """
        A manager whose target copies use C{tool} (run by C{runTool}, by
        default as subprocesses).
        """
        self.router = StaticRouter(str(self.routesPath), self.backends, reactor=reactor)
        self.sessions = SessionRegistry()
        self.gate = LoginHold()
        context = _Context(self.router, self.sessions, self.gate)
        mover = Mover(context, self.backends, reactor)
        settings = MigrationSettings(
            tools={"old": tool, "new": tool},
            doveadmConfig={"old": str(self.servers.old.configPath), "new": str(self.servers.new.configPath)},
            holdTimeout=60,
        )
        manager = MigrationManager(
            reactor=reactor,
            mover=mover,
            router=self.router,
            backends=self.backends,
            sessions=self.sessions,
            settings=settings,
            journalPath=str(self.directory / "migrations.json"),
            routerName="static",
            runTool=runTool,
        )
        manager.addObserver(self.events.append)
        self.addCleanup(manager.stop)
        return manager

    async def finished(self, campaign: Campaign) -> Campaign:
        """
        Wait until C{campaign} is no longer running.
        """
        while campaign.state == "running":
            waited: Deferred[None] = Deferred()
            reactor.callLater(0.05, waited.callback, None)
            await waited
        return campaign

    def route(self, account: str) -> str | None:
        """
        The backend the route table names for C{account} (its own entry).
        """
        match = re.search(rf'^"{re.escape(account)}" = "(\w+)"', self.routesPath.read_text(), re.MULTILINE)
        return match.group(1) if match else None

    def held(self, account: str) -> bool:
        """
        Whether a login of C{account} would wait at the gate now.
        """
        request = RouteRequest(
            protocol="imap",
            credentials=Credentials("LOGIN", account, password=b"x"),
            client=ClientInfo("t", "127.0.0.1", 1, "127.0.0.1", 143),
        )
        return self.gate.wait(request) is not None


class _Context:
    """
    The parts of a L{mailproxy._session.ProxyContext} that a move uses.
    """

    def __init__(self, router: Any, sessions: SessionRegistry, gate: LoginHold) -> None:
        self.router = router
        self.sessions = sessions
        self.gate = gate
        self.routerName = "static"


class DoveadmMigrationTests(EngineTestCase):
    """
    Campaigns with doveadm (imapc) as the tool.
    """

    def test_campaignCopiesVerifiesAndFlips(self) -> Deferred[None]:
        """
        Three accounts migrate as one campaign, two at once, old read over
        IMAPS: on new each has the same messages under the same UIDs in the
        same nested folders with the same flags and keyword, the 2 MB
        message, the same subscriptions, and its
        Sieve script active; a message delivered to old after the bulk copy
        is there too (the final sync), and so is one delivered to old
        after the verify (the late copy at the flip), each once; every
        route names new, no login is left held, and each account reported
        every step.
        """
        accounts = ACCOUNTS[0:3]
        for n, account in enumerate(accounts):
            fill(self.servers.old, account, big=n == 0)
        # imapc reads old over IMAPS, verifying its certificate.
        self.backends["old"] = self.backend(self.servers.old, tls="implicit")
        manager = self.manager("doveadm")

        def lateDelivery(event: dict[str, Any]) -> None:
            if event["step"] == "copy" and event["result"] == "ok":
                self.servers.old.deliver(event["account"], message(f"{event['account']}-late@example.net", "late"))
            if event["step"] == "verify" and event["result"] == "ok":
                # After the final sync and the verify: only the late copy
                # at the flip brings this one over.
                self.servers.old.deliver(
                    event["account"], message(f"{event['account']}-after-verify@example.net", "very late")
                )

        manager.addObserver(lateDelivery)

        async def run() -> None:
            campaign = await manager.start(accounts, "new", concurrency=2)
            await self.finished(campaign)
            description = campaign.describe()
            self.assertEqual(
                (description["state"], description["done"], description["failed"]), ("done", 3, 0), description
            )
            for account in accounts:
                before = contents(self.servers.old, account)
                self.assertEqual(contents(self.servers.new, account), before)
                self.assertEqual(uids(self.servers.new, account), uids(self.servers.old, account))
                ids = [m[1] for m in contents(self.servers.new, account)]
                self.assertEqual(ids.count(f"<{account}-late@example.net>"), 1)
                self.assertEqual(ids.count(f"<{account}-after-verify@example.net>"), 1)
                self.assertIn(("INBOX", "<" + account.split("@")[0] + "-inbox-0@example.net>", "$Important \\Flagged \\Seen"), [
                    m[:3] for m in contents(self.servers.new, account)
                ])
                self.assertEqual(subscriptions(self.servers.new, account), {"Work", "Work.Projects", "Work.Projects.2026"})
                self.assertIn("filters ACTIVE", self.servers.new.doveadm("sieve", "list", "-u", account).decode())
                self.assertIn(SIEVE_SCRIPT, self.servers.new.doveadm("sieve", "get", "-u", account, "filters"))
                self.assertEqual(self.route(account), "new")
                self.assertFalse(self.held(account))
                steps = [(e["step"], e["result"]) for e in self.events if e["account"] == account and e["event"] == "migration_step"]
                self.assertEqual(
                    steps,
                    [(step, result) for step in ("copy", "hold", "sync", "verify") for result in ("started", "ok")]
                    + [("flip", "started"), ("flip", "ok"), ("late", "ok")],
                )
            big = contents(self.servers.new, accounts[0])
            self.assertTrue(any(int(m[3]) > 2_000_000 for m in big), big)
            self.assertEqual(description["messages"], sum(len(contents(self.servers.old, a)) for a in accounts))

        return Deferred.fromCoroutine(run())

    def test_verifyMismatchLeavesRoute(self) -> Deferred[None]:
        """
        A message deleted on the target between the final sync and the
        verify fails that account at the verify, naming the folder and how
        many messages differ; its route stays on old and its logins are
        not held; the other account of the campaign moves.
        """
        broken, fine = ACCOUNTS[3], ACCOUNTS[4]
        fill(self.servers.old, broken)
        fill(self.servers.old, fine)
        manager = self.manager("doveadm")

        def deleteOnTarget(job: Any) -> None:
            if job.account == broken:
                self.servers.new.doveadm("expunge", "-u", broken, "mailbox", "Work.Projects.2026", "all")

        manager.beforeVerify = deleteOnTarget

        async def run() -> None:
            campaign = await self.finished(await manager.start([broken, fine], "new"))
            job = campaign.job(broken)
            assert job is not None
            self.assertEqual((job.state, job.step), ("failed", "verify"), job.error)
            self.assertEqual(
                job.error,
                "verify: folder 'Work/Projects/2026': 1 missing on the target (source 1, target 0 messages)",
            )
            self.assertEqual(self.route(broken), None)
            self.assertFalse(self.held(broken))
            self.assertEqual(self.route(fine), "new")
            self.assertEqual(campaign.state, "failed")

        return Deferred.fromCoroutine(run())

    def test_toolFailureReportsStderrWithoutPassword(self) -> Deferred[None]:
        """
        When the source refuses the master password, doveadm fails: the
        account fails at the copy with doveadm's own error (Dovecot's
        authentication failure), the password appears in no error, event
        or journal, and the route stays on old.
        """
        account = ACCOUNTS[5]
        fill(self.servers.old, account)
        self.backends["old"] = self.backend(self.servers.old, WRONG_MASTER)
        manager = self.manager("doveadm")

        async def run() -> None:
            campaign = await self.finished(await manager.start([account], "new"))
            job = campaign.job(account)
            assert job is not None
            self.assertEqual((job.state, job.step), ("failed", "copy"))
            assert job.error is not None
            self.assertTrue(job.error.startswith("copy: doveadm failed ("), job.error)
            self.assertIn("Authentication failed", job.error)
            everything = repr(self.events) + (self.directory / "migrations.json").read_text() + job.error
            self.assertNotIn(WRONG_MASTER, everything)
            self.assertNotIn(MASTER[1], everything)
            self.assertEqual(self.route(account), None)
            self.assertFalse(self.held(account))
            # No private configuration (with the password) is left behind.
            leftovers = [str(p) for p in (self.directory / "migrations.json.d").rglob("*") if p.is_file()]
            self.assertEqual(leftovers, [])

        return Deferred.fromCoroutine(run())

    def test_rollback(self) -> Deferred[None]:
        """
        Rollback is the same call with old as target: after a migration to
        new, a message delivered there, others deleted (in INBOX and
        Archive) and a flag changed, migrating back makes old equal to new
        again and its route names old.
        """
        account = ACCOUNTS[6]
        fill(self.servers.old, account)
        manager = self.manager("doveadm")

        async def run() -> None:
            await self.finished(await manager.start([account], "new"))
            self.assertEqual(self.route(account), "new")
            self.servers.new.deliver(account, message(f"{account}-after@example.net", "after the move"))
            self.servers.new.doveadm("expunge", "-u", account, "mailbox", "Archive", "all")
            self.servers.new.doveadm("expunge", "-u", account, "mailbox", "INBOX", "uid", "2")
            self.servers.new.doveadm("flags", "add", "-u", account, "\\Deleted", "mailbox", "INBOX", "uid", "3")
            campaign = await self.finished(await manager.start([account], "old"))
            self.assertEqual(campaign.state, "done", campaign.describe())
            self.assertEqual(self.route(account), "old")
            back = contents(self.servers.old, account)
            self.assertEqual(back, contents(self.servers.new, account))
            self.assertIn(f"<{account}-after@example.net>", [m[1] for m in back])
            self.assertNotIn("Archive", [m[0] for m in back])
            self.assertNotIn(f"<{account.split('@')[0]}-inbox-1@example.net>", [m[1] for m in back])
            self.assertIn(("INBOX", f"<{account.split('@')[0]}-inbox-2@example.net>", "\\Deleted"), [m[:3] for m in back])

        return Deferred.fromCoroutine(run())


class ProgressTests(EngineTestCase):
    """
    The totals and progress an account's description shows, read from the
    real servers.
    """

    def test_progressDuringCopy(self) -> Deferred[None]:
        """
        Before a real doveadm copy the source's totals are taken (STATUS
        MESSAGES SIZE per folder, Dovecot has STATUS=SIZE); while the copy
        runs, the looks at the target see its messages arrive, and once
        the copy has written everything (still in the copy step) they
        equal the totals; the totals are what the verify counts on the
        source, and a look at the target never ran after the copy step.
        """
        self.patch(_manager, "PROGRESS_POLL", 0.05)
        account = ACCOUNTS[11]
        fill(self.servers.old, account, big=True)
        seen: list[tuple[str, int | None, int | None, int, int]] = []
        campaigns: list[Campaign] = []

        def snapshot() -> None:
            if campaigns:
                [job] = campaigns[0].describe()["accounts"]
                now = (job["state"], job["total_messages"], job["total_bytes"], job["messages"], job["bytes"])
                if not seen or seen[-1] != now:
                    seen.append(now)

        watch = LoopingCall(snapshot)
        watch.clock = reactor
        watch.start(0.02)
        self.addCleanup(lambda: watch.stop() if watch.running else None)

        async def tool(argv: Any, env: dict[str, str], timeout: float) -> ToolResult:
            result = await runProcess(reactor, argv, env, timeout)
            job = campaigns[0].job(account) if campaigns else None
            if job is not None and job.state == "copying" and "sync" in argv:
                # The last run of the bulk copy: stay in the step until a
                # look at the target has seen all of it (or 30 s).
                for _ in range(600):
                    if job.totalMessages and job.messages == job.totalMessages:
                        break
                    waited: Deferred[None] = Deferred()
                    reactor.callLater(0.05, waited.callback, None)
                    await waited
            return result

        manager = self.manager("doveadm", runTool=lambda argv, env, timeout: Deferred.fromCoroutine(tool(argv, env, timeout)))

        async def run() -> None:
            campaign = await manager.start([account], "new")
            campaigns.append(campaign)
            await self.finished(campaign)
            watch.stop()
            job = campaign.job(account)
            assert job is not None
            self.assertEqual(job.state, "done", job.error)
            total = (job.totalMessages, job.totalBytes)
            # The verify's count of the source (nothing arrived meanwhile).
            self.assertEqual(total, (job.messages, job.bytes))
            self.assertEqual(total[0], len(contents(self.servers.old, account)))
            self.assertGreater(total[1] or 0, 2_000_000)
            copying = [s for s in seen if s[0] == "copying" and s[1] is not None]
            self.assertIn(("copying", *total, *total), copying)
            self.assertTrue(all(s[1:3] == total for s in copying), copying)
            # Counts only grow while the copy writes.
            self.assertEqual([s[3] for s in copying], sorted(s[3] for s in copying))

        return Deferred.fromCoroutine(run())

    def test_totalsWithoutStatusSize(self) -> None:
        """
        Against a server without STATUS=SIZE (Dovecot with the capability
        hidden from the client), the totals come from STATUS MESSAGES and a
        FETCH RFC822.SIZE sweep of each folder, and equal what STATUS SIZE
        says; the cheap look (no sweep) gives the count and no size.
        """
        account = ACCOUNTS[12]
        fill(self.servers.old, account, big=True)
        backend = self.backend(self.servers.old)
        withSize = _clients.totals(backend, account, 30.0)
        capability = imaplib.IMAP4.capability

        def hidden(connection: imaplib.IMAP4) -> tuple[str, list[bytes]]:
            status, data = capability(connection)
            return status, [item.replace(b" STATUS=SIZE", b"") for item in data]

        self.patch(imaplib.IMAP4, "capability", hidden)
        self.assertEqual(_clients.totals(backend, account, 30.0), withSize)
        self.assertEqual(_clients.totals(backend, account, 30.0, sizes=False), (withSize[0], None))
        self.assertEqual(withSize[0], len(contents(self.servers.old, account)))
        fingerprints = _clients.fingerprints(backend, account, 30.0)
        self.assertEqual(withSize[1], sum(size for messages in fingerprints.values() for _, size, _ in messages))


class MbsyncMigrationTests(EngineTestCase):
    """
    A campaign with mbsync (IMAP on both sides, over TLS) as the tool.
    """

    def test_mbsyncCopiesVerifiesAndFlips(self) -> Deferred[None]:
        """
        mbsync copies an account's nested folders, messages and system
        flags over IMAPS and STARTTLS as the master users (isync 1.4 leaves keywords
        such as C{$Important} behind); the engine adds the subscriptions
        and the Sieve script, verifies and flips the route.
        """
        account = ACCOUNTS[7]
        fill(self.servers.old, account)
        # Over TLS, as a real operator's servers would be reached: IMAPS to
        # old, STARTTLS to new, ManageSieve with STARTTLS on both.
        self.backends["old"] = self.backend(self.servers.old, tls="implicit")
        self.backends["new"] = self.backend(self.servers.new, tls="starttls")
        manager = self.manager("mbsync")

        async def run() -> None:
            campaign = await self.finished(await manager.start([account], "new"))
            self.assertEqual(campaign.state, "done", campaign.describe())
            def system(flags: str) -> str:
                return " ".join(f for f in flags.split() if f.startswith("\\"))

            before = [(m[0], m[1], system(m[2])) for m in contents(self.servers.old, account)]
            self.assertEqual([(m[0], m[1], system(m[2])) for m in contents(self.servers.new, account)], before)
            self.assertIn(("INBOX", f"<{account.split('@')[0]}-inbox-0@example.net>", "\\Flagged \\Seen"), before)
            self.assertEqual(subscriptions(self.servers.new, account), {"Work", "Work.Projects", "Work.Projects.2026"})
            self.assertIn("filters ACTIVE", self.servers.new.doveadm("sieve", "list", "-u", account).decode())
            self.assertEqual(self.route(account), "new")
            self.assertEqual(campaign.accounts[0].tool, "mbsync")

        return Deferred.fromCoroutine(run())

    def test_mbsyncRollback(self) -> Deferred[None]:
        """
        With mbsync both ways, migrating back copies only what changed on
        new (mbsync's state of the way there pairs the messages): old
        then equals new, each message once; and so does migrating to new
        once more.
        """
        account = ACCOUNTS[13]
        fill(self.servers.old, account)
        manager = self.manager("mbsync")
        tag = account.split("@")[0]

        def system(found: list[tuple[str, str, str, str]]) -> list[tuple[str, str, str]]:
            return sorted((m[0], m[1], " ".join(f for f in m[2].split() if f.startswith("\\"))) for m in found)

        async def run() -> None:
            there = await self.finished(await manager.start([account], "new"))
            self.assertEqual(there.state, "done", there.describe())
            self.servers.new.deliver(account, message(f"{tag}-after@example.net", "after the move"))
            self.servers.new.doveadm("expunge", "-u", account, "mailbox", "INBOX", "uid", "2")
            self.servers.new.doveadm("flags", "add", "-u", account, "\\Flagged", "mailbox", "INBOX", "uid", "3")
            for target in ("old", "new"):
                moved = await self.finished(await manager.start([account], target))
                self.assertEqual(moved.state, "done", moved.describe())
                self.assertEqual(self.route(account), target)
                self.assertEqual(system(contents(self.servers.old, account)), system(contents(self.servers.new, account)))
                ids = [m[1] for m in contents(self.servers.old, account)]
                self.assertEqual(len(ids), len(set(ids)), ids)
                self.assertIn(f"<{tag}-after@example.net>", ids)
                self.assertNotIn(f"<{tag}-inbox-1@example.net>", ids)

        return Deferred.fromCoroutine(run())


class ResumeTests(EngineTestCase):
    """
    A proxy killed in the middle of a campaign, then started again.
    """

    def test_killedCampaignResumes(self) -> None:
        """
        Three accounts; the proxy dies while one is in its final sync (its
        logins held) and while another's route change was written but not
        yet journalled as done.  A new manager (a fresh proxy: no hold) on
        the same journal and route table runs the first again from the
        copy and flips it, does not write the second's route again, and
        leaves the finished third alone; every account's mail is on new
        exactly once.
        """
        killedInSync, killedInFlip, finished = ACCOUNTS[8:11]
        for account in (killedInSync, killedInFlip, finished):
            fill(self.servers.old, account)

        def finishedIsDone() -> bool:
            return any(e["event"] == "migration_account" and e["account"] == finished for e in self.events)

        async def afterFinished(argv: Any, env: Any, timeout: float) -> Any:
            # The dying flip holds the route store's lock for good: the
            # finished account flips before it.
            while not finishedIsDone():
                waited: Deferred[None] = Deferred()
                reactor.callLater(0.05, waited.callback, None)
                await waited
            return await runProcess(reactor, argv, env, timeout)

        # What the dead process was waiting for; answered at the end, so
        # that its timers go.
        dying: list[Deferred[Any]] = []

        def dyingTool(argv: Any, env: Any, timeout: float) -> Deferred[Any]:
            if killedInSync in argv and any(e["account"] == killedInSync and e["step"] == "sync" for e in self.events):
                # The process dies here: this never returns.
                dying.append(Deferred())
                return dying[-1]
            if killedInFlip in argv:
                return Deferred.fromCoroutine(afterFinished(argv, env, timeout))
            return runProcess(reactor, argv, env, timeout)

        first = self.manager("doveadm", runTool=dyingTool)
        written = self.router.setRoutes

        def dyingWrite(changes: Any) -> Any:
            result = written(changes)
            if killedInFlip in changes:
                # Written, then the process dies before it hears back.
                dying.append(Deferred())
                return dying[-1]
            return result

        self.router.setRoutes = dyingWrite  # type: ignore[method-assign]

        async def run() -> None:
            campaign = await first.start([killedInSync, killedInFlip, finished], "new", concurrency=3)
            jobs = [campaign.job(account) for account in (killedInSync, killedInFlip, finished)]
            # The second's route change is written (in the store's thread)
            # some time after its flip is journalled as started.
            while [(job.state, job.flip) for job in jobs if job is not None] != [
                ("syncing", None),
                ("flipping", "started"),
                ("done", "done"),
            ] or self.route(killedInFlip) != "new":
                waited: Deferred[None] = Deferred()
                reactor.callLater(0.05, waited.callback, None)
                await waited
            # SIGKILL: the first manager is gone; its journal stays as it was.
            first._journal = None
            self.assertEqual((self.route(killedInSync), self.route(killedInFlip)), (None, "new"))
            self.events.clear()

            second = self.manager("doveadm")
            writes: list[Any] = []
            rewrite = self.router.setRoutes
            self.router.setRoutes = lambda changes: (writes.append(dict(changes)), rewrite(changes))[1]  # type: ignore[method-assign]
            await second.resume()
            resumed = second.campaign(campaign.id)
            assert resumed is not None
            await self.finished(resumed)
            self.assertEqual(
                [(job.account, job.state) for job in resumed.accounts],
                [(killedInSync, "done"), (killedInFlip, "done"), (finished, "done")],
            )
            self.assertEqual(writes, [{killedInSync: "new"}])
            self.assertEqual(self.events[0]["account"], killedInFlip)
            self.assertEqual((self.events[0]["event"], self.events[0]["result"]), ("migration_account", "done"))
            self.assertEqual(
                [(e["step"], e["result"]) for e in self.events if e["account"] == killedInSync][:2],
                [("copy", "started"), ("copy", "ok")],
            )
            for account in (killedInSync, killedInFlip, finished):
                self.assertEqual(self.route(account), "new")
                self.assertFalse(self.held(account))
                ids = [m[1] for m in contents(self.servers.new, account)]
                self.assertEqual(sorted(ids), sorted(m[1] for m in contents(self.servers.old, account)))
                self.assertEqual(len(ids), len(set(ids)))
            for never in dying:
                never.errback(RuntimeError("the process was killed"))
            while campaign._running:
                waited = Deferred()
                reactor.callLater(0.05, waited.callback, None)
                await waited

        return Deferred.fromCoroutine(run())
