"""
The contracts between mailproxy's parts.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Interface


class IRouter(Interface):
    """
    Decides which backend serves a login.

    Two styles are natural: a router that I{authenticates} (checks the
    password itself, e.g. with C{request.credentials.check(secret)}, and
    answers L{mailproxy.model.Rejection} when it is wrong) and one that only
    I{locates} the account and lets the backend judge the password.
    """

    def route(request: Any) -> Any:
        """
        Answer a L{mailproxy.model.RouteRequest}.

        @return: a L{mailproxy.model.Route} or L{mailproxy.model.Rejection},
            or a L{twisted.internet.defer.Deferred} or coroutine that gives
            one. An exception counts as a temporary failure.
        """


class IReloadable(Interface):
    """
    A router (or other part) whose data can be re-read without a restart.
    """

    def reload() -> None:
        """
        Re-read the data; on error keep the last good data and log why.
        """
