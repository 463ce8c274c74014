"""
The POP3 front end: what a client sees before it is logged in.

It answers CAPA, STLS, USER, PASS, APOP, AUTH (PLAIN, LOGIN and CRAM-MD5,
with or without an initial response, C{*} to cancel, and the bare C{AUTH}
that lists the mechanisms), NOOP and QUIT itself, refuses everything else
with C{-ERR}, and on a successful backend login forwards the backend's
C{+OK} line before the relay starts; from then on L{POP3Guard} refuses
what only the proxy may say to the backend (XCLIENT). Failures carry the
response codes of RFC 2449 and RFC 3206 (C{[AUTH]}, C{[SYS/TEMP]}, and the
backend's own C{[IN-USE]}, C{[LOGIN-DELAY]} or C{[SYS/PERM]}). Commands
are dispatched through an explicit table, never by name lookup on the
object.

APOP and CRAM-MD5 are offered only on listeners with C{digest_auth = true}:
the client then proves it knows its password without sending it, and only a
router that holds the cleartext password can check the proof and give the
password for the backend login.
"""

from __future__ import annotations

from base64 import b64encode
from typing import Callable, cast

from twisted.logger import Logger
from zope.interface import implementer

from .._backend import BackendProtocol, LoginJob
from .._commandloop import CommandFrontend, LoopState
from .._contract import ILoginFrontend
from .._guard import IRelayGuard
from .._outcomes import EndReason, FailureKind, SASLRefusal, StartTLSRefusal
from .._safetext import oneLine
from .._sasl import newChallenge, parseDigestResponse
from .._login import LoginFailed
from ..model import Credentials
from ._backend import POP3BackendLogin, sharedMemory
from ._guard import POP3Guard
from ._parser import MAX_SASL_LINE, BadLine, Command, LineParser

#: Invalid or unknown commands in a row after which the connection is
#: closed. Dovecot also allows three: a cross-protocol request (an HTTP
#: request sent to a POP3 port by a browser, ALPACA) is many bad lines.
MAX_BAD_COMMANDS = 3

#: Commands of the TRANSACTION state (RFC 1939, RFC 2449).
_AFTER_LOGIN = frozenset(b"STAT LIST RETR DELE RSET TOP UIDL LAST".split())

_PLAINTEXT_DISALLOWED = "[AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
_AUTH_FAILED = "Authentication failed."
_UNAVAILABLE = "Service temporarily unavailable, try again later."

_STARTTLS_REFUSALS = {
    StartTLSRefusal.ARGUMENTS: "STLS takes no arguments.",
    StartTLSRefusal.ACTIVE: "TLS is already active.",
    StartTLSRefusal.UNAVAILABLE: "STLS is not available on this port.",
}


def _text(value: bytes) -> str:
    """
    Client octets as a string that turns back into the same octets.
    """
    return value.decode("utf-8", "surrogateescape")


@implementer(ILoginFrontend)
class POP3Frontend(CommandFrontend):
    """
    The AUTHORIZATION state of POP3 for one client connection.

    The core (L{CommandFrontend}) decides; this class reads POP3 and words
    the outcomes.  States: those of L{LoopState}.

    @ivar timestamp: the APOP timestamp of the greeting, L{None} when
        digest mechanisms are off.
    """

    protocolName = "pop3"
    internalErrorGoodbye = "[SYS/TEMP] Internal error."
    maxBadCommands = MAX_BAD_COMMANDS
    log = Logger()
    #: The method answering each command, by name: one table for every
    #: session (a table of bound methods would cost each session its own).
    _commands = {
        b"CAPA": "do_CAPA",
        b"STLS": "do_STLS",
        b"USER": "do_USER",
        b"PASS": "do_PASS",
        b"APOP": "do_APOP",
        b"AUTH": "do_AUTH",
        b"NOOP": "do_NOOP",
        b"QUIT": "do_QUIT",
    }

    def __init__(self, context, listener) -> None:
        super().__init__(context, listener)
        self.input: LineParser = LineParser()
        self.digestAuth = listener.digestAuth
        self.timestamp: bytes | None = None
        self._user: bytes | None = None

    # Wire helpers

    def ok(self, text: str = "") -> None:
        """
        Write a positive reply.
        """
        self.sendLine(b"+OK " + text.encode("utf-8") if text else b"+OK")

    def err(self, text: str) -> None:
        """
        Write a negative reply.
        """
        self.sendLine(b"-ERR " + text.encode("utf-8"))

    def newChallenge(self) -> bytes:
        """
        A challenge no other greeting or CRAM-MD5 exchange uses, in the
        msg-id form RFC 1939 asks for: C{<random.time@hostname>}.
        """
        return newChallenge(self.context.reactor.seconds(), self.context.hostname)

    def mechanisms(self) -> list[bytes]:
        """
        The SASL mechanisms a client may use on this connection now.
        """
        return [mechanism.encode("ascii") for mechanism in self.offeredMechanisms()]

    def capabilities(self) -> list[bytes]:
        """
        The pre-login capability list, reflecting TLS state.
        """
        caps = [b"CAPA", b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE"]
        if self.tlsAvailable:
            caps.append(b"STLS")
        if self.plaintextLoginAllowed:
            caps.append(b"USER")
        mechanisms = self.mechanisms()
        if mechanisms:
            caps.append(b"SASL " + b" ".join(mechanisms))
        return caps

    # The contract (ILoginFrontend)

    def greet(self) -> None:
        greeting = b"+OK " + self.context.hostname.encode("idna") + b" POP3 proxy ready."
        if self.digestAuth:
            self.timestamp = self.newChallenge()
            greeting += b" " + self.timestamp
        self.sendLine(greeting)

    def sayGoodbye(self, reason: EndReason, text: str) -> None:
        if reason is EndReason.LOGIN_FAILED:
            # POP3 has no goodbye line: the failed login's -ERR was the last
            # word.
            return
        self.err(oneLine(text, ascii=True))

    def answerStartTLS(self, command: Command, refusal: StartTLSRefusal | None) -> None:
        if refusal is None:
            self.ok("Begin TLS negotiation now.")
        else:
            self.err(_STARTTLS_REFUSALS[refusal])

    def forgetBeforeTLS(self) -> None:
        # A user name given before TLS is forgotten (RFC 2595 section 4).
        self._user = None

    def saslChallenge(self, command: Command, data: bytes) -> None:
        self.sendLine(b"+ " + b64encode(data))

    def answerSASLRefusal(self, command: Command, refusal: SASLRefusal, mechanism: str) -> None:
        if refusal is SASLRefusal.UNSUPPORTED:
            self.err("Unsupported authentication mechanism.")
        elif refusal is SASLRefusal.PRIVACY_REQUIRED:
            self.err(_PLAINTEXT_DISALLOWED)
        elif refusal is SASLRefusal.BAD_BASE64:
            self.err("Invalid base64 data.")
        elif refusal is SASLRefusal.NO_INITIAL_RESPONSE:
            self.err("CRAM-MD5 takes no initial response.")
        elif refusal is SASLRefusal.ABORTED:
            self.err("Authentication aborted by client.")
        elif refusal is SASLRefusal.AUTHORIZATION:
            self.err("Authorization identity not supported.")
        else:
            self.err("Invalid " + mechanism + " response.")

    def makeBackendLogin(self, job: LoginJob) -> BackendProtocol:
        # With the CAPA lists the proxy's POP3 sessions remember.
        return POP3BackendLogin(job, self.context.reactor, self.limits.backendTimeout, sharedMemory(self.context))

    def answerLogin(self, command: Command, backend: BackendProtocol) -> IRelayGuard:
        self.sendLine(cast(POP3BackendLogin, backend).okLine)
        return POP3Guard()

    def answerLoginFailure(self, command: Command, failure: LoginFailed) -> None:
        if failure.kind is FailureKind.AUTH:
            self.err("[AUTH] " + (oneLine(failure.message, ascii=True) or _AUTH_FAILED))
        elif failure.kind is FailureKind.REFUSED and failure.clientText:
            self.sendLine(oneLine(failure.clientText, 510, ascii=True).encode("ascii"))
        else:
            self.err("[SYS/TEMP] " + (oneLine(failure.message, ascii=True) or _UNAVAILABLE))

    # The command loop

    def readSASLResponse(self) -> bool:
        line = self.input.nextLine(MAX_SASL_LINE)
        if line is None:
            return False
        if isinstance(line, BadLine):
            self.abandonSASL()
            self.err(line.reason)
        else:
            self.saslResponse(line.data.strip())
        return True

    def readCommand(self) -> bool:
        event = self.input.nextCommand()
        if event is None:
            return False
        if isinstance(event, BadLine):
            self._bad(event.reason)
            return True
        handler = self._commands.get(event.name)
        if handler is not None:
            self.badCommands = 0
            getattr(self, handler)(event)
        elif event.name in _AFTER_LOGIN:
            self._bad("Command not permitted before authentication.")
        else:
            self._bad("Unknown command.")
        return True

    def _bad(self, text: str) -> None:
        self.err(text)
        self.countBadCommand()

    # Commands

    def do_CAPA(self, command: Command) -> None:
        self.sendLine(b"+OK Capability list follows")
        for capability in self.capabilities():
            self.sendLine(capability)
        self.sendLine(b".")

    def do_NOOP(self, command: Command) -> None:
        self.ok()

    def do_QUIT(self, command: Command) -> None:
        self.ok("Logging out.")
        self.end(EndReason.LOGGED_OUT)

    def do_STLS(self, command: Command) -> None:
        self.startTLSCommand(command, hasArguments=command.argument is not None)

    def do_USER(self, command: Command) -> None:
        if not self.plaintextLoginAllowed:
            self.err(_PLAINTEXT_DISALLOWED)
            return
        if not command.argument:
            self.err("No username given.")
            return
        self._user = command.argument
        self.ok()

    def do_PASS(self, command: Command) -> None:
        if not self.plaintextLoginAllowed:
            self.err(_PLAINTEXT_DISALLOWED)
            return
        user, self._user = self._user, None
        if user is None:
            self.err("No username given.")
            return
        self.loginWith(command, Credentials("LOGIN", _text(user), password=command.argument or b""))

    def do_APOP(self, command: Command) -> None:
        if self.timestamp is None:
            self.err("APOP is not enabled.")
            return
        if not self.plaintextLoginAllowed:
            self.err("[AUTH] Authentication disallowed on non-secure (SSL/TLS) connections.")
            return
        parsed = parseDigestResponse(command.argument or b"")
        if parsed is None:
            self.err("Invalid APOP parameters.")
            return
        user, digest = parsed
        self.loginWith(command, Credentials("APOP", _text(user), challenge=self.timestamp, response=digest))

    def do_AUTH(self, command: Command) -> None:
        args = command.arguments()
        if not args:
            # Old-style discovery (Outlook): list the mechanisms.
            self.ok()
            for mechanism in self.mechanisms():
                self.sendLine(mechanism)
            self.sendLine(b".")
            return
        if len(args) > 2:
            self.err("AUTH takes a mechanism and an optional initial response.")
            return
        self.authenticate(command, args[0].decode("ascii", "replace"), args[1] if len(args) == 2 else None)
