"""
How the migration engine (L{mailproxy.migration}) is tied into the running
proxy: its events become log lines and counters, a campaign's domain
becomes its accounts, and successful logins of accounts still on another
backend start their migration when C{[migration] on_login} asks for it.

The engine reports every step of every account to its observers as a dict,
C{{"event": "migration_step", "campaign", "account", "source", "target",
"tool", "step": "copy" | "hold" | "sync" | "verify" | "flip", "result":
"started" | "ok" | "failed", "messages", "bytes", "error"}}, and once per
account at its end C{{"event": "migration_account", ..., "result": "done" |
"failed" | "cancelled"}}; C{messages} and C{bytes} are the account's (known
from its verify on).  Mail that reached the source after the flip is
copied at the flip and once more a while after the account's end: a step
C{"late"} that reports only C{"ok"} or C{"failed"}.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from ._contract import ISessionObserver
from ._migrate import findRouteStore
from ._safetext import logQuote
from ._stats import ProxyStats
from .model import Route
from .migration import MigrationError

__all__ = ["StepLog", "OnLoginMigration", "ruleMatches", "domainAccounts"]

#: The event that ends an account's migration.
ACCOUNT_EVENT = "migration_account"


def domainAccounts(router: object, domain: str) -> Deferred[list[str]]:
    """
    The accounts of C{domain} that have an entry of their own in the route
    store of C{router}'s chain: the accounts a campaign for the domain
    migrates (a domain entry alone names no account).

    @return: fires with them, sorted; fails with L{MigrationError} if the
        router has no route store or the store has none of the domain's
        accounts.
    """
    if not domain or "@" in domain:
        raise MigrationError(f"not a domain: {domain!r}")
    store = findRouteStore(router)
    if store is None:
        raise MigrationError(f"the router ({type(router).__name__}) lists no accounts, so it cannot migrate a domain")
    suffix = "@" + domain.lower()

    def pick(routes: Mapping[str, str]) -> list[str]:
        accounts = sorted(key.lower() for key in routes if key.lower().endswith(suffix) and not key.startswith("@"))
        if not accounts:
            raise MigrationError(
                f"the route store has no account of {domain} with an entry of its own; "
                "name the accounts (or list them in a file)"
            )
        return accounts

    return maybeDeferred(store.routes).addCallback(pick)


class StepLog:
    """
    A migration observer that logs each event once (its C{event} field,
    C{"migration_step"} or C{"migration_account"}, with the event's fields,
    goes into the C{[log]} JSON) and counts it in the proxy's
    L{ProxyStats}.
    """

    log = Logger()

    def __init__(self, stats: ProxyStats) -> None:
        self.stats = stats

    def __call__(self, event: Mapping[str, Any]) -> None:
        kind = str(event.get("event") or "migration_step")
        campaign = str(event.get("campaign") or "")
        account = str(event.get("account") or "")
        result = str(event.get("result") or "")
        size = event.get("bytes") or 0
        if kind == ACCOUNT_EVENT:
            self.stats.migrationEnded(campaign, account, result, size if result == "done" else 0)
        elif result == "started":
            # Only a step that starts puts the account in flight: the look
            # for late mail after the end reports "ok" or "failed" alone.
            self.stats.migrationStep(campaign, account)
        error = event.get("error")
        fields: dict[str, Any] = {
            "event": kind,
            "campaign": campaign,
            "account": logQuote(account),
            "source": event.get("source"),
            "target": event.get("target"),
            "tool": event.get("tool"),
            "step": event.get("step"),
            "result": result,
            "messages": event.get("messages") or 0,
            "bytes": size,
            "error": None if error is None else logQuote(str(error)),
        }
        if kind == ACCOUNT_EVENT:
            text = "migration {campaign}: {account} {source} -> {target}: {result} ({messages} messages, {bytes} bytes)"
        else:
            text = "migration {campaign}: {account} {source} -> {target}: {step} {result}"
        if error is not None:
            text += ": {error}"
        if result == "failed":
            self.log.warn(text, **fields)
        else:
            self.log.info(text, **fields)


def ruleMatches(pattern: str, route: Route | None) -> bool:
    """
    Whether C{route} came from a router rule matching C{pattern} (C{[migration]
    on_login_rule}) over the whole rule text as the session-end log's
    C{rule} field shows it, without case: C{*} stands for any text, C{?}
    for one character, everything else for itself (brackets too: the
    static router's rules are written C{accounts['...']}).
    """
    if route is None:
        return False
    expression = "".join({"*": ".*", "?": "."}.get(c, re.escape(c)) for c in pattern)
    return re.fullmatch(expression, route.rule, re.IGNORECASE | re.DOTALL) is not None


@implementer(ISessionObserver)
class OnLoginMigration:
    """
    A session observer (C{SessionRegistry.observe}) that tells the engine
    of every successful login with the backend it went to; the engine
    queues the account's migration when C{[migration] on_login} names
    another backend (and the domain is one of C{on_login_domains}). With
    C{on_login_rule}, only logins whose route came from a matching router
    rule are handed over (L{ruleMatches}). The
    user goes on working on the old backend; the engine flips the route
    once the copy is done and the account's sessions have ended.

    @ivar manager: the L{mailproxy.migration.MigrationManager}.
    """

    log = Logger()

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def sessionLoggedIn(self, session: Any) -> None:
        """
        C{session} has logged in: tell the engine, unless no migration on
        login is configured.
        """
        account, backend = session.user, session.backendName
        settings = self.manager.settings
        if settings.onLogin is None or not account or backend is None:
            return
        if settings.onLoginRule is not None and not ruleMatches(settings.onLoginRule, session.route):
            return
        try:
            self.manager.queueOnLogin(account, backend)
        except Exception:
            # The user's session must not suffer for it.
            self.log.failure("migration on login of {account} could not be queued", account=logQuote(account))

    def sessionEnded(self, session: Any) -> None:
        """
        C{session} ended: nothing to do here (the engine looks at the
        account's sessions itself before it holds and flips).
        """
