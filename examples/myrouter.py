"""
An example router of your own: spread accounts over mail stores by a hash of
the login name, with a few accounts pinned to a store of their choosing.

Configure it with::

    [router]
    type = "python:myrouter.ShardRouter"
    shards = ["store1", "store2"]                    # backend names, in a fixed order
    pinned = { "ceo@example.org" = "store1" }        # optional

    [backend.store1]
    host = "127.0.0.1"
    ports = { imap = 1143 }

    [backend.store2]
    host = "127.0.0.1"
    ports = { imap = 2143 }

and put this directory on the module path when starting the proxy, e.g.
C{PYTHONPATH=examples twistd -n mailproxy --config shard.toml}.

mailproxy calls C{ShardRouter(backends=..., reactor=..., shards=..., pinned=...)}:
every key of C{[router]} but C{type} arrives as a keyword argument.  An
exception raised here stops the proxy at start with the message shown.

This router only I{locates} accounts: the store checks the password.  So it
cannot serve digest mechanisms (CRAM-MD5, APOP), which leave the proxy without
a password to log in with.  Adding a store reshuffles accounts; a real
deployment would pin the accounts it has not moved yet.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from zope.interface import implementer

from twisted.logger import Logger

from mailproxy.interfaces import IRouter
from mailproxy.model import Backend, Rejection, Route, RouteRequest


@implementer(IRouter)
class ShardRouter:
    """
    Sends each account to one of C{shards}, by a stable hash of its name.

    @ivar shards: the backends, in the configured order.
    @ivar pinned: backends by lower-cased login name, overriding the hash.
    """

    log = Logger()

    def __init__(
        self,
        *,
        backends: Mapping[str, Backend],
        reactor: object,
        shards: Sequence[str] | None = None,
        pinned: Mapping[str, str] | None = None,
    ) -> None:
        """
        @param backends: the configured backends, by name.
        @param reactor: unused here; a router that asks a directory over the
            network would connect with it.
        @param shards: the backend names to spread over (default: all, in
            alphabetical order).
        @param pinned: login name -> backend name exceptions.
        @raise ValueError: if a name is not a configured backend.
        """
        names = sorted(backends) if shards is None else list(shards)
        if not names:
            raise ValueError("shards: at least one backend is needed")
        pinned = dict(pinned or {})
        for name in [*names, *pinned.values()]:
            if name not in backends:
                raise ValueError(f"unknown backend {name!r}; configured: {', '.join(sorted(backends))}")
        self.shards = [backends[name] for name in names]
        self.pinned = {user.lower(): backends[name] for user, name in pinned.items()}

    def shardFor(self, user: str) -> Backend:
        """
        The store for C{user} by hash: the same in every process and on every
        restart, which Python's C{hash()} is not.
        """
        digest = hashlib.sha256(user.lower().encode("utf-8", "surrogateescape")).digest()
        return self.shards[int.from_bytes(digest[:8], "big") % len(self.shards)]

    async def pinnedBackend(self, user: str) -> Backend | None:
        """
        The store C{user} is pinned to, if any.

        A dictionary needs no waiting; a real router would C{await} a database
        or HTTP query here, which is why L{route} is a coroutine.
        """
        return self.pinned.get(user.lower())

    async def route(self, request: RouteRequest) -> Route | Rejection:
        """
        Locate the account of C{request}.
        """
        credentials = request.credentials
        if credentials is None or credentials.password is None:
            return Rejection()
        user = credentials.user
        backend = await self.pinnedBackend(user)
        rule = "pinned"
        if backend is None:
            backend = self.shardFor(user)
            rule = "shard"
        if request.port not in backend.ports:
            self.log.error(
                "{user} lives on {backend}, which has no {port} port",
                user=user,
                backend=backend.name,
                port=request.port,
            )
            return Rejection(message="Service temporarily unavailable.", temporary=True)
        return Route(backend=backend, rule=f"{rule} -> {backend.name}")
