"""
Validating OAuth 2.0 logins: a router wrapper that checks a bearer token
itself (a JWT signed by a key of a JWKS file), then logs in to the backend
as its master user on the account's behalf.

Configured as a C{[router.oauth]} sub-table of any router::

    [router.oauth]
    jwks_file = "jwks.json"      # the identity provider's keys (JWKS)
    claim = "email"              # the claim that must name the account
    issuer = "https://id.example.org"   # optional: the required "iss"
    audience = "mail"                   # optional: the required "aud"

A token login (OAUTHBEARER, XOAUTH2) is refused unless the token's
signature verifies with the key its header names (C{kid}), with that
key's algorithm only, it has not expired (C{exp} is required; C{nbf} and
C{iat} are honoured), and C{claim} equals the user the client named (in
any case); then the wrapped router locates the account and the route is
turned into a master-user login (the backend needs C{master_user}).
Other logins go to the wrapped router untouched.

The checks run on the reactor: one signature verification per login, no
I/O (the keys are read at start and at reload of the configuration).
Neither the token nor any part of it is logged; the log says why a token
was refused in PyJWT's words, which never quote it.
"""

from __future__ import annotations

from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from mailproxy._safetext import logQuote
from mailproxy.config import Table
from mailproxy.interfaces import IRouter
from mailproxy.model import Rejection, Route, RouteRequest

__all__ = ["TokenValidatingRouter", "buildTokenValidation"]


@implementer(IRouter)
class TokenValidatingRouter:
    """
    Checks OAuth tokens against a JWKS, then asks C{router} where the
    account lives and logs in as the backend's master user.

    @ivar router: the wrapped router.
    @ivar claim: the token claim that must name the account.
    """

    log = Logger()

    def __init__(
        self, router: Any, keys: Any, claim: str = "email", issuer: str | None = None, audience: str | None = None
    ) -> None:
        """
        @param keys: a C{jwt.PyJWKSet}.
        """
        self.router = router
        self.claim = claim
        self._keys = {key.key_id: key for key in keys.keys}
        self._issuer = issuer
        self._audience = audience

    def route(self, request: RouteRequest) -> Deferred[Route | Rejection]:
        """
        Validate a token login, else pass the request on.
        """
        credentials = request.credentials
        if credentials is None or credentials.token is None:
            return maybeDeferred(self.router.route, request)
        why = self._check(credentials.token, credentials.user)
        if why is not None:
            self.log.info(
                "OAuth token for {user} refused: {why}", user=logQuote(credentials.user), why=logQuote(why)
            )
            return maybeDeferred(Rejection)
        d = maybeDeferred(self.router.route, request)
        d.addCallback(self._asMaster)
        return d

    def _check(self, token: bytes, user: str) -> str | None:
        """
        Why C{token} does not log C{user} in, or L{None} if it does.
        """
        import jwt

        try:
            header = jwt.get_unverified_header(token)
            key = self._keys.get(header.get("kid"))
            if key is None and header.get("kid") is None and len(self._keys) == 1:
                key = next(iter(self._keys.values()))
            if key is None:
                return "no key for its kid"
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                issuer=self._issuer,
                audience=self._audience,
                options={"require": ["exp"], "verify_aud": self._audience is not None},
            )
        except jwt.PyJWTError as e:
            return type(e).__name__ + ": " + str(e)
        named = claims.get(self.claim)
        if not isinstance(named, str) or named.casefold() != user.casefold():
            return f"its {self.claim} claim is not the account"
        return None

    def _asMaster(self, answer: Route | Rejection) -> Route | Rejection:
        if isinstance(answer, Route):
            return evolve(answer, password=None, useMaster=True, authenticated=True)
        return answer


def buildTokenValidation(options: Table, router: Any) -> TokenValidatingRouter:
    """
    Wrap C{router} in the token validation its C{oauth} sub-table
    describes.

    @raise mailproxy.config.ConfigError: naming the key that is wrong.
    """
    options.allow("jwks_file", "claim", "issuer", "audience")
    import jwt

    path = options.path("jwks_file")
    try:
        with open(path, "rb") as f:
            keys = jwt.PyJWKSet.from_json(f.read().decode("utf-8"))
    except (OSError, ValueError, jwt.PyJWTError) as e:
        options.fail("jwks_file", f"not a usable JWKS: {e}")
    return TokenValidatingRouter(
        router,
        keys,
        claim=options.string("claim", "email"),
        issuer=options.string("issuer", None),
        audience=options.string("audience", None),
    )
