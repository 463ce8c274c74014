"""
The twistd plugin: C{twistd -n mailproxy --config FILE}.
"""

from twisted.application.service import ServiceMaker

mailproxy = ServiceMaker(
    "mailproxy",
    "mailproxy.tap",
    "A routing, TLS-terminating mail proxy (IMAP4, POP3, ESMTP, ManageSieve).",
    "mailproxy",
)
