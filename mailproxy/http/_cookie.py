"""
The routing cookie: which backend served the account of a client's last
authenticated request, signed so that a client cannot pick another.

Its value is C{v1.BACKEND.ACCOUNT.ISSUED.MAC}: the backend's and the
account's names in unpadded base64url, when it was issued (Unix seconds),
and an HMAC-SHA256 of the rest under the proxy's cookie key (base64url).
The account is in it so that an operator's move drops the sessions the
cookie routes, like the account's other sessions; it is not secret from
its own client.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

__all__ = ["COOKIE_LIFETIME", "signCookie", "readCookie"]

#: Seconds a routing cookie is honoured after it was issued. Each
#: authenticated response issues a fresh one.
COOKIE_LIFETIME = 7 * 86400


def _encode(text: str) -> bytes:
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogateescape")).rstrip(b"=")


def _decode(part: bytes) -> str:
    return base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4)).decode("utf-8", "surrogateescape")


def _mac(key: bytes, signed: bytes) -> bytes:
    return base64.urlsafe_b64encode(hmac.new(key, signed, hashlib.sha256).digest()).rstrip(b"=")


def signCookie(key: bytes, backend: str, account: str, now: float) -> bytes:
    """
    The cookie value that routes to C{backend} for C{account}, issued
    C{now}.
    """
    signed = b".".join((b"v1", _encode(backend), _encode(account), b"%d" % int(now)))
    return signed + b"." + _mac(key, signed)


def readCookie(key: bytes, value: bytes, now: float) -> tuple[str, str] | None:
    """
    The backend and account a cookie value names, or L{None} if it was not
    signed with C{key}, is malformed or is older than L{COOKIE_LIFETIME}.
    """
    signed, _, mac = value.rpartition(b".")
    if not signed or not hmac.compare_digest(_mac(key, signed), mac):
        return None
    parts = signed.split(b".")
    if len(parts) != 4 or parts[0] != b"v1" or not parts[3].isdigit():
        return None
    if not 0 <= now - int(parts[3]) <= COOKIE_LIFETIME:
        return None
    try:
        return _decode(parts[1]), _decode(parts[2])
    except (binascii.Error, ValueError):
        return None
