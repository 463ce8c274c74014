"""
The IMAP and ManageSieve conversations of a migration, as a backend's
master user on an account's behalf (SASL PLAIN with the account as the
authorization identity, so the account's password is never needed).

These functions block: the engine runs them in threads.  Errors they raise
never contain a password (the password only goes into the SASL exchange).
"""

from __future__ import annotations

import base64
import email.parser
import imaplib
import re
import socket
import ssl
from collections import Counter
from typing import Any

from ..model import Backend

__all__ = ["fingerprints", "copyLate", "copySubscriptions", "copySieve", "ClientError"]


class ClientError(Exception):
    """
    A server refused or broke a conversation; C{str(error)} is for the
    operator (no password in it).
    """


def _context(backend: Backend) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=backend.caFile)
    if not backend.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _plain(backend: Backend, account: str) -> bytes:
    assert backend.masterUser is not None and backend.masterPassword is not None
    return account.encode() + b"\0" + backend.masterUser.encode() + b"\0" + backend.masterPassword


class _IMAP4TLS(imaplib.IMAP4_SSL):
    """
    imaplib's implicit TLS client, verifying the backend's C{serverName}
    (imaplib would verify the address it connects to).
    """

    def __init__(self, host: str, port: int, serverName: str, context: ssl.SSLContext, timeout: float) -> None:
        self._serverName = serverName
        super().__init__(host, port, ssl_context=context, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        raw = imaplib.IMAP4._create_socket(self, timeout)  # type: ignore[attr-defined]
        return self.ssl_context.wrap_socket(raw, server_hostname=self._serverName)  # type: ignore[attr-defined, no-any-return]


def _imap(backend: Backend, account: str, timeout: float) -> imaplib.IMAP4:
    """
    An IMAP connection to C{backend}, logged in as C{account} by the master
    user.
    """
    mode = backend.tlsFor("imap")
    port = backend.port("imap")
    serverName = backend.serverName or backend.host
    connection: imaplib.IMAP4 | None = None
    try:
        if mode == "implicit":
            connection = _IMAP4TLS(backend.host, port, serverName, _context(backend), timeout)
        else:
            connection = imaplib.IMAP4(backend.host, port, timeout=timeout)
            if mode == "starttls":
                # imaplib verifies the name in C{host}.
                connection.host = serverName
                connection.starttls(_context(backend))
        connection.authenticate("PLAIN", lambda _: _plain(backend, account))
    except (imaplib.IMAP4.error, OSError) as error:
        if connection is not None:
            try:
                connection.shutdown()
            except OSError:
                pass
        raise ClientError(f"IMAP on {backend.name} ({backend.host}:{port}) for {account}: {_text(error)}") from None
    return connection


def _text(error: BaseException) -> str:
    text = str(error)
    return text if len(text) < 300 else text[:300] + "..."


_LIST = re.compile(rb'^\((?P<flags>[^)]*)\) (?P<delimiter>NIL|"(?:[^"\\]|\\.)*") (?P<name>.*)$', re.DOTALL)


def _unquote(value: bytes) -> bytes:
    if value.startswith(b'"') and value.endswith(b'"') and len(value) >= 2:
        return re.sub(rb"\\(.)", rb"\1", value[1:-1])
    return value


def _quote(name: bytes) -> str:
    return '"' + name.decode("utf-8", "surrogateescape").replace("\\", "\\\\").replace('"', '\\"') + '"'


def _folders(connection: imaplib.IMAP4, command: str = "LIST") -> list[tuple[bytes, str, bool]]:
    """
    The account's folders: raw name, name with C{/} between levels, and
    whether it can be selected.
    """
    status, lines = connection.list() if command == "LIST" else connection.lsub()
    if status != "OK":
        raise ClientError(f"{command} failed: {lines!r}")
    folders = []
    for line in lines:
        if line is None:
            continue
        if isinstance(line, tuple):
            # The name came as a literal.
            head, literal = line
            match = _LIST.match(head.rstrip() + b" x")
            name = literal
        else:
            match = _LIST.match(line)
            name = _unquote(match.group("name")) if match else b""
        if match is None:
            continue
        flags = match.group("flags").lower()
        delimiter = _unquote(match.group("delimiter")) if match.group("delimiter") != b"NIL" else b""
        text = name.decode("utf-8", "surrogateescape")
        normalised = text.replace(delimiter.decode(), "/") if delimiter else text
        if normalised.upper() == "INBOX":
            normalised = "INBOX"
        folders.append((name, normalised, b"\\noselect" not in flags and b"\\nonexistent" not in flags))
    return folders


_FETCH = re.compile(rb"RFC822\.SIZE (\d+)|INTERNALDATE \"([^\"]*)\"|FLAGS \(([^)]*)\)|UID (\d+)")

#: The flags the verify compares: the system flags every IMAP server and
#: every tool keeps (mbsync 1.4 does not copy keywords).
SYSTEM_FLAGS = ("\\answered", "\\deleted", "\\draft", "\\flagged", "\\seen")


def _messages(connection: imaplib.IMAP4, where: str, name: bytes, normalised: str) -> list[tuple[int, str, int, str]]:
    """
    The messages of folder C{name}: UID, fingerprint (the Message-ID, or
    size and internal date when it has none), size and system flags (lower
    case, sorted, space separated).
    """
    status, data = connection.select(_quote(name), readonly=True)
    if status != "OK":
        raise ClientError(f"cannot select {normalised!r} on {where}: {data!r}")
    if not int(data[0] or 0):
        return []
    status, items = connection.uid("FETCH", "1:*", "(UID FLAGS RFC822.SIZE INTERNALDATE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    if status != "OK":
        raise ClientError(f"cannot fetch {normalised!r} on {where}: {items!r}")
    messages = []
    for item in items:
        if not isinstance(item, tuple):
            continue
        head, header = item
        uid, size, date, flags = 0, 0, "", ""
        for match in _FETCH.finditer(head):
            if match.group(1):
                size = int(match.group(1))
            elif match.group(2) is not None:
                date = match.group(2).decode("ascii", "replace")
            elif match.group(3) is not None:
                words = match.group(3).decode("ascii", "replace").lower().split()
                flags = " ".join(sorted(w for w in words if w in SYSTEM_FLAGS))
            else:
                uid = int(match.group(4))
        parsed = email.parser.BytesHeaderParser().parsebytes(header)
        messageId = (parsed.get("Message-ID") or "").strip()
        key = f"id:{messageId}" if messageId else f"size:{size} date:{date}"
        messages.append((uid, key, size, flags))
    return messages


def fingerprints(backend: Backend, account: str, timeout: float) -> dict[str, list[tuple[str, int, str]]]:
    """
    Per selectable folder of C{account} on C{backend} (C{/} between
    levels), each message's fingerprint (its Message-ID, or its size and
    internal date when it has none), size and system flags (lower case,
    sorted, space separated).

    @raise ClientError: the server refused something.
    """
    connection = _imap(backend, account, timeout)
    try:
        return {
            normalised: [(key, size, flags) for _, key, size, flags in _messages(connection, backend.name, name, normalised)]
            for name, normalised, selectable in _folders(connection)
            if selectable
        }
    except (imaplib.IMAP4.error, OSError) as error:
        raise ClientError(f"IMAP on {backend.name} for {account}: {_text(error)}") from None
    finally:
        _logout(connection)


_WHOLE = re.compile(rb"FLAGS \(([^)]*)\)|INTERNALDATE (\"[^\"]*\")")


def copyLate(
    source: Backend, target: Backend, account: str, known: dict[str, list[str]], timeout: float
) -> list[tuple[str, str]]:
    """
    Copy to C{target} the messages of C{account} that are on C{source} but
    not in C{known} (the source's fingerprints per folder when it was
    verified), with their flags and internal dates: mail that reached the
    source after the final sync (a delivery under way when the account was
    held, or one that did not pass through the proxy).  A message the
    target has already is not copied again; nothing is ever removed.

    @return: the folder and fingerprint of each message copied.
    @raise ClientError: a server refused something, or such a message is
        in a folder the target does not have.
    """
    reader = _imap(source, account, timeout)
    writer = None
    copied: list[tuple[str, str]] = []
    try:
        for name, normalised, selectable in _folders(reader):
            if not selectable:
                continue
            seen = Counter(known.get(normalised, ()))
            late = []
            for uid, key, _, _ in _messages(reader, source.name, name, normalised):
                if seen[key]:
                    seen[key] -= 1
                else:
                    late.append((uid, key))
            if not late:
                continue
            if writer is None:
                writer = _imap(target, account, timeout)
                names = {n: raw for raw, n, _ in _folders(writer)}
            if normalised not in names:
                raise ClientError(f"{len(late)} new messages in {normalised!r} on {source.name}, a folder {target.name} does not have")
            there = Counter(key for _, key, _, _ in _messages(writer, target.name, names[normalised], normalised))
            for uid, key in late:
                if there[key]:
                    there[key] -= 1
                    continue
                status, items = reader.uid("FETCH", str(uid), "(FLAGS INTERNALDATE BODY.PEEK[])")
                whole = [item for item in items if isinstance(item, tuple)]
                if status != "OK" or not whole:
                    # Expunged meanwhile.
                    continue
                head, body = whole[0]
                flags, date = "", None
                for match in _WHOLE.finditer(head):
                    if match.group(1) is not None:
                        flags = " ".join(f for f in match.group(1).decode("ascii", "replace").split() if f.lower() != "\\recent")
                    else:
                        date = match.group(2).decode("ascii", "replace")
                status, data = writer.append(_quote(names[normalised]), f"({flags})", date, body)
                if status != "OK":
                    raise ClientError(f"cannot append to {normalised!r} on {target.name}: {data!r}")
                copied.append((normalised, key))
        return copied
    except (imaplib.IMAP4.error, OSError) as error:
        raise ClientError(f"IMAP for {account}: {_text(error)}") from None
    finally:
        _logout(reader)
        if writer is not None:
            _logout(writer)


def _logout(connection: imaplib.IMAP4) -> None:
    try:
        connection.logout()
    except Exception:
        pass


def copySubscriptions(source: Backend, target: Backend, account: str, timeout: float) -> int:
    """
    Subscribe C{account} on C{target} to the folders it is subscribed to
    on C{source} (mbsync copies folders, not subscriptions).

    @return: how many subscriptions were made.
    """
    before = _imap(source, account, timeout)
    try:
        wanted = {normalised for _, normalised, _ in _folders(before, "LSUB")}
    finally:
        _logout(before)
    after = _imap(target, account, timeout)
    try:
        have = {normalised for _, normalised, _ in _folders(after, "LSUB")}
        names = {normalised: name for name, normalised, _ in _folders(after)}
        made = 0
        for folder in sorted(wanted - have):
            if folder in names:
                status, data = after.subscribe(_quote(names[folder]))
                if status != "OK":
                    raise ClientError(f"cannot subscribe {folder!r} on {target.name}: {data!r}")
                made += 1
        return made
    except (imaplib.IMAP4.error, OSError) as error:
        raise ClientError(f"IMAP on {target.name} for {account}: {_text(error)}") from None
    finally:
        _logout(after)


class _Sieve:
    """
    A blocking ManageSieve (RFC 5804) client, enough to list, get, put and
    activate scripts.
    """

    def __init__(self, backend: Backend, account: str, timeout: float) -> None:
        self.backend = backend
        port = backend.port("sieve")
        mode = backend.tlsFor("sieve")
        self.name = f"ManageSieve on {backend.name} ({backend.host}:{port}) for {account}"
        raw = socket.create_connection((backend.host, port), timeout)
        self.socket: Any = raw
        self.buffer = b""
        try:
            if mode == "implicit":
                self.socket = _context(backend).wrap_socket(raw, server_hostname=backend.serverName or backend.host)
            self.response()
            if mode == "starttls":
                self.command(b"STARTTLS")
                self.socket = _context(backend).wrap_socket(self.socket, server_hostname=backend.serverName or backend.host)
                self.response()
            secret = base64.b64encode(_plain(backend, account))
            self.command(b'AUTHENTICATE "PLAIN" "' + secret + b'"', what="AUTHENTICATE")
        except BaseException:
            self.socket.close()
            raise

    def _fill(self) -> None:
        data = self.socket.recv(65536)
        if not data:
            raise ClientError(f"{self.name}: the server closed the connection")
        self.buffer += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _literal(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def response(self) -> list[tuple[bytes, bytes | None]]:
        """
        The lines up to the status line, each with the literal it
        announced; raise L{ClientError} unless the status is OK.
        """
        lines: list[tuple[bytes, bytes | None]] = []
        while True:
            line = self._line()
            literal = None
            match = re.search(rb"\{(\d+)\+?\}$", line)
            if match:
                literal = self._literal(int(match.group(1)))
                line = line[: match.start()] + self._line()
            word = line.split(b" ", 1)[0].upper()
            if literal is None and word in (b"OK", b"NO", b"BYE"):
                if word != b"OK":
                    raise ClientError(f"{self.name}: {line.decode('utf-8', 'replace')[:300]}")
                return lines
            lines.append((line, literal))

    def command(self, line: bytes, what: str | None = None) -> list[tuple[bytes, bytes | None]]:
        self.socket.sendall(line + b"\r\n")
        try:
            return self.response()
        except ClientError as error:
            if what is not None:
                # The command itself had a secret: name it instead.
                raise ClientError(f"{self.name}: {what} refused: {str(error).rpartition(': ')[2]}") from None
            raise

    def scripts(self) -> list[tuple[str, bool]]:
        found = []
        for line, literal in self.command(b"LISTSCRIPTS"):
            if literal is not None:
                name = literal
                rest = line
            else:
                match = re.match(rb'^"((?:[^"\\]|\\.)*)"(.*)$', line)
                if match is None:
                    continue
                name, rest = _unquote(b'"' + match.group(1) + b'"'), match.group(2)
            found.append((name.decode("utf-8", "replace"), b"ACTIVE" in rest.upper()))
        return found

    def get(self, name: str) -> bytes:
        for line, literal in self.command(b"GETSCRIPT " + _quote(name.encode()).encode()):
            if literal is not None:
                return literal
            if line.startswith(b'"'):
                return _unquote(line)
        raise ClientError(f"{self.name}: GETSCRIPT {name!r} returned nothing")

    def put(self, name: str, script: bytes) -> None:
        self.socket.sendall(b"PUTSCRIPT " + _quote(name.encode()).encode() + b" {%d+}\r\n" % len(script) + script + b"\r\n")
        self.response()

    def activate(self, name: str) -> None:
        self.command(b"SETACTIVE " + _quote(name.encode()).encode())

    def close(self) -> None:
        try:
            self.socket.sendall(b"LOGOUT\r\n")
            self.socket.close()
        except OSError:
            pass


def copySieve(source: Backend, target: Backend, account: str, timeout: float) -> int:
    """
    Copy C{account}'s Sieve scripts from C{source} to C{target} with
    ManageSieve and activate there the one active on C{source} (or none).

    @return: how many scripts were copied.
    """
    try:
        reader = _Sieve(source, account, timeout)
        try:
            scripts = [(name, active, reader.get(name)) for name, active in reader.scripts()]
        finally:
            reader.close()
        writer = _Sieve(target, account, timeout)
        try:
            for name, _, script in scripts:
                writer.put(name, script)
            active = [name for name, isActive, _ in scripts if isActive]
            if active:
                writer.activate(active[0])
            elif any(isActive for _, isActive in writer.scripts()):
                writer.activate("")
        finally:
            writer.close()
        return len(scripts)
    except OSError as error:
        raise ClientError(f"ManageSieve for {account}: {_text(error)}") from None
