"""
The post-login byte pump between a client and its backend.

After the login dialogue, the two protocols hand their transports to a
L{Relay}. From then on every chunk read from one side is written to the other
untouched. The cost per chunk is kept to a few attribute look-ups: the
protocols forward C{dataReceived} straight to L{Relay.fromClient} and
L{Relay.fromBackend}, and the idle check is one timer per session that is
re-armed lazily instead of on every chunk.

Backpressure: each transport is registered as the streaming producer of the
other, so when the backend's send buffer fills, Twisted pauses reading from
the client (and the other way round). The relay never holds more than the
transports' own buffers.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.logger import Logger

#: Octets read from a socket at once while relaying. Twisted's default of
#: 64 KiB costs one trip through the reactor and the protocols per 64 KiB;
#: larger reads make bulk transfers (a big FETCH) cheaper per megabyte.
#: It is also how much one direction may buffer before reading pauses.
RELAY_READ_SIZE = 256 * 1024


def socketOf(transport: object) -> FileDescriptor | None:
    """
    The socket-level transport under C{transport}'s wrappers (TLS, PROXY
    header reader), if there is one.
    """
    for _ in range(4):
        if isinstance(transport, FileDescriptor):
            return transport
        transport = getattr(transport, "transport", None)
    return None


class Relay:
    """
    Join two connected transports.

    @ivar bytesFromClient: octets read from the client and sent to the
        backend since the relay started.
    @ivar bytesFromBackend: octets read from the backend and sent to the
        client.
    @ivar endReason: why the relay ended: C{"client closed"},
        C{"backend closed"}, C{"idle timeout"} or C{"shutdown"}; L{None}
        while it runs.
    """

    log = Logger()

    def __init__(
        self,
        client: ITransport,
        backend: ITransport,
        clock: IReactorTime,
        idleTimeout: float,
        onEnd: Callable[[Relay], None],
    ) -> None:
        self._client = client
        self._backend = backend
        self._clock = clock
        self._idleTimeout = idleTimeout
        self._onEnd = onEnd
        self._idleCall: IDelayedCall | None = None
        self._lastActivity = 0.0
        self.bytesFromClient = 0
        self.bytesFromBackend = 0
        self.endReason: str | None = None

    def start(self, toClient: bytes = b"", toBackend: bytes = b"") -> None:
        """
        Begin relaying, first delivering what either side sent early.

        @param toClient: backend octets read past the end of the login
            dialogue; they go to the client right after the login reply.
        @param toBackend: client octets pipelined after its login command.
        """
        self._lastActivity = self._clock.seconds()
        for transport in (self._client, self._backend):
            descriptor = socketOf(transport)
            if descriptor is not None:
                descriptor.bufferSize = RELAY_READ_SIZE
        # Each side is the other's producer: a full send buffer on one leg
        # pauses reading on the other.
        self._backend.registerProducer(self._client, True)
        self._client.registerProducer(self._backend, True)
        if self._idleTimeout > 0:
            self._idleCall = self._clock.callLater(self._idleTimeout, self._checkIdle)
        if toClient:
            self.fromBackend(toClient)
        if toBackend:
            self.fromClient(toBackend)

    def fromClient(self, data: bytes) -> None:
        """
        The client sent C{data}: pass it to the backend.
        """
        self._lastActivity = self._clock.seconds()
        self.bytesFromClient += len(data)
        self._backend.write(data)

    def fromBackend(self, data: bytes) -> None:
        """
        The backend sent C{data}: pass it to the client.
        """
        self._lastActivity = self._clock.seconds()
        self.bytesFromBackend += len(data)
        self._client.write(data)

    def clientLost(self) -> None:
        """
        The client's connection is gone: close the backend after it has
        received everything already written.
        """
        self._end("client closed", self._backend)

    def backendLost(self) -> None:
        """
        The backend's connection is gone: close the client once the
        backend's last words (e.g. C{* BYE}) have reached it.
        """
        self._end("backend closed", self._client)

    def stop(self, reason: str = "shutdown") -> None:
        """
        End the relay from outside (shutdown, an operator dropping the
        session): both connections are closed.
        """
        if self._end(reason, self._backend):
            self._client.loseConnection()

    def _checkIdle(self) -> None:
        idleFor = self._clock.seconds() - self._lastActivity
        if idleFor >= self._idleTimeout:
            self._idleCall = None
            self.log.info("relay idle for {seconds:.0f}s, closing", seconds=idleFor)
            self.stop("idle timeout")
        else:
            self._idleCall = self._clock.callLater(
                self._idleTimeout - idleFor, self._checkIdle
            )

    def _end(self, reason: str, other: ITransport) -> bool:
        if self.endReason is not None:
            return False
        self.endReason = reason
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        self._idleCall = None
        for transport in (self._client, self._backend):
            # A transport that is already gone may refuse; nothing to undo.
            try:
                transport.unregisterProducer()
            except Exception:
                pass
        other.loseConnection()
        self._onEnd(self)
        return True
