"""
Validating OAuth 2.0 logins: a router wrapper that checks a bearer token
itself (a JWT signed by a key of a JWKS file, or by OAuth 2.0 token
introspection, RFC 7662), then logs in to the backend as its master user
on the account's behalf.

Configured as a C{[router.oauth]} sub-table of any router::

    [router.oauth]
    jwks_file = "jwks.json"      # the identity provider's keys (JWKS)
    # or: introspection_url = "https://id.example.org/introspect"
    #     client_id = "mailproxy", client_secret_file = "introspection.secret"
    claim = "email"              # the claim that must name the account
    issuer = "https://id.example.org"   # optional (JWKS): the required "iss"
    audience = "mail"                   # optional (JWKS): the required "aud"

With introspection, the endpoint's answer for a token (C{active}, its
claims) is kept until the token's C{exp}, so a client that logs in again
and again with one token costs one request.

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

import hashlib
import hmac
import os
from typing import Any, cast

from attrs import evolve
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailproxy._safetext import logQuote
from mailproxy.config import Table
from mailproxy.interfaces import IRouter
from mailproxy.model import Rejection, Route, RouteRequest
from mailproxy.routers.http import describeRequestError

__all__ = ["IntrospectionClient", "IntrospectionError", "TokenValidatingRouter", "buildTokenValidation"]


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
        self,
        router: Any,
        keys: Any = None,
        claim: str = "email",
        issuer: str | None = None,
        audience: str | None = None,
        introspection: IntrospectionClient | None = None,
    ) -> None:
        """
        @param keys: a C{jwt.PyJWKSet}, or L{None} with C{introspection}.
        @param introspection: ask this endpoint instead of checking
            signatures.
        """
        self.router = router
        self.claim = claim
        self._keys = {key.key_id: key for key in keys.keys} if keys is not None else {}
        self._issuer = issuer
        self._audience = audience
        self._introspection = introspection

    def route(self, request: RouteRequest) -> Deferred[Route | Rejection]:
        """
        Validate a token login, else pass the request on.
        """
        credentials = request.credentials
        if credentials is None or credentials.token is None:
            return maybeDeferred(self.router.route, request)
        user, token = credentials.user, credentials.token
        d: Deferred[Any]
        if self._introspection is not None:
            d = self._introspection.claims(token)
            d.addCallback(lambda claims: self._judge(claims, user))
        else:
            d = maybeDeferred(lambda: self._check(token, user))

        def decided(outcome: tuple[str | None, str]) -> Any:
            why, account = outcome
            if why is not None:
                self.log.info("OAuth token for {user} refused: {why}", user=logQuote(user), why=logQuote(why))
                return Rejection()
            located = request
            if not user:
                # A bearer token that names no user (HTTP's Authorization:
                # Bearer): the token's claim is the account.
                located = evolve(request, credentials=evolve(credentials, user=account))
            return maybeDeferred(self.router.route, located).addCallback(self._asMaster, account)

        timeout = self._introspection.timeout if self._introspection is not None else 0.0

        def failed(reason: Failure) -> Rejection:
            # The endpoint is down or talks nonsense: try again later. Its
            # error never quotes the token (it was sent in a request body).
            self.log.error(
                "OAuth introspection for {user} failed: {error}",
                user=logQuote(user),
                error=logQuote(describeRequestError(cast(BaseException, reason.value), timeout)),
            )
            return Rejection(message="Service temporarily unavailable, try again later.", temporary=True)

        d.addCallbacks(decided, failed)
        return d  # type: ignore[return-value]

    def _judge(self, claims: dict[str, Any], user: str) -> tuple[str | None, str]:
        """
        Why an introspection answer does not log C{user} in (or L{None}),
        and the account it names.
        """
        if claims.get("active") is not True:
            return "the token is not active", ""
        return self._names(claims, user)

    def _names(self, claims: dict[str, Any], user: str) -> tuple[str | None, str]:
        # An empty user (a bearer token alone, over HTTP) takes the claim's
        # account; a named one must be it.
        named = claims.get(self.claim)
        if not isinstance(named, str) or not named or (user and named.casefold() != user.casefold()):
            return f"its {self.claim} claim is not the account", ""
        return None, named if not user else user

    def _check(self, token: bytes, user: str) -> tuple[str | None, str]:
        """
        Why C{token} does not log C{user} in (or L{None} if it does), and
        the account it names.
        """
        import jwt

        try:
            header = jwt.get_unverified_header(token)
            key = self._keys.get(header.get("kid"))
            if key is None and header.get("kid") is None and len(self._keys) == 1:
                key = next(iter(self._keys.values()))
            if key is None:
                return "no key for its kid", ""
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                issuer=self._issuer,
                audience=self._audience,
                options={"require": ["exp"], "verify_aud": self._audience is not None},
            )
        except jwt.PyJWTError as e:
            return type(e).__name__ + ": " + str(e), ""
        return self._names(claims, user)

    def _asMaster(self, answer: Route | Rejection, account: str) -> Route | Rejection:
        if isinstance(answer, Route):
            return evolve(
                answer,
                password=None,
                useMaster=True,
                authenticated=True,
                user=answer.user if answer.user is not None else account,
            )
        return answer


class IntrospectionClient:
    """
    Asks an OAuth 2.0 token introspection endpoint (RFC 7662) about tokens,
    and keeps each answer until its token's C{exp}.

    @ivar requests: requests made so far (for tests and metrics).
    """

    def __init__(
        self,
        client: Any,
        url: str,
        reactor: Any,
        clientID: str | None = None,
        clientSecret: bytes | None = None,
        timeout: float = 10.0,
        size: int = 10000,
    ) -> None:
        """
        @param client: a treq C{HTTPClient} (or L{treq.testing.StubTreq}).
        @param size: most answers kept; the oldest go first.
        """
        self._client = client
        self._url = url
        self._reactor = reactor
        self._auth = (clientID, (clientSecret or b"").decode("utf-8")) if clientID is not None else None
        self.timeout = timeout
        self._size = size
        # Keyed by a keyed hash of the token, never the token itself.
        self._hashKey = os.urandom(32)
        self._answers: dict[bytes, tuple[float, dict[str, Any]]] = {}
        self.requests = 0

    def claims(self, token: bytes) -> Deferred[dict[str, Any]]:
        """
        The endpoint's answer for C{token} (C{active} and the claims).
        """
        key = hmac.new(self._hashKey, token, hashlib.sha256).digest()
        now = self._reactor.seconds()
        kept = self._answers.get(key)
        if kept is not None:
            if kept[0] > now:
                return succeed(kept[1])
            del self._answers[key]
        self.requests += 1
        d = self._client.post(
            self._url,
            data={"token": token.decode("ascii"), "token_type_hint": "access_token"},
            auth=self._auth,
            headers={"Accept": ["application/json"]},
            allow_redirects=False,
        )

        def answered(response: Any) -> Any:
            if response.code != 200:
                raise IntrospectionError(f"HTTP {response.code}")
            return response.json()

        def kept_(claims: Any) -> dict[str, Any]:
            if not isinstance(claims, dict):
                raise IntrospectionError("the answer is not a JSON object")
            exp = claims.get("exp")
            if isinstance(exp, (int, float)) and exp <= self._reactor.seconds():
                # Expired, whatever the endpoint says.
                return dict(claims, active=False)
            if claims.get("active") is True and isinstance(exp, (int, float)):
                if len(self._answers) >= self._size:
                    del self._answers[next(iter(self._answers))]
                self._answers[key] = (float(exp), claims)
            return claims

        d.addCallback(answered)
        d.addCallback(kept_)
        return d.addTimeout(self.timeout, self._reactor)


class IntrospectionError(Exception):
    """
    The introspection endpoint gave no usable answer.
    """


def buildTokenValidation(options: Table, router: Any, reactor: Any = None) -> TokenValidatingRouter:
    """
    Wrap C{router} in the token validation its C{oauth} sub-table
    describes.

    @raise mailproxy.config.ConfigError: naming the key that is wrong.
    """
    options.allow(
        "jwks_file", "claim", "issuer", "audience", "introspection_url", "client_id", "client_secret_file", "timeout"
    )
    import jwt

    claim = options.string("claim", "email")
    if "introspection_url" in options:
        if "jwks_file" in options:
            options.fail("jwks_file", "give jwks_file or introspection_url, not both")
        from mailproxy.routers.http import _makeClient

        url = options.string("introspection_url")
        if not url.startswith(("http://", "https://")):
            options.fail("introspection_url", "must be an http:// or https:// URL")
        secret = None
        if "client_secret_file" in options:
            with open(options.path("client_secret_file"), "rb") as f:
                secret = f.read().strip()
        timeout = options.number("timeout", 10.0, positive=True)
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        client = IntrospectionClient(
            _makeClient(reactor, timeout, None, True, 4),
            url,
            reactor,
            clientID=options.string("client_id", None),
            clientSecret=secret,
            timeout=timeout,
        )
        return TokenValidatingRouter(router, claim=claim, introspection=client)
    path = options.path("jwks_file")
    try:
        with open(path, "rb") as f:
            keys = jwt.PyJWKSet.from_json(f.read().decode("utf-8"))
    except (OSError, ValueError, jwt.PyJWTError) as e:
        options.fail("jwks_file", f"not a usable JWKS: {e}")
    return TokenValidatingRouter(
        router,
        keys,
        claim=claim,
        issuer=options.string("issuer", None),
        audience=options.string("audience", None),
    )
