"""
The POP3 login dialogue towards a backend.

Order (STLS first, so that nothing about the client travels in clear):
greeting -> STLS and handshake (if configured) -> CAPA (unless remembered,
see below) -> XCLIENT with the
client's addresses (if forwarding by XCLIENT) and the login, pipelined ->
the backend's C{+OK}, which the client gets verbatim.

The CAPA list is remembered per backend port for L{CAPA_KEPT} seconds
(L{CapabilityMemory}, one per proxy, L{sharedMemory}): the logins after the
first skip that round trip. A login made by a remembered list that the
server refuses without a response code asks CAPA again, and logs in again
if the fresh list no longer offers the SASL mechanism it used; a refused
XCLIENT forgets the list and fails as before.

The login is C{AUTH PLAIN} with an initial response (the master user as
authentication identity and the account as authorization identity) when the
server's CAPA lists C{SASL PLAIN}, otherwise C{USER}/C{PASS} (a master user
as C{user*master}).

Dovecot advertises XCLIENT only to peers in its C{login_trusted_networks},
as a C{[XCLIENT]} prefix of its greeting text (C{+OK [XCLIENT] Dovecot
ready.}); C{forward = "auto"} uses it then, or when CAPA lists XCLIENT.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable, cast

from twisted.logger import Logger
from twisted.python.failure import Failure

from .._backend import BackendProtocol, LoginJob, LoginState, forwardedIdentity
from .._outcomes import FailureKind
from .._sasl import OAUTH_INVALID_TOKEN, decodeBase64, oauthErrorAck, plainResponse

if TYPE_CHECKING:
    from .._session import ProxyContext

#: Longest backend response line accepted during login.
MAX_BACKEND_LINE = 8192
#: CAPA lines accepted from a backend: real servers send about fifteen; a
#: list that goes on is refused rather than collected until the timeout.
MAX_CAPA_LINES = 256
#: The end of a CAPA list: a line of one dot, at the start of the buffer or
#: after a line's end.
_CAPA_END = re.compile(rb"(?:^|(?<=\n))\.\r*\n")
#: Longest command line a POP3 server must accept (RFC 2449 section 4).
MAX_COMMAND_LINE = 255
#: Response codes that tell the client something it can act on: passed on.
_PASSED_ON_CODES = frozenset([b"IN-USE", b"LOGIN-DELAY", b"SYS/PERM"])

#: The XCLIENT attributes sent, in order (see L{forwardedIdentity}).
_XCLIENT_ATTRIBUTES = ("ADDR", "PORT", "SESSION", "TTL", "CLIENT-TRANSPORT", "DESTADDR", "DESTPORT", "DESTNAME")

#: Seconds a backend port's CAPA list is used without asking again.
CAPA_KEPT = 60.0
#: Backend ports whose CAPA lists a process remembers at most.
CAPA_PORTS = 256

_CODE = re.compile(rb"\[([^\]\s]+)\]")
_HOSTNAME = re.compile(rb"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z")
_UNSAFE = re.compile(rb"[\x00-\x1f\x7f]")


def parseCode(text: bytes) -> bytes:
    """
    The response code at the start of a reply's text (after C{+OK} or
    C{-ERR}), upper-cased, or C{b""}.
    """
    match = _CODE.match(text.lstrip(b" "))
    return match.group(1).upper() if match else b""


class CapabilityMemory:
    """
    The CAPA lists of the backend ports a proxy logs in to, each for
    L{CAPA_KEPT} seconds after it was read: a POP3 server's capabilities
    change with its configuration, not between logins, and asking for them
    is a round trip of every login (neither nginx's nor Dovecot's proxy
    asks at all).

    A key is the backend (its whole configuration, TLS settings included:
    a reload that changes it starts afresh) and the name of its port: the
    two say whether the list was read over TLS.
    """

    def __init__(self, size: int = CAPA_PORTS) -> None:
        self.size = size
        self._lists: dict[object, tuple[float, list[bytes]]] = {}

    def get(self, key: object, now: float) -> list[bytes] | None:
        """
        The list read for C{key} less than L{CAPA_KEPT} seconds before
        C{now}, if any.
        """
        known = self._lists.get(key)
        if known is None or not 0 <= now - known[0] < CAPA_KEPT:
            return None
        return known[1]

    def keep(self, key: object, capabilities: list[bytes], now: float) -> None:
        """
        Remember C{capabilities}, read for C{key} at C{now}; the oldest
        list goes when there are L{size} already.
        """
        self._lists.pop(key, None)
        if len(self._lists) >= self.size:
            del self._lists[next(iter(self._lists))]
        self._lists[key] = (now, capabilities)

    def forget(self, key: object) -> None:
        """
        Ask C{key}'s server again next time.
        """
        self._lists.pop(key, None)


def sharedMemory(context: ProxyContext) -> CapabilityMemory:
    """
    The memory of CAPA lists the POP3 sessions of C{context} share.
    """
    memory = context.shared.get(_MEMORY)
    if memory is None:
        memory = context.shared[_MEMORY] = CapabilityMemory()
    return cast(CapabilityMemory, memory)


#: The key of L{sharedMemory} in a context's C{shared}.
_MEMORY = "pop3-capabilities"


class POP3BackendLogin(BackendProtocol):
    """
    Logs in to a POP3 server for one client.

    @ivar capabilities: the server's CAPA lines (after TLS, if any), upper-
        cased; empty if it has no CAPA. Read for this login, or remembered
        from an earlier one (L{CapabilityMemory}).
    @ivar xclientOffered: the greeting carried Dovecot's C{[XCLIENT]}.
    @ivar okLine: the server's C{+OK} line to the login, for the client.
    """

    log = Logger()
    startTLSCommand = "STLS"

    def __init__(self, job: LoginJob, clock, timeout: float, memory: CapabilityMemory | None = None) -> None:
        """
        @param memory: where CAPA lists are remembered; L{None} to ask for
            one every time.
        """
        super().__init__(job, clock, timeout)
        self._memory = memory
        self.capabilities: list[bytes] = []
        self.xclientOffered = False
        self.okLine = b""
        self._buffer = b""
        self._capa: list[bytes] | None = None
        # The handlers of the replies to the login still to come, oldest
        # first; each takes itself off once its reply is complete.
        self._expected: list[Callable[[bytes], None]] = []
        self._afterUser: bytes | None = None
        self._afterContinuation: bytes | None = None
        # An OAuth error challenge the server sent, for the client.
        self._saslError = b""
        # Whether the capabilities are remembered, not read for this login;
        # a refusal of the login waiting for a fresh CAPA list.
        self._remembered = False
        self._refusal: bytes | None = None
        # The SASL mechanism the login used (None: USER/PASS, which every
        # server takes), for a refusal of a login made by a remembered list.
        self._mechanismTaken: bytes | None = None
        # The server took XCLIENT (not sent again if the login is).
        self._forwarded = False

    # Reading

    def dialogueReceived(self, data: bytes) -> None:
        self._buffer += data
        # The CAPA list's end is looked for once per read: not there, the
        # lines before it are taken one by one, and the next read looks
        # again.
        capaLooked = False
        while not self._done:
            if not capaLooked and self.state is LoginState.CAPABILITIES and self._capa is not None:
                capaLooked = True
                if self._capaRead():
                    continue
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_BACKEND_LINE:
                    self.fail(FailureKind.UNAVAILABLE, "backend response line too long")
                return
            line = self._buffer[:end].rstrip(b"\r")
            self._buffer = self._buffer[end + 1 :]
            self._line(line)

    def buffered(self) -> int:
        return len(self._buffer)

    def _line(self, line: bytes) -> None:
        if self.state is LoginState.GREETING:
            self._greeting(line)
        elif self.state is LoginState.STARTTLS:
            self.tlsAnswered(line.startswith(b"+OK"), _show(line))
        elif self.state is LoginState.CAPABILITIES:
            self._capaLine(line)
        elif self.state is LoginState.LOGIN and self._expected:
            self._expected[0](line)
        else:
            self.fail(FailureKind.UNAVAILABLE, "backend sent an unexpected line")

    # The dialogue

    def _greeting(self, line: bytes) -> None:
        if not line.startswith(b"+OK"):
            self.fail(FailureKind.UNAVAILABLE, "unexpected greeting: " + _show(line))
            return
        self.xclientOffered = line[3:].upper().startswith(b" [XCLIENT]")
        if self.job.tls == "starttls":
            self.askForTLS(b"STLS")
            return
        self._askCapabilities()

    def tlsReady(self) -> None:
        self._askCapabilities()

    def _askCapabilities(self) -> None:
        # Asked after TLS only: what a server says in clear could have been
        # changed on the way (RFC 2595 section 4). The memory's key says
        # whether the list was read over TLS.
        known = None if self._memory is None else self._memory.get(self._memoryKey(), self._clock.seconds())
        if known is not None:
            self.capabilities = known
            self._remembered = True
            self._login()
            return
        self._remembered = False
        self._capa = None
        self.state = LoginState.CAPABILITIES
        self.send(b"CAPA\r\n")

    def _memoryKey(self) -> object:
        return (self.job.backend, self.job.portName or self.job.protocol)

    def _capabilitiesRead(self, capabilities: list[bytes]) -> None:
        self.capabilities = capabilities
        if self._memory is not None:
            self._memory.keep(self._memoryKey(), capabilities, self._clock.seconds())
        refusal, self._refusal = self._refusal, None
        if refusal is not None and (self._mechanismTaken is None or self._offers(b"SASL", self._mechanismTaken)):
            # The login was refused, and the server still offers the way it
            # was made: the refusal stands, the password tried once.
            self._refused(refusal)
            return
        self._expected = []
        self._afterUser = self._afterContinuation = None
        self._saslError = b""
        self._login()

    def _capaRead(self) -> bool:
        """
        Read the rest of the CAPA list at once, if its end (the C{.} line)
        has arrived: the usual case, the whole reply in one read. Its lines
        are taken as L{_capaLine} takes them one by one.

        @return: whether it was read (the login then goes on).
        """
        end = _CAPA_END.search(self._buffer)
        if end is None:
            return False
        # The split leaves an empty string after the last line's LF.
        lines = [_capability(line.rstrip(b"\r")) for line in self._buffer[: end.start()].split(b"\n")[:-1]]
        self._buffer = self._buffer[end.end() :]
        capa = self._capa or []
        if len(lines) > MAX_CAPA_LINES - len(capa):
            self.fail(FailureKind.UNAVAILABLE, "backend CAPA list too long")
            return True
        self._capabilitiesRead(capa + lines)
        return True

    def _capaLine(self, line: bytes) -> None:
        if self._capa is None:
            if line.startswith(b"+OK"):
                self._capa = []
                return
            # A server without CAPA (RFC 1939 only): USER/PASS it is.
            self._capabilitiesRead([])
            return
        if line == b".":
            self._capabilitiesRead(self._capa)
            return
        if len(self._capa) >= MAX_CAPA_LINES:
            self.fail(FailureKind.UNAVAILABLE, "backend CAPA list too long")
            return
        self._capa.append(_capability(line))

    def _login(self) -> None:
        self.state = LoginState.LOGIN
        job = self.job
        authzid, authcid, password = job.saslIdentities()
        if any(_UNSAFE.search(value) for value in (authzid, authcid, password)):
            # Only a rewritten login from the router can get here: client
            # lines never carry CR, LF or NUL.
            self.fail(FailureKind.UNAVAILABLE, "the login name or password contains control characters")
            return
        commands = []
        if self._forwardByXCLIENT():
            commands.append(self._xclientCommand())
            self._expected.append(self._xclientReply)
        if job.passesToken:
            mechanism, response = job.saslLogin()
            if not self._offers(b"SASL", mechanism):
                if self._remembered:
                    # Perhaps offered since: ask the server.
                    self._forgetRemembered()
                    self._askCapabilities()
                    return
                self.fail(FailureKind.UNAVAILABLE, "backend does not offer SASL " + mechanism.decode("ascii"))
                return
            self._mechanismTaken = mechanism
            command = b"AUTH " + mechanism + b" " + response
            if len(command) + 2 > MAX_COMMAND_LINE:
                command = b"AUTH " + mechanism
                self._afterContinuation = response
            commands.append(command)
            self._expected.append(self._finalReply)
        elif self._offers(b"SASL", b"PLAIN"):
            self._mechanismTaken = b"PLAIN"
            response = plainResponse(authzid, authcid, password)
            command = b"AUTH PLAIN " + response
            if len(command) + 2 > MAX_COMMAND_LINE:
                command = b"AUTH PLAIN"
                self._afterContinuation = response
            commands.append(command)
            self._expected.append(self._finalReply)
        else:
            if authzid:
                authcid = authzid + job.backend.masterSeparator.encode("utf-8") + authcid
            self._mechanismTaken = None
            commands.append(b"USER " + authcid)
            self._expected += [self._userReply, self._finalReply]
            if self._offers(b"PIPELINING"):
                commands.append(b"PASS " + password)
            else:
                self._afterUser = b"PASS " + password
        self.send(b"".join(command + b"\r\n" for command in commands))

    def _offers(self, name: bytes, argument: bytes | None = None) -> bool:
        for capability in self.capabilities:
            words = capability.split()
            if words and words[0] == name and (argument is None or argument in words[1:]):
                return True
        return False

    def _forwardByXCLIENT(self) -> bool:
        if self._forwarded:
            return False
        forward = self.job.backend.forward
        return forward == "xclient" or (forward == "auto" and (self.xclientOffered or self._offers(b"XCLIENT")))

    def _xclientCommand(self) -> bytes:
        identity = forwardedIdentity(self.job.client)
        words = [b"XCLIENT"]
        for name in _XCLIENT_ATTRIBUTES:
            encoded = identity.get(name, "").encode("ascii", "replace")
            if name.endswith("PORT") and encoded == b"0":
                continue  # no port known
            # Values are raw words: one with a space or control character
            # would split the command, so it is left out.
            if encoded and b" " not in encoded and not _UNSAFE.search(encoded):
                if name != "DESTNAME" or _HOSTNAME.match(encoded):
                    words.append(name.encode("ascii") + b"=" + encoded)
        return b" ".join(words)

    # Replies to the login

    def _xclientReply(self, line: bytes) -> None:
        # A refused XCLIENT, or Dovecot's "+OK You are not from trusted IP -
        # ignoring", would leave the server counting every client as the
        # proxy (its penalties and limits per address included): fail as
        # temporary, so that the misconfiguration shows at once.
        self._expected.pop(0)
        if not line.startswith(b"+OK") or b"not from trusted" in line.lower():
            self._forgetRemembered()
            self.fail(
                FailureKind.UNAVAILABLE,
                "backend did not take XCLIENT (" + _show(line) + "); is the proxy in its login_trusted_networks?",
            )
            return
        self._forwarded = True

    def _userReply(self, line: bytes) -> None:
        self._expected.pop(0)
        if not line.startswith(b"+OK"):
            if self._afterUser is None:
                # PASS went with USER: its reply is still to come, no CAPA
                # can be asked before it.
                self._forgetRemembered()
            self._refused(line)
            return
        if self._afterUser is not None:
            command, self._afterUser = self._afterUser, None
            self.send(command + b"\r\n")

    def _finalReply(self, line: bytes) -> None:
        if line.startswith(b"+OK"):
            self._expected.pop(0)
            self.okLine = _clientLine(line)
            self.succeed(self._buffer)
            return
        if line.startswith(b"+ ") or line == b"+":
            credentials = self.job.credentials
            if self._afterContinuation is None and self.job.passesToken and credentials is not None and not self._saslError:
                # The server's error challenge to the token (RFC 7628): keep
                # it for the client, answer as a client does, await -ERR.
                self._saslError = decodeBase64(line[1:].strip()) or OAUTH_INVALID_TOKEN
                self.send(oauthErrorAck(credentials.mechanism) + b"\r\n")
                return
            if self._afterContinuation is None:
                self.fail(FailureKind.UNAVAILABLE, "backend sent an unexpected continuation")
                return
            response, self._afterContinuation = self._afterContinuation, None
            self.send(response + b"\r\n")
            return
        self._refused(line)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        refusal, self._refusal = self._refusal, None
        if refusal is not None:
            # The server closed after refusing the login, before the fresh
            # CAPA list (RFC 1939 lets it close after an -ERR): the refusal
            # is its answer.
            self._refused(refusal)
        super().connectionLost(reason)

    def _forgetRemembered(self) -> None:
        if self._remembered and self._memory is not None:
            self._remembered = False
            self._memory.forget(self._memoryKey())

    def _refused(self, line: bytes) -> None:
        if self._remembered and not (line.startswith(b"-ERR") and parseCode(line[4:])):
            # A refusal without a response code (RFC 2449's codes are about
            # the account: [AUTH] a wrong password), of a login made by a
            # remembered CAPA list, may be the server's "no such
            # mechanism": ask again, and log in again if the fresh list no
            # longer offers the mechanism used (_capabilitiesRead).
            self._forgetRemembered()
            self._refusal = line
            self._askCapabilities()
            return
        if not line.startswith(b"-ERR"):
            self.fail(FailureKind.UNAVAILABLE, "backend answered the login with: " + _show(line))
            return
        code = parseCode(line[4:])
        if code == b"SYS/TEMP":
            self.fail(FailureKind.UNAVAILABLE, "backend login: SYS/TEMP")
        elif code in _PASSED_ON_CODES:
            clientText = _clientLine(line).decode("utf-8", "replace")
            self.fail(FailureKind.REFUSED, "backend login: " + code.decode("ascii", "replace"), clientText)
        else:
            # [AUTH], no code, or one we do not know: the generic failure, so
            # that no backend wording can tell accounts apart.
            self.fail(FailureKind.AUTH, "backend refused the credentials", saslError=self._saslError)


def _capability(line: bytes) -> bytes:
    """
    A line of a CAPA list (its CRLF gone) as kept: dot-unstuffed and
    upper-cased.
    """
    return (line[1:] if line.startswith(b".") else line).upper()


def _clientLine(line: bytes) -> bytes:
    """
    A backend's reply line made safe to pass on to the client: a bare CR or
    any other control character becomes a space, and the line with its CRLF
    fits the 512 octets of RFC 2449.
    """
    return _UNSAFE.sub(b" ", line)[:510]


def _show(line: bytes) -> str:
    """
    The start of a backend line, for a log (never one we sent).
    """
    return line[:80].decode("ascii", "replace")
