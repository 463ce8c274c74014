"""
The PROXY protocol, versions 1 and 2 (haproxy's doc/proxy-protocol.txt).

L{encodeV1} and L{encodeV2} build the header the proxy sends to a backend as
the first bytes of a TCP connection, below any TLS.  L{parseHeader} reads one
from a load balancer in front of the proxy; it is pure, so the caller buffers
bytes and calls it again until it returns a header, whatever the reads'
sizes.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Literal

from attrs import frozen

from mailproxy._safetext import logQuote
from mailproxy.model import TLSInfo

__all__ = [
    "encodeV1",
    "encodeV2",
    "ProxyHeader",
    "ProxyHeaderError",
    "parseHeader",
]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107

_V2_FIXED = struct.Struct("!12sBBH")

_COMMAND_LOCAL = 0x0
_COMMAND_PROXY = 0x1

# family << 4 | transport; STREAM is 1.
_TCP4 = 0x11
_TCP6 = 0x21
_UNIX_STREAM = 0x31
_UNSPEC = 0x00
_ADDRESS_LENGTHS = {_TCP4: 12, _TCP6: 36, _UNIX_STREAM: 216, _UNSPEC: 0}

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL = 0x01

_UNIQUE_ID_MAX = 128

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parseAddress(host: str) -> _Address:
    """
    Parse an IP address as Twisted reports it, folding IPv4-mapped IPv6
    addresses to IPv4.

    @raise ValueError: if C{host} is not an IP address.
    """
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _addressText(address: _Address) -> str:
    """
    An address in RFC 5952 form, IPv4-mapped IPv6 with its dotted tail (as
    C{inet_ntop} writes it, whatever this Python's C{str} does).
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def _checkPort(port: int) -> int:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    return port


def _endpoints(
    source: tuple[str, int], destination: tuple[str, int]
) -> tuple[_Address, int, _Address, int]:
    """
    Both addresses in one family: IPv6 (IPv4-mapped) if either is IPv6.
    """
    sourceAddress = _parseAddress(source[0])
    destinationAddress = _parseAddress(destination[0])
    if sourceAddress.version != destinationAddress.version:
        if isinstance(sourceAddress, ipaddress.IPv4Address):
            sourceAddress = ipaddress.IPv6Address(f"::ffff:{sourceAddress}")
        if isinstance(destinationAddress, ipaddress.IPv4Address):
            destinationAddress = ipaddress.IPv6Address(f"::ffff:{destinationAddress}")
    return (
        sourceAddress,
        _checkPort(source[1]),
        destinationAddress,
        _checkPort(destination[1]),
    )


def encodeV1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """
    A version 1 (text) header for a TCP connection.

    @param source: the client's address and port.
    @param destination: the address and port the client connected to.
    @return: e.g. C{b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 993\\r\\n"}.
    @raise ValueError: if an address is not an IP address or a port is out
        of range.
    """
    sourceAddress, sourcePort, destinationAddress, destinationPort = _endpoints(
        source, destination
    )
    family = "TCP4" if sourceAddress.version == 4 else "TCP6"
    line = (
        f"PROXY {family} {_addressText(sourceAddress)} {_addressText(destinationAddress)}"
        f" {sourcePort} {destinationPort}\r\n"
    )
    return line.encode("ascii")


def _tlv(kind: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"TLV 0x{kind:02x} too long: {len(value)} bytes")
    return struct.pack("!BH", kind, len(value)) + value


def _sslTLV(tls: TLSInfo) -> bytes:
    # verify is non-zero: no client certificate was presented, let alone
    # verified, and no CERT_* flag is set.
    value = struct.pack("!BI", PP2_CLIENT_SSL, 1)
    value += _tlv(PP2_SUBTYPE_SSL_VERSION, tls.version.encode("ascii"))
    value += _tlv(PP2_SUBTYPE_SSL_CIPHER, tls.cipher.encode("ascii"))
    return _tlv(PP2_TYPE_SSL, value)


def encodeV2(
    source: tuple[str, int],
    destination: tuple[str, int],
    *,
    authority: str | None = None,
    alpn: bytes | None = None,
    tls: TLSInfo | None = None,
    uniqueId: bytes | None = None,
) -> bytes:
    """
    A version 2 (binary) PROXY header for a TCP connection.

    @param source: the client's address and port.
    @param destination: the address and port the client connected to.
    @param authority: the host name the client asked for (its SNI), sent
        as the AUTHORITY TLV.
    @param alpn: the application protocol negotiated with the client.
    @param tls: the client's TLS connection, sent as the SSL TLV with its
        VERSION and CIPHER.
    @param uniqueId: an opaque connection id of at most 128 bytes.
    @raise ValueError: if an address is not an IP address, a port is out of
        range, C{uniqueId} is too long or the header would exceed 64 KiB.
    """
    sourceAddress, sourcePort, destinationAddress, destinationPort = _endpoints(
        source, destination
    )
    family = _TCP4 if sourceAddress.version == 4 else _TCP6
    body = (
        sourceAddress.packed
        + destinationAddress.packed
        + struct.pack("!HH", sourcePort, destinationPort)
    )
    if alpn is not None:
        body += _tlv(PP2_TYPE_ALPN, alpn)
    if authority is not None:
        body += _tlv(PP2_TYPE_AUTHORITY, authority.encode("utf-8"))
    if uniqueId is not None:
        if len(uniqueId) > _UNIQUE_ID_MAX:
            raise ValueError(f"unique id longer than {_UNIQUE_ID_MAX} bytes")
        body += _tlv(PP2_TYPE_UNIQUE_ID, uniqueId)
    if tls is not None:
        body += _sslTLV(tls)
    if len(body) > 0xFFFF:
        raise ValueError(f"PROXY header too long: {len(body)} bytes")
    return _V2_FIXED.pack(V2_SIGNATURE, 0x20 | _COMMAND_PROXY, family, len(body)) + body


@frozen
class ProxyHeader:
    """
    A PROXY header as received.

    @ivar command: C{"PROXY"} for a relayed connection, C{"LOCAL"} for one
        the balancer made itself (a health check).
    @ivar source: the client's address and port; L{None} for LOCAL, v1
        UNKNOWN, v2 UNSPEC and UNIX sockets: use the real peer then.
    @ivar destination: the address and port the client connected to, or
        L{None} as for C{source}.
    @ivar tlvs: version 2 type-length-value extensions in the order received,
        as (type, value); sub-TLVs of SSL (0x20) are left in its value.
    """

    command: Literal["PROXY", "LOCAL"]
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


class ProxyHeaderError(Exception):
    """
    The bytes received are not a valid PROXY header.
    """


def parseHeader(data: bytes) -> tuple[ProxyHeader | None, bytes]:
    """
    Parse a PROXY header (version 1 or 2) at the start of C{data}.

    @param data: every byte received so far on the connection.
    @return: the header and the bytes after it, or C{(None, data)} if more
        bytes are needed.
    @raise ProxyHeaderError: if C{data} cannot start a valid header.
    """
    if not data:
        return None, data
    if data[0:1] == V2_SIGNATURE[0:1]:
        return _parseV2(data)
    if data[0:1] == V1_PREFIX[0:1]:
        return _parseV1(data)
    raise ProxyHeaderError("no PROXY protocol signature")


def _quoted(text: bytes) -> str:
    # What a client sent, as every log line quotes it (a JSON string in
    # printable ASCII); the bytes as Latin-1, one character each.
    return logQuote(text.decode("latin-1"))


def _parseV1Address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"bad address in PROXY v1 header: {_quoted(text)}") from None
    if getattr(address, "scope_id", None):
        raise ProxyHeaderError(f"scoped address in PROXY v1 header: {_quoted(text)}")
    if address.version != version:
        raise ProxyHeaderError(f"wrong address family in PROXY v1 header: {_quoted(text)}")
    return _addressText(address)


def _parseV1Port(text: bytes) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0:1] == b"0"):
        raise ProxyHeaderError(f"bad port in PROXY v1 header: {_quoted(text)}")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyHeaderError(f"port out of range in PROXY v1 header: {_quoted(text)}")
    return port


def _parseV1(data: bytes) -> tuple[ProxyHeader | None, bytes]:
    if not data.startswith(V1_PREFIX):
        if V1_PREFIX.startswith(data):
            return None, data
        raise ProxyHeaderError("no PROXY protocol signature")
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError("PROXY v1 header longer than 107 bytes")
        return None, data
    line, rest = data[:end], data[end + 2 :]
    fields = line.split(b" ")
    if len(fields) < 2:
        raise ProxyHeaderError("PROXY v1 header without a protocol")
    if fields[1] == b"UNKNOWN":
        # The rest of an UNKNOWN line is to be ignored, whatever it holds.
        return ProxyHeader("PROXY", None, None), rest
    if fields[1] == b"TCP4":
        version = 4
    elif fields[1] == b"TCP6":
        version = 6
    else:
        raise ProxyHeaderError(f"unknown PROXY v1 protocol: {_quoted(fields[1])}")
    if len(fields) != 6:
        raise ProxyHeaderError("PROXY v1 header needs exactly four fields after the protocol")
    source = (_parseV1Address(fields[2], version), _parseV1Port(fields[4]))
    destination = (_parseV1Address(fields[3], version), _parseV1Port(fields[5]))
    return ProxyHeader("PROXY", source, destination), rest


def _parseTLVs(block: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    offset = 0
    while offset < len(block):
        if offset + 3 > len(block):
            raise ProxyHeaderError("truncated TLV in PROXY v2 header")
        kind, length = struct.unpack_from("!BH", block, offset)
        offset += 3
        if offset + length > len(block):
            raise ProxyHeaderError(
                f"TLV 0x{kind:02x} overflows the PROXY v2 header's length"
            )
        tlvs.append((kind, block[offset : offset + length]))
        offset += length
    return tuple(tlvs)


def _parseV2(data: bytes) -> tuple[ProxyHeader | None, bytes]:
    if len(data) < _V2_FIXED.size:
        if V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]):
            return None, data
        raise ProxyHeaderError("no PROXY protocol signature")
    signature, versionCommand, family, length = _V2_FIXED.unpack_from(data)
    if signature != V2_SIGNATURE:
        raise ProxyHeaderError("no PROXY protocol signature")
    if versionCommand >> 4 != 2:
        raise ProxyHeaderError(f"unknown PROXY protocol version {versionCommand >> 4}")
    command = versionCommand & 0x0F
    if command not in (_COMMAND_LOCAL, _COMMAND_PROXY):
        raise ProxyHeaderError(f"unknown PROXY v2 command {command}")
    if family not in _ADDRESS_LENGTHS:
        raise ProxyHeaderError(f"unsupported PROXY v2 family/transport 0x{family:02x}")
    end = _V2_FIXED.size + length
    if len(data) < end:
        return None, data
    block, rest = data[_V2_FIXED.size : end], data[end:]

    if command == _COMMAND_LOCAL:
        # The balancer's own connection: its addresses and TLVs mean nothing.
        return ProxyHeader("LOCAL", None, None), rest
    if family == _UNSPEC:
        return ProxyHeader("PROXY", None, None), rest
    addressLength = _ADDRESS_LENGTHS[family]
    if addressLength > length:
        raise ProxyHeaderError(
            f"PROXY v2 length {length} is shorter than its addresses ({addressLength})"
        )
    tlvs = _parseTLVs(block[addressLength:])
    if family == _UNIX_STREAM:
        return ProxyHeader("PROXY", None, None, tlvs), rest

    size = 4 if family == _TCP4 else 16
    sourceAddress = ipaddress.ip_address(block[:size])
    destinationAddress = ipaddress.ip_address(block[size : 2 * size])
    sourcePort, destinationPort = struct.unpack_from("!HH", block, 2 * size)
    return (
        ProxyHeader(
            "PROXY",
            (_addressText(sourceAddress), sourcePort),
            (_addressText(destinationAddress), destinationPort),
            tlvs,
        ),
        rest,
    )
