"""
SASL mechanisms and encodings, protocol-independent.

The proxy serves PLAIN, LOGIN, CRAM-MD5 and the OAuth 2.0 mechanisms
OAUTHBEARER (RFC 7628) and XOAUTH2 (Google's) to clients
(L{ServerExchange}), and logs in at backends with PLAIN
(L{plainResponse}) or with the client's OAuth mechanism and token
(L{oauthResponse}). A front end only frames the exchange: how it writes a
challenge, reads a response line and words each outcome.

Nothing here logs or keeps a password or a token longer than the exchange
needs it, nor puts one in an exception's text.
"""

from __future__ import annotations

import binascii
import os
import re
from base64 import b64decode, b64encode
from typing import Literal, Union

from attrs import frozen

from .model import Credentials

__all__ = [
    "OAUTH_INVALID_TOKEN",
    "OAUTH_MECHANISMS",
    "Challenge",
    "Refused",
    "ServerExchange",
    "Step",
    "decodeBase64",
    "decodeResponse",
    "newChallenge",
    "oauthErrorAck",
    "oauthResponse",
    "parseDigestResponse",
    "parseOAuthResponse",
    "plainResponse",
]

_HEX_DIGEST = re.compile(rb"[0-9a-fA-F]{32}\Z")

OAUTH_MECHANISMS = ("OAUTHBEARER", "XOAUTH2")
"""
The OAuth 2.0 bearer token mechanisms, in the order they are offered.
"""

#: RFC 6750's b64token, the form of a bearer token.
_BEARER_TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*\Z")
#: RFC 7628 key names.
_OAUTH_KEY = re.compile(rb"[A-Za-z]+\Z")
#: What separates the key/value pairs of OAUTHBEARER and XOAUTH2.
_KVSEP = b"\x01"


def decodeBase64(data: bytes) -> bytes | None:
    """
    Strict base64, or L{None} if C{data} is not.
    """
    try:
        return b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def decodeResponse(data: bytes) -> bytes | None:
    """
    A client's base64 response, where a lone C{=} stands for an empty one;
    L{None} if it is not base64.
    """
    if data == b"=":
        return b""
    return decodeBase64(data)


def newChallenge(seconds: float, hostname: str) -> bytes:
    """
    A challenge no other exchange uses, in the msg-id form
    C{<random.time@hostname>} that CRAM-MD5 (RFC 2195) and APOP (RFC 1939)
    ask for.

    @param seconds: the time now.
    """
    return b"<%s.%d@%s>" % (os.urandom(12).hex().encode("ascii"), int(seconds), hostname.encode("idna"))


def parseDigestResponse(response: bytes) -> tuple[bytes, bytes] | None:
    """
    Split C{user digest}, as CRAM-MD5 and APOP send it.

    @return: the user and the hex digest (lower-cased), or L{None} if the
        response is not of that form.
    """
    user, _, digest = response.rpartition(b" ")
    if not user or not _HEX_DIGEST.match(digest):
        return None
    return user, digest.lower()


def _oauthPairs(data: bytes) -> dict[bytes, bytes] | None:
    """
    The key/value pairs of C{key=value^A...^A^A} (RFC 7628 section 3.1),
    or L{None} if C{data} is not of that form or repeats a key.
    """
    if not data.endswith(_KVSEP + _KVSEP):
        return None
    pairs: dict[bytes, bytes] = {}
    for item in data[:-2].split(_KVSEP):
        key, equals, value = item.partition(b"=")
        if not equals or not _OAUTH_KEY.match(key) or key in pairs:
            return None
        pairs[key] = value
    return pairs


def _bearerToken(pairs: dict[bytes, bytes]) -> bytes | None:
    """
    The token of C{auth=Bearer <token>} (the scheme in any case), or
    L{None}.
    """
    scheme, space, token = pairs.get(b"auth", b"").partition(b" ")
    if not space or scheme.lower() != b"bearer" or not _BEARER_TOKEN.match(token):
        return None
    return token


def _saslName(value: bytes) -> bytes | None:
    """
    A GS2 C{saslname} unescaped (C{=2C} is a comma, C{=3D} an equals
    sign), or L{None} if it has another C{=} or a bare comma.
    """
    if b"," in value:
        return None
    if value.replace(b"=2C", b"").replace(b"=3D", b"").count(b"=") != 0:
        return None
    return value.replace(b"=2C", b",").replace(b"=3D", b"=")


def parseOAuthResponse(mechanism: str, response: bytes) -> tuple[bytes, bytes] | None:
    """
    Read a client's OAUTHBEARER (RFC 7628) or XOAUTH2 message.

    OAUTHBEARER: a GS2 header without channel binding (C{n,} or C{y,}; a
    client that asks for it, C{p=}, is refused), the authorization
    identity C{a=} in it, then C{auth=Bearer <token>} and any other pairs
    (C{host}, C{port}), each ended by C{^A}, and a final C{^A}. XOAUTH2:
    C{user=<user>^Aauth=Bearer <token>^A^A}.

    @return: the user the client names and its token, or L{None} if the
        message is not of the mechanism's form or names no user (the
        proxy routes by that user).
    """
    if mechanism == "XOAUTH2":
        pairs = _oauthPairs(response)
        if pairs is None:
            return None
        user = pairs.get(b"user", b"")
    else:
        flag, comma, rest = response.partition(b",")
        if not comma or flag not in (b"n", b"y"):
            return None
        header, comma, rest = rest.partition(b",")
        if not comma or not rest.startswith(_KVSEP) or not header.startswith(b"a="):
            return None
        pairs = _oauthPairs(rest[1:])
        found = _saslName(header[2:])
        if pairs is None or found is None:
            return None
        user = found
        port = pairs.get(b"port")
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            return None
    token = _bearerToken(pairs)
    if not user or token is None:
        return None
    return user, token


def oauthResponse(mechanism: str, user: bytes, token: bytes, host: bytes = b"", port: int = 0) -> bytes:
    """
    The base64 of the message a client sends for OAUTHBEARER or XOAUTH2,
    as the proxy sends it to a backend on the client's behalf.

    @param host: OAUTHBEARER's C{host} (omitted if empty).
    @param port: OAUTHBEARER's C{port} (omitted if 0).
    """
    bearer = b"auth=Bearer " + token + _KVSEP
    if mechanism == "XOAUTH2":
        return b64encode(b"user=" + user + _KVSEP + bearer + _KVSEP)
    pairs = b""
    if host:
        pairs += b"host=" + host + _KVSEP
    if port:
        pairs += b"port=%d" % (port,) + _KVSEP
    name = user.replace(b"=", b"=3D").replace(b",", b"=2C")
    return b64encode(b"n,a=" + name + b"," + _KVSEP + pairs + bearer + _KVSEP)


def oauthErrorAck(mechanism: str) -> bytes:
    """
    What a client answers an OAuth error challenge with, base64, before
    the server's final failure: OAUTHBEARER's dummy C{^A} (RFC 7628
    section 3.2.3), XOAUTH2's empty response.
    """
    return b64encode(_KVSEP) if mechanism == "OAUTHBEARER" else b""


#: The error challenge for an OAuth login refused without one from a
#: backend (the router said no): RFC 7628 section 3.2.2's JSON.
OAUTH_INVALID_TOKEN = b'{"status":"invalid_token"}'


def plainResponse(authzid: bytes, authcid: bytes, password: bytes) -> bytes:
    """
    The base64 of a PLAIN message (RFC 4616), as a client sends it.
    """
    return b64encode(authzid + b"\x00" + authcid + b"\x00" + password)


def _text(value: bytes) -> str:
    """
    Client octets as a string that turns back into the same octets.
    """
    return value.decode("utf-8", "surrogateescape")


@frozen
class Challenge:
    """
    Send the client this challenge (before the protocol's base64 and
    framing) and give L{ServerExchange.respond} its answer.
    """

    data: bytes


@frozen
class Refused:
    """
    The exchange ended without credentials.

    @ivar mechanism: the exchange's mechanism.
    @ivar reason: C{"malformed"} (the response does not have the
        mechanism's form) or C{"authorization"} (the client asked to act as
        another user: that is decided by a backend's master-user rules,
        which a router cannot see, so it is refused rather than guessed).
    """

    mechanism: str
    reason: Literal["malformed", "authorization"]


Step = Union[Challenge, Credentials, Refused]
"""
What a L{ServerExchange} answers: a L{Challenge} to send, the
L{Credentials} to log in with, or L{Refused}.
"""


class ServerExchange:
    """
    The server side of one SASL exchange with a client.

    Call L{start} with the initial response (if the client gave one), then
    L{respond} with each decoded response to a L{Challenge}, until the
    answer is L{Credentials} or L{Refused}.

    @ivar mechanism: C{"PLAIN"}, C{"LOGIN"}, C{"CRAM-MD5"}, C{"OAUTHBEARER"}
        or C{"XOAUTH2"}.
    """

    def __init__(self, mechanism: str, challenge: bytes = b"", loginUserRequired: bool = False) -> None:
        """
        @param challenge: CRAM-MD5's challenge (see L{newChallenge}).
        @param loginUserRequired: LOGIN refuses an empty user name as
            malformed, rather than passing it on to the router.
        """
        if mechanism not in ("PLAIN", "LOGIN", "CRAM-MD5") + OAUTH_MECHANISMS:
            raise ValueError(f"unsupported mechanism: {mechanism}")
        self.mechanism = mechanism
        self._challenge = challenge
        self._loginUserRequired = loginUserRequired
        self._user: bytes | None = None

    def start(self, initial: bytes | None = None) -> Step:
        """
        Begin, with the client's decoded initial response, if any.

        CRAM-MD5 begins with the server's challenge: its callers refuse an
        initial response before they get here.
        """
        if initial is not None:
            if self.mechanism == "CRAM-MD5":
                raise ValueError("CRAM-MD5 takes no initial response")
            return self.respond(initial)
        if self.mechanism == "PLAIN" or self.mechanism in OAUTH_MECHANISMS:
            return Challenge(b"")
        if self.mechanism == "LOGIN":
            return Challenge(b"Username:")
        return Challenge(self._challenge)

    def respond(self, response: bytes) -> Step:
        """
        The client's decoded response to the latest challenge (or its
        initial response).
        """
        if self.mechanism == "PLAIN":
            return self._plain(response)
        if self.mechanism == "LOGIN":
            return self._login(response)
        if self.mechanism in OAUTH_MECHANISMS:
            return self._oauth(response)
        return self._cramMD5(response)

    def _plain(self, response: bytes) -> Step:
        parts = response.split(b"\x00")
        if len(parts) != 3 or not parts[1]:
            return Refused(self.mechanism, "malformed")
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            return Refused(self.mechanism, "authorization")
        return Credentials("PLAIN", _text(authcid), password=password)

    def _login(self, response: bytes) -> Step:
        if self._user is None:
            if self._loginUserRequired and not response:
                return Refused(self.mechanism, "malformed")
            self._user = response
            return Challenge(b"Password:")
        return Credentials("LOGIN", _text(self._user), password=response)

    def _cramMD5(self, response: bytes) -> Step:
        parsed = parseDigestResponse(response)
        if parsed is None:
            return Refused(self.mechanism, "malformed")
        user, digest = parsed
        return Credentials("CRAM-MD5", _text(user), challenge=self._challenge, response=digest)

    def _oauth(self, response: bytes) -> Step:
        parsed = parseOAuthResponse(self.mechanism, response)
        if parsed is None:
            return Refused(self.mechanism, "malformed")
        user, token = parsed
        return Credentials(self.mechanism, _text(user), token=token)
