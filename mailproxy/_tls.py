"""
TLS for both sides of the proxy.

The client side (clients to the proxy) follows Mozilla's "intermediate"
guideline 6.0: TLS 1.2 and 1.3 only, ECDHE with AEAD ciphers for TLS 1.2, the
client's cipher preference, and one certificate per SNI name.  The backend side
uses Twisted's verified client options, or an explicitly unverified context
when a backend is configured with C{verify = false}.

Certificates and keys are read and checked when the options are built, so a
configuration mistake shows up at start (or reload) with the file named, not
at the first handshake.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import weakref
from typing import TYPE_CHECKING, Any, Callable, Sequence

import idna
from attrs import field, frozen
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi, lib as _lib
from zope.interface import directlyProvides, implementer

from twisted.internet._newtls import _BypassTLS
from twisted.internet.interfaces import (
    ISSLTransport,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger

from mailproxy.model import Backend, TLSInfo

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = [
    "TLSConfigError",
    "CertificateSource",
    "serverOptions",
    "ApplicationProtocolOptions",
    "clientOptions",
    "hostClientOptions",
    "ResumingClientOptions",
    "TLSLayer",
    "TLSLayerFactory",
    "startTLS",
    "tlsInfo",
    "makeSelfSigned",
]

_log = Logger()

# Mozilla intermediate 6.0: ECDHE key exchange with AEAD ciphers only.
_TLS12_CIPHERS = b":".join(
    [
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-AES256-GCM-SHA384",
        b"ECDHE-RSA-AES256-GCM-SHA384",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
_TLS13_SUITES = b":".join(
    [b"TLS_AES_128_GCM_SHA256", b"TLS_AES_256_GCM_SHA384", b"TLS_CHACHA20_POLY1305_SHA256"]
)

# Tried in order: the first list this OpenSSL build accepts wins.
_GROUP_LISTS = (
    b"X25519MLKEM768:X25519:prime256v1:secp384r1",
    b"X25519:prime256v1:secp384r1",
)


class TLSConfigError(Exception):
    """
    A certificate or key file cannot be used.

    The message names the file and what is wrong with it, never its contents.
    """


def _namesTuple(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(names)


@frozen
class CertificateSource:
    """
    A certificate the proxy can present, and the SNI names it serves.

    @ivar certificate: the path of a PEM file: the leaf certificate first,
        then the intermediates that complete its chain.
    @ivar key: the path of the PEM private key that matches the leaf (it may
        be the same file as C{certificate}).
    @ivar names: the SNI names this certificate answers for; C{"*.example.com"}
        matches one label below C{example.com}.  Empty for the default
        certificate.
    @ivar where: the file and table that configure it (C{"FILE: tls"},
        C{"FILE: tls.sni[0]"}), which its problems name with the setting.
    """

    certificate: str
    key: str
    names: tuple[str, ...] = field(default=(), converter=_namesTuple)
    where: str | None = field(default=None, eq=False)

    def problem(self, setting: str, text: str) -> TLSConfigError:
        """
        A problem with C{setting} (C{certificate} or C{key}), as
        C{"FILE: tls.key: text"} when it is known where it is configured.
        """
        return TLSConfigError(f"{self.where}.{setting}: {text}" if self.where else text)


def _readFile(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"{path}: cannot read {what}: {e.strerror or e}") from None


def _readSource(source: CertificateSource, setting: str, what: str) -> bytes:
    try:
        return _readFile(getattr(source, setting), what)
    except TLSConfigError as e:
        raise source.problem(setting, str(e)) from None


def _publicKeyBytes(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@frozen
class _LoadedCertificate:
    """
    The contents of a L{CertificateSource}, parsed and checked.
    """

    source: CertificateSource
    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes = field(repr=False)


def _loadSource(source: CertificateSource) -> _LoadedCertificate:
    """
    Read and check a certificate chain and its key.

    @raise TLSConfigError: if either file is missing, unreadable, not PEM, or
        the key does not belong to the first certificate.
    """
    chainData = _readSource(source, "certificate", "certificate")
    try:
        chain = tuple(x509.load_pem_x509_certificates(chainData))
    except ValueError:
        raise source.problem("certificate", f"{source.certificate}: no PEM certificate found") from None

    keyData = _readSource(source, "key", "private key")
    try:
        key = serialization.load_pem_private_key(keyData, password=None)
    except TypeError:
        raise source.problem("key", f"{source.key}: the private key is encrypted; give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise source.problem("key", f"{source.key}: no usable PEM private key found") from None

    leaf = chain[0]
    if _publicKeyBytes(key.public_key()) != _publicKeyBytes(leaf.public_key()):
        raise source.problem(
            "key", f"{source.key}: the private key does not match the first certificate in {source.certificate}"
        )
    for problem in _clientsWouldRefuse(source, leaf):
        # Named as check names it: the file and the setting first.
        where = f"{source.where}.certificate: " if source.where else ""
        _log.warn("{where}TLS certificate {path} {problem}", where=where, path=source.certificate, problem=problem)
    return _LoadedCertificate(source=source, chain=chain, key=key)


def _clientsWouldRefuse(source: CertificateSource, leaf: x509.Certificate) -> list[str]:
    """
    What will make clients refuse C{leaf}, which is not refused here: an
    expired certificate is still better than no listener at all.

    @return: each problem in words (C{"expired on ..."}).
    """
    problems = []
    now = datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc < now:
        problems.append(f"expired on {leaf.not_valid_after_utc.isoformat()}")
    elif leaf.not_valid_before_utc > now:
        problems.append(f"is not valid before {leaf.not_valid_before_utc.isoformat()}")
    try:
        alternatives = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        patterns = [name.lower() for name in alternatives.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        patterns = []
    for name in source.names:
        try:
            normal = _normalName(name)
        except idna.IDNAError:
            continue
        if not any(_covers(pattern, normal) for pattern in patterns):
            problems.append(f"does not name {name!r} (no subjectAltName covers it), which it is to serve")
    return problems


def _covers(pattern: str, name: str) -> bool:
    # RFC 6125: a wildcard stands for one whole label, the first.
    if pattern == name:
        return True
    return pattern.startswith("*.") and not name.startswith("*.") and name.partition(".")[2] == pattern[2:]


def certificateWarnings(default: CertificateSource, others: Sequence[CertificateSource] = ()) -> list[str]:
    """
    What in these certificates clients will refuse (expired, not yet
    valid, not naming an SNI name they serve), as C{mailproxy check}
    reports it: C{"FILE: tls.sni[0].certificate: PATH expired on ..."}.

    @raise TLSConfigError: as L{serverOptions}.
    """
    warnings = []
    for source in (default, *others):
        leaf = _loadSource(source).chain[0]
        for problem in _clientsWouldRefuse(source, leaf):
            text = f"{source.certificate} {problem}"
            warnings.append(f"{source.where}.certificate: {text}" if source.where else text)
    return warnings


def _setGroups(context: SSL.Context) -> None:
    """
    Restrict key exchange groups to the policy's, with the post-quantum hybrid
    first when this OpenSSL build has it.

    pyOpenSSL has no public API for a list of groups, so this reaches for the
    binding; without it OpenSSL's own defaults (a superset) stay in force.
    """
    try:
        from OpenSSL._util import lib as _lib
    except ImportError:
        return
    setList = getattr(_lib, "SSL_CTX_set1_curves_list", None)
    if setList is None:
        return
    for groups in _GROUP_LISTS:
        if setList(context._context, groups) == 1:
            return
        _lib.ERR_clear_error()


#: The ALPN ids each live server connection accepts.  Not the connection's
#: app data: Twisted's TLS layer keeps its protocol there.
_acceptedProtocols: weakref.WeakKeyDictionary[SSL.Connection, tuple[bytes, ...]] = (
    weakref.WeakKeyDictionary()
)


def _selectApplicationProtocol(connection: SSL.Connection, offered: list[bytes]) -> object:
    """
    The ALPN callback of every server context: pick the first of the
    connection's acceptable protocols that the client offers, and fail the
    handshake when there is none (a defence against cross-protocol attacks
    such as ALPACA, where a browser is steered to a mail port).

    The acceptable protocols travel with the connection, not the context, so
    that the per-name contexts SNI switches to enforce them too, and one set
    of certificates serves listeners of every protocol: a listener sets them
    with L{ApplicationProtocolOptions}.  A client that sends no ALPN is not
    asked; a connection with none set negotiates nothing.
    """
    acceptable = _acceptedProtocols.get(connection)
    if not acceptable:
        return SSL.NO_OVERLAPPING_PROTOCOLS
    for protocol in acceptable:
        if protocol in offered:
            return protocol
    # Raising makes OpenSSL send the no_application_protocol alert; the
    # error has OpenSSL's own shape so that Twisted can report it.
    raise SSL.Error([("mailproxy", "ALPN", "no application protocol in common")])


def _serverContext(loaded: _LoadedCertificate) -> SSL.Context:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    # No OP_CIPHER_SERVER_PREFERENCE: every allowed cipher is strong, so the
    # client may pick what its hardware does fast.
    context.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION)
    # Mail sessions idle for hours; without this each keeps ~30 KiB of buffers.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # A client that reconnects resumes with a session ticket: no certificate
    # and no signature, the costliest parts of a handshake. Tickets are
    # stateless (sealed with a key OpenSSL makes for this context, so a
    # reload's new contexts start afresh), hence no server-side cache. The
    # tickets of every certificate are sealed by the default context, where a
    # handshake starts: the SNI callback runs after the ticket is accepted.
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_cipher_list(_TLS12_CIPHERS)
    context.set_tls13_ciphersuites(_TLS13_SUITES)
    _setGroups(context)
    try:
        context.use_certificate(loaded.chain[0])
        for intermediate in loaded.chain[1:]:
            context.add_extra_chain_cert(intermediate)
        context.use_privatekey(loaded.key)  # type: ignore[arg-type]
        context.check_privatekey()
    except SSL.Error as e:
        # OpenSSL's reasons ("ee key too small", ...) name no key material.
        reasons = "; ".join(reason for _, _, reason in e.args[0]) or "unusable"
        raise loaded.source.problem(
            "certificate", f"{loaded.source.certificate}: OpenSSL refuses it: {reasons}"
        ) from None
    context.set_alpn_select_callback(_selectApplicationProtocol)  # type: ignore[arg-type]
    return context


def _normalName(name: str) -> str:
    """
    The form SNI names are compared in: lower case, A-labels, no final dot,
    a leading C{*.} kept.

    @raise idna.IDNAError: if C{name} is not a valid internationalised name.
    """
    name = name.rstrip(".").lower()
    wildcard = name.startswith("*.")
    if wildcard:
        name = name[2:]
    if not name.isascii():
        name = idna.encode(name, uts46=True).decode("ascii")
    return "*." + name if wildcard else name


@implementer(IOpenSSLServerConnectionCreator)
class _ServerOptions:
    """
    Creates server-side TLS connections that start with the default
    certificate's context and switch to another when the client's SNI asks for
    one of its names.

    @ivar _exact: contexts by exact (normalised) name.
    @ivar _wildcard: contexts by the parent domain of a C{*.} name.
    """

    def __init__(
        self,
        default: SSL.Context,
        exact: dict[str, SSL.Context],
        wildcard: dict[str, SSL.Context],
    ) -> None:
        self._default = default
        self._exact = exact
        self._wildcard = wildcard
        if exact or wildcard:
            default.set_tlsext_servername_callback(self._selectContext)

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """
        Create the OpenSSL connection for one accepted client.

        @param tlsProtocol: the L{twisted.protocols.tls.TLSMemoryBIOProtocol}
            that will drive it.
        """
        return SSL.Connection(self._default, None)

    def contextForName(self, serverName: bytes | None) -> SSL.Context:
        """
        The context whose certificate serves C{serverName}: an exact name
        first, then a one-label wildcard, else the default.
        """
        if not serverName:
            return self._default
        name = serverName.decode("ascii", "replace").rstrip(".").lower()
        context = self._exact.get(name)
        if context is not None:
            return context
        label, dot, parent = name.partition(".")
        if label and dot and parent:
            context = self._wildcard.get(parent)
            if context is not None:
                return context
        return self._default

    def _selectContext(self, connection: SSL.Connection) -> None:
        context = self.contextForName(connection.get_servername())
        if context is not self._default:
            connection.set_context(context)


def serverOptions(
    default: CertificateSource,
    others: Sequence[CertificateSource] = (),
) -> IOpenSSLServerConnectionCreator:
    """
    Build the TLS options for a listener, implicit TLS or STARTTLS alike.

    One set serves listeners of every protocol: each listener wraps it in
    L{ApplicationProtocolOptions} with its ALPN ids, and uses that as
    C{TLSMemoryBIOFactory(options, False, factory)} or
    C{transport.startTLS(options)}.  Unwrapped, its connections negotiate
    no ALPN and refuse none.

    @param default: the certificate for clients that send no SNI or a name no
        other source serves; its own C{names} are served too.
    @param others: certificates selected by SNI.

    @raise TLSConfigError: if a file is missing, unreadable, not PEM, or a key
        does not match its certificate, or two sources claim the same name.
    """
    defaultContext = _serverContext(_loadSource(default))
    exact: dict[str, SSL.Context] = {}
    wildcard: dict[str, SSL.Context] = {}
    claimedBy: dict[str, str] = {}
    for source in (default, *others):
        context = (
            defaultContext
            if source is default
            else _serverContext(_loadSource(source))
        )
        for name in source.names:
            try:
                normal = _normalName(name)
            except idna.IDNAError:
                raise source.problem("names", f"{source.certificate}: {name!r} is not a valid host name") from None
            if normal in claimedBy:
                raise source.problem(
                    "names", f"{source.certificate}: the name {name!r} is already served by {claimedBy[normal]}"
                )
            claimedBy[normal] = source.certificate
            if normal.startswith("*."):
                wildcard[normal[2:]] = context
            else:
                exact[normal] = context
    return _ServerOptions(defaultContext, exact, wildcard)


@implementer(IOpenSSLServerConnectionCreator)
class ApplicationProtocolOptions:
    """
    Server TLS options for one listener: another creator's connections (its
    certificates, SNI and policy, reloadable), accepting only the listener's
    ALPN protocols.

    @ivar options: the creator whose connections are used.
    @ivar alpn: the application protocols the listener speaks; a client
        offering ALPN without any of them is refused.
    """

    def __init__(self, options: IOpenSSLServerConnectionCreator, alpn: Sequence[bytes]) -> None:
        self.options = options
        self.alpn = tuple(alpn)

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """
        Create the OpenSSL connection for one client of the listener.

        @param tlsProtocol: the L{twisted.protocols.tls.TLSMemoryBIOProtocol}
            that will drive it.
        """
        connection: SSL.Connection = self.options.serverConnectionForTLS(tlsProtocol)  # type: ignore[arg-type]
        _acceptedProtocols[connection] = self.alpn
        return connection


class TLSLayer(BufferingTLSTransport):
    """
    Twisted's TLS layer (its small writes batched, as Twisted's factory
    has them), declaring its transport's interfaces on itself once, not a
    dozen times, as it connects.

    Twisted's layer declares each interface of its transport on itself,
    one C{directlyProvides} call each, each replacing the one before; then,
    connecting the protocol it wraps, L{ProtocolWrapper} declares them all
    at once, replacing those, and that declaration is what stays. The first
    round changes nothing; it costs about 3% of the instructions of an
    implicit-TLS login (a zope.interface specification and its resolution
    order made per call: their cache does not outlive the connections that
    use them). Here only the declaration that stays is made. Started on a
    connection whose protocol is connected already (STARTTLS, L{startTLS}),
    Twisted's layer keeps the last declaration of the first round, and on
    the proxy's TCP transports that interface (C{ILoggingContext}) is one
    the layer's class declares: none is made.
    """

    def makeConnection(self, transport: object) -> None:
        # Twisted's, without the first round of declarations (see the class).
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        Protocol.makeConnection(self, transport)  # type: ignore[arg-type]
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            ProtocolWrapper.makeConnection(self, transport)  # type: ignore[arg-type]
        self._checkHandshakeStatus()

    def _flushSendBIO(self) -> None:
        # Twisted reads the memory BIO of what OpenSSL has to send after
        # every step (about 11 times per login), and pyOpenSSL answers an
        # empty one with an exception, after allocating a 32 KiB buffer for
        # it: more than half of those reads find nothing. How much the BIO
        # holds is asked first, where pyOpenSSL's binding allows it.
        try:
            pending = _lib.BIO_get_mem_data(self._tlsConnection._from_ssl, _ffi.NULL)
        except AttributeError:
            pending = 1
        if pending > 0:
            super()._flushSendBIO()  # type: ignore[misc]


class _SoonCall:
    """
    A call put off with the reactor's C{callSoon}, which can be cancelled
    as a timed call can.
    """

    __slots__ = ("_f",)

    def __init__(self, f: Callable[[], object]) -> None:
        self._f: Callable[[], object] | None = f

    def __call__(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            f()

    def cancel(self) -> None:
        self._f = None


class _SoonClock:
    """
    The clock of a TLS layer's small-write batching.

    Twisted's layer gathers the writes of one turn of the event loop into
    one TLS record, and puts the flush off with C{callLater(0, flush)}: a
    timed call in the reactor's heap per burst of writes, three or four per
    login. On a reactor with C{callSoon} (the proxy's
    L{mailproxy._tcp.DirectReactor}) the flush is put off there instead: it
    runs once the events being handled are, before the loop waits again, as
    the timed call would; the writes and records are the same.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def callLater(self, delay: float, f: Callable[..., object], *args: object, **kwargs: object) -> object:
        """
        Call C{f} after C{delay} seconds; after none, soon (see the class).
        """
        soon = getattr(self.reactor, "callSoon", None)
        if delay or soon is None or args or kwargs:
            return self.reactor.callLater(delay, f, *args, **kwargs)
        call = _SoonCall(f)
        soon(call)
        return call

    def seconds(self) -> float:
        """
        The reactor's time.
        """
        return self.reactor.seconds()  # type: ignore[no-any-return]


class TLSLayerFactory(TLSMemoryBIOFactory):
    """
    Twisted's TLS factory, building L{TLSLayer}s that flush their batched
    writes without a timed call (L{_SoonClock}): what a listener with
    implicit TLS wraps around its protocol factory.
    """

    protocol = TLSLayer

    def __init__(
        self,
        contextFactory: object,
        isClient: bool,
        wrappedFactory: IProtocolFactory | None,
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__(contextFactory, isClient, wrappedFactory, clock)  # type: ignore[arg-type]
        self._clock = _SoonClock(self._clock)  # type: ignore[assignment]


def startTLS(transport: Any, options: object, normal: bool, bypass: type) -> None:
    """
    Start TLS on the TCP C{transport} as Twisted's C{startTLS} does
    (C{twisted.internet._newtls}), but with a L{TLSLayer} built by a
    L{TLSLayerFactory}: after STARTTLS, with a client or a backend, the
    layer declares no interface per connection and flushes its batched
    writes without a timed call, as an implicit-TLS listener's does.

    @param options: the connection creator (server or client options).
    @param normal: whether TLS goes the way TCP does (the accepting side is
        the TLS server); C{False} swaps the roles.
    @param bypass: the class whose C{write} sends on the socket itself,
        under the TLS layer.
    """
    client = transport._tlsClientDefault if normal else not transport._tlsClientDefault
    # A producer is registered again once TLS is on, so that it is hooked
    # to the TLS layer.
    producer, streaming = transport.producer, transport.streamingProducer
    if producer is not None:
        transport.unregisterProducer()
    factory = TLSLayerFactory(options, client, None)
    layer = factory.protocol(factory, transport.protocol, False)
    transport.protocol = layer
    transport.getHandle = layer.getHandle
    transport.getPeerCertificate = layer.getPeerCertificate
    directlyProvides(transport, ISSLTransport)
    # Writes go through the TLS layer from now on.
    transport.TLS = True
    layer.makeConnection(_BypassTLS(bypass, transport))
    if producer is not None:
        transport.registerProducer(producer, streaming)


def _isIPAddress(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientOptions:
    """
    Client TLS to a backend whose certificate is deliberately not checked
    (C{verify = false}): still TLS 1.2 or later, still sends SNI for names.
    """

    def __init__(self, serverName: str) -> None:
        self._sni: bytes | None = None
        if not _isIPAddress(serverName):
            try:
                self._sni = _normalName(serverName).encode("ascii")
            except idna.IDNAError:
                raise TLSConfigError(f"{serverName!r} is not a valid host name") from None
        self._context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self._context.set_min_proto_version(SSL.TLS1_2_VERSION)
        self._context.set_options(SSL.OP_NO_COMPRESSION)
        self._context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        self._context.set_verify(SSL.VERIFY_NONE)

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """
        Create the OpenSSL connection for one backend connection.

        @param tlsProtocol: the L{twisted.protocols.tls.TLSMemoryBIOProtocol}
            that will drive it.
        """
        connection = SSL.Connection(self._context, None)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection


def _loadTrustRoot(path: str) -> IOpenSSLTrustRoot:
    data = _readFile(path, "CA certificates")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(f"{path}: no PEM certificate found") from None
    return trustRootFromCertificates(
        [
            Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
            for c in certificates
        ]
    )


@implementer(IOpenSSLClientConnectionCreator)
class ResumingClientOptions:
    """
    Client TLS to one backend port that resumes the session of an earlier
    connection: after the first login a handshake costs no certificate
    chain to verify and no signature, on either side.

    Only the latest session is kept: a backend issues a new ticket with
    every handshake, so the one kept stays fresh. The server still decides;
    if it does not resume (a restart changed its ticket key), the handshake
    is a full one, with the certificate verified as always.

    @ivar options: the creator of the connections (verified or not).
    """

    def __init__(self, options: IOpenSSLClientConnectionCreator) -> None:
        self.options = options
        self._session: SSL.Session | None = None

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """
        Create the OpenSSL connection for one backend connection, offering
        the session kept, if any.

        @param tlsProtocol: the L{twisted.protocols.tls.TLSMemoryBIOProtocol}
            that will drive it.
        """
        connection: SSL.Connection = self.options.clientConnectionForTLS(tlsProtocol)  # type: ignore[arg-type]
        if self._session is not None:
            connection.set_session(self._session)
        return connection

    def keepSession(self, transport: object) -> None:
        """
        Keep the session of C{transport}'s TLS connection for the next
        connections.

        Call it once the server has answered a command after the handshake:
        a TLS 1.3 server sends its tickets after the handshake, and they
        are read with the first answer.
        """
        connection = _tlsConnection(transport)
        if connection is not None:
            session = connection.get_session()
            if session is not None:
                self._session = session


@functools.lru_cache(maxsize=256)
def clientOptions(backend: Backend, port: int | None = None) -> ResumingClientOptions:
    """
    The TLS options for connections to C{backend}, built once per backend
    and port (each port keeps its own session to resume: another port may
    be another server).

    With C{backend.verify}, the server's certificate must chain to a CA in
    C{backend.caFile} (or the platform's store) and be valid for
    C{backend.serverName} or else C{backend.host}; IP literals are matched
    against IP address SANs.  Without it, nothing is verified.

    The result is cached per L{Backend} value and port; call
    C{clientOptions.cache_clear()} when a CA file changes on disk without
    the configuration changing.

    @raise TLSConfigError: if C{backend.caFile} cannot be read or holds no
        certificate.
    """
    name = backend.serverName or backend.host
    if not backend.verify:
        return ResumingClientOptions(_UnverifiedClientOptions(name))
    trustRoot = _loadTrustRoot(backend.caFile) if backend.caFile else None
    return ResumingClientOptions(
        optionsForClientTLS(name, trustRoot=trustRoot, extraCertificateOptions={"enableSessionTickets": True})
    )


def _tlsConnection(transport: object) -> SSL.Connection | None:
    """
    Find the OpenSSL connection under C{transport}, through any protocol
    wrappers: after C{startTLS} a TCP transport's C{getHandle} is replaced by
    the TLS layer's, which returns it.
    """
    seen = 0
    while transport is not None and seen < 8:
        getHandle = getattr(transport, "getHandle", None)
        if getHandle is not None:
            try:
                handle = getHandle()
            except Exception:
                handle = None
            if isinstance(handle, SSL.Connection):
                return handle
        transport = getattr(transport, "transport", None)
        seen += 1
    return None


def isTLS(transport: object) -> bool:
    """
    Whether C{transport} runs over TLS (implicit, or after STARTTLS).
    """
    return _tlsConnection(transport) is not None


def releaseBuffers(transport: object) -> bool:
    """
    Give back the memory the TLS connection under C{transport} keeps
    between its bytes and the socket, if nothing waits there.

    Twisted's TLS runs OpenSSL over two memory BIOs, and a memory BIO
    keeps the largest buffer it ever held: after one big transfer (a
    FETCH of a message, an APPEND) an idle session would hold tens of KiB
    for as long as it lasts. Both BIOs are replaced by new, empty ones
    (OpenSSL frees the old ones); C{SSL_MODE_RELEASE_BUFFERS} already
    frees OpenSSL's own record buffers.

    @return: whether they were replaced: not without TLS, not while either
        holds bytes, not if pyOpenSSL no longer keeps them where this
        looks.
    """
    connection = _tlsConnection(transport)
    if connection is None:
        return False
    from OpenSSL._util import ffi, lib

    into, out = getattr(connection, "_into_ssl", None), getattr(connection, "_from_ssl", None)
    if into is None or out is None or not hasattr(connection, "_ssl"):
        return False
    if lib.BIO_get_mem_data(into, ffi.NULL) or lib.BIO_get_mem_data(out, ffi.NULL):
        return False
    newInto, newOut = lib.BIO_new(lib.BIO_s_mem()), lib.BIO_new(lib.BIO_s_mem())
    if newInto == ffi.NULL or newOut == ffi.NULL:
        for bio in (newInto, newOut):
            if bio != ffi.NULL:
                lib.BIO_free(bio)
        return False
    # The SSL object owns its BIOs: setting others frees these.
    lib.SSL_set_bio(connection._ssl, newInto, newOut)
    connection._into_ssl, connection._from_ssl = newInto, newOut
    return True


def tlsInfo(transport: object) -> TLSInfo | None:
    """
    What TLS negotiated on C{transport}.

    @param transport: a transport whose TLS handshake has completed, implicit
        TLS or after C{startTLS}, server or client side.
    @return: the version, cipher and SNI name, or L{None} if the transport
        is not TLS or its handshake has not finished.
    """
    connection = _tlsConnection(transport)
    if connection is None:
        return None
    cipher = connection.get_cipher_name()
    version = connection.get_protocol_version_name()
    if cipher is None or version == "Unknown":
        return None
    serverName = connection.get_servername()
    return TLSInfo(
        version=version,
        cipher=cipher,
        serverName=serverName.decode("ascii", "replace").lower() if serverName else None,
    )


def makeSelfSigned(
    directory: str,
    names: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1", "::1"),
) -> tuple[str, str]:
    """
    Write a self-signed certificate for demos and tests.

    @param directory: where to write C{selfsigned.pem} and C{selfsigned.key}.
    @param names: DNS names (Unicode or A-labels) for the subject alternative
        names; the first is also the common name.
    @param ips: IP addresses for the subject alternative names.
    @return: the certificate's path and the key's path.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    dnsNames = [_normalName(n) for n in names]
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, dnsNames[0] if dnsNames else "mailproxy")]
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    alternatives: list[x509.GeneralName] = [x509.DNSName(n) for n in dnsNames]
    alternatives += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A little slack for clocks that run behind.
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        # Lets OpenSSL tell apart several self-signed certificates with the
        # same subject in one CA file.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
            critical=False,
        )
    )
    if alternatives:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(alternatives), critical=False
        )
    certificate = builder.sign(key, hashes.SHA256())

    certificatePath = os.path.join(directory, "selfsigned.pem")
    keyPath = os.path.join(directory, "selfsigned.key")
    with open(certificatePath, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    descriptor = os.open(keyPath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return certificatePath, keyPath


def hostClientOptions(hostname: str, caFile: str | None = None, verify: bool = True) -> IOpenSSLClientConnectionCreator:
    """
    The TLS options for connections to C{hostname} when it is no mail
    backend (the HTTP router's auth server), checked as a backend's are
    (L{clientOptions}): with C{verify}, the certificate must chain to a CA
    in C{caFile} (or the platform's store) and be valid for C{hostname};
    without it, nothing is checked.  Each call builds them anew: cache the
    result.

    @raise TLSConfigError: if C{caFile} cannot be read or holds no
        certificate, or C{hostname} is no valid host name.
    """
    if not verify:
        return _UnverifiedClientOptions(hostname)
    trustRoot = _loadTrustRoot(caFile) if caFile else None
    return optionsForClientTLS(hostname, trustRoot=trustRoot, extraCertificateOptions={"enableSessionTickets": True})
