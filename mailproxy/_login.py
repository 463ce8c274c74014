"""
One login of one session, from the client's credentials to a logged-in
backend or a refusal (L{LoginAttempt}).

The steps, whatever the protocol: wait at the gate (an account held while
it moves), ask the router (timed), turn a L{Route} into a L{LoginJob} (the
backend's user and password, or its master user), connect the backend and
log in there (timed); a refusal or a failure becomes a L{LoginFailed},
answered only after the failed-login delay, with the line fail2ban reads.
The protocol's front end only phrases the outcome (see
L{mailproxy._contract.ILoginFrontend}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from ._backend import BackendFailure, BackendProtocol, LoginJob
from ._outcomes import EndReason, FailureKind
from ._routing import routeLogin
from ._safetext import logQuote
from ._shared import MAX_FAILURES_COUNTED, accountKey
from .model import Credentials, Rejection, Route, RouteRequest

if TYPE_CHECKING:
    from ._session import FrontendProtocol

__all__ = ["LoginAttempt", "LoginFailed", "authenticationFailed"]


class LoginFailed(Exception):
    """
    A login attempt did not lead to a backend session; the front end phrases
    the refusal.

    @ivar kind: a L{FailureKind}: bad credentials or an unknown account,
        router or backend trouble, or the backend's own coded refusal (in
        C{clientText}).
    @ivar message: the router's text, if it gave one.
    @ivar clientText: the backend's own refusal line, for
        L{FailureKind.REFUSED}.
    @ivar close: the connection is to be closed after the reply.
    @ivar saslError: the backend's error challenge to an OAuth login passed
        through (RFC 7628's JSON), for the client; empty if none.
    """

    def __init__(
        self, kind: FailureKind | str, message: str = "", clientText: str = "", close: bool = False, saslError: bytes = b""
    ) -> None:
        kind = FailureKind(kind)
        super().__init__(kind.value)
        self.kind = kind
        self.message = message
        self.clientText = clientText
        self.close = close
        self.saslError = saslError


def authenticationFailed(session: FrontendProtocol, credentials: Credentials, attempt: int) -> float:
    """
    Count a login of C{session} refused for its credentials (by the router
    or the backend) and log the line fail2ban reads.

    @param attempt: which login attempt of the session it was.
    @return: how long after the attempt began the refusal is to be
        answered (the failed-login delay).
    """
    session.failures += 1
    # The delay grows with the failures of the client's address in every
    # session (of every worker, of every proxy of a fleet) lately, not only
    # in this one: a client gains nothing by reconnecting after each.
    # Likewise with the account's failures: guessing one account's password
    # from many addresses gains nothing either.
    counter = session.context.failures
    recent = min(counter.failed(session.client.address), MAX_FAILURES_COUNTED)
    accountRecent = min(counter.failed(accountKey(credentials.user)), MAX_FAILURES_COUNTED)
    # A stable line for fail2ban (examples/fail2ban): the address comes
    # before anything the client chose.
    session.log.info(
        "authentication failed: session={session} address={address} protocol={protocol} "
        "user={user} attempt={attempt}",
        event="login_failed",
        session=session.client.sessionId,
        address=session.client.address,
        port=session.client.port,
        protocol=session.protocolName,
        user=logQuote(credentials.user),
        mechanism=credentials.mechanism,
        attempt=attempt,
        addressFailures=recent,
        accountFailures=accountRecent,
    )
    return max(session.failures, recent, accountRecent) * session.limits.failureDelay


class _Rejected(Exception):
    def __init__(self, rejection: Rejection) -> None:
        super().__init__("rejected")
        self.rejection = rejection


class LoginAttempt:
    """
    One login of a session.

    The session counts its attempts and failures (the delay grows with
    them), keeps its latest attempt for the session-end line and reads
    C{route} and C{backend} from it.

    @ivar number: which attempt of the session this is, from 1.
    @ivar credentials: what the client logged in with.
    @ivar started: when the attempt started, on the session's clock.
    @ivar route: the router's answer, once it gave one.
    @ivar backend: the backend login, from its start until it failed or
        the session took it over (L{release}).
    """

    def __init__(
        self, session: FrontendProtocol, credentials: Credentials, clientID: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.session = session
        self.number = session.attempts
        self.credentials = credentials
        self.clientID = clientID
        self.started = session.context.reactor.seconds()
        self.route: Route | None = None
        self.backend: BackendProtocol | None = None

    def run(self) -> Deferred[BackendProtocol]:
        """
        Route, connect and log in.

        @return: fires with the logged-in L{BackendProtocol}; or fails with
            L{LoginFailed} (after the failed-login delay), or with
            L{CancelledError} if it is cancelled because the session ended.
        """
        session, context = self.session, self.session.context
        request = RouteRequest(
            protocol=session.protocolName,  # type: ignore[arg-type]
            credentials=self.credentials,
            client=session.client,
            attempt=self.number,
            clientID=self.clientID,
        )
        routed = routeLogin(
            context.router,
            request,
            context.reactor,
            lambda seconds: context.stats.routerAnswered(seconds, context.routerName),
            context.gate,
        )
        d: Deferred[BackendProtocol] = routed.addCallbacks(self._routed, self._routerFailed)  # type: ignore[arg-type]
        d.addErrback(self._delayFailure)
        return d

    def seconds(self) -> float:
        """
        How long this attempt took so far.
        """
        return self.session.context.reactor.seconds() - self.started

    def release(self) -> BackendProtocol | None:
        """
        The session takes the logged-in backend over (hand-over) or gives
        it up (the client left): this attempt no longer holds it.
        """
        backend, self.backend = self.backend, None
        return backend

    def _routerFailed(self, reason: Failure) -> Failure:
        if reason.check(CancelledError) and self.session.closing:
            # The session ended while the router (or a move's hold) had the
            # login: it is abandoned, not failed, and must not be answered.
            return reason
        reason.trap(Exception)
        self.session.log.failure("router failed for session {session}", reason, session=self.session.client.sessionId)
        raise LoginFailed(FailureKind.UNAVAILABLE)

    def _routed(self, answer: Route | Rejection) -> Deferred[BackendProtocol]:
        session, credentials = self.session, self.credentials
        if isinstance(answer, Rejection) and answer.unknown and not answer.temporary:
            # The router does not know the account at all; the front end
            # may have a backend of its own for it (HTTP: a bearer token no
            # router could place goes to the default backend, which judges
            # it).
            placed = session.routeUnknown(credentials)
            if placed is not None:
                answer = placed
        if isinstance(answer, Rejection):
            session.log.info(
                "login refused by router: session={session} user={user} temporary={temporary}",
                session=session.client.sessionId,
                user=logQuote(credentials.user),
                temporary=answer.temporary,
            )
            raise _Rejected(answer)
        if not isinstance(answer, Route):
            raise TypeError(f"router returned {type(answer).__name__}, not Route or Rejection")
        self.route = session.route = answer
        backend = answer.backend
        user = answer.user if answer.user is not None else credentials.user
        password = answer.password if answer.password is not None else credentials.password
        masterUser = masterPassword = None
        if answer.useMaster:
            if backend.masterUser is None:
                raise LoginFailed(FailureKind.UNAVAILABLE)
            masterUser, masterPassword, password = backend.masterUser, backend.masterPassword, None
        elif password is None and credentials.token is None:
            # A digest mechanism and a router that gave no password: nothing
            # to log in with at the backend.  (An OAuth token without one
            # goes to the backend, which validates it.)
            session.log.warn(
                "route for {user} has no password for the backend ({mechanism})",
                user=logQuote(credentials.user),
                mechanism=credentials.mechanism,
            )
            raise LoginFailed(FailureKind.UNAVAILABLE)
        job = LoginJob(
            route=answer,
            protocol=session.protocolName,
            client=session.client,
            credentials=credentials,
            user=user,
            password=password,
            masterUser=masterUser,
            masterPassword=masterPassword,
            clientID=self.clientID,
        )
        self.backend = session.makeBackendLogin(job)
        clock = session.context.reactor
        started = clock.seconds()

        def timed(result: object) -> object:
            kind = "ok"
            if isinstance(result, Failure):
                if not result.check(BackendFailure):
                    # Abandoned (the client left), not an outcome.
                    return result
                kind = str(cast(BackendFailure, result.value).kind)
            session.context.stats.backendLoginDone(session.protocolName, backend.name, kind, clock.seconds() - started)
            return result

        d = session.context.backendConnector(clock, self.backend)
        d.addBoth(timed)
        d.addErrback(self._backendFailed)
        return d

    def _backendFailed(self, reason: Failure) -> None:
        reason.trap(BackendFailure)
        failure = cast(BackendFailure, reason.value)
        self.backend = None
        self.session.log.info(
            "backend login failed: session={session} user={user} backend={backend} {kind}: {detail}",
            session=self.session.client.sessionId,
            user=logQuote(self.credentials.user),
            backend=self.route.backend.name if self.route else None,
            kind=str(failure.kind),
            # The backend's words, which may repeat the client's.
            detail=logQuote(failure.detail),
        )
        raise LoginFailed(failure.kind, clientText=failure.clientText, saslError=failure.saslError)

    def _delayFailure(self, reason: Failure) -> Deferred[None] | Failure:
        # The delay runs from the start of the attempt, not from the
        # router's or the backend's answer: an unknown user (refused by the
        # router) and a wrong password (refused by the backend, later) are
        # answered at the same moment.
        session = self.session
        if reason.check(CancelledError):
            return reason
        if reason.check(_Rejected):
            rejection = cast(_Rejected, reason.value).rejection
            failure = LoginFailed(
                FailureKind.UNAVAILABLE if rejection.temporary else FailureKind.AUTH,
                message=rejection.message,
                close=rejection.close,
            )
            wait = rejection.wait
        elif reason.check(LoginFailed):
            failure = cast(LoginFailed, reason.value)
            wait = 0.0
        else:
            session.log.failure("login failed unexpectedly", reason)
            failure, wait = LoginFailed(FailureKind.UNAVAILABLE), 0.0
        session.context.stats.loginFailed(
            session.protocolName, session.backendName or "", failure.kind.value, self.seconds()
        )
        if failure.kind is FailureKind.AUTH:
            wait += authenticationFailed(session, self.credentials, self.number)
        if session.failures >= session.limits.loginFailures:
            failure.close = True
        session.noteOutcome(EndReason.LOGIN_FAILED, failure.kind.value)

        def deliver(_: object) -> None:
            raise failure

        clock = session.context.reactor
        wait -= clock.seconds() - self.started
        if wait <= 0:
            raise failure
        delayed: Deferred[None] = Deferred(lambda d: call.cancel())
        call = clock.callLater(wait, delayed.callback, None)
        return delayed.addCallback(deliver)
