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

from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from ._backend import BackendFailure, BackendProtocol, LoginJob, LoginState
from ._outcomes import EndReason, FailureKind
from ._routing import routeNow
from ._safetext import logQuote
from ._shared import MAX_FAILURES_COUNTED, accountKey, pairKey
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
    # No name (a bearer token, an empty user) is no account: every such
    # login would share one count.
    accountRecent = min(counter.failed(accountKey(credentials.user)), MAX_FAILURES_COUNTED) if credentials.user else 0
    if credentials.user:
        # What this account's owner forgives by logging in from here.
        counter.failed(pairKey(session.client.address, credentials.user))
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


def failurePenalty(session: FrontendProtocol, credentials: Credentials) -> float:
    """
    How long a login of C{session} with C{credentials} waits before it is
    routed, whatever its outcome will be: the failed-login delay that the
    failures so far of the session and of the client's address have
    earned, and at most one delay for those of the account.

    A wrong password is answered after the delay; without this wait a
    right one would be answered at once, and a client that hangs up when
    no success came at once would learn that a guess was wrong without
    waiting, and could guess as fast as it connects.  The account's own
    failures count for one delay only: anyone who knows an account's name
    can fail it, and its owner's logins must not wait for that.
    """
    counter = session.context.failures
    recent = min(counter.recent(session.client.address), MAX_FAILURES_COUNTED)
    accountRecent = min(counter.recent(accountKey(credentials.user)), 1) if credentials.user else 0
    return max(session.failures, recent, accountRecent) * session.limits.failureDelay


def failuresForgiven(session: FrontendProtocol, credentials: Credentials) -> None:
    """
    A login of C{session} with C{credentials} succeeded, the password
    checked: the failures of that account from the client's address are
    taken off the address's count (everywhere it is counted), and the
    account's own failures are forgotten.

    Behind a NAT or a mobile carrier's shared address, one user's typos
    would otherwise make every other user's logins wait for the next 15
    minutes.  Only the account's own failures are forgiven: a guesser that
    logs in to an account of its own between guesses at others keeps the
    count its guesses earned.
    """
    if not credentials.user:
        return
    counter = session.context.failures
    address = session.client.address
    pair = pairKey(address, credentials.user)
    own = counter.recent(pair)
    if own:
        counter.forgive(address, own)
        counter.forgive(pair, own)
    account = accountKey(credentials.user)
    accountCount = counter.recent(account)
    if accountCount:
        counter.forgive(account, accountCount)


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

    The steps follow one another as plain calls: L{run} asks the router,
    L{_routed} connects the backend with the login it found, and
    L{_loggedIn} or L{_failed} gives the outcome. Only a step that waits
    (a hold at the gate, a router that answers later, the backend's
    dialogue, the failed-login delay) is taken up again by a callback;
    the session hears the outcome through one Deferred.

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
        self._backendStarted = 0.0
        # When routing began: after the wait that failures earn
        # (failurePenalty), which is a delay, not the login's own time.
        self._routeStarted = self.started
        self._outcome: Deferred[BackendProtocol] = Deferred(self._cancel)
        # What the attempt waits for, if anything: the gate or the router,
        # the backend's login, or the failed-login delay. The session
        # cancels it when it ends (the client left).
        self._waitingFor: Deferred[Any] | IDelayedCall | None = None
        # The client left while the backend had the credentials: the
        # attempt still learns and counts the backend's answer.
        self._abandoned = False

    def run(self) -> Deferred[BackendProtocol]:
        """
        Route, connect and log in.

        @return: fires with the logged-in L{BackendProtocol}; or fails with
            L{LoginFailed} (after the failed-login delay), or with
            L{CancelledError} if it is cancelled because the session ended.
        """
        wait = failurePenalty(self.session, self.credentials)
        if wait > 0:
            # After failures, no answer comes sooner than this (see
            # failurePenalty); the router and the backend are asked after
            # it, so nothing waits half done meanwhile.
            self._waitingFor = self.session.context.reactor.callLater(wait, self._route)
        else:
            self._route()
        return self._outcome

    def _route(self) -> None:
        self._waitingFor = None
        session, context = self.session, self.session.context
        self._routeStarted = context.reactor.seconds()
        request = RouteRequest(
            protocol=session.protocolName,  # type: ignore[arg-type]
            credentials=self.credentials,
            client=session.client,
            attempt=self.number,
            clientID=self.clientID,
        )
        try:
            answer = routeNow(context.router, request, context.reactor, self._routerAnswered, context.gate)
        except Exception:
            self._routerFailed(Failure())
            return
        if isinstance(answer, Deferred):
            self._waitingFor = answer
            answer.addCallbacks(self._routed, self._routerFailed)
        else:
            self._routed(answer)

    def seconds(self) -> float:
        """
        How long this attempt took so far, the wait before routing after
        failures left out (it is a delay, as the failed-login delay is).
        """
        return self.session.context.reactor.seconds() - self._routeStarted

    def release(self) -> BackendProtocol | None:
        """
        The session takes the logged-in backend over (hand-over) or gives
        it up (the client left): this attempt no longer holds it.
        """
        if self._abandoned:
            # Kept until the backend has answered (see _cancel).
            return None
        backend, self.backend = self.backend, None
        return backend

    def _cancel(self, outcome: Deferred[BackendProtocol]) -> None:
        # The session ended: stop what the attempt waits for. A Deferred
        # cancelled fails with CancelledError, which the step passes on
        # (to _failed); the delay's call is simply not made.
        backend = self.backend
        if backend is not None and backend.state is LoginState.LOGIN and isinstance(self._waitingFor, Deferred):
            # The credentials are with the backend: its answer is awaited
            # all the same (within the backend timeout), and a refusal
            # counted and logged as any failed login. Else a client that
            # hangs up before a backend's slow "NO" (Dovecot waits before
            # it) would learn a right password from a quick OK and have
            # no wrong one ever counted.
            self._abandoned = True
            return
        waitingFor, self._waitingFor = self._waitingFor, None
        if waitingFor is not None:
            waitingFor.cancel()

    def _routerAnswered(self, seconds: float) -> None:
        context = self.session.context
        context.stats.routerAnswered(seconds, context.routerName)

    def _routerFailed(self, reason: Failure) -> None:
        self._waitingFor = None
        if reason.check(CancelledError) and self.session.closing:
            # The session ended while the router (or a move's hold) had the
            # login: it is abandoned, not failed, and must not be answered.
            self._failed(reason)
            return
        self.session.log.failure("router failed for session {session}", reason, session=self.session.client.sessionId)
        self._failed(Failure(LoginFailed(FailureKind.UNAVAILABLE)))

    def _routed(self, answer: Route | Rejection) -> None:
        self._waitingFor = None
        session, context = self.session, self.session.context
        try:
            self.backend = session.makeBackendLogin(self._loginJob(answer))
            self._backendStarted = context.reactor.seconds()
            loggingIn = context.backendConnector(context.reactor, self.backend)
        except Exception:
            self._failed(Failure())
            return
        self._waitingFor = loggingIn
        loggingIn.addCallbacks(self._loggedIn, self._backendFailed)

    def _loginJob(self, answer: Route | Rejection) -> LoginJob:
        """
        The backend login the router's C{answer} asks for.

        @raise _Rejected: the router refused the login.
        @raise LoginFailed: the route does not allow a backend login.
        """
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
                # A route (a validated token's, or master = true) that the
                # backend cannot serve: the operator's to fix, so said.
                session.log.warn(
                    "route for {user} logs in as backend {backend}'s master user, and it has no master_user",
                    user=logQuote(credentials.user),
                    backend=backend.name,
                )
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
        return LoginJob(
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

    def _backendDone(self, kind: str) -> None:
        session = self.session
        route = cast(Route, self.route)
        seconds = session.context.reactor.seconds() - self._backendStarted
        session.context.stats.backendLoginDone(session.protocolName, route.backend.name, kind, seconds)

    def _loggedIn(self, backend: BackendProtocol) -> None:
        self._waitingFor = None
        self._backendDone("ok")
        if self._abandoned:
            # Its client left meanwhile.
            self.backend = None
            backend.abandon()
            return
        if self.session.backendChecksLogins:
            failuresForgiven(self.session, self.credentials)
        self._outcome.callback(backend)

    def _backendFailed(self, reason: Failure) -> None:
        self._waitingFor = None
        if self._abandoned and not reason.check(BackendFailure):
            # No answer to count (the backend connection was lost).
            self.backend = None
            return
        if not reason.check(BackendFailure):
            # Abandoned (the client left), not an outcome.
            self._failed(reason)
            return
        failure = cast(BackendFailure, reason.value)
        self._backendDone(str(failure.kind))
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
        self._failed(Failure(LoginFailed(failure.kind, clientText=failure.clientText, saslError=failure.saslError)))

    def _failed(self, reason: Failure) -> None:
        try:
            self._refuse(reason)
        except Exception:
            # A bug in counting or logging the failure: the session hears
            # of it at once (its front end logs it and ends the session)
            # rather than waiting for its pre-auth timeout.
            self._outcome.errback()

    def _refuse(self, reason: Failure) -> None:
        # The delay runs from the start of the attempt, not from the
        # router's or the backend's answer: an unknown user (refused by the
        # router) and a wrong password (refused by the backend, later) are
        # answered at the same moment.
        session = self.session
        if reason.check(CancelledError):
            self._outcome.errback(reason)
            return
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
        if self._abandoned:
            # Counted; nobody is left to answer.
            return
        if session.failures >= session.limits.loginFailures:
            failure.close = True
        session.noteOutcome(EndReason.LOGIN_FAILED, failure.kind.value)
        clock = session.context.reactor
        wait -= clock.seconds() - self.started
        if wait <= 0:
            self._outcome.errback(Failure(failure))
        else:
            self._waitingFor = clock.callLater(wait, self._outcome.errback, Failure(failure))
