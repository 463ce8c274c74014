"""
Which ESMTP extensions the proxy may offer its clients.

The proxy answers the client's EHLO itself, before it knows which backend
the session will reach; afterwards the client relies on that list while it
talks to the backend. So the proxy offers an extension only if every
backend the listener can route to has it.

L{BackendExtensions} learns each backend's list: by probing (connect,
EHLO, QUIT) the first time a client needs it, and again from every
session that reaches the backend. A backend that could not be asked (it
is down, its certificate fails) is left out of the list and asked again
later: sessions cannot reach it anyway, and counting it as having no
extensions would take from clients of the healthy backends what they
need (a sending MTA bounces SMTPUTF8 mail at once where SMTPUTF8 is not
offered). While no backend at all is known there is nothing to offer:
the EHLO is refused as temporary (see L{BackendExtensions.current}).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Callable, Iterable

from attrs import field, frozen
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._safetext import logQuote
from ..model import Backend
from ._parser import Reply

#: Extensions passed on to clients when every backend has them. Anything
#: else a backend offers (AUTH, STARTTLS, XCLIENT, VRFY, ETRN, ...) is the
#: proxy's own business or none of the client's.
PASSED_ON = (
    "PIPELINING",
    "SIZE",
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    "SMTPUTF8",
    "DSN",
    "CHUNKING",
    "BINARYMIME",
)


@frozen
class Extensions:
    """
    A server's EHLO keywords.

    @ivar keywords: each upper-cased keyword with its parameters (C{""}
        when it has none), e.g. C{{"SIZE": "10240000", "PIPELINING": ""}}.
    """

    keywords: dict[str, str] = field(factory=dict, hash=False)

    @classmethod
    def fromReply(cls, reply: Reply) -> Extensions:
        """
        The extensions listed in an EHLO reply (its first line is the
        server's name).
        """
        keywords = {}
        for line in reply.lines[1:]:
            keyword, _, parameters = line.decode("ascii", "replace").strip().partition(" ")
            if keyword:
                keywords[keyword.upper()] = parameters.strip()
        return cls(keywords)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.keywords

    def parameters(self, keyword: str) -> list[str]:
        """
        The upper-cased parameters of C{keyword}, e.g. the mechanisms of
        C{AUTH}; empty if it is absent.
        """
        return self.keywords.get(keyword, "").upper().split()

    @cached_property
    def passedOn(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """
        The keywords of L{PASSED_ON} in this list, as an EHLO reply lists
        them (with their parameters), in two parts: the proxy's own
        keywords go between them, where servers usually list theirs (after
        PIPELINING, SIZE and 8BITMIME). Worked out once per list: every
        EHLO of every session answered from the same knowledge shares it.
        """
        keywords = self.keywords
        passed = tuple(
            keyword + (" " + keywords[keyword] if keywords[keyword] else "") for keyword in PASSED_ON if keyword in keywords
        )
        split = sum(1 for keyword in ("PIPELINING", "SIZE", "8BITMIME") if keyword in keywords)
        return passed[:split], passed[split:]

    @property
    def sizeLimit(self) -> int | None:
        """
        The C{SIZE} limit in octets, or L{None} if none is declared.
        """
        value = self.keywords.get("SIZE", "")
        if value.isdigit() and int(value) > 0:
            return int(value)
        return None


def common(lists: Iterable[Extensions]) -> Extensions:
    """
    The extensions of L{PASSED_ON} that every one of C{lists} has; C{SIZE}
    with the smallest declared limit. No lists at all give no extensions.
    """
    lists = list(lists)
    if not lists:
        return Extensions()
    keywords: dict[str, str] = {}
    for keyword in PASSED_ON:
        if all(keyword in extensions for extensions in lists):
            keywords[keyword] = ""
    if "SIZE" in keywords:
        limits = [e.sizeLimit for e in lists if e.sizeLimit is not None]
        keywords["SIZE"] = str(min(limits)) if limits else ""
    if "CHUNKING" not in keywords:
        keywords.pop("BINARYMIME", None)
    return Extensions(keywords)


Probe = Callable[[Backend], "Deferred[Extensions]"]


class BackendExtensions:
    """
    What the backends behind one kind of listener support.

    @ivar retryInterval: seconds before a backend that could not be probed
        is probed again.
    """

    log = Logger()

    def __init__(self, clock, backends: Iterable[Backend], probe: Probe, retryInterval: float = 60.0) -> None:
        """
        @param backends: every backend a session of this kind may reach.
        @param probe: asks one backend for its extensions.
        """
        self._clock = clock
        self._backends = list(backends)
        self._probe = probe
        self.retryInterval = retryInterval
        self._known: dict[str, Extensions] = {}
        # What every backend has, once every backend is known (see known):
        # worked out again only when what is known changes.
        self._common: Extensions | None = None
        self._xclient: dict[str, list[str]] = {}
        self._failedAt: dict[str, float] = {}
        self._probing: dict[str, Deferred[None]] = {}

    def learn(self, name: str, extensions: Extensions) -> None:
        """
        Backend C{name} just listed C{extensions} (in a session's dialogue).
        """
        if self._known.get(name) != extensions:
            self._known[name] = extensions
            self._common = None
        self._failedAt.pop(name, None)

    def learnXCLIENT(self, name: str, attributes: list[str] | None) -> None:
        """
        Backend C{name} offered the proxy XCLIENT with C{attributes} before
        any XCLIENT (L{None}: it refused an XCLIENT sent without asking).
        """
        if attributes is None:
            self._xclient.pop(name, None)
        else:
            self._xclient[name] = attributes

    def xclientOf(self, name: str) -> list[str] | None:
        """
        The XCLIENT attributes backend C{name} last offered the proxy, if
        it offered XCLIENT.
        """
        return self._xclient.get(name)

    def extensionsOf(self, name: str) -> Extensions | None:
        """
        What backend C{name} was last seen to offer, if anything.
        """
        return self._known.get(name)

    def known(self) -> Extensions | None:
        """
        The common extensions if every backend is known, else L{None}.
        """
        if self._common is None:
            if any(backend.name not in self._known for backend in self._backends):
                return None
            self._common = common(self._known[backend.name] for backend in self._backends)
        return self._common

    def current(self) -> Deferred[Extensions | None]:
        """
        The extensions every backend has, probing backends not yet known
        (unless one failed recently) and waiting for probes under way.
        A backend still unknown afterwards is left out; if none is known,
        the answer is L{None} (unless the listener has no backends at all:
        then it is empty).
        """
        now = self._clock.seconds()
        waits = []
        for backend in self._backends:
            name = backend.name
            if name in self._known:
                continue
            probing = self._probing.get(name)
            if probing is None:
                failed = self._failedAt.get(name)
                if failed is not None and now - failed < self.retryInterval:
                    continue
                probing = self._startProbe(backend)
                if not probing.called:
                    self._probing[name] = probing
            waits.append(probing)
        if not waits:
            return succeed(self._answer())
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: self._answer())

    def _answer(self) -> Extensions | None:
        known = self.known()
        if known is not None:
            return known
        # Only the backends that answered: an unknown one is unreachable for
        # sessions too, and must not shrink what the others offer.
        answered = [self._known[backend.name] for backend in self._backends if backend.name in self._known]
        return common(answered) if answered else None

    def _startProbe(self, backend: Backend) -> Deferred[None]:
        def probed(extensions: Extensions) -> None:
            self.learn(backend.name, extensions)

        def failed(reason: Failure) -> None:
            self._failedAt[backend.name] = self._clock.seconds()
            self.log.warn(
                "cannot learn the ESMTP extensions of backend {backend}: {why}; offering clients what the others have until it answers",
                backend=backend.name,
                why=logQuote(reason.getErrorMessage()),
            )

        def done(result: object) -> None:
            self._probing.pop(backend.name, None)

        d: Deferred[Any] = self._probe(backend)
        d.addCallbacks(probed, failed)
        d.addBoth(done)
        return d
