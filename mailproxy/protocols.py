"""
What the proxy knows of each protocol it speaks, as data: the listener
protocols, their kinds (modes), the backend ports they connect to, and the
TLS application protocol ids they accept.

Nothing here imports a protocol's code, so the configuration parser and the
session core can read it without loading any front end.
"""

from __future__ import annotations

__all__ = [
    "LISTENER_PROTOCOLS",
    "BACKEND_PROTOCOLS",
    "DIGEST_AUTH_PROTOCOLS",
    "LISTENER_MODES",
    "MODE_PORTS",
    "APPLICATION_PROTOCOLS",
]

LISTENER_PROTOCOLS: tuple[str, ...] = ("imap", "pop3", "sieve", "smtp")
"""
The protocols a C{[[listener]]} can speak (the front ends that exist).
"""

DIGEST_AUTH_PROTOCOLS: tuple[str, ...] = ("pop3", "smtp")
"""
The listener protocols whose front ends offer digest mechanisms when a
listener sets C{digest_auth = true}.
"""

BACKEND_PROTOCOLS: tuple[str, ...] = ("imap", "pop3", "smtp", "sieve", "mx")
"""
The protocols a backend's C{ports} table may name (C{mx}: where inbound
mail from an C{smtp} listener in C{mx} mode goes; C{smtp}: submission).
"""

LISTENER_MODES: dict[str, tuple[str, ...]] = {"smtp": ("submission", "mx")}
"""
The listener protocols that come in kinds, with the values of their
required C{mode} key.
"""

MODE_PORTS: dict[tuple[str, str], str] = {("smtp", "mx"): "mx"}
"""
The backend C{ports} key a listener mode connects to, where it is not the
listener's protocol.
"""

APPLICATION_PROTOCOLS: dict[str, tuple[bytes, ...]] = {
    "imap": (b"imap",),
    "pop3": (b"pop3",),
    "sieve": (b"managesieve",),
    # IANA has registered no ALPN id for SMTP; "smtp" is what a client that
    # sends one anyway is most likely to send.
    "smtp": (b"smtp",),
}
"""
The TLS ALPN protocol ids each listener protocol accepts: a client that
offers ALPN without one of them (a browser sent to a mail port, say) is
refused during the handshake.
"""
