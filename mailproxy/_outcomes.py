"""
The outcomes the session core decides and the protocols put into words.

The core (the command loop, the login pipeline, the backend login base)
decides what happened and names it with one of these enums; each protocol
module only phrases it (an IMAP C{NO [AUTHENTICATIONFAILED]}, a POP3
C{-ERR [AUTH]}, an SMTP C{535 5.7.8}).  No protocol maps its own English
texts back to meanings.

The enums' values are the words the logs and the metrics use, so that a
label or a log line reads the same as before they were enums.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["FailureKind", "StartTLSRefusal", "SASLRefusal", "EndReason"]


class FailureKind(str, Enum):
    """
    Why a login did not lead to a backend session.

    A C{str} enum: its value is the metrics label and the log word.
    """

    #: Bad credentials or an unknown account (never said apart to the
    #: client: no user enumeration).
    AUTH = "auth"
    #: Router or backend trouble: try again later.
    UNAVAILABLE = "unavailable"
    #: The backend's own coded refusal, passed on in its words.
    REFUSED = "refused"

    def __str__(self) -> str:
        return self.value


class StartTLSRefusal(Enum):
    """
    Why a STARTTLS (STLS) command is refused; the core decides, the
    protocol answers in its own form.
    """

    #: The command came with arguments.
    ARGUMENTS = "arguments"
    #: TLS is on already.
    ACTIVE = "active"
    #: The listener does not do STARTTLS.
    UNAVAILABLE = "unavailable"


class SASLRefusal(Enum):
    """
    Why an authentication exchange ends before any login is tried.
    """

    #: The mechanism is not offered on this connection.
    UNSUPPORTED = "unsupported mechanism"
    #: Credentials may not be sent before TLS on this listener.
    PRIVACY_REQUIRED = "privacy required"
    #: A response (or initial response) is not valid base64.
    BAD_BASE64 = "bad base64"
    #: The client cancelled with C{*}.
    ABORTED = "aborted"
    #: The decoded response does not fit the mechanism.
    BAD_RESPONSE = "bad response"
    #: An authorization identity other than the user was asked for.
    AUTHORIZATION = "authorization"
    #: The mechanism takes no initial response (CRAM-MD5).
    NO_INITIAL_RESPONSE = "no initial response"


class EndReason(Enum):
    """
    Why a session ended, as the session-end log line says it (C{reason=}).

    The values are the log words; some reasons carry a detail after a
    colon (C{protocol error: line too long}).
    """

    DISCONNECTED = "disconnected before login"
    TOO_MANY_CONNECTIONS = "too many connections"
    PREAUTH_TIMEOUT = "pre-auth timeout"
    LOGGED_OUT = "logged out"
    BAD_COMMANDS = "too many invalid commands"
    PROTOCOL_ERROR = "protocol error"
    LOGIN_FAILED = "login failed"
    INTERNAL_ERROR = "internal error"
    DROPPED = "dropped"
    LOGGED_IN = "logged in"
    IDLE_TIMEOUT = "idle timeout"
    SHUTDOWN = "shutdown"
