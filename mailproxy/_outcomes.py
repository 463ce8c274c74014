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
    #: The protocol is in the middle of something TLS must not cut (an
    #: SMTP mail transaction).
    TRANSACTION = "transaction"


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
    #: The initial response is not a string in the protocol's syntax.
    BAD_INITIAL_RESPONSE = "bad initial response"


class EndReason(str, Enum):
    """
    Why a session ended, as the session-end log line says it (C{reason=}).
    A C{str} enum, like L{FailureKind}: its value is the log word.

    The values are the log words; a reason may carry a detail, which
    L{words} joins to them (C{protocol error: line too long}).  The
    protocols phrase their goodbye by the reason, never by its text.
    """

    DISCONNECTED = "disconnected before login"
    TOO_MANY_CONNECTIONS = "too many connections"
    PREAUTH_TIMEOUT = "pre-auth timeout"
    #: The client said goodbye (IMAP and ManageSieve LOGOUT, POP3 QUIT).
    LOGGED_OUT = "logged out"
    #: The client said goodbye with SMTP's QUIT.
    QUIT = "quit"
    BAD_COMMANDS = "too many invalid commands"
    #: SMTP's words for L{BAD_COMMANDS}.
    TOO_MANY_ERRORS = "too many errors"
    #: The input cannot be read any further; the detail says why.
    PROTOCOL_ERROR = "protocol error"
    #: A failed login ended the session; the detail is its L{FailureKind}.
    LOGIN_FAILED = "login failed"
    #: SMTP's words for a failed login that ends the session.
    TOO_MANY_FAILED_LOGINS = "too many failed logins"
    INTERNAL_ERROR = "internal error"
    #: Ended from outside (an operator, a move); the detail is the text
    #: the client was given.
    DROPPED = "dropped"
    #: Ended from outside because the proxy stops; logged as a drop
    #: (C{dropped: Server shutting down.}), phrased as a shutdown (SMTP's
    #: C{421 4.3.2}).
    SHUTDOWN = "shutdown"
    LOGGED_IN = "logged in"
    IDLE_TIMEOUT = "idle timeout"
    #: After the hand-over: the client closed (or half-closed) first.
    CLIENT_CLOSED = "client closed"
    #: After the hand-over: the backend closed (or half-closed) first.
    BACKEND_CLOSED = "backend closed"
    #: After the hand-over: a socket failed (reset, broken pipe).
    CONNECTION_RESET = "connection reset"
    #: An SMTP MX session that delivered nothing.
    NO_MAIL = "no mail"
    #: An SMTP MX session whose backends accepted messages; the detail is
    #: how many (C{2 message(s) accepted}).
    MESSAGES_ACCEPTED = "message(s) accepted"
    #: An SMTP MX session closed for client silence.
    TIMEOUT = "timeout"
    #: An SMTP MX session the router asked to close.
    CLOSED_BY_ROUTER = "closed by the router"
    #: An SMTP session refused at EHLO because no backend's extensions
    #: are known (each is down, or its certificate fails): the client is
    #: to try again later rather than be offered none.
    BACKENDS_UNKNOWN = "no backend's extensions known"

    def __str__(self) -> str:
        return self.value

    def words(self, detail: str = "") -> str:
        """
        The log words for this reason with C{detail}: C{"reason: detail"},
        or the reason alone without a detail.
        """
        if not detail:
            return self.value
        if self is EndReason.MESSAGES_ACCEPTED:
            return f"{detail} {self.value}"
        if self is EndReason.SHUTDOWN:
            return f"{EndReason.DROPPED.value}: {detail}"
        return f"{self.value}: {detail}"
