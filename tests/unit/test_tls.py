"""
Tests for L{mailproxy._tls}.

Handshakes run in memory: two L{TLSMemoryBIOFactory} protocols joined by
L{twisted.test.iosim}, as in Twisted's own test_sslverify.  Only STARTTLS,
which needs a real transport's C{startTLS}, uses the reactor on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from zope.interface import directlyProvides, implementedBy, implementer, providedBy

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols import policies, tls
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy import _tcp
from mailproxy._lifecycle import ReloadableServerTLS
from mailproxy._session import ProxyContext
from mailproxy._tls import (
    ApplicationProtocolOptions,
    CertificateSource,
    TLSConfigError,
    TLSLayerFactory,
    certificateWarnings,
    clientOptions,
    makeSelfSigned,
    serverOptions,
    tlsInfo,
)
from mailproxy.config import Limits, Listener
from mailproxy.model import Backend, TLSInfo
from mailproxy.tap import listenerFactory
from mailproxy.testing import FakeRouter


@implementer(IHandshakeListener)
class _Recorder(Protocol):
    """
    Records what one side of a TLS connection saw.

    @ivar handshakeDone: whether the handshake completed.
    @ivar peerChain: the peer's certificates as sent, leaf first.
    @ivar info: L{tlsInfo} of the transport at handshake time.
    @ivar lostReason: why the connection was lost, if it was.
    """

    handshakeDone = False
    peerChain: list[x509.Certificate] | None = None
    info: TLSInfo | None = None
    negotiated: bytes | None = None
    lostReason: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True
        self.info = tlsInfo(self.transport)
        connection = self.transport.getHandle()  # type: ignore[union-attr]
        chain = connection.get_peer_cert_chain(as_cryptography=True) or []
        self.peerChain = list(chain)
        self.negotiated = self.transport.negotiatedProtocol  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lostReason = reason

    def peerNames(self) -> list[str]:
        """
        The DNS names of the peer's leaf certificate.
        """
        assert self.peerChain
        leaf = self.peerChain[0]
        return leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)


@implementer(IOpenSSLClientConnectionCreator)
class _TestClient:
    """
    A plain pyOpenSSL client that verifies nothing, so tests can pick what it
    offers and look at what the server sent.
    """

    def __init__(
        self,
        serverName: bytes | None = None,
        alpn: list[bytes] | None = None,
        maximum: int | None = None,
        ciphers: bytes | None = None,
        groups: bytes | None = None,
    ) -> None:
        self.serverName = serverName
        self.context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if maximum is not None:
            self.context.set_min_proto_version(SSL.TLS1_VERSION)
            self.context.set_max_proto_version(maximum)
        if ciphers is not None:
            self.context.set_cipher_list(ciphers)
        if alpn is not None:
            self.context.set_alpn_protos(alpn)
        if groups is not None:
            from OpenSSL._util import lib

            self.groupsAccepted = lib.SSL_CTX_set1_curves_list(self.context._context, groups)

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        if self.serverName is not None:
            connection.set_tlsext_host_name(self.serverName)
        return connection


def _handshake(
    server: object, client: object
) -> tuple[_Recorder, _Recorder, IOPump]:
    """
    Run a TLS handshake in memory, the server side with the TLS layer of
    the proxy's listeners.

    @return: the server's and the client's application protocols, and the pump.
    """
    clock = Clock()
    serverApp, clientApp = _Recorder(), _Recorder()
    serverFactory = TLSLayerFactory(
        server, False, Factory.forProtocol(lambda: serverApp), clock=clock  # type: ignore[arg-type]
    )
    clientFactory = TLSMemoryBIOFactory(
        client, True, Factory.forProtocol(lambda: clientApp), clock=clock  # type: ignore[arg-type]
    )
    _, _, pump = connectedServerAndClient(
        lambda: serverFactory.buildProtocol(None),
        lambda: clientFactory.buildProtocol(None),
        clock=clock,
    )
    pump.flush()
    return serverApp, clientApp, pump


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    issuer: str,
    issuerKey: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    ca: bool,
    names: tuple[str, ...] = (),
    notAfter: datetime.datetime | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=400 if notAfter else 1))
        .not_valid_after(notAfter or now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuerKey.public_key()),
            False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False
        )
    return builder.sign(issuerKey, hashes.SHA256())


def _pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _keyPEM(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _directory(case: SynchronousTestCase, name: str) -> str:
    path = os.path.abspath(case.mktemp()) + "-" + name
    os.makedirs(path)
    return path


def _selfSigned(
    case: SynchronousTestCase, *names: str
) -> tuple[CertificateSource, str]:
    """
    A fresh self-signed certificate serving C{names}, and its PEM path.
    """
    directory = _directory(case, names[0] if names else "default")
    certificate, key = makeSelfSigned(directory, names or ("localhost",))
    return CertificateSource(certificate, key, names), certificate


class ServerOptionsTests(SynchronousTestCase):
    """
    Tests for L{serverOptions}: policy, SNI and the chain, proven by
    handshakes in memory.
    """

    def setUp(self) -> None:
        self.default, _ = _selfSigned(self)
        self.mail, _ = _selfSigned(self, "mail.example.com")
        self.wild, _ = _selfSigned(self, "*.example.org")
        self.options = serverOptions(self.default, [self.mail, self.wild])

    def test_noServerName(self) -> None:
        """
        A client that sends no SNI gets the default certificate.
        """
        serverApp, clientApp, _ = _handshake(self.options, _TestClient())
        self.assertTrue(clientApp.handshakeDone)
        self.assertEqual(clientApp.peerNames(), ["localhost"])
        self.assertEqual(serverApp.info and serverApp.info.serverName, None)

    def test_exactName(self) -> None:
        """
        An SNI name one source serves selects that source's certificate,
        compared without regard to case.
        """
        for serverName in [b"mail.example.com", b"MAIL.Example.Com"]:
            _, clientApp, _ = _handshake(self.options, _TestClient(serverName))
            self.assertEqual(clientApp.peerNames(), ["mail.example.com"])

    def test_wildcard(self) -> None:
        """
        C{*.example.org} serves exactly one label below C{example.org}; deeper
        names and the parent itself get the default certificate.
        """
        _, clientApp, _ = _handshake(self.options, _TestClient(b"imap.Example.org"))
        self.assertEqual(clientApp.peerNames(), ["*.example.org"])
        for other in [b"a.b.example.org", b"example.org", b".example.org"]:
            _, clientApp, _ = _handshake(self.options, _TestClient(other))
            self.assertEqual(clientApp.peerNames(), ["localhost"], other)

    def test_exactBeforeWildcard(self) -> None:
        """
        An exact name wins over a wildcard that also matches it.
        """
        exact, _ = _selfSigned(self, "imap.example.org")
        options = serverOptions(self.default, [self.wild, exact])
        _, clientApp, _ = _handshake(options, _TestClient(b"imap.example.org"))
        self.assertEqual(clientApp.peerNames(), ["imap.example.org"])
        _, clientApp, _ = _handshake(options, _TestClient(b"pop.example.org"))
        self.assertEqual(clientApp.peerNames(), ["*.example.org"])

    def test_unknownName(self) -> None:
        """
        A name no source serves gets the default certificate.
        """
        _, clientApp, _ = _handshake(self.options, _TestClient(b"other.example.net"))
        self.assertTrue(clientApp.handshakeDone)
        self.assertEqual(clientApp.peerNames(), ["localhost"])

    def test_defaultNames(self) -> None:
        """
        Names given on the default source are served by it (and the default
        still answers everything else).
        """
        named = CertificateSource(self.default.certificate, self.default.key, ["LOCALHOST"])
        options = serverOptions(named, [self.mail])
        _, clientApp, _ = _handshake(options, _TestClient(b"localhost"))
        self.assertEqual(clientApp.peerNames(), ["localhost"])
        _, clientApp, _ = _handshake(options, _TestClient(b"mail.example.com"))
        self.assertEqual(clientApp.peerNames(), ["mail.example.com"])

    def test_internationalName(self) -> None:
        """
        Names configured in Unicode match the A-label form clients send as
        SNI, wildcards included.
        """
        exact, _ = _selfSigned(self, "Bücher.example")
        wild, _ = _selfSigned(self, "*.bücher.example")
        options = serverOptions(self.default, [exact, wild])
        _, clientApp, _ = _handshake(options, _TestClient(b"xn--bcher-kva.example"))
        self.assertEqual(clientApp.peerNames(), ["xn--bcher-kva.example"])
        _, clientApp, _ = _handshake(options, _TestClient(b"imap.xn--bcher-kva.example"))
        self.assertEqual(clientApp.peerNames(), ["*.xn--bcher-kva.example"])

    def test_chainSent(self) -> None:
        """
        The intermediates after the leaf in the certificate file are sent,
        for the default and for an SNI-selected certificate alike.
        """
        directory = _directory(self, "chain")
        rootKey, intermediateKey, leafKey = (
            ec.generate_private_key(ec.SECP256R1()) for _ in range(3)
        )
        intermediate = _certificate(
            "Test Intermediate", intermediateKey, "Test Root", rootKey, ca=True
        )
        leaf = _certificate(
            "chain.example.com",
            leafKey,
            "Test Intermediate",
            intermediateKey,
            ca=False,
            names=("chain.example.com",),
        )
        chained = CertificateSource(
            _write(os.path.join(directory, "chain.pem"), _pem(leaf, intermediate)),
            _write(os.path.join(directory, "chain.key"), _keyPEM(leafKey)),
            ["chain.example.com"],
        )
        for options in [
            serverOptions(chained),
            serverOptions(self.default, [self.mail, chained]),
        ]:
            _, clientApp, _ = _handshake(options, _TestClient(b"chain.example.com"))
            self.assertEqual(clientApp.peerChain, [leaf, intermediate])

    def test_tls11Refused(self) -> None:
        """
        A client that speaks at most TLS 1.1 fails the handshake.
        """
        client = _TestClient(maximum=SSL.TLS1_1_VERSION, ciphers=b"DEFAULT:@SECLEVEL=0")
        serverApp, clientApp, _ = _handshake(self.options, client)
        self.assertFalse(serverApp.handshakeDone)
        self.assertFalse(clientApp.handshakeDone)
        assert serverApp.lostReason is not None
        self.assertIsInstance(serverApp.lostReason.value, SSL.Error)
        self.assertIn("unsupported protocol", str(serverApp.lostReason.value))

    def test_tls11HelloGetsProtocolVersionAlert(self) -> None:
        """
        A hand-made TLS 1.1 ClientHello is answered with a fatal
        C{protocol_version} alert and the connection closes.
        """
        factory = TLSMemoryBIOFactory(
            self.options, False, Factory.forProtocol(Protocol), clock=Clock()
        )
        tlsProtocol = factory.buildProtocol(None)
        transport = StringTransport()
        tlsProtocol.makeConnection(transport)
        body = (
            b"\x03\x02"  # client_version TLS 1.1
            + b"\x00" * 32  # random
            + b"\x00"  # no session id
            + b"\x00\x04\xc0\x13\xc0\x09"  # two ECDHE CBC suites
            + b"\x01\x00"  # null compression only
        )
        handshake = b"\x01" + len(body).to_bytes(3, "big") + body
        tlsProtocol.dataReceived(
            b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake
        )
        # alert record, TLS 1.1, 2 bytes: fatal (2), protocol_version (70)
        self.assertEqual(transport.value(), b"\x15\x03\x02\x00\x02\x02\x46")
        self.assertTrue(transport.disconnecting)

    def test_tls12Allowed(self) -> None:
        """
        A TLS 1.2 client completes the handshake with an ECDHE AEAD cipher.
        """
        client = _TestClient(maximum=SSL.TLS1_2_VERSION)
        serverApp, clientApp, _ = _handshake(self.options, client)
        self.assertTrue(clientApp.handshakeDone)
        assert serverApp.info is not None
        self.assertEqual(serverApp.info.version, "TLSv1.2")
        self.assertTrue(serverApp.info.cipher.startswith("ECDHE-ECDSA-"), serverApp.info)

    def test_tls12WeakCiphersRefused(self) -> None:
        """
        With an RSA certificate, TLS 1.2 clients offering only RSA key
        exchange or CBC ciphers fail, while ECDHE-RSA with AES-GCM works.
        """
        directory = _directory(self, "rsa")
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        certificate = _certificate(
            "localhost", key, "localhost", key, ca=False, names=("localhost",)
        )
        path = _write(os.path.join(directory, "rsa.pem"), _pem(certificate) + _keyPEM(key))
        options = serverOptions(CertificateSource(path, path))
        for ciphers in [
            b"AES128-GCM-SHA256",
            b"AES256-SHA256",
            b"ECDHE-RSA-AES128-SHA:@SECLEVEL=0",
            b"ECDHE-RSA-AES128-SHA256",
        ]:
            client = _TestClient(maximum=SSL.TLS1_2_VERSION, ciphers=ciphers)
            serverApp, clientApp, _ = _handshake(options, client)
            self.assertFalse(clientApp.handshakeDone, ciphers)
            self.assertFalse(serverApp.handshakeDone, ciphers)
        client = _TestClient(
            maximum=SSL.TLS1_2_VERSION, ciphers=b"ECDHE-RSA-AES128-GCM-SHA256"
        )
        serverApp, _, _ = _handshake(options, client)
        self.assertEqual(
            serverApp.info, TLSInfo("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256", None)
        )

    def test_clientCipherPreference(self) -> None:
        """
        The server takes the client's preferred cipher, not its own first.
        """
        for ciphers, expected in [
            (
                b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
                "ECDHE-ECDSA-CHACHA20-POLY1305",
            ),
            (
                b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305",
                "ECDHE-ECDSA-AES256-GCM-SHA384",
            ),
        ]:
            client = _TestClient(maximum=SSL.TLS1_2_VERSION, ciphers=ciphers)
            serverApp, _, _ = _handshake(self.options, client)
            self.assertEqual(serverApp.info and serverApp.info.cipher, expected)

    def test_groups(self) -> None:
        """
        X25519 (or its ML-KEM hybrid) is preferred; P-256 is accepted; a
        client offering only P-521 fails.
        """
        serverApp, _, _ = _handshake(self.options, _TestClient())
        group = serverApp.transport.getHandle().get_group_name()  # type: ignore[union-attr]
        self.assertIn(group.lower(), ("x25519mlkem768", "x25519"))

        client = _TestClient(groups=b"prime256v1")
        self.assertEqual(client.groupsAccepted, 1)
        serverApp, clientApp, _ = _handshake(self.options, client)
        self.assertTrue(clientApp.handshakeDone)

        client = _TestClient(groups=b"secp521r1")
        self.assertEqual(client.groupsAccepted, 1)
        serverApp, clientApp, _ = _handshake(self.options, client)
        self.assertFalse(clientApp.handshakeDone)

    def test_alpn(self) -> None:
        """
        With ALPN configured, a common protocol is negotiated, a client
        offering only others is refused with C{no_application_protocol}, and
        a client without ALPN still connects.
        """
        options = ApplicationProtocolOptions(serverOptions(self.default, [self.mail]), [b"imap"])
        serverApp, clientApp, _ = _handshake(
            options, _TestClient(b"mail.example.com", alpn=[b"pop3", b"imap"])
        )
        self.assertEqual(clientApp.negotiated, b"imap")
        self.assertEqual(clientApp.peerNames(), ["mail.example.com"])

        serverApp, clientApp, _ = _handshake(
            options, _TestClient(b"mail.example.com", alpn=[b"pop3"])
        )
        self.assertFalse(clientApp.handshakeDone)
        self.assertIn("no application protocol", str(clientApp.lostReason.value))  # type: ignore[union-attr]

        serverApp, clientApp, _ = _handshake(options, _TestClient())
        self.assertTrue(clientApp.handshakeDone)
        self.assertIsNone(clientApp.negotiated)

    def test_releaseBuffers(self) -> None:
        """
        Connections release their read and write buffers when idle.
        """
        from OpenSSL._util import lib

        connection = self.options.serverConnectionForTLS(None)  # type: ignore[arg-type]
        mode = lib.SSL_set_mode(connection._ssl, 0)
        self.assertTrue(mode & lib.SSL_MODE_RELEASE_BUFFERS)

    def test_ticketsButNoServerPreference(self) -> None:
        """
        Session tickets are on (clients resume); renegotiation and server
        cipher preference are off.
        """
        connection = self.options.serverConnectionForTLS(None)  # type: ignore[arg-type]
        options = connection.set_options(0)
        self.assertFalse(options & SSL.OP_NO_TICKET)
        self.assertTrue(options & SSL.OP_NO_RENEGOTIATION)
        self.assertFalse(options & SSL.OP_CIPHER_SERVER_PREFERENCE)


class TLSConfigErrorTests(SynchronousTestCase):
    """
    L{serverOptions} refuses unusable files, naming them.
    """

    def setUp(self) -> None:
        self.directory = _directory(self, "files")
        self.certificate, self.key = makeSelfSigned(self.directory)

    def assertConfigError(self, source: CertificateSource, *fragments: str) -> str:
        error = self.assertRaises(TLSConfigError, serverOptions, source)
        message = str(error)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertNotIn("PRIVATE", message)
        self.assertNotIn("BEGIN", message)
        return message

    def test_missingCertificate(self) -> None:
        """
        A missing certificate file is named.
        """
        missing = os.path.join(self.directory, "nope.pem")
        self.assertConfigError(CertificateSource(missing, self.key), missing)

    def test_missingKey(self) -> None:
        """
        A missing key file is named.
        """
        missing = os.path.join(self.directory, "nope.key")
        self.assertConfigError(CertificateSource(self.certificate, missing), missing)

    def test_notPEM(self) -> None:
        """
        A certificate file without a PEM certificate, or a key file without a
        PEM key (here: a certificate), is named.
        """
        garbage = _write(os.path.join(self.directory, "garbage.pem"), b"hello\n")
        self.assertConfigError(CertificateSource(garbage, self.key), garbage, "PEM")
        self.assertConfigError(
            CertificateSource(self.certificate, self.certificate), self.certificate, "key"
        )

    def test_keyMismatch(self) -> None:
        """
        A key that does not belong to the certificate names both files.
        """
        other = _directory(self, "other")
        _, otherKey = makeSelfSigned(other)
        message = self.assertConfigError(
            CertificateSource(self.certificate, otherKey), otherKey, self.certificate
        )
        self.assertIn("does not match", message)

    def test_keyMismatchAmongOthers(self) -> None:
        """
        A bad SNI source is found at call time too.
        """
        other = _directory(self, "other")
        otherCertificate, _ = makeSelfSigned(other)
        error = self.assertRaises(
            TLSConfigError,
            serverOptions,
            CertificateSource(self.certificate, self.key),
            [CertificateSource(otherCertificate, self.key, ["x.example"])],
        )
        self.assertIn(otherCertificate, str(error))

    def test_encryptedKey(self) -> None:
        """
        An encrypted key is refused (there is nowhere to type a passphrase).
        """
        with open(self.key, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        encrypted = _write(
            os.path.join(self.directory, "encrypted.key"),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
        )
        self.assertConfigError(
            CertificateSource(self.certificate, encrypted), encrypted, "encrypted"
        )

    def test_combinedFile(self) -> None:
        """
        Certificate and key may share one file.
        """
        with open(self.certificate, "rb") as c, open(self.key, "rb") as k:
            combined = _write(os.path.join(self.directory, "both.pem"), c.read() + k.read())
        serverOptions(CertificateSource(combined, combined))

    def test_duplicateName(self) -> None:
        """
        Two sources claiming one name (in any case) is an error naming the
        second file.
        """
        other = _directory(self, "other")
        otherCertificate, otherKey = makeSelfSigned(other)
        error = self.assertRaises(
            TLSConfigError,
            serverOptions,
            CertificateSource(self.certificate, self.key),
            [
                CertificateSource(self.certificate, self.key, ["a.example"]),
                CertificateSource(otherCertificate, otherKey, ["A.Example"]),
            ],
        )
        self.assertIn(otherCertificate, str(error))

    def test_weakKeyRefused(self) -> None:
        """
        A certificate OpenSSL itself will not use (a 1024-bit RSA key) is
        refused at load time with OpenSSL's reason and the file's name.
        """
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        weak = _certificate("weak.example", key, "weak.example", key, ca=False)
        path = _write(os.path.join(self.directory, "weak.pem"), _pem(weak) + _keyPEM(key))
        message = self.assertConfigError(CertificateSource(path, path), path)
        self.assertIn("too small", message)

    def test_expiredWarns(self) -> None:
        """
        An expired certificate is accepted with a warning naming the file.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        expired = _certificate(
            "old.example",
            key,
            "old.example",
            key,
            ca=False,
            notAfter=datetime.datetime.now(datetime.timezone.utc)
            - datetime.timedelta(days=2),
        )
        path = _write(os.path.join(self.directory, "old.pem"), _pem(expired) + _keyPEM(key))
        with capturedLogs() as events:
            serverOptions(CertificateSource(path, path))
        warnings = [e for e in events if e.get("path") == path]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["log_level"].name, "warn")
        self.assertIn(f"TLS certificate {path} expired on ", formatEvent(warnings[0]))
        [warning] = certificateWarnings(CertificateSource(path, path, where="proxy.toml: tls"))
        self.assertTrue(warning.startswith(f"proxy.toml: tls.certificate: {path} expired on "), warning)
        # The log at start and reload names the setting too.
        with capturedLogs() as events:
            serverOptions(CertificateSource(path, path, where="proxy.toml: tls"))
        [logged] = [formatEvent(e) for e in events if e.get("path") == path]
        self.assertTrue(logged.startswith(f"proxy.toml: tls.certificate: TLS certificate {path} expired on "), logged)

    def test_namesNotCovered(self) -> None:
        """
        A certificate that does not name an SNI name it is to serve is
        accepted with a warning: its own names and one-label wildcards
        count, a wildcard's parent and deeper names do not.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _certificate(
            "mail.example.org", key, "mail.example.org", key, ca=False, names=("mail.example.org", "*.example.net")
        )
        path = _write(os.path.join(self.directory, "sni.pem"), _pem(certificate) + _keyPEM(key))
        covered = ("MAIL.example.org", "imap.example.net", "*.example.net")
        self.assertEqual(certificateWarnings(CertificateSource(path, path, names=covered)), [])
        uncovered = ("example.net", "a.b.example.net", "old.example.com")
        self.assertEqual(
            certificateWarnings(CertificateSource(path, path, names=uncovered)),
            [f"{path} does not name {name!r} (no subjectAltName covers it), which it is to serve" for name in uncovered],
        )

    def test_validDoesNotWarn(self) -> None:
        """
        A valid certificate logs nothing.
        """
        with capturedLogs() as events:
            serverOptions(CertificateSource(self.certificate, self.key))
        self.assertEqual(list(events), [])


class ClientOptionsTests(SynchronousTestCase):
    """
    Tests for L{clientOptions}: backend certificate verification.
    """

    def setUp(self) -> None:
        self.source, self.pem = _selfSigned(self, "localhost")
        self.server = serverOptions(self.source)
        _, self.otherPEM = _selfSigned(self, "localhost")
        self.addCleanup(clientOptions.cache_clear)

    def connect(self, backend: Backend) -> tuple[_Recorder, _Recorder]:
        serverApp, clientApp, _ = _handshake(self.server, clientOptions(backend))
        return serverApp, clientApp

    def test_caFileAccepts(self) -> None:
        """
        A server whose certificate is in C{caFile} and names the host is
        accepted, and SNI carries the host name.
        """
        serverApp, clientApp = self.connect(
            Backend(name="b", host="localhost", tls="implicit", caFile=self.pem)
        )
        self.assertTrue(clientApp.handshakeDone)
        self.assertEqual(serverApp.info and serverApp.info.serverName, "localhost")

    def test_otherCARejects(self) -> None:
        """
        A self-signed server not in C{caFile} is rejected.
        """
        serverApp, clientApp = self.connect(
            Backend(name="b", host="localhost", tls="implicit", caFile=self.otherPEM)
        )
        self.assertFalse(clientApp.handshakeDone)
        self.assertIsNotNone(clientApp.lostReason)

    def test_platformTrustRejects(self) -> None:
        """
        Without C{caFile} the platform's store is used, which does not trust
        a self-signed server.
        """
        serverApp, clientApp = self.connect(Backend(name="b", host="localhost"))
        self.assertFalse(clientApp.handshakeDone)

    def test_wrongNameRejects(self) -> None:
        """
        A trusted certificate for another name is rejected; C{serverName}
        overrides the host for the check.
        """
        _, clientApp = self.connect(
            Backend(name="b", host="mail.example.com", caFile=self.pem)
        )
        self.assertFalse(clientApp.handshakeDone)
        _, clientApp = self.connect(
            Backend(name="b", host="mail.example.com", serverName="localhost", caFile=self.pem)
        )
        self.assertTrue(clientApp.handshakeDone)

    def test_ipAddress(self) -> None:
        """
        An IP literal host is checked against IP address SANs, without SNI.
        """
        for host in ["127.0.0.1", "::1"]:
            serverApp, clientApp = self.connect(Backend(name="b", host=host, caFile=self.pem))
            self.assertTrue(clientApp.handshakeDone, host)
            self.assertIsNone(serverApp.info and serverApp.info.serverName)
        _, clientApp = self.connect(Backend(name="b", host="192.0.2.1", caFile=self.pem))
        self.assertFalse(clientApp.handshakeDone)

    def test_caFileWithSeveralCertificates(self) -> None:
        """
        Every certificate in C{caFile} is trusted, not just the first.
        """
        with open(self.otherPEM, "rb") as a, open(self.pem, "rb") as b:
            both = _write(os.path.abspath(self.mktemp()), a.read() + b.read())
        _, clientApp = self.connect(Backend(name="b", host="localhost", caFile=both))
        self.assertTrue(clientApp.handshakeDone)

    def test_noVerify(self) -> None:
        """
        C{verify=False} accepts an untrusted server but still sends SNI.
        """
        serverApp, clientApp = self.connect(
            Backend(name="b", host="backend.example", verify=False)
        )
        self.assertTrue(clientApp.handshakeDone)
        self.assertEqual(serverApp.info and serverApp.info.serverName, "backend.example")

    def test_noVerifyStillTLS12(self) -> None:
        """
        C{verify=False} does not lower the minimum version: a TLS 1.1-only
        server is refused.
        """
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_VERSION)
        context.set_max_proto_version(SSL.TLS1_1_VERSION)
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        context.use_certificate_chain_file(self.source.certificate)
        context.use_privatekey_file(self.source.key)

        @implementer(IOpenSSLServerConnectionCreator)
        class OldServer:
            def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
                return SSL.Connection(context, None)

        _, clientApp, _ = _handshake(
            OldServer(), clientOptions(Backend(name="b", host="localhost", verify=False))
        )
        self.assertFalse(clientApp.handshakeDone)

    def test_cached(self) -> None:
        """
        Equal backends get the very same options object; different ones do
        not.
        """
        first = clientOptions(Backend(name="b", host="localhost", caFile=self.pem))
        again = clientOptions(Backend(name="b", host="localhost", caFile=self.pem))
        other = clientOptions(Backend(name="c", host="localhost", caFile=self.pem))
        self.assertIs(first, again)
        self.assertIsNot(first, other)

    def test_badCAFile(self) -> None:
        """
        A missing or non-PEM C{caFile} raises L{TLSConfigError} naming it.
        """
        missing = os.path.abspath(self.mktemp())
        error = self.assertRaises(
            TLSConfigError, clientOptions, Backend(name="b", host="h", caFile=missing)
        )
        self.assertIn(missing, str(error))
        garbage = _write(os.path.abspath(self.mktemp()), b"not a certificate")
        error = self.assertRaises(
            TLSConfigError, clientOptions, Backend(name="b", host="h", caFile=garbage)
        )
        self.assertIn(garbage, str(error))


class TLSInfoTests(SynchronousTestCase):
    """
    Tests for L{tlsInfo} on in-memory transports.
    """

    def test_notTLS(self) -> None:
        """
        A plain transport has no TLS information.
        """
        self.assertIsNone(tlsInfo(StringTransport()))
        self.assertIsNone(tlsInfo(None))

    def test_beforeHandshake(self) -> None:
        """
        A TLS transport whose handshake has not finished has none either.
        """
        source, _ = _selfSigned(self, "localhost")
        factory = TLSMemoryBIOFactory(
            serverOptions(source), False, Factory.forProtocol(_Recorder), clock=Clock()
        )
        tlsProtocol = factory.buildProtocol(None)
        tlsProtocol.makeConnection(StringTransport())
        self.assertIsNone(tlsInfo(tlsProtocol))

    def test_implicitTLS(self) -> None:
        """
        Both sides of an implicit TLS connection report version, cipher and
        the SNI name.
        """
        source, _ = _selfSigned(self, "localhost")
        serverApp, clientApp, _ = _handshake(
            serverOptions(source), _TestClient(b"LocalHost")
        )
        expected = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", "localhost")
        self.assertEqual(serverApp.info, expected)
        self.assertEqual(clientApp.info, expected)

    def test_tls12(self) -> None:
        """
        A TLS 1.2 connection reports C{TLSv1.2} and the OpenSSL cipher name.
        """
        source, _ = _selfSigned(self, "localhost")
        serverApp, _, _ = _handshake(
            serverOptions(source),
            _TestClient(maximum=SSL.TLS1_2_VERSION, ciphers=b"ECDHE-ECDSA-AES128-GCM-SHA256"),
        )
        self.assertEqual(
            serverApp.info, TLSInfo("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", None)
        )



def countDeclarations(case: SynchronousTestCase) -> list[object]:
    """
    Have Twisted's TLS layer and protocol wrapper record, for the rest of
    C{case}, each object they declare interfaces on (C{directlyProvides}).

    @return: the list the objects are recorded in.
    """
    calls: list[object] = []

    def counting(target: object, *interfaces: object) -> None:
        calls.append(target)
        directlyProvides(target, *interfaces)

    case.patch(tls, "directlyProvides", counting)
    case.patch(policies, "directlyProvides", counting)
    return calls

class TLSLayerTests(SynchronousTestCase):
    """
    The TLS layer of an implicit-TLS listener's connections.
    """

    def test_oneDeclarationPerConnection(self) -> None:
        """
        The TLS layer a listener puts on each connection declares its
        transport's interfaces on itself once as it connects (Twisted's
        layer first declared each of them in turn, a dozen zope.interface
        calls per connection that the last declaration replaces), and
        provides what Twisted's layer provides once connected: the
        transport's interfaces and those of its class.
        """
        calls = countDeclarations(self)
        source, _ = _selfSigned(self, "localhost")
        context = ProxyContext(
            reactor=Clock(),
            router=FakeRouter(),
            limits=Limits(),
            hostname="proxy.test",
            serverTLS=ReloadableServerTLS(serverOptions(source)),
        )
        factory = listenerFactory(context, Listener(protocol="imap", endpoint="tcp:0", tls="implicit"))
        layer: Any = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 143))
        transport = StringTransport()
        layer.makeConnection(transport)
        self.assertEqual(calls, [layer])
        self.assertEqual(
            set(providedBy(layer)), set(providedBy(transport)) | set(implementedBy(BufferingTLSTransport))
        )
        layer.loseConnection()


    def connectedLayers(self, serverApp: _Recorder, clientApp: _Receiver) -> tuple[_SoonClock, Any]:
        """
        C{serverApp} behind a listener's TLS layer and C{clientApp} behind
        Twisted's client layer, connected in memory on a L{_SoonClock},
        with the handshake done.

        @return: the clock and the pump between them.
        """
        source, _ = _selfSigned(self, "localhost")
        clock = _SoonClock()
        serverFactory = TLSLayerFactory(
            serverOptions(source), False, Factory.forProtocol(lambda: serverApp), clock=clock  # type: ignore[arg-type]
        )
        clientFactory = TLSMemoryBIOFactory(
            _TestClient(), True, Factory.forProtocol(lambda: clientApp), clock=clock  # type: ignore[arg-type]
        )
        _, _, pump = connectedServerAndClient(
            lambda: serverFactory.buildProtocol(None),
            lambda: clientFactory.buildProtocol(None),
            clock=clock,
        )
        pump.flush()
        self.assertTrue(serverApp.handshakeDone)
        return clock, pump

    def test_batchedWithoutTimedCall(self) -> None:
        """
        The writes of one turn of the event loop leave in one TLS record,
        as Twisted's layer sends them, put off with the reactor's
        C{callSoon}: no timed call in the reactor's heap per burst of
        writes.
        """
        serverApp, clientApp = _Recorder(), _Receiver()
        clock, pump = self.connectedLayers(serverApp, clientApp)
        clock.runSoon()
        pump.flush()
        timed = len(clock.calls)
        assert serverApp.transport is not None
        serverApp.transport.write(b"* OK ")
        serverApp.transport.write(b"ready\r\n")
        self.assertEqual((len(clock.calls), len(clock.soon)), (timed, 1))
        pump.flush()
        self.assertEqual(clientApp.received, [])
        clock.runSoon()
        pump.flush()
        self.assertEqual(clientApp.received, [b"* OK ready\r\n"])


    def test_sendBufferReadOnlyWhenFilled(self) -> None:
        """
        The layer reads what OpenSSL has to send only when there is some:
        Twisted's reads it after every step, and an empty read costs a 32
        KiB allocation and an exception in pyOpenSSL, most reads of a
        login. Everything still arrives, both ways.
        """
        reads: list[tuple[SSL.Connection, bool]] = []
        bioRead = SSL.Connection.bio_read

        def counting(connection: SSL.Connection, size: int) -> bytes:
            try:
                data = bioRead(connection, size)
            except SSL.WantReadError:
                reads.append((connection, False))
                raise
            reads.append((connection, True))
            return data

        self.patch(SSL.Connection, "bio_read", counting)
        serverApp, clientApp = _Receiver(), _Receiver()
        clock, pump = self.connectedLayers(serverApp, clientApp)
        assert serverApp.transport is not None and clientApp.transport is not None
        for _ in range(3):
            serverApp.transport.write(b"* OK ready\r\n")
            clientApp.transport.write(b"a LOGIN\r\n")
            clock.runSoon()
            pump.flush()
        self.assertEqual(b"".join(clientApp.received), b"* OK ready\r\n" * 3)
        self.assertEqual(b"".join(serverApp.received), b"a LOGIN\r\n" * 3)
        server = serverApp.transport._tlsConnection  # type: ignore[attr-defined]
        filled = [found for connection, found in reads if connection is server]
        self.assertEqual(filled.count(False), 0)
        self.assertGreater(filled.count(True), 3)


class _Receiver(_Recorder):
    """
    A L{_Recorder} that keeps what it receives.

    @ivar received: the data of each C{dataReceived} call (one per TLS
        record here).
    """

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


class _SoonClock(Clock):
    """
    A L{Clock} with the proxy's reactor's C{callSoon}.

    @ivar soon: the calls put off with C{callSoon}, not yet run.
    """

    def __init__(self) -> None:
        super().__init__()
        self.soon: list[Callable[[], object]] = []

    def callSoon(self, f: Callable[[], object]) -> None:
        self.soon.append(f)

    def runSoon(self) -> None:
        """
        Run the calls put off so far (as the reactor does once it has
        handled the events of a turn).
        """
        soon, self.soon = self.soon, []
        for f in soon:
            f()


class _StartTLSServer(Protocol):
    """
    Says C{OK}, then starts TLS; fires C{done} with L{tlsInfo} once secure.
    """

    def __init__(self, options: object, done: defer.Deferred[TLSInfo | None]) -> None:
        self.options = options
        self.done = done

    def connectionMade(self) -> None:
        self.transport.write(b"OK\r\n")  # type: ignore[union-attr]
        self.transport.startTLS(self.options)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        # The client writes once its handshake is done; by then ours is too.
        self.done.callback(tlsInfo(self.transport))
        self.transport.loseConnection()  # type: ignore[union-attr]


class _StartTLSClient(Protocol):
    """
    Starts TLS on the server's C{OK}; fires C{done} with L{tlsInfo} once
    the handshake completes.
    """

    def __init__(self, options: object, done: defer.Deferred[TLSInfo | None]) -> None:
        self.options = options
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        if data == b"OK\r\n":
            self.transport.startTLS(self.options)  # type: ignore[union-attr]
            self.transport.write(b"hello")  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback(tlsInfo(self.transport))


@implementer(IHandshakeListener)
class _HandshakeClient(_StartTLSClient):
    def handshakeCompleted(self) -> None:
        if not self.done.called:
            self.done.callback(tlsInfo(self.transport))


class StartTLSTests(TestCase):
    """
    L{serverOptions}, L{clientOptions} and L{tlsInfo} with C{startTLS} on
    real TCP transports over the loopback interface.
    """

    def test_startTLS(self) -> defer.Deferred[None]:
        """
        After STARTTLS both sides report the TLS version, cipher and the SNI
        name the client sent.
        """
        return self.startTLSBothWays(atOnce=False)

    def test_startTLSAtOnce(self) -> defer.Deferred[None]:
        """
        The same on the proxy's TCP transports (L{mailproxy._tcp}), whose
        TLS layer, on either side, declares no interface on itself as it
        connects (Twisted's declared each of its transport's in turn, a
        dozen zope.interface calls per STARTTLS, each replacing the last).
        """
        calls = countDeclarations(self)
        done = self.startTLSBothWays(atOnce=True)
        done.addCallback(lambda _: self.assertEqual(calls, []))
        return done

    def startTLSBothWays(self, atOnce: bool) -> defer.Deferred[None]:
        """
        Connect a client to a server over loopback, start TLS on both,
        and check what each reports.

        @param atOnce: on the proxy's TCP transports (else Twisted's).
        """
        from twisted.internet import reactor

        directory = _directory(self, "starttls")
        certificate, key = makeSelfSigned(directory)
        server = serverOptions(CertificateSource(certificate, key))
        client = clientOptions(Backend(name="b", host="localhost", caFile=certificate))
        self.addCleanup(clientOptions.cache_clear)

        serverDone: defer.Deferred[TLSInfo | None] = defer.Deferred()
        clientDone: defer.Deferred[TLSInfo | None] = defer.Deferred()
        port = reactor.listenTCP(
            0,
            ServerFactory.forProtocol(  # type: ignore[arg-type]
                lambda: _StartTLSServer(server, serverDone)
            ),
            interface="127.0.0.1",
        )
        self.addCleanup(port.stopListening)
        clientFactory = _ClientFactory(lambda: _HandshakeClient(client, clientDone))
        if atOnce:
            _tcp.listenAtOnce(port)
            connector = _tcp.connectAtOnce(reactor, "127.0.0.1", port.getHost().port, clientFactory, 10)  # type: ignore[attr-defined]
        else:
            connector = reactor.connectTCP("127.0.0.1", port.getHost().port, clientFactory)  # type: ignore[attr-defined]
        self.addCleanup(connector.disconnect)

        def check(results: list[TLSInfo | None]) -> None:
            serverInfo, clientInfo = results
            self.assertIsNotNone(serverInfo)
            assert serverInfo is not None
            self.assertEqual(serverInfo.version, "TLSv1.3")
            self.assertEqual(serverInfo.serverName, "localhost")
            self.assertEqual(clientInfo, serverInfo)

        return defer.gatherResults([serverDone, clientDone]).addCallback(check)


class _ClientFactory(ClientFactory):
    """
    A client factory that builds one protocol from a callable.
    """

    def __init__(self, build: Callable[[], Protocol]) -> None:
        self.build = build

    def buildProtocol(self, addr: object) -> Protocol:
        protocol = self.build()
        protocol.factory = self
        return protocol

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        pass

    def clientConnectionLost(self, connector: object, reason: Failure) -> None:
        pass


class MakeSelfSignedTests(SynchronousTestCase):
    """
    Tests for L{makeSelfSigned}.
    """

    def test_files(self) -> None:
        """
        It writes an EC P-256 certificate valid for about a year with the
        given names and addresses, and a key readable only by its owner.
        """
        directory = _directory(self, "selfsigned")
        certificatePath, keyPath = makeSelfSigned(
            directory, ["mail.example.com", "imap.example.com"], ["192.0.2.7"]
        )
        self.assertEqual(certificatePath, os.path.join(directory, "selfsigned.pem"))
        self.assertEqual(keyPath, os.path.join(directory, "selfsigned.key"))
        self.assertEqual(stat.S_IMODE(os.stat(keyPath).st_mode), 0o600)
        with open(certificatePath, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        with open(keyPath, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.assertEqual(key.curve.name, "secp256r1")
        self.assertEqual(
            key.public_key().public_numbers(), certificate.public_key().public_numbers()  # type: ignore[union-attr]
        )
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        self.assertEqual(
            names.get_values_for_type(x509.DNSName), ["mail.example.com", "imap.example.com"]
        )
        self.assertEqual(
            names.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("192.0.2.7")]
        )
        lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
        self.assertTrue(
            datetime.timedelta(days=365) <= lifetime <= datetime.timedelta(days=366),
            lifetime,
        )
