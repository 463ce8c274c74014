"""
Tests for the migration routes of L{mailproxy.admin} (C{POST /migrations},
C{GET /migrations}, C{GET /migrations/ID}, C{DELETE /migrations/ID}) over
in-memory HTTP, with a scripted migration manager behind them.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.migration import MigrationError, MigrationSettings

from .test_admin import AUTH, AdminTestsMixin


@define
class FakeCampaign:
    """
    A campaign whose description the test writes.
    """

    id: str
    state: dict[str, Any]
    accounts: list[str] = field(factory=list)

    def describe(self) -> dict[str, Any]:
        return dict(self.state, id=self.id)


@define
class FakeManager:
    """
    A migration manager that records what it is asked and answers as the
    test says.

    @ivar started: the arguments of each C{start}.
    @ivar answer: what C{start} returns (by default a new campaign).
    """

    settings: MigrationSettings = field(factory=MigrationSettings)
    started: list[tuple[Any, ...]] = field(factory=list)
    cancelled: list[str] = field(factory=list)
    known: dict[str, FakeCampaign] = field(factory=dict)
    answer: Deferred[Any] | None = None

    def start(self, accounts: list[str], target: str, *, dryRun: bool, concurrency: int | None) -> Deferred[Any]:
        self.started.append((accounts, target, dryRun, concurrency))
        if self.answer is not None:
            return self.answer
        campaign = FakeCampaign(f"c{len(self.known) + 1}", {"target": target, "state": "running", "total": len(accounts)}, accounts)
        self.known[campaign.id] = campaign
        return succeed(campaign)

    def campaigns(self) -> list[FakeCampaign]:
        return list(self.known.values())

    def campaign(self, campaignId: str) -> FakeCampaign | None:
        return self.known.get(campaignId)

    def cancel(self, campaignId: str) -> bool:
        campaign = self.known[campaignId]
        if campaign.state["state"] != "running":
            return False
        self.cancelled.append(campaignId)
        campaign.state["state"] = "cancelled"
        return True


class MigrationRouteTests(AdminTestsMixin, SynchronousTestCase):
    """
    The campaign routes, their checks of the body, and their errors.
    """

    def setUp(self) -> None:
        super().setUp()
        self.manager = FakeManager()
        self.proxy.migrations = self.manager  # type: ignore[attr-defined]

    def test_start(self) -> None:
        """
        C{POST /migrations} hands accounts, target, dry run and concurrency
        to the manager and answers with the new campaign's description.
        """
        status, body = self.request(
            "POST", "/migrations",
            {"accounts": ["a@example.org", "b@example.org"], "to": "new", "dry_run": True, "concurrency": 3},
        )
        self.assertEqual((status, body), (200, {"id": "c1", "target": "new", "state": "running", "total": 2}))
        self.assertEqual(self.manager.started, [(["a@example.org", "b@example.org"], "new", True, 3)])

    def test_startDefaultConcurrency(self) -> None:
        """
        Without C{concurrency}, the engine picks it (C{[migration]
        concurrency}).
        """
        status, _ = self.request("POST", "/migrations", {"accounts": ["a@example.org"], "to": "new"})
        self.assertEqual(status, 200)
        self.assertEqual(self.manager.started, [(["a@example.org"], "new", False, None)])

    def test_startDomain(self) -> None:
        """
        A domain adds the accounts that have an entry of their own in the
        route store; a domain without any is refused with 409 saying so.
        """
        with open(self.routesPath, "a") as f:
            f.write('"bob@example.org" = "old"\n"carol@example.net" = "old"\n')
        self.harness.context.router.reload()  # type: ignore[attr-defined]
        status, _ = self.request("POST", "/migrations", {"accounts": ["x@example.com"], "domain": "example.org", "to": "new"})
        self.assertEqual(status, 200)
        self.assertEqual(self.manager.started, [(["x@example.com", "alice@example.org", "bob@example.org"], "new", False, None)])
        self.assertEqual(
            self.request("POST", "/migrations", {"domain": "example.com", "to": "new"}),
            (409, {"error": "the route store has no account of example.com with an entry of its own; "
                            "name the accounts (or list them in a file)"}),
        )

    def test_startBadBodies(self) -> None:
        """
        A body without a target, with accounts that are not strings, with
        neither accounts nor a domain, or with a concurrency out of range
        gets 400 naming the key, and nothing starts.
        """
        for body, error in (
            ({"accounts": ["a@x"]}, "to is required"),
            ({"accounts": ["a@x"], "to": ""}, "to must be a non-empty string"),
            ({"accounts": "a@x", "to": "new"}, "accounts must be a list of strings"),
            ({"accounts": [1], "to": "new"}, "accounts must be a list of strings"),
            ({"to": "new"}, "name at least one account or a domain"),
            ({"accounts": ["a@x"], "to": "new", "dry_run": "yes"}, "dry_run must be true or false"),
            ({"accounts": ["a@x"], "to": "new", "concurrency": 0}, "concurrency must be an integer from 1 to 64"),
            ({"accounts": ["a@x"], "to": "new", "concurrency": 65}, "concurrency must be an integer from 1 to 64"),
            ({"accounts": ["a@x"], "to": "new", "concurrency": True}, "concurrency must be an integer from 1 to 64"),
            ({"accounts": ["a@x"], "to": "new", "concurrency": 2.5}, "concurrency must be an integer from 1 to 64"),
        ):
            self.assertEqual(self.request("POST", "/migrations", body), (400, {"error": error}), body)
        self.assertEqual(self.manager.started, [])

    def test_startRefused(self) -> None:
        """
        A campaign the engine refuses (an unknown backend) gets 409 with
        the engine's text, as a refused move does.
        """
        self.manager.answer = fail(MigrationError("unknown backend 'elsewhere'; configured backends: new, old"))
        self.assertEqual(
            self.request("POST", "/migrations", {"accounts": ["a@x"], "to": "elsewhere"}),
            (409, {"error": "unknown backend 'elsewhere'; configured backends: new, old"}),
        )

    def test_startWaitsForEngine(self) -> None:
        """
        The answer comes once the engine has journaled and started the
        campaign (its Deferred fired), not before.
        """
        self.manager.answer = Deferred()
        d = self.http.request("POST", "http://admin.test/migrations", data=b'{"accounts": ["a@x"], "to": "new"}', headers=AUTH)
        self.http.flush()
        self.assertNoResult(d)
        self.manager.answer.callback(FakeCampaign("c9", {"state": "running"}, ["a@x"]))
        self.http.flush()
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_listAndShow(self) -> None:
        """
        C{GET /migrations} lists every campaign; C{GET /migrations/ID}
        shows one; an unknown id gets 404.
        """
        self.request("POST", "/migrations", {"accounts": ["a@x"], "to": "new"})
        self.request("POST", "/migrations", {"accounts": ["b@x", "c@x"], "to": "old"})
        status, body = self.request("GET", "/migrations")
        self.assertEqual(status, 200)
        self.assertEqual(body["count"], 2)
        self.assertEqual([m["id"] for m in body["migrations"]], ["c1", "c2"])
        self.assertEqual(self.request("GET", "/migrations/c2"), (200, {"id": "c2", "target": "old", "state": "running", "total": 2}))
        self.assertEqual(self.request("GET", "/migrations/nope"), (404, {"error": "no migration campaign 'nope'"}))
        self.assertEqual(self.request("GET", "/migrations/"), (404, {"error": "no migration campaign ''"}))

    def test_cancel(self) -> None:
        """
        C{DELETE /migrations/ID} cancels a running campaign and answers
        with its description; a campaign that has ended gets 409, an
        unknown one 404.
        """
        self.request("POST", "/migrations", {"accounts": ["a@x"], "to": "new"})
        status, body = self.request("DELETE", "/migrations/c1")
        self.assertEqual((status, body["state"]), (200, "cancelled"))
        self.assertEqual(self.manager.cancelled, ["c1"])
        self.assertEqual(
            self.request("DELETE", "/migrations/c1"), (409, {"error": "migration campaign 'c1' has ended (cancelled)"})
        )
        self.assertEqual(self.request("DELETE", "/migrations/c5"), (404, {"error": "no migration campaign 'c5'"}))

    def test_wrongMethods(self) -> None:
        """
        Methods a migration path does not take get 405.
        """
        self.assertEqual(self.request("PUT", "/migrations")[0], 405)
        self.assertEqual(self.request("POST", "/migrations/c1")[0], 405)

    def test_needsToken(self) -> None:
        """
        Like every route but health, the campaign routes need the token.
        """
        d = self.http.get("http://admin.test/migrations")
        self.http.flush()
        self.clock.advance(1)
        self.http.flush()
        self.assertEqual(self.successResultOf(d).code, 401)
