"""
Tests for L{mailproxy.migration.MigrationManager}: the steps of an account
and their order, failures at each step, the hold, the journal and resume
(no flip made twice), cancel, concurrency, dry runs and the on-login
queue, with scripted tool runs and IMAP answers, a real static route table
and in-memory sessions.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._migrate import MOVED, LoginHold, Mover
from mailproxy.interfaces import RouteStoreError
from mailproxy.migration import Campaign, MigrationError, MigrationManager, MigrationSettings
from mailproxy.migration._manager import LOGIN_POLL, PROGRESS_POLL
from mailproxy.migration._tools import ToolResult
from mailproxy.model import ClientInfo, Credentials, RouteRequest
from mailproxy.routers.static import StaticRouter
from mailproxy.testing import makeBackend

from .opsfixtures import GREETING, LOGGED_IN, ProxyHarness

MASTER_PASSWORD = "m4ster-Secret%x"
BACKENDS = {
    name: makeBackend(name, masterUser="proxy", masterPassword=MASTER_PASSWORD.encode())
    for name in ("old", "new")
}
BACKENDS["plain"] = makeBackend("plain")
TABLE = 'default = "old"\n\n[accounts]\n"bob@example.org" = "new"\n'
OK = ToolResult(0, None, b"", b"")
MAILBOX = {"INBOX": [("id:<a@x>", 100, "\\seen"), ("id:<b@x>", 200, "")], "Work/Sub": [("id:<c@x>", 50, "")]}


class ScriptedTools:
    """
    Stands in for the tool runs: records each (with the text of its
    configuration file, read while it runs) and answers from a script.

    @ivar answers: what the next runs return, in order (a L{ToolResult} or
        a Deferred of one); when empty, success.
    """

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.answers: list[Any] = []
        self.onRun: Any = None

    def __call__(self, argv: Sequence[str], env: dict[str, str], timeout: float) -> Deferred[ToolResult]:
        config = argv[argv.index("-c") + 1]
        with open(config) as file:
            text = file.read()
        self.runs.append({"argv": list(argv), "env": dict(env), "config": text, "mode": stat.S_IMODE(os.stat(config).st_mode)})
        if self.onRun is not None:
            self.onRun(self.runs[-1])
        answer = self.answers.pop(0) if self.answers else OK
        return answer if isinstance(answer, Deferred) else succeed(answer)


class ScriptedClients:
    """
    Stands in for the IMAP and ManageSieve conversations.

    @ivar mailboxes: what L{fingerprints} answers, by backend name.
    """

    def __init__(self) -> None:
        self.mailboxes: dict[str, Any] = {"old": MAILBOX, "new": MAILBOX}
        self.calls: list[tuple[str, ...]] = []
        self.late: list[list[tuple[str, str]]] = []
        self.counts: dict[str, Any] = {}

    def fingerprints(self, backend: Any, account: str, timeout: float) -> Any:
        self.calls.append(("fingerprints", backend.name, account))
        answer = self.mailboxes[backend.name]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def copySubscriptions(self, source: Any, target: Any, account: str, timeout: float) -> int:
        self.calls.append(("subscriptions", source.name, target.name, account))
        return 0

    def copyLate(self, source: Any, target: Any, account: str, known: Any, timeout: float) -> list[tuple[str, str]]:
        self.calls.append(("late", source.name, target.name, account, repr(sorted((f, sorted(k)) for f, k in known.items()))))
        return self.late.pop(0) if self.late else []

    def copySieve(self, source: Any, target: Any, account: str, timeout: float) -> int:
        self.calls.append(("sieve", source.name, target.name, account))
        return 1

    def totals(self, backend: Any, account: str, timeout: float, sizes: bool = True) -> tuple[int, int | None]:
        self.calls.append(("totals", backend.name, account, str(sizes)))
        answer = self.counts.get(backend.name)
        if isinstance(answer, Exception):
            raise answer
        if answer is None:
            mailbox = self.mailboxes[backend.name]
            return sum(len(m) for m in mailbox.values()), sum(size for m in mailbox.values() for _, size, _ in m)
        return answer if sizes or answer[1] is not None else (answer[0], None)


def syncRun(timeout: float, f: Any, *args: Any) -> Deferred[Any]:
    """
    Runs a blocking call at once (instead of in a thread).
    """
    return maybeDeferred(f, *args)


class ManagerTestCase(SynchronousTestCase):
    """
    A manager over a static route table (everyone on old, bob on new) and
    a proxy harness whose sessions it can drop.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.routes = os.path.join(self.directory, "routes.toml")
        with open(self.routes, "w") as file:
            file.write(TABLE)
        self.journalPath = os.path.join(self.directory, "migrations.json")
        self.tools = ScriptedTools()
        self.clients = ScriptedClients()
        self.events: list[dict[str, Any]] = []
        self.settings = MigrationSettings(doveadmConfig={"new": "/etc/dovecot/new.conf", "old": "/etc/dovecot/old.conf"})
        self.makeManager()

    def makeManager(self) -> MigrationManager:
        """
        A new manager (as after a restart) on the same files.
        """
        self.store = StaticRouter(self.routes, BACKENDS)
        self.proxy = ProxyHarness(self.store, gate=LoginHold())
        self.mover = Mover(self.proxy.context, BACKENDS, self.proxy.clock)
        self.manager = MigrationManager(
            reactor=self.proxy.clock,
            mover=self.mover,
            router=self.store,
            backends=BACKENDS,
            sessions=self.proxy.context.sessions,
            settings=self.settings,
            journalPath=self.journalPath,
            routerName="static",
            runTool=self.tools,
            runBlocking=syncRun,
            clients=self.clients,
        )
        self.manager.addObserver(self.events.append)
        return self.manager

    def start(self, accounts: Sequence[str], target: str = "new", **kwargs: Any) -> Campaign:
        """
        Start a campaign and return it (the scripted steps may have run to
        the end already).
        """
        return self.successResultOf(self.manager.start(accounts, target, **kwargs))

    def route(self, account: str) -> str | None:
        """
        The backend of C{account}'s own entry in the route table.
        """
        return self.store.routes().get(account)

    def held(self, account: str) -> bool:
        """
        Whether a login of C{account} waits at the gate now.
        """
        request = RouteRequest(
            protocol="imap",
            credentials=Credentials("LOGIN", account, password=b"x"),
            client=ClientInfo("t", "192.0.2.9", 1, "192.0.2.1", 143),
        )
        return self.proxy.context.gate.wait(request) is not None

    def mailHeld(self, account: str) -> bool:
        """
        Whether mail for C{account} arriving through the MX (a recipient)
        waits at the gate now.
        """
        request = RouteRequest(
            protocol="smtp",
            credentials=None,
            client=ClientInfo("t", "192.0.2.9", 1, "192.0.2.1", 25),
            mailFrom="sender@example.net",
            rcptTo=account.upper(),
        )
        return self.proxy.context.gate.wait(request) is not None

    def journal(self) -> dict[str, Any]:
        """
        The journal file's content.
        """
        with open(self.journalPath) as file:
            return json.load(file)

    def steps(self, account: str) -> list[tuple[str, str]]:
        """
        The step events of C{account}, as (step, result).
        """
        return [(e["step"], e["result"]) for e in self.events if e["event"] == "migration_step" and e["account"] == account]


class StepTests(ManagerTestCase):
    """
    One account's way through the steps.
    """

    def test_stepsInOrderThenRouteFlipped(self) -> None:
        """
        An account goes through copy, hold, sync, verify and flip, one
        started and one ok event each, then one account event; its route
        names the target, its logins are not held, and the campaign and
        the journal say done, with the source's message count and bytes.
        """
        campaign = self.start(["alice@example.org"])
        self.assertEqual(
            self.steps("alice@example.org"),
            [(step, result) for step in ("copy", "hold", "sync", "verify", "flip") for result in ("started", "ok")],
        )
        final = [e for e in self.events if e["event"] == "migration_account"]
        self.assertEqual([(e["account"], e["result"], e["messages"], e["bytes"]) for e in final], [("alice@example.org", "done", 3, 350)])
        self.assertEqual(self.route("alice@example.org"), "new")
        self.assertFalse(self.held("alice@example.org"))
        description = campaign.describe()
        self.assertEqual((description["state"], description["done"], description["total"], description["bytes"]), ("done", 1, 1, 350))
        [saved] = self.journal()["campaigns"]
        self.assertEqual((saved["state"], saved["accounts"][0]["state"], saved["accounts"][0]["flip"]), ("done", "done", "done"))

    def test_doveadmRunsAsTargetWithPasswordInPrivateFile(self) -> None:
        """
        The copy and the sync run doveadm with the target's configuration
        included in a private file (mode 0600) that holds the source's
        master password; the password is on no command line and in no
        environment, and the file is gone afterwards.
        """
        self.start(["alice@example.org"])
        self.assertEqual(len(self.tools.runs), 4)
        for run in self.tools.runs:
            self.assertEqual(run["argv"][0], "doveadm")
            self.assertNotIn(MASTER_PASSWORD, " ".join(run["argv"]))
            self.assertNotIn(MASTER_PASSWORD, repr(run["env"]))
            self.assertEqual(run["mode"], 0o600)
            self.assertIn("!include /etc/dovecot/new.conf\n", run["config"])
            # Dovecot would expand a lone % as a variable.
            self.assertIn('imapc_password = "m4ster-Secret%%x"\n', run["config"])
            self.assertFalse(os.path.exists(run["argv"][run["argv"].index("-c") + 1]))
        self.assertEqual(
            [run["argv"][3:] for run in self.tools.runs[:2]],
            [
                ["backup", "-R", "-x", "INBOX", "-u", "alice@example.org", "imapc:"],
                ["sync", "-1", "-R", "-m", "INBOX", "-u", "alice@example.org", "imapc:"],
            ],
        )

    def test_mbsyncForTargetWithoutDoveadmConfig(self) -> None:
        """
        A target without a Dovecot configuration gets mbsync, whose private
        configuration logs in to both sides as ACCOUNT*MASTER; the engine
        copies the subscriptions itself, and the Sieve scripts.
        """
        self.settings.doveadmConfig.clear()
        self.start(["alice@example.org"])
        self.assertEqual([run["argv"][0] for run in self.tools.runs], ["mbsync", "mbsync"])
        config = self.tools.runs[0]["config"]
        self.assertEqual(config.count('User "alice@example.org*proxy"'), 2)
        # From old to new: new is the channel's far side, whichever way.
        self.assertIn("Sync Push\n", config)
        self.assertIn(os.path.join("migrations.json.d", ".mbsync", "new+old", "alice@example.org/"), config)
        self.assertIn(("subscriptions", "old", "new", "alice@example.org"), self.clients.calls)
        self.assertIn(("sieve", "old", "new", "alice@example.org"), self.clients.calls)
        self.assertEqual(self.route("alice@example.org"), "new")

    def test_holdDropsSessionsAndHoldsLoginsUntilFlip(self) -> None:
        """
        From the hold step on, the account's logged-in session is dropped
        with the moved message, and new logins and MX recipients of the
        account wait; during the bulk copy none of this happens; once
        flipped, logins and mail go on.
        """
        frontend, client, _ = self.proxy.login("alice@example.org")
        seen = []
        self.tools.onRun = lambda run: seen.append(
            (self.held("alice@example.org"), self.mailHeld("alice@example.org"), client.value())
        )
        self.start(["alice@example.org"])
        self.assertEqual(seen[0], (False, False, b""))
        self.assertEqual(seen[2], (True, True, b"* BYE " + MOVED.encode() + b"\r\n"))
        self.assertFalse(self.held("alice@example.org"))
        self.assertFalse(self.mailHeld("alice@example.org"))


class LoginUnderWayTests(ManagerTestCase):
    """
    A login of the account under way (past the gate) when its hold begins.
    """

    def underway(self, user: str = "alice@example.org") -> tuple[Any, Any]:
        """
        A session whose login was routed to old and waits for old's answer.

        @return: the session and its client transport.
        """
        frontend, client = self.proxy.connect()
        frontend.dataReceived(f"a LOGIN {user} secret\r\n".encode())
        self.assertEqual((frontend.describe()["state"], frontend.backendName), ("login", "old"))
        return frontend, client

    def test_loginFinishesThenGoodbye(self) -> None:
        """
        The hold waits for the login to finish: the client gets its login's
        OK, then the moved goodbye; only then does the final sync start, and
        a login of the account arriving meanwhile waits at the gate (it is
        not waited for) and goes on after the flip.
        """
        frontend, client = self.underway()
        self.start(["alice@example.org"])
        self.assertEqual(self.steps("alice@example.org")[-1], ("hold", "started"))
        self.proxy.clock.advance(LOGIN_POLL * 3)
        self.assertEqual(self.steps("alice@example.org")[-1], ("hold", "started"))
        self.assertEqual(len(self.tools.runs), 2)
        later, laterClient = self.proxy.connect()
        later.dataReceived(b"b LOGIN alice@example.org secret\r\n")
        backend = self.proxy.connector.protocols[0]
        backend.dataReceived(GREETING)
        backend.dataReceived(LOGGED_IN)
        self.assertTrue(client.value().startswith(b"a OK "), client.value())
        self.assertNotIn(b"BYE", client.value())
        self.proxy.clock.advance(LOGIN_POLL)
        self.assertTrue(client.value().endswith(b"* BYE " + MOVED.encode() + b"\r\n"), client.value())
        self.assertEqual(self.route("alice@example.org"), "new")
        self.assertEqual((later.backendName, len(self.proxy.connector.protocols)), ("new", 2))

    def test_loginTooSlowIsDropped(self) -> None:
        """
        A login still under way after C{backend_timeout} seconds (here: its
        router has not answered) is dropped with the goodbye as its
        answer, before the final sync starts: it must not log in to old
        after the sync.
        """
        answers: list[Deferred[Any]] = []

        class SlowRouter:
            def route(self, request: Any) -> Deferred[Any]:
                answers.append(Deferred())
                return answers[-1]

        self.proxy.context.router = SlowRouter()
        frontend, client = self.proxy.connect()
        frontend.dataReceived(b"a LOGIN alice@example.org secret\r\n")
        self.assertEqual((frontend.describe()["state"], frontend.backendName, len(answers)), ("login", None, 1))
        # The flip changes the real table.
        self.proxy.context.router = self.store
        self.start(["alice@example.org"])
        self.proxy.clock.advance(self.proxy.context.limits.backendTimeout - LOGIN_POLL)
        self.assertEqual((len(self.tools.runs), client.value()), (2, b""))
        self.proxy.clock.pump([LOGIN_POLL] * 3)
        self.assertEqual(client.value(), b"* BYE " + MOVED.encode() + b"\r\n")
        self.assertEqual(self.route("alice@example.org"), "new")


class ProgressTests(ManagerTestCase):
    """
    What an account's description says while its bulk copy runs.
    """

    def test_totalsThenTargetCountsDuringCopy(self) -> None:
        """
        Before the bulk copy the source's totals are taken; while the copy
        runs, the target's count and size so far are looked at every
        L{PROGRESS_POLL} seconds (a cheap look: no size sweep), and the
        campaign's bytes, rate and time left follow them; once the copy
        ends, one last look, then none.
        """
        copying: Deferred[ToolResult] = Deferred()
        self.tools.answers = [copying]
        self.clients.counts = {"old": (3, 350), "new": (0, 0)}
        campaign = self.start(["alice@example.org"])
        [job] = campaign.describe()["accounts"]
        self.assertEqual(
            (job["state"], job["total_messages"], job["total_bytes"], job["messages"], job["bytes"]), ("copying", 3, 350, 0, 0)
        )
        self.clients.counts["new"] = (1, 100)
        self.proxy.clock.advance(PROGRESS_POLL)
        described = campaign.describe(now=campaign.created + 10)
        self.assertEqual((described["accounts"][0]["messages"], described["accounts"][0]["bytes"]), (1, 100))
        self.assertEqual((described["messages"], described["bytes"], described["rate"], described["eta"]), (1, 100, 10.0, 25.0))
        self.clients.counts["new"] = (2, 300)
        self.proxy.clock.advance(PROGRESS_POLL)
        self.assertEqual((campaign.accounts[0].messages, campaign.accounts[0].bytes), (2, 300))
        looks = [call for call in self.clients.calls if call[:2] == ("totals", "new")]
        self.assertEqual(looks, [("totals", "new", "alice@example.org", "False")] * 2)
        self.clients.counts["new"] = (3, 350)
        copying.callback(OK)
        # One last look once the copy has ended, then none.
        self.assertEqual([call for call in self.clients.calls if call[:2] == ("totals", "new")], looks + looks[:1])
        self.proxy.clock.advance(PROGRESS_POLL * 3)
        self.assertEqual([call for call in self.clients.calls if call[:2] == ("totals", "new")], looks + looks[:1])
        self.assertEqual(campaign.describe()["accounts"][0]["state"], "done")

    def test_targetWithoutStatusSize(self) -> None:
        """
        A target without C{STATUS=SIZE} gives only its message count; the
        bytes so far are estimated from the source's average size.
        """
        self.tools.answers = [Deferred()]
        self.clients.counts = {"old": (3, 300), "new": (2, None)}
        campaign = self.start(["alice@example.org"])
        self.proxy.clock.advance(PROGRESS_POLL)
        self.assertEqual((campaign.accounts[0].messages, campaign.accounts[0].bytes), (2, 200))

    def test_queuedAccountsCountAtTheAverage(self) -> None:
        """
        The time left counts, for an account not started yet, the average
        size of those whose totals are known.
        """
        self.tools.answers = [Deferred()]
        self.clients.counts = {"old": (3, 400), "new": (1, 100)}
        campaign = self.start(["alice@example.org", "carol@example.org"], concurrency=1)
        self.proxy.clock.advance(PROGRESS_POLL)
        described = campaign.describe(now=campaign.created + 10)
        # (400 - 100) left of alice, 400 (the average) of carol, at 10 B/s.
        self.assertEqual((described["rate"], described["eta"]), (10.0, 70.0))
        self.assertEqual(described["accounts"][1]["total_bytes"], None)

    def test_sourceCountFailureLeavesTotalsUnknown(self) -> None:
        """
        If the source cannot be counted, the totals stay unknown and the
        copy goes on (it says itself what is wrong, if anything is).
        """
        self.clients.counts = {"old": RuntimeError("no STATUS today")}
        campaign = self.start(["alice@example.org"])
        [job] = campaign.describe()["accounts"]
        self.assertEqual((job["state"], job["total_messages"], job["total_bytes"]), ("done", None, None))

    def test_cancelWhileCounting(self) -> None:
        """
        A campaign cancelled while the source is being counted runs no
        copy: the account is cancelled, its route stays.
        """
        counting: Deferred[Any] = Deferred()
        runs: list[Any] = []

        def run(timeout: float, f: Any, *args: Any) -> Deferred[Any]:
            if f == self.clients.totals and len(runs) == 0:
                runs.append(f)
                return counting
            return maybeDeferred(f, *args)

        self.manager._runBlocking = run
        campaign = self.start(["alice@example.org"])
        self.assertTrue(self.manager.cancel(campaign.id))
        self.assertEqual((campaign.accounts[0].state, len(self.tools.runs)), ("cancelled", 0))
        self.assertEqual(self.route("alice@example.org"), None)

    def test_totalsJournalled(self) -> None:
        """
        The totals are in the journal and read back after a restart.
        """
        self.clients.counts = {"old": (3, 350)}
        self.start(["alice@example.org"])
        [saved] = self.journal()["campaigns"][0]["accounts"]
        self.assertEqual((saved["total_messages"], saved["total_bytes"]), (3, 350))
        self.makeManager()
        self.successResultOf(self.manager.resume())
        [job] = self.manager.campaigns()[0].describe()["accounts"]
        self.assertEqual((job["state"], job["total_messages"], job["total_bytes"]), ("done", 3, 350))


class LateMailTests(ManagerTestCase):
    """
    Mail that reaches the source after the final sync.
    """

    def test_copiedAtFlipAndAfterGrace(self) -> None:
        """
        Right after the flip (and the hold) the source is compared
        with what was verified and what is new is copied; once more after
        C{lateMailGrace} seconds, knowing what was copied already; each
        copy that moved mail is a C{late} event and counts its messages.
        """
        self.clients.late = [[("INBOX", "id:<late@x>")], [("Work/Sub", "id:<later@x>")]]
        self.start(["alice@example.org"])
        late = [call for call in self.clients.calls if call[0] == "late"]
        verified = "[('INBOX', ['id:<a@x>', 'id:<b@x>']), ('Work/Sub', ['id:<c@x>'])]"
        self.assertEqual(late, [("late", "old", "new", "alice@example.org", verified)])
        self.assertEqual(self.steps("alice@example.org")[-3:], [("flip", "started"), ("flip", "ok"), ("late", "ok")])
        self.proxy.clock.advance(self.settings.lateMailGrace)
        late = [call for call in self.clients.calls if call[0] == "late"]
        self.assertEqual(late[1][4], "[('INBOX', ['id:<a@x>', 'id:<b@x>', 'id:<late@x>']), ('Work/Sub', ['id:<c@x>'])]")
        self.assertEqual(self.steps("alice@example.org")[-1], ("late", "ok"))
        self.assertEqual(self.manager.campaigns()[0].accounts[0].messages, 5)

    def test_notUnderHold(self) -> None:
        """
        The late copy runs after the hold ended: a slow source does not
        keep the account's logins waiting.
        """
        seen = []
        copyLate = self.clients.copyLate

        def watching(*args: Any) -> Any:
            seen.append(self.held("alice@example.org"))
            return copyLate(*args)

        self.clients.copyLate = watching  # type: ignore[method-assign]
        self.start(["alice@example.org"])
        self.assertEqual(seen, [False])

    def test_lateFailureDoesNotUndo(self) -> None:
        """
        A late copy that fails is reported (without the password) and the
        account stays done on the target.
        """

        def failing(*args: Any) -> Any:
            raise OSError(f"lost connection ({MASTER_PASSWORD})")

        self.clients.copyLate = failing  # type: ignore[method-assign]
        campaign = self.start(["alice@example.org"])
        self.assertEqual(campaign.accounts[0].state, "done")
        self.assertEqual(self.route("alice@example.org"), "new")
        [event] = [e for e in self.events if e["step"] == "late"]
        self.assertEqual((event["result"], event["error"]), ("failed", "OSError: lost connection (********)"))

    def test_stopCancelsPendingLateCopy(self) -> None:
        """
        Stopping the proxy cancels the copy planned after the grace period.
        """
        self.start(["alice@example.org"])
        self.assertEqual(len(self.proxy.clock.getDelayedCalls()), 1)
        self.successResultOf(self.manager.stop())
        self.assertEqual(self.proxy.clock.getDelayedCalls(), [])


class FailureTests(ManagerTestCase):
    """
    A failure at any step leaves the route, ends the hold and says why.
    """

    def assertFailedAt(self, campaign: Campaign, step: str) -> str:
        """
        Alice failed at C{step}, kept her route and is not held; return
        the error.
        """
        job = campaign.job("alice@example.org")
        assert job is not None
        self.assertEqual((job.state, job.step), ("failed", step))
        self.assertIsNone(self.route("alice@example.org"))
        self.assertFalse(self.held("alice@example.org"))
        self.assertEqual(campaign.state, "failed")
        assert job.error is not None
        return job.error

    def test_copyFailureQuotesToolWithoutPassword(self) -> None:
        """
        A failed copy reports the tool's own error lines (not the panic
        and backtrace after them), with the master password replaced.
        """
        self.tools.answers = [
            ToolResult(
                None,
                6,
                b"",
                b"dsync(alice): Info: connected\n"
                b"dsync(alice): Error: imapc: Login as proxy (" + MASTER_PASSWORD.encode() + b") failed\n"
                b"dsync(alice): Panic: file lib-event.c: assertion failed\n"
                b"dsync(alice): Error: Raw backtrace: #0 t_askpass\n",
            )
        ]
        campaign = self.start(["alice@example.org"])
        error = self.assertFailedAt(campaign, "copy")
        self.assertEqual(error, "copy: doveadm failed (signal 6): dsync(alice): Error: imapc: Login as proxy (********) failed")
        everything = repr(self.events) + json.dumps(self.journal())
        self.assertNotIn(MASTER_PASSWORD, everything)
        self.assertIn(("copy", "failed"), self.steps("alice@example.org"))
        self.assertNotIn(("hold", "started"), self.steps("alice@example.org"))

    def test_syncFailureEndsHold(self) -> None:
        """
        A failed final sync (logins held) ends the hold and leaves the
        route.
        """
        self.tools.answers = [OK, OK, ToolResult(1, None, b"", b"Error: disk full\n")]
        campaign = self.start(["alice@example.org"])
        self.assertEqual(self.assertFailedAt(campaign, "sync"), "sync: doveadm failed (exit status 1): Error: disk full")

    def test_holdIsBounded(self) -> None:
        """
        When the final sync keeps the logins held longer than
        C{holdTimeout}, the sync is cancelled (its tool killed), the
        account fails saying so, and the logins go on.
        """
        killed = []
        self.tools.answers = [OK, OK, Deferred(lambda d: killed.append(True))]
        campaign = self.start(["alice@example.org"])
        self.assertTrue(self.held("alice@example.org"))
        self.proxy.clock.advance(self.settings.holdTimeout)
        self.assertEqual(killed, [True])
        self.assertEqual(
            self.assertFailedAt(campaign, "sync"),
            "sync: logins were held for 60 s, the longest allowed (hold_timeout); the account stays on old",
        )
        self.assertEqual(self.steps("alice@example.org")[-1], ("sync", "failed"))

    def test_toolTimeout(self) -> None:
        """
        A tool that runs past its timeout fails the step with a text that
        says it was killed.
        """
        from twisted.internet.defer import TimeoutError

        self.tools.answers = [Deferred()]
        self.tools.answers[0].errback(TimeoutError())
        campaign = self.start(["alice@example.org"])
        self.assertEqual(
            self.assertFailedAt(campaign, "copy"), "copy: doveadm did not finish in 21600 s and was killed"
        )

    def test_tempfailRunsAgain(self) -> None:
        """
        doveadm's EX_TEMPFAIL (it started a mailbox over) runs the same
        command again.
        """
        self.tools.answers = [ToolResult(75, None, b"", b"Warning: Deleting mailbox\n"), OK]
        self.start(["alice@example.org"])
        self.assertEqual(self.tools.runs[0]["argv"], self.tools.runs[1]["argv"])
        self.assertEqual(self.route("alice@example.org"), "new")

    def test_verifyMismatchNamesFolderAndCount(self) -> None:
        """
        A message missing on the target fails the verify (after one more
        sync and verify), naming the folder and how many differ.
        """
        self.clients.mailboxes["new"] = {"INBOX": MAILBOX["INBOX"], "Work/Sub": []}
        campaign = self.start(["alice@example.org"])
        error = self.assertFailedAt(campaign, "verify")
        self.assertEqual(error, "verify: folder 'Work/Sub': 1 missing on the target (source 1, target 0 messages)")
        self.assertEqual(
            [s for s, r in self.steps("alice@example.org") if r == "started"],
            ["copy", "hold", "sync", "verify", "sync", "verify"],
        )

    def test_verifyRetryCopiesLateMail(self) -> None:
        """
        When the first verify differs (mail delivered during the hold) and
        the second does not, the account moves.
        """
        answers = [{"INBOX": []}, MAILBOX]
        fingerprints = self.clients.fingerprints

        def changing(backend: Any, account: str, timeout: float) -> Any:
            if backend.name == "new":
                return answers.pop(0)
            return fingerprints(backend, account, timeout)

        self.clients.fingerprints = changing  # type: ignore[method-assign]
        self.start(["alice@example.org"])
        self.assertEqual(self.route("alice@example.org"), "new")

    def test_verifyClientErrorIsReported(self) -> None:
        """
        An IMAP error during the verify fails the account with its text.
        """
        self.clients.mailboxes["new"] = OSError("connection refused")
        campaign = self.start(["alice@example.org"])
        self.assertEqual(self.assertFailedAt(campaign, "verify"), "verify: OSError: connection refused")

    def test_flipFailureLeavesRoute(self) -> None:
        """
        When the route store refuses the change, the account fails at the
        flip and its logins are released.
        """
        def refuse(*args: Any) -> None:
            raise RouteStoreError("the route table is read-only")

        self.store.setRoutes = refuse  # type: ignore[method-assign]
        campaign = self.start(["alice@example.org"])
        job = campaign.job("alice@example.org")
        assert job is not None
        self.assertEqual((job.state, job.step, job.flip, job.error), ("failed", "flip", None, "flip: the route table is read-only"))
        self.assertIsNone(self.route("alice@example.org"))
        self.assertFalse(self.held("alice@example.org"))


class LoginHoldMailTests(SynchronousTestCase):
    """
    L{LoginHold} with C{mail}: what a migration holds and a move does not.
    """

    def request(self, rcptTo: str) -> RouteRequest:
        """
        An MX recipient's route request.
        """
        return RouteRequest(
            protocol="smtp",
            credentials=None,
            client=ClientInfo("t", "192.0.2.9", 1, "192.0.2.1", 25),
            rcptTo=rcptTo,
        )

    def test_mailHeldOnlyWhenAsked(self) -> None:
        """
        A hold without C{mail} (a move's) lets MX recipients go on; one
        with it makes a recipient of its account or domain wait until its
        release, which also ends only its own waiters.
        """
        gate = LoginHold()
        releaseMove = gate.hold(["alice@example.org"], [])
        self.assertIsNone(gate.wait(self.request("alice@example.org")))
        releaseMigration = gate.hold(["alice@example.org"], ["example.net"], mail=True)
        waiting = gate.wait(self.request("Alice@Example.org"))
        other = gate.wait(self.request("x@example.net"))
        assert waiting is not None and other is not None
        self.assertIsNone(gate.wait(self.request("bob@example.org")))
        releaseMove()
        self.assertNoResult(waiting)
        releaseMigration()
        self.successResultOf(waiting)
        self.successResultOf(other)
        self.assertIsNone(gate.wait(self.request("alice@example.org")))

    def test_equalHoldsReleasedSeparately(self) -> None:
        """
        Two holds of the same account are two holds: releasing one keeps
        the other's waiters waiting.
        """
        gate = LoginHold()
        first = gate.hold(["alice@example.org"], [], mail=True)
        second = gate.hold(["alice@example.org"], [], mail=True)
        waiting = gate.wait(self.request("alice@example.org"))
        assert waiting is not None
        second()
        self.assertNoResult(waiting)
        first()
        self.successResultOf(waiting)


class FlipStoreTests(ManagerTestCase):
    """
    A route store that fails after making the change.
    """

    def test_changeMadeDespiteError(self) -> None:
        """
        When the store raises after writing the change, the account is
        done (the journal says so), as the store names the target.
        """
        original = self.store.setRoutes

        def writeThenFail(changes: Any) -> None:
            original(changes)
            raise RuntimeError("connection lost after commit")

        self.store.setRoutes = writeThenFail  # type: ignore[method-assign]
        campaign = self.start(["alice@example.org"])
        self.assertEqual((campaign.accounts[0].state, campaign.accounts[0].flip), ("done", "done"))
        self.assertEqual(self.journal()["campaigns"][0]["accounts"][0]["flip"], "done")


class ValidationTests(ManagerTestCase):
    """
    What L{MigrationManager.start} refuses.
    """

    def test_refusals(self) -> None:
        """
        An unknown target, an account already there, a backend without a
        master user, an empty list, an account whose name has the master
        user separator (its master login would name another one) and a bad
        concurrency are refused with a text that says so; nothing is
        journalled.
        """
        cases = [
            ((["alice@example.org"], "nowhere"), "unknown backend 'nowhere'; configured backends: new, old, plain"),
            ((["bob@example.org"], "new"), "bob@example.org is already on new"),
            ((["alice@example.org"], "plain"), "target backend 'plain' has no master_user and master_password: the migration logs in with them"),
            (([], "new"), "name at least one account"),
            ((["@example.org"], "new"), "not an account: '@example.org'"),
            ((["eve*proxy@example.org"], "new"), "eve*proxy@example.org has old's master user separator '*' in its name"),
        ]
        for (accounts, target), text in cases:
            failure = self.failureResultOf(self.manager.start(accounts, target), MigrationError)
            self.assertEqual(str(failure.value), text)
        failure = self.failureResultOf(self.manager.start(["alice@example.org"], "new", concurrency=0), MigrationError)
        self.assertEqual(str(failure.value), "concurrency must be 1 to 64, not 0")
        self.assertFalse(os.path.exists(self.journalPath))

    def test_alreadyMigrating(self) -> None:
        """
        An account in a running campaign cannot be in a second one.
        """
        self.tools.answers = [Deferred()]
        first = self.start(["alice@example.org"])
        failure = self.failureResultOf(self.manager.start(["alice@example.org"], "new"), MigrationError)
        self.assertEqual(str(failure.value), f"alice@example.org is already migrating (campaign {first.id})")

    def test_dryRunPlansOnly(self) -> None:
        """
        A dry run says each account's source and tool, runs nothing,
        changes no route and writes no journal.
        """
        campaign = self.start(["alice@example.org", "Carol@Example.org"], dryRun=True)
        description = campaign.describe()
        self.assertEqual((description["dry_run"], description["state"]), (True, "done"))
        self.assertEqual(
            [(a["account"], a["source"], a["tool"], a["state"]) for a in description["accounts"]],
            [("alice@example.org", "old", "doveadm", "queued"), ("carol@example.org", "old", "doveadm", "queued")],
        )
        self.assertEqual((self.tools.runs, self.route("alice@example.org")), ([], None))
        self.assertFalse(os.path.exists(self.journalPath))


class ConcurrencyAndCancelTests(ManagerTestCase):
    """
    How many accounts run at once, and cancelling.
    """

    def test_concurrencyLimit(self) -> None:
        """
        With concurrency 2, the third account's copy starts only when one
        of the first two is done.
        """
        pending: list[Deferred[ToolResult]] = [Deferred(), Deferred()]
        self.tools.answers = list(pending)
        campaign = self.start(["a@example.org", "b@example.org", "c@example.org"], concurrency=2)
        self.assertEqual([run["argv"][-2] for run in self.tools.runs], ["a@example.org", "b@example.org"])
        pending[0].callback(OK)
        self.assertIn("c@example.org", [run["argv"][-2] for run in self.tools.runs])
        pending[1].callback(OK)
        self.assertEqual(campaign.describe()["done"], 3)

    def test_cancelKillsToolAndKeepsRoute(self) -> None:
        """
        Cancelling a campaign cancels the running tool (which kills it),
        marks its accounts cancelled, keeps their routes and holds nothing.
        """
        cancelled = []
        running: Deferred[ToolResult] = Deferred(lambda d: cancelled.append(True))
        self.tools.answers = [running]
        campaign = self.start(["alice@example.org", "carol@example.org"], concurrency=1)
        self.assertTrue(self.manager.cancel(campaign.id))
        self.assertEqual(cancelled, [True])
        self.assertEqual([job.state for job in campaign.accounts], ["cancelled", "cancelled"])
        self.assertEqual(campaign.state, "cancelled")
        self.assertIsNone(self.route("alice@example.org"))
        self.assertFalse(self.manager.cancel(campaign.id))
        self.assertEqual(self.journal()["campaigns"][0]["state"], "cancelled")


class JournalTests(ManagerTestCase):
    """
    The journal, resume, and never flipping twice.
    """

    def test_flipJournalledBeforeRouteChanges(self) -> None:
        """
        When the route store is changed, the journal already says the flip
        started (with source and target), so a crash then is recognised.
        """
        seen = []
        original = self.store.setRoutes

        def recording(changes: Any) -> Any:
            [saved] = self.journal()["campaigns"]
            seen.append((saved["target"], saved["accounts"][0]["source"], saved["accounts"][0]["flip"]))
            return original(changes)

        self.store.setRoutes = recording  # type: ignore[method-assign]
        self.start(["alice@example.org"])
        self.assertEqual(seen, [("new", "old", "started")])

    def journalWith(self, state: str, flip: str | None) -> None:
        """
        Write a journal with a running campaign of alice (old to new) in
        C{state} with C{flip}, as a proxy killed then would have left.
        """
        with open(self.journalPath, "w") as file:
            json.dump(
                {
                    "version": 1,
                    "campaigns": [
                        {
                            "id": "c1",
                            "target": "new",
                            "state": "running",
                            "concurrency": 2,
                            "created": 1.0,
                            "accounts": [
                                {"account": "alice@example.org", "source": "old", "tool": "doveadm", "state": state, "flip": flip},
                                {"account": "carol@example.org", "source": "old", "tool": "doveadm", "state": "done", "flip": "done"},
                            ],
                        }
                    ],
                },
                file,
            )

    def test_resumeAfterFlipDoesNotFlipAgain(self) -> None:
        """
        After a restart, an account whose flip started and whose route
        already names the target is done: no tool runs and the route store
        is not written again.
        """
        self.journalWith("flipping", "started")
        self.successResultOf(self.mover.move("new", ["alice@example.org"]))
        writes = []
        self.store.setRoutes = lambda changes: writes.append(changes)  # type: ignore[method-assign]
        self.successResultOf(self.manager.resume())
        campaign = self.manager.campaign("c1")
        assert campaign is not None
        self.assertEqual([job.state for job in campaign.accounts], ["done", "done"])
        self.assertEqual((self.tools.runs, writes), ([], []))
        self.assertEqual(self.journal()["campaigns"][0]["state"], "done")

    def test_resumeFlipNotMadeRunsFromTop(self) -> None:
        """
        An account whose flip had started but whose route is still on the
        source runs again from the copy and flips once.
        """
        self.journalWith("flipping", "started")
        self.successResultOf(self.manager.resume())
        self.assertEqual(self.steps("alice@example.org")[0], ("copy", "started"))
        self.assertEqual(self.route("alice@example.org"), "new")
        self.assertEqual(len([e for e in self.events if e["step"] == "flip" and e["result"] == "ok"]), 1)

    def test_resumeRerunsUnfinished(self) -> None:
        """
        An account killed in the middle of its sync runs again from the
        copy after a restart; the finished one does not run.
        """
        self.journalWith("syncing", None)
        self.successResultOf(self.manager.resume())
        self.assertEqual({run["argv"][-2] for run in self.tools.runs}, {"alice@example.org"})
        self.assertEqual(self.route("alice@example.org"), "new")
        self.assertIsNone(self.route("carol@example.org"))
        campaign = self.manager.campaign("c1")
        assert campaign is not None
        self.assertEqual(campaign.state, "done")

    def test_stopLeavesAccountsUnfinishedForResume(self) -> None:
        """
        Stopping the proxy mid-copy kills the tool and keeps the account
        unfinished in the journal; a new manager on the same journal runs
        it to the end.
        """
        cancelled = []
        self.tools.answers = [Deferred(lambda d: cancelled.append(True))]
        campaign = self.start(["alice@example.org"])
        self.successResultOf(self.manager.stop())
        self.assertEqual(cancelled, [True])
        self.assertEqual(self.journal()["campaigns"][0]["accounts"][0]["state"], "copying")
        self.assertIsNone(self.route("alice@example.org"))
        manager = self.makeManager()
        self.successResultOf(manager.resume())
        resumed = manager.campaign(campaign.id)
        assert resumed is not None
        self.assertEqual((resumed.state, self.route("alice@example.org")), ("done", "new"))

    def test_resumeRemovesLeftoverPrivateFiles(self) -> None:
        """
        A private tool directory a killed proxy left behind (its
        configuration holds a master password) is removed on resume;
        mbsync's state stays, after the campaign too (a migration back
        uses it).
        """
        self.journalWith("copying", None)
        left = os.path.join(self.directory, "migrations.json.d", "c1", "alice@example.org.x1y2")
        state = os.path.join(self.directory, "migrations.json.d", ".mbsync", "new+old", "alice@example.org")
        os.makedirs(left)
        os.makedirs(state)
        with open(os.path.join(left, "dovecot.conf"), "w") as file:
            file.write(f"imapc_password = {MASTER_PASSWORD}\n")
        kept = []
        self.tools.onRun = lambda run: kept.append(os.path.isdir(state))
        self.successResultOf(self.manager.resume())
        self.assertFalse(os.path.exists(left))
        self.assertEqual(kept[0], True)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "migrations.json.d", "c1")))
        self.assertTrue(os.path.isdir(state))

    def test_moverRefusesUpFront(self) -> None:
        """
        A mover that can move nobody (a fleet over static route tables)
        refuses the campaign before anything is copied or held.
        """
        self.mover.refusal = lambda: "the static route table is this proxy's own file"  # type: ignore[method-assign]
        failure = self.failureResultOf(self.manager.start(["alice@example.org"], "new"), MigrationError)
        self.assertEqual(str(failure.value), "the static route table is this proxy's own file")
        self.assertEqual((self.manager.campaigns(), self.tools.runs), ([], []))
        self.assertFalse(self.held("alice@example.org"))

    def test_journalNotWritable(self) -> None:
        """
        A journal that cannot be written (its directory read-only, as the
        configuration directory under a hardened unit) refuses the
        campaign, naming the journal and what to set: nothing is copied,
        and no campaign is left behind.
        """
        # Where no directory can be made (the tests may run as root, whom
        # a read-only mode does not stop).
        self.journalPath = os.path.join(self.routes, "migrations.json")
        self.makeManager()
        failure = self.failureResultOf(self.manager.start(["alice@example.org"], "new"), MigrationError)
        self.assertEqual(
            str(failure.value),
            f"cannot write the migration journal {self.journalPath}: Not a directory;"
            " set [migration] journal to a writable place",
        )
        self.assertEqual((self.manager.campaigns(), self.tools.runs), ([], []))

    def test_journalIsPrivateAndAtomic(self) -> None:
        """
        The journal is written with mode 0600 and no temporary file is
        left beside it.
        """
        self.start(["alice@example.org"])
        self.assertEqual(stat.S_IMODE(os.stat(self.journalPath).st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(self.directory)), ["migrations.json", "migrations.json.d", "routes.toml"])


class OnLoginTests(ManagerTestCase):
    """
    L{MigrationManager.queueOnLogin}.
    """

    def test_copiesThenWaitsForSessionToEnd(self) -> None:
        """
        A login of an account on another backend queues its migration: the
        copy runs while the session is open, which is not dropped; the
        hold and flip come once the session has closed.
        """
        self.settings.onLogin = "new"
        frontend, client, _ = self.proxy.login("alice@example.org")
        self.manager.queueOnLogin("alice@example.org", "old")
        self.assertEqual(len(self.tools.runs), 2)
        self.assertNotIn(("hold", "started"), self.steps("alice@example.org"))
        self.proxy.clock.advance(self.settings.sessionPoll)
        self.assertNotIn(("hold", "started"), self.steps("alice@example.org"))
        self.assertEqual(client.value(), b"")
        self.proxy.close(frontend)
        self.proxy.clock.advance(self.settings.sessionPoll)
        self.assertEqual(self.route("alice@example.org"), "new")
        self.assertEqual(self.manager.campaigns()[0].id, "on-login-new")

    def test_rolledBackAccountStays(self) -> None:
        """
        An account an operator's campaign moved back from the on-login
        target (a rollback) is not migrated again at its next login.
        """
        self.settings.onLogin = "new"
        self.start(["alice@example.org"], "new")
        self.start(["alice@example.org"], "old")
        self.assertEqual(self.route("alice@example.org"), "old")
        self.manager.queueOnLogin("alice@example.org", "old")
        self.assertEqual(len(self.manager.campaigns()), 2)

    def test_sourceWithoutMasterUser(self) -> None:
        """
        A login routed to a backend without a master user queues nothing
        (the copy could not log in there).
        """
        self.settings.onLogin = "new"
        self.manager.queueOnLogin("alice@example.org", "plain")
        self.assertEqual(self.manager.campaigns(), [])

    def test_filters(self) -> None:
        """
        Nothing is queued without C{onLogin}, for an account already on the
        target, outside the allowed domains, or twice.
        """
        self.manager.queueOnLogin("alice@example.org", "old")
        self.settings.onLogin = "new"
        self.settings.onLoginDomains = ("example.net",)
        self.manager.queueOnLogin("alice@example.org", "old")
        self.manager.queueOnLogin("bob@example.net", "new")
        self.assertEqual(self.manager.campaigns(), [])
        self.tools.answers = [Deferred()]
        self.manager.queueOnLogin("dave@example.net", "old")
        self.manager.queueOnLogin("dave@example.net", "old")
        [campaign] = self.manager.campaigns()
        self.assertEqual([job.account for job in campaign.accounts], ["dave@example.net"])
