"""
The connection to a backend's HTTP port (L{HTTPBackend}): connected like
every backend (TCP with its timeout, the PROXY header, implicit TLS with
the certificate verified) by L{mailproxy._backend.connectBackend}, it has
no login dialogue: it is ready once connected.  Then it carries one
request at a time, and reads each response with L{ResponseReader}.

The response's head is parsed here (bounded); its body is handed on as it
arrives, framed by C{Content-Length}, C{chunked} or the connection's
close, never gathered.
"""

from __future__ import annotations

from typing import Callable, Protocol as TypingProtocol

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http import _ChunkedTransferDecoder, _MalformedChunkedDataError

from .._backend import BackendProtocol, LoginJob, LoginState
from .._outcomes import FailureKind

__all__ = ["HTTPBackend", "IResponseConsumer", "ResponseHead", "ResponseReader"]

#: Status codes whose responses have no body, whatever their headers say.
_NO_BODY = frozenset({204, 304})


class ResponseHead:
    """
    A backend's status line and header fields, as it sent them.

    @ivar version: C{b"HTTP/1.1"} or C{b"HTTP/1.0"}.
    @ivar code: the status code.
    @ivar reason: the reason phrase.
    @ivar headers: the fields in order, names as sent.
    @ivar size: octets of the head, CRLFs included.
    """

    def __init__(self, version: bytes, code: int, reason: bytes, headers: list[tuple[bytes, bytes]], size: int) -> None:
        self.version = version
        self.code = code
        self.reason = reason
        self.headers = headers
        self.size = size

    def values(self, name: bytes) -> list[bytes]:
        """
        The values of every field called C{name} (without case).
        """
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]

    def tokens(self, name: bytes) -> list[bytes]:
        """
        The comma-separated tokens of the fields called C{name}, in lower
        case.
        """
        return [token.strip().lower() for value in self.values(name) for token in value.split(b",") if token.strip()]


class IResponseConsumer(TypingProtocol):
    """
    What a L{ResponseReader} tells of the response it reads.
    """

    def responseHead(self, head: ResponseHead) -> None:
        """
        The head arrived (never a 1xx other than 101).
        """

    def responseData(self, data: bytes) -> None:
        """
        Body octets (decoded from chunks).
        """

    def responseDone(self, reusable: bool) -> None:
        """
        The body is complete; the connection may carry another request if
        C{reusable}.
        """

    def responseFailed(self, why: str) -> None:
        """
        The response is broken or cut short; the connection is closed.
        """


def _ignore(data: bytes) -> None:
    pass


class ResponseReader:
    """
    Reads one response to one request from a backend's octets.

    @ivar leftover: after a C{101}, what the backend sent behind its head.
    """

    def __init__(self, consumer: IResponseConsumer, method: bytes, maxHeadSize: int) -> None:
        self.consumer = consumer
        self.method = method
        self.maxHeadSize = maxHeadSize
        self.leftover = b""
        self.done = False
        self._head = bytearray()
        self._feed: Callable[[bytes], None] = self._readHead
        self._remaining = 0
        self._reusable = True
        self._chunks: _ChunkedTransferDecoder | None = None

    def dataReceived(self, data: bytes) -> None:
        """
        Octets from the backend.
        """
        if not self.done:
            self._feed(data)

    def connectionLost(self) -> None:
        """
        The backend closed: the end of a body delimited by the close, else
        a response cut short.
        """
        if self.done:
            return
        if self._feed == self._readToClose:
            self._finish(False)
        else:
            self._fail("backend closed the connection during the response")

    def _fail(self, why: str) -> None:
        self._end()
        self.consumer.responseFailed(why)

    def _finish(self, reusable: bool) -> None:
        self._end()
        self.consumer.responseDone(reusable and self._reusable)

    def _end(self) -> None:
        self.done = True
        # Nothing more is read: the reader lets go of its own method (a
        # reference cycle, left to the garbage collector otherwise).
        self._feed = _ignore

    def _readHead(self, data: bytes) -> None:
        start = max(0, len(self._head) - 3)
        self._head += data
        end = self._head.find(b"\r\n\r\n", start)
        if end < 0:
            if len(self._head) > self.maxHeadSize:
                self._fail(f"response head longer than {self.maxHeadSize} octets")
            return
        if end + 4 > self.maxHeadSize:
            self._fail(f"response head longer than {self.maxHeadSize} octets")
            return
        raw, rest = bytes(self._head[:end]), bytes(self._head[end + 4 :])
        self._head = bytearray()
        head = _parseHead(raw)
        if head is None:
            self._fail("malformed response head")
            return
        if 100 <= head.code < 200 and head.code != 101:
            # An interim response (100 Continue, 102, 103): the front end
            # answered the client's Expect itself; the final one follows.
            if rest:
                self._readHead(rest)
            return
        self._startBody(head, rest)

    def _startBody(self, head: ResponseHead, rest: bytes) -> None:
        if head.version != b"HTTP/1.1" or b"close" in head.tokens(b"connection"):
            self._reusable = False
        if head.code == 101:
            self.done = True
            self.leftover = rest
            self.consumer.responseHead(head)
            return
        codings = head.tokens(b"transfer-encoding")
        lengths = {value.strip() for value in head.values(b"content-length")}
        if self.method == b"HEAD" or head.code in _NO_BODY:
            self.consumer.responseHead(head)
            if not self.done:
                self._trailing(rest)
                self._finish(True)
            return
        if codings:
            if codings[-1] != b"chunked":
                # The body ends with the connection.
                self._feed = self._readToClose
            else:
                self._chunks = _ChunkedTransferDecoder(self._chunkData, self._chunksDone)
                self._feed = self._readChunks
        elif lengths:
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                self._fail("invalid Content-Length")
                return
            self._remaining = int(next(iter(lengths)))
            self._feed = self._readLength
        else:
            self._feed = self._readToClose
        self.consumer.responseHead(head)
        if self.done:
            return
        if self._feed == self._readLength and self._remaining == 0:
            self._trailing(rest)
            self._finish(True)
        elif rest:
            self._feed(rest)

    def _trailing(self, rest: bytes) -> None:
        # A response is never pipelined behind another: what follows one
        # is the server's confusion, and the connection is not reused.
        if rest:
            self._reusable = False

    def _readLength(self, data: bytes) -> None:
        if len(data) >= self._remaining:
            body, rest = data[: self._remaining], data[self._remaining :]
            self._remaining = 0
            if body:
                self.consumer.responseData(body)
            if not self.done:
                self._trailing(rest)
                self._finish(True)
            return
        self._remaining -= len(data)
        self.consumer.responseData(data)

    def _readChunks(self, data: bytes) -> None:
        assert self._chunks is not None
        try:
            self._chunks.dataReceived(data)
        except (_MalformedChunkedDataError, RuntimeError):
            if not self.done:
                self._fail("malformed chunked body")

    def _chunkData(self, data: bytes) -> None:
        if not self.done:
            self.consumer.responseData(data)

    def _chunksDone(self, rest: bytes) -> None:
        if not self.done:
            self._trailing(rest)
            self._finish(True)

    def _readToClose(self, data: bytes) -> None:
        self._reusable = False
        self.consumer.responseData(data)


def _parseHead(raw: bytes) -> ResponseHead | None:
    lines = raw.split(b"\r\n")
    if b"\0" in raw or b"\r" in lines[0] or b"\n" in lines[0]:
        # The status line's reason phrase goes to the client as it came: a
        # bare CR or LF in it would start a header of the backend's choosing
        # there. A NUL is refused in every line (RFC 9110, section 5.5).
        return None
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(parts[1]) != 3 or not parts[1].isdigit():
        return None
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t") or b"\n" in line or b"\r" in line:
            # Folded or nameless fields, bare CR or LF: refused, as a
            # server that writes them cannot be relied on for framing.
            return None
        headers.append((name, value.strip(b" \t")))
    return ResponseHead(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else b"", headers, len(raw) + 4)


class HTTPBackend(BackendProtocol):
    """
    A connection to one backend's HTTP port, for one client connection.

    It "logs in" as soon as it is connected (after the TLS handshake for
    implicit TLS): HTTP has no dialogue before the first request, and
    credentials travel in each request.

    @ivar reader: the response being read, if any.
    @ivar lost: called once the connection is gone (after L{succeed}).
    """

    def __init__(self, job: LoginJob, clock: IReactorTime, timeout: float) -> None:
        super().__init__(job, clock, timeout)
        self.state = LoginState.SESSION
        self.reader: ResponseReader | None = None
        self.lost: Callable[[HTTPBackend], None] | None = None
        self.gone = False

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.job.tls == "starttls":
            # HTTP has no STARTTLS; a router's answer can still ask for it
            # (the configuration refuses it). Never send the request, and
            # its credentials, in clear instead.
            self.fail(FailureKind.UNAVAILABLE, 'HTTP has no STARTTLS: the backend\'s http port needs tls "implicit" or "none"')
        elif self.job.tls != "implicit":
            self.succeed()

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        self.succeed()

    def dialogueReceived(self, data: bytes) -> None:
        reader = self.reader
        if reader is None or reader.done:
            # Nothing was asked: a server that talks out of turn is not to
            # be trusted with the next request.
            self.transport.abortConnection()
            return
        reader.dataReceived(data)

    def buffered(self) -> int:
        return 0

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.gone = True
        reader = self.reader
        if reader is not None:
            reader.connectionLost()
        super().connectionLost(reason)
        if self.lost is not None:
            self.lost(self)
