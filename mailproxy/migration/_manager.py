"""
Campaigns of account migrations, and the steps of one account.

Per account, in order (each step is one event to the observers):

  1. C{copy}: the bulk copy from the account's current backend to the
     target with a sync tool (L{mailproxy.migration._tools}), then its
     Sieve scripts with ManageSieve, while the user keeps working;
  2. C{hold}: new logins of the account wait, and so does mail for it
     arriving through the proxy's MX (the proxy's L{LoginHold}); its
     sessions on other backends are dropped;
  3. C{sync}: the same tool again, which now copies only what changed
     (mail delivered or flags changed since step 1), and the scripts;
  4. C{verify}: per folder, the message count, the set of Message-IDs
     (size and internal date for a message without one) and their system
     flags on both sides, read over IMAP as the backends' master users; a
     difference runs steps 3 and 4 once more (C{syncAttempts}), then
     fails the account;
  5. C{flip}: the route store names the target (the proxy's L{Mover}, which
     forgets cached routes too), and the hold ends.  Then mail that
     reached the source after the final sync anyway (a delivery under way
     when the hold began, or one that did not pass through the proxy) is
     copied over IMAP, at once and again C{lateMailGrace} seconds later
     (an event with step C{"late"} when that copied or failed).

A failure at any step leaves the route where it was, ends the hold, and
says which step failed and why (a tool's own error output, never a
password).  A campaign runs up to C{concurrency} accounts at once.

The journal (L{mailproxy.migration._journal}) has every campaign and
account state.  Before the route store is changed, the account's C{flip}
is journalled as C{"started"} with its source and target; after, the
account is C{done}.  On resume, an account whose flip had started is
done if the store already names the target (the flip happened; it is
never made twice), and otherwise runs again from the top like every other
unfinished account.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from attrs import define, field
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    FirstError,
    TimeoutError,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .._blocking import ThreadRunner
from .._migrate import MOVED, MoveError, findRouteStore
from .._routing import explainRoute
from ..model import Backend
from ..settings import Limits
from . import _clients, _tools
from ._journal import Journal

__all__ = [
    "MigrationError",
    "MigrationSettings",
    "AccountJob",
    "Campaign",
    "MigrationManager",
    "STEPS",
    "ACCOUNT_STATES",
    "CAMPAIGN_STATES",
]

#: The steps of one account, in order.
STEPS = ("copy", "hold", "sync", "verify", "flip")

#: An account's states: queued, one per step while it runs, then final.
ACCOUNT_STATES = ("queued", "copying", "holding", "syncing", "verifying", "flipping", "done", "failed", "cancelled")

#: A campaign's states.
CAMPAIGN_STATES = ("running", "done", "failed", "cancelled")

_STEP_STATE = dict(zip(STEPS, ("copying", "holding", "syncing", "verifying", "flipping")))
_FINAL = ("done", "failed", "cancelled")

#: Seconds between two looks, while an account's bulk copy runs, at how
#: much of it the target has (one IMAP login and a STATUS per folder).
PROGRESS_POLL = 5.0

#: Seconds one such look may take at most (a slow server is skipped).
LOOK_TIMEOUT = 30.0

#: Seconds between two looks, at an account's hold, whether its logins
#: under way have finished.
LOGIN_POLL = 0.05

#: The directory, in the engine's work directory, of mbsync's state: per
#: pair of backends, per account; kept after campaigns (a migration back
#: or a retry copies only what changed).
MBSYNC_STATE = ".mbsync"

#: How many finished campaigns the journal (and L{MigrationManager.campaigns})
#: keeps.
KEEP_FINISHED = 50


class MigrationError(Exception):
    """
    A migration was refused (an unknown backend or account, a backend
    without a master user...); C{str(error)} is for the operator.
    """


class StepFailed(Exception):
    """
    A step of one account failed; C{str(error)} says why (no password).
    """

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


@define
class MigrationSettings:
    """
    The C{[migration]} settings.

    @ivar onLogin: the backend accounts move to after a login elsewhere
        (L{MigrationManager.queueOnLogin}); L{None}: no migration on login.
    @ivar onLoginDomains: the domains migrated on login; empty: all.
    @ivar onLoginRule: a pattern (C{*} any text, C{?} one character, without
        case): only a login whose route came from a matching router rule
        (the route's C{rule}, the session-end log's C{rule} field, e.g.
        C{"ldap uid=bob,ou=wave1,dc=example,dc=org -> old"}) queues a
        migration; L{None}: any rule.  The on-login trigger
        (L{mailproxy._migrationhooks.OnLoginMigration}) applies it: only a
        session knows its route.
    @ivar journal: the journal file; L{None}: beside the configuration.
    @ivar concurrency: accounts migrated at once per campaign, by default.
    @ivar doveadm: the doveadm command, split like a shell would (e.g.
        C{"sudo -n /usr/bin/doveadm"}: doveadm must run as a user that may
        read the target Dovecot's configuration and become its mail user).
    @ivar mbsync: the mbsync command, split the same way.
    @ivar tools: the tool per target backend name (C{"doveadm"} or
        C{"mbsync"}); a target not named uses doveadm if it has a
        C{doveadmConfig} entry, else mbsync.
    @ivar doveadmConfig: per target backend name, the path of that
        Dovecot's configuration (C{dovecot.conf}) on this host: doveadm
        runs as that server (see L{mailproxy.migration._tools}).
    @ivar copyTimeout: seconds a bulk copy may take.
    @ivar holdTimeout: seconds an account's logins may be held (its final
        sync, verify and flip); longer fails the account, its route stays.
    @ivar clientTimeout: seconds an IMAP or ManageSieve conversation (a
        verify, a script copy) may take.
    @ivar sessionPoll: seconds between looks, for an account migrated on
        login, whether its sessions have ended (its hold waits for that).
    @ivar syncAttempts: how many times the final sync and the verify run
        before a difference fails the account.
    @ivar lateMailGrace: seconds after the flip when the source is looked
        at once more for mail that reached it late (see L{MigrationManager});
        0: only right after the flip.
    """

    onLogin: str | None = None
    onLoginDomains: tuple[str, ...] = ()
    onLoginRule: str | None = None
    journal: str | None = None
    concurrency: int = 4
    doveadm: str = "doveadm"
    mbsync: str = "mbsync"
    tools: dict[str, str] = field(factory=dict)
    doveadmConfig: dict[str, str] = field(factory=dict)
    copyTimeout: float = 6 * 3600.0
    holdTimeout: float = 60.0
    clientTimeout: float = 300.0
    sessionPoll: float = 5.0
    syncAttempts: int = 2
    lateMailGrace: float = 30.0

    def toolFor(self, target: str) -> str:
        """
        The tool that copies to the backend named C{target}.
        """
        return self.tools.get(target) or ("doveadm" if target in self.doveadmConfig else "mbsync")


@define
class AccountJob:
    """
    One account of a campaign.

    @ivar source: the backend it is on when the campaign starts.
    @ivar state: one of L{ACCOUNT_STATES}.
    @ivar step: the step running, or the last one that ran.
    @ivar messages: while the bulk copy runs, the messages the target has
        so far (looked at every L{PROGRESS_POLL} seconds); from the verify
        on, the messages on the source.
    @ivar bytes: their size (while the copy runs, without C{STATUS=SIZE}
        on the target, estimated from the message count and the source's
        average size).
    @ivar totalMessages: the messages on the source when its bulk copy
        started (L{None}: not known yet).
    @ivar totalBytes: their size.
    @ivar error: why it failed.
    @ivar flip: L{None}; C{"started"} once the route store is being
        changed; C{"done"} once it was.
    @ivar verified: the source's fingerprints per folder at the verify
        (not journalled): what the late-mail copies compare with.
    """

    account: str
    source: str
    tool: str = ""
    state: str = "queued"
    step: str | None = None
    messages: int = 0
    bytes: int = 0
    error: str | None = None
    flip: str | None = None
    totalMessages: int | None = None
    totalBytes: int | None = None
    verified: dict[str, list[str]] | None = field(default=None, repr=False, eq=False)

    def describe(self) -> dict[str, Any]:
        """
        This account as JSON-ready data.
        """
        return {
            "account": self.account,
            "source": self.source,
            "tool": self.tool,
            "state": self.state,
            "step": self.step,
            "messages": self.messages,
            "bytes": self.bytes,
            "total_messages": self.totalMessages,
            "total_bytes": self.totalBytes,
            "error": self.error,
            "flip": self.flip,
        }

    @classmethod
    def fromJSON(cls, data: Mapping[str, Any]) -> AccountJob:
        """
        An account as L{describe} wrote it.
        """
        return cls(
            account=str(data["account"]),
            source=str(data["source"]),
            tool=str(data.get("tool") or ""),
            state=str(data.get("state") or "queued"),
            step=data.get("step"),
            messages=int(data.get("messages") or 0),
            bytes=int(data.get("bytes") or 0),
            error=data.get("error"),
            flip=data.get("flip"),
            totalMessages=_count(data.get("total_messages")),
            totalBytes=_count(data.get("total_bytes")),
        )


@define(eq=False)
class Campaign:
    """
    Accounts migrated to one target.

    @ivar id: its id (for C{GET /migrations/ID}).
    @ivar state: one of L{CAMPAIGN_STATES}.
    @ivar created: when it was made (seconds since the epoch).
    @ivar onLogin: it collects the accounts migrated on login.
    """

    id: str
    target: str
    accounts: list[AccountJob]
    dryRun: bool = False
    concurrency: int = 4
    created: float = 0.0
    state: str = "running"
    onLogin: bool = False
    finished: float | None = None
    _semaphore: DeferredSemaphore | None = field(default=None, init=False, repr=False)
    _running: dict[str, Deferred[None]] = field(factory=dict, init=False, repr=False)

    def job(self, account: str) -> AccountJob | None:
        """
        The job of C{account}, if it is in this campaign.
        """
        for job in self.accounts:
            if job.account == account:
                return job
        return None

    def describe(self, now: float | None = None) -> dict[str, Any]:
        """
        This campaign as JSON-ready data (C{GET /migrations/ID}).
        """
        now = time.time() if now is None else now
        done = sum(1 for job in self.accounts if job.state == "done")
        failed = sum(1 for job in self.accounts if job.state == "failed")
        finishedCount = sum(1 for job in self.accounts if job.state in _FINAL)
        # What the done accounts moved, and what the running ones have on
        # the target so far (not a failed or cancelled account's part).
        counted = [job for job in self.accounts if job.state == "done" or job.state in _STEP_STATE.values()]
        moved = sum(job.bytes for job in counted)
        elapsed = max((self.finished or now) - self.created, 0.001)
        rate = moved / elapsed
        remaining = len(self.accounts) - finishedCount
        eta = None
        if self.state == "running" and remaining:
            left = self._bytesLeft()
            if left is not None and rate > 0:
                eta = round(left / rate, 1)
            elif finishedCount:
                eta = round(elapsed / finishedCount * remaining, 1)
        elif self.state != "running" or not remaining:
            eta = 0.0 if not remaining else None
        return {
            "id": self.id,
            "target": self.target,
            "state": self.state,
            "dry_run": self.dryRun,
            "on_login": self.onLogin,
            "concurrency": self.concurrency,
            "created": datetime.fromtimestamp(self.created, timezone.utc).isoformat(timespec="seconds"),
            "total": len(self.accounts),
            "done": done,
            "failed": failed,
            "messages": sum(job.messages for job in counted),
            "bytes": moved,
            "rate": round(rate, 1),
            "eta": eta,
            "accounts": [job.describe() for job in self.accounts],
        }

    def _bytesLeft(self) -> float | None:
        """
        The bytes still to copy for the unfinished accounts: for each that
        knows its total, what the target lacks of it; for each that does
        not yet (queued), the average total of those that do.  L{None}
        when no account knows its total yet.
        """
        known = [job.totalBytes for job in self.accounts if job.totalBytes is not None]
        if not known:
            return None
        average = sum(known) / len(known)
        return sum(
            max(job.totalBytes - job.bytes, 0) if job.totalBytes is not None else average
            for job in self.accounts
            if job.state not in _FINAL
        )

    def toJSON(self) -> dict[str, Any]:
        """
        What the journal keeps of this campaign.
        """
        return {
            "id": self.id,
            "target": self.target,
            "state": self.state,
            "concurrency": self.concurrency,
            "created": self.created,
            "finished": self.finished,
            "on_login": self.onLogin,
            "accounts": [job.describe() for job in self.accounts],
        }

    @classmethod
    def fromJSON(cls, data: Mapping[str, Any]) -> Campaign:
        """
        A campaign as L{toJSON} wrote it.
        """
        return cls(
            id=str(data["id"]),
            target=str(data["target"]),
            accounts=[AccountJob.fromJSON(job) for job in data.get("accounts", [])],
            concurrency=int(data.get("concurrency") or 1),
            created=float(data.get("created") or 0.0),
            state=str(data.get("state") or "running"),
            onLogin=bool(data.get("on_login")),
            finished=data.get("finished"),
        )


class MigrationManager:
    """
    Runs the migration campaigns of one proxy.

    @ivar beforeVerify: a test hook: called with the account's L{AccountJob}
        after the final sync and before the verify (may return a Deferred).
    """

    log = Logger()

    def __init__(
        self,
        *,
        reactor: Any,
        mover: Any,
        router: Any,
        backends: Mapping[str, Backend],
        sessions: Any,
        settings: MigrationSettings,
        journalPath: str | None,
        routerName: str = "",
        runTool: Callable[[Sequence[str], dict[str, str], float], Deferred[_tools.ToolResult]] | None = None,
        runBlocking: Callable[..., Deferred[Any]] | None = None,
        clients: Any = None,
    ) -> None:
        """
        @param mover: the proxy's L{mailproxy._migrate.Mover}: its gate holds
            logins, its C{move} flips routes.
        @param router: the proxy's router (its chain has the route store).
        @param backends: the configured backends, by name.
        @param sessions: the proxy's L{mailproxy._session.SessionRegistry}.
        @param journalPath: the journal file; L{None}: none (nothing
            survives a restart).
        @param runTool: runs a tool (tests script it); by default
            L{_tools.runProcess} on C{reactor}.
        @param runBlocking: runs a blocking call off the reactor,
            C{runBlocking(timeout, f, *args)}; by default a thread pool.
        @param clients: the IMAP and ManageSieve conversations (tests
            replace them); by default L{mailproxy.migration._clients}.
        """
        self.reactor = reactor
        self.mover = mover
        self.router = router
        self.routerName = routerName
        self.backends = dict(backends)
        self.sessions = sessions
        self.settings = settings
        self.journalPath = journalPath
        if runTool is None:
            runTool = lambda argv, env, timeout: _tools.runProcess(reactor, argv, env, timeout)  # noqa: E731
        self._runTool = runTool
        journalRun = lookRun = runBlocking
        if runBlocking is None:
            # IMAP and ManageSieve conversations (two per verify) and file
            # work; the journal has a thread of its own, so that its writes
            # never wait behind a long verify.
            runBlocking = ThreadRunner(reactor, 8, "mailproxy-migration").run
            journalRun = ThreadRunner(reactor, 1, "mailproxy-migration-journal").run
            # The progress looks while copies run: two at most, and never
            # ahead of a verify (which runs while logins are held).
            lookRun = ThreadRunner(reactor, 2, "mailproxy-migration-progress").run
        self._runBlocking = runBlocking
        self._runLook: Callable[..., Deferred[Any]] = lookRun or runBlocking
        self._clients = clients if clients is not None else _clients
        # The journal writes one at a time (it waits for each), in order.
        self._journal = Journal(journalPath, journalRun) if journalPath is not None else None
        self.workDirectory = (journalPath + ".d") if journalPath else os.path.join(
            os.environ.get("TMPDIR", "/tmp"), f"mailproxy-migration-{os.getpid()}"
        )
        self._campaigns: dict[str, Campaign] = {}
        self._observers: list[Callable[[dict[str, Any]], None]] = []
        self._stopping = False
        self._lateCalls: set[Any] = set()
        self._refusedOnLogin: set[str] = set()
        self.beforeVerify: Callable[[AccountJob], Any] | None = None

    # The API

    def addObserver(self, observer: Callable[[dict[str, Any]], None]) -> None:
        """
        Call C{observer(event)} for every step event: C{{"event":
        "migration_step", "campaign", "account", "source", "target", "step",
        "result": "started"|"ok"|"failed", "messages", "bytes", "error"}},
        and once per account at its end: C{{"event": "migration_account",
        ..., "result": "done"|"failed"|"cancelled"}}.
        """
        self._observers.append(observer)

    def campaigns(self) -> list[Campaign]:
        """
        Every campaign this manager knows, oldest first.
        """
        return sorted(self._campaigns.values(), key=lambda c: c.created)

    def campaign(self, campaignId: str) -> Campaign | None:
        """
        The campaign with id C{campaignId}, if any.
        """
        return self._campaigns.get(campaignId)

    def start(
        self, accounts: Sequence[str], target: str, *, dryRun: bool = False, concurrency: int | None = None
    ) -> Deferred[Campaign]:
        """
        Plan a campaign moving C{accounts} to the backend named C{target},
        journal it and start it (a dry run only plans).

        @return: fires with the L{Campaign} once it is journalled and has
            started (not when it is finished), or fails with
            L{MigrationError}.
        """
        return Deferred.fromCoroutine(self._start(list(accounts), target, dryRun, concurrency))

    def cancel(self, campaignId: str) -> bool:
        """
        Cancel a running campaign: its queued accounts do not start, its
        running ones stop (their tools are killed, their holds end, their
        routes stay), except one whose route is being flipped.

        @return: whether there was such a running campaign.
        """
        campaign = self._campaigns.get(campaignId)
        if campaign is None or campaign.state != "running":
            return False
        campaign.state = "cancelled"
        for job in campaign.accounts:
            if job.state == "queued":
                job.state = "cancelled"
        for account, running in list(campaign._running.items()):
            found = campaign.job(account)
            if found is not None and found.state != "flipping":
                running.cancel()
        self._finishIfDone(campaign)
        self._saveSoon()
        return True

    def resume(self) -> Deferred[None]:
        """
        Load the journal and run the unfinished accounts of unfinished
        campaigns again from their first step; an account whose flip was
        under way is done if the route store already names its target.

        @return: fires once they were started.
        """
        return Deferred.fromCoroutine(self._resume())

    def queueOnLogin(self, account: str, backend: str) -> None:
        """
        C{account} logged in and was routed to C{backend}: queue its
        migration to C{settings.onLogin} if it is elsewhere, in an allowed
        domain, and not already migrating.  The copy runs while the user
        works; the hold and the flip wait until the account has no session.
        """
        target = self.settings.onLogin
        account = account.lower()
        if target is None or backend == target or self._stopping or target not in self.backends:
            return
        if backend not in self.backends:
            return
        domains = {d.lower().lstrip("@") for d in self.settings.onLoginDomains}
        if domains and account.rpartition("@")[2] not in domains:
            return
        last = None
        for existing in self.campaigns():
            found = existing.job(account)
            if found is None:
                continue
            if existing.state == "running" and found.state not in _FINAL:
                return
            if found.state == "done":
                last = existing
        if last is not None and not last.onLogin and last.target != target:
            # An operator's campaign moved it here (a rollback): it stays.
            return
        try:
            self._checkBackend(self.backends[backend], "source", account)
            self._checkBackend(self.backends[target], "target", account)
            if findRouteStore(self.router) is None:
                raise MigrationError(f"the router ({self.routerName or type(self.router).__name__}) cannot change routes")
        except MigrationError as error:
            # Said once per backend, not at every login.
            if backend not in self._refusedOnLogin:
                self._refusedOnLogin.add(backend)
                self.log.warn("no migration on login from {backend}: {error}", backend=backend, error=str(error))
            return
        campaignId = f"on-login-{target}"
        current = self._campaigns.get(campaignId)
        if current is not None and current.state == "running":
            campaign = current
        else:
            # One campaign collects the on-login accounts until it ends.
            campaign = Campaign(
                id=campaignId if current is None else f"{campaignId}-{uuid.uuid4().hex[:8]}",
                target=target,
                accounts=[],
                concurrency=self.settings.concurrency,
                created=time.time(),
                onLogin=True,
            )
            self._campaigns[campaign.id] = campaign
        job = AccountJob(account=account, source=backend, tool=self.settings.toolFor(target))
        campaign.accounts.append(job)
        self._saveSoon()
        self._launch(campaign, job)

    def stop(self) -> Deferred[None]:
        """
        The proxy stops: kill the tools, end the holds, and leave the
        journal saying which accounts were unfinished (L{resume} runs them
        again).
        """
        self._stopping = True
        for call in self._lateCalls:
            if call.active():
                call.cancel()
        self._lateCalls.clear()
        for campaign in self._campaigns.values():
            for account, running in list(campaign._running.items()):
                job = campaign.job(account)
                if job is not None and job.state != "flipping":
                    running.cancel()
        return self._save()

    # Planning

    async def _start(self, accounts: list[str], target: str, dryRun: bool, concurrency: int | None) -> Campaign:
        if target not in self.backends:
            configured = ", ".join(sorted(self.backends)) or "none"
            raise MigrationError(f"unknown backend {target!r}; configured backends: {configured}")
        if concurrency is None:
            concurrency = self.settings.concurrency
        if not 1 <= concurrency <= 64:
            raise MigrationError(f"concurrency must be 1 to 64, not {concurrency}")
        names = list(dict.fromkeys(a.strip().lower() for a in accounts))
        if not names:
            raise MigrationError("name at least one account")
        for name in names:
            if not name or name.startswith("@") or name == "*" or any(c.isspace() for c in name):
                raise MigrationError(f"not an account: {name!r}")
        tool = self.settings.toolFor(target)
        if tool not in _tools.TOOLS:
            raise MigrationError(f"unknown migration tool {tool!r} for backend {target!r}; known: doveadm, mbsync")
        self._checkBackend(self.backends[target], "target")
        if findRouteStore(self.router) is None:
            raise MigrationError(f"the router ({self.routerName or type(self.router).__name__}) cannot change routes")
        refusal = self.mover.refusal()
        if refusal is not None:
            # Known before anything is copied or a session dropped.
            raise MigrationError(refusal)
        busy = {
            job.account: campaign.id
            for campaign in self._campaigns.values()
            if campaign.state == "running"
            for job in campaign.accounts
            if job.state not in _FINAL
        }
        jobs = []
        for name in names:
            if name in busy:
                raise MigrationError(f"{name} is already migrating (campaign {busy[name]})")
            source = await self._currentBackend(name)
            if source is None:
                raise MigrationError(f"no route decides where {name} is")
            if source not in self.backends:
                raise MigrationError(f"{name} is routed to {source!r}, which is not a configured backend")
            if source == target:
                raise MigrationError(f"{name} is already on {target}")
            self._checkBackend(self.backends[source], "source", name)
            self._checkBackend(self.backends[target], "target", name)
            jobs.append(AccountJob(account=name, source=source, tool=tool))
        campaign = Campaign(
            id=uuid.uuid4().hex[:12],
            target=target,
            accounts=jobs,
            dryRun=dryRun,
            concurrency=concurrency,
            created=time.time(),
        )
        if dryRun:
            campaign.state = "done"
            campaign.finished = campaign.created
            self._campaigns[campaign.id] = campaign
            return campaign
        self._campaigns[campaign.id] = campaign
        try:
            await self._save()
        except OSError as e:
            # Nothing started: the campaign is forgotten, and the operator
            # told where the journal is (a read-only configuration
            # directory, its default place, under a hardened unit).
            del self._campaigns[campaign.id]
            assert self._journal is not None
            raise MigrationError(
                f"cannot write the migration journal {self._journal.path}: {e.strerror or e};"
                " set [migration] journal to a writable place"
            ) from None
        self.log.info(
            "migration {campaign} started: {count} accounts to {target} with {tool}, {concurrency} at once",
            event="migration_campaign",
            campaign=campaign.id,
            count=len(jobs),
            target=target,
            tool=tool,
            concurrency=concurrency,
        )
        for job in jobs:
            self._launch(campaign, job)
        return campaign

    def _checkBackend(self, backend: Backend, role: str, account: str | None = None) -> None:
        if backend.masterUser is None or backend.masterPassword is None:
            raise MigrationError(
                f"{role} backend {backend.name!r} has no master_user and master_password: the migration logs in with them"
            )
        if "imap" not in backend.ports:
            raise MigrationError(f"{role} backend {backend.name!r} has no IMAP port")
        if account is not None and backend.masterSeparator and backend.masterSeparator in account:
            # ACCOUNT<separator>MASTER would name another login.
            raise MigrationError(
                f"{account} has {backend.name}'s master user separator {backend.masterSeparator!r} in its name"
            )

    async def _currentBackend(self, account: str) -> str | None:
        """
        The backend the router sends C{account} to now: the rule that
        decides it, else the route store's entries (the account's own, its
        domain's, the default).
        """
        try:
            explained = await explainRoute(self.router, self.routerName, account)
        except Exception:
            explained = {"explained": False, "backend": None}
        if explained.get("explained") and explained.get("backend"):
            return str(explained["backend"])
        store = findRouteStore(self.router)
        if store is None:
            return None
        entries = {key.lower(): value for key, value in (await maybeDeferred(store.routes)).items()}
        domain = "@" + account.rpartition("@")[2] if "@" in account else None
        for key in (account, domain, "*"):
            if key is not None and key in entries:
                return str(entries[key])
        return None

    # Running

    def _launch(self, campaign: Campaign, job: AccountJob) -> None:
        if campaign._semaphore is None:
            campaign._semaphore = DeferredSemaphore(campaign.concurrency)
        semaphore = campaign._semaphore

        def run() -> Deferred[None]:
            if campaign.state != "running" or job.state in _FINAL or self._stopping:
                return succeed(None)
            running = Deferred.fromCoroutine(self._migrate(campaign, job))
            campaign._running[job.account] = running
            return running

        ran = semaphore.run(run)
        ran.addErrback(lambda failure: self.log.failure("migration of {account}", failure, account=job.account))

    async def _migrate(self, campaign: Campaign, job: AccountJob) -> None:
        try:
            await self._steps(campaign, job)
        except CancelledError:
            if self._stopping:
                # The journal keeps the account unfinished: resume reruns it.
                return
            job.state = "cancelled"
            self._accountEvent(campaign, job, "cancelled")
        except Exception as error:
            if isinstance(error, StepFailed):
                step, message = error.step, str(error)
            else:
                # The journal could not be written, or a bug: the account
                # fails, it does not hang.
                step = job.step or "copy"
                message = _tools.scrub(f"{type(error).__name__}: {error}", self._secrets())
            job.state = "failed"
            job.error = f"{step}: {message}"
            self._accountEvent(campaign, job, "failed")
            self.log.warn(
                "migration of {account} to {target} failed at {step}: {error}",
                account=job.account,
                target=campaign.target,
                step=step,
                error=message,
            )
        else:
            job.state = "done"
            self._accountEvent(campaign, job, "done")
        finally:
            campaign._running.pop(job.account, None)
            if not self._stopping:
                self._finishIfDone(campaign)
                await self._save()

    async def _steps(self, campaign: Campaign, job: AccountJob) -> None:
        source = self.backends.get(job.source)
        target = self.backends[campaign.target]
        if source is None:
            raise StepFailed("copy", f"backend {job.source!r} is no longer configured")
        job.error = None
        job.flip = None
        # The journal's word on the state of a rerun account: from the top.
        await self._step(campaign, job, "copy", lambda: self._copy(campaign, job, source, target, bulk=True))
        if campaign.onLogin:
            await self._waitForNoSession(job)
        # Its mail is held too: a message delivered to the source after the
        # final sync would be left behind by the flip.
        release = self.mover.context.gate.hold([job.account], [], mail=True)
        # Held logins wait: the hold is bounded.  When it lasts too long,
        # the step under way is cancelled (its tool killed), unless the
        # route is being flipped, which is quick and must not be cut.
        expired: list[bool] = []

        def expire() -> None:
            running = campaign._running.get(job.account)
            if job.state != "flipping" and running is not None:
                expired.append(True)
                running.cancel()

        timer = self.reactor.callLater(self.settings.holdTimeout, expire)
        try:
            await self._step(campaign, job, "hold", lambda: self._dropSessions(job, campaign.target))
            attempts = max(1, self.settings.syncAttempts)
            for attempt in range(1, attempts + 1):
                await self._step(campaign, job, "sync", lambda: self._copy(campaign, job, source, target, bulk=False))
                if self.beforeVerify is not None:
                    await maybeDeferred(self.beforeVerify, job)
                try:
                    await self._step(campaign, job, "verify", lambda: self._verify(job, source, target))
                    break
                except StepFailed:
                    # Mail delivered to the source between the sync and the
                    # verify (the hold stops logins, not deliveries) is
                    # copied by one more sync.
                    if attempt == attempts:
                        raise
            await self._step(campaign, job, "flip", lambda: self._flip(campaign, job))
        except CancelledError:
            if expired:
                step = job.step or "hold"
                message = (
                    f"logins were held for {self.settings.holdTimeout:g} s, the longest allowed (hold_timeout); "
                    f"the account stays on {job.source}"
                )
                self._stepEvent(campaign, job, step, "failed", message)
                raise StepFailed(step, message) from None
            raise
        finally:
            if timer.active():
                timer.cancel()
            release()
        # Mail that reached the source after the final sync (a delivery
        # under way when the account was held, or one that did not pass
        # through the proxy) is copied now, and once more after a grace
        # period.  Not under the hold: it only adds messages the target
        # lacks, and a slow source must not keep the logins waiting.
        await self._copyLate(campaign, job, source, target)
        if self.settings.lateMailGrace > 0 and not self._stopping:
            call = self.reactor.callLater(self.settings.lateMailGrace, self._lateAgain, campaign, job, source, target)
            self._lateCalls.add(call)

    async def _step(self, campaign: Campaign, job: AccountJob, step: str, run: Callable[[], Any]) -> None:
        job.state = _STEP_STATE[step]
        job.step = step
        self._stepEvent(campaign, job, step, "started")
        await self._save()
        try:
            await run()
        except (CancelledError, StepFailed) as error:
            if isinstance(error, StepFailed):
                self._stepEvent(campaign, job, step, "failed", str(error))
            raise
        except _tools.ToolFailed as error:
            self._stepEvent(campaign, job, step, "failed", str(error))
            raise StepFailed(step, str(error)) from None
        except Exception as error:
            message = _tools.scrub(f"{type(error).__name__}: {error}", self._secrets())
            self._stepEvent(campaign, job, step, "failed", message)
            raise StepFailed(step, message) from None
        self._stepEvent(campaign, job, step, "ok")

    def _secrets(self) -> list[bytes | None]:
        return [backend.masterPassword for backend in self.backends.values()]

    async def _copy(self, campaign: Campaign, job: AccountJob, source: Backend, target: Backend, bulk: bool) -> None:
        if not bulk:
            await self._runCopy(campaign, job, source, target, bulk)
            return
        await self._takeTotals(job, source)
        progress = _Progress(self, job, target)
        try:
            await self._runCopy(campaign, job, source, target, bulk)
        finally:
            progress.stop()
        # What the copy left on the target (a copy shorter than
        # PROGRESS_POLL was never looked at).
        await progress.lastLook()

    async def _takeTotals(self, job: AccountJob, source: Backend) -> None:
        """
        Count the account's messages and bytes on the source before its
        bulk copy, for the progress shown while it runs.  A failure here
        only leaves the totals unknown: the copy says what is wrong.
        """
        timeout = self.settings.clientTimeout
        try:
            job.totalMessages, job.totalBytes = await self._runBlocking(
                timeout, self._clients.totals, source, job.account, timeout
            )
        except CancelledError:
            # The account is cancelled (or the proxy stops): no copy.
            raise
        except Exception as error:
            job.totalMessages = job.totalBytes = None
            self.log.info(
                "migration of {account}: cannot count its mail on {source}: {error}",
                account=job.account,
                source=source.name,
                error=_tools.scrub(f"{type(error).__name__}: {error}", self._secrets()),
            )

    async def _runCopy(self, campaign: Campaign, job: AccountJob, source: Backend, target: Backend, bulk: bool) -> None:
        timeout = self.settings.copyTimeout if bulk else self.settings.holdTimeout
        directory = await self._runBlocking(
            60.0, _tools.PrivateDirectory, os.path.join(self.workDirectory, campaign.id), _safeName(job.account) + "."
        )
        try:
            if job.tool == "doveadm":
                config = _tools.doveadmConfiguration(
                    source, self.settings.doveadmConfig.get(target.name, "/etc/dovecot/dovecot.conf")
                )
                path = await self._runBlocking(60.0, directory.write, "dovecot.conf", config)
                commands = _tools.doveadmCommands(self.settings.doveadm, path, job.account)
            else:
                state = os.path.join(
                    self.workDirectory, MBSYNC_STATE, _tools.mbsyncStateName(source, target), _safeName(job.account)
                )
                config = _tools.mbsyncConfiguration(source, target, job.account, state)
                await self._runBlocking(60.0, os.makedirs, state, 0o700, True)
                path = await self._runBlocking(60.0, directory.write, "mbsyncrc", config)
                commands = [_tools.mbsyncCommand(self.settings.mbsync, path)]
            for argv in commands:
                for _ in range(_tools.TEMPFAIL_RUNS):
                    try:
                        result = await self._runTool(argv, _tools.toolEnvironment(directory.path), timeout)
                    except TimeoutError:
                        raise _tools.ToolFailed(f"{job.tool} did not finish in {timeout:g} s and was killed") from None
                    # doveadm's sync exits with EX_TEMPFAIL when it had to
                    # start a mailbox over (it found the target changed
                    # behind its back): it asks to be run again.
                    if result.code != _tools.EX_TEMPFAIL or job.tool != "doveadm":
                        break
                if not result.ok:
                    how = f"exit status {result.code}" if result.code is not None else f"signal {result.signal}"
                    said = _tools.excerpt(result.stderr or result.stdout, self._secrets()) or "no output"
                    raise _tools.ToolFailed(f"{job.tool} failed ({how}): {said}")
        finally:
            await self._runBlocking(60.0, directory.remove)
        timeoutClient = self.settings.clientTimeout
        if job.tool == "mbsync":
            # mbsync leaves subscriptions alone; doveadm copies them.
            await self._runBlocking(timeoutClient, self._clients.copySubscriptions, source, target, job.account, timeoutClient)
        if "sieve" in source.ports and "sieve" in target.ports:
            await self._runBlocking(timeoutClient, self._clients.copySieve, source, target, job.account, timeoutClient)

    async def _waitForNoSession(self, job: AccountJob) -> None:
        while any(session.backendName is not None for session in self.sessions.find(account=job.account)):
            await deferLater(self.reactor, self.settings.sessionPoll)

    async def _dropSessions(self, job: AccountJob, target: str) -> None:
        """
        Drop the account's sessions on other backends, and the logins of it
        under way (past the gate when the hold began: at the router or the
        backend), which could otherwise write to the source after the final
        sync.  Such a login is first given up to C{backend_timeout} seconds
        to finish, so that its client gets its login's answer and then the
        goodbye rather than the goodbye for an answer; one still under way
        then is dropped as it is.  Logins waiting at the hold are left to
        go on after the flip, to the target.
        """
        context = self.mover.context
        gate = context.gate
        limits = getattr(context, "limits", None)
        timeout = limits.backendTimeout if limits is not None else Limits().backendTimeout
        deadline = self.reactor.seconds() + timeout

        def underway() -> list[Any]:
            held = gate.heldSessions() if callable(getattr(gate, "heldSessions", None)) else frozenset()
            found = []
            for session in self.sessions.find(account=job.account):
                described = session.describe()
                if described["state"] == "login" and described["session"] not in held:
                    found.append(session)
            return found

        while underway() and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, LOGIN_POLL)
        late = underway()
        for session in self.sessions.find(account=job.account):
            if session.backendName not in (None, target) or session in late:
                session.drop(MOVED)
        fleet = getattr(self.mover, "fleet", None)
        if fleet is None:
            return
        # The account's sessions on the other proxies of a fleet (their
        # logins are held there too, by the fleet's gate), each dropped by
        # its proxy: the final sync waits until they have gone from the
        # fleet's registry, for a backend timeout of its own (the wait for
        # local logins above may have used up the first).
        deadline = self.reactor.seconds() + timeout
        told: set[str] = set()
        while True:
            remote = [s for s in await fleet.findRemote(job.account, None) if s.backendName != target]
            for session in remote:
                if session.client.sessionId not in told:
                    told.add(session.client.sessionId)
                    session.drop(MOVED)
            if not remote or self.reactor.seconds() >= deadline:
                return
            await deferLater(self.reactor, LOGIN_POLL)

    async def _verify(self, job: AccountJob, source: Backend, target: Backend) -> None:
        timeout = self.settings.clientTimeout
        # Both sides at once: the logins are held meanwhile.
        try:
            before, after = await gatherResults(
                [
                    self._runBlocking(timeout, self._clients.fingerprints, backend, job.account, timeout)
                    for backend in (source, target)
                ],
                consumeErrors=True,
            )
        except FirstError as error:
            error.subFailure.raiseException()
        job.verified = {folder: [key for key, _, _ in messages] for folder, messages in before.items()}
        differences = compareFolders(before, after)
        job.messages = sum(len(messages) for messages in before.values())
        job.bytes = sum(size for messages in before.values() for _, size, _ in messages)
        if differences:
            raise StepFailed("verify", "; ".join(differences))

    async def _flip(self, campaign: Campaign, job: AccountJob) -> None:
        job.flip = "started"
        await self._save()
        try:
            await self.mover.move(campaign.target, [job.account], hold=0.0, drop=True)
        except Exception as error:
            # The store may have failed after making the change: what it
            # says now decides (the journal must not say a flip that
            # happened did not).
            try:
                current = await self._currentBackend(job.account)
            except Exception:
                current = None
            if current != campaign.target:
                job.flip = None
                message = str(error) if isinstance(error, MoveError) else f"{type(error).__name__}: {error}"
                raise StepFailed("flip", _tools.scrub(message, self._secrets())) from None
        job.flip = "done"

    def _lateAgain(self, campaign: Campaign, job: AccountJob, source: Backend, target: Backend) -> None:
        self._lateCalls = {call for call in self._lateCalls if call.active()}
        Deferred.fromCoroutine(self._copyLate(campaign, job, source, target))

    async def _copyLate(self, campaign: Campaign, job: AccountJob, source: Backend, target: Backend) -> None:
        """
        Copy what reached the source since the verify; the account is on
        the target already, so a failure is reported (an event with step
        C{"late"}, a warning) but does not undo anything.
        """
        if job.verified is None:
            return
        timeout = self.settings.clientTimeout
        try:
            copied = await self._runBlocking(timeout, self._clients.copyLate, source, target, job.account, job.verified, timeout)
        except Exception as error:
            message = _tools.scrub(f"{type(error).__name__}: {error}", self._secrets())
            self._stepEvent(campaign, job, "late", "failed", message)
            self.log.warn(
                "migration of {account}: mail that reached {source} after the flip was not copied: {error}",
                account=job.account,
                source=job.source,
                error=message,
            )
            return
        for folder, key in copied:
            job.verified.setdefault(folder, []).append(key)
        if copied:
            job.messages += len(copied)
            self._stepEvent(campaign, job, "late", "ok")
            self.log.info(
                "migration of {account}: {count} messages that reached {source} late copied to {target}",
                account=job.account,
                count=len(copied),
                source=job.source,
                target=campaign.target,
            )

    # Resume

    async def _resume(self) -> None:
        if self._journal is None:
            return
        try:
            data = await self._journal.load()
        except (ValueError, OSError) as error:
            self.log.error("cannot resume migrations: {error}", error=str(error))
            return
        rerun: list[tuple[Campaign, AccountJob]] = []
        for entry in data.get("campaigns", []):
            campaign = Campaign.fromJSON(entry)
            if campaign.id in self._campaigns:
                continue
            self._campaigns[campaign.id] = campaign
            if campaign.state != "running":
                continue
            for job in campaign.accounts:
                if job.state in _FINAL:
                    continue
                if job.flip is not None:
                    current = await self._currentBackend(job.account)
                    if current == campaign.target:
                        # The flip was made before the restart: never twice.
                        job.flip = "done"
                        job.state = "done"
                        self._accountEvent(campaign, job, "done")
                        continue
                job.state = "queued"
                job.flip = None
                rerun.append((campaign, job))
            self._finishIfDone(campaign)
        await self._save()
        # A proxy killed during a tool run left its private files (with
        # master passwords) behind: remove them.
        await self._runBlocking(60.0, _removeLeftovers, self.workDirectory)
        for campaign, job in rerun:
            self.log.info(
                "migration {campaign}: resuming {account} from the first step",
                campaign=campaign.id,
                account=job.account,
            )
            self._launch(campaign, job)

    # State, journal, events

    def _finishIfDone(self, campaign: Campaign) -> None:
        if any(job.state not in _FINAL for job in campaign.accounts) and campaign.state == "running":
            return
        if campaign._running:
            return
        if campaign.state == "running":
            campaign.state = "failed" if any(job.state == "failed" for job in campaign.accounts) else "done"
        if campaign.finished is None:
            campaign.finished = time.time()
            # Any private file a killed run left is of no use once the
            # campaign is over (mbsync's state is not in there).
            self._runBlocking(60.0, shutil.rmtree, os.path.join(self.workDirectory, campaign.id), True).addErrback(
                lambda failure: self.log.failure("removing the files of migration {campaign}", failure, campaign=campaign.id)
            )
            self.log.info(
                "migration {campaign} {state}: {done} of {total} accounts done",
                event="migration_campaign",
                campaign=campaign.id,
                state=campaign.state,
                done=sum(1 for job in campaign.accounts if job.state == "done"),
                total=len(campaign.accounts),
            )

    def _saveSoon(self) -> None:
        """
        Write the journal without waiting for it (a caller that cannot
        wait); a failure is logged.
        """
        self._save().addErrback(lambda failure: self.log.failure("writing the migration journal", failure))

    def _save(self) -> Deferred[None]:
        if self._journal is None:
            return succeed(None)
        kept = [c for c in self.campaigns() if not c.dryRun]
        finished = [c for c in kept if c.state != "running"]
        dropped = {c.id for c in finished[: max(len(finished) - KEEP_FINISHED, 0)]}
        return self._journal.save({"campaigns": [c.toJSON() for c in kept if c.id not in dropped]})

    def _emit(self, event: dict[str, Any]) -> None:
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:
                self.log.failure("migration observer {observer}", observer=observer)

    def _stepEvent(self, campaign: Campaign, job: AccountJob, step: str, result: str, error: str | None = None) -> None:
        self._emit(
            {
                "event": "migration_step",
                "campaign": campaign.id,
                "account": job.account,
                "source": job.source,
                "target": campaign.target,
                "tool": job.tool,
                "step": step,
                "result": result,
                "messages": job.messages,
                "bytes": job.bytes,
                "error": error,
            }
        )

    def _accountEvent(self, campaign: Campaign, job: AccountJob, result: str) -> None:
        self._emit(
            {
                "event": "migration_account",
                "campaign": campaign.id,
                "account": job.account,
                "source": job.source,
                "target": campaign.target,
                "tool": job.tool,
                "step": job.step,
                "result": result,
                "messages": job.messages,
                "bytes": job.bytes,
                "error": job.error,
            }
        )


class _Progress:
    """
    While an account's bulk copy runs, look every L{PROGRESS_POLL} seconds
    at how many of its messages (and bytes) the target has, into the job's
    C{messages} and C{bytes}.  One look at a time per account (a slow
    server is not asked again before it answered), two at most for the
    whole proxy (threads of their own), each bounded by L{LOOK_TIMEOUT}
    seconds, and none after L{stop}; a failed look is skipped.
    """

    def __init__(self, manager: MigrationManager, job: AccountJob, target: Backend) -> None:
        self.manager = manager
        self.job = job
        self.target = target
        self.stopped = False
        self.call = manager.reactor.callLater(PROGRESS_POLL, self._look)

    def _ask(self) -> Deferred[tuple[int, int | None]]:
        timeout = min(self.manager.settings.clientTimeout, LOOK_TIMEOUT)
        return self.manager._runLook(timeout, self.manager._clients.totals, self.target, self.job.account, timeout, False)

    def _look(self) -> None:
        looked = self._ask()
        looked.addCallbacks(self._seen, lambda failure: None)
        looked.addBoth(self._again)

    async def lastLook(self) -> None:
        """
        Look once more, after the copy (a failed look is skipped).
        """
        try:
            self._update(await self._ask())
        except CancelledError:
            raise
        except Exception:
            pass

    def _seen(self, counted: tuple[int, int | None]) -> None:
        if not self.stopped:
            self._update(counted)

    def _update(self, counted: tuple[int, int | None]) -> None:
        job = self.job
        job.messages, size = counted
        if size is None:
            # The target has no STATUS=SIZE: the source's average size.
            average = job.totalBytes / job.totalMessages if job.totalMessages and job.totalBytes is not None else 0
            size = round(job.messages * average)
        job.bytes = size

    def _again(self, _: object) -> None:
        if not self.stopped:
            self.call = self.manager.reactor.callLater(PROGRESS_POLL, self._look)

    def stop(self) -> None:
        """
        The copy has ended: no more looks (one under way is ignored).
        """
        self.stopped = True
        if self.call.active():
            self.call.cancel()


def _count(value: Any) -> int | None:
    """
    A count read back from the journal (L{None} stays unknown).
    """
    return None if value is None else int(value)


def _removeLeftovers(directory: str) -> None:
    """
    Remove the private directories of tool runs under C{directory} (one
    directory per campaign), keeping mbsync's state.
    """
    try:
        campaigns = os.listdir(directory)
    except FileNotFoundError:
        return
    for campaign in campaigns:
        path = os.path.join(directory, campaign)
        if campaign == MBSYNC_STATE or not os.path.isdir(path):
            continue
        for name in os.listdir(path):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def _safeName(account: str) -> str:
    """
    C{account} as a file name.
    """
    return "".join(c if c.isalnum() or c in "@.-_" else "_" for c in account)[:100] or "account"


def compareFolders(
    source: Mapping[str, Sequence[tuple[str, int, str]]], target: Mapping[str, Sequence[tuple[str, int, str]]]
) -> list[str]:
    """
    What differs between two accounts' folders, one text per folder that
    differs (empty when they are equal).

    @param source: per folder (C{/} between levels), the fingerprint, size
        and system flags of each message.
    """
    differences = []
    for folder in sorted(set(source) | set(target)):
        if folder not in target:
            differences.append(f"folder {folder!r}: missing on the target ({len(source[folder])} messages)")
            continue
        if folder not in source:
            differences.append(f"folder {folder!r}: only on the target ({len(target[folder])} messages)")
            continue
        before = Counter(key for key, _, _ in source[folder])
        after = Counter(key for key, _, _ in target[folder])
        missing = sum((before - after).values())
        surplus = after - before
        copies = sum(count for key, count in surplus.items() if key in before)
        extra = sum(surplus.values()) - copies
        parts = []
        if missing:
            parts.append(f"{missing} missing on the target")
        if extra:
            parts.append(f"{extra} only on the target")
        if copies:
            parts.append(f"{copies} copied twice on the target")
        if not parts:
            flagged = Counter((key, flags) for key, _, flags in source[folder])
            other = sum((flagged - Counter((key, flags) for key, _, flags in target[folder])).values())
            if other:
                parts.append(f"{other} with other flags on the target")
        if parts:
            differences.append(
                f"folder {folder!r}: {', '.join(parts)} (source {sum(before.values())}, target {sum(after.values())} messages)"
            )
    return differences
