"""
What the router tests share.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mailproxy.model import ClientInfo

#: The client of the tests' login requests.
CLIENT = ClientInfo(sessionId="s", address="192.0.2.7", port=1, localAddress="192.0.2.1", localPort=143)


def result(d: Deferred[Any]) -> Any:
    """
    The result C{d} already has (failing the test if it has none); a
    failure is raised.
    """
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "no result yet"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]
