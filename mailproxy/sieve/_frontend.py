"""
The ManageSieve front end: what a client sees before it is logged in.

It greets with a capability list, answers CAPABILITY, NOOP, LOGOUT,
STARTTLS (and re-sends the capability list after the handshake, RFC 5804
section 2.2) and AUTHENTICATE with PLAIN or LOGIN itself, and refuses every
other command with C{NO}. On a successful backend login the client gets the
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
from twisted.python.failure import Failure

from .._backend import BackendProtocol, LoginJob
from .._commandloop import CommandFrontend
from .._outcomes import EndReason
from .._safetext import oneLine
from .._sasl import Challenge, Refused, ServerExchange, Step, decodeBase64
from .._session import LoginFailed
from ..model import Credentials
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

#: Commands that exist but need an authenticated session.
_AFTER_LOGIN = frozenset(
    b"HAVESPACE PUTSCRIPT LISTSCRIPTS SETACTIVE GETSCRIPT DELETESCRIPT "
    b"RENAMESCRIPT CHECKSCRIPT UNAUTHENTICATE".split()
)

_PLAINTEXT_REFUSED = "Plaintext authentication disallowed on non-secure (SSL/TLS) connections."


def _string(value: SieveValue) -> bytes | None:
    """
    A value as a string: a quoted string or literal, or (leniently) an atom.
    """
    if isinstance(value, Atom):
        return value.value
    if isinstance(value, bytes):
        return value
    return None


class SieveFrontend(CommandFrontend):
    """
    Pre-auth ManageSieve for one client connection.

    States: C{"command"} (reading commands), C{"sasl"} (reading
    AUTHENTICATE responses), C{"login"} (waiting for the router and
    backend; client input stays buffered), C{"relay"}, C{"closed"}.

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
    log = Logger()

    def __init__(self, context, listener) -> None:
        super().__init__(context, listener)
        self.parser = LineParser(self.limits.lineLengthFor(LINE_LENGTH), self.limits.literalSize)
        self._startingTLS = False
        self._exchange: ServerExchange | None = None
        self._commands: dict[bytes, Callable[[tuple[SieveValue, ...]], None]] = {
            b"CAPABILITY": self.do_CAPABILITY,
            b"NOOP": self.do_NOOP,
            b"LOGOUT": self.do_LOGOUT,
            b"STARTTLS": self.do_STARTTLS,
            b"AUTHENTICATE": self.do_AUTHENTICATE,
        }

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
        mechanisms = "PLAIN LOGIN" if self.plaintextLoginAllowed else ""
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

    # FrontendProtocol

    def greet(self) -> None:
        self.sendCapabilities(self.context.hostname + " ManageSieve proxy ready.")

    def sayGoodbye(self, reason: EndReason, text: str) -> None:
        self.reply(b"BYE", text)

    def makeBackendLogin(self, job: LoginJob) -> BackendProtocol:
        return SieveBackendLogin(job, self.context.reactor, self.limits.backendTimeout)

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        if self._startingTLS:
            # RFC 5804 section 2.2: the server speaks first after STARTTLS.
            self._startingTLS = False
            if self.state != "closed":
                self.sendCapabilities("TLS negotiation successful.")

    def frontendDataReceived(self, data: bytes) -> None:
        self.parser.feed(data)
        self.process()

    # The command loop

    def processInput(self) -> None:
        while self.state in ("command", "sasl") and not self.repliesUnread:
            event = self.parser.next()
            if event is None:
                return
            if isinstance(event, Fatal):
                self.fatal(event.reason)
                return
            if self.state == "sasl":
                self._saslLine(event)
                continue
            if isinstance(event, BadLine):
                self._bad(event.reason)
                continue
            self._command(event)

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
            handler(values[1:])
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
        self.result = "logged out"
        self.reply(b"OK", "Logout completed.")
        self.closeWith()

    def do_STARTTLS(self, args: tuple[SieveValue, ...]) -> None:
        if args:
            self._bad("STARTTLS takes no arguments.")
            return
        if self.tlsActive:
            self._bad("TLS is already active.")
            return
        if not self.tlsAvailable:
            self._bad("STARTTLS is not available on this port.")
            return
        self.reply(b"OK", "Begin TLS negotiation now.")
        # Anything the client sent after STARTTLS in plaintext could have
        # been injected by an attacker: drop it (CVE-2011-0411).
        self.parser.clear()
        self._startingTLS = True
        self.startTLS()

    def do_AUTHENTICATE(self, args: tuple[SieveValue, ...]) -> None:
        if not 1 <= len(args) <= 2:
            self._bad("AUTHENTICATE takes a mechanism and an optional initial response.")
            return
        mechanism = _string(args[0])
        if mechanism is None:
            self._bad("Invalid mechanism name.")
            return
        mechanism = mechanism.upper()
        if mechanism not in (b"PLAIN", b"LOGIN"):
            self.reply(b"NO", "Unsupported authentication mechanism.")
            return
        if not self.plaintextLoginAllowed:
            self.reply(b"NO", _PLAINTEXT_REFUSED, code=b"ENCRYPT-NEEDED")
            return
        initial: bytes | None = None
        if len(args) == 2:
            if not isinstance(args[1], bytes):
                self.reply(b"NO", "Invalid AUTHENTICATE initial response.")
                return
            initial = self._decode(args[1])
            if initial is None:
                return
        self._exchange = ServerExchange(mechanism.decode("ascii"))
        self._saslStep(self._exchange.start(initial))

    # SASL

    def _decode(self, raw: bytes) -> bytes | None:
        decoded = decodeBase64(raw)
        if decoded is None:
            self.state = "command"
            self.reply(b"NO", "Invalid base64 data in AUTHENTICATE response.")
        return decoded

    def _saslLine(self, event: Line | BadLine) -> None:
        self.state = "command"
        values = event.values if isinstance(event, Line) else ()
        if len(values) != 1 or not isinstance(values[0], (bytes, Atom)):
            self.reply(b"NO", "Invalid AUTHENTICATE client response.")
            return
        if isinstance(values[0], Atom):
            # Only a bare * is tolerated unquoted: some clients cancel so.
            if values[0].value != b"*":
                self.reply(b"NO", "Invalid AUTHENTICATE client response.")
                return
            response = b"*"
        else:
            response = values[0]
        if response == b"*":
            self.reply(b"NO", "Authentication aborted by client.")
            return
        decoded = self._decode(response)
        if decoded is not None and self._exchange is not None:
            self._saslStep(self._exchange.respond(decoded))

    def _saslStep(self, step: Step) -> None:
        if isinstance(step, Challenge):
            self.sendLine(quoteString(b64encode(step.data)))
            self.state = "sasl"
        elif isinstance(step, Refused) and step.reason == "authorization":
            self.reply(b"NO", "Authorization identity not supported.")
        elif isinstance(step, Refused):
            self.reply(b"NO", "Invalid " + step.mechanism + " response.")
        else:
            self._login(step)

    # Login

    def _login(self, credentials: Credentials) -> None:
        self.state = "login"
        d = self.login(credentials)
        d.addCallbacks(self._loggedIn, self._loginFailed)
        d.addErrback(self.loginHandlingFailed)

    def _loggedIn(self, backend: SieveBackendLogin) -> None:
        self.transport.write(backend.okLine)
        self.state = "relay"
        self.handOver(backend, toBackend=self.parser.takeRemaining(), guard=SieveGuard())

    def _loginFailed(self, reason: Failure) -> None:
        reason.trap(LoginFailed)
        failure = cast(LoginFailed, reason.value)
        if failure.kind == "auth":
            self.reply(b"NO", oneLine(failure.message) or "Authentication failed.")
        else:
            self.reply(
                b"NO",
                oneLine(failure.message) or "Service temporarily unavailable, try again later.",
                code=b"TRYLATER",
            )
        if failure.close:
            self.closeAfterLoginFailure()
            return
        self.state = "command"
        self.process()

