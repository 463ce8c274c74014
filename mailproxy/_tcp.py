"""
TCP transports that send at once.

Twisted's TCP transport never sends from C{write}: it appends the bytes to
its buffer and asks the reactor to watch the socket for writability
(C{epoll_ctl}), sends on the next turn of the event loop, and, its buffer
empty, stops watching (C{epoll_ctl} again). That is right for a socket
whose send buffer is full, but a proxy's login writes a few short replies
on connections whose send buffer is empty: each one cost two system calls,
an event loop turn and the reactor's dispatch of the event, about a third
of the C{epoll_ctl} calls of a login.

Here C{write} tries C{send(2)} first when nothing is buffered, and leaves
to Twisted only what the kernel did not take (and any error, which
Twisted's next write attempt meets and handles as always). The bytes and
their order on the wire are the same; what changes is only when they
leave. A pull producer keeps Twisted's way (it is asked for more data when
the buffer empties, which an immediate send would skip).

L{listenAtOnce} makes a listening port build these transports for the
connections it accepts, L{connectAtOnce} connects one. Both fall back to
Twisted's own transports where the reactor or the port is not Twisted's
POSIX TCP (tests drive the proxy on in-memory reactors).

The same goes for the reactor: L{DirectReactor} dispatches events without
Twisted's per-event legacy log context; the proxy's entry points install
it (L{installReactor}).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import _socket
import sys
from typing import Any, Callable, Iterable

from twisted.internet import error, main, tcp, unix
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConnector, IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python import log
from twisted.python.failure import Failure
from zope.interface import implementer


_log = Logger()


class _SendAtOnce(FileDescriptor):
    """
    Twisted's L{FileDescriptor} writing with L{sendAtOnce}. Not instantiated:
    Twisted's TLS layer calls its methods on a TCP connection (the class is
    what C{startTLS} writes ciphertext through), as L{_AtOnce} does for
    cleartext.
    """

    def write(self, data: bytes) -> None:
        sendAtOnce(self, data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        sendAtOnce(self, b"".join(iovec))

    def loseConnection(self) -> None:
        # The TLS layer calls this once its close_notify is written. As on
        # a plain connection (_AtOnce.loseConnection), with nothing left to
        # send the socket is closed once the current event is handled, not
        # through a write event: a STARTTLS session's close then costs what
        # an implicit-TLS one does.
        if _openAndIdle(self):
            _closeSoon(self)
            return
        FileDescriptor.loseConnection(self)


def sendAtOnce(connection: Any, data: bytes) -> None:
    """
    Write C{data} on the TCP C{connection} (a L{tcp.Connection}): with
    C{send(2)} now when nothing waits in its buffer, the rest (if any) as
    Twisted's L{FileDescriptor.write} does.
    """
    if (
        type(data) is bytes
        and data
        and connection.connected
        and not connection._writeDisconnected
        # Aborted: Twisted drops what is written from then on (its write
        # buffers it for a doWrite that does nothing), so must this.
        and not connection._aborting
        # Nothing buffered (_buffered, written out: every write of a
        # login comes this way).
        and not connection._tempDataBuffer
        and connection.offset == len(connection.dataBuffer)
        and (connection.producer is None or connection.streamingProducer)
    ):
        try:
            sent = connection.socket.send(data)
        except OSError:
            # Full (EAGAIN) or broken: Twisted's write attempt on the next
            # turn sends it or reports the loss, as it would have anyway.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    FileDescriptor.write(connection, data)


class _AtOnce:
    """
    What L{AtOnceServer} and L{AtOnceClient} change in Twisted's TCP
    transports: C{write}, C{writeSequence} and, for the TLS layer
    C{startTLS} puts on top, the class its ciphertext is written through;
    and C{loseConnection}, which closes at once when nothing is buffered.
    """

    # Twisted's FileDescriptor flags, set here too.
    disconnecting: int
    _writeDisconnecting: bool
    _writeDisconnected: bool

    def write(self, data: bytes) -> None:
        if self.TLS:  # type: ignore[attr-defined]
            if self.connected:  # type: ignore[attr-defined]
                self.protocol.write(data)  # type: ignore[attr-defined]
        else:
            sendAtOnce(self, data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        if self.TLS:  # type: ignore[attr-defined]
            if self.connected:  # type: ignore[attr-defined]
                self.protocol.writeSequence(iovec)  # type: ignore[attr-defined]
        else:
            sendAtOnce(self, b"".join(iovec))

    def writeSomeData(self, data: bytes) -> Any:
        # Twisted's write event sends what is buffered even when that is
        # nothing: a backend connection's first write event comes with
        # the read event of the greeting, when the server greeted before
        # the connect was seen (on loopback, often); the read makes
        # the connection, and the write then sent zero octets, a send(2)
        # on the login's path.
        if not data:
            return 0
        return super().writeSomeData(data)  # type: ignore[misc]

    def startTLS(self, ctx: object, normal: bool = True) -> None:
        # Twisted's, with the proxy's TLS layer (imported only when needed).
        from . import _tls

        _tls.startTLS(self, ctx, normal, _SendAtOnce)

    def _nothingToWaitFor(self) -> bool:
        # A plain connection with nothing to send before a close or a
        # half-close (with TLS, the TLS layer has its close_notify to send).
        return not self.TLS and _openAndIdle(self)  # type: ignore[attr-defined]

    def loseConnection(self) -> None:
        if self._writeDisconnected and not self.TLS and self.connected and not self.disconnecting:  # type: ignore[attr-defined]
            # Half-closed already (the relay passed a FIN on): Twisted's
            # close at once, with the shared reason (connectionLost stops
            # reading and writing first).
            self.connectionLost(_CONNECTION_DONE)  # type: ignore[attr-defined]
            return
        # Twisted closes through a write event even with nothing to send:
        # it watches the socket for writability, sends zero octets when the
        # event comes and then closes (two to three epoll_ctl, a send(2)
        # and a turn of the event loop). With nothing buffered there is
        # nothing to wait for: close once the current event is handled, as
        # Twisted's own abortConnection does on the next turn (not now: a
        # protocol does not expect its connectionLost while it is still
        # calling loseConnection).
        if self._nothingToWaitFor():
            _closeSoon(self)
            return
        super().loseConnection()  # type: ignore[misc]

    def loseWriteConnection(self) -> None:
        # A half-close (the relay passing on a peer's FIN), likewise: with
        # nothing buffered, shut down writing once the current event is
        # handled instead of through a write event.
        if self._nothingToWaitFor():
            self._writeDisconnecting = True
            callSoon(self.reactor, self._closeWriteNow)  # type: ignore[attr-defined]
            return
        super().loseWriteConnection()  # type: ignore[misc]

    def _closeWriteNow(self) -> None:
        if not self.connected or self.disconnecting or self._writeDisconnected or self._aborting:  # type: ignore[attr-defined]
            # Closed meanwhile, or being closed (which sends what is left),
            # or aborted: no FIN, and no writeConnectionLost for a
            # protocol whose connection is being cut.
            return
        if _buffered(self):
            # Written since and not all sent: Twisted sends it, then shuts
            # down writing, as it does when it finds something buffered.
            self.startWriting()  # type: ignore[attr-defined]
            return
        self._writeDisconnected = True
        self._closeWriteConnection()  # type: ignore[attr-defined]

    def _closeNow(self) -> None:
        if not self.connected or self._aborting:  # type: ignore[attr-defined]
            # Closed meanwhile, or aborted (which closes it itself).
            return
        if _buffered(self) or self._writeDisconnecting:  # type: ignore[attr-defined]
            # Written (or half-closed) since, and not all sent at once:
            # Twisted sends it and then closes, as it does when
            # loseConnection finds something buffered.
            self.startWriting()  # type: ignore[attr-defined]
            return
        self.connectionLost(_CONNECTION_DONE)  # type: ignore[attr-defined]

    def _closeSocket(self, orderly: bool) -> None:
        # Twisted shuts the socket down both ways before closing it. With
        # writing shut down already (a half-close passed on) the FIN is
        # sent, and shutting down reading sends nothing: that shutdown(2)
        # only fails (ENOTCONN) once the peer has closed too, as at the end
        # of most relayed sessions.
        if orderly and self._writeDisconnected:
            try:
                self.socket.close()  # type: ignore[attr-defined]
            except OSError:
                pass
            return
        super()._closeSocket(orderly)  # type: ignore[misc]


#: The reason a connection closed in order gives its protocol: one for all,
#: as Twisted's reactor has it for the connections it finds closed (a
#: Failure works out its exception's class names on its first check: once,
#: not twice per login).
_CONNECTION_DONE = Failure(main.CONNECTION_DONE)


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def quickAck(handle: object) -> None:
    """
    Send the ACK of what was read on the TCP socket C{handle} now, not
    after the kernel's delayed-ACK wait (up to 40 ms on Linux).

    Once a connection has gone back and forth, Linux delays the ACK of
    what it reads, in the hope of sending it with an answer. A peer under
    Nagle's algorithm (the default) that wrote part of something holds
    its next small write until that ACK comes: when the part read gets no
    answer yet, both sides wait the delay out. Where there is an answer,
    it carries the ACK anyway and this sends nothing. Does nothing without
    C{TCP_QUICKACK} (not Linux) or a socket (tests' transports).
    """
    if _QUICKACK is not None and isinstance(handle, socket.socket):
        try:
            handle.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:
            pass


def callSoon(reactor: Any, f: Callable[[], object]) -> None:
    """
    Call C{f} once the event being handled is done with: on a
    L{DirectReactor}, after the other events of this turn of the loop
    (L{DirectReactor.callSoon}); on another reactor, on its next turn
    (C{callLater(0, f)}).
    """
    soon = getattr(reactor, "callSoon", None)
    if soon is not None:
        soon(f)
    else:
        reactor.callLater(0, f)


def _openAndIdle(connection: Any) -> bool:
    """
    Whether the TCP C{connection} is open both ways, with no producer and
    nothing buffered: a close or a half-close has nothing to wait for.
    """
    return bool(
        connection.connected
        and not connection.disconnecting
        and not connection._writeDisconnected
        and not connection._writeDisconnecting
        and connection.producer is None
        and not _buffered(connection)
    )


def _closeSoon(connection: Any) -> None:
    """
    Close the TCP C{connection}, which has nothing to send (L{_openAndIdle}),
    once the current event is handled: it stops reading now, and says it is
    disconnecting, as Twisted's C{loseConnection} does.
    """
    connection.stopReading()
    connection.disconnecting = 1
    callSoon(connection.reactor, connection._closeNow)


def _buffered(connection: Any) -> bool:
    """
    Whether Twisted holds octets written on C{connection} and not yet sent.
    """
    return bool(connection._tempDataBuffer) or connection.offset != len(connection.dataBuffer)


class _TCPReading:
    """
    Twisted's TCP C{doRead}, which reads and then hands the octets to its
    C{_dataReceived}, in one method: a Python call less on every input
    event of a connection (seven per plain IMAP login); and no
    C{shutdown(2)} before the close once the peer's FIN is read.
    """

    socket: socket.socket
    bufferSize: int
    protocol: Any

    def doRead(self) -> error.ConnectionLost | error.ConnectionDone | None:
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as e:
            if e.args[0] == errno.EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self.protocol.dataReceived(data)
        return None

    def readConnectionLost(self, reason: Failure) -> None:
        # The peer's FIN is read: nothing is left unread and nothing more
        # comes in, so close(2) alone sends our FIN after what is still to
        # be sent, as Twisted's shutdown(2) both ways before the close
        # does (one system call more: the backend's close at the end of
        # most relayed sessions). Twisted's own flag for that. Only for
        # TCP: the close of a UNIX socket shared with a child process
        # would not reach the peer without it.
        self._shouldShutdown = False
        super().readConnectionLost(reason)  # type: ignore[misc]


class AtOnceServer(_AtOnce, _TCPReading, tcp.Server):  # type: ignore[misc]
    """
    An accepted TCP connection that sends at once (see the module), and
    knows its own address from its listening port where the port's
    address is its own (L{listenAtOnce}).
    """

    def getHost(self) -> Any:
        # Twisted asks the kernel (getsockname(2)) each time; every session
        # does once, for its local address.
        host = getattr(self.server, "acceptedHost", None)
        if host is None:
            return super().getHost()
        return host


class AtOnceClient(_AtOnce, _TCPReading, tcp.Client):  # type: ignore[misc]
    """
    An outgoing TCP connection that sends at once (see the module), and
    connects with fewer system calls than Twisted's: Twisted watches the
    connecting socket for reading and writing, and once it is connected
    stops watching both before it starts reading again (five C{epoll_ctl}
    calls per connection); here both are watched with one call, reading
    stays watched throughout and only writing stops (two). Twisted also
    calls C{connect} again to learn that the socket is connected, which its
    writability already says.
    """

    def createInternetSocket(self) -> socket.socket:
        # Twisted's makes the socket, then makes it non-blocking (an
        # ioctl), and the connection's __init__ makes it so again (another
        # one): two system calls per backend connection for what socket(2)
        # does with SOCK_NONBLOCK.
        if _SOCK_NONBLOCK:
            return _NonBlockingSocket(self.addressFamily, self.socketType | _SOCK_NONBLOCK)
        return super().createInternetSocket()  # type: ignore[no-any-return]

    def _finishInit(self, whenDone: Any, skt: Any, error: Any, reactor: Any) -> None:
        # Twisted's, but for how the connection attempt (or the failure to
        # prepare it) is put off until the caller has returned: see
        # callSoon.
        if whenDone:
            self._commonConnection.__init__(self, skt, None, reactor)  # type: ignore[arg-type]
            callSoon(reactor, whenDone)
        else:
            callSoon(reactor, lambda: self.failIfNotConnected(error))

    def resolveAddress(self) -> None:
        # Twisted goes through a Deferred even for an address literal, all
        # connectAtOnce is given.
        if self._requiresResolution:
            super().resolveAddress()
            return
        try:
            self._setRealAddress(self.addr)
        except Exception as e:
            self.failIfNotConnected(e)

    def doConnect(self) -> None:
        # Twisted's doConnect, but for the reactor registrations and the
        # system calls (see the class). Called once, to start connecting.
        self.doWrite = self._connectReady  # type: ignore[method-assign]
        self.doRead = self._connectReady  # type: ignore[method-assign]
        if not hasattr(self, "connector"):
            return  # the attempt failed before it started
        try:
            result = self.socket.connect_ex(self.realAddress)
        except OSError as e:
            result = e.args[0]
        if result in (errno.EWOULDBLOCK, errno.EINPROGRESS, errno.EALREADY):
            self._watchConnecting()
            return
        if result and result != errno.EISCONN:
            self.failIfNotConnected(error.getConnectError((result, os.strerror(result))))
            return
        self._connected()

    def _watchConnecting(self) -> None:
        # Reading and writing, with one epoll_ctl where the reactor is
        # Twisted's epoll reactor (startReading and then startWriting make
        # two: the registration, then its change), as its _add would.
        reactor = self.reactor
        fd = self.fileno()
        if not isinstance(reactor, EPollReactor) or fd in reactor._reads or fd in reactor._writes:
            self.startReading()
            self.startWriting()
            return
        reactor._poller.register(fd, select.EPOLLIN | select.EPOLLOUT)
        reactor._reads.add(fd)
        reactor._writes.add(fd)
        reactor._selectables[fd] = self

    def _connectReady(self) -> None:
        # The connecting socket is readable or writable: with no error
        # pending it is connected (a socket still connecting is neither;
        # connect(2)). Twisted calls connect again to learn it.
        if not hasattr(self, "connector"):
            return  # failed on the read event just before the write event
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.failIfNotConnected(error.getConnectError((err, os.strerror(err))))
            return
        self._connected()

    def connectPolled(self, event: int) -> bool:
        """
        The reactor's poll reported C{event} on this socket: if it is still
        connecting and the event has no error or hang-up in it, it is
        connected, as epoll tells it (a failed connect reports C{EPOLLERR}),
        without asking the kernel for the error (C{SO_ERROR}) as
        L{_connectReady} does: one system call per backend connection.

        @return: whether the event was this, and is handled.
        """
        if self.doWrite != self._connectReady or event & _POLL_FAILED or not hasattr(self, "connector"):
            return False
        # Input that came with it (a greeting) is read on the next poll.
        self._connected()
        return True

    def _connected(self) -> None:
        del self.doWrite
        del self.doRead
        # Reading stays watched (a no-op for _connectDone's startReading).
        self.stopWriting()
        self._connectDone()


#: What epoll reports for a socket whose connect failed.
_POLL_FAILED = select.EPOLLERR | select.EPOLLHUP

#: socket(2)'s flag that makes the socket non-blocking (Linux; 0 where
#: there is none).
_SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)


class _NonBlockingSocket(socket.socket):
    """
    A socket made non-blocking when it was made (C{SOCK_NONBLOCK}), that
    is not made non-blocking again: Twisted makes every connection's
    socket so, one system call each time.
    """

    __slots__ = ()

    def setblocking(self, flag: bool) -> None:
        if flag or self.gettimeout() != 0:
            super().setblocking(flag)


class _AtOnceUnixServer(_AtOnce, unix.Server):
    """
    A connected UNIX socket (the channel between the proxy's parent and a
    worker) that sends at once (see the module).
    """


def sendAtOnceOn(transport: object) -> None:
    """
    Have C{transport}, a UNIX socket connection Twisted made (adopting a
    socket builds its transport itself), send at once from now on: its
    messages then leave in the order they are written relative to the
    TCP connections' replies, which do. Any other transport is left as it
    is.
    """
    if type(transport) is unix.Server:
        # The subclass adds no state, only the write methods.
        transport.__class__ = _AtOnceUnixServer


class _AtOnceConnector(tcp.Connector):
    """
    Twisted's connector, building an L{AtOnceClient}; it lets go of its
    transport once the connection is over (Twisted's keeps it, and the
    transport keeps the connector: a reference cycle per connection, left
    to the garbage collector).
    """

    def _makeTransport(self) -> tcp.Client:
        return AtOnceClient(self.host, self.port, self.bindAddress, self, self.reactor)

    def connectionLost(self, reason: Any) -> None:
        self.transport = None
        super().connectionLost(reason)


def connectAtOnce(reactor: Any, host: str, port: int, factory: ClientFactory, timeout: float | None) -> IConnector:
    """
    C{reactor.connectTCP(host, port, factory, timeout=timeout)}, with an
    L{AtOnceClient} as the transport where C{reactor} is Twisted's POSIX
    reactor.

    @param timeout: L{None} if the caller times the attempt itself.
    """
    if not isinstance(reactor, PosixReactorBase):
        return reactor.connectTCP(host, port, factory, timeout=timeout)  # type: ignore[no-any-return]
    connector = _AtOnceConnector(host, port, factory, timeout, None, reactor)  # type: ignore[arg-type]
    connector.connect()
    return connector


def listenAtOnce(port: IListeningPort) -> IListeningPort:
    """
    Have the listening C{port} give the connections it accepts from now on
    an L{AtOnceServer} transport, if it is Twisted's TCP port (its
    C{transport} attribute is the class it builds them with); any other
    port is left as it is.

    The port's C{acceptedHost} is then the local address of every
    connection it accepts (L{_acceptedHost}), or L{None} if they differ.

    @return: C{port}.
    """
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.acceptedHost = _acceptedHost(port)  # type: ignore[attr-defined]
        if type(port.socket) is socket.socket:
            # The subclass adds no state, only its accept.
            port.socket.__class__ = _ListeningSocket
        # Twisted's port reads its logger (a descriptor that makes a bound
        # Logger on every access) twice on every accept event: one for
        # good, the same.
        port._logger = port._logger
        port.transport = AtOnceServer
    return port


class _ListeningSocket(socket.socket):
    """
    A listening socket that accepts a little more cheaply than Python's.
    """

    __slots__ = ()

    def accept(self) -> tuple[socket.socket, Any]:
        # Python's accept, but for the family and type it gives the new
        # socket: the numbers this one holds, not its family and type
        # properties, which make an enum member of each (four Python
        # calls per connection, for a socket that has the same numbers).
        fd, address = self._accept()  # type: ignore[attr-defined]
        connection = socket.socket(_FAMILY.__get__(self), _TYPE.__get__(self), self.proto, fileno=fd)
        if socket.getdefaulttimeout() is None and self.gettimeout():
            connection.setblocking(True)
        return connection, address


#: A socket's family and type as the numbers it holds.
_FAMILY = _socket.socket.family
_TYPE = _socket.socket.type


def _acceptedHost(port: tcp.Port) -> Any:
    """
    The address of C{port}, the listening socket, if it is the local
    address of every connection it accepts: bound to one address (not to
    all of a family's, C{0.0.0.0} or C{::}), not to a link-local one
    (whose accepted connections carry their own scope), and not
    transparent (C{IP_TRANSPARENT}: a TPROXY listener accepts connections
    to other addresses); else L{None}.
    """
    try:
        address = port.getHost()
        host = ipaddress.ip_address(address.host)
        if host.is_unspecified or host.is_link_local or getattr(address, "scopeID", None):
            return None
        option = _TRANSPARENT.get(host.version)
        if option is not None and port.socket.getsockopt(*option):
            return None
    except (OSError, ValueError):
        return None
    return address


#: Linux's socket options for transparent proxying, by IP version (the
#: socket module knows only the IPv4 one).
_TRANSPARENT = (
    {4: (socket.SOL_IP, getattr(socket, "IP_TRANSPARENT", 19)), 6: (socket.IPPROTO_IPV6, 75)}
    if sys.platform.startswith("linux")
    else {}
)


@implementer(IStreamServerEndpoint)
class AtOnceEndpoint:
    """
    A server endpoint whose listening port accepts connections with
    L{AtOnceServer} transports (see L{listenAtOnce}).
    """

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self.endpoint = endpoint

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.endpoint.listen(protocolFactory).addCallback(listenAtOnce)


class DirectReactor(EPollReactor):
    """
    Twisted's epoll reactor, dispatching each event straight to its
    descriptor.

    Twisted's runs every event through C{log.callWithLogger}: it asks the
    descriptor for its log prefix and copies and extends the legacy log
    context around the call (about ten Python calls per event, some 6 % of
    a plain login's CPU here), only so that a legacy log line written
    meanwhile would carry the connection's prefix in its C{[system]}
    field. The proxy logs through C{twisted.logger}, which does not read
    that context; the one difference is that an unhandled error in an
    event handler, which Twisted logs, says C{[-]} there instead of the
    connection's prefix.

    It also watches listening sockets with C{EPOLLEXCLUSIVE}, so that a
    connection to a socket that several worker processes share wakes one
    of them (L{_addListening}).
    """

    def __init__(self) -> None:
        # Set before Twisted's __init__, which watches its waker.
        self._polledContinuously = False
        super().__init__()
        self._soon: list[Callable[[], object]] = []

    def callSoon(self, f: Callable[[], object]) -> None:
        """
        Call C{f} after the events of this turn of the loop are dispatched
        (or, called from a timed call, right after the next poll): what
        C{callLater(0, f)} is used for, without a L{DelayedCall} in the
        reactor's heap of timed calls and without a turn of the loop
        between. A closing connection puts off its close this way (see
        L{_AtOnce.loseConnection}), two or three times per login.
        """
        self._soon.append(f)

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # Wait indefinitely.
        if self._soon:
            timeout = 0
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except InterruptedError:
            events = []
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event != select.EPOLLIN:
                if type(selectable) is not AtOnceClient or not selectable.connectPolled(event):
                    dispatch(selectable, fd, event)
                continue
            # Input and nothing else, most events of a login: what
            # Twisted's _doReadOrWrite does with it, without the call.
            inRead = False
            why: object
            try:
                if selectable.fileno() == -1:
                    why = _NO_FILEDESC
                else:
                    why = selectable.doRead()
                    inRead = True
            except BaseException:
                # Logged, and the descriptor disconnected, as Twisted does.
                why = sys.exc_info()[1]
                log.err()
            if why:
                self._disconnectSelectable(selectable, why, inRead)
        # Those called now, not those they ask for in turn: the next
        # poll comes first (without waiting), as with callLater(0).
        soon, self._soon = self._soon, []
        for f in soon:
            try:
                f()
            except Exception:
                _log.failure("while calling {f!r}", f=f)

    doIteration = doPoll

    def addReader(self, reader: Any) -> None:
        """
        Watch C{reader}; a listening socket only for one waiter at a time
        (L{_addListening}).
        """
        fd = reader.fileno()
        if isinstance(reader, (tcp.Port, unix.Port)) and fd not in self._reads and fd not in self._writes:
            self._addListening(reader, fd)
            return
        super().addReader(reader)
        if fd not in self._reads:
            # epoll refused it (a regular file): Twisted polls it.
            self._polledContinuously = True

    def addWriter(self, writer: Any) -> None:
        """
        Watch C{writer} for writability.
        """
        super().addWriter(writer)
        if writer.fileno() not in self._writes:
            self._polledContinuously = True

    def removeReader(self, reader: Any) -> None:
        """
        Stop watching C{reader} for reading, if it is.
        """
        # Most calls find nothing to remove: a connection that closes stops
        # reading, and stops again as it is lost; Twisted's way to find
        # that out is three Python calls, six times per login. A descriptor
        # (still open) whose number epoll does not watch for reading, with
        # none polled by Twisted instead, has nothing to remove.
        fd = reader.fileno()
        if fd in self._reads or fd == -1 or self._polledContinuously:
            super().removeReader(reader)

    def removeWriter(self, writer: Any) -> None:
        """
        Stop watching C{writer} for writability, if it is.
        """
        # The same (four times per login).
        fd = writer.fileno()
        if fd in self._writes or fd == -1 or self._polledContinuously:
            super().removeWriter(writer)

    def _addListening(self, port: Any, fd: int) -> None:
        # The worker processes (mailproxy._workers) all wait on one
        # listening socket, inherited from their parent. Watched the usual
        # way, each connection wakes every worker: one accepts it, the
        # others' accept4 fails (EAGAIN) after a wake-up, a turn of the
        # loop and a system call for nothing, per worker per connection.
        # EPOLLEXCLUSIVE (Linux 4.5) has the kernel wake one waiting
        # worker, or a busy one's next poll finds it (a worker woken and
        # then stopped, by SIGSTOP or a debugger, keeps that connection
        # waiting until it runs again). The socket stays one,
        # with one queue: per-worker SO_REUSEPORT sockets would spare the
        # kernel nothing more, and would strand the connections queued on
        # a dead or restarting worker's socket (the kernel hashes each to
        # a socket, not to whoever is free); nor can they share a socket
        # systemd passes. The flag is only allowed when a descriptor is
        # added (never modified), which is how a listening port is
        # watched: for reading only, added and removed whole.
        try:
            self._poller.register(fd, select.EPOLLIN | _EPOLLEXCLUSIVE)
        except OSError:
            # A kernel without the flag (EINVAL): watched as Twisted does.
            super().addReader(port)
            return
        self._reads.add(fd)
        self._selectables[fd] = port


#: Linux's epoll flag (select.EPOLLEXCLUSIVE where Python knows it).
_EPOLLEXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 1 << 28)


def installReactor() -> bool:
    """
    Install a L{DirectReactor} as Twisted's global reactor, unless one is
    installed already (C{twistd -r}, or an import made one).

    @return: whether it was installed.
    """
    if "twisted.internet.reactor" in sys.modules:
        return False
    from twisted.internet.main import installReactor as install

    install(DirectReactor())
    return True
