"""
The ManageSieve front end: what a client sees before it is logged in.

It greets with a capability list, answers CAPABILITY, NOOP, LOGOUT,
STARTTLS (and re-sends the capability list after the handshake, RFC 5804
section 2.2) and AUTHENTICATE with PLAIN or LOGIN itself, and refuses every
other command with C{NO}. The core (L{CommandFrontend}) decides STARTTLS,
runs the SASL exchange and the login; this module reads ManageSieve and
words the outcomes. On a successful backend login the client gets the
backend's own C{OK} line and the relay starts; from then on, CAPABILITY is
answered by the backend, so the client sees the backend's SIEVE extensions,
and L{SieveGuard} refuses what only the proxy may say to the backend
(XCLIENT). Commands are dispatched through an explicit table, never by
name lookup on the object.
"""

from __future__ import annotations

from base64 import b64encode
from typing import Callable, cast

from twisted.logger import Logger
from zope.interface import implementer

from .._backend import BackendProtocol
from .._commandloop import CommandFrontend, LoopState
from .._contract import ILoginFrontend
from .._guard import IRelayGuard
from .._login import LoginFailed
from .._outcomes import EndReason, FailureKind, SASLRefusal, StartTLSRefusal
from .._safetext import oneLine
from ._backend import SieveBackendLogin
from ._guard import SieveGuard
from ._parser import Atom, BadLine, Fatal, Line, LineParser, SieveValue, quoteString

#: The SIEVE extensions advertised before login: those of Dovecot 2.3's
#: Pigeonhole with its default settings. After login the client asks the
#: backend, which tells its own.
DEFAULT_SIEVE_EXTENSIONS = (
    "fileinto reject envelope encoded-character vacation subaddress "
    "comparator-i;ascii-numeric relational regex imap4flags copy include "
    "variables body enotify environment mailbox date index ihave duplicate "
    "mime foreverypart extracttext"
)
#: The notification methods advertised before login (for C{enotify}).
DEFAULT_NOTIFY_METHODS = "mailto"
#: Invalid commands after which the connection is closed.
MAX_BAD_COMMANDS = 10
#: Longest pre-auth command line unless C{line_length} says otherwise:
#: Dovecot's C{managesieve_max_line_length} (before login it takes about
#: 1 KiB, but AUTHENTICATE strings of several KiB).
LINE_LENGTH = 65536
#: Longest quoted string before login: a SASL string carries an OAuth
#: token, which can take KiBs (RFC 4954's 12288 octets, as SMTP's AUTH);
#: other strings are bounded by the line.
MAX_QUOTED_LENGTH = 12288

#: Commands that exist but need an authenticated session.
_AFTER_LOGIN = frozenset(
    b"HAVESPACE PUTSCRIPT LISTSCRIPTS SETACTIVE GETSCRIPT DELETESCRIPT "
    b"RENAMESCRIPT CHECKSCRIPT UNAUTHENTICATE".split()
)

_PLAINTEXT_REFUSED = "Plaintext authentication disallowed on non-secure (SSL/TLS) connections."

#: The C{NO} to a refused STARTTLS, by why the core refused it (counted as
#: an invalid command).
_STARTTLS_REFUSALS = {
    StartTLSRefusal.ARGUMENTS: "STARTTLS takes no arguments.",
    StartTLSRefusal.ACTIVE: "TLS is already active.",
    StartTLSRefusal.UNAVAILABLE: "STARTTLS is not available on this port.",
    StartTLSRefusal.TRANSACTION: "STARTTLS is not available now.",
}
#: The C{NO} to an authentication exchange that ends without a login, by
#: why the core ended it (C{BAD_RESPONSE} names the mechanism).
_SASL_REFUSALS = {
    SASLRefusal.UNSUPPORTED: "Unsupported authentication mechanism.",
    SASLRefusal.BAD_INITIAL_RESPONSE: "Invalid AUTHENTICATE initial response.",
    SASLRefusal.BAD_BASE64: "Invalid base64 data in AUTHENTICATE response.",
    SASLRefusal.NO_INITIAL_RESPONSE: "The mechanism takes no initial response.",
    SASLRefusal.ABORTED: "Authentication aborted by client.",
    SASLRefusal.AUTHORIZATION: "Authorization identity not supported.",
}


def _string(value: SieveValue) -> bytes | None:
    """
    A value as a string: a quoted string or literal, or (leniently) an atom.
    """
    if isinstance(value, Atom):
        return value.value
    if isinstance(value, bytes):
        return value
    return None


@implementer(ILoginFrontend)
class SieveFrontend(CommandFrontend):
    """
    Pre-auth ManageSieve for one client connection.

    States: those of L{LoopState}.

    @cvar implementation: the C{IMPLEMENTATION} capability's value.
    @cvar sieveExtensions: the C{SIEVE} capability's value before login.
    @cvar notifyMethods: the C{NOTIFY} capability's value before login, or
        L{None} to leave it out.
    """

    protocolName = "sieve"
    implementation = "mailproxy"
    sieveExtensions = DEFAULT_SIEVE_EXTENSIONS
    notifyMethods: str | None = DEFAULT_NOTIFY_METHODS
    maxBadCommands = MAX_BAD_COMMANDS
    badCommandsGoodbye = "Too many invalid MANAGESIEVE commands."
    # Responses are strings: no lone "=" for an empty one.
    saslLoneEquals = False
    log = Logger()
    #: The method answering each command, by name: one table for every
    #: session (a table of bound methods would cost each session its own).
    _commands = {
        b"CAPABILITY": "do_CAPABILITY",
        b"NOOP": "do_NOOP",
        b"LOGOUT": "do_LOGOUT",
        b"STARTTLS": "do_STARTTLS",
        b"AUTHENTICATE": "do_AUTHENTICATE",
    }

    def __init__(self, context, listener) -> None:
        super().__init__(context, listener)
        self.input: LineParser = LineParser(self.limits.lineLengthFor(LINE_LENGTH), self.limits.literalSize, MAX_QUOTED_LENGTH)
        self._startingTLS = False

    # Wire helpers

    def reply(self, status: bytes, text: str, code: bytes = b"") -> None:
        """
        Write C{OK}, C{NO} or C{BYE} with an optional response code and a
        human-readable text.
        """
        line = status
        if code:
            line += b" (" + code + b")"
        self.sendLine(line + b" " + quoteString(text.encode("utf-8")))

    def capabilities(self) -> list[bytes]:
        """
        The pre-login capability lines, reflecting TLS state.
        """
        mechanisms = " ".join(self.offeredMechanisms())
        pairs: list[tuple[str, str | None]] = [
            ("IMPLEMENTATION", self.implementation),
            ("SIEVE", self.sieveExtensions),
        ]
        if self.notifyMethods:
            pairs.append(("NOTIFY", self.notifyMethods))
        pairs.append(("SASL", mechanisms))
        if self.tlsAvailable:
            pairs.append(("STARTTLS", None))
        pairs.append(("VERSION", "1.0"))
        lines = []
        for name, value in pairs:
            line = quoteString(name.encode("ascii"))
            if value is not None:
                line += b" " + quoteString(value.encode("utf-8"))
            lines.append(line)
        return lines

    def sendCapabilities(self, text: str) -> None:
        """
        Write the capability lines and C{OK} with C{text}, in one write.
        """
        lines = self.capabilities()
        lines.append(b"OK " + quoteString(text.encode("utf-8")))
        self.transport.write(b"".join(line + b"\r\n" for line in lines))

    # The contract (ILoginFrontend)

    def greet(self) -> None:
        self.sendCapabilities(self.context.hostname + " ManageSieve proxy ready.")

    def sayGoodbye(self, reason: EndReason, text: str) -> None:
        self.reply(b"BYE", text)

    def answerStartTLS(self, command: tuple[SieveValue, ...], refusal: StartTLSRefusal | None) -> None:
        if refusal is not None:
            self._bad(_STARTTLS_REFUSALS[refusal])
            return
        self.reply(b"OK", "Begin TLS negotiation now.")
        self._startingTLS = True

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        if self._startingTLS:
            # RFC 5804 section 2.2: the server speaks first after STARTTLS.
            self._startingTLS = False
            if self.state is not LoopState.CLOSED:
                self.sendCapabilities("TLS negotiation successful.")

    def saslChallenge(self, command: tuple[SieveValue, ...], data: bytes) -> None:
        self.sendLine(quoteString(b64encode(data)))

    def answerSASLRefusal(self, command: tuple[SieveValue, ...], refusal: SASLRefusal, mechanism: str) -> None:
        if refusal is SASLRefusal.PRIVACY_REQUIRED:
            self.reply(b"NO", _PLAINTEXT_REFUSED, code=b"ENCRYPT-NEEDED")
        elif refusal is SASLRefusal.BAD_RESPONSE:
            self.reply(b"NO", "Invalid " + mechanism + " response.")
        else:
            self.reply(b"NO", _SASL_REFUSALS[refusal])

    def answerLogin(self, command: tuple[SieveValue, ...], backend: BackendProtocol) -> IRelayGuard:
        self.transport.write(cast(SieveBackendLogin, backend).okLine)
        return SieveGuard()

    def answerLoginFailure(self, command: tuple[SieveValue, ...], failure: LoginFailed) -> None:
        if failure.kind is FailureKind.AUTH:
            self.reply(b"NO", oneLine(failure.message) or "Authentication failed.")
        else:
            self.reply(
                b"NO",
                oneLine(failure.message) or "Service temporarily unavailable, try again later.",
                code=b"TRYLATER",
            )

    # The command loop

    def _next(self) -> Line | BadLine | None:
        # The next line; None when none is complete, or when the input
        # cannot be read any further (the session ends).
        event = self.input.next()
        if isinstance(event, Fatal):
            self.end(EndReason.PROTOCOL_ERROR, event.reason, event.reason)
            return None
        return event

    def readCommand(self) -> bool:
        event = self._next()
        if event is None:
            return False
        if isinstance(event, BadLine):
            self._bad(event.reason)
        else:
            self._command(event)
        return True

    def readSASLResponse(self) -> bool:
        event = self._next()
        if event is None:
            return False
        values = event.values if isinstance(event, Line) else ()
        response = values[0] if len(values) == 1 else None
        if isinstance(response, Atom) and response.value == b"*":
            # Only a bare * is tolerated unquoted: some clients cancel so.
            response = b"*"
        if isinstance(response, bytes):
            self.saslResponse(response)
        else:
            self.abandonSASL()
            self.reply(b"NO", "Invalid AUTHENTICATE client response.")
        return True

    def _command(self, line: Line) -> None:
        values = line.values
        if not values:
            self._bad("Empty command.")
            return
        name = values[0]
        if not isinstance(name, Atom):
            self._bad("Invalid command name.")
            return
        handler = self._commands.get(name.value.upper())
        if handler is not None:
            getattr(self, handler)(values[1:])
        elif name.value.upper() in _AFTER_LOGIN:
            self._bad("Authenticate first.")
        else:
            self._bad("Unknown command.")

    def _bad(self, text: str) -> None:
        self.reply(b"NO", text)
        self.countBadCommand()

    # Commands

    def do_CAPABILITY(self, args: tuple[SieveValue, ...]) -> None:
        if args:
            self._bad("CAPABILITY takes no arguments.")
            return
        self.sendCapabilities("Capability completed.")

    def do_NOOP(self, args: tuple[SieveValue, ...]) -> None:
        if not args:
            self.reply(b"OK", "NOOP completed.")
            return
        tag = args[0] if len(args) == 1 else None
        if not isinstance(tag, bytes):
            self._bad("NOOP takes one optional string.")
            return
        # RFC 5804 section 2.11: the string comes back in a TAG code.
        self.reply(b"OK", "Done", code=b"TAG " + quoteString(tag))

    def do_LOGOUT(self, args: tuple[SieveValue, ...]) -> None:
        self.reply(b"OK", "Logout completed.")
        self.end(EndReason.LOGGED_OUT)

    def do_STARTTLS(self, args: tuple[SieveValue, ...]) -> None:
        self.startTLSCommand(args, bool(args))

    def do_AUTHENTICATE(self, args: tuple[SieveValue, ...]) -> None:
        if not 1 <= len(args) <= 2:
            self._bad("AUTHENTICATE takes a mechanism and an optional initial response.")
            return
        mechanism = _string(args[0])
        if mechanism is None:
            self._bad("Invalid mechanism name.")
            return
        initial = args[1] if len(args) == 2 else None
        self.authenticate(
            args,
            mechanism.decode("ascii", "replace"),
            initial if isinstance(initial, bytes) else None,
            badInitialResponse=initial is not None and not isinstance(initial, bytes),
        )
