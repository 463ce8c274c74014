"""
The IMAP4 front end: what a client sees before it is logged in.

It answers CAPABILITY, NOOP, LOGOUT, STARTTLS, ID, LOGIN and AUTHENTICATE
(PLAIN and LOGIN, CRAM-MD5 with C{digest_auth}, with SASL-IR) itself, refuses everything else with the
RFC's BAD or NO, and on a successful backend login answers the client's
command with the backend's post-login capabilities before the relay starts.
Commands are dispatched through an explicit table, never by name lookup on
the object.
"""

from __future__ import annotations

from base64 import b64encode
from typing import Any, Callable, cast

from twisted.logger import Logger
from zope.interface import implementer

from .._commandloop import CommandFrontend, LoopState
from .._contract import ILoginFrontend
from .._outcomes import EndReason, FailureKind, SASLRefusal, StartTLSRefusal
from .._safetext import oneLine
from .._login import LoginFailed
from ..model import Credentials
from ._backend import IMAPBackendLogin
from ._parser import Atom, BadCommand, Command, CommandParser, Fatal, LiteralRequest

#: Longest pre-auth command line unless C{line_length} says otherwise:
#: Dovecot's C{imap_max_line_length}.  Before login Dovecot bounds each
#: argument (about 1 KiB), not the line, and answers an ID of any length;
#: clients send long ones (imaptest's C{id} test sends 30 KB).
LINE_LENGTH = 65536
#: Longest SASL response line: OAuth tokens are long, and Dovecot's own
#: authentication buffer is 8 KiB.
MAX_SASL_LINE = 12288
#: BAD replies after which the connection is closed, like Dovecot does.
MAX_BAD_COMMANDS = 10
#: RFC 2971 §3.3 limits on the client's ID.
MAX_ID_PAIRS, MAX_ID_KEY, MAX_ID_VALUE = 30, 30, 1024

#: Commands that exist but need an authenticated session.
_AFTER_LOGIN = frozenset(
    b"ENABLE SELECT EXAMINE CREATE DELETE RENAME SUBSCRIBE UNSUBSCRIBE LIST LSUB "
    b"NAMESPACE STATUS APPEND IDLE CHECK CLOSE UNSELECT EXPUNGE SEARCH FETCH STORE "
    b"COPY MOVE UID GETQUOTA GETQUOTAROOT SETQUOTA GETACL SETACL MYRIGHTS LISTRIGHTS "
    b"GETMETADATA SETMETADATA COMPRESS".split()
)

_PRIVACY_REQUIRED = "[PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."

_STARTTLS_REFUSALS = {
    StartTLSRefusal.ARGUMENTS: "STARTTLS takes no arguments.",
    StartTLSRefusal.ACTIVE: "TLS is already active.",
    StartTLSRefusal.UNAVAILABLE: "STARTTLS is not available on this port.",
}

#: How each SASL refusal is answered: C{NO} or C{BAD} (counted as an
#: invalid command), and the text.
_SASL_REFUSALS = {
    SASLRefusal.UNSUPPORTED: (b"NO", "Unsupported authentication mechanism."),
    SASLRefusal.PRIVACY_REQUIRED: (b"NO", _PRIVACY_REQUIRED),
    SASLRefusal.BAD_INITIAL_RESPONSE: (b"BAD", "Invalid initial response."),
    SASLRefusal.NO_INITIAL_RESPONSE: (b"BAD", "CRAM-MD5 takes no initial response."),
    SASLRefusal.BAD_BASE64: (b"BAD", "Invalid base64 data in continued response."),
    SASLRefusal.ABORTED: (b"BAD", "Authentication aborted by client."),
    SASLRefusal.AUTHORIZATION: (b"NO", "[AUTHORIZATIONFAILED] Authorization identity not supported."),
}


@implementer(ILoginFrontend)
class IMAPFrontend(CommandFrontend):
    """
    Pre-auth IMAP4rev1 for one client connection.

    The core (L{CommandFrontend}) decides; this class reads IMAP and words
    the outcomes; the C{command} it hands the core is the L{Command}, whose
    tag the answers carry.  States: those of L{LoopState}.
    """

    protocolName = "imap"
    maxBadCommands = MAX_BAD_COMMANDS
    badCommandsGoodbye = "Too many invalid IMAP commands."
    log = Logger()
    #: The method answering each command, by name: one table for every
    #: session (a table of bound methods would cost each session its own).
    _commands = {
        b"CAPABILITY": "do_CAPABILITY",
        b"NOOP": "do_NOOP",
        b"LOGOUT": "do_LOGOUT",
        b"STARTTLS": "do_STARTTLS",
        b"ID": "do_ID",
        b"LOGIN": "do_LOGIN",
        b"AUTHENTICATE": "do_AUTHENTICATE",
    }

    def __init__(self, context, listener) -> None:
        super().__init__(context, listener)
        self.input: CommandParser = CommandParser(self.limits.lineLengthFor(LINE_LENGTH), self.limits.literalSize)
        self.capabilityAsked = False

    # Wire helpers

    def reply(self, tag: bytes, status: bytes, text: str) -> None:
        """
        Write a tagged completion result.
        """
        self.sendLine(tag + b" " + status + b" " + text.encode("utf-8"))

    def capabilities(self) -> bytes:
        """
        The pre-login capability list, reflecting TLS state (the same for
        every session of a listener in the same state: made once).
        """
        return self.perListener("capabilities", self._capabilities)

    def _capabilities(self) -> bytes:
        caps = [b"IMAP4rev1", b"SASL-IR", b"ID", b"ENABLE", b"IDLE", b"LITERAL+"]
        if self.tlsAvailable:
            caps.append(b"STARTTLS")
        if self.plaintextLoginAllowed:
            caps += [b"AUTH=" + mechanism.encode("ascii") for mechanism in self.offeredMechanisms()]
        else:
            caps.append(b"LOGINDISABLED")
        return b" ".join(caps)

    # The contract (ILoginFrontend)

    def greet(self) -> None:
        self.sendLine(self.perListener("greeting", self._greeting))

    def _greeting(self) -> bytes:
        return b"* OK [CAPABILITY " + self.capabilities() + b"] " + self.context.hostname.encode("idna") + b" IMAP proxy ready."

    def sayGoodbye(self, reason: EndReason, text: str) -> None:
        self.sendLine(b"* BYE " + oneLine(text, ascii=True).encode("ascii"))

    def answerStartTLS(self, command: Command, refusal: StartTLSRefusal | None) -> None:
        if refusal is None:
            self.reply(command.tag, b"OK", "Begin TLS negotiation now.")
        else:
            self._bad(command.tag, _STARTTLS_REFUSALS[refusal])

    def forgetBeforeTLS(self) -> None:
        self.capabilityAsked = False
        self.clientID = ()

    def saslChallenge(self, command: Command, data: bytes) -> None:
        self.sendLine(b"+ " + b64encode(data))

    def answerSASLRefusal(self, command: Command, refusal: SASLRefusal, mechanism: str) -> None:
        status, text = _SASL_REFUSALS.get(refusal, (b"BAD", "Invalid " + mechanism + " response."))
        if status == b"BAD":
            self._bad(command.tag, text)
        else:
            self.reply(command.tag, status, text)

    def answerLogin(self, command: Command, backend: Any) -> None:
        login = cast(IMAPBackendLogin, backend)
        for line in login.untagged:
            self.sendLine(line)
        caps = b" ".join(login.postLoginCapabilities())
        if self.capabilityAsked:
            self.sendLine(b"* CAPABILITY " + caps)
        self.sendLine(command.tag + b" OK [CAPABILITY " + caps + b"] " + (login.okText or b"Logged in"))

    def answerLoginFailure(self, command: Command, failure: LoginFailed) -> None:
        tag = command.tag
        if failure.kind is FailureKind.AUTH:
            self.reply(tag, b"NO", "[AUTHENTICATIONFAILED] " + (oneLine(failure.message, ascii=True) or "Authentication failed."))
        elif failure.kind is FailureKind.REFUSED and failure.clientText:
            self.sendLine(tag + b" " + failure.clientText.encode("utf-8"))
        else:
            self.reply(tag, b"NO", "[UNAVAILABLE] " + (oneLine(failure.message, ascii=True) or "Service temporarily unavailable, try again later."))

    # The command loop

    def readSASLResponse(self) -> bool:
        line = self.input.nextLine(MAX_SASL_LINE)
        if line is None:
            return False
        if isinstance(line, Fatal):
            self.end(EndReason.PROTOCOL_ERROR, line.reason, detail=line.reason)
        else:
            self.saslResponse(line.data.strip())
        return True

    def readCommand(self) -> bool:
        event = self.input.next()
        if event is None:
            return False
        if isinstance(event, Command):
            handler = self._commands.get(event.name)
            if handler is not None:
                getattr(self, handler)(event)
            elif event.name in _AFTER_LOGIN:
                self._bad(event.tag, "Command not permitted before authentication.")
            else:
                self._bad(event.tag, "Unknown command.")
        elif isinstance(event, LiteralRequest):
            self.sendLine(b"+ Ready for literal data")
            self.input.acceptLiteral()
        elif isinstance(event, BadCommand):
            text = ("[" + event.code + "] " if event.code else "") + event.reason
            self._bad(event.tag, text)
        else:
            self.end(EndReason.PROTOCOL_ERROR, event.reason, detail=event.reason)
        return True

    def _bad(self, tag: bytes | None, text: str) -> None:
        self.reply(tag if tag is not None else b"*", b"BAD", text)
        self.countBadCommand()

    # Commands

    def do_CAPABILITY(self, command: Command) -> None:
        self.capabilityAsked = True
        self.sendLine(b"* CAPABILITY " + self.capabilities())
        self.reply(command.tag, b"OK", "Pre-login capabilities listed, post-login capabilities have more.")

    def do_NOOP(self, command: Command) -> None:
        self.reply(command.tag, b"OK", "NOOP completed.")

    def do_LOGOUT(self, command: Command) -> None:
        self.sendLine(b"* BYE Logging out")
        self.reply(command.tag, b"OK", "Logout completed.")
        self.end(EndReason.LOGGED_OUT)

    def do_STARTTLS(self, command: Command) -> None:
        self.startTLSCommand(command, hasArguments=bool(command.args))

    def do_ID(self, command: Command) -> None:
        if len(command.args) != 1:
            self._bad(command.tag, "ID takes one argument.")
            return
        (arg,) = command.args
        if isinstance(arg, Atom) and arg.value.upper() == b"NIL":
            pairs: list[tuple[str, str]] = []
        elif isinstance(arg, tuple) and len(arg) % 2 == 0 and all(isinstance(v, (bytes, Atom)) for v in arg):
            pairs = []
            for key, value in zip(arg[0::2], arg[1::2]):
                if not isinstance(key, bytes) or len(key) > MAX_ID_KEY:
                    continue
                # A value is bytes or an Atom (NIL), checked above.
                if not isinstance(value, bytes) or len(value) > MAX_ID_VALUE:
                    continue
                pairs.append((key.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
        else:
            self._bad(command.tag, "Invalid ID parameters.")
            return
        # Only the first ID counts, as with Dovecot; the pairs are kept for
        # the router and (without any x- keys) for the backend.
        if not self.clientID:
            self.clientID = tuple(pairs[:MAX_ID_PAIRS])
        self.sendLine(b'* ID ("name" "mailproxy")')
        self.reply(command.tag, b"OK", "ID completed.")

    def do_LOGIN(self, command: Command) -> None:
        args = command.args
        # Each argument is an atom or a string (quoted or a literal), not a
        # list; looked at one by one, as every login does.
        if len(args) != 2:
            self._bad(command.tag, "LOGIN takes a user name and a password.")
            return
        user, password = args
        user = user.value if isinstance(user, Atom) else user
        password = password.value if isinstance(password, Atom) else password
        if not (isinstance(user, bytes) and isinstance(password, bytes)):
            self._bad(command.tag, "LOGIN takes a user name and a password.")
            return
        if not self.plaintextLoginAllowed:
            self.reply(command.tag, b"NO", _PRIVACY_REQUIRED)
            return
        self.loginWith(command, Credentials("LOGIN", user.decode("utf-8", "surrogateescape"), password=password))

    def do_AUTHENTICATE(self, command: Command) -> None:
        args = command.args
        if not 1 <= len(args) <= 2 or not isinstance(args[0], Atom):
            self._bad(command.tag, "AUTHENTICATE takes a mechanism and an optional initial response.")
            return
        initial: bytes | None = None
        if len(args) == 2:
            raw = args[1].value if isinstance(args[1], Atom) else args[1]
            initial = raw if isinstance(raw, bytes) else None
        self.authenticate(
            command,
            args[0].value.decode("ascii", "replace"),
            initial,
            badInitialResponse=len(args) == 2 and initial is None,
        )
