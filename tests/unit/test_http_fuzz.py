"""
Property-based tests (hypothesis) of the HTTP front end over in-memory
transports: request heads, bodies and octets of every kind, in arbitrary
reads, from the client, and responses of every kind from the backend,
never cause an exception or a logged error.
"""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.model import Route
from mailproxy.settings import HTTPSettings, Limits
from mailproxy.testing import FakeRouter, MemoryConnector, makeBackend, makeFrontend

from .fuzzing import chunked, hostileLines

AUTH = b"Authorization: Basic " + base64.b64encode(b"alice:pw")

#: Lines a client may send: request lines, header fields (framing ones
#: too), body pieces, chunk sizes.
CLIENT_WORDS = [
    b"GET / HTTP/1.1", b"POST /x HTTP/1.1", b"PUT /dav/a HTTP/1.1", b"HEAD / HTTP/1.0", b"GET /ws HTTP/1.1",
    b"Host: h", AUTH, b"Authorization: Bearer t", b"Authorization: Basic !!", b"Content-Length: 5",
    b"Content-Length: 0", b"Content-Length: x", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip",
    b"Connection: close", b"Connection: Upgrade", b"Upgrade: websocket", b"Expect: 100-continue",
    b"Cookie: mailproxy_backend=v1.x.y.1.z", b"X-Forwarded-For: 1.2.3.4", b"", b"5", b"abcde", b"0", b"ffffffffffffffff",
    b" folded", b":", b"GET",
]

#: What a backend may answer.
BACKEND_WORDS = [
    b"HTTP/1.1 200 OK", b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 100 Continue", b"HTTP/1.1 401 Unauthorized",
    b"HTTP/1.0 204 No Content", b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 2000 Bad", b"Content-Length: 3",
    b"Content-Length: 3, 4", b"Transfer-Encoding: chunked", b"Connection: close", b"", b"3", b"abc", b"0", b"zz",
    b" folded", b"Location: http://h/x",
]


def messages(starts: list[bytes], fields: list[bytes], bodies: list[bytes]) -> st.SearchStrategy[bytes]:
    """
    One to three HTTP messages (a start line, fields, a blank line, a
    body) built from the pieces given, or random octets, one after the
    other: well-formed enough to reach past the head.
    """
    message = st.builds(
        lambda start, chosen, body: start + b"\r\n" + b"".join(field + b"\r\n" for field in chosen) + b"\r\n" + body,
        st.sampled_from(starts),
        st.lists(st.sampled_from(fields), max_size=5),
        st.one_of(st.sampled_from(bodies), st.binary(max_size=40)),
    )
    return st.lists(st.one_of(message, message, st.binary(max_size=60)), min_size=1, max_size=3).map(b"".join)


class HTTPFuzzTests(SynchronousTestCase):
    """
    Hostile clients and hostile backends.
    """

    def connect(self) -> None:
        self.connector = MemoryConnector()
        self.clock = Clock()
        backend = makeBackend("old")
        self.frontend, self.client, _ = makeFrontend(
            "http",
            FakeRouter({"alice": Route(backend)}),
            self.connector,
            limits=Limits(failureDelay=1.0, backendTimeout=30.0),
            clock=self.clock,
            http=HTTPSettings(cookieSecret=b"k", defaultBackend="old", maxHeaderSize=2048, maxHeaders=20),
        )
        self.frontend.context.backends["old"] = backend

    def feedClient(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            if self.client.disconnecting:
                break
            self.frontend.dataReceived(chunk)
            self.clock.advance(0.5)

    def test_hostileClient(self) -> None:
        """
        Arbitrary request pieces and octets in arbitrary reads, with a
        backend that answers each request, and time passing: no exception,
        no logged error, and the session leaves the registry when the
        client goes.
        """

        @settings(max_examples=300, deadline=None)
        @given(chunked(st.one_of(hostileLines(CLIENT_WORDS), messages(CLIENT_WORDS[:5], CLIENT_WORDS[5:22], CLIENT_WORDS[22:]))))
        def run(example: tuple[bytes, list[bytes]]) -> None:
            self.connect()
            self.feedClient(example[1])
            for protocol in list(self.connector.protocols):
                if protocol.transport is not None and not protocol.transport.disconnecting:
                    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            self.assertEqual(self.flushLoggedErrors(), [])
            self.clock.advance(100)
            self.assertEqual(self.flushLoggedErrors(), [])
            self.frontend.connectionLost(Failure(Exception("gone")))
            self.assertEqual(self.flushLoggedErrors(), [])
            self.assertEqual(len(self.frontend.context.sessions), 0)

        run()

    def test_hostileBackend(self) -> None:
        """
        Arbitrary response pieces from the backend, in arbitrary reads:
        no exception, no logged error; the client gets an answer or a close.
        """

        @settings(max_examples=300, deadline=None)
        @given(chunked(st.one_of(hostileLines(BACKEND_WORDS), messages(BACKEND_WORDS[:7], BACKEND_WORDS[7:11] + BACKEND_WORDS[17:], BACKEND_WORDS[11:17]))))
        def run(example: tuple[bytes, list[bytes]]) -> None:
            self.connect()
            self.frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n" + AUTH + b"\r\n\r\n")
            backend = self.connector.protocols[0]
            for chunk in example[1]:
                if backend.transport.disconnecting:
                    break
                backend.dataReceived(chunk)
            self.assertEqual(self.flushLoggedErrors(), [])
            backend.connectionLost(Failure(Exception("gone")))
            self.clock.advance(100)
            self.assertEqual(self.flushLoggedErrors(), [])
            written = self.client.value()
            self.assertTrue(written.startswith(b"HTTP/1.") or self.client.disconnecting, written[:200])
            self.frontend.connectionLost(Failure(Exception("gone")))
            self.assertEqual(self.flushLoggedErrors(), [])

        run()
