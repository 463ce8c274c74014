"""
A private OpenLDAP server (Debian's C{slapd}) as a test fixture: one mdb
database on loopback, loaded with C{slapadd} before start, with mail
accounts carrying misc.schema's routing attribute C{mailHost}.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Mapping

from attrs import frozen

from .servers import _binary, _dieWithParent, _stopProcess, _waitForPorts, freePort, requireServer, startOnFreePorts

SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
SERVICE_DN = f"cn=mailproxy,ou=services,{SUFFIX}"


@frozen
class Account:
    """
    One person in the directory.

    @ivar mail: the login name (attribute C{mail}).
    @ivar uid: the entry's C{uid} (and RDN).
    @ivar password: the cleartext C{userPassword} (cleartext, so that both
        bind and compare work).
    @ivar mailHost: the routing attribute, or L{None} for none.
    """

    mail: str
    uid: str
    password: str
    mailHost: str | None = None

    @property
    def dn(self) -> str:
        """
        The entry's DN.
        """
        return f"uid={self.uid},{PEOPLE}"


class Slapd:
    """
    C{slapd} on 127.0.0.1 with its configuration, data and log in a
    directory.

    @ivar port: the port, chosen at L{start}.
    @ivar servicePassword: the password of L{SERVICE_DN}, which may search
        and read C{userPassword}.
    """

    port: int

    def __init__(
        self,
        directory: str,
        accounts: Mapping[str, Account],
        servicePassword: str = "service-secret",
        tls: tuple[str, str] | None = None,
    ) -> None:
        """
        @param accounts: by any name the test likes.
        @param tls: a certificate (chain) and key file: StartTLS is then
            offered on the port.
        """
        self.tls = tls
        self.directory = Path(directory)
        self.accounts = dict(accounts)
        self.servicePassword = servicePassword
        self.logPath = self.directory / "slapd.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        """
        The C{ldap://} URL to reach it.
        """
        return f"ldap://127.0.0.1:{self.port}"

    def start(self) -> None:
        """
        Write the configuration and data, load them, start C{slapd} and
        wait until it accepts connections.
        """
        requireServer("slapd", "slapadd")
        self.directory.mkdir(parents=True, exist_ok=True)
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        config = self.directory / "slapd.conf"
        config.write_text(self._configuration())
        ldif = self.directory / "data.ldif"
        ldif.write_text(self._ldif())
        loaded = subprocess.run(
            [_binary("slapadd"), "-q", "-f", str(config), "-l", str(ldif)], capture_output=True
        )
        if loaded.returncode != 0:
            raise RuntimeError("slapadd failed:\n" + (loaded.stdout + loaded.stderr).decode("utf-8", "replace"))
        startOnFreePorts(self._choosePort, self._run, self.logPath)

    def _choosePort(self) -> None:
        self.port = freePort()

    def _run(self) -> None:
        config = self.directory / "slapd.conf"
        with open(self.logPath, "ab") as log:
            # -d keeps it in the foreground (a child of the tests) and logs
            # connections and operations (256: stats) to the log file.
            self._process = subprocess.Popen(
                [_binary("slapd"), "-f", str(config), "-h", f"{self.url}/", "-d", "256"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_dieWithParent,
            )
        try:
            _waitForPorts(self._process, [self.port], timeout=20, describe="slapd", log=self.logPath)
        except RuntimeError:
            _stopProcess(self._process)
            self._process = None
            raise

    def _configuration(self) -> str:
        schemas = "".join(
            f"include /etc/ldap/schema/{name}.schema\n" for name in ("core", "cosine", "inetorgperson", "nis", "misc")
        )
        tls = ""
        if self.tls is not None:
            tls = f"TLSCertificateFile {self.tls[0]}\nTLSCertificateKeyFile {self.tls[1]}\n"
        return (
            schemas
            + tls
            + f"pidfile {self.directory}/slapd.pid\n"
            f"argsfile {self.directory}/slapd.args\n"
            "modulepath /usr/lib/ldap\n"
            "moduleload back_mdb\n"
            "database mdb\n"
            f'suffix "{SUFFIX}"\n'
            f'rootdn "cn=admin,{SUFFIX}"\n'
            "rootpw admin-secret\n"
            f"directory {self.directory}/data\n"
            "maxsize 10485760\n"
            # The proxy's service account reads passwords (auth = compare);
            # anyone may bind with a password; nobody else reads it.
            f'access to attrs=userPassword by dn.exact="{SERVICE_DN}" read by anonymous auth by self auth by * none\n'
            "access to * by * read\n"
        )

    def _ldif(self) -> str:
        entries = [
            f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n",
            f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services\n",
            f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
            f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
            f"cn: mailproxy\nuserPassword: {self.servicePassword}\n",
        ]
        for account in self.accounts.values():
            lines = [
                f"dn: {account.dn}",
                "objectClass: inetOrgPerson",
                "objectClass: inetLocalMailRecipient",
                f"uid: {account.uid}",
                f"cn: {account.uid}",
                f"sn: {account.uid}",
                f"mail: {account.mail}",
                f"userPassword: {account.password}",
            ]
            if account.mailHost is not None:
                lines.append(f"mailHost: {account.mailHost}")
            entries.append("\n".join(lines) + "\n")
        return "\n".join(entries)

    def pause(self) -> None:
        """
        Freeze the server (SIGSTOP): connections are still accepted by the
        kernel, but nothing answers, like a hung directory.
        """
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)
        self._stopped = True

    def resume(self) -> None:
        """
        Undo L{pause}.
        """
        if self._process is not None and self._stopped:
            os.kill(self._process.pid, signal.SIGCONT)
        self._stopped = False

    def stop(self) -> None:
        """
        Stop the server (it may be started again with L{restart}). Doing so
        twice is harmless.
        """
        self.resume()
        if self._process is not None:
            _stopProcess(self._process)
            self._process = None

    def restart(self) -> None:
        """
        Start the stopped server again on the same port with the same data.
        """
        if self._process is None:
            self._run()

    def running(self) -> bool:
        """
        Whether the server process is alive.
        """
        return self._process is not None and self._process.poll() is None

    def logText(self) -> str:
        """
        The log so far (binds show as C{BIND dn="..."}).
        """
        try:
            return self.logPath.read_text(errors="replace")
        except FileNotFoundError:
            return ""
