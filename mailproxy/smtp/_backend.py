"""
The ESMTP dialogue towards a backend.

Order: greeting -> EHLO -> STARTTLS and handshake, EHLO again (if the
backend is configured for it) -> XCLIENT with the client's identity, which
the server answers with a new greeting, then EHLO again with the client's
name (if forwarding by XCLIENT) -> AUTH (submission, unless XCLIENT LOGIN
already logged the user in).

A backend in plain text (or implicit TLS) that offered XCLIENT on an
earlier connection gets XCLIENT right after its greeting: the EHLO before
it would only say again what the proxy already knows, and XCLIENT resets
the session anyway. Should the server refuse it (it no longer trusts the
proxy, or no longer offers XCLIENT), the proxy forgets what it knew and
goes on as on a first connection, with EHLO. If the proxy also knows the
backend's EHLO keywords from an earlier login, the AUTH of a submission
login follows XCLIENT at once too: XCLIENT gave the server the client's
EHLO name and protocol (C{HELO=}, C{PROTO=ESMTP}), which Postfix takes
as the EHLO; a server that answers that AUTH with C{503} (send EHLO first)
gets the EHLO and the AUTH again.

Two clients share that dialogue up to the identity:
L{SMTPBackendLogin} (submission: it logs in, then the client is relayed to
the logged-in session) and L{SMTPBackend}, which logs in nowhere: as an
MX relay the front end then drives the session with
L{SMTPBackend.command}, as a probe it learns the EHLO keywords and says
QUIT.
"""

from __future__ import annotations

from base64 import b64encode
from collections import deque
from typing import Callable, Literal

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._backend import BackendProtocol, LoginJob, LoginState
from .._outcomes import FailureKind
from .._safetext import logQuote, oneLine
from .._sasl import OAUTH_INVALID_TOKEN, decodeBase64, oauthErrorAck, plainResponse
from ..model import ClientInfo
from ._ehlo import Extensions
from ._parser import COMMAND_LINE, Reply, ReplyError, ReplyReader, xtextEncode

#: What an L{SMTPBackend} is for: an MX session, or learning the keywords.
Purpose = Literal["relay", "probe"]

#: The XCLIENT attributes the proxy can fill in, in the order sent: NAME
#: and ADDR last, because Postfix judges each later XCLIENT command by the
#: address the one before set (which need not be trusted).
_XCLIENT_ORDER = ("PROTO", "HELO", "LOGIN", "PORT", "DESTADDR", "DESTPORT", "REVERSE_NAME", "NAME", "ADDR")
#: Longest raw value Postfix accepts for one attribute.
_XCLIENT_VALUE = 255
#: The proxy looks up no DNS names; this is how XCLIENT says so.
UNAVAILABLE = "[UNAVAILABLE]"


class BackendLost(Exception):
    """
    The backend connection ended (or timed out) while a reply was awaited.
    """


#: Replies Postfix gives an XCLIENT command itself, before it takes the
#: attributes: the command is not offered (502), out of place (503), the
#: proxy is not in C{smtpd_authorized_xclient_hosts} (550 5.7.0) or a value
#: is malformed (501: among others an IPv6 address where the backend's
#: C{inet_protocols} leaves IPv6 out). Each is a fault between proxy and
#: backend, never the client's; only what follows a taken XCLIENT, the
#: new greeting (554 where C{smtpd_client_restrictions} refuse the client
#: at once), speaks about the client.
_XCLIENT_FAULTS = frozenset([500, 501, 502, 503, 504, 550])


def xclientAddress(address: str) -> str:
    """
    An address as XCLIENT writes it: IPv6 with the C{IPV6:} prefix, for
    C{DESTADDR} as for C{ADDR} (Postfix reads both with
    C{normalize_mailhost_addr}, which wants the prefix, and refuses either
    if its C{inet_protocols} leaves the address's family out).
    """
    return "IPV6:" + address if ":" in address else address


def xclientAttributes(
    client: ClientInfo, helo: str | None, esmtp: bool, login: str | None
) -> dict[str, str]:
    """
    Every XCLIENT attribute the proxy knows for C{client}.

    @param helo: the client's EHLO/HELO name, if it gave one.
    @param esmtp: it greeted with EHLO.
    @param login: the user name to log in with XCLIENT LOGIN, or L{None}.
    """
    attributes = {
        "PROTO": "ESMTP" if esmtp else "SMTP",
        "PORT": str(client.port),
        "DESTADDR": xclientAddress(client.localAddress),
        "DESTPORT": str(client.localPort),
        "REVERSE_NAME": UNAVAILABLE,
        "NAME": UNAVAILABLE,
        "ADDR": xclientAddress(client.address),
    }
    if helo is not None:
        attributes["HELO"] = helo
    if login is not None:
        attributes["LOGIN"] = login
    return attributes


def xclientCommands(attributes: dict[str, str], advertised: list[str]) -> list[bytes]:
    """
    The XCLIENT command lines (without CRLF) that send those of
    C{attributes} the server C{advertised}, split between attributes where a
    line would pass 512 octets, NAME and ADDR last.

    @raise ValueError: an attribute is longer than a server accepts.
    """
    words = []
    for name in _XCLIENT_ORDER:
        if name not in attributes or name not in advertised:
            continue
        raw = attributes[name].encode("utf-8", "surrogateescape")
        if len(raw) > _XCLIENT_VALUE:
            raise ValueError(f"XCLIENT {name} value longer than {_XCLIENT_VALUE} octets")
        words.append(name.encode("ascii") + b"=" + xtextEncode(raw))
    lines: list[bytes] = []
    line = b""
    for word in words:
        if line and len(line) + 1 + len(word) + 2 > COMMAND_LINE:
            lines.append(line)
            line = b""
        # One attribute may make a line longer than 512 octets (255 octets
        # of UTF-8 are 765 in xtext); Postfix reads up to its
        # line_length_limit, 2048 by default.
        line = (line + b" " + word) if line else b"XCLIENT " + word
    if line:
        lines.append(line)
    return lines


class _ESMTPDialogue(BackendProtocol):
    """
    The ESMTP dialogue up to the client's identity: greeting, EHLO,
    STARTTLS and EHLO again, XCLIENT and EHLO again. What follows is the
    subclass's L{identified}.

    @ivar extensions: the backend's EHLO keywords from its latest EHLO
        reply.
    """

    log = Logger()
    #: Whether the client's identity is passed on with XCLIENT (where the
    #: backend's C{forward} asks for it).
    forwardsIdentity = True

    def __init__(
        self,
        job: LoginJob,
        clock,
        timeout: float,
        *,
        hostname: str,
        helo: str | None = None,
        esmtp: bool = True,
        learn: Callable[[Extensions], None] | None = None,
        knownXCLIENT: list[str] | None = None,
        rememberXCLIENT: Callable[[list[str] | None], None] | None = None,
        knownExtensions: Extensions | None = None,
    ) -> None:
        """
        @param hostname: the proxy's name, for its own EHLO.
        @param helo: the client's EHLO name, passed on after XCLIENT.
        @param esmtp: the client greeted with EHLO (not HELO).
        @param learn: told the backend's extensions after its last EHLO.
        @param knownXCLIENT: the XCLIENT attributes this backend offered the
            proxy on an earlier connection, if it did: XCLIENT then follows
            the greeting, without an EHLO before it.
        @param rememberXCLIENT: told the XCLIENT attributes the backend
            offers the proxy (L{None}: it refused XCLIENT sent on
            C{knownXCLIENT}'s word), for later connections.
        @param knownExtensions: the EHLO keywords this backend offered on
            an earlier connection, if known: with C{knownXCLIENT}, what
            follows XCLIENT needs no EHLO (see L{followsXCLIENT}).
        """
        super().__init__(job, clock, timeout)
        self.hostname = hostname
        self.helo = helo
        self.esmtp = esmtp
        self.extensions: Extensions | None = None
        self._learn = learn
        self._reader = ReplyReader()
        self._xclientSent = False
        # The user XCLIENT LOGIN logged in, if it did.
        self._xclientUser: str | None = None
        self._pendingXCLIENT: list[bytes] = []
        self._knownXCLIENT = knownXCLIENT
        self._rememberXCLIENT = rememberXCLIENT
        # XCLIENT was sent on the word of an earlier connection, no EHLO
        # before it: a refusal of its first line is no refusal of the client
        # unless the EHLO that follows is refused too (it is kept till then).
        self._xclientUnasked = False
        self._unaskedRefusal: Reply | None = None
        self._knownExtensions = knownExtensions
        # The EHLO after XCLIENT was left out on the word of an earlier
        # connection (until the next command is answered).
        self._ehloSkipped = False

    # Reading

    def dialogueReceived(self, data: bytes) -> None:
        self._reader.feed(data)
        self._readDialogue()

    def _readDialogue(self) -> None:
        while not self._done:
            reply = self._nextReply()
            if reply is None:
                return
            self._handle(reply)

    def _nextReply(self) -> Reply | None:
        """
        The next whole reply, or L{None} if none is complete (or what came
        is not a reply: then the connection is broken off).
        """
        try:
            return self._reader.next()
        except ReplyError as e:
            self._broken(f"backend sent garbage: {e}")
            return None

    def buffered(self) -> int:
        return len(self._reader)

    def forgetSecrets(self) -> None:
        super().forgetSecrets()
        # The front end's callback may hold the job it made, passwords and
        # all; it is only needed during the dialogue.
        self._learn = None
        self._rememberXCLIENT = None

    def _broken(self, detail: str) -> None:
        if not self._done:
            self.fail(FailureKind.UNAVAILABLE, detail)
            return
        self.log.warn("backend {backend}: {detail}", backend=self.job.backend.name, detail=logQuote(detail))
        if self.transport is not None:
            self.transport.abortConnection()

    def _send(self, line: bytes) -> None:
        self.send(line + b"\r\n")

    # The dialogue

    def _handle(self, reply: Reply) -> None:
        state = self.state
        if state is LoginState.GREETING:
            if reply.code != 220:
                self.fail(FailureKind.UNAVAILABLE, "backend greeting: " + _show(reply))
                return
            known = self._knownXCLIENT
            if known is not None and self._xclientFirst():
                self._xclientUnasked = True
                self._startXCLIENT(known)
                return
            self._ehlo(self.hostname)
        elif state is LoginState.CAPABILITIES:
            self._ehloReply(reply)
        elif state is LoginState.STARTTLS:
            self.tlsAnswered(reply.code == 220, _show(reply))
        elif state is LoginState.IDENTITY:
            self._xclientReply(reply)
        else:
            self.fail(FailureKind.UNAVAILABLE, "backend sent an unexpected reply: " + _show(reply))

    def _ehlo(self, name: str) -> None:
        self.state = LoginState.CAPABILITIES
        self._send(b"EHLO " + name.encode("utf-8", "surrogateescape"))

    def _ehloReply(self, reply: Reply) -> None:
        refusal, self._unaskedRefusal = self._unaskedRefusal, None
        if reply.code != 250:
            if refusal is not None:
                # XCLIENT took hold and the server refuses the client.
                self._refusedClient("backend refused XCLIENT", refusal, xclient=True)
            elif self._xclientSent:
                self._refusedClient("backend refused EHLO after XCLIENT", reply)
            else:
                self.fail(FailureKind.UNAVAILABLE, "backend refused EHLO: " + _show(reply))
            return
        self.extensions = Extensions.fromReply(reply)
        backend = self.job.backend
        if self.job.tls == "starttls" and not self.tlsActive:
            self.askForTLS(b"STARTTLS", "STARTTLS" in self.extensions)
            return
        if self._wantsXCLIENT():
            advertised = self.extensions.parameters("XCLIENT")
            if self._rememberXCLIENT is not None and self._xclientFirst() and advertised != self._knownXCLIENT:
                self._rememberXCLIENT(advertised)
            self._startXCLIENT(advertised)
            return
        if backend.forward == "xclient" and not self._xclientSent and self.forwardsIdentity:
            self.fail(
                FailureKind.UNAVAILABLE,
                "backend does not offer XCLIENT to the proxy (is the proxy in smtpd_authorized_xclient_hosts?)",
            )
            return
        if self._learn is not None:
            self._learn(self.extensions)
        self.identified()

    def tlsReady(self) -> None:
        # What the server listed in clear is forgotten (RFC 3207 §4.2).
        self.extensions = None
        self._ehlo(self.hostname)

    def _wantsXCLIENT(self) -> bool:
        if self._xclientSent or not self.forwardsIdentity:
            return False
        assert self.extensions is not None
        return self.job.backend.forward in ("xclient", "auto") and "XCLIENT" in self.extensions

    def xclientLoginName(self, advertised: list[str]) -> str | None:
        """
        The user to log in with XCLIENT LOGIN, or L{None}: this dialogue
        logs no one in.

        @param advertised: the attributes the server's XCLIENT takes.
        """
        return None

    def _xclientFirst(self) -> bool:
        """
        Whether XCLIENT may follow the greeting at once: the identity is to
        be forwarded by XCLIENT and no STARTTLS comes first.
        """
        return (
            self.forwardsIdentity and self.job.backend.forward in ("xclient", "auto") and self.job.tls != "starttls"
        )

    def _startXCLIENT(self, advertised: list[str]) -> None:
        """
        Send the first XCLIENT command line.

        @param advertised: the attributes the server's XCLIENT takes.
        """
        login = self.xclientLoginName(advertised)
        attributes = xclientAttributes(self.job.client, self.helo, self.esmtp, login)
        try:
            commands = xclientCommands(attributes, advertised)
        except ValueError as e:
            self.fail(FailureKind.UNAVAILABLE, str(e))
            return
        self._xclientUser = login
        self._xclientSent = True
        self._pendingXCLIENT = commands[1:]
        self.state = LoginState.IDENTITY
        self._send(commands[0])

    def _xclientReply(self, reply: Reply) -> None:
        unasked, self._xclientUnasked = self._xclientUnasked, False
        if reply.code != 220 and unasked:
            # What an earlier connection offered, this one may not: ask.
            self.log.info(
                "backend {backend} refused XCLIENT sent without EHLO: {reply}; asking it with EHLO",
                backend=self.job.backend.name,
                reply=logQuote(_show(reply)),
            )
            if self._rememberXCLIENT is not None:
                self._rememberXCLIENT(None)
            self._unaskedRefusal = reply
            self._knownXCLIENT = None
            self._xclientSent = False
            self._xclientUser = None
            self._pendingXCLIENT = []
            self._ehlo(self.hostname)
            return
        if reply.code != 220:
            self._refusedClient("backend refused XCLIENT", reply, xclient=True)
            return
        if self._pendingXCLIENT:
            self._send(self._pendingXCLIENT.pop(0))
            return
        known = self._knownExtensions
        if unasked and known is not None and self.helo is not None and self.esmtp and self.followsXCLIENT():
            # XCLIENT told the server the client's EHLO name and protocol;
            # its keywords are known: the EHLO would only cost a round trip.
            self.extensions = known
            self._ehloSkipped = True
            self.identified()
            return
        # XCLIENT reset the session to the greeting: EHLO again, with the
        # client's own name so that the server logs and judges it.
        self._ehlo(self.helo or self.hostname)

    def followsXCLIENT(self) -> bool:
        """
        Whether what follows an XCLIENT sent without asking may go without
        an EHLO when the backend's keywords are known: only a command whose
        refusal can still be followed by the EHLO (see
        L{SMTPBackendLogin}).
        """
        return False

    def _refusedClient(self, what: str, reply: Reply, xclient: bool = False) -> None:
        """
        The backend, now knowing who the client is, refused it: a permanent
        refusal is the client's answer (its address is blocked, say); a
        temporary one means "try later".

        @param xclient: C{reply} answers XCLIENT itself: Postfix's own
            refusals of the command (L{_XCLIENT_FAULTS}) are faults between
            proxy and backend, which the client must take as temporary,
            never as a reason to bounce its mail.
        """
        if xclient and reply.code in _XCLIENT_FAULTS:
            hint = ""
            if reply.code == 501 and b"ADDR SYNTAX: IPV6:" in reply.text.upper():
                hint = " (does the backend's inet_protocols include ipv6?)"
            self.fail(FailureKind.UNAVAILABLE, f"{what}: {_show(reply)}{hint}")
        elif 500 <= reply.code < 600:
            # The client's reply: one line, whatever the server wrote.
            line = oneLine(reply.lines[-1].decode("utf-8", "replace"), ascii=True) or "Access denied"
            self.fail(FailureKind.REFUSED, f"{what}: {_show(reply)}", f"{reply.code} {line}")
        else:
            self.fail(FailureKind.UNAVAILABLE, f"{what}: {_show(reply)}")

    def identified(self) -> None:
        """
        The backend knows who the client is (or was not to be told): go on.
        """
        raise NotImplementedError(type(self).__name__ + " must say what follows the identity")


class SMTPBackendLogin(_ESMTPDialogue):
    """
    Logs in to an ESMTP server for one submission client: with XCLIENT
    LOGIN where the router checked the password and the server takes it,
    otherwise with AUTH PLAIN (or LOGIN).
    """

    #: What the AUTH exchange still has to send, one per challenge.
    _authSteps: tuple[bytes, ...] = ()
    #: An OAuth error challenge the server sent, for the client.
    _saslError = b""

    @property
    def xclientLogin(self) -> bool:
        """
        The user was logged in with XCLIENT LOGIN.
        """
        return self._xclientUser is not None

    def xclientLoginName(self, advertised: list[str]) -> str | None:
        job = self.job
        if job.route.authenticated and "LOGIN" in advertised:
            # The router checked the password: the backend trusts the proxy
            # to say who logged in, and needs no password of its own.
            return job.user
        return None

    def _handle(self, reply: Reply) -> None:
        if self.state is LoginState.LOGIN:
            self._authReply(reply)
        else:
            super()._handle(reply)

    def followsXCLIENT(self) -> bool:
        # AUTH: a server that wants the EHLO first says so with 503, and
        # gets it (L{_authReply}). Not XCLIENT LOGIN: the client's own
        # commands would follow it.
        attributes = self._knownXCLIENT or []
        return not self.xclientLogin and "HELO" in attributes and "PROTO" in attributes

    def identified(self) -> None:
        if self.xclientLogin:
            self.succeed(self._reader.takeRemaining())
        else:
            self._authenticate()

    def _authenticate(self) -> None:
        assert self.extensions is not None
        mechanisms = self.extensions.parameters("AUTH")
        authzid, authcid, password = self.job.saslIdentities()
        self.state = LoginState.LOGIN
        if self.job.passesToken:
            mechanism, response = self.job.saslLogin()
            if mechanism.decode("ascii") not in mechanisms:
                self.fail(FailureKind.UNAVAILABLE, "backend offers no AUTH " + mechanism.decode("ascii"))
                return
            line = b"AUTH " + mechanism + b" " + response
            if len(line) + 2 <= COMMAND_LINE:
                self._send(line)
            else:
                self._authSteps = (response,)
                self._send(b"AUTH " + mechanism)
        elif "PLAIN" in mechanisms:
            response = plainResponse(authzid, authcid, password)
            line = b"AUTH PLAIN " + response
            if len(line) + 2 <= COMMAND_LINE:
                self._send(line)
            else:
                # Too long for a command line: send it after an empty
                # challenge instead (RFC 4954 §4).
                self._authSteps = (response,)
                self._send(b"AUTH PLAIN")
        elif "LOGIN" in mechanisms and not authzid:
            self._authSteps = (b64encode(authcid), b64encode(password))
            self._send(b"AUTH LOGIN")
        else:
            needed = "PLAIN" if authzid else "PLAIN or LOGIN"
            self.fail(FailureKind.UNAVAILABLE, f"backend offers no AUTH {needed} (and no XCLIENT LOGIN for this route)")

    def _authReply(self, reply: Reply) -> None:
        skipped, self._ehloSkipped = self._ehloSkipped, False
        if skipped and reply.code == 503:
            # This server wants the EHLO after XCLIENT after all.
            self.log.info(
                "backend {backend} refused AUTH without EHLO after XCLIENT: {reply}; sending EHLO",
                backend=self.job.backend.name,
                reply=logQuote(_show(reply)),
            )
            self._authSteps = ()
            self._ehlo(self.helo or self.hostname)
            return
        if reply.code == 334 and self._authSteps:
            step, self._authSteps = self._authSteps[0], self._authSteps[1:]
            self._send(step)
            return
        self._authSteps = ()
        if reply.code == 235:
            self.succeed(self._reader.takeRemaining())
        elif reply.code == 334 and self.job.passesToken and self.job.credentials is not None and not self._saslError:
            # The server's error challenge to the token (RFC 7628): keep it
            # for the client, answer as a client does, await the 535.
            self._saslError = decodeBase64(b"".join(reply.lines).strip()) or OAUTH_INVALID_TOKEN
            self._send(oauthErrorAck(self.job.credentials.mechanism))
        elif reply.code == 334:
            self._send(b"*")
            self.fail(FailureKind.UNAVAILABLE, "backend asked for more than the mechanism needs")
        elif 400 <= reply.code < 500:
            self.fail(FailureKind.UNAVAILABLE, "backend AUTH: " + _show(reply))
        else:
            # Any permanent refusal is answered like a wrong password, so
            # that clients learn nothing about accounts.
            self.fail(FailureKind.AUTH, "backend refused the credentials: " + _show(reply), saslError=self._saslError)


class SMTPBackend(_ESMTPDialogue):
    """
    One connection to an ESMTP backend that logs in nowhere: an MX
    session's relay (C{purpose="relay"}: after the identity, the front end
    sends the commands with L{command}), or a probe (C{purpose="probe"}:
    learn the EHLO keywords, without XCLIENT, then QUIT).
    """

    def __init__(
        self,
        job: LoginJob,
        clock,
        timeout: float,
        *,
        hostname: str,
        purpose: Purpose,
        helo: str | None = None,
        esmtp: bool = True,
        learn: Callable[[Extensions], None] | None = None,
        knownXCLIENT: list[str] | None = None,
        rememberXCLIENT: Callable[[list[str] | None], None] | None = None,
        knownExtensions: Extensions | None = None,
    ) -> None:
        """
        @param purpose: C{"relay"} or C{"probe"}.
        """
        super().__init__(
            job, clock, timeout, hostname=hostname, helo=helo, esmtp=esmtp, learn=learn,
            knownXCLIENT=knownXCLIENT, rememberXCLIENT=rememberXCLIENT, knownExtensions=knownExtensions,
        )  # fmt: skip
        self.purpose = purpose
        # A probe tells the backend nothing about anyone.
        self.forwardsIdentity = purpose != "probe"
        # After the dialogue: commands waiting to be written, and the
        # Deferreds of commands written and awaiting their replies.
        self._queued: deque[tuple[bytes, Deferred[Reply], float]] = deque()
        self._inflight: deque[tuple[Deferred[Reply], float]] = deque()
        self._replyTimer: IDelayedCall | None = None
        self._lost = False
        #: Octets the backend sent, its greeting included (for an MX
        #: session's count: it relays no bytes as they come).
        self.octetsReceived = 0

    def dialogueReceived(self, data: bytes) -> None:
        self.octetsReceived += len(data)
        self._reader.feed(data)
        if self.state is not LoginState.SESSION:
            self._readDialogue()
        if self.state is LoginState.SESSION:
            self._readSession()

    def identified(self) -> None:
        if self.purpose == "probe":
            self._send(b"QUIT")
            self.succeed()
        else:
            self.state = LoginState.SESSION
            self.succeed()
            self._flush()

    # The session after the dialogue (purpose "relay")

    def _readSession(self) -> None:
        while True:
            if not self._inflight:
                if self._lost:
                    # The reply to our QUIT (over TLS the close waits for
                    # the server's close_notify, and the 221 comes first).
                    self._reader.takeRemaining()
                elif len(self._reader):
                    self._broken("backend sent a reply nobody asked for")
                return
            reply = self._nextReply()
            if reply is None:
                return
            self._sessionReply(reply)

    def command(self, line: bytes, timeout: float | None = None) -> Deferred[Reply]:
        """
        Send a command line (without CRLF); the Deferred fires with its
        reply, or fails with L{BackendLost}.

        Commands are pipelined when the backend offers PIPELINING,
        otherwise each waits for the previous reply.

        @param timeout: seconds to wait for the reply; the dialogue's
            timeout by default.
        """
        d: Deferred[Reply] = Deferred()
        if self._lost:
            d.errback(Failure(BackendLost("backend connection closed")))
            return d
        self._queued.append((line, d, self._timeout if timeout is None else timeout))
        self._flush()
        return d

    def expectReply(self, timeout: float) -> Deferred[Reply]:
        """
        Wait for one more reply without sending a command (the reply to
        the end of the message data, which the front end streamed with
        L{writeData}).
        """
        d: Deferred[Reply] = Deferred()
        if self._lost:
            d.errback(Failure(BackendLost("backend connection closed")))
            return d
        self._inflight.append((d, timeout))
        self._armTimer()
        return d

    def writeData(self, data: bytes) -> None:
        """
        Write message data as it is.
        """
        if not self._lost:
            self.transport.write(data)

    def quit(self) -> None:
        """
        Say QUIT and close once it is written, without waiting for the
        reply.
        """
        if not self._lost and self.transport is not None:
            self._send(b"QUIT")
            self.transport.loseConnection()
        self._lost = True

    @property
    def pipelining(self) -> bool:
        """
        The backend offered PIPELINING.
        """
        return self.extensions is not None and "PIPELINING" in self.extensions

    @property
    def lost(self) -> bool:
        """
        The connection has ended (or is ending); no more commands.
        """
        return self._lost

    def _flush(self) -> None:
        if self.state is not LoginState.SESSION:
            return
        while self._queued and (self.pipelining or not self._inflight):
            line, d, timeout = self._queued.popleft()
            self._send(line)
            self._inflight.append((d, timeout))
            self._armTimer()

    def _sessionReply(self, reply: Reply) -> None:
        d, _ = self._inflight.popleft()
        self._cancelReplyTimer()
        self._armTimer()
        d.callback(reply)
        self._flush()

    def _armTimer(self) -> None:
        if self._replyTimer is None and self._inflight:
            self._replyTimer = self._clock.callLater(self._inflight[0][1], self._replyTimedOut)

    def _cancelReplyTimer(self) -> None:
        if self._replyTimer is not None and self._replyTimer.active():
            self._replyTimer.cancel()
        self._replyTimer = None

    def _replyTimedOut(self) -> None:
        self._replyTimer = None
        self.log.warn("backend {backend} did not reply in time", backend=self.job.backend.name)
        self._failPending("backend did not reply in time")
        if self.transport is not None:
            self.transport.abortConnection()

    def _failPending(self, why: str) -> None:
        self._lost = True
        self._cancelReplyTimer()
        pending = [d for d, _ in self._inflight] + [d for _, d, _ in self._queued]
        self._inflight.clear()
        self._queued.clear()
        for d in pending:
            d.errback(Failure(BackendLost(why)))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._done:
            self._failPending("backend connection closed")
        super().connectionLost(reason)


def _show(reply: Reply) -> str:
    """
    A reply for a log line (never a credential: servers do not echo them).
    """
    return f"{reply.code} " + reply.text[:200].decode("utf-8", "replace")
