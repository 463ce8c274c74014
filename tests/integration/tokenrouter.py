"""
A Python router for the HTTP integration tests: it places a bearer token's
account by the token's C{sub} claim, read without checking the signature
(the backend checks the token), and a password login by its user name.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Mapping

from zope.interface import implementer

from mailproxy.interfaces import IRouter
from mailproxy.model import Backend, Rejection, Route, RouteRequest


@implementer(IRouter)
class TokenRouter:
    """
    Routes each account to the backend C{homes} names for it.
    """

    def __init__(self, *, backends: Mapping[str, Backend], reactor: object, homes: Mapping[str, str]) -> None:
        """
        @param homes: account to backend name.
        """
        self.backends = backends
        self.homes = dict(homes)

    def route(self, request: RouteRequest) -> Route | Rejection:
        """
        The home of the token's C{sub}, or of the login name.
        """
        credentials = request.credentials
        if credentials is None:
            return Rejection()
        account = credentials.user
        if credentials.token is not None:
            account = _subject(credentials.token) or ""
        home = self.homes.get(account.lower())
        if home is None:
            return Rejection(unknown=True)
        return Route(self.backends[home], user=account, rule=f"sub {account} -> {home}")


def _subject(token: bytes) -> str | None:
    """
    The C{sub} claim of a JWT, unverified; L{None} if it has none.
    """
    try:
        payload = token.split(b".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return None
    subject = claims.get("sub") if isinstance(claims, dict) else None
    return subject if isinstance(subject, str) else None
