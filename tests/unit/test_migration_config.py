"""
Tests for the C{[migration]} table of L{mailproxy.config} and its place in
C{mailproxy config show}.
"""

from __future__ import annotations

import io
import os
import sys
import tomllib

import attrs

from mailproxy.cli import main
from mailproxy.config import ConfigError, loadConfig, parseConfig
from mailproxy.migration import MigrationSettings

from .test_config import BACKEND, ConfigTestCase, configText

NEW = '[backend.new]\nhost = "127.0.0.2"\nports = { imap = 143 }\n'


class MigrationConfigTests(ConfigTestCase):
    """
    C{[migration]}: defaults, every key, and every refusal in the style of
    the rest of the configuration.
    """

    def test_defaults(self) -> None:
        """
        Without C{[migration]}, or with an empty one, the engine's defaults:
        no migration on login, the journal beside the configuration, four
        accounts at once, the tools found in C{PATH}.
        """
        beside = MigrationSettings(journal=os.path.join(self.directory, "migrations.json"))
        self.assertEqual(self.parse(configText()).migration, beside)
        self.assertEqual((MigrationSettings().onLogin, MigrationSettings().concurrency), (None, 4))
        self.assertEqual(self.parse(configText(extra=NEW + "[migration]\n")).migration, beside)

    def test_everyKey(self) -> None:
        """
        Every key is read; domains are folded to lower case, relative paths
        resolved against the configuration's directory; a bare tool name
        stays as it is (found in C{PATH} when run).
        """
        os.makedirs(os.path.join(self.directory, "state"))
        settings = self.parse(
            configText(
                extra=NEW
                + '[migration]\non_login = "new"\non_login_domains = ["Example.ORG", "example.net"]\n'
                'journal = "state/migrations.journal"\nconcurrency = 8\ndoveadm = "bin/doveadm"\nmbsync = "mbsync"\n'
            )
        ).migration
        self.assertEqual(
            settings,
            MigrationSettings(
                onLogin="new",
                onLoginDomains=("example.org", "example.net"),
                journal=os.path.join(self.directory, "state", "migrations.journal"),
                concurrency=8,
                doveadm=os.path.join(self.directory, "bin", "doveadm"),
                mbsync="mbsync",
            ),
        )

    def test_toolCommandLines(self) -> None:
        """
        C{doveadm} and C{mbsync} are command lines (the engine splits them
        like a shell would): a wrapper with absolute paths is kept as
        written; only a relative first word is resolved against the
        configuration's directory, the arguments after it are left alone.
        """
        for written, expected in (
            ("sudo -n /usr/bin/doveadm", "sudo -n /usr/bin/doveadm"),
            ("/usr/bin/sudo -n -u vmail /usr/bin/doveadm", "/usr/bin/sudo -n -u vmail /usr/bin/doveadm"),
            ("bin/wrap --config etc/x.conf", f"{self.directory}/bin/wrap --config etc/x.conf"),
            ("'my tools/doveadm' -v", f"'{self.directory}/my tools/doveadm' -v"),
        ):
            settings = self.parse(configText(extra=f"{NEW}[migration]\ndoveadm = {written!r}\nmbsync = {written!r}\n")).migration
            self.assertEqual((settings.doveadm, settings.mbsync), (expected, expected), written)

    def test_toolCommandLineRefused(self) -> None:
        """
        A command line a shell could not split, or one without a word, is
        refused at its key.
        """
        self.assertConfigError(
            configText(extra=NEW + '[migration]\ndoveadm = "sudo \'doveadm"\n'), "migration.doveadm", "not a command line"
        )
        self.assertConfigError(configText(extra=NEW + '[migration]\nmbsync = " "\n'), "migration.mbsync", "must name a command")

    def test_onLoginRule(self) -> None:
        """
        C{on_login_rule} is kept as written (a pattern over the routers'
        rule texts); like C{on_login_domains} it needs C{on_login}.
        """
        settings = self.parse(
            configText(extra=NEW + '[migration]\non_login = "new"\non_login_rule = "*ou=Wave1,*"\n')
        ).migration
        self.assertEqual(settings.onLoginRule, "*ou=Wave1,*")
        self.assertConfigError(
            configText(extra=NEW + '[migration]\non_login_rule = "ldap *"\n'), "migration.on_login_rule", "needs on_login"
        )

    def test_toolsAndTimeouts(self) -> None:
        """
        C{tools} picks the tool per target backend, C{doveadm_config} names
        the target Dovecot's configuration on this host (a file that must
        be readable); the time limits are positive numbers of seconds.
        """
        dovecot = self.write("dovecot.conf", "# the new server\n")
        settings = self.parse(
            configText(
                extra=NEW
                + '[migration]\ntools = { new = "doveadm", old = "mbsync" }\ndoveadm_config = { new = "dovecot.conf" }\n'
                "copy_timeout = 3600\nhold_timeout = 30.5\nclient_timeout = 60\nsession_poll = 1\nsync_attempts = 3\n"
            )
        ).migration
        self.assertEqual(settings.tools, {"new": "doveadm", "old": "mbsync"})
        self.assertEqual(settings.doveadmConfig, {"new": dovecot})
        self.assertEqual(
            (settings.copyTimeout, settings.holdTimeout, settings.clientTimeout, settings.sessionPoll, settings.syncAttempts),
            (3600.0, 30.5, 60.0, 1.0, 3),
        )
        self.assertEqual(settings.toolFor("new"), "doveadm")

    def test_toolsRefused(self) -> None:
        """
        A tool that does not exist, a backend that is not configured, a
        Dovecot configuration that cannot be read, and a time limit of 0
        are each refused at their key.
        """
        missing = os.path.join(self.directory, "missing.conf")
        for extra, key, fragment in (
            ('tools = { new = "imapsync" }', "migration.tools.new", "must be one of doveadm, mbsync, not 'imapsync'"),
            ('tools = { nwe = "doveadm" }', "migration.tools.nwe", "no backend named 'nwe'; configured backends: new, old"),
            ('doveadm_config = { new = "missing.conf" }', "migration.doveadm_config.new", f"cannot read {missing!r}"),
            ("hold_timeout = 0", "migration.hold_timeout", "must be greater than 0, not 0"),
            ('copy_timeout = "1h"', "migration.copy_timeout", "must be a number, not a string"),
            ("sync_attempts = 0", "migration.sync_attempts", "must be at least 1, not 0"),
        ):
            self.assertConfigError(configText(extra=f"{NEW}[migration]\n{extra}\n"), key, fragment)

    def test_everySettingHasAKey(self) -> None:
        """
        Every setting of the engine can be set in C{[migration]}: a table
        giving each key a value other than its default changes every
        attribute (so a setting the engine adds without a key here fails
        this test).
        """
        os.makedirs(os.path.join(self.directory, "state"))
        self.write("dovecot.conf", "")
        settings = self.parse(
            configText(
                extra=NEW
                + '[migration]\non_login = "new"\non_login_domains = ["example.org"]\non_login_rule = "ldap *"\n'
                'journal = "state/j.json"\n'
                'concurrency = 2\ndoveadm = "/usr/local/bin/doveadm"\nmbsync = "/usr/local/bin/mbsync"\n'
                'tools = { new = "mbsync" }\ndoveadm_config = { new = "dovecot.conf" }\ncopy_timeout = 1\n'
                "hold_timeout = 1\nclient_timeout = 1\nsession_poll = 1\nsync_attempts = 5\nlate_mail_grace = 0\n"
            )
        ).migration
        defaults = MigrationSettings()
        unchanged = [a.name for a in attrs.fields(MigrationSettings) if getattr(settings, a.name) == getattr(defaults, a.name)]
        self.assertEqual(unchanged, [])

    def test_onLoginUnknownBackend(self) -> None:
        """
        C{on_login} must name a configured backend; the message lists them
        and suggests the closest.
        """
        self.assertConfigError(
            configText(extra=NEW + '[migration]\non_login = "nwe"\n'),
            "migration.on_login",
            "no backend named 'nwe'; configured backends: new, old (did you mean 'new'?)",
        )

    def test_domainsNeedOnLogin(self) -> None:
        """
        C{on_login_domains} without C{on_login} says what is missing.
        """
        self.assertConfigError(
            configText(extra='[migration]\non_login_domains = ["example.org"]\n'),
            "migration.on_login_domains",
            "needs on_login (the backend to migrate to)",
        )

    def test_badDomains(self) -> None:
        """
        C{on_login_domains} must be a non-empty array of domain names.
        """
        for value, fragment in (
            ('"example.org"', "must be a non-empty array of strings"),
            ("[]", "must be a non-empty array of strings"),
            ('["user@example.org"]', "not a domain: 'user@example.org'"),
            ('["exa mple.org"]', "not a domain: 'exa mple.org'"),
        ):
            self.assertConfigError(
                configText(extra=f'{NEW}[migration]\non_login = "new"\non_login_domains = {value}\n'),
                "migration.on_login_domains",
                fragment,
            )

    def test_concurrencyRange(self) -> None:
        """
        C{concurrency} is an integer from 1 to 64.
        """
        for value, fragment in (
            ("0", "must be at least 1, not 0"),
            ("65", "must be at most 64, not 65"),
            ("2.5", "must be an integer, not a float"),
            ("true", "must be an integer, not a boolean"),
        ):
            self.assertConfigError(configText(extra=f"[migration]\nconcurrency = {value}\n"), "migration.concurrency", fragment)

    def test_journalDirectoryMissing(self) -> None:
        """
        A journal in a directory that does not exist is refused now, not at
        the first campaign.
        """
        missing = os.path.join(self.directory, "nowhere")
        self.assertConfigError(
            configText(extra='[migration]\njournal = "nowhere/j"\n'),
            "migration.journal",
            f"the directory {missing!r} does not exist",
        )

    def test_unknownKey(self) -> None:
        """
        An unknown key is refused with the allowed ones and a suggestion.
        """
        self.assertConfigError(
            configText(extra="[migration]\nconcurency = 2\n"),
            "migration.concurency",
            "unknown key; allowed keys here: on_login, on_login_domains, on_login_rule, journal, concurrency, doveadm, mbsync, "
            "tools, doveadm_config, copy_timeout, hold_timeout, client_timeout, session_poll, sync_attempts, "
            "late_mail_grace",
            "(did you mean 'concurrency'?)",
        )

    def test_allProblemsAtOnce(self) -> None:
        """
        Like the rest of the configuration, every problem of the table is
        reported in one go.
        """
        error = self.assertRaises(
            ConfigError,
            self.parse,
            configText(extra='[migration]\non_login = "nowhere"\nconcurrency = 0\ndoveadm = ""\n'),
        )
        self.assertEqual(
            [problem.split(": ", 2)[1] for problem in error.problems],
            ["migration.on_login", "migration.concurrency", "migration.doveadm"],
        )

    def test_backendTypoNotBlamedOnMigration(self) -> None:
        """
        When a backend itself is wrong, C{on_login} naming it is not
        reported as well (only the backend's own problem is).
        """
        error = self.assertRaises(
            ConfigError,
            self.parse,
            configText(extra=NEW.replace("143", "0") + '[migration]\non_login = "new"\n'),
        )
        self.assertEqual([problem.split(": ", 2)[1] for problem in error.problems], ["backend.new.ports.imap"])


class MigrationConfigShowTests(ConfigTestCase):
    """
    C{mailproxy config show} with C{[migration]}.
    """

    def test_shownAndLoadsBack(self) -> None:
        """
        The table is shown with its defaults filled in and loads back into
        the same settings.
        """
        dovecot = self.write("dovecot.conf", "")
        path = self.write(
            "mailproxy.toml",
            configText(extra=NEW + '[migration]\non_login = "new"\ntools = { new = "doveadm" }\ndoveadm_config = { new = "dovecot.conf" }\n'),
        )
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(main(["config", "show", "--config", path]), 0)
        data = tomllib.loads(out.getvalue())
        defaults = MigrationSettings()
        self.assertEqual(
            data["migration"],
            {"on_login": "new", "journal": os.path.join(os.path.dirname(path), "migrations.json"), "concurrency": 4, "doveadm": "doveadm", "mbsync": "mbsync", "tools": {"new": "doveadm"},
             "doveadm_config": {"new": dovecot}, "copy_timeout": defaults.copyTimeout, "hold_timeout": defaults.holdTimeout,
             "client_timeout": defaults.clientTimeout, "session_poll": defaults.sessionPoll,
             "sync_attempts": defaults.syncAttempts, "late_mail_grace": defaults.lateMailGrace},
        )
        original = loadConfig(path)
        self.assertEqual(attrs.evolve(parseConfig(out.getvalue(), path), router=original.router), original)
