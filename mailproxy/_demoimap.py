"""
The demo's IMAP servers: Twisted's L{twisted.mail.imap4.IMAP4Server} over
in-memory accounts, and the accounts they hold.

They are a fixture for C{mailproxy demo} (L{mailproxy.demo}), not a product,
and live apart from it so that nothing but the demo loads C{twisted.mail}.
Twisted's IMAP server has quirks; what this module does about them:

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
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any

from attrs import define, field, frozen
from zope.interface import implementer

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
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

__all__ = [
    "DEMO_PASSWORD",
    "DemoUser",
    "DEMO_USERS",
    "DemoMessage",
    "DemoMailbox",
    "DemoAccount",
    "DemoChecker",
    "DemoRealm",
    "welcomeMessage",
    "DemoIMAPServer",
    "DemoStoreFactory",
]

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
