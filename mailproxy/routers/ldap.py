"""
The LDAP router: the directory says where each account lives.

    [router]
    type = "ldap"
    servers = ["ldap://ldap1.internal", "ldap://ldap2.internal"]
    start_tls = true
    ca_file = "internal-ca.pem"
    bind_dn = "cn=mailproxy,dc=example,dc=org"
    bind_password_file = "ldap.secret"
    base = "ou=people,dc=example,dc=org"
    filter = "(&(objectClass=inetLocalMailRecipient)(mail={user}))"
    backend_attribute = "mailHost"
    auth = "bind"

One search finds the account's entry (C{{user}}, C{{local}} and C{{domain}}
in the filter are the login name, the part before its last C{@} and the
part after it, escaped per RFC 4515); the value of C{backend_attribute} is a
configured backend's name or C{host[:port]}; C{user_attribute} names the
login for the backend.  The password is checked by binding as the entry
(C{auth = "bind"}), by comparing with a stored cleartext password
(C{auth = "compare"}, which also serves CRAM-MD5 and APOP), or not at all
(C{auth = "none"}: the backend judges it).

ldap3 blocks, so every directory operation runs in a bounded pool of
threads (C{pool_size}), each with its own connections, re-made after any
error; servers are tried in order.  A directory that does not answer within
C{connect_timeout}/C{timeout} gives a temporary failure (IMAP
C{NO [UNAVAILABLE]}), never a hang.
"""

from __future__ import annotations

import math
import ssl
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attrs import field, frozen
from zope.interface import implementer

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailproxy._blocking import PerThread, ThreadRunner, closeRunner
from mailproxy._safetext import logQuote
from mailproxy.config import Table, readNameAndSecret, suggest
from mailproxy.interfaces import IRouter, RouteStoreError
from mailproxy.model import Backend, Rejection, Route, RouteRequest
from mailproxy.routers._backends import BackendResolver, UnusableBackend, lookedUp, parseBackendDefaults

__all__ = [
    "FILTER_FIELDS",
    "AUTH_MODES",
    "escapeFilterValue",
    "FilterTemplate",
    "LDAPSettings",
    "DirectoryEntry",
    "DirectoryUnavailable",
    "LDAPDirectory",
    "LDAPRouter",
    "buildLDAPRouter",
]

FILTER_FIELDS = ("user", "local", "domain")
"""
The placeholders a filter template may use.
"""

AUTH_MODES = ("bind", "compare", "none")
"""
The values of C{auth}.
"""

_SCOPES = ("sub", "one", "base")
_UNAVAILABLE = "Service temporarily unavailable, try again later."
# Bind results that mean "these credentials do not get in", as opposed to a
# directory in trouble: invalidCredentials, inappropriateAuthentication,
# insufficientAccessRights, unwillingToPerform, constraintViolation
# (password policy lockout).
_REFUSED_BIND = frozenset({49, 48, 50, 53, 19})
_SIZE_LIMIT_EXCEEDED = 4
_PASSWORD_SCHEMES = (b"{CLEARTEXT}", b"{PLAIN}")


def escapeFilterValue(value: str) -> str:
    """
    Escape C{value} for use as an assertion value in an LDAP filter
    (RFC 4515 section 3): C{\\}, C{*}, C{(}, C{)} and NUL become C{\\XX}.

    Text that came from bytes that are not UTF-8 (kept as surrogates) has
    every non-ASCII byte escaped, so it reaches the directory unchanged.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogateescape")
        return "".join(
            chr(byte) if byte < 0x80 and byte not in b"\\*()\x00" else f"\\{byte:02x}" for byte in raw
        )
    return "".join(f"\\{ord(c):02x}" if c in "\\*()\x00" else c for c in value)


@frozen
class FilterTemplate:
    """
    A search filter with C{{user}}, C{{local}} and C{{domain}} placeholders.
    """

    template: str

    @classmethod
    def check(cls, template: str) -> FilterTemplate:
        """
        Validate C{template}.

        @raise ValueError: a placeholder is unknown or formatted, or the
            result is no LDAP filter.
        """
        for _, name, spec, conversion in string.Formatter().parse(template):
            if name is None:
                continue
            if name not in FILTER_FIELDS:
                raise ValueError(f"unknown placeholder {{{name}}}; use {', '.join('{' + f + '}' for f in FILTER_FIELDS)}")
            if spec or conversion:
                raise ValueError(f"placeholder {{{name}}} must be written without format or conversion")
        filled = cls(template).fill("someone@example.org")
        if not (filled.startswith("(") and filled.endswith(")")):
            raise ValueError("an LDAP filter is enclosed in parentheses")
        depth = 0
        for c in filled:
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth < 0:
                break
        if depth != 0:
            raise ValueError("unbalanced parentheses")
        return cls(template)

    def fill(self, user: str) -> str:
        """
        The filter for login name C{user}, every value escaped.
        """
        local, at, domain = user.rpartition("@")
        if not at:
            local, domain = user, ""
        return self.template.format(
            user=escapeFilterValue(user),
            local=escapeFilterValue(local),
            domain=escapeFilterValue(domain),
        )


@frozen
class LDAPSettings:
    """
    How to reach and read the directory.

    @ivar servers: C{ldap://} or C{ldaps://} URLs, tried in order.
    @ivar startTLS: send StartTLS on C{ldap://} connections (and require it).
    @ivar caFile: CA certificates to verify the servers with (else the
        system's).
    @ivar verify: verify the servers' certificates and names.
    @ivar bindDN: the service account that searches; L{None} is anonymous.
    @ivar bindPassword: its password.
    @ivar base: the search base.
    @ivar scope: C{"sub"}, C{"one"} or C{"base"}.
    @ivar attributes: the attributes to read (routing, user, password).
    @ivar connectTimeout: seconds to connect to one server.
    @ivar timeout: seconds to wait for one answer.
    """

    servers: tuple[str, ...]
    base: str
    startTLS: bool = False
    caFile: str | None = None
    verify: bool = True
    bindDN: str | None = None
    bindPassword: bytes | None = field(default=None, repr=False)
    scope: str = "sub"
    backendAttribute: str | None = None
    userAttribute: str | None = None
    passwordAttribute: str | None = None
    connectTimeout: float = 3.0
    timeout: float = 5.0


@frozen
class DirectoryEntry:
    """
    What the directory says about one account.

    @ivar backend: the first value of the backend attribute.
    @ivar user: the first value of the user attribute.
    @ivar password: the first value of the password attribute, raw.
    """

    dn: str
    backend: str | None = None
    user: str | None = None
    password: bytes | None = field(default=None, repr=False)


class DirectoryUnavailable(Exception):
    """
    No directory server could answer; the text says why (without secrets).
    """


class LDAPDirectory:
    """
    The blocking half: searches and binds with ldap3, called in pool
    threads.  Each thread keeps a connection bound as the service account
    for searches and one for checking users' passwords.
    """

    log = Logger()

    def __init__(self, settings: LDAPSettings, *, connectionFactory: Any = None, serverFactory: Any = None) -> None:
        """
        @param connectionFactory: C{ldap3.Connection} unless given (tests
            give a mock strategy).
        @param serverFactory: C{ldap3.Server} unless given.
        """
        import ldap3  # type: ignore[import-untyped]

        self.settings = settings
        self._ldap3 = ldap3
        self._connectionFactory = connectionFactory or ldap3.Connection
        serverFactory = serverFactory or ldap3.Server
        tls = None
        if settings.startTLS or any(url.lower().startswith("ldaps://") for url in settings.servers):
            # ldap3 checks the server's name itself after the handshake
            # (against the host in the URL).
            tls = ldap3.Tls(
                validate=ssl.CERT_REQUIRED if settings.verify else ssl.CERT_NONE,
                ca_certs_file=settings.caFile,
                version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self._serverFactory = serverFactory
        self._tls = tls
        self._preferred = 0
        self._service: PerThread[Any] = PerThread(self._serviceConnection, self._close)
        self._users: PerThread[Any] = PerThread(lambda: self._open(None, None), self._close)

    def find(self, search: str) -> list[DirectoryEntry]:
        """
        The entries matching C{search} (at most two are read: more than one
        is an ambiguity the caller refuses).

        @raise DirectoryUnavailable: no server answered.
        """
        settings = self.settings
        attributes = [
            a for a in (settings.backendAttribute, settings.userAttribute, settings.passwordAttribute) if a
        ]
        scope = {"sub": self._ldap3.SUBTREE, "one": self._ldap3.LEVEL, "base": self._ldap3.BASE}[settings.scope]
        for attempt in (1, 2):
            connection = None
            try:
                connection = self._service.get()
                connection.search(
                    settings.base,
                    search,
                    search_scope=scope,
                    attributes=attributes or [self._ldap3.NO_ATTRIBUTES],
                    size_limit=2,
                    time_limit=max(1, int(settings.timeout)),
                )
            except self._ldap3.core.exceptions.LDAPException as e:
                self._service.discard()
                if attempt == 2:
                    raise DirectoryUnavailable(f"search failed: {_describe(e)}") from None
                continue
            result = connection.result or {}
            code = result.get("result", 0)
            if code not in (0, _SIZE_LIMIT_EXCEEDED, 32):  # 32: noSuchObject (no base)
                self._service.discard()
                if attempt == 2:
                    raise DirectoryUnavailable(f"search failed: {result.get('description')} ({code})")
                continue
            entries = [self._entry(item) for item in connection.response or () if item.get("type") == "searchResEntry"]
            if code == _SIZE_LIMIT_EXCEEDED and len(entries) < 2:
                entries.append(DirectoryEntry(dn="(more entries)"))
            return entries
        raise AssertionError("unreachable")

    def checkPassword(self, dn: str, password: bytes) -> bool:
        """
        Whether binding as C{dn} with C{password} works.

        @raise DirectoryUnavailable: no server answered.
        """
        if not password:
            # An empty password is an unauthenticated bind (RFC 4513 5.1.2),
            # which many servers answer with success.
            return False
        try:
            password.decode("utf-8")
        except UnicodeDecodeError:
            # ldap3 makes the password text on its way out and fails on
            # one that is not UTF-8 (a client sending Latin-1): wrong, as
            # it would be for the directory, not a directory outage.
            return False
        for attempt in (1, 2):
            try:
                connection = self._users.get()
                connection.user = dn
                connection.password = password
                connection.authentication = self._ldap3.SIMPLE
                try:
                    bound = connection.bind(read_server_info=False)
                finally:
                    connection.password = None
            except self._ldap3.core.exceptions.LDAPException as e:
                self._users.discard()
                if attempt == 2:
                    raise DirectoryUnavailable(f"bind failed: {_describe(e)}") from None
                continue
            if bound:
                return True
            code = (connection.result or {}).get("result")
            if code in _REFUSED_BIND:
                return False
            self._users.discard()
            if attempt == 2:
                raise DirectoryUnavailable(f"bind failed: {(connection.result or {}).get('description')} ({code})")
        raise AssertionError("unreachable")

    def close(self) -> None:
        """
        Close every thread's connections (the pool has stopped).
        """
        self._service.closeAll()
        self._users.closeAll()

    def _entry(self, item: Mapping[str, Any]) -> DirectoryEntry:
        raw = item.get("raw_attributes") or {}
        settings = self.settings

        def first(attribute: str | None) -> bytes | None:
            if attribute is None:
                return None
            for name, values in raw.items():
                if name.lower() == attribute.lower() and values:
                    return values[0]  # type: ignore[no-any-return]
            return None

        backend, user = first(settings.backendAttribute), first(settings.userAttribute)
        return DirectoryEntry(
            dn=item.get("dn", ""),
            backend=backend.decode("utf-8", "replace") if backend is not None else None,
            user=user.decode("utf-8", "surrogateescape") if user is not None else None,
            password=first(settings.passwordAttribute),
        )

    def _serviceConnection(self) -> Any:
        return self._open(self.settings.bindDN, self.settings.bindPassword)

    def _open(self, user: str | None, password: bytes | None) -> Any:
        """
        A connection to the first server that answers, started with TLS if
        configured and bound as C{user} (anonymous when L{None}).
        """
        settings = self.settings
        problems = []
        count = len(settings.servers)
        for offset in range(count):
            index = (self._preferred + offset) % count
            # A new Server each time: ldap3 remembers an address that failed
            # as unusable, which would outlive a directory's restart.
            server = self._serverFactory(
                settings.servers[index],
                connect_timeout=settings.connectTimeout,
                tls=self._tls,
                get_info=self._ldap3.NONE,
            )
            connection = self._connectionFactory(
                server,
                user=user,
                password=password,
                authentication=self._ldap3.SIMPLE if user else self._ldap3.ANONYMOUS,
                raise_exceptions=False,
                # ldap3 packs it into SO_RCVTIMEO: whole seconds only.
                receive_timeout=max(1, math.ceil(settings.timeout)),
                read_only=True,
                auto_referrals=False,
            )
            try:
                connection.open(read_server_info=False)
                if settings.startTLS and not server.ssl:
                    if not connection.start_tls(read_server_info=False):
                        raise DirectoryUnavailable(f"StartTLS refused: {(connection.result or {}).get('description')}")
                if user is not None and not connection.bind(read_server_info=False):
                    raise DirectoryUnavailable(
                        f"service bind as {user!r} failed: {(connection.result or {}).get('description')}"
                    )
            except (self._ldap3.core.exceptions.LDAPException, DirectoryUnavailable, OSError) as e:
                problems.append(f"{server.name}: {_describe(e)}")
                self._close(connection)
                continue
            self._preferred = index
            return connection
        raise DirectoryUnavailable("; ".join(problems))

    @staticmethod
    def _close(connection: Any) -> None:
        try:
            connection.unbind()
        except Exception:
            pass


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@implementer(IRouter)
class LDAPRouter:
    """
    Routes (and authenticates) logins with an LDAP directory (see the
    module docstring).

    @ivar auth: C{"bind"}, C{"compare"} or C{"none"}.
    """

    log = Logger()

    def __init__(
        self,
        directory: Any,
        filter: FilterTemplate,
        resolver: BackendResolver,
        *,
        runner: Any,
        auth: str = "bind",
        defaultBackend: str | None = None,
        deadline: float = 15.0,
    ) -> None:
        """
        @param directory: an L{LDAPDirectory} (or a test double with the
            same C{find} and C{checkPassword}).
        @param runner: runs C{directory}'s blocking calls: a
            L{ThreadRunner}, or anything with its C{run(timeout, f, *args)}.
        @param defaultBackend: a configured backend's name for entries
            without the backend attribute.
        @param deadline: seconds one directory call may take in all.
        """
        if auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {', '.join(AUTH_MODES)}")
        self.directory = directory
        self.filter = filter
        self.resolver = resolver
        self.auth = auth
        self.defaultBackend = defaultBackend
        self._runner = runner
        self._deadline = deadline

    def close(self) -> None:
        """
        This router is no longer used (a reload replaced it): its threads
        stop and its connections close once the lookups under way are done.
        """
        closeRunner(self._runner)

    @property
    def explainRoute(self) -> Callable[[str], Deferred[tuple[str, str | None] | None]] | None:
        """
        With C{auth = "none"} the entry alone decides the route, so
        C{route explain} and C{check --probe} can show it without a
        password (L{_explainEntry}); with C{bind} or C{compare} the password
        decides too, and there is nothing to explain before a login
        (L{None}: those commands say so).
        """
        return self._explainEntry if self.auth == "none" else None

    def _explainEntry(self, user: str) -> Deferred[tuple[str, str | None] | None]:
        """
        What the directory says about login name C{user}: C{("ldap DN",
        backend)}, a rule saying why logins are refused (with no backend),
        or L{None} for no entry.

        @raise RouteStoreError: (in the Deferred) no server answered.
        """

        async def explain() -> tuple[str, str | None] | None:
            try:
                entries = await self._runner.run(self._deadline, self.directory.find, self.filter.fill(user))
            except Exception as e:
                raise RouteStoreError(f"LDAP: the search failed: {_describe(e)}") from None
            if not entries:
                return None
            if len(entries) > 1:
                return "ldap: more than one entry (logins are refused)", None
            entry: DirectoryEntry = entries[0]
            backend = entry.backend or self.defaultBackend
            if backend is None:
                return f"ldap {entry.dn}: no backend attribute and no default_backend (logins are refused)", None
            return f"ldap {entry.dn}", backend

        return Deferred.fromCoroutine(explain())

    def probe(self, user: str) -> Deferred[str]:
        """
        Search C{user}'s entry as a login would, with the service account,
        checking no password: for C{mailproxy check --probe}.

        @return: fires with what the directory answered, in words; fails
            with L{DirectoryUnavailable} if no server answered.
        """

        async def search() -> str:
            entries = await self._runner.run(self._deadline, self.directory.find, self.filter.fill(user))
            count = len(entries)
            return f"the directory answers: {count} entr{'y' if count == 1 else 'ies'} for {user}"

        return Deferred.fromCoroutine(search())

    def route(self, request: RouteRequest) -> Deferred[Route | Rejection]:
        """
        Look the login up, check its password, and route it.
        """
        return Deferred.fromCoroutine(self._route(request))

    async def _route(self, request: RouteRequest) -> Route | Rejection:
        credentials = request.credentials if request.lookup == "login" else None
        user = lookedUp(request)
        try:
            entries = await self._runner.run(self._deadline, self.directory.find, self.filter.fill(user))
        except Exception as e:
            return self._unavailable(user, e)
        if not entries:
            self.log.info("LDAP: no entry for {user}", user=logQuote(user))
            return Rejection(unknown=True)
        if len(entries) > 1:
            self.log.error("LDAP: more than one entry for {user}; refusing", user=logQuote(user))
            return Rejection()
        entry: DirectoryEntry = entries[0]
        authenticated = False
        if credentials is not None and self.auth == "bind":
            if credentials.password is None:
                self.log.warn(
                    "LDAP: {mechanism} login for {user} refused: auth = \"bind\" needs the cleartext password",
                    mechanism=credentials.mechanism,
                    user=logQuote(user),
                )
                return Rejection()
            try:
                good = await self._runner.run(self._deadline, self.directory.checkPassword, entry.dn, credentials.password)
            except Exception as e:
                return self._unavailable(user, e)
            if not good:
                self.log.info("LDAP: wrong password for {user} ({dn})", user=logQuote(user), dn=logQuote(entry.dn))
                return Rejection()
            authenticated = True
        password = None
        if credentials is not None and self.auth == "compare":
            secret = _cleartext(entry.password)
            if secret is None:
                self.log.error(
                    "LDAP: {dn} has no usable cleartext password attribute; refusing {user}", dn=logQuote(entry.dn), user=logQuote(user)
                )
                return Rejection()
            if not credentials.check(secret):
                self.log.info("LDAP: wrong password for {user} ({dn})", user=logQuote(user), dn=logQuote(entry.dn))
                return Rejection()
            authenticated = True
            if credentials.password is None:
                password = secret
        if credentials is not None and self.auth == "none" and credentials.password is None:
            self.log.warn(
                "LDAP: {mechanism} login for {user} refused: auth = \"none\" cannot check it",
                mechanism=credentials.mechanism,
                user=logQuote(user),
            )
            return Rejection()
        try:
            backend = self._backend(entry, request.port)
        except UnusableBackend as e:
            self.log.error(
                "LDAP: {dn} routes {user} nowhere: {problem}", dn=logQuote(entry.dn), user=logQuote(user), problem=logQuote(str(e))
            )
            return Rejection(_UNAVAILABLE, temporary=True)
        return Route(
            backend=backend,
            user=entry.user,
            password=password,
            authenticated=authenticated,
            rule=f"ldap {entry.dn} -> {backend.name}",
        )

    def _backend(self, entry: DirectoryEntry, protocol: str) -> Backend:
        if entry.backend is not None:
            return self.resolver.resolve(entry.backend, protocol)
        if self.defaultBackend is not None:
            return self.resolver.named(self.defaultBackend, protocol)
        raise UnusableBackend("the entry has no backend attribute and there is no default_backend")

    def _unavailable(self, user: str, error: Exception) -> Rejection:
        self.log.error("LDAP: directory unavailable for {user}: {error}", user=logQuote(user), error=logQuote(_describe(error)))
        return Rejection(_UNAVAILABLE, temporary=True)


def _cleartext(value: bytes | None) -> bytes | None:
    """
    A stored password as cleartext: as is, or after a C{{CLEARTEXT}} or
    C{{PLAIN}} scheme prefix; L{None} for hashed ones.
    """
    if not value:
        return None
    if value.startswith(b"{"):
        for scheme in _PASSWORD_SCHEMES:
            if value.upper().startswith(scheme):
                return value[len(scheme) :] or None
        return None
    return value


def buildLDAPRouter(options: Table, backends: Mapping[str, Backend], reactor: Any) -> LDAPRouter:
    """
    Make an L{LDAPRouter} from its C{[router]} options.

    @raise mailproxy.config.ConfigError: naming the key that is wrong.
    """
    options.allow(
        "servers",
        "start_tls",
        "ca_file",
        "verify",
        "bind_dn",
        "bind_password_file",
        "base",
        "scope",
        "filter",
        "backend_attribute",
        "default_backend",
        "user_attribute",
        "auth",
        "password_attribute",
        "pool_size",
        "connect_timeout",
        "timeout",
        "backend_defaults",
    )
    servers: Sequence[str] = options.strings("servers")
    # Options read with collect: a wrong one is noted and the others still
    # read (when the configuration's problems are gathered, as for check).
    startTLS = options.collect(lambda: options.boolean("start_tls", False), False)
    for url in servers:
        lowered = url.lower()
        if not lowered.startswith(("ldap://", "ldaps://")) or len(url.split("://", 1)[1].strip("/")) == 0:
            options.fail("servers", f"{url!r} is not an ldap:// or ldaps:// URL with a host")
        if startTLS and lowered.startswith("ldaps://"):
            options.fail("start_tls", f"{url!r} is ldaps:// (TLS from the start); start_tls is for ldap://")
    bindDN, bindPassword = readNameAndSecret(options, "bind_dn", "bind_password_file")
    try:
        template = FilterTemplate.check(options.string("filter", "(mail={user})"))
    except ValueError as e:
        options.fail("filter", str(e))
    auth = options.collect(lambda: options.string("auth", "bind", AUTH_MODES), "bind")
    passwordAttribute = None
    if auth == "compare":
        passwordAttribute = options.string("password_attribute", "userPassword")
    elif "password_attribute" in options:
        options.fail("password_attribute", 'only used with auth = "compare"')
    backendAttribute = options.string("backend_attribute", None)
    defaultBackend = options.string("default_backend", None)
    if backendAttribute is None and defaultBackend is None:
        options.fail("backend_attribute", "required (or default_backend)")
    if defaultBackend is not None and defaultBackend not in backends:
        configured = ", ".join(sorted(backends)) or "none"
        options.fail(
            "default_backend",
            f"unknown backend {defaultBackend!r}; configured backends: {configured}{suggest(defaultBackend, backends)}",
        )
    connectTimeout = options.collect(lambda: options.number("connect_timeout", 3.0, positive=True), 3.0)
    timeout = options.collect(lambda: options.number("timeout", 5.0, positive=True), 5.0)
    settings = LDAPSettings(
        servers=tuple(servers),
        base=options.collect(lambda: options.string("base"), ""),
        startTLS=startTLS,
        caFile=options.collect(lambda: options.path("ca_file", None), None),
        verify=options.collect(lambda: options.boolean("verify", True), True),
        bindDN=bindDN,
        bindPassword=bindPassword,
        scope=options.collect(lambda: options.string("scope", "sub", _SCOPES), "sub"),
        backendAttribute=backendAttribute,
        userAttribute=options.collect(lambda: options.string("user_attribute", None), None),
        passwordAttribute=passwordAttribute,
        connectTimeout=connectTimeout,
        timeout=timeout,
    )
    poolSize = options.collect(lambda: options.integer("pool_size", 4, 1, 64), 4)
    try:
        directory = LDAPDirectory(settings)
    except ImportError:
        options.fail(None, "the ldap router needs the ldap3 package (pip install ldap3)")
    runner = ThreadRunner(reactor, poolSize, "mailproxy-ldap")
    runner.whenStopping(directory.close)
    # Each of the two tries may try every server, then wait for answers.
    deadline = 2 * (connectTimeout * len(servers) + 2 * timeout) + 1
    return LDAPRouter(
        directory,
        template,
        BackendResolver(backends, parseBackendDefaults(options.tableOrEmpty("backend_defaults"))),
        runner=runner,
        auth=auth,
        defaultBackend=defaultBackend,
        deadline=deadline,
    )
