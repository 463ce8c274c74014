"""
Tests for L{mailproxy._proxyproto}: PROXY protocol v1/v2 headers.

The expected bytes are written out from haproxy's doc/proxy-protocol.txt, not
produced by the encoder under test.
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase

from mailproxy._proxyproto import (
    ProxyHeader,
    ProxyHeaderError,
    encodeV1,
    encodeV2,
    parseHeader,
)
from mailproxy.model import TLSInfo

SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"

# 192.0.2.1:51234 -> 198.51.100.2:993 (51234 = 0xC822, 993 = 0x03E1)
V2_TCP4 = (
    SIGNATURE
    + b"\x21"  # version 2, PROXY
    + b"\x11"  # AF_INET, STREAM
    + b"\x00\x0c"  # 12 bytes follow
    + b"\xc0\x00\x02\x01"
    + b"\xc6\x33\x64\x02"
    + b"\xc8\x22"
    + b"\x03\xe1"
)

# [2001:db8::1]:51234 -> [2001:db8::2]:143 (143 = 0x008F)
V2_TCP6 = (
    SIGNATURE
    + b"\x21"
    + b"\x21"  # AF_INET6, STREAM
    + b"\x00\x24"  # 36 bytes follow
    + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01"
    + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x02"
    + b"\xc8\x22"
    + b"\x00\x8f"
)

# V2_TCP4 plus ALPN, AUTHORITY, UNIQUE_ID and SSL TLVs.
SSL_VALUE = (
    b"\x01"  # PP2_CLIENT_SSL, no certificate flags
    + b"\x00\x00\x00\x01"  # verify != 0: no verified client certificate
    + b"\x21\x00\x07" + b"TLSv1.3"
    + b"\x23\x00\x16" + b"TLS_AES_256_GCM_SHA384"
)
V2_TCP4_TLVS = (
    SIGNATURE
    + b"\x21\x11"
    + b"\x00\x56"  # 12 + 7 + 19 + 5 + 43 = 86
    + b"\xc0\x00\x02\x01"
    + b"\xc6\x33\x64\x02"
    + b"\xc8\x22\x03\xe1"
    + b"\x01\x00\x04" + b"imap"
    + b"\x02\x00\x10" + b"mail.example.com"
    + b"\x05\x00\x02" + b"\x01\x02"
    + b"\x20\x00\x28" + SSL_VALUE
)

TLS = TLSInfo(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384")


class EncodeV1Tests(SynchronousTestCase):
    """
    Tests for L{encodeV1}.
    """

    def test_tcp4(self) -> None:
        """
        Two IPv4 endpoints give a TCP4 line with single spaces and CRLF.
        """
        self.assertEqual(
            encodeV1(("192.0.2.1", 51234), ("198.51.100.2", 993)),
            b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 993\r\n",
        )

    def test_tcp6(self) -> None:
        """
        Two IPv6 endpoints give a TCP6 line with compressed addresses.
        """
        self.assertEqual(
            encodeV1(("2001:0db8:0:0::1", 51234), ("2001:db8::2", 143)),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 51234 143\r\n",
        )

    def test_mappedIPv4(self) -> None:
        """
        IPv4-mapped IPv6 addresses (a dual-stack listener's view of an IPv4
        client) are sent as IPv4.
        """
        self.assertEqual(
            encodeV1(("::ffff:192.0.2.1", 1024), ("::ffff:198.51.100.2", 143)),
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1024 143\r\n",
        )

    def test_mixedFamilies(self) -> None:
        """
        An IPv4 source with an IPv6 destination maps the IPv4 one into IPv6.
        """
        self.assertEqual(
            encodeV1(("192.0.2.1", 1024), ("2001:db8::2", 143)),
            b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1024 143\r\n",
        )

    def test_scopeDropped(self) -> None:
        """
        A link-local scope (C{%eth0}) means nothing to the receiver and is
        left out.
        """
        self.assertEqual(
            encodeV1(("fe80::1%eth0", 1), ("fe80::2%eth0", 2)),
            b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n",
        )

    def test_notAnAddress(self) -> None:
        """
        A host name or a UNIX path is refused with L{ValueError}.
        """
        self.assertRaises(ValueError, encodeV1, ("localhost", 1), ("127.0.0.1", 2))
        self.assertRaises(ValueError, encodeV1, ("/run/sock", 0), ("127.0.0.1", 2))

    def test_badPort(self) -> None:
        """
        A port outside 0-65535 is refused with L{ValueError}.
        """
        self.assertRaises(ValueError, encodeV1, ("127.0.0.1", 65536), ("127.0.0.1", 2))
        self.assertRaises(ValueError, encodeV1, ("127.0.0.1", 1), ("127.0.0.1", -1))


class EncodeV2Tests(SynchronousTestCase):
    """
    Tests for L{encodeV2}.
    """

    def test_tcp4(self) -> None:
        """
        Two IPv4 endpoints give version 2 PROXY, family 0x11, 12 address bytes.
        """
        self.assertEqual(encodeV2(("192.0.2.1", 51234), ("198.51.100.2", 993)), V2_TCP4)

    def test_tcp6(self) -> None:
        """
        Two IPv6 endpoints give family 0x21 and 36 address bytes.
        """
        self.assertEqual(encodeV2(("2001:db8::1", 51234), ("2001:db8::2", 143)), V2_TCP6)

    def test_mappedIPv4(self) -> None:
        """
        IPv4-mapped IPv6 addresses are sent as IPv4.
        """
        self.assertEqual(
            encodeV2(("::ffff:192.0.2.1", 51234), ("::ffff:198.51.100.2", 993)), V2_TCP4
        )

    def test_mixedFamilies(self) -> None:
        """
        An IPv4 source with an IPv6 destination sends both as IPv6, the IPv4
        one mapped.
        """
        self.assertEqual(
            encodeV2(("192.0.2.1", 1), ("::1", 2)),
            SIGNATURE
            + b"\x21\x21\x00\x24"
            + b"\x00" * 10 + b"\xff\xff" + b"\xc0\x00\x02\x01"
            + b"\x00" * 15 + b"\x01"
            + b"\x00\x01\x00\x02",
        )

    def test_tlvs(self) -> None:
        """
        ALPN, AUTHORITY, UNIQUE_ID and SSL (CLIENT_SSL, verify non-zero,
        VERSION and CIPHER sub-TLVs) follow the addresses, and the length
        counts them.
        """
        self.assertEqual(
            encodeV2(
                ("192.0.2.1", 51234),
                ("198.51.100.2", 993),
                alpn=b"imap",
                authority="mail.example.com",
                uniqueId=b"\x01\x02",
                tls=TLS,
            ),
            V2_TCP4_TLVS,
        )

    def test_tlsOnly(self) -> None:
        """
        The SSL TLV alone, on IPv6.
        """
        self.assertEqual(
            encodeV2(("2001:db8::1", 51234), ("2001:db8::2", 143), tls=TLS),
            SIGNATURE
            + b"\x21\x21\x00\x4f"  # 36 + 43 = 79
            + V2_TCP6[16:]
            + b"\x20\x00\x28"
            + SSL_VALUE,
        )

    def test_uniqueIdLimit(self) -> None:
        """
        A unique id of 128 bytes is sent; 129 bytes is refused.
        """
        header = encodeV2(("192.0.2.1", 1), ("192.0.2.2", 2), uniqueId=b"x" * 128)
        self.assertEqual(header[14:16], struct.pack("!H", 12 + 3 + 128))
        self.assertEqual(header[-131:], b"\x05\x00\x80" + b"x" * 128)
        self.assertRaises(
            ValueError,
            encodeV2,
            ("192.0.2.1", 1),
            ("192.0.2.2", 2),
            uniqueId=b"x" * 129,
        )

    def test_tooLong(self) -> None:
        """
        A header whose length does not fit in 16 bits is refused.
        """
        self.assertRaises(
            ValueError,
            encodeV2,
            ("192.0.2.1", 1),
            ("192.0.2.2", 2),
            alpn=b"a" * 0xFFFF,
        )

    def test_notAnAddress(self) -> None:
        """
        A host name is refused with L{ValueError}.
        """
        self.assertRaises(ValueError, encodeV2, ("example.com", 1), ("127.0.0.1", 2))


class ParseV1Tests(SynchronousTestCase):
    """
    Tests for L{parseHeader} with version 1 headers.
    """

    def test_tcp4(self) -> None:
        """
        A TCP4 line gives both endpoints, and the bytes after the CRLF are
        returned untouched.
        """
        self.assertEqual(
            parseHeader(b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 993\r\n\x16\x03\x01"),
            (
                ProxyHeader("PROXY", ("192.0.2.1", 51234), ("198.51.100.2", 993)),
                b"\x16\x03\x01",
            ),
        )

    def test_tcp6(self) -> None:
        """
        A TCP6 line gives both endpoints in canonical text.
        """
        self.assertEqual(
            parseHeader(b"PROXY TCP6 2001:db8:0::1 ::ffff:192.0.2.1 1 65535\r\n"),
            (ProxyHeader("PROXY", ("2001:db8::1", 1), ("::ffff:192.0.2.1", 65535)), b""),
        )

    def test_unknown(self) -> None:
        """
        UNKNOWN gives no endpoints, whatever follows it on the line.
        """
        for line in [
            b"PROXY UNKNOWN\r\n",
            b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        ]:
            self.assertEqual(
                parseHeader(line + b"A1 LOGIN"),
                (ProxyHeader("PROXY", None, None), b"A1 LOGIN"),
            )

    def test_longestLine(self) -> None:
        """
        The longest possible line, 104 bytes, is accepted, and a line of 107
        bytes with its CRLF still is.
        """
        full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
        self.assertEqual(len(line), 104)
        self.assertEqual(
            parseHeader(line),
            (ProxyHeader("PROXY", (full, 65535), (full, 65535)), b""),
        )
        unknown = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
        self.assertEqual(len(unknown), 107)
        self.assertEqual(parseHeader(unknown), (ProxyHeader("PROXY", None, None), b""))

    def test_needMore(self) -> None:
        """
        Every prefix of a line, up to 106 bytes without CRLF, asks for more.
        """
        line = b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 993\r\n"
        for size in range(len(line)):
            self.assertEqual(parseHeader(line[:size]), (None, line[:size]))
        partial = b"PROXY UNKNOWN " + b"x" * 92
        self.assertEqual(len(partial), 106)
        self.assertEqual(parseHeader(partial), (None, partial))

    def test_tooLong(self) -> None:
        """
        107 bytes without a CRLF, or a CRLF only at bytes 107-108, is an error.
        """
        self.assertRaises(ProxyHeaderError, parseHeader, b"PROXY UNKNOWN " + b"x" * 93)
        self.assertRaises(
            ProxyHeaderError, parseHeader, b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
        )

    def test_malformed(self) -> None:
        """
        Bad addresses, ports, families, spacing and keywords are errors.
        """
        for line in [
            b"PROXY TCP4 256.0.0.1 192.0.2.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n",
            b"PROXY TCP4 ::1 ::2 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY TCP6 fe80::1%eth0 ::2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 +1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n",
            b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n",
            b"PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY\r\n",
            b"PROXY \r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n\r\n",
            b"PROXY TCP4 192.0.2.\xc3\xa9 192.0.2.2 1 2\r\n",
        ]:
            self.assertRaises(ProxyHeaderError, parseHeader, line)

    def test_errorQuotesClientText(self) -> None:
        """
        What the client sent appears in the error (which is logged) as the
        log quotes a client's text: a JSON string in printable ASCII, so
        that neither an escape sequence nor a quote reaches the log as it is.
        """
        error = self.assertRaises(ProxyHeaderError, parseHeader, b'PROXY TCP4 1.2.3.4\x1b[31m" 127.0.0.1 1111 143\r\n')
        self.assertEqual(str(error), 'bad address in PROXY v1 header: "1.2.3.4\\u001b[31m\\""')
        error = self.assertRaises(ProxyHeaderError, parseHeader, b"PROXY TCP\xe9 1.2.3.4 127.0.0.1 1111 143\r\n")
        self.assertEqual(str(error), 'unknown PROXY v1 protocol: "TCP\\u00e9"')

    def test_badSignature(self) -> None:
        """
        Data that does not start like a header is an error at once, not a
        request for more bytes.
        """
        for data in [b"GET / HTTP/1.0\r\n", b"PROXX", b"proxy ", b"A1 LOGIN", b"\x16\x03\x01"]:
            self.assertRaises(ProxyHeaderError, parseHeader, data)

    def test_empty(self) -> None:
        """
        No bytes yet asks for more.
        """
        self.assertEqual(parseHeader(b""), (None, b""))


class ParseV2Tests(SynchronousTestCase):
    """
    Tests for L{parseHeader} with version 2 headers.
    """

    def test_tcp4(self) -> None:
        """
        An IPv4 header gives both endpoints and the rest of the data.
        """
        self.assertEqual(
            parseHeader(V2_TCP4 + b"* OK"),
            (ProxyHeader("PROXY", ("192.0.2.1", 51234), ("198.51.100.2", 993)), b"* OK"),
        )

    def test_tcp6(self) -> None:
        """
        An IPv6 header gives both endpoints.
        """
        self.assertEqual(
            parseHeader(V2_TCP6),
            (ProxyHeader("PROXY", ("2001:db8::1", 51234), ("2001:db8::2", 143)), b""),
        )

    def test_tlvs(self) -> None:
        """
        TLVs are returned in order as (type, value), the SSL one with its
        sub-TLVs left inside.
        """
        header, rest = parseHeader(V2_TCP4_TLVS + b"\x16")
        self.assertEqual(rest, b"\x16")
        assert header is not None
        self.assertEqual(
            header.tlvs,
            (
                (0x01, b"imap"),
                (0x02, b"mail.example.com"),
                (0x05, b"\x01\x02"),
                (0x20, SSL_VALUE),
            ),
        )

    def test_local(self) -> None:
        """
        LOCAL ignores the family and address block entirely.
        """
        for block in [b"\x00\x00\x00", b"\x11\x00\x0c" + b"\xff" * 12]:
            self.assertEqual(
                parseHeader(SIGNATURE + b"\x20" + block + b"rest"),
                (ProxyHeader("LOCAL", None, None), b"rest"),
            )

    def test_unspec(self) -> None:
        """
        PROXY with an unspecified family gives no endpoints.
        """
        self.assertEqual(
            parseHeader(SIGNATURE + b"\x21\x00\x00\x04\x00\x00\x00\x00rest"),
            (ProxyHeader("PROXY", None, None), b"rest"),
        )

    def test_unix(self) -> None:
        """
        A UNIX stream header gives no endpoints but still its TLVs.
        """
        data = SIGNATURE + b"\x21\x31\x00\xdf" + b"/a".ljust(108, b"\x00") * 2
        data += b"\x04\x00\x04none"
        self.assertEqual(
            parseHeader(data),
            (ProxyHeader("PROXY", None, None, ((0x04, b"none"),)), b""),
        )

    def test_everyFragmentation(self) -> None:
        """
        Fed in any two or three pieces, with the caller keeping what is
        returned, the header is found exactly once the last byte arrives.
        """
        data = V2_TCP4_TLVS + b"A"
        expected = parseHeader(data)
        self.assertEqual(expected[1], b"A")

        size = len(data) - 1

        def feed(pieces: list[bytes]) -> tuple[ProxyHeader | None, bytes]:
            buffered = b""
            for index, piece in enumerate(pieces):
                buffered += piece
                header, buffered = parseHeader(buffered)
                received = sum(len(p) for p in pieces[: index + 1])
                self.assertEqual(header is not None, received >= size)
                if header is not None:
                    return header, buffered + b"".join(pieces[index + 1 :])
            return None, buffered

        for first in range(size + 1):
            self.assertEqual(feed([data[:first], data[first:]]), expected)
            for second in range(first, size + 1):
                self.assertEqual(
                    feed([data[:first], data[first:second], data[second:]]), expected
                )

    def test_byteByByte(self) -> None:
        """
        Every proper prefix of an IPv6 header asks for more.
        """
        for size in range(len(V2_TCP6)):
            self.assertEqual(parseHeader(V2_TCP6[:size]), (None, V2_TCP6[:size]))

    def test_badSignature(self) -> None:
        """
        A signature wrong in any byte is an error once that byte arrives.
        """
        for index in range(len(SIGNATURE)):
            broken = bytearray(V2_TCP4)
            broken[index] ^= 0x40
            self.assertRaises(ProxyHeaderError, parseHeader, bytes(broken[: index + 1]))
            self.assertRaises(ProxyHeaderError, parseHeader, bytes(broken))

    def test_badVersion(self) -> None:
        """
        Versions other than 2 are errors.
        """
        for versionCommand in [0x01, 0x11, 0x31, 0xF1]:
            self.assertRaises(
                ProxyHeaderError,
                parseHeader,
                SIGNATURE + bytes([versionCommand]) + V2_TCP4[13:],
            )

    def test_badCommand(self) -> None:
        """
        Commands other than LOCAL and PROXY are errors.
        """
        for versionCommand in [0x22, 0x2F]:
            self.assertRaises(
                ProxyHeaderError,
                parseHeader,
                SIGNATURE + bytes([versionCommand]) + V2_TCP4[13:],
            )

    def test_badFamily(self) -> None:
        """
        Datagram and undefined family/transport bytes are errors, detected
        from the fixed part alone.
        """
        for family in [0x12, 0x22, 0x32, 0x10, 0x41, 0x13]:
            self.assertRaises(
                ProxyHeaderError,
                parseHeader,
                SIGNATURE + b"\x21" + bytes([family]) + b"\x00\x0c",
            )

    def test_lengthShorterThanAddresses(self) -> None:
        """
        A length too short for the family's addresses is an error.
        """
        self.assertRaises(
            ProxyHeaderError,
            parseHeader,
            SIGNATURE + b"\x21\x11\x00\x08" + V2_TCP4[16:24],
        )
        self.assertRaises(
            ProxyHeaderError,
            parseHeader,
            SIGNATURE + b"\x21\x21\x00\x0c" + V2_TCP4[16:],
        )

    def test_tlvOverflow(self) -> None:
        """
        A TLV that runs past the header's length, or a TLV cut inside its
        type-length prefix, is an error.
        """
        self.assertRaises(
            ProxyHeaderError,
            parseHeader,
            SIGNATURE + b"\x21\x11\x00\x11" + V2_TCP4[16:] + b"\x01\x00\x05ab" + b"cdefg",
        )
        self.assertRaises(
            ProxyHeaderError,
            parseHeader,
            SIGNATURE + b"\x21\x11\x00\x0e" + V2_TCP4[16:] + b"\x01\x00",
        )


_ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
_ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1)).filter(
    lambda text: ipaddress.IPv6Address(text).ipv4_mapped is None
)
_ports = st.integers(0, 65535)


def _endpointPairs() -> st.SearchStrategy[tuple[tuple[str, int], tuple[str, int]]]:
    return st.one_of(_ipv4, _ipv6).flatmap(
        lambda first: st.tuples(
            st.tuples(st.just(first), _ports),
            st.tuples(_ipv4 if ":" not in first else _ipv6, _ports),
        )
    )


class RoundTripTests(SynchronousTestCase):
    """
    What the encoders write, the parser reads back.
    """

    @given(_endpointPairs())
    def test_v1(self, endpoints: tuple[tuple[str, int], tuple[str, int]]) -> None:
        """
        Any pair of same-family endpoints survives v1 encoding and parsing.
        """
        source, destination = endpoints
        self.assertEqual(
            parseHeader(encodeV1(source, destination) + b"x"),
            (ProxyHeader("PROXY", source, destination), b"x"),
        )

    @given(
        _endpointPairs(),
        st.none() | st.binary(max_size=20),
        st.none() | st.text(max_size=40),
        st.none() | st.binary(max_size=128),
        st.booleans(),
    )
    def test_v2(
        self,
        endpoints: tuple[tuple[str, int], tuple[str, int]],
        alpn: bytes | None,
        authority: str | None,
        uniqueId: bytes | None,
        withTLS: bool,
    ) -> None:
        """
        Any endpoints and TLVs survive v2 encoding and parsing.
        """
        source, destination = endpoints
        header, rest = parseHeader(
            encodeV2(
                source,
                destination,
                alpn=alpn,
                authority=authority,
                uniqueId=uniqueId,
                tls=TLS if withTLS else None,
            )
        )
        self.assertEqual(rest, b"")
        assert header is not None
        self.assertEqual((header.source, header.destination), (source, destination))
        expected = []
        if alpn is not None:
            expected.append((0x01, alpn))
        if authority is not None:
            expected.append((0x02, authority.encode("utf-8")))
        if uniqueId is not None:
            expected.append((0x05, uniqueId))
        if withTLS:
            expected.append((0x20, SSL_VALUE))
        self.assertEqual(header.tlvs, tuple(expected))
