"""
mailproxy: a routing, TLS-terminating mail proxy on Twisted.

Clients speak IMAP4, POP3, ESMTP or ManageSieve to the proxy; it reads
the credentials before authentication, asks a router which backend holds the
account, logs in there on the client's behalf and then relays bytes.
"""

__version__ = "0.1.0"
