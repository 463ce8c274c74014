"""
The submission front end (ports 587/465): the client logs in with AUTH
PLAIN/LOGIN (and CRAM-MD5 with C{digest_auth}), then talks to its backend
directly.

What it shares with the MX front end (EHLO, STARTTLS, the command loop,
replies in order) is L{mailproxy.smtp._base.SMTPFrontend}. After login,
L{mailproxy.smtp._guard.SMTPGuard} keeps the client from saying what only
the proxy may say to the backend (XCLIENT, XFORWARD).
"""

from __future__ import annotations

from base64 import b64encode
from typing import cast

from twisted.logger import Logger
from twisted.python.failure import Failure

from .._backend import BackendProtocol, LoginJob
from .._safetext import oneLine
from .._sasl import Challenge, Refused, ServerExchange, Step, decodeResponse, newChallenge
from .._session import LoginFailed, ProxyContext
from ..model import Credentials
from ..settings import Listener
from ._backend import SMTPBackend
from ._base import SMTPFrontend
from ._guard import SMTPGuard
from ._mx import MXFrontend
from ._parser import Command, TooLong

#: Longest AUTH response line (RFC 4954 §4 calls 12288 octets enough).
MAX_SASL_LINE = 12288 + 2


class SubmissionFrontend(SMTPFrontend):
    """
    Message submission (RFC 6409): the client logs in with AUTH, then talks
    to its backend directly.

    More states: C{"sasl"} (reading an AUTH response line), C{"login"}
    (waiting for the router and the backend), C{"relay"}.
    """

    log = Logger()

    def __init__(self, context: ProxyContext, listener: Listener) -> None:
        super().__init__(context, listener)
        self._exchange: ServerExchange | None = None
        self.inputStates["sasl"] = self._readResponse
        self._commands.update(
            {
                b"AUTH": self.do_AUTH,
                b"MAIL": self.authenticationRequired,
                b"RCPT": self.authenticationRequired,
                b"DATA": self.authenticationRequired,
                b"BDAT": self.do_BDAT,
            }
        )

    def mechanisms(self) -> list[str]:
        """
        The SASL mechanisms offered.
        """
        return ["PLAIN", "LOGIN"] + (["CRAM-MD5"] if self.listener.digestAuth else [])

    def ownKeywords(self) -> list[str]:
        own = super().ownKeywords()
        if self.plaintextLoginAllowed:
            own.append("AUTH " + " ".join(self.mechanisms()))
        return own

    def makeBackendLogin(self, job: LoginJob) -> BackendProtocol:
        return self.backendFor(job, "login")

    def _readResponse(self) -> bool:
        # An AUTH response line.
        line = self.reader.nextLine(MAX_SASL_LINE)
        if line is None:
            return False
        self.state = "command"
        if isinstance(line, TooLong):
            self.error(500, "5.5.6", "Authentication Exchange line is too long")
        else:
            self._saslLine(line)
        return True

    # Commands

    def authenticationRequired(self, command: Command) -> None:
        """
        Mail commands before AUTH (RFC 6409 §4.3).
        """
        self.error(530, "5.7.0", "Authentication required")

    def do_BDAT(self, command: Command) -> None:
        chunk = self.chunkSize(command)
        if chunk is not None:
            # The chunk follows at once: skip it, then refuse.
            self.receiveChunk(chunk[0], None, lambda: self.error(530, "5.7.0", "Authentication required"))

    def do_AUTH(self, command: Command) -> None:
        if self.helo is None:
            self.error(503, "5.5.1", "Error: send HELO/EHLO first")
            return
        if not self.plaintextLoginAllowed:
            self.error(530, "5.7.0", "Must issue a STARTTLS command first")
            return
        words = command.argument.strip(b" ").split(b" ")
        if not words[0] or len(words) > 2:
            self.error(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = words[0].upper().decode("ascii", "replace")
        if mechanism not in self.mechanisms():
            self.error(504, "5.5.4", "Unrecognized authentication type")
            return
        initial = None
        if len(words) == 2:
            initial = self._decode(words[1])
            if initial is None:
                return
        challenge = b""
        if mechanism == "CRAM-MD5":
            if initial is not None:
                self.error(501, "5.5.4", "CRAM-MD5 takes no initial response")
                return
            challenge = newChallenge(self.context.reactor.seconds(), self.context.hostname)
        self._exchange = ServerExchange(mechanism, challenge, loginUserRequired=True)
        self._saslStep(self._exchange.start(initial))

    # SASL

    def _decode(self, raw: bytes) -> bytes | None:
        decoded = decodeResponse(raw)
        if decoded is None:
            self.error(501, "5.5.2", "Cannot decode response")
        return decoded

    def _saslLine(self, line: bytes) -> None:
        if line.strip(b" ") == b"*":
            self.error(501, "5.7.0", "Authentication aborted")
            return
        decoded = self._decode(line.strip(b" "))
        if decoded is not None and self._exchange is not None:
            self._saslStep(self._exchange.respond(decoded))

    def _saslStep(self, step: Step) -> None:
        if isinstance(step, Challenge):
            self.send(334, None, b64encode(step.data))
            self.state = "sasl"
        elif isinstance(step, Refused) and step.reason == "authorization":
            self.error(535, "5.7.8", "Authorization identity not supported")
        elif isinstance(step, Refused):
            self.error(501, "5.5.2", "Invalid " + step.mechanism + " response")
        else:
            self._login(step)

    # Login

    def _login(self, credentials: Credentials) -> None:
        self.state = "login"
        d = self.login(credentials)
        d.addCallbacks(self._loggedIn, self._loginFailed)
        d.addErrback(self.internalError)

    def _loggedIn(self, backend: SMTPBackend) -> None:
        self.send(235, "2.7.0", "Authentication successful")
        self.state = "relay"
        chunking = backend.extensions is not None and "CHUNKING" in backend.extensions
        self.handOver(backend, toBackend=self.reader.takeRemaining(), guard=SMTPGuard(chunking=chunking))

    def _loginFailed(self, reason: Failure) -> None:
        reason.trap(LoginFailed)
        failure = cast(LoginFailed, reason.value)
        if failure.kind == "refused" and failure.clientText:
            self.sendLine(oneLine(failure.clientText).encode("utf-8"))
        elif failure.kind == "auth":
            self.send(535, "5.7.8", "Authentication credentials invalid")
        else:
            self.send(454, "4.7.0", oneLine(failure.message) or "Temporary authentication failure")
        if failure.close:
            self.result = "too many failed logins"
            self.close(421, "4.7.0", self.context.hostname + " Error: too many failed authentication attempts")
            return
        self.state = "command"
        self.process()


def buildFrontend(context: ProxyContext, listener: Listener) -> SMTPFrontend:
    """
    The front end for one connection to an SMTP listener, by its C{mode}.
    """
    if getattr(listener, "mode", None) == "mx":
        return MXFrontend(context, listener)
    return SubmissionFrontend(context, listener)
