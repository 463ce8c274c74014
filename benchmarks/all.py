"""
Every benchmark in one run: IMAP against direct Dovecot and nginx
(C{run.py}), then POP3 (C{pop3.py}), ESMTP (C{smtp.py}), single-client
login latency of every protocol (C{latency.py}), the routers
(C{routers.py}), HTTP/JMAP against direct Cyrus and nginx (C{jmap.py}),
clients flooding commands unread (C{flood.py}), logins
through one and two worker processes (C{workers.py}) and the
event loop during a bulk move (C{moves.py}), each
printing its own table.

    python benchmarks/all.py [--quick]

Each part starts its own servers and stops them before the next begins, so
they never compete for the two cores. The exit status is the worst part's.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

_REPOSITORY = Path(__file__).resolve().parent.parent
if str(_REPOSITORY) not in sys.path:
    sys.path.insert(0, str(_REPOSITORY))

from benchmarks import flood, jmap, latency, moves, pop3, routers, run, smtp, workers  # noqa: E402

PARTS = (
    ("IMAP", run.main),
    ("POP3", pop3.main),
    ("ESMTP", smtp.main),
    ("Login latency", latency.main),
    ("Routers", routers.main),
    ("HTTP (JMAP)", jmap.main),
    ("Flood", flood.main),
    ("Worker processes", workers.main),
    # Last: it runs Twisted's reactor in this process, which runs only once.
    ("Moves", moves.main),
)


def main(argv: list[str] | None = None) -> int:
    """
    Run every part with the same C{--quick} choice; return the worst status.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    unknown = [a for a in arguments if a != "--quick"]
    if unknown:
        print(f"usage: all.py [--quick] (each part has more options: run it alone)", file=sys.stderr)
        return 2
    worst = 0
    for title, part in PARTS:
        print(f"\n## {title}\n", flush=True)
        # A part may turn SIGTERM into KeyboardInterrupt for itself; the next
        # part's worker processes must not inherit that.
        handler = signal.getsignal(signal.SIGTERM)
        try:
            worst = max(worst, part(list(arguments)) or 0)
        finally:
            signal.signal(signal.SIGTERM, handler)
    return worst


if __name__ == "__main__":
    sys.exit(main())
