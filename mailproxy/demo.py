"""
The newcomer's first run: C{mailproxy demo}.

It starts the proxy, with a freshly generated self-signed certificate, in
front of two small built-in IMAP servers ("old" and "new") on loopback
ports, with its management endpoint and a freshly generated token, writes
the configuration it runs from into a directory, and prints how to try it
with real clients and operate it with C{mailproxy move}, C{route explain},
C{sessions} and C{/metrics}. The account C{alice@example.org} is routed
to "old" and C{bob@example.org} to "new"; both servers hold both accounts,
each INBOX seeded with a message that says which server it lives on, so what
a client reads shows where the route table sent it.

The demo servers are a fixture, not a product: L{twisted.mail.imap4}'s
L{IMAP4Server} over an in-memory account. Its quirks, and what this module
does about them:

  - it does not implement IMAP ID (an ID command gets C{BAD}), so the demo
    backends are configured with C{forward = "none"};
  - its idle timeout (L{TimeoutMixin}) and its FETCH scheduler use the
    global reactor unless given others, so L{DemoStoreFactory} injects both;
  - it hands the LOGIN user name to the checker as bytes, exactly as sent;
  - the mailbox must resolve C{*} in a message set itself (by setting
    L{MessageSet.last}) before it can test membership;
  - L{MemoryAccount} upper-cases mailbox names, so folders created over the
    demo come back in capitals;
  - a SEARCH without L{ISearchableIMAPMailbox} over more than five messages
    continues on the global reactor; the demo mailboxes are small.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import hmac
import io
import json
import os
import secrets
import shlex
import shutil
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

from attrs import define, field, frozen
from zope.interface import implementer

from twisted.application.service import IService, MultiService
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Cooperator
from twisted.mail import imap4
from twisted.mail.interfaces import (
    IAccountIMAP,
    ICloseableMailboxIMAP,
    IMailboxIMAP,
    IMessageIMAP,
    IMessageIMAPFile,
)

from mailproxy._tls import makeSelfSigned
from mailproxy.config import loadConfig
from mailproxy.tap import listeningPort, serviceFromConfig

DEMO_PASSWORD = "demo"
"""
The password of every demo account. It is printed for the user to type; it
protects nothing but two in-memory INBOXes on loopback ports.
"""


@frozen
class DemoUser:
    """
    An account that the demo servers know.

    @ivar address: the login name.
    @ivar name: how the welcome message greets the user.
    @ivar home: the demo server the route table sends this account to.
    """

    address: str
    name: str
    home: str


DEMO_USERS: tuple[DemoUser, ...] = (
    DemoUser("alice@example.org", "Alice", "old"),
    DemoUser("bob@example.org", "Bob", "new"),
)
"""
The demo accounts, each with its home server in the generated route table.
"""

DEMO_STORES: tuple[str, ...] = ("old", "new")
"""
The names of the demo servers, as they appear in the generated configuration.
"""

DEMO_INTERFACE = "127.0.0.1"
"""
Where the demo listens: the loopback interface only.
"""

CONFIG_NAME = "mailproxy.toml"
"""
The name of the configuration file the demo writes.
"""

ROUTES_NAME = "routes.toml"
"""
The name of the route table file the demo writes next to it.
"""

TOKEN_NAME = "admin.token"
"""
The name of the file with the management endpoint's token, which the demo
generates on every run.
"""

DEFAULT_ADMIN_PORT = 19443
"""
The demo's management endpoint port unless told another.
"""


@implementer(IMessageIMAP, IMessageIMAPFile)
@define
class DemoMessage:
    """
    One message in a demo mailbox.

    Every message is presented as a single part: the demo neither needs nor
    offers MIME structure.

    @ivar uid: its unique identifier in its mailbox.
    @ivar raw: the whole message, headers and body, with CRLF line ends.
    @ivar flags: its flags, e.g. C{"\\Seen"}.
    @ivar internalDate: its RFC 5322 arrival date.
    """

    uid: int
    raw: bytes
    flags: list[str] = field(factory=list)
    internalDate: str = field(factory=lambda: email.utils.formatdate(localtime=True))

    def _split(self) -> tuple[bytes, bytes]:
        head, sep, body = self.raw.partition(b"\r\n\r\n")
        if not sep:
            return self.raw, b""
        return head + b"\r\n", body

    def getHeaders(self, negate: bool, *names: bytes | str) -> dict[str, str]:
        """
        The message's header fields, named by C{names} or all but those.

        @param negate: return the fields I{not} named.
        @param names: field names, in any case.
        @return: lower-cased field names mapped to their (unfolded) values.
        """
        wanted = {
            (n.decode("ascii", "replace") if isinstance(n, bytes) else n).lower()
            for n in names
        }
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
            self._split()[0]
        )
        headers = {}
        for key, value in parsed.items():
            if (key.lower() in wanted) != negate:
                headers[key.lower()] = str(value)
        return headers

    def getBodyFile(self) -> IO[bytes]:
        """
        The body, without the header.
        """
        return io.BytesIO(self._split()[1])

    def getSize(self) -> int:
        """
        The size of the whole message in octets.
        """
        return len(self.raw)

    def isMultipart(self) -> bool:
        """
        Always C{False}: demo messages are presented as one part.
        """
        return False

    def getSubPart(self, part: int) -> Any:
        """
        There are none.

        @raise TypeError: always.
        """
        raise TypeError("demo messages have no subparts")

    def getUID(self) -> int:
        """
        The message's UID.
        """
        return self.uid

    def getFlags(self) -> list[str]:
        """
        The message's current flags.
        """
        return self.flags

    def getInternalDate(self) -> str:
        """
        When the message arrived, as an RFC 5322 date.
        """
        return self.internalDate

    def open(self) -> IO[bytes]:
        """
        The whole message as a file, which is what FETCH BODY[] sends.
        """
        return io.BytesIO(self.raw)


def _resolve(messages: imap4.MessageSet, last: int) -> imap4.MessageSet:
    # A set parsed from the client's command still holds None for "*"; the
    # server leaves it to the mailbox to say what "*" is.
    try:
        messages.last = last
    except ValueError:
        pass  # already resolved by an earlier call on the same set
    return messages


@implementer(IMailboxIMAP, ICloseableMailboxIMAP)
@define
class DemoMailbox:
    """
    An in-memory mailbox, enough for reading, flagging, appending and
    expunging with a real client.

    @ivar uidValidity: the mailbox's UIDVALIDITY.
    @ivar messages: its messages, in sequence order.
    @ivar flags: the flags the mailbox defines; C{\\Noselect} once deleted.
    """

    uidValidity: int
    messages: list[DemoMessage] = field(factory=list)
    flags: list[str] = field(
        factory=lambda: ["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"]
    )
    _uidNext: int = 1
    _listeners: list[Any] = field(factory=list)

    def getFlags(self) -> list[str]:
        """
        The flags messages here can carry.
        """
        return self.flags

    def getHierarchicalDelimiter(self) -> str:
        """
        C{/}, as L{MemoryAccount} uses.
        """
        return "/"

    def getUIDValidity(self) -> int:
        """
        The UIDVALIDITY; different on each demo server, as on real ones.
        """
        return self.uidValidity

    def getUIDNext(self) -> int:
        """
        The UID the next message will get.
        """
        return self._uidNext

    def getUID(self, message: int) -> int:
        """
        The UID of the message with sequence number C{message}.
        """
        return self.messages[message - 1].uid

    def getMessageCount(self) -> int:
        """
        How many messages there are.
        """
        return len(self.messages)

    def getRecentCount(self) -> int:
        """
        Always 0: the demo does not track C{\\Recent}.
        """
        return 0

    def getUnseenCount(self) -> int:
        """
        How many messages lack C{\\Seen}.
        """
        return sum(1 for m in self.messages if "\\Seen" not in m.flags)

    def isWriteable(self) -> bool:
        """
        Always: the demo mailboxes may be changed.
        """
        return True

    def destroy(self) -> None:
        """
        Mark the mailbox unselectable, as the interface requires on delete.
        """
        self.messages.clear()
        self.flags.append("\\Noselect")

    def requestStatus(self, names: Iterable[str]) -> dict[str, int]:
        """
        Answer STATUS from the other methods.
        """
        return imap4.statusRequestHelper(self, names)  # type: ignore[no-any-return]

    def addListener(self, listener: Any) -> None:
        """
        Tell C{listener} (a session that selected this mailbox) about changes.
        """
        self._listeners.append(listener)

    def removeListener(self, listener: Any) -> None:
        """
        Stop telling C{listener} about changes.

        @raise ValueError: if it was not listening.
        """
        self._listeners.remove(listener)

    def addMessage(
        self, message: IO[bytes] | bytes, flags: Iterable[str] = (), date: bytes | str | None = None
    ) -> Deferred[int]:
        """
        Append a message (APPEND, or seeding).

        @param message: the message, as bytes or a file positioned anywhere.
        @return: a L{Deferred} that fires with its UID.
        """
        if isinstance(message, bytes):
            raw = message
        else:
            message.seek(0)
            raw = message.read()
        msg = DemoMessage(self._uidNext, raw, list(flags))
        if date:
            msg.internalDate = date.decode("ascii") if isinstance(date, bytes) else date
        self._uidNext += 1
        self.messages.append(msg)
        for listener in list(self._listeners):
            listener.newMessages(len(self.messages), None)
        return succeed(msg.uid)

    def expunge(self) -> list[int]:
        """
        Remove the messages flagged C{\\Deleted}.

        @return: their sequence numbers, highest first, so that the
            EXPUNGE responses the server sends in this order stay valid
            while each one renumbers the rest.
        """
        gone = [seq for seq, m in enumerate(self.messages, 1) if "\\Deleted" in m.flags]
        self.messages = [m for m in self.messages if "\\Deleted" not in m.flags]
        return sorted(gone, reverse=True)

    def _select(self, messages: imap4.MessageSet, uid: bool) -> Iterator[tuple[int, DemoMessage]]:
        if uid:
            last = self.messages[-1].uid if self.messages else 0
        else:
            last = len(self.messages)
        wanted = _resolve(messages, last)
        for seq, msg in enumerate(self.messages, 1):
            if (msg.uid if uid else seq) in wanted:
                yield seq, msg

    def fetch(self, messages: imap4.MessageSet, uid: bool) -> list[tuple[int, DemoMessage]]:
        """
        The messages named by C{messages}, as (sequence number, message).

        @param uid: C{messages} holds UIDs rather than sequence numbers.
        """
        return list(self._select(messages, uid))

    def store(
        self, messages: imap4.MessageSet, flags: Sequence[str], mode: int, uid: bool
    ) -> dict[int, list[str]]:
        """
        Change the flags of C{messages}.

        @param mode: 1 adds C{flags}, -1 removes them, 0 replaces all.
        @return: each changed message's sequence number with its new flags.
        """
        result = {}
        for seq, msg in self._select(messages, uid):
            if mode == 0:
                msg.flags = list(flags)
            elif mode > 0:
                msg.flags.extend(f for f in flags if f not in msg.flags)
            else:
                msg.flags = [f for f in msg.flags if f not in flags]
            result[seq] = msg.flags
        return result

    def close(self) -> None:
        """
        Nothing to release: the mailbox lives in memory.
        """


class DemoAccount(imap4.MemoryAccount):  # type: ignore[misc]
    """
    One user's mailboxes on one demo server: L{MemoryAccount} (which keeps
    the mailbox tree) with L{DemoMailbox} for each mailbox it creates.
    """

    def __init__(self, name: bytes, uidValidity: int) -> None:
        super().__init__(name)
        self._uidValidity = uidValidity

    def _emptyMailbox(self, name: str, id: int) -> DemoMailbox:
        return DemoMailbox(uidValidity=self._uidValidity + id)


@implementer(ICredentialsChecker)
@frozen
class DemoChecker:
    """
    Checks a LOGIN against the demo accounts; user names match in any case.

    @ivar passwords: lower-cased login names mapped to passwords.
    """

    passwords: dict[str, bytes] = field(repr=False)
    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        """
        Accept C{credentials} if the password matches the account's.

        @return: a L{Deferred} with the lower-cased login name, or failing
            with L{UnauthorizedLogin}.
        """
        user = credentials.username
        if isinstance(user, bytes):
            user = user.decode("utf-8", "replace")
        user = user.lower()
        expected = self.passwords.get(user)
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        if expected is not None and hmac.compare_digest(expected, password):
            return succeed(user.encode("utf-8"))
        return fail(UnauthorizedLogin("Authentication failed."))


@implementer(IRealm)
@frozen
class DemoRealm:
    """
    Hands out the demo accounts of one server.

    @ivar accounts: lower-cased login names (bytes) mapped to accounts.
    """

    accounts: dict[bytes, DemoAccount]

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any
    ) -> tuple[Any, DemoAccount, Callable[[], None]]:
        """
        Give the IMAP server the account of C{avatarId}.

        @raise NotImplementedError: if the IMAP account interface is not
            among C{interfaces}, or for an anonymous avatar.
        """
        if IAccountIMAP not in interfaces or not isinstance(avatarId, bytes):
            raise NotImplementedError("the demo realm only serves IMAP accounts")
        return IAccountIMAP, self.accounts[avatarId], lambda: None


def welcomeMessage(user: DemoUser, store: str) -> bytes:
    """
    The message each INBOX starts with, saying which server it lives on.

    @param store: the demo server's name, C{"old"} or C{"new"}.
    """
    routed = user.home == store
    lines = [
        f"From: mailproxy demo <demo@{store}.example.org>",
        f"To: {user.name} <{user.address}>",
        f"Subject: Welcome to the {store!r} demo server",
        f"Date: {email.utils.formatdate(localtime=True)}",
        f"Message-ID: <welcome.{user.address.partition('@')[0]}@{store}.example.org>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"Hello {user.name},",
        "",
        f"this message lives on the demo server {store!r}.",
        "",
        *(
            [
                f"routes.toml sends {user.address} here, so this is",
                "what you see through the proxy.",
            ]
            if routed
            else [
                f"The demo starts with routes.toml sending {user.address}",
                f"to {user.home!r}: if you read this through the proxy, the account",
                "has moved here.",
            ]
        ),
        "",
        "-- ",
        "mailproxy demo",
        "",
    ]
    return "\r\n".join(lines).encode("ascii")


class DemoIMAPServer(imap4.IMAP4Server):  # type: ignore[misc]
    """
    Twisted's IMAP server with its idle timeout on the factory's reactor.

    @ivar factory: the L{DemoStoreFactory} that made it.
    """

    factory: DemoStoreFactory

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """
        Schedule the idle timeout; L{TimeoutMixin} would use the global
        reactor.
        """
        return self.factory.reactor.callLater(period, func)


@define
class DemoStoreFactory(ServerFactory):
    """
    A demo IMAP server: L{IMAP4Server} sessions over in-memory accounts.

    @ivar name: the server's name, C{"old"} or C{"new"}; it appears in the
        greeting and in the welcome messages.
    @ivar reactor: the reactor for the sessions' timeouts and FETCH output.
    @ivar users: the accounts it holds.
    @ivar password: the password of every account.
    """

    name: str
    reactor: IReactorTime = field(repr=False)
    users: Sequence[DemoUser] = field(default=DEMO_USERS, repr=False)
    password: str = field(default=DEMO_PASSWORD, repr=False)
    portal: Portal = field(init=False, repr=False)
    realm: DemoRealm = field(init=False, repr=False)
    _cooperator: Cooperator = field(init=False, repr=False)

    # Twisted's "Starting factory ..." lines say nothing a demo user needs.
    noisy = False

    def __attrs_post_init__(self) -> None:
        # Distinct UIDVALIDITY per server, stable across runs, as a real
        # migration target would have.
        validity = zlib.crc32(self.name.encode("utf-8")) & 0x3FFFFFFF
        accounts = {}
        for user in self.users:
            account = DemoAccount(user.address.encode("utf-8"), validity)
            account.addMailbox("INBOX")
            account.select("INBOX").addMessage(welcomeMessage(user, self.name))
            accounts[user.address.lower().encode("utf-8")] = account
        self.realm = DemoRealm(accounts)
        self.portal = Portal(self.realm)
        self.portal.registerChecker(
            DemoChecker({u.address.lower(): self.password.encode("utf-8") for u in self.users})
        )
        reactor = self.reactor
        self._cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))

    def account(self, address: str) -> DemoAccount:
        """
        The account of C{address} on this server, for tests and inspection.

        @raise KeyError: if there is none.
        """
        return self.realm.accounts[address.lower().encode("utf-8")]

    def buildProtocol(self, addr: Any) -> Protocol:
        """
        A new IMAP session on the injected reactor.
        """
        proto = DemoIMAPServer(scheduler=self._cooperator.coiterate)
        proto.IDENT = f"mailproxy demo server {self.name!r} ready".encode("ascii")
        proto.portal = self.portal  # type: ignore[assignment]
        proto.factory = self
        return proto


def defaultDirectory(environ: Mapping[str, str] = os.environ) -> str:
    """
    Where the demo writes its certificate and configuration by default:
    C{$XDG_STATE_HOME/mailproxy-demo}, that is usually
    C{~/.local/state/mailproxy-demo}.
    """
    state = environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(state, "mailproxy-demo")


def _tomlString(text: str) -> str:
    """
    C{text} as a TOML basic string.
    """
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _relative(path: str, directory: str) -> str:
    # Relative names keep the written configuration valid when the whole
    # directory is copied elsewhere as a starting point.
    if os.path.dirname(os.path.abspath(path)) == os.path.abspath(directory):
        return os.path.basename(path)
    return os.path.abspath(path)


def demoConfig(
    certificate: str,
    key: str,
    imapsPort: int,
    imapPort: int,
    storePorts: Mapping[str, int],
    adminPort: int = DEFAULT_ADMIN_PORT,
) -> str:
    """
    The text of the demo's configuration file.

    @param certificate: the certificate file, relative to the configuration's
        directory or absolute; likewise C{key}.
    @param storePorts: the port of each demo server by name.
    @param adminPort: the management endpoint's port; its token is
        L{TOKEN_NAME} beside the configuration.
    """
    endpoint = "tcp:{port}:interface=" + DEMO_INTERFACE.replace(":", "\\:")
    parts = [
        "# Written by `mailproxy demo`, which rewrites it on every run: copy the",
        "# directory before you edit it into a real deployment's configuration.",
        "#",
        "#   mailproxy check FILE           validates a configuration",
        "#   mailproxy run --config FILE    runs it (= twistd -n mailproxy --config FILE)",
        "",
        "[proxy]",
        'hostname = "localhost"',
        "",
        "[limits]",
        "# Ctrl-C: open sessions get \"* BYE\" after 2 seconds (the default is 30).",
        "shutdown_grace = 2",
        "",
        "[tls]",
        "# A self-signed certificate for localhost, 127.0.0.1 and ::1, made by the",
        "# demo. A real deployment names its own: full chain (leaf first) and key.",
        f"certificate = {_tomlString(certificate)}",
        f"key = {_tomlString(key)}",
        "",
        "# Implicit TLS, as on port 993.",
        "[[listener]]",
        'protocol = "imap"',
        f"endpoint = {_tomlString(endpoint.format(port=imapsPort))}",
        'tls = "implicit"',
        "",
        "# STARTTLS, as on port 143; LOGIN is refused until TLS is on.",
        "[[listener]]",
        'protocol = "imap"',
        f"endpoint = {_tomlString(endpoint.format(port=imapPort))}",
        'tls = "starttls-required"',
        "",
        "[router]",
        'type = "static"',
        f"path = {_tomlString(ROUTES_NAME)}",
    ]
    parts += [
        "",
        "# The management endpoint: `mailproxy move`, `route`, `sessions`, `stats`",
        "# and `health` find it and its token here (with --config), Prometheus",
        "# scrapes /metrics with the token. The demo makes a new token on every run.",
        "[admin]",
        f"endpoint = {_tomlString(endpoint.format(port=adminPort))}",
        f"token_file = {_tomlString(TOKEN_NAME)}",
        "",
        "# The built-in demo servers: plain IMAP on loopback ports chosen at start.",
        "# They are Twisted's IMAP server, which does not implement IMAP ID, so the",
        '# client\'s address is not forwarded to them ("auto" sends ID only where',
        "# the server advertises it, as Dovecot does).",
    ]
    for name, port in storePorts.items():
        parts += [
            f"[backend.{name}]",
            f"host = {_tomlString(DEMO_INTERFACE)}",
            f"ports = {{ imap = {port} }}",
            'tls = "none"',
            'forward = "none"',
            "",
        ]
    return "\n".join(parts).rstrip("\n") + "\n"


def demoRoutes(users: Iterable[DemoUser] = DEMO_USERS) -> str:
    """
    The text of the demo's route table: each user to its home server.
    """
    parts = [
        "# Which server holds which account. Written by `mailproxy demo`, which",
        "# rewrites it on every run. Logins not named here are refused.",
        "",
        "[accounts]",
    ]
    parts += [f"{_tomlString(user.address)} = {_tomlString(user.home)}" for user in users]
    return "\n".join(parts) + "\n"


def writeToken(directory: str) -> str:
    """
    Write a new random token for the management endpoint into
    C{directory}, readable by its owner only.

    @return: the path of the token file.
    """
    path = os.path.join(directory, TOKEN_NAME)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="ascii") as f:
        # A file left by an older run may have had a wider mode.
        os.fchmod(f.fileno(), 0o600)
        f.write(secrets.token_hex(32) + "\n")
    return path


def writeDemoConfig(
    directory: str,
    certificate: str,
    key: str,
    imapsPort: int,
    imapPort: int,
    storePorts: Mapping[str, int],
    adminPort: int = DEFAULT_ADMIN_PORT,
    configOnly: bool = False,
) -> str:
    """
    Write the demo's configuration, its route table and a new token for
    its management endpoint into C{directory}.

    @param configOnly: write the configuration file alone, keeping the
        route table and the token an earlier call wrote (which the running
        proxy has read).
    @return: the path of the configuration file.
    """
    if not configOnly:
        with open(os.path.join(directory, ROUTES_NAME), "w", encoding="utf-8") as f:
            f.write(demoRoutes())
        writeToken(directory)
    configPath = os.path.join(directory, CONFIG_NAME)
    text = demoConfig(
        _relative(certificate, directory),
        _relative(key, directory),
        imapsPort,
        imapPort,
        storePorts,
        adminPort,
    )
    with open(configPath, "w", encoding="utf-8") as f:
        f.write(text)
    return configPath


@define
class RunningDemo:
    """
    The demo, started: two demo servers and the proxy in front of them.

    @ivar directory: where the certificate and configuration were written.
    @ivar configPath: the configuration file the proxy runs from.
    @ivar certificatePath: the self-signed certificate clients can trust.
    @ivar imapsPort: the proxy's implicit TLS port.
    @ivar imapPort: the proxy's STARTTLS port.
    @ivar adminPort: the port of the proxy's management endpoint.
    @ivar tokenPath: the file with the management endpoint's token.
    @ivar stores: each demo server by name.
    @ivar storePorts: the port of each demo server by name.
    @ivar service: the running proxy.
    """

    directory: str
    configPath: str
    certificatePath: str
    imapsPort: int
    imapPort: int
    adminPort: int
    tokenPath: str
    stores: dict[str, DemoStoreFactory]
    storePorts: dict[str, int]
    service: IService
    _listening: list[IListeningPort]

    def stop(self) -> Deferred[None]:
        """
        Stop the proxy, then the demo servers.

        @return: a L{Deferred} that fires when all have stopped listening.
        """
        stopped = maybeDeferred(self.service.stopService)

        def stores(_: object) -> Deferred[Any]:
            return gatherResults([maybeDeferred(p.stopListening) for p in self._listening])

        return stopped.addCallback(stores).addCallback(lambda _: None)


def _stopStarted(service: MultiService) -> Deferred[Any]:
    # A listener that cannot bind raises out of startService and leaves the
    # listeners after it unstarted; stopping those would fail, so only the
    # ones that started are stopped.
    return gatherResults(
        [maybeDeferred(child.stopService) for child in service if child.running]
    )


async def startDemo(
    reactor: Any,
    directory: str,
    imapsPort: int = 10993,
    imapPort: int = 10143,
    adminPort: int = DEFAULT_ADMIN_PORT,
) -> RunningDemo:
    """
    Start the demo: the demo servers on free loopback ports, a self-signed
    certificate, a token and a configuration in C{directory}, and the proxy
    running from that configuration, its management endpoint included. If
    anything fails, whatever had started is stopped again.

    @param reactor: a reactor with TCP and time (L{IReactorTCP},
        L{IReactorTime}).
    @param imapsPort: the proxy's implicit TLS port; 0 lets the kernel
        choose a free one (the result says which).
    @param imapPort: the proxy's STARTTLS port; 0 likewise.
    @param adminPort: the management endpoint's port; 0 likewise. With
        port 0 the configuration file is written again once the proxy
        listens, with the ports the kernel chose, so that the commands that
        read it (C{mailproxy move --config}) find this proxy.
    @raise twisted.internet.error.CannotListenError: if a proxy port is
        taken.
    @raise mailproxy.config.ConfigError: if the written configuration does
        not load.
    @raise OSError: if the directory or its files cannot be written.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    listening: list[IListeningPort] = []
    stores: dict[str, DemoStoreFactory] = {}
    storePorts: dict[str, int] = {}
    service: MultiService | None = None
    try:
        for name in DEMO_STORES:
            factory = DemoStoreFactory(name, reactor)
            port = await TCP4ServerEndpoint(reactor, 0, interface=DEMO_INTERFACE).listen(factory)
            listening.append(port)
            stores[name] = factory
            storePorts[name] = port.getHost().port  # type: ignore[attr-defined]
        certificate, key = makeSelfSigned(
            directory, names=("localhost",), ips=("127.0.0.1", "::1")
        )
        configPath = writeDemoConfig(
            directory, certificate, key, imapsPort, imapPort, storePorts, adminPort
        )
        service = serviceFromConfig(loadConfig(configPath), reactor)
        service.startService()
        requested = (imapsPort, imapPort, adminPort)
        # The listeners are the implicit TLS one, then the STARTTLS one.
        imapsPort = listeningPort(service, 0) or imapsPort
        imapPort = listeningPort(service, 1) or imapPort
        admin = service.getServiceNamed("admin").endpoint.port  # type: ignore[attr-defined]
        adminPort = admin.getHost().port if admin is not None else adminPort
        if (imapsPort, imapPort, adminPort) != requested:
            writeDemoConfig(
                directory,
                certificate,
                key,
                imapsPort,
                imapPort,
                storePorts,
                adminPort,
                configOnly=True,
            )
    except BaseException:
        if service is not None:
            await _stopStarted(service)
        await gatherResults([maybeDeferred(port.stopListening) for port in listening])
        raise
    return RunningDemo(
        directory=directory,
        configPath=configPath,
        certificatePath=str(certificate),
        imapsPort=imapsPort,
        imapPort=imapPort,
        adminPort=adminPort,
        tokenPath=os.path.join(directory, TOKEN_NAME),
        stores=stores,
        storePorts=storePorts,
        service=service,
        listening=listening,
    )


def _pyString(text: str) -> str:
    # A JSON string is a Python string literal, and its double quotes leave
    # the whole program free to go inside single quotes on a shell line.
    return json.dumps(text, ensure_ascii=False)


def clientCommands(demo: RunningDemo) -> list[tuple[str, DemoUser, list[str]]]:
    """
    Commands that read a demo INBOX through the proxy with real clients.

    @return: for each command, what it shows, the account it logs in as,
        and its argument vector.
    """
    host = DEMO_INTERFACE
    alice, bob = DEMO_USERS[0], DEMO_USERS[1]
    python = (
        "import imaplib, ssl; "
        f"c = imaplib.IMAP4_SSL({_pyString(host)}, {demo.imapsPort}, "
        f"ssl_context=ssl.create_default_context(cafile={_pyString(demo.certificatePath)})); "
        f"c.login({_pyString(bob.address)}, {_pyString(DEMO_PASSWORD)}); "
        'c.select("INBOX"); '
        'print(c.fetch("1", "(BODY[TEXT])")[1][0][1].decode())'
    )
    return [
        (
            "implicit TLS",
            alice,
            [
                "curl", "--cacert", demo.certificatePath,
                "--user", f"{alice.address}:{DEMO_PASSWORD}",
                f"imaps://{host}:{demo.imapsPort}/INBOX;UID=1",
            ],
        ),
        (
            "STARTTLS",
            bob,
            [
                "curl", "--ssl-reqd", "--cacert", demo.certificatePath,
                "--user", f"{bob.address}:{DEMO_PASSWORD}",
                f"imap://{host}:{demo.imapPort}/INBOX;UID=1",
            ],
        ),
        ("Python's imaplib", bob, ["python3", "-c", python]),
    ]


def mailproxyCommand(
    executable: str = sys.executable, which: Callable[[str], str | None] = shutil.which
) -> str:
    """
    How to call the C{mailproxy} command that belongs to this Python: just
    C{mailproxy} if that is the one on C{$PATH}, else the script's path
    beside the interpreter (a virtualenv's C{bin}, which is seldom on
    C{$PATH}).

    @param executable: the running Python interpreter.
    @param which: finds a command on C{$PATH}.
    """
    beside = os.path.join(os.path.dirname(os.path.abspath(executable)), "mailproxy")
    if not os.access(beside, os.X_OK) or which("mailproxy") == beside:
        return "mailproxy"
    return beside


def adminCommands(demo: RunningDemo, program: str = "mailproxy") -> list[tuple[str, str]]:
    """
    Shell lines that operate the running demo through its management
    endpoint: the C{mailproxy} operations commands, which find the endpoint
    and its token in the demo's configuration, and C{curl} for C{/metrics}.

    @param program: how to call the C{mailproxy} command.
    @return: for each command, what it shows and its shell line.
    """
    alice = DEMO_USERS[0]
    config = ["--config", demo.configPath]
    token = shlex.quote(demo.tokenPath)
    return [
        ("explain", shlex.join([program, "route", "explain", *config, alice.address])),
        ("sessions", shlex.join([program, "sessions", *config])),
        ("move", shlex.join([program, "move", *config, alice.address, "new"])),
        (
            "metrics",
            f'curl -sS -H "Authorization: Bearer $(cat {token})" '
            f"http://{DEMO_INTERFACE}:{demo.adminPort}/metrics",
        ),
    ]


def _shellLine(argv: Sequence[str]) -> str:
    # curl's lines are long: the URL goes on a continuation line.
    if argv[0] == "curl":
        return f"  {shlex.join(argv[:-1])} \\\n      {shlex.quote(argv[-1])}"
    return f"  {shlex.join(argv)}"


def instructions(demo: RunningDemo, program: str | None = None) -> str:
    """
    What to print once the demo runs: where everything is, the commands
    that try it with real clients and those that operate it.

    @param program: how to call the C{mailproxy} command; by default
        L{mailproxyCommand}'s answer.
    """
    host = DEMO_INTERFACE
    alice = DEMO_USERS[0]
    cert = shlex.quote(demo.certificatePath)
    routes = os.path.join(demo.directory, ROUTES_NAME)
    width = max(len(u.address) for u in DEMO_USERS)
    admin = dict(adminCommands(demo, program or mailproxyCommand()))
    lines = [
        "mailproxy demo is running.",
        "",
        f"  proxy, implicit TLS   {host}:{demo.imapsPort}",
        f"  proxy, STARTTLS       {host}:{demo.imapPort}",
        f"  management endpoint   {host}:{demo.adminPort}  (HTTP, token in {demo.tokenPath})",
    ]
    lines += [
        f"  demo server {name!r:<9} {host}:{port}  (plain IMAP, behind the proxy)"
        for name, port in demo.storePorts.items()
    ]
    lines += ["", f"Accounts (password {DEMO_PASSWORD!r}; each server holds both):"]
    lines += [f"  {user.address:<{width}}  is routed to {user.home!r}" for user in DEMO_USERS]
    lines += ["", "Try it:"]
    lines += [_shellLine(argv) for _, _, argv in clientCommands(demo)]
    lines += [
        # -servername: the certificate's name is checked, and s_client
        # has a name to report (without, it prints "Can't use
        # SSL_get_servername").
        f"  openssl s_client -quiet -crlf -CAfile {cert} -servername localhost"
        f" -connect {host}:{demo.imapsPort}",
        f"      (add -starttls imap for port {demo.imapPort}), then type:",
        f"      a LOGIN {alice.address} {DEMO_PASSWORD}",
        "      b SELECT INBOX",
        "      c FETCH 1 BODY[TEXT]",
        "      d LOGOUT",
        "",
        "Operate it through its management endpoint; these commands find it, and",
        "its token, in the configuration. Which rule sends alice where, and the",
        "open sessions:",
        f"  {admin['explain']}",
        f"  {admin['sessions']}",
        f"Move {alice.address} to 'new' the way a migration does, with one command:",
        "her open sessions get \"* BYE\" and her client reconnects, to 'new' (move",
        "her back the same way):",
        f"  {admin['move']}",
        f"Or edit {routes}",
        f"to say \"{alice.address}\" = \"new\": the proxy re-reads the table within",
        "seconds, no restart. The counters, as Prometheus reads them:",
        f"  {admin['metrics']}",
        "",
        f"The certificate is self-signed: {demo.certificatePath}",
        f"The configuration is a starting point for a real deployment: {demo.configPath}",
        f"(and its route table, {routes}).",
        "",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines) + "\n"
