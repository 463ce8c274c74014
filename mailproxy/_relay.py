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

When both legs are plain TCP (no TLS on either), the bytes need not pass
through Python at all: L{_Splicer} moves them with C{splice(2)} through a
pipe per direction, and only the readiness events are handled here. Taking
the sockets over costs more than relaying a few lines, so a session is
relayed in Python first and spliced once it has moved L{SPLICE_AFTER}
octets: most sessions are short (a login, a few commands, a logout).

A protocol may give the relay a guard (L{mailproxy._guard.IRelayGuard}): it
sees the client's octets before the backend and decides what reaches it.

Half-close: a side that stops sending (TCP FIN, or a TLS close_notify) has
that passed on to the other side once everything it sent has been written
there (to a TLS backend, L{TLS_HALF_CLOSE_DELAY} later), and the other
direction goes on until it ends too (a client's C{LOGOUT} followed by
C{shutdown(SHUT_WR)} still gets the backend's C{* BYE} and tagged C{OK}).
The idle timeout keeps applying meanwhile.

Once the relay has ended nothing more crosses it, and a backend connection
it closed that is still open L{CLOSE_GRACE} seconds later is aborted (the
session does the same for its client).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from typing import Callable, cast

from OpenSSL.SSL import SENT_SHUTDOWN, Error, WantReadError, ZeroReturnError
from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from . import _tls
from ._guard import IRelayGuard, IRelayLink
from ._outcomes import EndReason
from ._proxylistener import ProxyHeaderProtocol
from ._tcp import quickAck
from ._transport import IProxyTransport

#: Octets read from a socket at once while relaying. Twisted's default of
#: 64 KiB costs one trip through the reactor and the protocols per 64 KiB;
#: larger reads make bulk transfers (a big FETCH) cheaper per megabyte.
#: It is also how much one direction may buffer before reading pauses.
RELAY_READ_SIZE = 256 * 1024


#: Seconds a TLS backend learns of the client's half-close (our
#: close_notify) after it, unless the session ends before. Dovecot's login
#: process, which runs the TLS of its IMAP and POP3 connections, drops its
#: reply to a command (C{LOGOUT}) that arrives together with the
#: close_notify; a plain TCP backend gets its FIN at once, and a client
#: learns of the backend's close at once (it may be waiting for it after
#: its LOGOUT).
TLS_HALF_CLOSE_DELAY = 2.0

#: Seconds without traffic after which a relayed TLS session gives back the
#: buffers its TLS connections grew (L{mailproxy._tls.releaseBuffers}): a
#: big transfer leaves each with as much as it once held, for as long as
#: the session lasts. Later, and a burst of commands would pay for growing
#: them again.
TLS_BUFFERS_QUIET = 10.0

#: Seconds without traffic after which a half-closed session ends (the
#: idle timeout, if shorter). A client's close reaches the backend as a
#: half-close (TCP cannot tell the two apart); a backend that then neither
#: answers nor closes must not hold the session for the whole idle timeout.
HALF_CLOSED_IDLE = 60.0


#: Seconds a connection the proxy closed may take to finish closing before it
#: is aborted: a TLS peer may never answer the close alert (one that is still
#: writing does not), and a peer that does not read never takes the last
#: words. A few seconds are plenty for a goodbye of a few hundred octets.
#: The session gives its client this long (L{mailproxy._session}), the relay
#: the backend's connection it closes.
CLOSE_GRACE = 5.0


#: Octets a plain session relays in Python before its sockets are spliced
#: (0: at once). Taking them over costs four C{epoll_ctl} calls, and each
#: chunk spliced costs two C{splice} calls and more reactor events than a
#: C{recv} and a C{send}: a short session (a logout) costs less in Python.
SPLICE_AFTER = 64 * 1024


#: No holds on the client: one empty set every relay shares (CPython has
#: no shared empty frozenset).
_NO_HOLDS: frozenset[str] = frozenset()


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


def _layers(transport: object) -> list[object]:
    """
    The protocols of the connection under C{transport}, from the socket's
    up to the session's (wrappers such as TLS or a PROXY header reader
    first).
    """
    return _layersOf(socketOf(transport))


def _layersOf(descriptor: FileDescriptor | None) -> list[object]:
    """
    The protocols of the connection of C{descriptor} (L{socketOf}), from
    the socket's up to the session's.
    """
    layers: list[object] = []
    layer = getattr(descriptor, "protocol", None)
    while layer is not None and len(layers) < 5:
        layers.append(layer)
        layer = getattr(layer, "wrappedProtocol", None)
    return layers


def allowHalfClose(transport: object) -> bool:
    """
    Let the connection under C{transport} report its peer's half-close (a
    TCP FIN, a TLS close_notify) as C{readConnectionLost} up to the
    session's protocol, instead of ending. Done at hand-over only, so
    nothing changes before login.

    @return: whether every layer can pass it on; if one cannot, nothing
        is changed and the peer's half-close ends the connection as before.
    """
    return _allowHalfClose(_layers(transport))


def _allowHalfClose(layers: list[object]) -> bool:
    """
    L{allowHalfClose} on a connection's L{_layers}.
    """
    if not layers:
        return False
    for layer in layers:
        if isinstance(layer, TLSMemoryBIOProtocol):
            if type(layer) not in (BufferingTLSTransport, _tls.TLSLayer, _HalfClosingTLS):
                return False
        elif not hasattr(type(layer), "readConnectionLost"):
            return False
    for layer in layers:
        if type(layer) in (BufferingTLSTransport, _tls.TLSLayer):
            # Twisted's TLS (or a listener's TLSLayer) ends the connection
            # on a close_notify; the same layer with the half-close below
            # (no state of its own).
            layer.__class__ = _HalfClosingTLS
        _declareHalfCloseable(layer)
    return True


#: For each protocol class that got one, its subclass that declares
#: IHalfCloseableProtocol (see _declareHalfCloseable).
_halfCloseableClasses: dict[type, type] = {}

#: For each instance declaration (and class) of a connection's layer that
#: got one, that declaration with IHalfCloseableProtocol added (see
#: _declareHalfCloseable). A few kinds of connection: a few entries.
_halfCloseableDeclarations: dict[tuple[object, type], object] = {}


def _declareHalfCloseable(layer: object) -> None:
    """
    Have C{layer} provide L{IHalfCloseableProtocol} from now on.
    """
    cls = type(layer)
    provides = getattr(layer, "__dict__", {}).get("__provides__")
    if provides is not None:
        # Interfaces declared on the instance (a TLS layer's, those of its
        # transport): declared there too, as the instance's declaration is
        # what counts. Every connection of a kind has the same declaration
        # (zope shares them); alsoProvides would work out the same larger
        # one for each (some 15 us, most of the interface machinery a TLS
        # login runs), so it is worked out once per kind.
        key = (provides, cls)
        declared = _halfCloseableDeclarations.get(key)
        if declared is None:
            alsoProvides(layer, IHalfCloseableProtocol)
            _halfCloseableDeclarations[key] = layer.__provides__  # type: ignore[attr-defined]
        else:
            layer.__provides__ = declared  # type: ignore[attr-defined]
        return
    # Declaring it on the instance (alsoProvides) costs some 4 us, twice
    # per login, and makes every later look-up of the interface slower: the
    # protocol becomes an instance of a subclass that declares it (made
    # once per class, the same name, no state of its own), as a TLS layer
    # becomes a _HalfClosingTLS. A class that declares it already is its
    # own, found in the same table (zope is asked once per class).
    declaring = _halfCloseableClasses.get(cls)
    if declaring is None:
        if IHalfCloseableProtocol.implementedBy(cls):
            declaring = cls
        else:
            names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
            made = type(cls.__name__, (cls,), {"__slots__": (), **names})
            declaring = implementer(IHalfCloseableProtocol)(made)
        _halfCloseableClasses[cls] = declaring
    if declaring is not cls:
        layer.__class__ = declaring


def writeAtOnce(transport: object) -> None:
    """
    Have the TLS layer of the connection under C{transport} encrypt and
    send each write at once, after what it holds now.

    Twisted's TLS layer gathers the writes of one turn of the event loop
    and sends them at the start of the next: fewer, fuller TLS records
    where a protocol writes a reply piece by piece, but each write waits
    for everything else the proxy does in that turn (at the hand-over,
    the login reply waits for the relay to be set up). A relay writes
    whole chunks, one per read: nothing is gained by waiting.
    """
    _writeAtOnce(_layers(transport))


def _writeAtOnce(layers: list[object]) -> None:
    """
    L{writeAtOnce} on a connection's L{_layers}.
    """
    for layer in layers:
        if isinstance(layer, BufferingTLSTransport):
            layer._aggregator.flush()
            # The instance's write is the gathering one; the class's
            # (TLSMemoryBIOProtocol's) encrypts and sends at once.
            vars(layer).pop("write", None)


def closeWriting(transport: IProxyTransport) -> None:
    """
    Half-close C{transport} once what was written to it is sent: a TCP
    FIN, or a TLS close_notify (not a bare FIN under TLS). A TLS layer that
    cannot is closed instead.
    """
    for layer in _layers(transport):
        if isinstance(layer, _HalfClosingTLS):
            layer.loseWriteConnection()
            return
        if isinstance(layer, TLSMemoryBIOProtocol):
            transport.loseConnection()
            return
    transport.loseWriteConnection()


@implementer(IHalfCloseableProtocol)
class _HalfClosingTLS(_tls.TLSLayer):
    """
    Twisted's TLS layer, but a close_notify from the peer only ends its
    sending: the wrapped protocol gets C{readConnectionLost} and may go on
    writing; and C{loseWriteConnection} sends our close_notify and goes on
    reading. A TCP FIN under TLS counts as the peer's half-close too.
    """

    _peerDone = False

    def dataReceived(self, data: bytes) -> None:
        # Nothing may follow the peer's close_notify: what does is dropped,
        # not piled up unread in the TLS buffer.
        if not self._peerDone:
            super().dataReceived(data)

    def _flushReceiveBIO(self) -> None:
        # Twisted's loop, except for the close_notify of a peer we still
        # write to.
        while not self._lostTLSConnection and not self._peerDone:
            try:
                data = self._tlsConnection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                if self._tlsConnection.get_shutdown() & SENT_SHUTDOWN:
                    # Both sides are done: close as Twisted does.
                    self._shutdownTLS()
                    self._tlsShutdownFinished(None)
                else:
                    self.readConnectionLost()
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        self._flushSendBIO()

    def readConnectionLost(self) -> None:
        """
        The peer sends nothing more (its close_notify, or a FIN below).
        """
        if self._peerDone:
            return
        self._peerDone = True
        if self.disconnecting:
            # Our close_notify went out already: nothing more to wait for.
            self._closeBelow()
        else:
            # allowHalfClose made the wrapped protocol half-closeable.
            cast(IHalfCloseableProtocol, self.wrappedProtocol).readConnectionLost()

    def writeConnectionLost(self) -> None:
        """
        Only TLS half-closes, never the TCP below it.
        """

    def loseWriteConnection(self) -> None:
        """
        Send our close_notify after what was written, and keep reading.
        """
        self._aggregator.flush()
        if self._appSendBuffer:
            # Still handshaking (never the case once relaying): close.
            self.loseConnection()
            return
        self._shutdownTLS()

    def _shutdownTLS(self) -> None:
        super()._shutdownTLS()
        if self.disconnecting and self._peerDone:
            # The peer's close_notify will not come (it sent a bare FIN, or
            # it came already): close the TCP connection now.
            self._closeBelow()

    def _closeBelow(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


@implementer(IRelayLink)
class Relay:
    """
    Join two connected transports.

    @ivar bytesFromClient: octets read from the client since the relay
        started (all sent to the backend, but what a guard refused).
    @ivar bytesFromBackend: octets read from the backend and sent to the
        client.
    @ivar endReason: why the relay ended: L{EndReason.CLIENT_CLOSED} or
        L{EndReason.BACKEND_CLOSED} (whichever side closed or half-closed
        first), L{EndReason.IDLE_TIMEOUT}, L{EndReason.CONNECTION_RESET},
        or what L{stop} was given; L{None} while it runs.
    @ivar endDetail: what goes with C{endReason} in the log (a drop's
        text, a guard's protocol error).
    @ivar clientGone: the client's connection is lost (the relay did not
        have to close it).
    """

    log = Logger()

    def __init__(
        self,
        client: IProxyTransport,
        backend: IProxyTransport,
        clock: IReactorTime,
        idleTimeout: float,
        onEnd: Callable[[Relay], None],
        guard: IRelayGuard | None = None,
    ) -> None:
        self._client = client
        self._backend = backend
        self._clock = clock
        self._idleTimeout = idleTimeout
        self._onEnd = onEnd
        self._idleCall: IDelayedCall | None = None
        self._splicer: _Splicer | None = None
        # The octets relayed in Python after which the sockets are spliced
        # (L{SPLICE_AFTER}); None: not now, or never.
        self._spliceAt: int | None = None
        self._lastActivity = 0.0
        self.bytesFromClient = 0
        self.bytesFromBackend = 0
        self.endReason: EndReason | None = None
        self.endDetail = ""
        self._guard = guard
        # Immutable: the empty set is shared, so an idle session holds none
        # of its own.
        self._clientHolds: frozenset[str] = _NO_HOLDS
        self.clientGone = False
        # The sides that have stopped sending (half-closed), and which did
        # first.
        self._clientDone = False
        self._backendDone = False
        self._closedFirst: EndReason | None = None
        self._halfCloseCall: IDelayedCall | None = None
        # The legs that are TLS (their buffers are given back when quiet),
        # and the call that will do it.
        self._tlsLegs: tuple[IProxyTransport, ...] = ()
        self._releaseCall: IDelayedCall | None = None
        # The abort of the backend's connection, once the relay closed it
        # and until it is gone.
        self._backendGrace: IDelayedCall | None = None

    def start(
        self,
        toClient: bytes = b"",
        toBackend: bytes = b"",
        schedule: Callable[[float, Callable[[], None]], IDelayedCall] | None = None,
    ) -> None:
        """
        Begin relaying, first delivering what either side sent early.

        @param toClient: backend octets read past the end of the login
            dialogue; they go to the client right after the login reply.
        @param toBackend: client octets pipelined after its login command.
        @param schedule: makes the idle timeout's timed call, as the
            clock's C{callLater} does (the default); a session gives its
            pre-authentication timer's, which moves the call it has.
        """
        # Each leg's socket and protocol layers, found once.
        sockets = (socketOf(self._client), socketOf(self._backend))
        layers = (_layersOf(sockets[0]), _layersOf(sockets[1]))
        # First the login reply, if a TLS layer holds it back.
        for each in layers:
            _writeAtOnce(each)
        self._lastActivity = self._clock.seconds()
        if self._idleTimeout > 0:
            self._idleCall = (schedule or self._clock.callLater)(self._idleTimeout, self._checkIdle)
        # A guard must see every client octet before the backend does: the
        # kernel cannot move them for it.
        if self._guard is None and _Splicer.possible(self, *sockets):
            if SPLICE_AFTER == 0 and _Splicer.attempt(self, toClient, toBackend) is not None:
                return
            self._spliceAt = SPLICE_AFTER
        for each in layers:
            _allowHalfClose(each)
        for descriptor in sockets:
            if descriptor is not None:
                descriptor.bufferSize = RELAY_READ_SIZE
        self._tlsLegs = tuple(t for t in (self._client, self._backend) if _tls.isTLS(t))
        if self._tlsLegs:
            # The login's handshakes and dialogue grew them already.
            self._releaseCall = self._clock.callLater(TLS_BUFFERS_QUIET, self._releaseBuffers)
        # Each side is the other's producer: a full send buffer on one leg
        # pauses reading on the other.
        if self._guard is None:
            self._backend.registerProducer(self._client, True)
            self._client.registerProducer(self._backend, True)
        else:
            # The guard pauses the client too: reasons add up. Its answers
            # come from client input, so a client that does not read them
            # must stop being read as well.
            self._guard.attach(self)
            self._backend.registerProducer(_ClientReading(self, "backend full"), True)
            self._client.registerProducer(_ClientReading(self, "client full", self._backend), True)
        if toClient:
            self.fromBackend(toClient)
        if toBackend:
            self.fromClient(toBackend)

    def fromClient(self, data: bytes) -> None:
        """
        The client sent C{data}: pass it to the backend.

        Its ACK goes now (L{quickAck}): the proxy never answers a client
        itself here, and a client that wrote a command in parts (Python's
        imaplib sends an APPEND's literal and its CRLF in two writes) would
        hold the last part until the delayed ACK, and the backend would
        wait for it: 40 ms per command.

        Once the relay has ended nothing is passed on: a TLS client is
        still read while its connection waits for the client's
        close_notify, and a client dropped (its account moved) must not go
        on giving the backend commands.
        """
        if self.endReason is not None:
            return
        quickAck(getattr(socketOf(self._client), "socket", None))
        self._lastActivity = self._clock.seconds()
        self.bytesFromClient += len(data)
        self._relayed()
        if self._guard is None:
            self._backend.write(data)
        else:
            self._guard.fromClient(data)

    def fromBackend(self, data: bytes) -> None:
        """
        The backend sent C{data}: pass it to the client (not once the
        relay has ended: the client's goodbye was the last thing for it).
        """
        if self.endReason is not None:
            return
        self._lastActivity = self._clock.seconds()
        self.bytesFromBackend += len(data)
        self._relayed()
        self._client.write(data)
        if self._guard is not None and self.endReason is None:
            self._guard.fromBackend(data)

    def _relayed(self) -> None:
        # Octets passed through Python either way, counted already: time
        # to splice, or to start the quiet timer of TLS buffers.
        if self._spliceAt is not None and self.bytesFromClient + self.bytesFromBackend >= self._spliceAt:
            self._spliceSoon()
        if self._releaseCall is None and self._tlsLegs:
            self._releaseCall = self._clock.callLater(TLS_BUFFERS_QUIET, self._releaseBuffers)

    def _spliceSoon(self) -> None:
        # Not from inside a read: the reactor may go on to the socket's
        # write event, and Twisted's transport would then unregister the
        # splicer's writer on the same descriptor. In the next turn,
        # before the reactor polls again.
        self._spliceAt = None
        self._clock.callLater(0, self._splice)

    def _splice(self) -> None:
        # A half-close already seen (or a hold, or the end) is state the
        # splicer would not know about: such a session stays in Python.
        if self.endReason is not None or self._closedFirst is not None or self._clientHolds:
            return
        if _Splicer.attempt(self, b"", b"") is None:
            # More buffered than the pipes take now: later.
            self._spliceAt = self.bytesFromClient + self.bytesFromBackend + SPLICE_AFTER

    # IRelayLink, for the guard

    def forward(self, data: bytes) -> None:
        self._backend.write(data)

    def answer(self, data: bytes) -> None:
        self._client.write(data)

    def holdClient(self, why: str = "guard") -> None:
        if not self._clientHolds:
            self._client.pauseProducing()
        self._clientHolds |= {why}

    def releaseClient(self, why: str = "guard") -> None:
        if why in self._clientHolds:
            self._clientHolds = self._clientHolds - {why} or _NO_HOLDS
            if not self._clientHolds and self.endReason is None:
                self._client.resumeProducing()

    def close(self, reason: EndReason, detail: str = "") -> None:
        self.stop(reason, detail)

    def clientLost(self) -> None:
        """
        The client's connection is gone: close the backend after it has
        received everything already written.
        """
        self.clientGone = True
        self._end(self._closedFirst or EndReason.CLIENT_CLOSED, self._backend)

    def backendLost(self) -> None:
        """
        The backend's connection is gone: close the client once the
        backend's last words (e.g. C{* BYE}) have reached it.
        """
        if self._backendGrace is not None:
            # Closed as the relay asked, in time.
            if self._backendGrace.active():
                self._backendGrace.cancel()
            self._backendGrace = None
        self._end(self._closedFirst or EndReason.BACKEND_CLOSED, self._client)

    def clientHalfClosed(self) -> None:
        """
        The client will send nothing more but still reads: once the backend
        has what the client sent, tell it so, and go on relaying its
        replies.
        """
        if self.endReason is None and not self._clientDone:
            self._clientDone = True
            if self._guard is None:
                self._halfClosed(EndReason.CLIENT_CLOSED, self._client, self._backend, self._backendDone)
            else:
                # Commands the guard still holds (waiting for replies) go to
                # the backend before the half-close does.
                self._guard.whenDrained(self._clientDrained)

    def _clientDrained(self) -> None:
        if self.endReason is None:
            self._halfClosed(EndReason.CLIENT_CLOSED, self._client, self._backend, self._backendDone)

    def backendHalfClosed(self) -> None:
        """
        The backend will send nothing more but still reads: the same, the
        other way round.
        """
        if self.endReason is None and not self._backendDone:
            self._backendDone = True
            self._halfClosed(EndReason.BACKEND_CLOSED, self._backend, self._client, self._clientDone)

    def _halfClosed(self, reason: EndReason, source: IProxyTransport, sink: IProxyTransport, sinkDone: bool) -> None:
        if self._closedFirst is None:
            self._closedFirst = reason
        if sinkDone:
            # Both directions are over: close both connections, then end
            # (the session learns of the end with a plain client already
            # gone, and needs no timer to see its close through).
            self._end(self._closedFirst, sink, alsoClose=source)
            return
        self._shortenIdle()
        # The source produces nothing more: the sink's writes no longer
        # pause it, and a registered producer would hold back the sink's
        # half-close.
        try:
            sink.unregisterProducer()
        except Exception:
            pass
        if sink is self._backend and any(isinstance(layer, TLSMemoryBIOProtocol) for layer in _layers(sink)):
            self._halfCloseCall = self._clock.callLater(TLS_HALF_CLOSE_DELAY, closeWriting, sink)
        else:
            closeWriting(sink)

    def _shortenIdle(self) -> None:
        # One side half-closed (relayed in Python or spliced): the session
        # ends after HALF_CLOSED_IDLE quiet seconds, not the whole idle
        # timeout, if the other side neither answers nor closes.
        if not 0 < self._idleTimeout <= HALF_CLOSED_IDLE:
            self._idleTimeout = HALF_CLOSED_IDLE
            if self._idleCall is not None and self._idleCall.active():
                self._idleCall.cancel()
            self._idleCall = self._clock.callLater(HALF_CLOSED_IDLE, self._checkIdle)

    def stop(self, reason: EndReason = EndReason.SHUTDOWN, detail: str = "") -> None:
        """
        End the relay from outside (shutdown, an operator dropping the
        session, a guard refusing the client): both connections are closed.

        @param detail: what the log says with C{reason}.
        """
        if self._end(reason, self._backend, detail):
            self._client.loseConnection()

    def _checkIdle(self) -> None:
        idleFor = self._clock.seconds() - self._lastActivity
        if idleFor >= self._idleTimeout:
            self._idleCall = None
            self.log.info("relay idle for {seconds:.0f}s, closing", seconds=idleFor)
            self.stop(EndReason.IDLE_TIMEOUT)
        else:
            self._idleCall = self._clock.callLater(
                self._idleTimeout - idleFor, self._checkIdle
            )

    def _releaseBuffers(self) -> None:
        # Once both directions have been quiet for TLS_BUFFERS_QUIET
        # seconds (checked lazily, as the idle timeout is), until the next
        # traffic re-arms it.
        quietFor = self._clock.seconds() - self._lastActivity
        if quietFor < TLS_BUFFERS_QUIET:
            self._releaseCall = self._clock.callLater(TLS_BUFFERS_QUIET - quietFor, self._releaseBuffers)
            return
        self._releaseCall = None
        for transport in self._tlsLegs:
            _tls.releaseBuffers(transport)

    def _end(
        self, reason: EndReason, other: IProxyTransport, detail: str = "", alsoClose: IProxyTransport | None = None
    ) -> bool:
        """
        End the relay (unless it has ended): close C{other} (and
        C{alsoClose}), then call the C{onEnd} function.

        @return: whether it ended now.
        """
        if self.endReason is not None:
            return False
        self.endReason = reason
        self.endDetail = detail
        for call in (self._idleCall, self._halfCloseCall, self._releaseCall):
            if call is not None and call.active():
                call.cancel()
        self._idleCall = self._halfCloseCall = self._releaseCall = None
        if self._splicer is not None:
            # Give the sockets back to Twisted, which closes them.
            self._splicer.detach()
            self._splicer = None
        for transport in (self._client, self._backend):
            # A transport that is already gone may refuse; nothing to undo.
            try:
                transport.unregisterProducer()
            except Exception:
                pass
        if self._backend is other or self._backend is alsoClose:
            # A close the proxy starts finishes in bounded time: a backend
            # that does not read keeps what was written to it unsent, and a
            # TLS backend may never send its close_notify. The session sees
            # to the client's close (the backend's is no business of it).
            # Armed first: a half-closed connection closes within
            # loseConnection, and backendLost then calls it off.
            self._backendGrace = self._clock.callLater(CLOSE_GRACE, self._backendGraceExpired)
        other.loseConnection()
        if alsoClose is not None:
            alsoClose.loseConnection()
        # Neither is needed once ended, and each refers back to the relay
        # (the session's method, the guard's link): reference cycles that
        # only the garbage collector would free.
        onEnd, self._onEnd = self._onEnd, _ended
        if self._guard is not None:
            self._guard = _ENDED_GUARD
        onEnd(self)
        return True

    def _backendGraceExpired(self) -> None:
        # Closed by the relay CLOSE_GRACE seconds ago and still there.
        self._backendGrace = None
        self._backend.abortConnection()


def _ended(relay: Relay) -> None:
    pass


@implementer(IRelayGuard)
class _EndedGuard:
    """
    What a guarded relay holds instead of its guard once it has ended: no
    octet reaches a guard after that.
    """

    def attach(self, link: IRelayLink) -> None:
        pass

    def fromClient(self, data: bytes) -> None:
        pass

    def fromBackend(self, data: bytes) -> None:
        pass

    def whenDrained(self, action: Callable[[], None]) -> None:
        pass


_ENDED_GUARD = _EndedGuard()


@implementer(IPushProducer)
class _ClientReading:
    """
    The client's reading (and the backend's, if given), as a producer for
    a guarded relay, where a guard may pause the client as well: a full
    send buffer is one reason to pause, called C{why}.
    """

    def __init__(self, relay: Relay, why: str, backend: IProxyTransport | None = None) -> None:
        self._relay = relay
        self._why = why
        self._backend = backend

    def pauseProducing(self) -> None:
        self._relay.holdClient(self._why)
        if self._backend is not None:
            self._backend.pauseProducing()

    def resumeProducing(self) -> None:
        self._relay.releaseClient(self._why)
        if self._backend is not None:
            self._backend.resumeProducing()

    def stopProducing(self) -> None:
        self._relay.releaseClient(self._why)


#: How much one splice direction holds in its pipe (what the kernel allows up
#: to /proc/sys/fs/pipe-max-size, 1 MiB by default).
SPLICE_PIPE_SIZE = 1024 * 1024
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


# Twisted's write buffer. Once the splicer owns a socket, what the proxy
# wrote to it through Twisted and Twisted has not sent yet (the login
# reply, typically) must go first, through the pipe. FileDescriptor has no
# public way to take that back, nor to tell when it is all sent: these two
# functions are the only places that touch its buffer, dataBuffer from
# offset on and then the _tempDataBuffer list (_tempDataLen octets), as
# Twisted has long kept it (checked with 26.10). If a Twisted renames
# them, _unsentSize says None and sessions are relayed in Python (slower,
# still correct); if it keeps the names but buffers elsewhere too, unsent
# bytes would be lost or overtaken, which the spliced relay tests (the
# login reply reaches the client first) show.


def _unsentSize(connection: tcp.Connection) -> int | None:
    """
    How many octets Twisted holds for C{connection}, written but not yet
    sent; L{None} if this Twisted does not keep them where we look.
    """
    try:
        return len(connection.dataBuffer) - connection.offset + connection._tempDataLen
    except AttributeError:
        return None


def _takeUnsent(connection: tcp.Connection) -> bytes:
    """
    Take what Twisted holds for C{connection} unsent, leaving its buffer
    empty (Twisted's writing must be stopped).
    """
    data = bytes(connection.dataBuffer[connection.offset :]) + b"".join(connection._tempDataBuffer)
    connection.dataBuffer = b""
    connection.offset = 0
    connection._tempDataBuffer = []
    connection._tempDataLen = 0
    return data


def _plainSocket(transport: object, descriptor: FileDescriptor | None) -> tcp.Connection | None:
    """
    The TCP connection under C{transport} (C{descriptor}, its L{socketOf})
    if nothing but a PROXY header reader sits between them and no TLS runs
    on it.
    """
    if not isinstance(descriptor, tcp.Connection) or getattr(descriptor, "TLS", False):
        return None
    if transport is not descriptor and not isinstance(transport, ProxyHeaderProtocol):
        return None
    if _unsentSize(descriptor) is None:
        return None  # this Twisted buffers writes some other way
    if not descriptor.connected or descriptor.disconnecting:
        # Being closed (a session dropped during its login): Twisted must
        # finish that, it would not once the splicer took the socket.
        return None
    return descriptor


@implementer(IReadDescriptor, IWriteDescriptor)
class _SocketEnd:
    """
    One relayed socket, as the reactor sees it while splicing: readable
    means the peer sent something, writable means the pipe towards it can
    drain.

    @ivar splicer: the splicer, until it lets go of the socket (L{None}
        from then on: the two no longer keep each other alive, so a spliced
        session leaves nothing for the garbage collector).
    """

    def __init__(self, splicer: _Splicer, connection: tcp.Connection) -> None:
        self.splicer: _Splicer | None = splicer
        self.connection = connection
        self._fileno = connection.fileno()

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return "splice"

    def doRead(self) -> None:
        if self.splicer is not None:
            self.splicer.readable(self)

    def doWrite(self) -> None:
        if self.splicer is not None:
            self.splicer.writable(self)

    def connectionLost(self, reason: object) -> None:
        if self.splicer is not None:
            self.splicer.fail()


class _Pipe:
    """
    A non-blocking pipe that splices go through.

    @ivar capacity: how many octets it holds (the kernel may give less than
        asked once the user's pipe quota, C{fs.pipe-user-pages-soft}, is used).
    """

    def __init__(self) -> None:
        self.read, self.write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.write, _F_SETPIPE_SZ, SPLICE_PIPE_SIZE)
        except OSError:
            pass  # the default (64 KiB) works too, with more wake-ups
        try:
            self.capacity = fcntl.fcntl(self.write, _F_GETPIPE_SZ)
        except OSError:
            self.capacity = 4096

    def close(self) -> None:
        os.close(self.read)
        os.close(self.write)


def _drainPipe(pipe: _Pipe, size: int) -> bytes:
    """
    The C{size} octets C{pipe} holds (fewer if it holds fewer).
    """
    chunks = []
    while size > 0:
        try:
            chunk = os.read(pipe.read, size)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class _PipePool:
    """
    Empty pipes shared by every spliced session. A direction holds a pipe
    only while bytes are in flight, so thousands of idle sessions hold none
    (and the user's pipe quota goes to the transfers under way).
    """

    def __init__(self, keep: int = 32) -> None:
        self.keep = keep
        self._free: list[_Pipe] = []

    def acquire(self) -> _Pipe:
        """
        An empty pipe.
        """
        return self._free.pop() if self._free else _Pipe()

    def release(self, pipe: _Pipe) -> None:
        """
        Take back an empty pipe.
        """
        if len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            pipe.close()


_pipes = _PipePool()


def _spliceWorks() -> bool:
    """
    Whether this kernel splices from a TCP-like socket into a pipe (checked
    once, on a socket pair).
    """
    global _spliceChecked
    if _spliceChecked is None:
        import socket

        _spliceChecked = False
        if hasattr(os, "splice"):
            left, right = socket.socketpair()
            pipe = _Pipe()
            try:
                left.send(b"x")
                right.setblocking(False)
                _spliceChecked = os.splice(right.fileno(), pipe.write, 1, flags=_SPLICE_FLAGS) == 1
            except OSError:
                pass
            finally:
                left.close()
                right.close()
                pipe.close()
    return _spliceChecked


_spliceChecked: bool | None = None


class _Direction:
    """
    Bytes on their way from C{source} to C{sink}, through a pipe from the
    pool while any are in flight.
    """

    def __init__(self, source: _SocketEnd, sink: _SocketEnd) -> None:
        self.source = source
        self.sink = sink
        self.pipe: _Pipe | None = None
        self.pending = 0
        self.ended = False

    def hold(self) -> _Pipe:
        """
        The pipe, taken from the pool if none is held.
        """
        if self.pipe is None:
            self.pipe = _pipes.acquire()
        return self.pipe

    def drained(self) -> None:
        """
        Nothing is in flight: give the pipe back.
        """
        if self.pipe is not None and self.pending == 0:
            _pipes.release(self.pipe)
            self.pipe = None

    def close(self) -> None:
        """
        Done: return an empty pipe, close one still holding bytes.
        """
        if self.pipe is not None:
            if self.pending == 0:
                _pipes.release(self.pipe)
            else:
                self.pipe.close()
            self.pipe = None


class _Splicer:
    """
    Relays two plain TCP sockets with C{splice(2)}: the kernel moves the
    bytes from socket to pipe to socket; Python only reacts to readiness.
    Backpressure is the pipe: while it holds bytes its sink has not taken,
    the source is not read.
    """

    log = Logger()

    @staticmethod
    def possible(relay: Relay, clientSocket: FileDescriptor | None, backendSocket: FileDescriptor | None) -> bool:
        """
        Whether the kernel splices and both of C{relay}'s legs are plain TCP
        sockets that L{attempt} may take over.

        @param clientSocket: L{socketOf} the client's transport.
        @param backendSocket: L{socketOf} the backend's transport.
        """
        return (
            _spliceWorks()
            and _plainSocket(relay._client, clientSocket) is not None
            and _plainSocket(relay._backend, backendSocket) is not None
        )

    @classmethod
    def attempt(cls, relay: Relay, toClient: bytes, toBackend: bytes) -> _Splicer | None:
        """
        Take over both sockets from Twisted if both are plain TCP; what
        Twisted had not yet written, and the early bytes, go first. A relay
        running in Python stops: neither transport is the other's producer
        any more.
        """
        if not _spliceWorks():
            return None
        client = _plainSocket(relay._client, socketOf(relay._client))
        backend = _plainSocket(relay._backend, socketOf(relay._backend))
        if client is None or backend is None:
            return None
        sizes = (cast(int, _unsentSize(client)) + len(toClient), cast(int, _unsentSize(backend)) + len(toBackend))
        if max(sizes) > SPLICE_PIPE_SIZE:
            return None  # more than a pipe holds: stay in Python
        splicer = cls(relay, client, backend)
        for size, direction in zip(sizes, (splicer.toClient, splicer.toBackend)):
            if size and size > direction.hold().capacity:
                # Small pipes (the user's pipe quota is used up): a write
                # would take only part of the early bytes.
                for each in (splicer.toBackend, splicer.toClient):
                    each.close()
                return None
        for connection in (client, backend):
            connection.unregisterProducer()
            connection.stopReading()
            connection.stopWriting()
        early = [_takeUnsent(client) + toClient, _takeUnsent(backend) + toBackend]
        for direction, data in zip((splicer.toClient, splicer.toBackend), early):
            if data:
                os.write(direction.hold().write, data)
                direction.pending = len(data)
        relay.bytesFromBackend += len(toClient)
        relay.bytesFromClient += len(toBackend)
        # Known to the relay before the first splice, which may end it.
        relay._splicer = splicer
        splicer.run()
        return splicer

    def __init__(self, relay: Relay, client: tcp.Connection, backend: tcp.Connection) -> None:
        self.relay = relay
        self.reactor = client.reactor
        self.client = _SocketEnd(self, client)
        self.backend = _SocketEnd(self, backend)
        self.toBackend = _Direction(self.client, self.backend)
        self.toClient = _Direction(self.backend, self.client)
        self.attached = True

    def run(self) -> None:
        """
        Start reading, after flushing what is already in the pipes.
        """
        for direction in (self.toBackend, self.toClient):
            if self.attached:
                self._drain(direction)

    def _directionFrom(self, end: _SocketEnd) -> _Direction:
        return self.toBackend if end is self.client else self.toClient

    def readable(self, end: _SocketEnd) -> None:
        direction = self._directionFrom(end)
        pipe = direction.hold()
        try:
            moved = os.splice(end.fileno(), pipe.write, pipe.capacity - direction.pending, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            direction.drained()
            return
        except OSError as e:
            self._broken(e)
            return
        if moved == 0:
            direction.drained()
            direction.ended = True
            self.reactor.removeReader(end)
            if direction.pending == 0:
                self._finished(direction)
            return
        self.relay._lastActivity = self.relay._clock.seconds()
        if end is self.client:
            # As Relay.fromClient does.
            quickAck(end.connection.socket)
            self.relay.bytesFromClient += moved
        else:
            self.relay.bytesFromBackend += moved
        direction.pending += moved
        self._drain(direction)

    def writable(self, end: _SocketEnd) -> None:
        self._drain(self.toClient if end is self.client else self.toBackend)

    def _drain(self, direction: _Direction) -> None:
        while direction.pending:
            try:
                moved = os.splice(direction.hold().read, direction.sink.fileno(), direction.pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                break
            except OSError as e:
                self._broken(e)
                return
            direction.pending -= moved
        if not self.attached:
            return
        if direction.pending:
            # The sink is full: stop reading the source until it drains.
            self.reactor.removeReader(direction.source)
            self.reactor.addWriter(direction.sink)
        else:
            direction.drained()
            self.reactor.removeWriter(direction.sink)
            if direction.ended:
                self._finished(direction)
            else:
                self.reactor.addReader(direction.source)

    def _finished(self, direction: _Direction) -> None:
        other = self.toBackend if direction is self.toClient else self.toClient
        if not (other.ended and other.pending == 0):
            # Only this way is over (a half-close): the sink has everything,
            # so it may learn that nothing follows; the other way goes on.
            try:
                direction.sink.connection.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if self.relay._closedFirst is None:
                self.relay._closedFirst = EndReason.CLIENT_CLOSED if direction is self.toBackend else EndReason.BACKEND_CLOSED
                # As Relay._halfClosed does for a relay in Python.
                self.relay._shortenIdle()
            return
        # Both ways are over and everything reached its sink: end as
        # Twisted would have (the relay closes the sink), and close the
        # source's socket too, which Twisted no longer watches.
        if direction is self.toClient:
            self.relay.backendLost()
        else:
            self.relay.clientLost()
        direction.source.connection.loseConnection()

    def _broken(self, error: OSError) -> None:
        if error.errno not in (errno.ECONNRESET, errno.EPIPE):
            self.log.warn("splice failed: {error}", error=error)
        self.fail()

    def fail(self) -> None:
        """
        A socket failed: end the relay; Twisted closes both sockets.
        """
        if self.attached:
            self.relay.stop(EndReason.CONNECTION_RESET)

    def detach(self) -> None:
        """
        Stop splicing and give both sockets back to their Twisted
        transports (which then close them). What the pipes still hold was
        read from one side already: it goes to the other through Twisted's
        buffer, as a relay in Python would have written it there, and the
        close waits for it (in bounded time: the session's grace for the
        client, the relay's for the backend).
        """
        if not self.attached:
            return
        self.attached = False
        for end in (self.client, self.backend):
            self.reactor.removeReader(end)
            self.reactor.removeWriter(end)
            end.splicer = None
        for direction in (self.toBackend, self.toClient):
            if direction.pending and direction.pipe is not None:
                data = _drainPipe(direction.pipe, direction.pending)
                # Anything left (never, but then): the pipe is closed, not
                # pooled with bytes in it.
                direction.pending -= len(data)
                direction.sink.connection.write(data)
            direction.close()
