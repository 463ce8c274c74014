"""
SASL mechanisms and encodings, protocol-independent.

The proxy serves PLAIN, LOGIN and CRAM-MD5 to clients (L{ServerExchange})
and logs in at backends with PLAIN (L{plainResponse}). A front end only
frames the exchange: how it writes a challenge, reads a response line and
words each outcome.

Nothing here logs or keeps a password longer than the exchange needs it.
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
    "Challenge",
    "Refused",
    "ServerExchange",
    "Step",
    "decodeBase64",
    "decodeResponse",
    "newChallenge",
    "parseDigestResponse",
    "plainResponse",
]

_HEX_DIGEST = re.compile(rb"[0-9a-fA-F]{32}\Z")


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

    @ivar mechanism: C{"PLAIN"}, C{"LOGIN"} or C{"CRAM-MD5"}.
    """

    def __init__(self, mechanism: str, challenge: bytes = b"", loginUserRequired: bool = False) -> None:
        """
        @param challenge: CRAM-MD5's challenge (see L{newChallenge}).
        @param loginUserRequired: LOGIN refuses an empty user name as
            malformed, rather than passing it on to the router.
        """
        if mechanism not in ("PLAIN", "LOGIN", "CRAM-MD5"):
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
        if self.mechanism == "PLAIN":
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
