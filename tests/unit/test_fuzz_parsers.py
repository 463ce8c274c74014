"""
Property-based tests (hypothesis) of every parser that reads pre-auth input:
arbitrary octets in arbitrary chunkings never raise anything but the
parser's own error, never make it hold more than its limits, and give the
same events however the input was cut into reads.
"""

from __future__ import annotations

import ipaddress
import json
from base64 import b64encode
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import _sasl
from mailproxy._proxylistener import MAX_HEADER, ProxyHeaderFactory, parseNetworks
from mailproxy._proxyproto import ProxyHeaderError, encodeV1, encodeV2, parseHeader
from mailproxy.admin import AdminResource, TokenGuard
from mailproxy.imap import _parser as imap
from mailproxy.model import Credentials
from mailproxy.pop3 import _parser as pop3
from mailproxy.sieve import _parser as sieve
from mailproxy.smtp import _parser as smtp

from .fuzzing import chunked, hostileLines

# Small limits, so that short examples reach them.
LINE, LITERAL = 64, 48

IMAP_WORDS = [
    b"a LOGIN alice secret", b"a LOGIN {5}", b"a LOGIN {5+}", b"a LOGIN {999999999999}",
    b'a ID ("name" "x" "os" NIL)', b"a ID ((((((((((x))))))))))", b'"quoted \\" \\\\ string"',
    b"b AUTHENTICATE PLAIN", b"{3+}", b"{0}", b"abc", b"\x00", b")", b"(", b"a b c",
]
SIEVE_WORDS = [
    b'AUTHENTICATE "PLAIN" "AGFsaWNlAHNlY3JldA=="', b"{5+}", b"{5}", b"{99999999999+}",
    b'"quoted \\" string"', b"(a (b (c)))", b"CAPABILITY", b'"\x00"', b"x y", b"OK (SASL \"x\") \"t\"",
]
POP3_WORDS = [b"USER alice", b"PASS a b c", b"AUTH PLAIN " + b"A" * 300, b"AUTH", b"CAPA", b"\x00", b"QUIT"]
SMTP_WORDS = [
    b"MAIL FROM:<a@example.org> SIZE=10 BODY=8BITMIME", b'MAIL FROM:<"a\\"b"@[127.0.0.1]>',
    b"MAIL FROM:<@a,@b:c@d>", b"MAIL FROM:<>", b"RCPT TO:<postmaster>", b"RCPT TO:<x@y> NOTIFY=NEVER",
    b"BDAT 10 LAST", b"BDAT 999999999999999999", b"EHLO x", b"HELO \xff", b"AUTH PLAIN =",
    b"XCLIENT ADDR=1.2.3.4 NAME=+41", b"250-x", b"250 y", b"354 go", b".",
]


def drainIMAP(parser: imap.CommandParser) -> list[Any]:
    """
    Pull every event the IMAP parser has; accept synchronizing literals of
    an even size and reject the others (a choice that depends on the input
    only, not on its chunking).
    """
    events: list[Any] = []
    while True:
        event = parser.next()
        if event is None:
            return events
        events.append(event)
        if isinstance(event, imap.LiteralRequest):
            if event.size % 2 == 0:
                parser.acceptLiteral()
            else:
                parser.rejectLiteral()
        elif isinstance(event, imap.Fatal):
            return events


class IMAPParserTests(SynchronousTestCase):
    """
    L{imap.CommandParser} under arbitrary input.
    """

    @given(chunked(hostileLines(IMAP_WORDS)))
    def test_chunkingAndBounds(self, example: tuple[bytes, list[bytes]]) -> None:
        """
        However the input is cut, the events are those of the whole input
        fed at once; only the parser's event types come out; after each read
        is drained the parser holds no more than a line or a literal.
        """
        data, chunks = example
        whole = imap.CommandParser(LINE, LITERAL)
        whole.feed(data)
        expected = drainIMAP(whole)
        parser = imap.CommandParser(LINE, LITERAL)
        events: list[Any] = []
        for chunk in chunks:
            parser.feed(chunk)
            events += drainIMAP(parser)
            self.assertLessEqual(parser.buffered, max(LINE, LITERAL) + 1)
            if events and isinstance(events[-1], imap.Fatal):
                break
        self.assertEqual(events, expected)
        for event in events:
            self.assertIsInstance(event, (imap.Command, imap.LiteralRequest, imap.BadCommand, imap.Fatal))
        # Texts for the client never carry client data.
        for event in events:
            if isinstance(event, (imap.BadCommand, imap.Fatal)):
                self.assertRegex(event.reason, r"\A[A-Za-z ')(]+\Z")

    @given(st.binary(max_size=300), st.integers(1, 80))
    def test_rawLines(self, data: bytes, room: int) -> None:
        """
        Raw lines (SASL responses) are whole lines no longer than asked, or
        L{imap.Fatal}; nothing is held beyond the limit.
        """
        parser = imap.CommandParser(LINE, LITERAL)
        parser.feed(data)
        while True:
            line = parser.nextLine(room)
            if line is None or isinstance(line, imap.Fatal):
                break
            self.assertLessEqual(len(line.data), room)
            self.assertNotIn(b"\n", line.data)
        self.assertLessEqual(parser.buffered, room + 1)


class SieveParserTests(SynchronousTestCase):
    """
    L{sieve.LineParser} under arbitrary input.
    """

    @given(chunked(hostileLines(SIEVE_WORDS)))
    def test_chunkingAndBounds(self, example: tuple[bytes, list[bytes]]) -> None:
        """
        However the input is cut, the events are those of the whole input;
        the parser holds no more than a line or a literal; formatting a
        parsed line and parsing it again gives the same values.
        """
        data, chunks = example

        def drain(parser: sieve.LineParser) -> list[Any]:
            events: list[Any] = []
            while (event := parser.next()) is not None:
                events.append(event)
                if isinstance(event, sieve.Fatal):
                    break
            return events

        whole = sieve.LineParser(LINE, LITERAL)
        whole.feed(data)
        expected = drain(whole)
        parser = sieve.LineParser(LINE, LITERAL)
        events: list[Any] = []
        for chunk in chunks:
            parser.feed(chunk)
            events += drain(parser)
            self.assertLessEqual(parser.buffered, max(LINE, LITERAL) + 1)
            if events and isinstance(events[-1], sieve.Fatal):
                break
        self.assertEqual(events, expected)
        for event in events:
            self.assertIsInstance(event, (sieve.Line, sieve.BadLine, sieve.Fatal))
            if isinstance(event, sieve.Line):
                again = sieve.LineParser(10**6, 10**6)
                again.feed(sieve.formatValues(event.values) + b"\r\n")
                self.assertEqual(again.next(), event)


class POP3ParserTests(SynchronousTestCase):
    """
    L{pop3.LineParser} under arbitrary input.
    """

    @given(chunked(hostileLines(POP3_WORDS)))
    def test_chunkingAndBounds(self, example: tuple[bytes, list[bytes]]) -> None:
        """
        However the input is cut, the events are those of the whole input;
        the parser never holds a line longer than the SASL line limit;
        commands carry neither NUL nor CR.
        """
        data, chunks = example

        def drain(parser: pop3.LineParser) -> list[Any]:
            return list(iter(parser.nextCommand, None))

        whole = pop3.LineParser()
        whole.feed(data)
        expected = drain(whole)
        parser = pop3.LineParser()
        events: list[Any] = []
        for chunk in chunks:
            parser.feed(chunk)
            events += drain(parser)
            self.assertLess(parser.buffered, pop3.MAX_SASL_LINE)
        self.assertEqual(events, expected)
        for event in events:
            self.assertIsInstance(event, (pop3.Command, pop3.BadLine))
            if isinstance(event, pop3.Command):
                text = event.name + (event.argument or b"")
                self.assertNotIn(b"\x00", text)
                self.assertNotIn(b"\r", text)


class SMTPParserTests(SynchronousTestCase):
    """
    The ESMTP syntax helpers under arbitrary input.
    """

    @given(chunked(hostileLines(SMTP_WORDS)))
    def test_commandLines(self, example: tuple[bytes, list[bytes]]) -> None:
        """
        However the input is cut, L{smtp.LineReader} gives the same lines,
        none longer than the limit, and holds no more than the limit; every
        line's arguments parse or raise L{smtp.SMTPSyntaxError}.
        """
        data, chunks = example
        limit = smtp.COMMAND_LINE

        def drain(reader: smtp.LineReader) -> list[Any]:
            return list(iter(lambda: reader.nextLine(limit), None))

        whole = smtp.LineReader()
        whole.feed(data)
        expected = drain(whole)
        reader = smtp.LineReader()
        lines: list[Any] = []
        for chunk in chunks:
            reader.feed(chunk)
            lines += drain(reader)
            self.assertLess(len(reader), limit)
        self.assertEqual(lines, expected)
        for line in lines:
            if isinstance(line, smtp.TooLong):
                continue
            self.assertLess(len(line), limit)
            command = smtp.parseCommand(line)
            if command is None:
                continue
            smtp.parseHelo(command.argument)
            for parse in (smtp.parseMailFrom, smtp.parseRcptTo, smtp.parseBDAT):
                try:
                    parse(command.argument)
                except smtp.SMTPSyntaxError as e:
                    self.assertRegex(e.text, r"\A[\w :<>\[\]]+\Z")

    @given(chunked(hostileLines(SMTP_WORDS, maxLines=60)))
    def test_replies(self, example: tuple[bytes, list[bytes]]) -> None:
        """
        However a server's output is cut, L{smtp.ReplyReader} gives the same
        replies and then the same L{smtp.ReplyError} (or none), and holds
        at most a reply's worth of lines.
        """
        data, chunks = example

        def drain(reader: smtp.ReplyReader) -> tuple[list[smtp.Reply], str | None]:
            replies = []
            try:
                while (reply := reader.next()) is not None:
                    replies.append(reply)
            except smtp.ReplyError as e:
                return replies, str(e)
            return replies, None

        whole = smtp.ReplyReader()
        whole.feed(data)
        expected = drain(whole)
        reader = smtp.ReplyReader()
        replies: list[smtp.Reply] = []
        error = None
        for chunk in chunks:
            reader.feed(chunk)
            got, error = drain(reader)
            replies += got
            if error is not None:
                break
            self.assertLessEqual(len(reader), (smtp.MAX_REPLY_LINES + 1) * (smtp.MAX_REPLY_LINE + 2))
        self.assertEqual((replies, error), expected)

    @given(chunked(hostileLines([b".", b"\r\n.\r\n", b"x\r", b"\n.\n", b"\r\n.", b"\r\r\n"])))
    def test_dataEnd(self, example: tuple[bytes, list[bytes]]) -> None:
        """
        However a message is cut, L{smtp.DataScanner} finds its end at the
        same octet as in the whole message (the first CRLF.CRLF, counting
        the CRLF before the message) and judges bare CR and LF the same.
        """
        data, chunks = example
        whole = smtp.DataScanner()
        wholeEnd = whole.feed(data)
        scanner = smtp.DataScanner()
        position, end = 0, None
        for chunk in chunks:
            found = scanner.feed(chunk)
            if found is not None:
                end = position + found
                break
            position += len(chunk)
        self.assertEqual(end, wholeEnd)
        self.assertEqual(scanner.bareLineEnding, whole.bareLineEnding)
        marker = (b"\r\n" + data).find(b"\r\n.\r\n")
        self.assertEqual(end, None if marker < 0 else marker + 3)
        message = data if end is None else data[:end]
        bare = message.replace(b"\r\n", b"").count(b"\n") + message.replace(b"\r\n", b"").count(b"\r")
        if end is None and message.endswith(b"\r"):
            # A CR at the very end may yet be followed by LF.
            bare -= 1
        self.assertEqual(scanner.bareLineEnding, bare > 0)

    @given(st.binary(max_size=100))
    def test_xtext(self, value: bytes) -> None:
        """
        xtext encodes any octets and decodes back to them; arbitrary input
        decodes or raises L{ValueError}.
        """
        self.assertEqual(smtp.xtextDecode(smtp.xtextEncode(value)), value)
        try:
            smtp.xtextDecode(value)
        except ValueError:
            pass


class SASLTests(SynchronousTestCase):
    """
    The SASL decoder and server exchanges under arbitrary responses.
    """

    @given(st.sampled_from(["PLAIN", "LOGIN", "CRAM-MD5"]), st.lists(st.binary(max_size=60), max_size=4), st.booleans())
    def test_exchange(self, mechanism: str, responses: list[bytes], initial: bool) -> None:
        """
        Any sequence of responses, base64 or not, gives challenges until the
        exchange ends in L{Credentials} or L{_sasl.Refused}, never an
        exception.
        """
        exchange = _sasl.ServerExchange(mechanism, challenge=b"<1.2@proxy.test>")
        step: _sasl.Step
        if initial and mechanism != "CRAM-MD5" and responses:
            decoded = _sasl.decodeResponse(responses.pop(0))
            if decoded is None:
                return
            step = exchange.start(decoded)
        else:
            step = exchange.start()
        for response in responses:
            if not isinstance(step, _sasl.Challenge):
                break
            decoded = _sasl.decodeResponse(response)
            self.assertTrue(decoded is None or isinstance(decoded, bytes))
            step = exchange.respond(response if decoded is None else decoded)
        self.assertIsInstance(step, (_sasl.Challenge, Credentials, _sasl.Refused))

    @given(st.binary(min_size=1, max_size=30).filter(lambda b: b"\x00" not in b), st.binary(max_size=30).filter(lambda b: b"\x00" not in b))
    def test_plainRoundTrip(self, user: bytes, password: bytes) -> None:
        """
        What L{_sasl.plainResponse} writes, the server side reads back as
        the same user and password.
        """
        decoded = _sasl.decodeResponse(_sasl.plainResponse(b"", user, password))
        assert decoded is not None
        step = _sasl.ServerExchange("PLAIN").start(decoded)
        assert isinstance(step, Credentials)
        self.assertEqual((step.user.encode("utf-8", "surrogateescape"), step.password), (user, password))

    @given(st.binary(max_size=80))
    def test_decode(self, data: bytes) -> None:
        """
        Arbitrary octets decode to octets or to L{None}; valid base64
        decodes to what was encoded.
        """
        decoded = _sasl.decodeResponse(data)
        self.assertTrue(decoded is None or isinstance(decoded, bytes))
        self.assertEqual(_sasl.decodeResponse(b64encode(data)), data)


_ADDRESSES = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
_PORTS = st.integers(0, 65535)

#: Starts of PROXY headers, valid and broken, for the parser to chew on.
_HEADER_STARTS = [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 993\r\n",
    b"PROXY TCP6 ::1 ::1 1 2\r\n",
    b"PROXY UNKNOWN\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 0123 1\r\n",
    b"\r\n\r\n\x00\r\nQUIT\n",
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c",
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\xff\xff",
    b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00",
]


class ProxyHeaderTests(SynchronousTestCase):
    """
    The PROXY header parser and the listener wrapper under arbitrary input.
    """

    @given(st.sampled_from(_HEADER_STARTS), st.binary(max_size=120))
    def test_parsePrefixes(self, start: bytes, tail: bytes) -> None:
        """
        Parsing every prefix of the input, as the listener does read after
        read, needs more bytes until it gives the same answer as the whole
        input: a header with the same rest, or L{ProxyHeaderError}.
        """
        data = start + tail

        def parse(prefix: bytes) -> Any:
            try:
                return parseHeader(prefix)
            except ProxyHeaderError:
                return "error"

        final = parse(data)
        for size in range(len(data) + 1):
            answer = parse(data[:size])
            if answer == "error" or answer[0] is not None:
                if final == "error":
                    self.assertEqual(answer, "error")
                else:
                    self.assertEqual(answer[0], final[0])
                    self.assertEqual(answer[1] + data[size:], final[1])
                return
            self.assertEqual(answer, (None, data[:size]))

    @given(_ADDRESSES, _PORTS, _ADDRESSES, _PORTS, st.binary(max_size=20), st.booleans())
    def test_roundTrip(self, sourceHost: str, sourcePort: int, destinationHost: str, destinationPort: int, rest: bytes, v2: bool) -> None:
        """
        What the encoders write, the parser reads back: the same ports, the
        same addresses (IPv4 shown as IPv4-mapped IPv6 beside an IPv6 one)
        and the octets after the header untouched.
        """
        source, destination = (sourceHost, sourcePort), (destinationHost, destinationPort)
        header = (encodeV2 if v2 else encodeV1)(source, destination)
        parsed, after = parseHeader(header + rest)
        assert parsed is not None and parsed.source is not None and parsed.destination is not None
        self.assertEqual(after, rest)
        self.assertEqual((parsed.source[1], parsed.destination[1]), (sourcePort, destinationPort))
        def folded(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
            # An IPv4-mapped IPv6 address stands for its IPv4 address.
            address = ipaddress.ip_address(text)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                return address.ipv4_mapped
            return address

        self.assertEqual(folded(parsed.source[0]), folded(sourceHost))
        self.assertEqual(folded(parsed.destination[0]), folded(destinationHost))

    @given(chunked(st.tuples(st.sampled_from(_HEADER_STARTS + [b""]), st.binary(max_size=200)).map(b"".join)))
    def test_listener(self, example: tuple[bytes, list[bytes]]) -> None:
        """
        Over a connection from a trusted balancer, arbitrary octets in any
        chunking either connect the wrapped protocol (which then gets
        exactly the octets after the header) or abort the connection; the
        wrapper never holds more than its limit, and logs no error.
        """
        data, chunks = example
        received: list[bytes] = []

        class Wrapped(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        factory = ProxyHeaderFactory(
            type("F", (), {"buildProtocol": lambda self, addr: Wrapped(), "doStart": lambda self: None, "doStop": lambda self: None})(),
            parseNetworks(["127.0.0.0/8"]),
            Clock(),
        )
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        protocol.makeConnection(transport)
        for chunk in chunks:
            if transport.disconnecting:
                break
            protocol.dataReceived(chunk)
            self.assertLessEqual(len(protocol._buffer), MAX_HEADER + len(chunk))
        self.assertEqual(self.flushLoggedErrors(), [])
        # The examples are shorter than MAX_HEADER: the parser decides.
        try:
            header, rest = parseHeader(data)
        except ProxyHeaderError:
            self.assertTrue(transport.disconnecting)
            self.assertEqual(received, [])
        else:
            self.assertFalse(transport.disconnecting)
            self.assertEqual(b"".join(received), b"" if header is None else rest)
        self.assertEqual(transport.value(), b"")


TOKEN = b"0123456789abcdef0123456789abcdef-token"

#: JSON values of every kind, nested.
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
#: Request bodies: JSON objects with the API's keys, other JSON, or octets.
_BODIES = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            key: _JSON
            for key in ("backend", "accounts", "domain", "dry_run", "hold", "drop", "account", "session", "reason")
        },
    ).map(lambda body: json.dumps(body).encode()),
    _JSON.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=60),
    st.sampled_from([
        b"[" * 60000, b'{"backend": "new", "hold": 1' + b"0" * 400 + b"}", b'{"backend": "new", "hold": 1e999}',
        b'{"backend": "new", "hold": NaN}', b'{"backend": "new", "hold": -Infinity}', b"\xff\xfe{}", b'{"backend": "new", "accounts": ["a"], "hold": ' + b"9" * 5000 + b"}",
    ]),
)


class AdminBodyTests(SynchronousTestCase):
    """
    The management endpoint's JSON bodies under arbitrary input.
    """

    def setUp(self) -> None:
        from .test_admin import BACKENDS, FakeHealth, Proxy, ProxyHarness
        from mailproxy._migrate import LoginHold
        from mailproxy.routers.static import StaticRouter
        import os

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        routes = os.path.join(directory, "routes.toml")
        with open(routes, "w") as f:
            f.write('default = "old"\n\n[accounts]\n"alice@example.org" = "old"\n')
        harness = ProxyHarness(StaticRouter(routes, BACKENDS), gate=LoginHold())
        self.clock = harness.clock
        self.proxy = Proxy(harness)
        self.proxy.reloads = [{"ok": True, "changed": [], "restartNeeded": []}] * 10**6
        resource = AdminResource(self.proxy, TokenGuard(TOKEN, self.clock), FakeHealth(self.clock, lambda: BACKENDS, {}))
        self.http = StubTreq(resource)

    @given(
        st.sampled_from([("POST", "/move"), ("POST", "/sessions/drop"), ("PUT", "/routes/carol@example.org"), ("POST", "/reload")]),
        _BODIES,
    )
    def test_bodies(self, request: tuple[str, str], body: bytes) -> None:
        """
        Whatever the body, the answer is JSON with a status the API
        documents (a 4xx for a bad body), never a 500; nothing is logged as
        an error.
        """
        method, path = request
        d = self.http.request(method, "http://admin.test" + path, data=body, headers={b"Authorization": [b"Bearer " + TOKEN]})
        self.http.flush()
        # A move with a hold waits for it.
        self.clock.advance(120)
        self.http.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(self.http.content(response))
        answer = json.loads(content)
        self.assertIsInstance(answer, dict)
        self.assertIn(response.code, {200, 400, 409, 413}, answer)
        self.assertEqual(self.flushLoggedErrors(), [])

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        """
        POST C{body} to C{path}; the status and the JSON answer.
        """
        d = self.http.request("POST", "http://admin.test" + path, data=body, headers={b"Authorization": [b"Bearer " + TOKEN]})
        self.http.flush()
        response = self.successResultOf(d)
        return response.code, json.loads(self.successResultOf(self.http.content(response)))

    def test_deepNesting(self) -> None:
        """
        A body of arrays nested deeper than the JSON decoder goes (but
        within the size limit) is a 400, not an internal error.
        """
        self.assertEqual(self.post("/move", b"[" * 60000), (400, {"error": "the body is nested too deeply"}))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_hugeHold(self) -> None:
        """
        A hold written as an integer too large for a float is a 400, not an
        internal error.
        """
        body = b'{"backend": "new", "accounts": ["alice@example.org"], "hold": 1' + b"0" * 400 + b"}"
        self.assertEqual(self.post("/move", body), (400, {"error": "hold must be a number of seconds"}))
        self.assertEqual(self.flushLoggedErrors(), [])
