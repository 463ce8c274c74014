"""
Runs journal entries through fail2ban's own code as a jail with C{backend =
systemd} would, and says what it found in each.

Run by the system Python (where Debian's fail2ban and python3-systemd
live), not the test virtualenv: it reads a request, a JSON object on
standard input::

    {"filter": "/path/to/filter.d/mailproxy.conf",
     "entries": [{"MESSAGE": "...", "_SYSTEMD_UNIT": "...", ...}, ...]}

and writes a JSON list with one object per entry: C{"selected"}, whether the
filter's C{journalmatch} takes the entry, and for one it takes, C{"line"},
the line fail2ban makes of it (without the time, as the failregex reads
it), and C{"addresses"}, the failures the filter finds in that line.

The path is fail2ban's: the filter file read as C{fail2ban-client} reads it
for a jail with C{backend = systemd} (which sets C{logtype = journal}), its
commands given to a fail2ban server's jail (whose filter is
L{fail2ban.server.filtersystemd.FilterSystemd}); each entry converted by
that filter's journal reader and formatted by its C{formatJournalEntry}, as
its reading loop does, then given, with the journal's time, to
C{processLine}. Only the reading of the journal itself is played here:
journald's matching of C{journalmatch} (C{FIELD=value} terms, C{+} between
alternatives), and the entry's time of arrival, now.
"""

import json
import sys
import time

from fail2ban.client.filterreader import FilterReader
from fail2ban.server.server import Server
from fail2ban.server.transmitter import Transmitter

JAIL = "mailproxy"


def jailFilter(path):
    """
    A jail's filter, configured from the filter file at C{path} for
    C{backend = systemd}.
    """
    reader = FilterReader(path, JAIL, {}, share_config={}, basedir=None)
    # A file outside /etc/fail2ban, read as fail2ban-regex reads one.
    reader.setBaseDir(None)
    if not reader.readexplicit():
        raise SystemExit(f"cannot read {path}")
    reader.applyAutoOptions("systemd")
    reader.getOptions(None)
    server = Server(daemon=False)
    transmitter = Transmitter(server)
    for command in [["add", JAIL, "systemd"], *reader.convert()]:
        code, result = transmitter.proceed(command)
        if code != 0:
            raise SystemExit(f"{command!r}: {result!r}")
    return server._Server__jails[JAIL].filter


def selected(entry, matches):
    """
    Whether journald, given the filter's matches, would return C{entry}.
    """
    if not matches:
        return True
    return any(all(entry.get(term.split("=", 1)[0]) == term.split("=", 1)[1] for term in group) for group in matches)


def main():
    request = json.load(sys.stdin)
    flt = jailFilter(request["filter"])
    results = []
    for fields in request["entries"]:
        if not selected(fields, flt.getJournalMatch()):
            results.append({"selected": False, "line": None, "addresses": []})
            continue
        # What the journal reader's get_next() converts: the fields as
        # octets, the time of arrival in microseconds.
        raw = {name: value.encode("utf-8") for name, value in fields.items()}
        raw["__REALTIME_TIMESTAMP"] = int(time.time() * 1000000)
        entry = flt.getJournalReader()._convert_entry(raw)
        line, when = flt.formatJournalEntry(entry)
        found = flt.processLine(line, when)
        results.append({
            "selected": True,
            "line": line[0] + line[2],
            "addresses": [str(address) for _, address, _, _ in found],
        })
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
