"""
The migration journal: the campaigns and each account's state in a JSON
file, so that a campaign survives a restart (even SIGKILL).

Why a file and not the SQL route store: the journal must exist whatever
the router is (a static route table has no database), one format is
simpler to reason about than two, and what makes a flip safe to resume is
not where the journal lives but that the flip is recorded before it is
made and the route store is read again on resume (see
L{mailproxy.migration._manager}).  The file is written whole each time: a
new file beside it, flushed to disk, renamed over it (atomic on POSIX), in
a thread of its own so that writes land in order and the reactor never
waits for the disk.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock

from mailproxy._files import replaceFile

__all__ = ["Journal", "JOURNAL_VERSION"]

#: The format of the file; a file of another version is not read.
JOURNAL_VERSION = 1


def _readFile(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except FileNotFoundError:
        return None


class Journal:
    """
    One journal file.

    @ivar path: where it is.
    """

    def __init__(self, path: str, runBlocking: Any) -> None:
        """
        @param runBlocking: runs a blocking call off the reactor:
            C{runBlocking(timeout, f, *args)} returns a Deferred (a
            L{mailproxy._blocking.ThreadRunner}'s C{run}).
        """
        self.path = path
        self._run = runBlocking
        self._lock = DeferredLock()

    def save(self, data: dict[str, Any]) -> Deferred[None]:
        """
        Replace the file's content with C{data} (made JSON now, on the
        calling thread, so that later changes to it are not written).

        @return: fires once the new content is durable.
        """
        text = json.dumps({"version": JOURNAL_VERSION, **data}, indent=1, sort_keys=True)
        return self._lock.run(self._run, 60.0, replaceFile, self.path, text, 0o600)

    async def load(self) -> dict[str, Any]:
        """
        The file's content; an empty dict if there is no file yet.

        @raise ValueError: the file is not a journal of this version.
        """
        text = await self._run(60.0, _readFile, self.path)
        if text is None:
            return {}
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != JOURNAL_VERSION:
            raise ValueError(f"{self.path} is not a version {JOURNAL_VERSION} migration journal")
        return data
