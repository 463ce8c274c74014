"""
HTTP (JMAP, CalDAV, CardDAV, web interfaces) routed by account, through
the same routers as the mail protocols: L{HTTPFrontend}.
"""

from ._frontend import HTTPFrontend

__all__ = ["HTTPFrontend"]
