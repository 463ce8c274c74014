"""
The static router: a TOML route table file, re-read while the proxy runs.

The table (see C{examples/routes.toml})::

    default = "old"
    [domains]
    "example.org" = "old"
    [accounts]
    "alice@example.org" = "new"
    "carol@example.org" = { backend = "new", password = "s3cret", login_user = "carol" }

A login is looked up by account (the whole login name), then by domain (the
part after the last C{@}), then C{default}; all matching ignores case.  An
account that is only a backend name is I{located}: the backend judges the
password.  An account with a C{password} is I{authenticated} by the proxy,
which is what lets it offer digest mechanisms (CRAM-MD5, APOP) and rewrite the
login (C{login_password}, C{master}) safely.

Moving an account is one edit of the file: L{StaticRouter.startWatching}
notices it, or the service calls L{StaticRouter.reload} (on SIGHUP, say).  A
file that does not parse, half-written or wrong, leaves the previous table in
place, so an editor saving in place can never empty the routing.

Changes through L{IRouteStore} (a move) edit the file in a thread of their
own: however many entries change, the file is parsed, edited, validated and
written once, and the reactor only swaps the new table in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from attrs import field, frozen
from zope.interface import implementer

from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailproxy._blocking import ThreadRunner
from mailproxy._safetext import logQuote
from mailproxy.config import ConfigError, Table, parseTOML, readTOML, suggest
from mailproxy.interfaces import IReloadable, IRouter, IRouteStore, RouteStoreError
from mailproxy.model import Backend, Rejection, RejectionReason, Route, RouteRequest
from mailproxy._files import replaceFile
from mailproxy.routers._tomledit import EditError, deleteEntry, setEntries

__all__ = ["RouteRule", "RouteTable", "parseRouteTable", "loadRouteTable", "StaticRouter"]


@frozen
class RouteRule:
    """
    One entry of a route table.

    @ivar description: where the rule is written, e.g.
        C{"accounts['alice@example.org']"}, C{"domains['example.org']"} or
        C{"default"}.
    @ivar backend: where matching logins go.
    @ivar password: if set, the client must prove knowledge of it.
    @ivar loginUser: the user name to log in with on the backend.
    @ivar loginPassword: the password to log in with on the backend.
    @ivar master: log in with the backend's master user.
    """

    description: str
    backend: Backend
    password: bytes | None = field(default=None, repr=False)
    loginUser: str | None = None
    loginPassword: bytes | None = field(default=None, repr=False)
    master: bool = False

    def explain(self) -> str:
        """
        The rule and its backend, as a log line would show them.
        """
        return f"{self.description} -> {self.backend.name}"


@frozen
class RouteTable:
    """
    A parsed route table.

    @ivar accounts: account rules by lower-cased login name.
    @ivar domains: domain rules by lower-cased domain.
    @ivar default: the rule for everything else, if any.
    @ivar accountDomains: the domains of the accounts' names.
    @ivar entries: the rules' backends by L{IRouteStore} key (accounts,
        C{"@domain"}, C{"*"}), made with the table (in an edit's thread)
        so that listing them is a copy.
    """

    accounts: dict[str, RouteRule] = field(factory=dict, hash=False)
    domains: dict[str, RouteRule] = field(factory=dict, hash=False)
    default: RouteRule | None = None
    accountDomains: frozenset[str] = field(init=False, hash=False, repr=False)
    entries: dict[str, str] = field(init=False, hash=False, repr=False)

    def __attrs_post_init__(self) -> None:
        domains = frozenset(name.rpartition("@")[2] for name in self.accounts if "@" in name)
        object.__setattr__(self, "accountDomains", domains)
        entries = {name: rule.backend.name for name, rule in self.accounts.items()}
        entries.update({"@" + name: rule.backend.name for name, rule in self.domains.items()})
        if self.default is not None:
            entries["*"] = self.default.backend.name
        object.__setattr__(self, "entries", entries)

    def findRecipient(self, address: str) -> RouteRule | RejectionReason:
        """
        The rule for mail to C{address} (SMTP MX): account, then domain;
        never the default, which would make the proxy an open relay.

        @return: the rule, or why there is none: C{"unknown-user"} when the
            domain has accounts in the table but no entry of its own, else
            C{"not-local"}.
        """
        address = address.lower()
        rule = self.accounts.get(address)
        if rule is not None:
            return rule
        _, at, domain = address.rpartition("@")
        if at:
            rule = self.domains.get(domain)
            if rule is not None:
                return rule
            if domain in self.accountDomains:
                return "unknown-user"
        return "not-local"

    def find(self, user: str) -> RouteRule | None:
        """
        The rule for login name C{user}: account, then domain, then default.
        """
        user = user.lower()
        rule = self.accounts.get(user)
        if rule is None and "@" in user:
            rule = self.domains.get(user.rpartition("@")[2])
        if rule is None:
            rule = self.default
        return rule


_ACCOUNT_KEYS = ("backend", "password", "login_user", "login_password", "master")


def parseRouteTable(
    data: Mapping[str, object], path: str, backends: Mapping[str, Backend]
) -> RouteTable:
    """
    Validate parsed TOML as a route table.

    @param path: the file it came from, for messages.
    @param backends: the configured backends, by name.
    @raise ConfigError: naming the file and the key that is wrong.
    """
    root = Table(path, (), data, os.path.dirname(path))
    root.allow("default", "domains", "accounts")

    default = None
    if "default" in root:
        default = RouteRule("default", _backend(root, "default", backends))

    domains: dict[str, RouteRule] = {}
    domainTable = root.table("domains")
    if domainTable is not None:
        for name in domainTable.data:
            if not name or "@" in name:
                domainTable.fail(name, "must be a domain name, without @")
            _unique(domainTable, name, domains)
            rule = RouteRule(f"domains[{name!r}]", _backend(domainTable, name, backends))
            domains[name.lower()] = rule

    accounts: dict[str, RouteRule] = {}
    accountTable = root.table("accounts")
    if accountTable is not None:
        for name in accountTable.data:
            if not name:
                accountTable.fail(name, "must not be empty")
            _unique(accountTable, name, accounts)
            accounts[name.lower()] = _account(accountTable, name, backends)

    return RouteTable(accounts=accounts, domains=domains, default=default)


def _unique(table: Table, name: str, seen: Mapping[str, RouteRule]) -> None:
    if name.lower() in seen:
        other = seen[name.lower()].description
        table.fail(name, f"same entry as {other} (names are compared without case)")


def _backend(table: Table, name: str, backends: Mapping[str, Backend]) -> Backend:
    if name not in table:
        table.fail(name, "required")
    value = table.data[name]
    if not isinstance(value, str):
        table.fail(name, "must be a backend name (a string)")
    if value not in backends:
        configured = ", ".join(sorted(backends)) or "none"
        table.fail(name, f"unknown backend {value!r}; configured backends: {configured}{suggest(value, backends)}")
    return backends[value]


def _account(parent: Table, name: str, backends: Mapping[str, Backend]) -> RouteRule:
    description = f"accounts[{name!r}]"
    value = parent.data[name]
    if isinstance(value, str):
        return RouteRule(description, _backend(parent, name, backends))
    if not isinstance(value, dict):
        parent.fail(name, "must be a backend name or a table like { backend = ... }")
    table = parent.table(name)
    assert table is not None
    table.allow(*_ACCOUNT_KEYS)
    backend = _backend(table, "backend", backends)
    password = table.secret("password", None)
    loginPassword = table.secret("login_password", None)
    master = table.boolean("master", False)
    # Without a password check, a rewritten login would admit anyone who
    # knows the account name: the backend would never see the client's password.
    if loginPassword is not None and password is None:
        table.fail("login_password", "needs password (the proxy must check the client first)")
    if master:
        if password is None:
            table.fail("master", "needs password (the proxy must check the client first)")
        if backend.masterUser is None:
            table.fail("master", f"backend {backend.name!r} has no master_user")
    return RouteRule(
        description,
        backend,
        password=password,
        loginUser=table.string("login_user", None),
        loginPassword=loginPassword,
        master=master,
    )


def _tableAndName(key: str) -> tuple[str | None, str]:
    """
    Where an L{IRouteStore} key lives in the file: C{("accounts", name)},
    C{("domains", name)} or C{(None, "*")} for the default (the editor
    ignores the name there).
    """
    if key == "*":
        return None, key
    if key.startswith("@"):
        if len(key) == 1 or "@" in key[1:]:
            raise RouteStoreError(f"not a domain: {key!r}")
        return "domains", key[1:]
    if not key:
        raise RouteStoreError("an account name must not be empty")
    return "accounts", key


def loadRouteTable(path: str, backends: Mapping[str, Backend]) -> RouteTable:
    """
    Read and validate the route table file C{path}.

    @raise ConfigError: if it cannot be read, parsed or validated.
    """
    return parseRouteTable(readTOML(path), path, backends)


_Signature = tuple[int, int, int]

#: Seconds an edit of the route table file may take in its thread.
EDIT_TIMEOUT = 120.0


@implementer(IRouter, IReloadable, IRouteStore)
class StaticRouter:
    """
    Routes logins by a TOML route table file.

    Digest mechanisms (CRAM-MD5, APOP) send no password, only a proof of it,
    so the proxy can neither verify them nor log in to the backend unless the
    route table holds the account's C{password}.  Such a login for an account
    without one is refused with the same generic text as a wrong password
    (the reason goes to the log), so that clients cannot learn which
    accounts have a stored password.  An OAuth login (OAUTHBEARER,
    XOAUTH2) is routed without either: the backend validates the token.

    As an L{IRouteStore}, it changes the file itself: the one line of each
    entry is edited (comments and order stay), the result is validated, and
    the file is replaced atomically (see L{mailproxy.routers._tomledit}).
    This happens in a thread (given a reactor that has threads), one edit
    at a time; the changes' Deferred fires once the new table is in use.

    @ivar path: the absolute path of the route table.
    @ivar watchInterval: seconds between two looks at the file while
        watching; a changed file is read in the edits' thread.
    @ivar lastError: why the last reload failed, or L{None} if it worked.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        backends: Mapping[str, Backend],
        *,
        reactor: IReactorTime | None = None,
        watchInterval: float = 2.0,
        runner: Any = None,
    ) -> None:
        """
        Load the table now.

        @param backends: the configured backends, by name.
        @param reactor: the clock for L{startWatching}, and the threads for
            edits.
        @param runner: runs the edits of the file: anything with
            L{ThreadRunner}'s C{run(timeout, f, *args)}.  By default a
            L{ThreadRunner} of one thread if C{reactor} has threads; without
            one, edits run in the caller's thread.
        @raise ConfigError: if the table cannot be loaded.
        """
        self.path = os.path.abspath(path)
        self.watchInterval = watchInterval
        self.lastError: str | None = None
        self._backends = dict(backends)
        self._reactor = reactor
        self._watcher: LoopingCall | None = None
        if runner is None and IReactorThreads.providedBy(reactor):
            # One thread: edits happen one after the other, in order.
            runner = ThreadRunner(reactor, 1, "mailproxy-routes")
        self._runner = runner
        # Edits under way: the watcher leaves the file to them meanwhile.
        self._editing = 0
        # Taken before reading: a change made during the read is seen next time.
        self._signature = self._stat()
        self._table = loadRouteTable(self.path, self._backends)

    def route(self, request: RouteRequest) -> Route | Rejection:
        """
        Answer C{request} from the current table.
        """
        if request.lookup == "recipient" and request.rcptTo is not None:
            return self._routeRecipient(request.rcptTo, request.port)
        credentials = request.credentials
        user = credentials.user if credentials is not None else ""
        rule = self._table.find(user)
        if rule is None:
            self.log.info("No route for {user}", user=logQuote(user))
            return Rejection(unknown=True)
        # An OAuth token: the table cannot judge it, the backend does
        # (pass-through), so the route gives neither a password nor the
        # master user, which would log in whoever named the account.
        oauth = credentials is not None and credentials.token is not None
        digest = credentials is not None and credentials.password is None and not oauth
        if oauth:
            pass
        elif rule.password is not None:
            if credentials is None or not credentials.check(rule.password):
                self.log.info("Wrong password for {user} ({rule})", user=logQuote(user), rule=rule.description)
                return Rejection()
        elif digest:
            assert credentials is not None
            self.log.warn(
                "{mechanism} login for {user} refused: {rule} has no password to check it against",
                mechanism=credentials.mechanism,
                user=logQuote(user),
                rule=rule.description,
            )
            return Rejection()
        if request.port not in rule.backend.ports:
            self.log.error(
                "{rule} sends {user} to backend {backend}, which has no {port} port",
                rule=rule.description,
                user=logQuote(user),
                backend=rule.backend.name,
                port=request.port,
            )
            return Rejection(message="Service temporarily unavailable.", temporary=True)
        password = rule.loginPassword
        if password is None and digest:
            password = rule.password
        return Route(
            backend=rule.backend,
            user=rule.loginUser,
            password=None if oauth else password,
            useMaster=rule.master and not oauth,
            authenticated=rule.password is not None and not oauth,
            rule=rule.explain(),
        )

    def _routeRecipient(self, address: str, port: str) -> Route | Rejection:
        found = self._table.findRecipient(address)
        if isinstance(found, str):
            self.log.info("No route for recipient {recipient}: {reason}", recipient=logQuote(address), reason=found)
            return Rejection(message="Recipient refused.", unknown=True, reason=found)
        if port not in found.backend.ports:
            self.log.error(
                "{rule} sends mail for {recipient} to backend {backend}, which has no {port} port",
                rule=found.description,
                recipient=logQuote(address),
                backend=found.backend.name,
                port=port,
            )
            return Rejection(message="Service temporarily unavailable.", temporary=True)
        return Route(backend=found.backend, rule=found.explain())

    def explain(self, user: str) -> str:
        """
        Which rule the current table applies to login name C{user}, e.g.
        C{"accounts['alice@example.org'] -> new"}, C{"default -> old"} or
        C{"no rule"}.
        """
        rule = self._table.find(user)
        return "no rule" if rule is None else rule.explain()

    def explainRoute(self, user: str) -> tuple[str, str] | None:
        """
        The rule the current table applies to login name C{user} and its
        backend's name, or L{None} if no rule matches.
        """
        rule = self._table.find(user)
        return None if rule is None else (rule.description, rule.backend.name)

    def routes(self) -> dict[str, str]:
        """
        The entries of the current table: accounts by name, domains as
        C{"@domain"}, the default as C{"*"}; values are backend names.
        """
        return dict(self._table.entries)

    def setRoute(self, key: str, backend: str) -> Deferred[None]:
        """
        Route C{key} (see L{routes}) to C{backend} by editing the file; an
        account's other settings stay as they are.

        @raise RouteStoreError: (maybe in the Deferred) an unknown backend,
            or a file that cannot be edited or written.
        """
        return self.setRoutes({key: backend})

    def setRoutes(self, changes: Mapping[str, str]) -> Deferred[None]:
        """
        Like L{setRoute} for several keys, written to the file at once: all
        of the changes happen or none does.
        """
        for backend in changes.values():
            if backend not in self._backends:
                configured = ", ".join(sorted(self._backends)) or "none"
                raise RouteStoreError(f"unknown backend {backend!r}; configured backends: {configured}")
        edits = [(*_tableAndName(key), backend) for key, backend in changes.items()]
        return self._edit(lambda text: setEntries(text, edits))

    def deleteRoute(self, key: str) -> Deferred[None]:
        """
        Remove the entry for C{key} (see L{routes}) from the file.

        @raise RouteStoreError: (maybe in the Deferred) no such entry, or a
            file that cannot be edited or written.
        """
        table, name = _tableAndName(key)
        return self._edit(lambda text: (deleteEntry(text, table, name), None))

    def _edit(self, change: Callable[[str], tuple[str, Mapping[str, object] | None]]) -> Deferred[None]:
        """
        Edit the file with C{change} (given its text, the new text and, if
        known, what that parses to) in the runner's thread, then use the
        new table.
        """
        def install(edited: tuple[_Signature | None, RouteTable]) -> None:
            self._signature, table = edited
            self._install(table)

        def done(result: object) -> object:
            self._editing -= 1
            return result

        def timedOut(reason: Any) -> None:
            reason.trap(TimeoutError)
            raise RouteStoreError(
                f"{self.path}: the edit did not finish within {EDIT_TIMEOUT:g} s; "
                "it may still take effect (see the routes)"
            )

        self._editing += 1
        try:
            if self._runner is None:
                editing = maybeDeferred(self._editFile, change)
            else:
                editing = self._runner.run(EDIT_TIMEOUT, self._editFile, change)
        except BaseException:
            self._editing -= 1
            raise
        return editing.addCallback(install).addErrback(timedOut).addBoth(done)

    def _editFile(
        self, change: Callable[[str], tuple[str, Mapping[str, object] | None]]
    ) -> tuple[_Signature | None, RouteTable]:
        """
        Read, change, validate and replace the file (in the runner's
        thread: this touches nothing of the router's but its path and
        backends).

        @return: the file's new signature and table.
        """
        try:
            with open(self.path, "rb") as f:
                text = f.read().decode("utf-8")
            changed, data = change(text)
            if data is None:
                data = parseTOML(changed, self.path)
            table = parseRouteTable(data, self.path, self._backends)
            replaceFile(self.path, changed)
        except EditError as e:
            raise RouteStoreError(f"{self.path}: {e}") from None
        except ConfigError as e:
            # Its problems name the file already.
            raise RouteStoreError(str(e)) from None
        except (OSError, UnicodeDecodeError) as e:
            raise RouteStoreError(f"{self.path}: cannot rewrite: {e}") from None
        return self._stat(), table

    def close(self) -> None:
        """
        This router is no longer used (a reload replaced it): the edit
        thread stops once an edit under way is done.
        """
        close = getattr(self._runner, "close", None)
        if close is not None:
            close()

    def reload(self) -> None:
        """
        Re-read the table; if it is unreadable or wrong, keep the previous one
        and log why.
        """
        self._loaded(self._load())

    def _load(self) -> tuple[_Signature | None, RouteTable | ConfigError]:
        """
        Read the file (in the runner's thread, for the watcher): its
        signature, taken before reading (a change made during the read is
        seen next time), and its table or why it has none.
        """
        signature = self._stat()
        try:
            return signature, loadRouteTable(self.path, self._backends)
        except ConfigError as e:
            return signature, e

    def _loaded(self, loaded: tuple[_Signature | None, RouteTable | ConfigError]) -> None:
        """
        Use what L{_load} read, or keep the previous table and log why.
        """
        self._signature, table = loaded
        if isinstance(table, ConfigError):
            self.lastError = str(table)
            self.log.error("Keeping the previous route table: {error}", error=str(table))
        else:
            self._install(table)

    def _install(self, table: RouteTable) -> None:
        """
        Route by C{table} from now on.
        """
        self._table = table
        self.lastError = None
        self.log.info(
            "Loaded route table {path}: {accounts} accounts, {domains} domains, default {default}",
            path=self.path,
            accounts=len(table.accounts),
            domains=len(table.domains),
            default=table.default.backend.name if table.default else None,
        )

    def startWatching(self) -> None:
        """
        Look at the file every L{watchInterval} seconds and reload it when its
        modification time, size or inode (a replacing rename) changed.

        @raise RuntimeError: if no reactor was given.
        """
        if self._watcher is not None:
            return
        if self._reactor is None:
            raise RuntimeError("StaticRouter needs a reactor to watch its file")
        self._watcher = LoopingCall(self._poll)
        self._watcher.clock = self._reactor
        self._watcher.start(self.watchInterval, now=False)

    def stopWatching(self) -> None:
        """
        Stop looking at the file.
        """
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def _poll(self) -> None:
        if self._editing:
            # An edit installs its own table and the file's new signature
            # (or a load under way its own).
            return
        signature = self._stat()
        if signature == self._signature:
            return
        if signature is None:
            self._signature = None
            self.log.error("Route table {path} is gone; keeping the previous table", path=self.path)
            return
        if self._runner is None:
            self.reload()
            return
        # A large table takes a while to parse: not on the reactor.
        self._editing += 1

        def done(result: object) -> None:
            self._editing -= 1
            if isinstance(result, Failure):
                # Timed out: the next look tries again.
                self.log.failure("Reading route table {path} failed", result, path=self.path)

        self._runner.run(EDIT_TIMEOUT, self._load).addCallback(self._loaded).addBoth(done)

    def _stat(self) -> _Signature | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return (info.st_ino, info.st_size, info.st_mtime_ns)
