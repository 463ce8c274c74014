"""
Tests for L{mailproxy._migrationhooks} (the engine's events as log lines and
counters, the on-login trigger) and for how L{mailproxy._lifecycle} builds,
starts, reloads and stops the migration engine.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import succeed
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._logs import jsonLine
from mailproxy._migrationhooks import OnLoginMigration, StepLog
from mailproxy.config import JOURNAL_NAME, journalPath
from mailproxy._stats import ProxyStats, metricsText, snapshot
from mailproxy.config import loadConfig
from mailproxy.migration import MigrationManager, MigrationSettings
from mailproxy.model import Route
from mailproxy.testing import makeBackend

from .test_admin_lifecycle import ServiceTreeTestsMixin


def stepEvent(account: str, step: str, result: str, **more: Any) -> dict[str, Any]:
    """
    An event as the engine sends it to its observers.
    """
    return {
        "event": "migration_step", "campaign": "c1", "account": account, "source": "old", "target": "new",
        "tool": "doveadm", "step": step, "result": result, "messages": 0, "bytes": 0, "error": None, **more,
    }


def accountEvent(account: str, result: str, **more: Any) -> dict[str, Any]:
    """
    The engine's last event of an account.
    """
    return dict(stepEvent(account, "flip", result, **more), event="migration_account")


class StepLogTests(SynchronousTestCase):
    """
    L{StepLog}: one log event per engine event, and the counters.
    """

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.stats = ProxyStats()
        self.observer = StepLog(self.stats)
        self.observer.log = Logger(namespace="mailproxy._migrationhooks.StepLog", observer=self.events.append)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """
        The migration samples of C{/metrics}, parsed by prometheus_client.
        """
        text = metricsText(self.stats, [], object()).decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if "migration" in sample.name
        }

    def test_oneLogEventPerStep(self) -> None:
        """
        Each event becomes one log event named as the engine names it, with
        its fields; in the C{[log]} JSON they are fields of the line.
        """
        self.observer(stepEvent("a@x", "copy", "started"))
        self.observer(stepEvent("a@x", "copy", "ok"))
        self.observer(accountEvent("a@x", "done", messages=3, bytes=3000))
        self.assertEqual(
            [(e["event"], e["step"], e["result"]) for e in self.events],
            [("migration_step", "copy", "started"), ("migration_step", "copy", "ok"), ("migration_account", "flip", "done")],
        )
        line = json.loads(jsonLine(self.events[-1]))
        self.assertEqual(
            {key: line[key] for key in ("event", "namespace", "level", "campaign", "account", "source", "target", "tool", "result", "messages", "bytes")},
            {"event": "migration_account", "namespace": "mailproxy._migrationhooks.StepLog", "level": "info", "campaign": "c1",
             "account": "a@x", "source": "old", "target": "new", "tool": "doveadm", "result": "done", "messages": 3,
             "bytes": 3000},
        )
        self.assertEqual(line["message"], 'migration c1: "a@x" old -> new: done (3 messages, 3000 bytes)')

    def test_failureWarns(self) -> None:
        """
        A failed step is a warning with the engine's reason; an account
        name cannot break the line.
        """
        self.observer(stepEvent("evil\r\nx@y", "verify", "failed", error="folder 'INBOX': 2 missing on the target"))
        (event,) = self.events
        self.assertEqual(event["log_level"].name, "warn")
        line = json.loads(jsonLine(event))
        self.assertEqual(line["error"], "folder 'INBOX': 2 missing on the target")
        self.assertEqual(line["account"], "evil\r\nx@y")
        self.assertNotIn("\n", line["message"])

    def test_counters(self) -> None:
        """
        Accounts with a step under way are in flight; an account's end
        counts its result, and a done account's bytes; C{/stats} and
        C{/metrics} show them.
        """
        self.observer(stepEvent("a@x", "copy", "started"))
        self.observer(stepEvent("b@x", "copy", "started"))
        self.observer(stepEvent("c@x", "copy", "started"))
        self.assertEqual(self.metrics()[("mailproxy_migrations_in_flight", ())], 3)
        self.observer(accountEvent("a@x", "done", bytes=5000))
        self.observer(accountEvent("b@x", "failed", bytes=7000, error="verify: ..."))
        samples = self.metrics()
        self.assertEqual(
            samples,
            {
                ("mailproxy_migrations_total", (("result", "done"),)): 1,
                ("mailproxy_migrations_total", (("result", "failed"),)): 1,
                ("mailproxy_migration_bytes_total", ()): 5000,
                ("mailproxy_migrations_in_flight", ()): 1,
            },
        )
        self.assertEqual(
            snapshot(self.stats, [], object())["migrations"],
            {"inFlight": 1, "ended": {"done": 1, "failed": 1}, "bytes": 5000},
        )

    def test_lateMailAfterTheEnd(self) -> None:
        """
        The engine's second look for late mail, after the account's end,
        neither puts the account back in flight nor counts it again.
        """
        self.observer(stepEvent("a@x", "copy", "started"))
        self.observer(stepEvent("a@x", "late", "ok"))
        self.observer(accountEvent("a@x", "done", bytes=5000))
        self.observer(stepEvent("a@x", "late", "ok"))
        self.observer(stepEvent("a@x", "late", "failed", error="late: IMAP trouble"))
        samples = self.metrics()
        self.assertEqual(samples[("mailproxy_migrations_in_flight", ())], 0)
        self.assertEqual(samples[("mailproxy_migrations_total", (("result", "done"),))], 1)
        self.assertEqual(len(self.events), 5)


class FakeSession:
    """
    A logged-in session as the registry's observers see it.
    """

    def __init__(self, user: str | None, backendName: str | None, rule: str | None = None) -> None:
        self.user = user
        self.backendName = backendName
        self.route = None if rule is None or backendName is None else Route(backend=makeBackend(backendName), rule=rule)


class FakeManager:
    """
    Records C{queueOnLogin}.
    """

    def __init__(self, settings: MigrationSettings, fails: bool = False) -> None:
        self.settings = settings
        self.queued: list[tuple[str, str]] = []
        self.fails = fails

    def queueOnLogin(self, account: str, backend: str) -> None:
        if self.fails:
            raise RuntimeError("journal full")
        self.queued.append((account, backend))


class OnLoginTests(SynchronousTestCase):
    """
    L{OnLoginMigration}.
    """

    def test_queued(self) -> None:
        """
        With C{on_login} set, each login is handed to the engine with the
        backend it went to (the engine decides whether it migrates).
        """
        manager = FakeManager(MigrationSettings(onLogin="new"))
        trigger = OnLoginMigration(manager)
        trigger.sessionLoggedIn(FakeSession("Alice@Example.org", "old"))
        trigger.sessionEnded(FakeSession("Alice@Example.org", "old"))
        self.assertEqual(manager.queued, [("Alice@Example.org", "old")])

    def test_notConfigured(self) -> None:
        """
        Without C{on_login}, or for a session without an account or a
        backend, the engine is not asked; a reload that sets C{on_login}
        applies to the next login.
        """
        manager = FakeManager(MigrationSettings())
        trigger = OnLoginMigration(manager)
        trigger.sessionLoggedIn(FakeSession("alice@example.org", "old"))
        manager.settings = MigrationSettings(onLogin="new")
        trigger.sessionLoggedIn(FakeSession(None, "old"))
        trigger.sessionLoggedIn(FakeSession("bob@example.org", None))
        trigger.sessionLoggedIn(FakeSession("carol@example.org", "old"))
        self.assertEqual(manager.queued, [("carol@example.org", "old")])

    def test_onlyMatchingRule(self) -> None:
        """
        With C{on_login_rule}, only a login whose route came from a router
        rule matching the pattern (a glob over the rule's text, without
        case) is handed to the engine; one without a route is not.
        """
        manager = FakeManager(MigrationSettings(onLogin="new", onLoginRule="*OU=Wave1,*"))
        trigger = OnLoginMigration(manager)
        trigger.sessionLoggedIn(FakeSession("alice@example.org", "old", "routers[1]: ldap uid=alice,ou=wave1,dc=example,dc=org -> old"))
        trigger.sessionLoggedIn(FakeSession("bob@example.org", "old", "routers[1]: ldap uid=bob,ou=wave2,dc=example,dc=org -> old"))
        trigger.sessionLoggedIn(FakeSession("carol@example.org", "old", "routers[0]: accounts['carol@example.org'] -> old"))
        trigger.sessionLoggedIn(FakeSession("olga@example.org", "old", "routers[1]: ldap uid=olga,ou=wave10,dc=example,dc=org -> old"))
        trigger.sessionLoggedIn(FakeSession("dave@example.org", "old"))
        manager.settings = MigrationSettings(onLogin="new", onLoginRule="domains['example.org'] -> *")
        trigger.sessionLoggedIn(FakeSession("erin@example.org", "old", "domains['example.org'] -> old"))
        trigger.sessionLoggedIn(FakeSession("frank@example.org", "old", "default -> old"))
        self.assertEqual(manager.queued, [("alice@example.org", "old"), ("erin@example.org", "old")])

    def test_engineTroubleLogged(self) -> None:
        """
        If the engine fails to queue, the failure is logged and the login
        goes on (nothing is raised into the session).
        """
        trigger = OnLoginMigration(FakeManager(MigrationSettings(onLogin="new"), fails=True))
        trigger.sessionLoggedIn(FakeSession("alice@example.org", "old"))
        (failure,) = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(failure.value), "journal full")


class JournalPathTests(SynchronousTestCase):
    """
    L{journalPath}.
    """

    def test_besideConfiguration(self) -> None:
        """
        Without C{[migration] journal} the journal is beside the
        configuration file; with it, where it says.
        """
        self.assertEqual(journalPath("/etc/mailproxy/mailproxy.toml", None), "/etc/mailproxy/" + JOURNAL_NAME)
        self.assertEqual(journalPath("/etc/mailproxy/mailproxy.toml", "/var/lib/mailproxy/j.json"), "/var/lib/mailproxy/j.json")


class LifecycleTests(ServiceTreeTestsMixin, SynchronousTestCase):
    """
    The proxy service and its migration engine.
    """

    def test_built(self) -> None:
        """
        The service has an engine with the proxy's router, backends,
        sessions, mover, settings, and its journal beside the
        configuration; its events reach the proxy's counters.
        """
        manager = self.service.migrations
        self.assertIsInstance(manager, MigrationManager)
        self.assertIs(manager.router, self.service.context.router)
        self.assertIs(manager.sessions, self.service.context.sessions)
        self.assertIs(manager.mover, self.service.mover)
        self.assertEqual(set(manager.backends), {"old", "new"})
        self.assertEqual(manager.routerName, "static")
        self.assertEqual(manager.settings, MigrationSettings(journal=os.path.join(self.directory, "migrations.json")))
        self.assertEqual(manager.journalPath, os.path.join(self.directory, "migrations.json"))
        manager._emit(accountEvent("a@x", "done", bytes=10))
        self.assertEqual(self.service.context.stats.migrations["done"], 1)

    def test_loginsObserved(self) -> None:
        """
        With C{[migration] on_login}, a session that logs in is handed to
        the engine's on-login queue with the backend it went to.
        """
        queued: list[tuple[str, str]] = []
        manager = self.service.migrations
        self.patch(manager, "queueOnLogin", lambda account, backend: queued.append((account, backend)))
        manager.settings = MigrationSettings(onLogin="new")
        session = FakeSession("alice@example.org", "old")
        self.service.context.sessions.add(session)  # type: ignore[arg-type]
        self.service.context.sessions.loggedIn(session)  # type: ignore[arg-type]
        self.assertEqual(queued, [("alice@example.org", "old")])

    def test_resumedOnlyWithJournal(self) -> None:
        """
        On start the engine resumes the journal's unfinished work if an
        earlier run left a journal; without one nothing is asked of it.
        """
        resumed: list[bool] = []
        self.patch(self.service.migrations, "resume", lambda: resumed.append(True) or succeed(None))
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.assertEqual(resumed, [])
        self.write("migrations.json", "{}")
        self.service.stopService()
        self.service.startService()
        self.assertEqual(resumed, [True])

    def test_stoppedWithCampaigns(self) -> None:
        """
        On shutdown the engine is stopped (its tools killed, its journal
        written) when it has campaigns.
        """
        stopped: list[bool] = []
        self.patch(self.service.migrations, "stop", lambda: stopped.append(True) or succeed(None))
        self.service.startService()
        self.service.stopService()
        self.assertEqual(stopped, [])
        self.patch(self.service.migrations, "campaigns", lambda: [object()])
        self.service.startService()
        self.service.stopService()
        self.assertEqual(stopped, [True])

    def test_reload(self) -> None:
        """
        A reload hands the engine the new router, backends and
        C{[migration]}; a new journal place needs a restart and is not
        applied.
        """
        with open(self.path) as f:
            text = f.read()
        self.write("mailproxy.toml", text + '[migration]\non_login = "new"\nconcurrency = 2\njournal = "elsewhere.json"\n')
        outcome = self.service.reload()
        self.assertEqual(outcome["restartNeeded"], ["migration.journal"])
        manager = self.service.migrations
        self.assertIs(manager.router, self.service.context.router)
        self.assertEqual(
            (manager.settings.onLogin, manager.settings.concurrency, manager.settings.journal),
            ("new", 2, os.path.join(self.directory, "migrations.json")),
        )
        self.assertEqual(self.service.config.migration, manager.settings)
        self.assertEqual(loadConfig(self.path).migration.journal, os.path.join(self.directory, "elsewhere.json"))
