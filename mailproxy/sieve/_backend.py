"""
The ManageSieve login dialogue towards a backend.

Order (as Pigeonhole's own proxy does it): the capability greeting ->
STARTTLS, the handshake and the capability list the server re-sends after
it (if configured; what was learnt before TLS is forgotten, the C{XCLIENT}
offer included) -> C{XCLIENT} with the client's addresses (if forwarding
that way) and C{AUTHENTICATE "PLAIN"} with an initial response, in one
write (the server answers them in order; a refused XCLIENT fails the login
whatever the login's reply) -> the server's C{OK} line, which the client
gets as the reply to its own AUTHENTICATE.
"""

from __future__ import annotations

import re
from typing import Callable

from twisted.logger import Logger

from .._backend import BackendProtocol, LoginJob, LoginState, forwardedIdentity
from .._outcomes import FailureKind
from .._sasl import OAUTH_INVALID_TOKEN, decodeBase64, oauthErrorAck, plainResponse
from ._parser import Atom, Fatal, Line, LineParser, SieveValue, clientString, formatValues

#: Longest backend line (and literal) accepted during login.
MAX_BACKEND_LINE = 65536
#: Capability lines accepted in one greeting: real servers send about a
#: dozen; a greeting that goes on is refused rather than collected until
#: the timeout.
MAX_CAPABILITY_LINES = 256
#: Response codes of a NO to AUTHENTICATE that mean "try later".
_TEMPORARY_CODES = frozenset([b"TRYLATER"])
#: Response codes that mean the proxy's own set-up is wrong (TLS towards
#: the backend is needed), not the client's password.
_SETUP_CODES = frozenset([b"ENCRYPT-NEEDED", b"AUTH-TOO-WEAK"])

#: The XCLIENT attributes sent, in order (see L{forwardedIdentity}).
_XCLIENT_ATTRIBUTES = ("ADDR", "PORT", "DESTADDR", "DESTPORT", "SESSION", "TTL", "CLIENT-TRANSPORT", "DESTNAME")

_XCLIENT_WORD = re.compile(rb"[!#-'*-\[\]-z|-~]+\Z")


def responseCode(values: tuple[SieveValue, ...]) -> bytes:
    """
    The upper-cased response code of an C{OK}/C{NO}/C{BYE} line, or C{b""}.
    """
    if len(values) > 1 and isinstance(values[1], tuple) and values[1]:
        first = values[1][0]
        if isinstance(first, Atom):
            return first.value.upper()
    return b""


class SieveBackendLogin(BackendProtocol):
    """
    Logs in to a ManageSieve server for one client.

    @ivar capabilities: the server's current capabilities, upper-cased name
        to value (L{None} for a capability without one).
    @ivar okLine: the server's reply to AUTHENTICATE, CRLF included, once
        logged in.
    """

    log = Logger()

    def __init__(self, job: LoginJob, clock, timeout: float) -> None:
        super().__init__(job, clock, timeout)
        self.capabilities: dict[bytes, bytes | None] = {}
        self.okLine = b""
        # An OAuth error challenge the server sent, for the client.
        self._saslError = b""
        self._parser = LineParser(MAX_BACKEND_LINE, MAX_BACKEND_LINE, MAX_BACKEND_LINE)

    # Reading

    def dialogueReceived(self, data: bytes) -> None:
        self._parser.feed(data)
        while not self._done:
            event = self._parser.next()
            if event is None:
                return
            if not isinstance(event, Line):
                reason = event.reason if isinstance(event, Fatal) else "unparsable line: " + event.reason
                self.fail(FailureKind.UNAVAILABLE, "backend sent " + reason)
                return
            handler = _HANDLERS.get(self.state)
            if handler is None:
                self.fail(FailureKind.UNAVAILABLE, "backend sent data while TLS was starting")
                return
            handler(self, event.values)

    def buffered(self) -> int:
        return self._parser.buffered

    def _status(self, values: tuple[SieveValue, ...]) -> bytes:
        """
        C{OK}, C{NO} or C{BYE} (upper-cased) if C{values} is a status line,
        else C{b""}.
        """
        if values and isinstance(values[0], Atom):
            status = values[0].value.upper()
            if status in (b"OK", b"NO", b"BYE"):
                return status
        return b""

    # The dialogue

    def _greetingLine(self, values: tuple[SieveValue, ...]) -> None:
        status = self._status(values)
        if status == b"OK":
            self._greeted()
            return
        if status:
            self.fail(FailureKind.UNAVAILABLE, "backend greeted with " + status.decode("ascii") + " " + _code(values))
            return
        if not values or not isinstance(values[0], bytes) or len(values) > 2:
            self.fail(FailureKind.UNAVAILABLE, "backend sent an invalid capability line")
            return
        value = values[1] if len(values) == 2 else None
        if value is not None and not isinstance(value, bytes):
            self.fail(FailureKind.UNAVAILABLE, "backend sent an invalid capability line")
            return
        if len(self.capabilities) >= MAX_CAPABILITY_LINES:
            self.fail(FailureKind.UNAVAILABLE, "backend sent too many capabilities")
            return
        self.capabilities[values[0].upper()] = value

    def _greeted(self) -> None:
        backend = self.job.backend
        if self.job.tls == "starttls" and not self.tlsActive:
            self.askForTLS(b"STARTTLS", b"STARTTLS" in self.capabilities)
            return
        login = self._loginCommand()
        if login is None:
            return
        if backend.forward == "xclient" or (backend.forward == "auto" and b"XCLIENT" in self.capabilities):
            self.state = LoginState.IDENTITY
            self.send(b"XCLIENT " + self._xclientArguments() + b"\r\n" + login)
            return
        self.state = LoginState.LOGIN
        self.send(login)

    def _startTLSReply(self, values: tuple[SieveValue, ...]) -> None:
        self.tlsAnswered(self._status(values) == b"OK")

    def tlsReady(self) -> None:
        # The server re-sends its capabilities now (RFC 5804 section 2.2);
        # what it said in clear is forgotten.
        self.capabilities = {}
        self.state = LoginState.GREETING

    def _xclientArguments(self) -> bytes:
        identity = forwardedIdentity(self.job.client)
        words = []
        for key in _XCLIENT_ATTRIBUTES:
            value = identity.get(key, "")
            word = (key + "=" + value).encode("utf-8", "replace")
            # Each is sent as an atom; anything that is not one is left out.
            if value and _XCLIENT_WORD.match(word):
                words.append(word)
        return b" ".join(words)

    def _xclientReply(self, values: tuple[SieveValue, ...]) -> None:
        if self._status(values) != b"OK":
            self.fail(FailureKind.UNAVAILABLE, "backend refused XCLIENT " + _code(values) + "; is the proxy in its login_trusted_networks?")
            return
        # The AUTHENTICATE went with the XCLIENT: its reply follows.
        self.state = LoginState.LOGIN

    def _loginCommand(self) -> bytes | None:
        """
        The AUTHENTICATE command line, CRLF included, or L{None} (the login
        failed) when the server offers no SASL PLAIN.
        """
        mechanisms = (self.capabilities.get(b"SASL") or b"").upper().split()
        if self.job.passesToken:
            mechanism, response = self.job.saslLogin()
            if mechanism not in mechanisms:
                self.fail(FailureKind.UNAVAILABLE, "backend does not offer SASL " + mechanism.decode("ascii"))
                return None
            return b'AUTHENTICATE "' + mechanism + b'" ' + clientString(response) + b"\r\n"
        if b"PLAIN" not in mechanisms:
            hint = ""
            if not self.tlsActive and b"STARTTLS" in self.capabilities:
                hint = "; it may want TLS first (tls = starttls)"
            self.fail(FailureKind.UNAVAILABLE, "backend does not offer SASL PLAIN" + hint)
            return None
        response = plainResponse(*self.job.saslIdentities())
        return b'AUTHENTICATE "PLAIN" ' + clientString(response) + b"\r\n"

    def _loginReply(self, values: tuple[SieveValue, ...]) -> None:
        status = self._status(values)
        if status == b"OK":
            self.okLine = formatValues(values) + b"\r\n"
            self.succeed(self._parser.takeRemaining())
            return
        code = responseCode(values)
        if status == b"NO" and code in _TEMPORARY_CODES:
            self.fail(FailureKind.UNAVAILABLE, "backend login: NO " + _code(values))
        elif status == b"NO" and code in _SETUP_CODES:
            self.fail(FailureKind.UNAVAILABLE, "backend login: NO " + _code(values) + "; configure tls for it")
        elif status == b"NO":
            self.fail(FailureKind.AUTH, "backend refused the credentials", saslError=self._saslError)
        elif status == b"BYE":
            self.fail(FailureKind.UNAVAILABLE, "backend answered the login with BYE " + _code(values))
        elif (
            self.job.passesToken
            and self.job.credentials is not None
            and not self._saslError
            and len(values) == 1
            and isinstance(values[0], bytes)
        ):
            # The server's error challenge to the token (RFC 7628): keep it
            # for the client, answer as a client does, await the NO.
            self._saslError = decodeBase64(values[0]) or OAUTH_INVALID_TOKEN
            self.send(clientString(oauthErrorAck(self.job.credentials.mechanism)) + b"\r\n")
        else:
            # A SASL challenge: PLAIN with an initial response needs none.
            self.fail(FailureKind.UNAVAILABLE, "backend sent an unexpected SASL challenge")


#: What reads a server line in each state: the class's functions, not the
#: login's bound methods (a dict of those on the login would be a reference
#: cycle per login).
_HANDLERS: dict[LoginState, Callable[[SieveBackendLogin, tuple[SieveValue, ...]], None]] = {
    LoginState.GREETING: SieveBackendLogin._greetingLine,
    LoginState.STARTTLS: SieveBackendLogin._startTLSReply,
    LoginState.IDENTITY: SieveBackendLogin._xclientReply,
    LoginState.LOGIN: SieveBackendLogin._loginReply,
}


def _code(values: tuple[SieveValue, ...]) -> str:
    """
    A status line's response code for logs, e.g. C{"(TRYLATER)"}.
    """
    code = responseCode(values)
    return "(" + code.decode("ascii", "replace") + ")" if code else "(no code)"
