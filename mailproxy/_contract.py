"""
The contract between the session core and a protocol's front end: the core
decides, the protocol words it.

The core (L{mailproxy._session}, L{mailproxy._commandloop},
L{mailproxy._login}) owns every decision a session takes whatever its
protocol: whether STARTTLS may start now, the SASL exchange (base64, C{*}
to cancel, the mechanism's steps), routing and logging in at the backend,
slowing failed logins, when a session ends and why.  A protocol's front
end reads its own syntax, calls the core's entry points with what the
client asked, and implements the interfaces below, which only put an
outcome (an enum of L{mailproxy._outcomes}) into the protocol's words.

A front end derives from L{mailproxy._commandloop.CommandLoop} (a session
without a login: SMTP MX; it implements L{IProtocolFrontend}) or from
L{mailproxy._commandloop.CommandFrontend} (a session whose client logs in;
L{ILoginFrontend}).  Below them, L{mailproxy._session.Session} is a
connection (limits, registry, timers, TLS, the session-end line) and
L{mailproxy._session.FrontendProtocol} adds the login
(L{mailproxy._login.LoginAttempt}) and the hand-over to the relay.

Entry points the core offers a protocol (L{mailproxy._commandloop},
L{mailproxy._session}):

  - C{startTLSCommand(command, hasArguments, inTransaction)}: the client
    asked for TLS;
  - C{authenticate(command, mechanism, initialResponse,
    badInitialResponse)}: the client started a SASL exchange;
    C{saslResponse(response)}: it answered a challenge;
    C{abandonSASL()}: its answer could not be read;
  - C{loginWith(command, credentials)}: the client gave credentials in a
    command of its own (IMAP LOGIN, POP3 USER/PASS, APOP); the front end's
    C{clientID} (IMAP ID) goes with them;
  - C{countBadCommand()}: an invalid command was answered;
  - C{end(reason, goodbye, detail)}: the one way a session ends;
    C{noteOutcome(reason, detail)}: what the session-end line says if the
    client leaves first;
  - hooks for timers of the protocol's own (L{mailproxy._session.Timer}):
    C{sessionOpened}, C{connectionClosing}, C{sessionLost}.

C{command} is the protocol's own object for the command being answered
(IMAP needs its tag); the core hands it back untouched to the phrasing
methods.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface

__all__ = ["IClientInput", "IProtocolFrontend", "ILoginFrontend", "ISessionObserver"]


class IClientInput(Interface):
    """
    A front end's buffer of client octets not yet answered (its parser).
    """

    def feed(data: bytes) -> None:
        """
        Add client octets.
        """

    def clear() -> None:
        """
        Forget everything buffered (at STARTTLS: what arrived in clear
        after the command could have been injected, CVE-2011-0411).
        """

    def takeRemaining() -> bytes:
        """
        Remove and return everything buffered (at hand-over: what the
        client pipelined behind its login goes to the backend).
        """

    def unfinished() -> bool:
        """
        Whether a command is read in part, the rest still to come: a
        client may hold the rest back until what it sent is acknowledged.
        """


class IProtocolFrontend(Interface):
    """
    What every protocol's front end implements, with or without a login:
    its syntax and the words for the core's outcomes.
    """

    protocolName = Attribute("The protocol's name: C{imap}, C{pop3}, C{sieve} or C{smtp}.")
    input = Attribute("The L{IClientInput} the front end reads its commands from.")

    def greet() -> None:
        """
        Write the protocol's greeting.
        """

    def sayGoodbye(reason: Any, text: str) -> None:
        """
        Write the protocol's last words before the proxy closes the
        connection (IMAP C{* BYE}, ManageSieve C{BYE}, SMTP C{421}).

        @param reason: why the session ends, an
            L{mailproxy._outcomes.EndReason}; the protocol may choose its
            words (or a status code) by it, or write nothing (POP3 has no
            goodbye after a failed login's C{-ERR}).
        @param text: the core's words for the client: one line, no
            protocol syntax.
        """

    def processInput() -> None:
        """
        Read and answer buffered input while the loop's state allows and
        the client reads its replies; called by the core's C{process}.  The
        core's loop calls L{readCommand}; a protocol with input states of
        its own (SMTP's message data) extends it.
        """

    def readCommand() -> bool:
        """
        Read one buffered command and answer it (or hand it to the core).

        @return: C{False} if no complete command is buffered (the loop
            waits for more input), C{True} to go on.
        """

    def answerStartTLS(command: Any, refusal: Any) -> None:
        """
        Answer a STARTTLS (STLS) command.

        @param refusal: why it is refused, a
            L{mailproxy._outcomes.StartTLSRefusal}; or L{None}: write the
            go-ahead, after which the core discards buffered input,
            calls L{forgetBeforeTLS} and starts TLS.
        """

    def forgetBeforeTLS() -> None:
        """
        Forget what the client said before TLS (RFC 2595 section 4, RFC
        3207 section 4.2: a user name, a client ID, an EHLO name); the
        buffered input is already discarded.
        """


class ILoginFrontend(IProtocolFrontend):
    """
    What a front end implements whose clients log in (everything but SMTP
    MX): the words for the SASL exchange and the login's outcome, and the
    protocol's backend login.
    """

    def saslMechanisms() -> Any:
        """
        The SASL mechanism names (upper case C{str}) this listener supports,
        whether or not the connection may use them now (the core refuses
        them before TLS where the listener asks for TLS first).  The core
        answers it from the listener for every protocol
        (L{mailproxy._commandloop.CommandFrontend.saslMechanisms}); a
        protocol overrides it only to offer less.
        """

    def readSASLResponse() -> bool:
        """
        Read one buffered response to a SASL challenge and give it to the
        core's C{saslResponse} (or, if it cannot be read, answer it and
        call the core's C{abandonSASL}).

        @return: C{False} if no complete response is buffered, C{True} to
            go on.
        """

    def saslChallenge(command: Any, data: bytes) -> None:
        """
        Write a SASL challenge in the protocol's framing (POP3 and IMAP
        C{+ }, SMTP C{334 }, ManageSieve a quoted string).

        @param data: the challenge before base64.
        """

    def answerSASLRefusal(command: Any, refusal: Any, mechanism: str) -> None:
        """
        Answer an authentication exchange that ends without a login, for
        the L{mailproxy._outcomes.SASLRefusal} given.  Counting it as an
        invalid command (L{countBadCommand}) is the protocol's choice.
        """

    def answerLogin(command: Any, backend: Any) -> Any:
        """
        Write the client's success reply for the logged-in backend (a
        L{mailproxy._backend.BackendProtocol} of L{makeBackendLogin}).

        @return: the L{mailproxy._guard.IRelayGuard} the relay applies to
            what the client says to the backend, or L{None}.  The core then
            hands the session over with the input still buffered.
        """

    def answerLoginFailure(command: Any, failure: Any) -> None:
        """
        Write the client's reply to a failed login (a
        L{mailproxy._session.LoginFailed}: its C{kind} is a
        L{mailproxy._outcomes.FailureKind}).  The core then either reads the
        next command or, if C{failure.close}, ends the session.
        """

    def makeBackendLogin(job: Any) -> Any:
        """
        The protocol's backend login dialogue (a
        L{mailproxy._backend.BackendProtocol}) for a
        L{mailproxy._backend.LoginJob}.  The core provides it from the
        protocol registry's C{backendLogin}; a protocol overrides it only
        when its dialogue needs more than the job, the reactor and the
        backend timeout.
        """


class ISessionObserver(Interface):
    """
    Told by a L{mailproxy._registry.SessionRegistry} (see its C{observe})
    when a session logs in and when it ends.
    """

    def sessionLoggedIn(session: Any) -> None:
        """
        C{session} was handed over to its backend: its C{user} and
        C{backendName} are known, and it relays.
        """

    def sessionEnded(session: Any) -> None:
        """
        C{session} closed (logged in or not) and left the registry.
        """
