"""
The submission front end (ports 587/465): the client logs in with AUTH
PLAIN/LOGIN (and CRAM-MD5 with C{digest_auth}), then talks to its backend
directly.

What it shares with the MX front end (EHLO, STARTTLS, the command loop,
replies in order) is L{mailproxy.smtp._base.SMTPFrontend}; the SASL
exchange and the login are the core's (L{CommandFrontend}), this module
only words their outcomes. After login, L{mailproxy.smtp._guard.SMTPGuard}
keeps the client from saying what only the proxy may say to the backend
(XCLIENT, XFORWARD).
"""

from __future__ import annotations

from base64 import b64encode
from typing import cast

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._backend import BackendProtocol, LoginJob
from .._commandloop import CommandFrontend
from .._contract import ILoginFrontend
from .._guard import IRelayGuard
from .._login import LoginFailed
from .._outcomes import EndReason, FailureKind, SASLRefusal
from .._safetext import oneLine
from .._session import ProxyContext
from ..settings import Listener
from ._backend import SMTPBackendLogin
from ._base import DATA_END_TIMEOUT, INTERNAL_ERROR_GOODBYE, SMTPFrontend
from ._guard import SMTPGuard
from ._parser import Command, TooLong

#: Longest AUTH response line (RFC 4954 §4 calls 12288 octets enough).
MAX_SASL_LINE = 12288 + 2

#: The answer to an authentication exchange that ends without a login, by
#: why the core ended it (C{BAD_RESPONSE} names the mechanism).
_SASL_REFUSALS = {
    SASLRefusal.UNSUPPORTED: (504, "5.5.4", "Unrecognized authentication type"),
    SASLRefusal.PRIVACY_REQUIRED: (530, "5.7.0", "Must issue a STARTTLS command first"),
    SASLRefusal.BAD_BASE64: (501, "5.5.2", "Cannot decode response"),
    SASLRefusal.BAD_INITIAL_RESPONSE: (501, "5.5.2", "Cannot decode response"),
    SASLRefusal.NO_INITIAL_RESPONSE: (501, "5.5.4", "CRAM-MD5 takes no initial response"),
    SASLRefusal.ABORTED: (501, "5.7.0", "Authentication aborted"),
    SASLRefusal.AUTHORIZATION: (535, "5.7.8", "Authorization identity not supported"),
}


@implementer(ILoginFrontend)
class SubmissionFrontend(SMTPFrontend, CommandFrontend):
    """
    Message submission (RFC 6409): the client logs in with AUTH, then talks
    to its backend directly.

    States: those of L{SMTPFrontend}, and C{SASL}, C{LOGIN} and C{RELAY} of
    the core's login.
    """

    saslLoginUserRequired = True
    loginFailureReason = EndReason.TOO_MANY_FAILED_LOGINS
    internalErrorGoodbye = INTERNAL_ERROR_GOODBYE
    log = Logger()
    _commands = {
        **SMTPFrontend._commands,
        b"AUTH": "do_AUTH",
        b"MAIL": "authenticationRequired",
        b"RCPT": "authenticationRequired",
        b"DATA": "authenticationRequired",
        b"BDAT": "do_BDAT",
    }

    def __init__(self, context: ProxyContext, listener: Listener) -> None:
        super().__init__(context, listener)
        # The guard of the relayed session, after login.
        self._guard: SMTPGuard | None = None
        # When the reply to a message's end is due at the latest, once a
        # drop waits for it; and the call that drops at that bound.
        self._replyDue: float | None = None
        self._replyBound: IDelayedCall | None = None

    @property
    def finishing(self) -> float:
        if self._replyDue is None:
            return 0.0
        return max(0.0, self._replyDue - self.context.reactor.seconds())

    def drop(self, reason: str, why: EndReason = EndReason.DROPPED) -> None:
        guard = self._guard
        relay = self.relay
        if (
            self._replyDue is None
            and guard is not None
            and guard.awaitingMessageReply
            and relay is not None
            and relay.endReason is None
        ):
            # The backend may already have queued the message: cut now, the
            # client would never hear it and send the message again. The
            # relay has no reply timeout of its own: MX's data-reply timeout
            # bounds the wait.
            self._replyDue = self.context.reactor.seconds() + DATA_END_TIMEOUT

            def dropNow() -> None:
                if self._replyBound is not None and self._replyBound.active():
                    self._replyBound.cancel()
                self._replyBound = None
                self._replyDue = None
                super(SubmissionFrontend, self).drop(reason, why)

            self._replyBound = self.context.reactor.callLater(DATA_END_TIMEOUT, dropNow)
            guard.whenMessageAnswered(dropNow)
            return
        if self._replyDue is not None:
            # Already waiting for the reply; it ends the session.
            return
        super().drop(reason, why)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # A client gone while its drop waited for the reply: no bound left
        # to keep.
        if self._replyBound is not None and self._replyBound.active():
            self._replyBound.cancel()
        self._replyBound = None
        self._replyDue = None
        super().connectionLost(reason)

    def ownKeywords(self) -> list[str]:
        own = super().ownKeywords()
        mechanisms = self.offeredMechanisms()
        if mechanisms:
            own.append("AUTH " + " ".join(mechanisms))
        return own

    # The contract (ILoginFrontend)

    def makeBackendLogin(self, job: LoginJob) -> BackendProtocol:
        return self.backendFor(SMTPBackendLogin, job)

    def lineLimit(self) -> int:
        limit = super().lineLimit()
        if self.input.startsWith(b"AUTH "):
            # An AUTH command line with an initial response (an OAuth
            # token) may be as long as a response line (RFC 4954 section 4).
            return max(limit, MAX_SASL_LINE)
        return limit

    def readSASLResponse(self) -> bool:
        line = self.input.nextLine(MAX_SASL_LINE)
        if line is None:
            return False
        if isinstance(line, TooLong):
            self.abandonSASL()
            self.error(500, "5.5.6", "Authentication Exchange line is too long")
        else:
            self.saslResponse(line.strip(b" "))
        return True

    def saslChallenge(self, command: Command, data: bytes) -> None:
        self.send(334, None, b64encode(data))

    def answerSASLRefusal(self, command: Command, refusal: SASLRefusal, mechanism: str) -> None:
        if refusal is SASLRefusal.BAD_RESPONSE:
            self.error(501, "5.5.2", "Invalid " + mechanism + " response")
        else:
            self.error(*_SASL_REFUSALS[refusal])

    def answerLogin(self, command: Command, backend: BackendProtocol) -> IRelayGuard:
        self.send(235, "2.7.0", "Authentication successful")
        extensions = cast(SMTPBackendLogin, backend).extensions
        chunking = extensions is not None and "CHUNKING" in extensions
        self._guard = SMTPGuard(chunking=chunking)
        return self._guard

    def answerLoginFailure(self, command: Command, failure: LoginFailed) -> None:
        if failure.kind is FailureKind.REFUSED and failure.clientText:
            self.sendLine(oneLine(failure.clientText, ascii=True).encode("utf-8"))
        elif failure.kind is FailureKind.AUTH:
            self.send(535, "5.7.8", "Authentication credentials invalid")
        else:
            self.send(454, "4.7.0", oneLine(failure.message, ascii=True) or "Temporary authentication failure")

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
            # Before TLS where the listener asks for it, SMTP has no AUTH
            # at all (the EHLO reply offers none): refused before its
            # arguments are read.
            self.answerSASLRefusal(command, SASLRefusal.PRIVACY_REQUIRED, "")
            return
        words = command.argument.strip(b" ").split(b" ")
        if not words[0] or len(words) > 2:
            self.error(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
            return
        self.authenticate(command, words[0].decode("ascii", "replace"), words[1] if len(words) == 2 else None)
