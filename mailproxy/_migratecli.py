"""
The C{mailproxy migrate} command: start a migration campaign through the
management endpoint (C{POST /migrations}) and follow it to its end, list
campaigns, show or cancel one.

While it follows a campaign it shows, on a terminal, a bar for the campaign
(accounts done of total, messages, bytes, rate, time left) and one for each
account being migrated, redrawn in place; elsewhere (a pipe, a log, cron)
one plain line each time an account changes state, and a campaign line each
time an account ends. The exit status is 0 when every account was migrated
(or, for a dry run, could be), 1 otherwise.

The campaign runs in the proxy, not in this command: interrupting the
command leaves it running, and if the endpoint goes away for a while (the
proxy restarting), the command waits for it to come back.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from typing import Any, TextIO
from urllib.parse import quote

from ._adminclient import AdminClient, AdminError, EndpointUnreachable
from ._safetext import oneLine
from .config import MAX_MIGRATION_CONCURRENCY

__all__ = ["addMigrateCommand", "migrate", "ProgressView", "formatBytes", "formatDuration"]

#: Seconds between two looks at a campaign that is being followed.
POLL_INTERVAL = 1.0

#: Seconds the command waits for an unreachable endpoint to come back
#: before it gives up following (the campaign goes on in the proxy).
RECONNECT_WAIT = 120.0

#: The account states in which an account is being migrated.
ACTIVE_STATES = ("copying", "holding", "syncing", "verifying", "flipping")

#: The account states that end an account's migration.
FINAL_STATES = ("done", "failed", "cancelled")

#: The width of a progress bar, in characters.
BAR_WIDTH = 20

#: The most octets of an account's name, and of a failure's reason, shown.
MAX_NAME = 320
MAX_REASON = 2000


def _concurrency(text: str) -> int:
    """
    An argparse type: accounts migrated at once, 1 to 64.
    """
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= MAX_MIGRATION_CONCURRENCY:
        raise argparse.ArgumentTypeError(f"concurrency must be 1 to {MAX_MIGRATION_CONCURRENCY}, not {value}")
    return value


def addMigrateCommand(commands: Any, common: argparse.ArgumentParser) -> None:
    """
    Add C{migrate} to the C{mailproxy} command's subcommands.

    @param common: the parent parser with the options that find the
        management endpoint.
    """
    migrate = commands.add_parser(
        "migrate", parents=[common],
        usage=(
            "%(prog)s [options] ACCOUNT ... --to BACKEND\n"
            "       %(prog)s [options] --list | --status ID [--follow] | --cancel ID"
        ),
        help="copy accounts' mail to another backend, verify it, and move them there",
        description=(
            "Migrate accounts to BACKEND as one campaign in the running proxy: per account, copy "
            "its mail (folders, flags, Sieve scripts) while the user keeps working, hold its logins "
            "and drop its sessions, copy what changed, verify both sides hold the same messages, "
            "and only then route it to BACKEND. A failed account stays where it was. The command "
            "follows the campaign to its end (Ctrl-C leaves it running in the proxy). Rollback: "
            "migrate the accounts back. Exit status 0 if every account was migrated, 1 if not."
        ),
    )
    migrate.add_argument("accounts", nargs="*", metavar="ACCOUNT", help="the accounts to migrate")
    migrate.add_argument("--to", metavar="BACKEND", help="the backend to migrate to")
    migrate.add_argument(
        "--from-file", metavar="FILE",
        help="also migrate the accounts listed in FILE, one per line (- for standard input; blank lines and # comments are skipped)",
    )
    migrate.add_argument(
        "--domain", metavar="DOMAIN", help="also migrate the accounts of DOMAIN that have an entry of their own in the route store"
    )
    migrate.add_argument("--dry-run", action="store_true", help="only show which accounts would be migrated, from where")
    migrate.add_argument(
        "--concurrency", type=_concurrency, metavar="N",
        help="migrate N accounts at once (default: [migration] concurrency, 4 unless set)",
    )
    migrate.add_argument(
        "--detach", action="store_true", help="start the campaign, print its id and return without following it"
    )
    migrate.add_argument("--json", action="store_true", help="print the campaign (or the list) as JSON, without progress")
    which = migrate.add_mutually_exclusive_group()
    which.add_argument("--list", action="store_true", help="list the campaigns the proxy knows")
    which.add_argument("--status", metavar="ID", help="show campaign ID")
    which.add_argument("--cancel", metavar="ID", help="cancel campaign ID (accounts already migrated stay migrated)")
    migrate.add_argument("--follow", action="store_true", help="with --status: follow the campaign to its end")


def formatBytes(count: float) -> str:
    """
    C{count} octets for people: C{512 B}, C{12.0 KiB}, C{3.4 GiB}.
    """
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024 or unit == "TiB":
            break
    return f"{count:.1f} {unit}"


def formatDuration(seconds: float | None) -> str:
    """
    C{seconds} as C{m:ss} or C{h:mm:ss}; C{?} when unknown.
    """
    if seconds is None:
        return "?"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _bar(fraction: float | None, width: int = BAR_WIDTH) -> str:
    """
    C{[#####.....]} filled to C{fraction}; all dots when unknown.
    """
    if fraction is None:
        return "[" + "." * width + "]"
    filled = max(0, min(width, int(fraction * width)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def _figures(campaign: dict[str, Any], word: str) -> list[str]:
    total, done, failed = campaign.get("total", 0), campaign.get("done", 0), campaign.get("failed", 0)
    parts = [
        f"{done}/{total} {word}" + (f", {failed} failed" if failed else ""),
        _plural(campaign.get("messages", 0) or 0, "message" if word == "accounts done" else "msg"),
        formatBytes(campaign.get("bytes", 0) or 0),
    ]
    if campaign.get("state") == "running":
        parts.append(f"{formatBytes(campaign.get('rate') or 0)}/s")
        parts.append(f"ETA {formatDuration(campaign.get('eta'))}")
    return parts


def campaignLine(campaign: dict[str, Any]) -> str:
    """
    One line on a campaign: accounts done of total, failures, messages,
    bytes, rate and time left.
    """
    kind = "dry run" if campaign.get("dry_run") else "migration"
    return f"{kind} {campaign['id']} to {campaign.get('target', '?')}: " + ", ".join(_figures(campaign, "accounts done"))


def accountLine(account: dict[str, Any]) -> str:
    """
    One line on an account: its state, what it moved, and why it failed.
    The account's name (a client chose it, for a migration on login) and
    the reason (a tool's output) are made one line without controls: they
    must not drive the operator's terminal.
    """
    state = account.get("state", "?")
    text = f"{oneLine(account['account'], MAX_NAME)}: {state}"
    if state == "failed":
        step = account.get("step")
        error = oneLine(account.get("error") or "", MAX_REASON) or "no reason given"
        if step:
            # The engine's reason may start with the step's name already.
            text += f" at {step}"
            error = error.removeprefix(f"{step}: ")
        text += f": {error}"
    elif state in ACTIVE_STATES or state == "done":
        text += f" ({_plural(account.get('messages', 0) or 0, 'message')}, {formatBytes(account.get('bytes', 0) or 0)})"
    return text


class ProgressView:
    """
    Shows a followed campaign as it goes: redrawn bars on a terminal,
    plain lines elsewhere.

    @ivar out: where to write.
    @ivar terminal: whether C{out} is a terminal (bars redrawn in place).
    @ivar width: the terminal's width; lines are cut to it.
    """

    def __init__(self, out: TextIO, terminal: bool, width: int = 80) -> None:
        self.out = out
        self.terminal = terminal
        self.width = width
        self._states: dict[str, str] = {}
        self._drawn = 0
        self._finished = -1
        self._named = False

    def update(self, campaign: dict[str, Any]) -> None:
        """
        Show C{campaign} (its description, as C{GET /migrations/ID} gives
        it).
        """
        if campaign.get("dry_run"):
            # Nothing moves: the plan is shown at the end.
            return
        # What is said once and stays: accounts that ended (the terminal
        # keeps them above the bars), or every change of state (plain).
        lasting = []
        for account in campaign.get("accounts", []):
            name, state = account["account"], account.get("state", "?")
            if self._states.get(name) == state:
                continue
            self._states[name] = state
            if state in FINAL_STATES or (not self.terminal and state != "queued"):
                lasting.append(accountLine(account))
        finished = campaign.get("done", 0) + campaign.get("failed", 0)
        if self.terminal:
            self._clear()
            if not self._named:
                lasting.insert(0, f"migration {campaign['id']} to {campaign.get('target', '?')}:")
                self._named = True
            for line in lasting:
                print(line[: self.width], file=self.out)
            self._draw(campaign)
        else:
            for line in lasting:
                print(line, file=self.out)
            if finished != self._finished and (lasting or self._finished < 0):
                print(campaignLine(campaign), file=self.out)
        self._finished = finished
        self.out.flush()

    def _clear(self) -> None:
        if self._drawn:
            # Up to the first line drawn, and clear from there down.
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self, campaign: dict[str, Any]) -> None:
        total = campaign.get("total", 0)
        fraction = (campaign.get("done", 0) + campaign.get("failed", 0)) / total if total else None
        # Short enough for 80 columns: the campaign is named above.
        lines = [f"{_bar(fraction, BAR_WIDTH // 2)} " + ", ".join(_figures(campaign, "done"))]
        for account in campaign.get("accounts", []):
            if account.get("state") not in ACTIVE_STATES:
                continue
            totalBytes = account.get("total_bytes")
            part = account.get("bytes", 0) / totalBytes if totalBytes else None
            lines.append(f"  {_bar(part, BAR_WIDTH // 2)} {accountLine(account)}")
        for line in lines:
            print(line[: self.width], file=self.out)
        self._drawn = len(lines)

    def finish(self, campaign: dict[str, Any]) -> None:
        """
        Replace the bars with the campaign's outcome.
        """
        if self.terminal:
            self._clear()
        if campaign.get("dry_run"):
            for account in campaign.get("accounts", []):
                name = oneLine(account["account"], MAX_NAME)
                if account.get("state") == "failed":
                    print(f"{name}: cannot migrate: {oneLine(account.get('error') or '', MAX_REASON)}", file=self.out)
                else:
                    print(f"{name}: {account.get('source') or '?'} -> {campaign.get('target')}", file=self.out)
        print(summary(campaign), file=self.out)
        self.out.flush()


def summary(campaign: dict[str, Any]) -> str:
    """
    The last line about a campaign that has ended.
    """
    if campaign.get("dry_run"):
        failed = campaign.get("failed", 0)
        return (
            f"dry run {campaign['id']}: {_plural(campaign.get('total', 0) - failed, 'account')} would be migrated "
            f"to {campaign.get('target')}" + (f", {failed} cannot" if failed else "")
        )
    return (
        f"migration {campaign['id']} {campaign.get('state')}: {campaign.get('done', 0)}/{campaign.get('total', 0)} "
        f"accounts migrated to {campaign.get('target')}"
        + (f", {campaign.get('failed')} failed" if campaign.get("failed") else "")
        + f"; {_plural(campaign.get('messages', 0) or 0, 'message')}, {formatBytes(campaign.get('bytes', 0) or 0)}"
    )


def succeeded(campaign: dict[str, Any]) -> bool:
    """
    Whether a campaign that has ended migrated every account.
    """
    return campaign.get("state") == "done" and not campaign.get("failed")


def _campaignPath(campaignId: str) -> str:
    return "/migrations/" + quote(campaignId, safe="")


def follow(
    client: AdminClient,
    campaign: dict[str, Any],
    view: ProgressView | None,
    err: TextIO,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """
    Look at C{campaign} every L{POLL_INTERVAL} seconds until it ends,
    showing it on C{view}; while the endpoint cannot be reached, say so
    once and keep trying for up to L{RECONNECT_WAIT} seconds.

    @param sleep: by default L{time.sleep}.
    @param clock: by default L{time.monotonic}.
    @return: the campaign's last description.
    @raise AdminError: the endpoint stayed away, or refused.
    """
    sleep = sleep if sleep is not None else time.sleep
    clock = clock if clock is not None else time.monotonic
    path = _campaignPath(campaign["id"])
    lost: float | None = None
    while True:
        if view is not None:
            view.update(campaign)
        if campaign.get("state") != "running":
            return campaign
        sleep(POLL_INTERVAL)
        try:
            campaign = client.call("GET", path)
        except EndpointUnreachable as e:
            now = clock()
            if lost is None:
                lost = now
                print(f"mailproxy migrate: {e}; waiting for it to come back", file=err)
            elif now - lost > RECONNECT_WAIT:
                raise AdminError(f"{e} for {RECONNECT_WAIT:.0f}s; campaign {campaign['id']} goes on in the proxy") from None
            continue
        if lost is not None:
            print("mailproxy migrate: the management endpoint is back", file=err)
            lost = None


def _terminal(out: TextIO) -> bool:
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty())


def migrate(
    arguments: argparse.Namespace,
    client: AdminClient,
    out: TextIO,
    err: TextIO,
    readAccounts: Callable[[str], list[str]],
    maxBody: int,
) -> int:
    """
    Run C{mailproxy migrate}.

    @param readAccounts: reads an account file (C{--from-file}).
    @param maxBody: the largest request body the endpoint takes.
    @return: the exit status.
    """
    if arguments.list:
        answer = client.call("GET", "/migrations")
        if arguments.json:
            print(json.dumps(answer, indent=2), file=out)
        else:
            for campaign in answer["migrations"]:
                print(f"{campaign['id']} {campaign.get('state')} {campaign.get('created', '')} {campaignLine(campaign)}", file=out)
            print(_plural(answer["count"], "campaign"), file=out)
        return 0
    if arguments.cancel is not None:
        campaign = client.call("DELETE", _campaignPath(arguments.cancel))
        if arguments.json:
            print(json.dumps(campaign, indent=2), file=out)
        else:
            print(f"migration {campaign['id']}: cancelled; {campaignLine(campaign)}", file=out)
        return 0
    if arguments.status is not None:
        campaign = client.call("GET", _campaignPath(arguments.status))
        if arguments.follow:
            return _show(client, campaign, arguments, out, err)
        if arguments.json:
            print(json.dumps(campaign, indent=2), file=out)
        else:
            print(campaignLine(campaign), file=out)
            for account in campaign.get("accounts", []):
                print("  " + accountLine(account), file=out)
        return 0 if campaign.get("state") == "running" or succeeded(campaign) else 1
    if arguments.follow:
        raise AdminError("--follow goes with --status ID")
    accounts = list(arguments.accounts)
    if arguments.from_file is not None:
        accounts += readAccounts(arguments.from_file)
    if arguments.to is None:
        raise AdminError("--to BACKEND is required")
    if not accounts and not arguments.domain:
        raise AdminError("name at least one account (or --from-file, --domain)")
    body: dict[str, Any] = {
        "accounts": accounts,
        "domain": arguments.domain,
        "to": arguments.to,
        "dry_run": arguments.dry_run,
    }
    if arguments.concurrency is not None:
        body["concurrency"] = arguments.concurrency
    if len(json.dumps(body).encode("utf-8")) > maxBody:
        raise AdminError(
            f"{len(accounts)} accounts are more than one request takes ({maxBody // 1024} KiB): "
            "split the list into several campaigns"
        )
    campaign = client.call("POST", "/migrations", body)
    if arguments.detach:
        if arguments.json:
            print(json.dumps(campaign, indent=2), file=out)
        else:
            print(f"migration {campaign['id']} started: follow it with mailproxy migrate --status {campaign['id']} --follow", file=out)
        return 0
    return _show(client, campaign, arguments, out, err)


def _show(client: AdminClient, campaign: dict[str, Any], arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    Follow C{campaign} to its end, with progress unless C{--json}; then
    print its outcome.
    """
    view = None if arguments.json else ProgressView(out, _terminal(out), shutil.get_terminal_size().columns)
    try:
        campaign = follow(client, campaign, view, err)
    except KeyboardInterrupt:
        print(
            f"\nmailproxy migrate: campaign {campaign['id']} goes on in the proxy: "
            f"mailproxy migrate --status {campaign['id']} --follow; stop it with mailproxy migrate --cancel {campaign['id']}",
            file=err,
        )
        return 130
    if view is None:
        print(json.dumps(campaign, indent=2), file=out)
    else:
        view.finish(campaign)
    return 0 if succeeded(campaign) else 1
