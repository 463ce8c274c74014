"""
The IMAP4 login dialogue towards a backend.

Order (as Dovecot's proxy does it, STARTTLS first so that nothing about the
client travels in clear): greeting -> STARTTLS and handshake (if configured)
-> CAPABILITY (if the greeting did not carry it) -> ID with the client's
addresses (if forwarding by ID) and the login, pipelined -> CAPABILITY again
if the login reply did not carry the post-login list.

The login uses C{AUTHENTICATE PLAIN} with an initial response when the
server offers SASL-IR, otherwise C{LOGIN} with literals (non-synchronizing
with LITERAL+), so no quoting bug can ever mangle a password.
"""

from __future__ import annotations

import re
from typing import Callable

from twisted.logger import Logger

from .._backend import BackendProtocol, LoginJob, LoginState, forwardedIdentity
from .._outcomes import FailureKind
from .._safetext import oneLine
from .._sasl import OAUTH_INVALID_TOKEN, decodeBase64, oauthErrorAck, plainResponse

#: Longest backend response line accepted during login.
MAX_BACKEND_LINE = 65536
#: Most untagged lines (alerts) kept during login to show the client; a
#: backend sending more fails the login as temporary.
MAX_LOGIN_UNTAGGED = 64
#: Capabilities a relay cannot honour: never shown to the client.
_HIDDEN_CAPABILITIES = frozenset([b"UNAUTHENTICATE", b"STARTTLS", b"LOGINDISABLED"])
#: Backend NO codes that mean "wrong credentials" (answered generically).
_AUTH_CODES = frozenset([b"", b"AUTHENTICATIONFAILED", b"AUTHORIZATIONFAILED", b"EXPIRED"])
#: Backend NO codes that mean "try later".
_TEMP_CODES = frozenset([b"UNAVAILABLE", b"SERVERBUG"])

#: The client's identity as IMAP ID fields (the names Dovecot reads), in the
#: order sent, by their L{forwardedIdentity} keys.
_ID_FIELDS = (
    ("SESSION", "x-session-id"),
    ("ADDR", "x-originating-ip"),
    ("PORT", "x-originating-port"),
    ("DESTADDR", "x-connected-ip"),
    ("DESTPORT", "x-connected-port"),
    ("TTL", "x-proxy-ttl"),
    ("CLIENT-TRANSPORT", "x-client-transport"),
    ("DESTNAME", "x-connected-name"),
)

#: Handles a tagged reply: its status (upper-cased) and text.
_ReplyHandler = Callable[[bytes, bytes], None]

_CODE = re.compile(rb"^\[([^\]\s]+)(?: ([^\]]*))?\] ?")
_LINE_END = re.compile(rb"[\r\n]")
_LITERAL_END = re.compile(rb"\{(\d{1,9})\+?\}$")
_SAFE_QUOTED = re.compile(rb"^[\x20\x21\x23-\x5b\x5d-\x7e]*$")


def replyText(text: bytes) -> bytes:
    """
    The human-readable text of a backend reply as one safe line for the
    client: what follows a line break (a literal's octets, say) is dropped,
    then a literal's announcement at the end of the line, then control
    characters (see L{mailproxy._safetext.oneLine}).
    """
    line = _LINE_END.split(text, maxsplit=1)[0]
    line = _LITERAL_END.sub(b"", line)
    return oneLine(line.decode("utf-8", "replace"), ascii=True).encode("utf-8")


def quoted(value: bytes) -> bytes:
    """
    Quote C{value} as an IMAP quoted string (only for printable ASCII).
    """
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def parseCode(text: bytes) -> tuple[bytes, bytes, bytes]:
    """
    Split C{"[CODE args] text"} into C{(CODE, args, text)}.
    """
    match = _CODE.match(text)
    if match is None:
        return b"", b"", text
    return match.group(1).upper(), match.group(2) or b"", text[match.end() :]


class IMAPBackendLogin(BackendProtocol):
    """
    Logs in to an IMAP server for one client.

    @ivar capabilities: the server's current capability list as it wrote
        it, or L{None} when it must be asked.
    @ivar untagged: untagged lines the server sent during login that the
        client should see (alerts), raw.
    @ivar okText: the text of the server's tagged OK to the login.
    """

    log = Logger()

    def __init__(self, job: LoginJob, clock, timeout: float) -> None:
        super().__init__(job, clock, timeout)
        self.capabilities: list[bytes] | None = None
        self.untagged: list[bytes] = []
        self.okText = b""
        self._buffer = b""
        self._tag = 0
        # Each tag sent, to the handler of its tagged reply.
        self._waiting: dict[bytes, _ReplyHandler] = {}
        self._pendingLiterals: list[bytes] = []
        # An OAuth error challenge the server sent, for the client.
        self._saslError = b""

    def handedOver(self) -> None:
        super().handedOver()
        self.capabilities = None
        self.untagged = []
        self._buffer = b""
        self._waiting = {}

    # Writing

    def _nextTag(self, onReply: _ReplyHandler) -> bytes:
        self._tag += 1
        tag = b"P%d" % (self._tag,)
        self._waiting[tag] = onReply
        return tag

    def _send(self, onReply: _ReplyHandler, command: bytes) -> None:
        self.send(self._nextTag(onReply) + b" " + command + b"\r\n")

    # Reading

    def dialogueReceived(self, data: bytes) -> None:
        self._buffer += data
        while not self._done:
            response = self._nextResponse()
            if response is None:
                if len(self._buffer) > MAX_BACKEND_LINE:
                    self.fail(FailureKind.UNAVAILABLE, "backend response line too long")
                return
            self._handle(response)

    def buffered(self) -> int:
        return len(self._buffer)

    def _nextResponse(self) -> bytes | None:
        """
        One whole response, literals included, or None if incomplete.
        """
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                return None
            line = self._buffer[start:end].rstrip(b"\r")
            match = _LITERAL_END.search(line)
            if match is None:
                response = self._buffer[:end].rstrip(b"\r")
                self._buffer = self._buffer[end + 1 :]
                return response
            start = end + 1 + int(match.group(1))
            if start > len(self._buffer):
                if start > MAX_BACKEND_LINE:
                    self.fail(FailureKind.UNAVAILABLE, "backend literal too large")
                return None

    def _handle(self, response: bytes) -> None:
        if self.state is LoginState.GREETING:
            self._greeting(response)
            return
        if response.startswith(b"+"):
            self._continuation(response[1:].strip())
            return
        tag, _, rest = response.partition(b" ")
        if tag == b"*":
            self._untaggedResponse(response, rest)
            return
        onReply = self._waiting.pop(tag, None)
        if onReply is None:
            self.fail(FailureKind.UNAVAILABLE, "backend sent an unexpected tagged response")
            return
        status, _, text = rest.partition(b" ")
        onReply(status.upper(), text)

    def _untaggedResponse(self, response: bytes, rest: bytes) -> None:
        kind, _, text = rest.partition(b" ")
        kind = kind.upper()
        if kind == b"CAPABILITY":
            self.capabilities = text.split()
        elif kind in (b"ID", b"BYE"):
            # ID answers our forwarding; BYE precedes a close that fails the
            # login anyway.
            pass
        elif kind == b"OK":
            code, args, _ = parseCode(text)
            if code == b"CAPABILITY":
                self.capabilities = args.split()
            else:
                self._keep(response)
        else:
            self._keep(response)

    def _keep(self, response: bytes) -> None:
        if len(self.untagged) >= MAX_LOGIN_UNTAGGED:
            self.fail(FailureKind.UNAVAILABLE, f"backend sent more than {MAX_LOGIN_UNTAGGED} untagged lines during login")
            return
        self.untagged.append(response)

    # The dialogue

    def _greeting(self, line: bytes) -> None:
        status = line[:5].upper()
        if status != b"* OK ":
            self.fail(FailureKind.UNAVAILABLE, "unexpected greeting: " + line[:60].decode("ascii", "replace"))
            return
        code, args, _ = parseCode(line[5:])
        if code == b"CAPABILITY":
            self.capabilities = args.split()
        if self.job.tls == "starttls":
            offered = self.capabilities is None or b"STARTTLS" in self._caps()
            self.askForTLS(self._nextTag(self._startTLSReply) + b" STARTTLS", offered)
            return
        self._ready()

    def _startTLSReply(self, status: bytes, text: bytes) -> None:
        self.tlsAnswered(status == b"OK")

    def tlsReady(self) -> None:
        # Capabilities seen before TLS are forgotten (RFC 9051 §6.2.1).
        self.capabilities = None
        self._ready()

    def _ready(self) -> None:
        if self.capabilities is None:
            self.state = LoginState.CAPABILITIES
            self._send(self._capabilityReply, b"CAPABILITY")
            return
        self._login()

    def _capabilityReply(self, status: bytes, text: bytes) -> None:
        if status != b"OK" or self.capabilities is None:
            self.fail(FailureKind.UNAVAILABLE, "backend CAPABILITY failed")
            return
        self._login()

    def _idReply(self, status: bytes, text: bytes) -> None:
        # A server that rejects ID still lets us log in.
        pass

    def _login(self) -> None:
        caps = self._caps()
        backend = self.job.backend
        if not self.tlsActive and b"LOGINDISABLED" in caps:
            self.fail(FailureKind.UNAVAILABLE, "backend refuses plaintext login (LOGINDISABLED); configure tls for it")
            return
        self.state = LoginState.LOGIN
        commands = []
        forward = backend.forward
        if forward == "id" or (forward == "auto" and b"ID" in caps):
            commands.append(self._nextTag(self._idReply) + b" ID " + self._idParameters())
        authzid, authcid, password = self.job.saslIdentities()
        if self.job.passesToken:
            mechanism, response = self.job.saslLogin()
            if b"AUTH=" + mechanism not in caps:
                self.fail(FailureKind.UNAVAILABLE, "backend does not offer AUTH=" + mechanism.decode("ascii"))
                return
            tag = self._nextTag(self._loginReply)
            if b"SASL-IR" in caps:
                commands.append(tag + b" AUTHENTICATE " + mechanism + b" " + response)
            else:
                commands.append(tag + b" AUTHENTICATE " + mechanism)
                self._pendingLiterals = [response + b"\r\n"]
        elif b"AUTH=PLAIN" in caps and (b"SASL-IR" in caps or authzid):
            response = plainResponse(authzid, authcid, password)
            if b"SASL-IR" in caps:
                commands.append(self._nextTag(self._loginReply) + b" AUTHENTICATE PLAIN " + response)
            else:
                commands.append(self._nextTag(self._loginReply) + b" AUTHENTICATE PLAIN")
                self._pendingLiterals = [response + b"\r\n"]
        else:
            if authzid:
                authcid = authzid + backend.masterSeparator.encode("utf-8") + authcid
            tag = self._nextTag(self._loginReply)
            if b"LITERAL+" in caps:
                commands.append(tag + b" LOGIN {%d+}\r\n%s {%d+}\r\n%s" % (len(authcid), authcid, len(password), password))
            else:
                # Synchronizing literals: each waits for the server's "+".
                commands.append(tag + b" LOGIN {%d}" % (len(authcid),))
                self._pendingLiterals = [
                    authcid + b" {%d}\r\n" % (len(password),),
                    password + b"\r\n",
                ]
        self.send(b"\r\n".join(commands) + b"\r\n")

    def _continuation(self, text: bytes) -> None:
        if not self._pendingLiterals and self.job.passesToken and not self._saslError:
            # The server's error challenge to the token (RFC 7628): keep it
            # for the client, answer as a client does, await the NO.
            credentials = self.job.credentials
            assert credentials is not None
            self._saslError = decodeBase64(text) or OAUTH_INVALID_TOKEN
            self.send(oauthErrorAck(credentials.mechanism) + b"\r\n")
            return
        if not self._pendingLiterals:
            self.fail(FailureKind.UNAVAILABLE, "backend sent an unexpected continuation")
            return
        self.send(self._pendingLiterals.pop(0))

    def _idParameters(self) -> bytes:
        pairs: list[tuple[str, str]] = [
            (k, v) for k, v in self.job.clientID if not k.lower().startswith("x-")
        ]
        identity = forwardedIdentity(self.job.client)
        pairs += [(name, identity[key]) for key, name in _ID_FIELDS if key in identity]
        items = []
        for key, value in pairs:
            k, v = key.encode("utf-8"), value.encode("utf-8")
            if _SAFE_QUOTED.match(k) and _SAFE_QUOTED.match(v):
                items.append(quoted(k) + b" " + quoted(v))
        return b"(" + b" ".join(items) + b")"

    def _loginReply(self, status: bytes, text: bytes) -> None:
        self._pendingLiterals = []
        if status == b"OK":
            code, args, rest = parseCode(text)
            self.okText = replyText(rest)
            if code == b"CAPABILITY":
                self.capabilities = args.split()
                self.succeed(self._buffer)
            else:
                # No post-login list in the reply: ask, so the client never
                # sees the pre-login one as if it were post-login.
                self.capabilities = None
                self._send(self._postCapabilityReply, b"CAPABILITY")
            return
        code, _, rest = parseCode(text)
        if status == b"NO" and code in _AUTH_CODES:
            self.fail(FailureKind.AUTH, "backend refused the credentials", saslError=self._saslError)
        elif status == b"NO" and code in _TEMP_CODES:
            self.fail(FailureKind.UNAVAILABLE, "backend login: " + code.decode("ascii", "replace"))
        elif status == b"NO":
            clientText = b"NO [" + code + b"] " + (replyText(rest) or b"Login refused.")
            self.fail(FailureKind.REFUSED, "backend login: " + code.decode("ascii", "replace"), clientText.decode("utf-8", "replace"))
        else:
            self.fail(FailureKind.UNAVAILABLE, "backend answered login with " + status.decode("ascii", "replace"))

    def _postCapabilityReply(self, status: bytes, text: bytes) -> None:
        if status != b"OK" or self.capabilities is None:
            self.fail(FailureKind.UNAVAILABLE, "backend CAPABILITY after login failed")
            return
        self.succeed(self._buffer)

    def _caps(self) -> frozenset[bytes]:
        # Upper-cased as one string, not name by name: a capability never
        # holds white space (the list was split on it).
        return frozenset(b" ".join(self.capabilities or ()).upper().split())

    def postLoginCapabilities(self) -> list[bytes]:
        """
        The backend's post-login capabilities the client may see.
        """
        capabilities = self.capabilities or []
        # A post-login list (Dovecot's has some 50 names) seldom holds one
        # to hide: the whole list is upper-cased and compared at once, and
        # only a list holding one of them is filtered name by name.
        if _HIDDEN_CAPABILITIES.isdisjoint(b" ".join(capabilities).upper().split()):
            return list(capabilities)
        return [cap for cap in capabilities if cap.upper() not in _HIDDEN_CAPABILITIES]
