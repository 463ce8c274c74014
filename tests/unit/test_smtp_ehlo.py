"""
Which ESMTP extensions the proxy offers: parsing a server's EHLO reply,
the intersection over backends, and learning it by probing.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._session import ProxyContext
from mailproxy.config import Limits
from mailproxy.model import Backend
from mailproxy.smtp import _ehlo
from mailproxy.smtp._ehlo import BackendExtensions, Extensions, common
from mailproxy.smtp._base import backendExtensions
from mailproxy.testing import FakeRouter, MemoryConnector
from mailproxy.smtp._parser import ReplyReader

POSTFIX_EHLO = (
    b"250-old.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n"
    b"250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n"
    b"250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n"
    b"250-SMTPUTF8\r\n250 CHUNKING\r\n"
)


def parse(data: bytes) -> Extensions:
    """
    The extensions of an EHLO reply.
    """
    reader = ReplyReader()
    reader.feed(data)
    reply = reader.next()
    assert reply is not None
    return Extensions.fromReply(reply)


class ExtensionsTests(SynchronousTestCase):
    """
    L{Extensions} from a server's EHLO reply.
    """

    def test_fromReply(self) -> None:
        """
        Every keyword after the first line, upper-cased, with parameters.
        """
        extensions = parse(POSTFIX_EHLO)
        self.assertIn("XCLIENT", extensions)
        self.assertNotIn("old.test", extensions.keywords)
        self.assertEqual(extensions.parameters("AUTH"), ["PLAIN", "LOGIN"])
        self.assertEqual(extensions.parameters("STARTTLS"), [])
        self.assertEqual(extensions.sizeLimit, 10240000)

    def test_sizeWithoutLimit(self) -> None:
        """
        C{SIZE} alone or C{SIZE 0} declares no limit.
        """
        self.assertIsNone(Extensions({"SIZE": ""}).sizeLimit)
        self.assertIsNone(Extensions({"SIZE": "0"}).sizeLimit)
        self.assertIsNone(Extensions().sizeLimit)


class CommonTests(SynchronousTestCase):
    """
    L{common}: what every backend has.
    """

    def test_intersection(self) -> None:
        """
        Only passed-on keywords every list has; SIZE the smallest limit;
        never AUTH, XCLIENT, VRFY or STARTTLS.
        """
        one = parse(POSTFIX_EHLO)
        other = Extensions({"PIPELINING": "", "SIZE": "5000", "8BITMIME": "", "STARTTLS": "", "XCLIENT": "ADDR"})
        self.assertEqual(common([one, other]).keywords, {"PIPELINING": "", "SIZE": "5000", "8BITMIME": ""})

    def test_sizeUndeclared(self) -> None:
        """
        SIZE is offered without a number when no backend declares a limit,
        and with the one declared limit otherwise.
        """
        self.assertEqual(common([Extensions({"SIZE": ""}), Extensions({"SIZE": "0"})]).keywords, {"SIZE": ""})
        self.assertEqual(common([Extensions({"SIZE": ""}), Extensions({"SIZE": "7"})]).keywords, {"SIZE": "7"})

    def test_binarymimeNeedsChunking(self) -> None:
        """
        BINARYMIME is only offered with CHUNKING.
        """
        self.assertEqual(common([Extensions({"BINARYMIME": ""})]).keywords, {})
        self.assertEqual(
            common([Extensions({"BINARYMIME": "", "CHUNKING": ""})]).keywords, {"CHUNKING": "", "BINARYMIME": ""}
        )

    def test_none(self) -> None:
        """
        No backends at all: nothing is offered.
        """
        self.assertEqual(common([]).keywords, {})


class BackendExtensionsTests(SynchronousTestCase):
    """
    L{BackendExtensions} learns the backends' extensions.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.backends = [Backend("old", "192.0.2.1", {"smtp": 587}), Backend("new", "192.0.2.2", {"smtp": 587})]
        self.probes: dict[str, list[Deferred[Extensions]]] = {"old": [], "new": []}

        def probe(backend: Backend) -> Deferred[Extensions]:
            d: Deferred[Extensions] = Deferred()
            self.probes[backend.name].append(d)
            return d

        self.knowledge = BackendExtensions(self.clock, self.backends, probe, retryInterval=60)

    def result(self, d: Deferred[Extensions | None]) -> Extensions:
        """
        The result C{d} has now, which is not L{None}.
        """
        result = self.successResultOf(d)
        assert result is not None
        return result

    def test_probesOnceAndShares(self) -> None:
        """
        The first question probes every backend; a second one meanwhile
        waits for the same probes; both get the common extensions.
        """
        first = self.knowledge.current()
        second = self.knowledge.current()
        self.assertEqual([len(p) for p in self.probes.values()], [1, 1])
        self.assertNoResult(first)
        self.probes["old"][0].callback(Extensions({"PIPELINING": "", "DSN": ""}))
        self.assertNoResult(first)
        self.probes["new"][0].callback(Extensions({"PIPELINING": ""}))
        self.assertEqual(self.result(first).keywords, {"PIPELINING": ""})
        self.assertEqual(self.result(second).keywords, {"PIPELINING": ""})
        self.assertEqual(self.result(self.knowledge.current()).keywords, {"PIPELINING": ""})
        self.assertEqual([len(p) for p in self.probes.values()], [1, 1])

    def test_failedProbe(self) -> None:
        """
        A backend that cannot be probed is left out: the answer is what
        the backends that answered have (SMTPUTF8 stays offered for their
        mail), and it is probed again only after the retry interval; once
        it answers, it counts.
        """
        d = self.knowledge.current()
        self.probes["old"][0].callback(Extensions({"PIPELINING": "", "SMTPUTF8": ""}))
        self.probes["new"][0].errback(RuntimeError("refused"))
        self.assertEqual(self.result(d).keywords, {"PIPELINING": "", "SMTPUTF8": ""})
        self.flushLoggedErrors()
        self.assertEqual(self.result(self.knowledge.current()).keywords, {"PIPELINING": "", "SMTPUTF8": ""})
        self.assertEqual(len(self.probes["new"]), 1)
        self.clock.advance(60)
        d = self.knowledge.current()
        self.assertEqual(len(self.probes["new"]), 2)
        self.probes["new"][1].callback(Extensions({"PIPELINING": ""}))
        self.assertEqual(self.result(d).keywords, {"PIPELINING": ""})

    def test_noneKnown(self) -> None:
        """
        While no backend could be probed, the answer is L{None}: nothing
        is known to offer.
        """
        d = self.knowledge.current()
        self.probes["old"][0].errback(RuntimeError("refused"))
        self.probes["new"][0].errback(RuntimeError("refused"))
        self.assertIsNone(self.successResultOf(d))
        self.flushLoggedErrors()
        self.assertIsNone(self.successResultOf(self.knowledge.current()))

    def test_learnFromSessions(self) -> None:
        """
        What a session's dialogue saw replaces what was known; with every
        backend known, nothing is probed.
        """
        self.knowledge.learn("old", Extensions({"PIPELINING": "", "CHUNKING": ""}))
        self.knowledge.learn("new", Extensions({"PIPELINING": "", "CHUNKING": ""}))
        self.assertEqual(self.result(self.knowledge.current()).keywords, {"PIPELINING": "", "CHUNKING": ""})
        self.knowledge.learn("new", Extensions({"PIPELINING": ""}))
        self.assertEqual(self.result(self.knowledge.current()).keywords, {"PIPELINING": ""})
        self.assertEqual([len(p) for p in self.probes.values()], [0, 0])

    def test_commonWorkedOutOnce(self) -> None:
        """
        While what is known does not change (a session's dialogue seeing
        the same keywords again), the common extensions are worked out
        once, not once per EHLO; a change works them out again.
        """
        counted: list[object] = []

        def counting(lists: object) -> Extensions:
            counted.append(lists)
            return common(lists)  # type: ignore[arg-type]

        self.patch(_ehlo, "common", counting)
        self.knowledge.learn("old", Extensions({"PIPELINING": "", "DSN": ""}))
        self.knowledge.learn("new", Extensions({"PIPELINING": ""}))
        for _ in range(3):
            self.assertEqual(self.knowledge.known(), Extensions({"PIPELINING": ""}))
            self.assertEqual(self.result(self.knowledge.current()).keywords, {"PIPELINING": ""})
        self.knowledge.learn("new", Extensions({"PIPELINING": ""}))
        self.assertEqual(self.knowledge.known(), Extensions({"PIPELINING": ""}))
        self.assertEqual(len(counted), 1)
        self.knowledge.learn("new", Extensions({"PIPELINING": "", "DSN": ""}))
        self.assertEqual(self.knowledge.known(), Extensions({"PIPELINING": "", "DSN": ""}))
        self.assertEqual(len(counted), 2)

    def test_synchronousProbe(self) -> None:
        """
        A probe that answers at once (or fails at once) is fine.
        """
        knowledge = BackendExtensions(self.clock, self.backends[:1], lambda b: succeed(Extensions({"DSN": ""})))
        self.assertEqual(self.result(knowledge.current()).keywords, {"DSN": ""})
        failing = BackendExtensions(self.clock, self.backends[:1], lambda b: fail(RuntimeError("no")))
        self.assertIsNone(self.successResultOf(failing.current()))
        self.flushLoggedErrors()


class SharedKnowledgeTests(SynchronousTestCase):
    """
    L{backendExtensions}: one knowledge per proxy and port, renewed when a
    reload changes the backends.
    """

    def test_reload(self) -> None:
        """
        The same backends give the same knowledge; after the backends
        change, what was learned about an unchanged backend is kept, and a
        new or changed backend is unknown (probed on the next EHLO).
        """
        old = Backend("old", "192.0.2.1", {"smtp": 587})
        context = ProxyContext(
            reactor=Clock(),
            router=FakeRouter(),
            limits=Limits(),
            hostname="proxy.test",
            backendConnector=MemoryConnector(),
            backends={"old": old, "imaponly": Backend("imaponly", "h", {"imap": 143})},
        )
        knowledge = backendExtensions(context, "smtp")
        knowledge.learn("old", Extensions({"DSN": ""}))
        self.assertIs(backendExtensions(context, "smtp"), knowledge)
        self.assertEqual(knowledge.known(), Extensions({"DSN": ""}))
        context.backends = {"old": old, "new": Backend("new", "192.0.2.2", {"smtp": 587})}
        renewed = backendExtensions(context, "smtp")
        self.assertIsNot(renewed, knowledge)
        self.assertEqual(renewed.extensionsOf("old"), Extensions({"DSN": ""}))
        self.assertIsNone(renewed.known())
        context.backends = {"old": Backend("old", "192.0.2.9", {"smtp": 587})}
        self.assertIsNone(backendExtensions(context, "smtp").extensionsOf("old"))
