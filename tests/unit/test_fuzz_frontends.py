"""
Property-based tests (hypothesis) of every front end over an in-memory
transport: a client sending arbitrary octets and commands, in arbitrary
reads, never causes an exception or a logged error, gets a bounded answer
per line, and leaves a connection that is either still usable or closed
with the protocol's last words; the same input in one read or one octet at
a time gives the same answer.

The router sends "alice" to a backend that never answers (so her logins
run into C{backend_timeout}) and refuses everyone else (failed logins,
slowed down); time passes whenever the front end waits for a login.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.config import Limits
from mailproxy.model import Route
from mailproxy.testing import FakeRouter, MemoryConnector, makeBackend, makeFrontend

from .fuzzing import chunked, hostileLines

#: Small line and literal limits, so that short examples reach them; no
#: pre-auth timeout, so that what ends a session is the input.
LIMITS = Limits(lineLength=128, literalSize=64, preauthTimeout=10**6, failureDelay=1.0, backendTimeout=30.0)

#: Seconds a login may keep the front end waiting: the longest failure
#: delay plus the backend timeout, with room.
LOGIN_WAIT = 200

#: The most client input a front end may hold between reads: the longest
#: SASL response line, the longest of all its limits.
MAX_HELD = 12288 + 2

PLAIN_ALICE = b"AGFsaWNlAHNlY3JldA=="
PLAIN_BOB = b"AGJvYgBzZWNyZXQ="

#: Per protocol: the listener's options, commands a client may send, a
#: probe command that works whenever the session is still usable, what the
#: answer to the probe ends with, and what the last line may be when the
#: proxy closed the connection (its goodbye, or the reply to a logout).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "imap": dict(
        options={},
        words=[
            b"a CAPABILITY", b"a NOOP", b"a ID NIL", b'a ID ("name" "x")', b"a LOGIN alice secret",
            b"a LOGIN bob secret", b"a LOGIN {5}", b"a LOGIN {5+}", b"a LOGIN bob {6+}", b"secret",
            b"a AUTHENTICATE PLAIN", b"a AUTHENTICATE LOGIN", b"a AUTHENTICATE PLAIN " + PLAIN_BOB,
            PLAIN_ALICE, b"*", b"a STARTTLS", b"a SELECT INBOX", b"a LOGOUT", b"a ENABLE X",
        ],
        probe=b"z NOOP",
        probed=rb"z OK [^\r\n]*\r\n\Z",
        last=rb"(\* BYE [^\r\n]*|a OK Logout completed\.)\r\n\Z",
    ),
    "pop3": dict(
        options={},
        words=[
            b"CAPA", b"USER alice", b"USER bob", b"USER alice\r\nPASS secret", b"USER bob\r\nPASS secret", b"PASS secret", b"AUTH PLAIN", b"AUTH LOGIN",
            b"AUTH PLAIN " + PLAIN_BOB, PLAIN_ALICE, b"*", b"STLS", b"NOOP", b"QUIT", b"STAT",
            b"APOP bob 0123456789abcdef0123456789abcdef", b"AUTH",
        ],
        probe=b"CAPA",
        probed=rb"\r\n\.\r\n\Z",
        last=rb"([-+]OK|-ERR) [^\r\n]*\r\n\Z",
    ),
    "sieve": dict(
        options={},
        words=[
            b"CAPABILITY", b"NOOP", b'AUTHENTICATE "PLAIN" "' + PLAIN_ALICE + b'"', b'AUTHENTICATE "PLAIN"',
            b'"' + PLAIN_BOB + b'"', b"STARTTLS", b'AUTHENTICATE "PLAIN" {20+}', b"LOGOUT", b"HAVESPACE x 1",
            b'"*"', b'AUTHENTICATE "LOGIN"', b"{5+}", b"LISTSCRIPTS",
        ],
        probe=b"NOOP",
        probed=rb'OK[^\r\n]*\r\n\Z',
        last=rb'(BYE|OK)[^\r\n]*\r\n\Z',
    ),
    "smtp": dict(
        options={"mode": "submission"},
        words=[
            b"EHLO client.example", b"HELO client.example", b"EHLO c\r\nAUTH PLAIN " + PLAIN_ALICE,
            b"EHLO c\r\nAUTH PLAIN " + PLAIN_BOB, b"EHLO c\r\nAUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0", b"AUTH PLAIN " + PLAIN_ALICE, b"AUTH PLAIN " + PLAIN_BOB,
            b"AUTH PLAIN", b"AUTH LOGIN", b"Ym9i", b"c2VjcmV0", b"*", b"MAIL FROM:<a@example.org>",
            b"RCPT TO:<b@example.org>", b"DATA", b"BDAT 5 LAST", b"RSET", b"NOOP", b"QUIT", b"STARTTLS",
            b"XCLIENT ADDR=192.0.2.1", b".",
        ],
        probe=b"NOOP",
        probed=rb"250 [^\r\n]*\r\n\Z",
        last=rb"(421|221) [^\r\n]*\r\n\Z",
    ),
    "mx": dict(
        protocol="smtp",
        options={"mode": "mx"},
        words=[
            b"EHLO client.example", b"HELO client.example", b"MAIL FROM:<a@example.org>", b"MAIL FROM:<>",
            b"RCPT TO:<alice@example.org>", b"RCPT TO:<bob@example.org>", b"RCPT TO:<postmaster>", b"DATA",
            b"BDAT 5 LAST", b"BDAT 3", b"hello", b".", b"..", b"RSET", b"NOOP", b"QUIT", b"STARTTLS", b"AUTH PLAIN",
            b"MAIL FROM:<a@example.org> BODY=8BITMIME SIZE=100 SMTPUTF8",
            b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.org>",
            b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.org>\r\nDATA",
            b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.org>\r\nBDAT 10",
        ],
        # A message in progress ends at the line with the dot.
        probe=b".\r\nNOOP",
        probed=rb"250 [^\r\n]*\r\n\Z",
        last=rb"(421|221) [^\r\n]*\r\n\Z",
    ),
}


class MailServer:
    """
    Plays every SMTP backend the MX front end connects: greets, takes
    every command, message and chunk.
    """

    def __init__(self) -> None:
        self._states: dict[int, dict] = {}

    def serve(self, connector: MemoryConnector) -> None:
        """
        Answer whatever the proxy wrote to its backends since last time,
        until they have nothing more to say.
        """
        busy = True
        while busy:
            busy = False
            for index, (protocol, transport) in enumerate(zip(connector.protocols, connector.transports)):
                if transport.disconnecting:
                    continue
                state = self._states.setdefault(index, {"read": 0, "buffer": b"", "data": False, "chunk": 0})
                if state["read"] == 0 and not state.get("greeted"):
                    state["greeted"] = True
                    protocol.dataReceived(b"220 backend ESMTP\r\n")
                    busy = True
                written = transport.value()
                state["buffer"] += written[state["read"] :]
                state["read"] = len(written)
                replies = self._answer(state)
                if replies and not transport.disconnecting:
                    protocol.dataReceived(replies)
                    busy = True

    def _answer(self, state: dict) -> bytes:
        replies = b""
        while True:
            if state["chunk"]:
                taken = min(state["chunk"], len(state["buffer"]))
                state["buffer"] = state["buffer"][taken:]
                state["chunk"] -= taken
                if state["chunk"]:
                    return replies
                replies += b"250 2.0.0 Chunk taken\r\n"
                continue
            line, found, rest = state["buffer"].partition(b"\r\n")
            if not found:
                return replies
            state["buffer"] = rest
            if state["data"]:
                if line == b".":
                    state["data"] = False
                    replies += b"250 2.0.0 Queued\r\n"
                continue
            verb, _, argument = line.partition(b" ")
            verb = verb.upper()
            if verb in (b"EHLO", b"LHLO"):
                replies += b"250-backend\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n"
            elif verb == b"DATA":
                state["data"] = True
                replies += b"354 Go ahead\r\n"
            elif verb == b"BDAT":
                state["chunk"] = int(argument.split(b" ")[0] or b"0")
                if not state["chunk"]:
                    replies += b"250 2.0.0 Chunk taken\r\n"
            elif verb == b"QUIT":
                replies += b"221 2.0.0 Bye\r\n"
            else:
                replies += b"250 2.0.0 OK\r\n"


class Session:
    """
    One client of a front end of C{protocol}, fed in reads; time passes
    while the front end waits for a login.
    """

    def __init__(self, protocol: str, tls: str = "none") -> None:
        backend = makeBackend("old", ports={"imap": 143, "pop3": 110, "smtp": 587, "sieve": 4190, "mx": 25})
        self.router = FakeRouter({"alice": Route(backend), "alice@example.org": Route(backend)})
        self.mailServer: MailServer | None = None
        if protocol == "mx":
            # Inbound mail is routed without a login; a backend that takes
            # it lets the examples reach DATA and BDAT.
            self.router.default = Route(backend)
            self.mailServer = MailServer()
        self.connector = MemoryConnector()
        spec = PROTOCOLS[protocol]
        self.frontend, self.client, self.clock = makeFrontend(
            spec.get("protocol", protocol), self.router, self.connector, tls=tls, limits=LIMITS, **spec["options"]
        )

    @property
    def closed(self) -> bool:
        return bool(self.client.disconnecting)

    def send(self, data: bytes) -> None:
        """
        One read of C{data}, then as much time as the front end waits for
        logins (the next read would come after: a real transport delivers
        nothing while it is paused, and the front end pauses it on input
        during a login).
        """
        self.frontend.dataReceived(data)
        self.settle()
        if not self.closed:
            # What the front end holds of the client's input: at most a
            # line (a SASL response line is the longest) or a literal.
            parser = next(
                getattr(self.frontend, name) for name in ("input", "parser", "reader") if hasattr(self.frontend, name)
            )
            held = parser.buffered if hasattr(parser, "buffered") else len(parser)
            if held > MAX_HELD:
                raise AssertionError(f"the front end holds {held} octets of input")

    def settle(self) -> None:
        """
        Let time pass while the front end waits for a login; it must stop
        waiting in bounded time.
        """
        waited = 0
        if self.mailServer is not None:
            self.mailServer.serve(self.connector)
        while (self.frontend.loginRunning or self.client.producerState == "paused") and not self.closed:
            if self.mailServer is not None:
                self.mailServer.serve(self.connector)
            if waited >= LOGIN_WAIT:
                raise AssertionError(f"still waiting for a login after {waited} s")
            self.clock.advance(1)
            waited += 1

    def feed(self, chunks: list[bytes]) -> None:
        """
        Send each chunk as one read.
        """
        for chunk in chunks:
            self.send(chunk)


def normalise(output: bytes) -> bytes:
    """
    What the proxy wrote, with what differs between sessions (session
    ids, challenges) replaced.
    """
    return re.sub(rb"<[0-9a-f]+\.[0-9]+@[^>]*>", b"<CHALLENGE>", output)


if TYPE_CHECKING:
    MixinBase = SynchronousTestCase
else:
    MixinBase = object


class HostileInputMixin(MixinBase):
    """
    The properties that hold for one protocol's front end on a listener
    of any TLS mode.

    @cvar protocol: a key of L{PROTOCOLS}.
    @cvar tls: the listener's TLS mode.
    """

    protocol = ""
    tls = "none"

    def check(self, chunks: list[bytes]) -> Session:
        """
        Feed C{chunks}; check that nothing was logged as an error, that the
        answer is bounded by the lines sent, and that a closed connection
        ended with the protocol's last words.
        """
        session = Session(self.protocol, self.tls)
        greeting = session.client.value()
        session.feed(chunks)
        self.assertEqual(self.flushLoggedErrors(), [])
        data = b"".join(chunks)
        written = session.client.value()
        self.assertLessEqual(len(written), len(greeting) + 600 * (data.count(b"\n") + 2))
        if session.closed:
            self.assertRegex(written, PROTOCOLS[self.protocol]["last"])
        return session

    def test_hostileInput(self) -> None:
        """
        Arbitrary commands and octets in arbitrary reads: no exception, no
        logged error, a bounded answer; then either the session answers a
        probe (sent after a line end, a few times over, to finish whatever
        was left open) or it was closed with the protocol's last words.
        """
        spec = PROTOCOLS[self.protocol]

        @settings(max_examples=200)
        @given(chunked(hostileLines(spec["words"])))
        def run(example: tuple[bytes, list[bytes]]) -> None:
            data, chunks = example
            session = self.check(chunks)
            if session.closed:
                return
            for _ in range(12):
                session.send(b"\r\n" + spec["probe"] + b"\r\n")
            self.assertEqual(self.flushLoggedErrors(), [])
            written = session.client.value()
            if session.closed:
                self.assertRegex(written, spec["last"])
            else:
                self.assertRegex(written, spec["probed"])

        run()

    def test_flood(self) -> None:
        """
        After any command, a flood of octets without a line end (longer
        than every limit) is never held whole: the front end answers with
        its error or closes, and stays within its bound.
        """
        spec = PROTOCOLS[self.protocol]

        @settings(max_examples=30)
        @given(st.sampled_from(spec["words"]), st.integers(13000, 100000), st.sampled_from([b"A", b"{", b" ", b"\r"]))
        def run(word: bytes, size: int, octet: bytes) -> None:
            data = word + b"\r\n" + octet * size
            self.check([data[i : i + 4096] for i in range(0, len(data), 4096)])

        run()



class FrontendFuzzMixin(HostileInputMixin):
    """
    All the properties, for one protocol's front end on a listener without
    TLS (with STARTTLS, what follows the command in the same read is
    dropped by design, so reads matter there).
    """

    def test_chunkingEquivalence(self) -> None:
        """
        The same input in one read and one octet at a time gives the same
        answer (with session ids and challenges normalised).
        """
        spec = PROTOCOLS[self.protocol]

        @given(hostileLines(spec["words"], maxLines=15).filter(lambda data: len(data) < 3000))
        def run(data: bytes) -> None:
            whole = self.check([data])
            octets = self.check([data[i : i + 1] for i in range(len(data))])
            self.assertEqual(normalise(octets.client.value()), normalise(whole.client.value()))
            self.assertEqual(octets.closed, whole.closed)

        run()


class IMAPFrontendFuzzTests(FrontendFuzzMixin, SynchronousTestCase):
    """
    The IMAP front end under hostile input.
    """

    protocol = "imap"


class POP3FrontendFuzzTests(FrontendFuzzMixin, SynchronousTestCase):
    """
    The POP3 front end under hostile input.
    """

    protocol = "pop3"


class SieveFrontendFuzzTests(FrontendFuzzMixin, SynchronousTestCase):
    """
    The ManageSieve front end under hostile input.
    """

    protocol = "sieve"


class SMTPSubmissionFuzzTests(FrontendFuzzMixin, SynchronousTestCase):
    """
    The SMTP submission front end under hostile input.
    """

    protocol = "smtp"


class SMTPMXFuzzTests(FrontendFuzzMixin, SynchronousTestCase):
    """
    The SMTP MX front end under hostile input.
    """

    protocol = "mx"


class IMAPSTARTTLSFuzzTests(HostileInputMixin, SynchronousTestCase):
    """
    The IMAP front end of a STARTTLS listener under hostile input:
    STARTTLS itself, octets pipelined behind it, everything after it.
    """

    protocol = "imap"
    tls = "starttls"


class POP3STARTTLSFuzzTests(HostileInputMixin, SynchronousTestCase):
    """
    The POP3 front end of a STARTTLS listener under hostile input:
    STARTTLS itself, octets pipelined behind it, everything after it.
    """

    protocol = "pop3"
    tls = "starttls"


class SieveSTARTTLSFuzzTests(HostileInputMixin, SynchronousTestCase):
    """
    The ManageSieve front end of a STARTTLS listener under hostile input:
    STARTTLS itself, octets pipelined behind it, everything after it.
    """

    protocol = "sieve"
    tls = "starttls"


class SMTPSTARTTLSFuzzTests(HostileInputMixin, SynchronousTestCase):
    """
    The SMTP submission front end of a STARTTLS listener under hostile input:
    STARTTLS itself, octets pipelined behind it, everything after it.
    """

    protocol = "smtp"
    tls = "starttls"
