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
from twisted.python.failure import Failure

from .._backend import BackendProtocol, LoginJob
from .._commandloop import CommandFrontend
from .._safetext import oneLine
from .._sasl import Challenge, Refused, ServerExchange, Step, decodeResponse, newChallenge, parseDigestResponse
from .._session import LoginFailed
from ..model import Credentials
from ._backend import POP3BackendLogin
from ._guard import POP3Guard
from ._parser import MAX_SASL_LINE, BadLine, Command, LineParser, RawLine

#: Invalid or unknown commands in a row after which the connection is
#: closed. Dovecot also allows three: a cross-protocol request (an HTTP
#: request sent to a POP3 port by a browser, ALPACA) is many bad lines.
MAX_BAD_COMMANDS = 3

#: Commands of the TRANSACTION state (RFC 1939, RFC 2449).
_AFTER_LOGIN = frozenset(b"STAT LIST RETR DELE RSET TOP UIDL LAST".split())

_PLAINTEXT_DISALLOWED = "[AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
_AUTH_FAILED = "Authentication failed."
_UNAVAILABLE = "Service temporarily unavailable, try again later."


def _text(value: bytes) -> str:
    """
    Client octets as a string that turns back into the same octets.
    """
    return value.decode("utf-8", "surrogateescape")


class POP3Frontend(CommandFrontend):
    """
    The AUTHORIZATION state of POP3 for one client connection.

    States: C{"command"} (reading commands), C{"sasl"} (reading an AUTH
    response line), C{"login"} (waiting for the router and the backend;
    client input stays buffered), C{"relay"}, C{"closed"}.

    @ivar timestamp: the APOP timestamp of the greeting, L{None} when
        digest mechanisms are off.
    """

    protocolName = "pop3"
    internalErrorGoodbye = "[SYS/TEMP] Internal error."
    maxBadCommands = MAX_BAD_COMMANDS
    log = Logger()

    def __init__(self, context, listener) -> None:
        super().__init__(context, listener)
        self.parser = LineParser()
        self.digestAuth = listener.digestAuth
        self.timestamp: bytes | None = None
        self._user: bytes | None = None
        self._exchange: ServerExchange | None = None
        self._commands: dict[bytes, Callable[[Command], None]] = {
            b"CAPA": self.do_CAPA,
            b"STLS": self.do_STLS,
            b"USER": self.do_USER,
            b"PASS": self.do_PASS,
            b"APOP": self.do_APOP,
            b"AUTH": self.do_AUTH,
            b"NOOP": self.do_NOOP,
            b"QUIT": self.do_QUIT,
        }

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
        if not self.plaintextLoginAllowed:
            return []
        return [b"PLAIN", b"LOGIN"] + ([b"CRAM-MD5"] if self.digestAuth else [])

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

    # FrontendProtocol

    def greet(self) -> None:
        greeting = b"+OK " + self.context.hostname.encode("idna") + b" POP3 proxy ready."
        if self.digestAuth:
            self.timestamp = self.newChallenge()
            greeting += b" " + self.timestamp
        self.sendLine(greeting)

    def sayGoodbye(self, reason: str) -> None:
        self.err(reason)

    def makeBackendLogin(self, job: LoginJob) -> BackendProtocol:
        return POP3BackendLogin(job, self.context.reactor, self.limits.backendTimeout)

    def frontendDataReceived(self, data: bytes) -> None:
        self.parser.feed(data)
        self.process()

    # The command loop

    def processInput(self) -> None:
        while self.state in ("command", "sasl") and not self.repliesUnread:
            if self.state == "sasl":
                line = self.parser.nextLine(MAX_SASL_LINE)
                if line is None:
                    return
                self.state = "command"
                if isinstance(line, BadLine):
                    self.err(line.reason)
                    continue
                self._saslLine(line)
                continue
            event = self.parser.nextCommand()
            if event is None:
                return
            if isinstance(event, BadLine):
                self._bad(event.reason)
                continue
            handler = self._commands.get(event.name)
            if handler is not None:
                self.badCommands = 0
                handler(event)
            elif event.name in _AFTER_LOGIN:
                self._bad("Command not permitted before authentication.")
            else:
                self._bad("Unknown command.")

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
        self.result = "logged out"
        self.ok("Logging out.")
        self.closeWith()

    def do_STLS(self, command: Command) -> None:
        if command.argument is not None:
            self.err("STLS takes no arguments.")
            return
        if self.tlsActive:
            self.err("TLS is already active.")
            return
        if not self.tlsAvailable:
            self.err("STLS is not available on this port.")
            return
        self.ok("Begin TLS negotiation now.")
        # Anything the client sent after STLS in plaintext could have been
        # injected by an attacker: drop it (CVE-2011-0411), and forget a user
        # name given before TLS (RFC 2595 section 4).
        self.parser.clear()
        self._user = None
        self.startTLS()

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
        self._login(Credentials("LOGIN", _text(user), password=command.argument or b""))

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
        self._login(Credentials("APOP", _text(user), challenge=self.timestamp, response=digest))

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
        mechanism = args[0].upper()
        if mechanism not in (b"PLAIN", b"LOGIN") and not (mechanism == b"CRAM-MD5" and self.digestAuth):
            self.err("Unsupported authentication mechanism.")
            return
        if not self.plaintextLoginAllowed:
            self.err(_PLAINTEXT_DISALLOWED)
            return
        initial: bytes | None = None
        if len(args) == 2:
            initial = self._decode(args[1])
            if initial is None:
                return
        challenge = b""
        if mechanism == b"CRAM-MD5":
            if initial is not None:
                # CRAM-MD5 starts with the server's challenge.
                self.err("CRAM-MD5 takes no initial response.")
                return
            challenge = self.newChallenge()
        self._exchange = ServerExchange(mechanism.decode("ascii"), challenge)
        self._saslStep(self._exchange.start(initial))

    # SASL

    def _decode(self, raw: bytes) -> bytes | None:
        decoded = decodeResponse(raw)
        if decoded is None:
            self.err("Invalid base64 data.")
        return decoded

    def _saslLine(self, line: RawLine) -> None:
        data = line.data.strip()
        if data == b"*":
            self.err("Authentication aborted by client.")
            return
        decoded = self._decode(data)
        if decoded is not None and self._exchange is not None:
            self._saslStep(self._exchange.respond(decoded))

    def _saslStep(self, step: Step) -> None:
        if isinstance(step, Challenge):
            self.sendLine(b"+ " + b64encode(step.data))
            self.state = "sasl"
        elif isinstance(step, Refused) and step.reason == "authorization":
            self.err("Authorization identity not supported.")
        elif isinstance(step, Refused):
            self.err("Invalid " + step.mechanism + " response.")
        else:
            self._login(step)

    # Login

    def _login(self, credentials: Credentials) -> None:
        self.state = "login"
        d = self.login(credentials)
        d.addCallbacks(self._loggedIn, self._loginFailed)
        d.addErrback(self.loginHandlingFailed)

    def _loggedIn(self, backend: POP3BackendLogin) -> None:
        self.sendLine(backend.okLine)
        self.state = "relay"
        self.handOver(backend, toBackend=self.parser.takeRemaining(), guard=POP3Guard())

    def _loginFailed(self, reason: Failure) -> None:
        reason.trap(LoginFailed)
        failure = cast(LoginFailed, reason.value)
        if failure.kind == "auth":
            self.err("[AUTH] " + (oneLine(failure.message) or _AUTH_FAILED))
        elif failure.kind == "refused" and failure.clientText:
            self.sendLine(failure.clientText.encode("utf-8"))
        else:
            self.err("[SYS/TEMP] " + (oneLine(failure.message) or _UNAVAILABLE))
        if failure.close:
            # POP3 has no goodbye line: the -ERR above was the last word.
            self.closeWith()
            return
        self.state = "command"
        self.process()

