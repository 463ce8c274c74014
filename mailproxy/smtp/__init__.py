"""
The ESMTP front ends: message submission (587/465, AUTH then relay to the
routed backend) and inbound MX (25, every recipient routed).
"""

from ._base import SMTPFrontend
from ._frontend import SubmissionFrontend
from ._mx import MXFrontend

__all__ = ["SMTPFrontend", "SubmissionFrontend", "MXFrontend"]
