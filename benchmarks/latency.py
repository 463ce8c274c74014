"""
Single-client login latency for every protocol: one client logs in and out
again and again, straight to Dovecot and Postfix, through mailproxy (its
backend forwarding the client's identity, C{forward = "auto"}, and not,
C{forward = "none"}) and through nginx's mail proxy (which has no
ManageSieve).

One private Dovecot (IMAP, POP3, ManageSieve, and SASL for Postfix) and one
private Postfix (submission, accepted mail discarded). mailproxy has one
listener per protocol (plain, and STARTTLS offered for SMTP) and two
backends, both the same servers in plain text: accounts of C{auto.test} go
to the one with C{forward = "auto"} (IMAP ID, POP3 and ManageSieve
XCLIENT, SMTP XCLIENT then AUTH, as Dovecot and Postfix offer them to a
trusted proxy), accounts of C{none.test} to the one with C{forward =
"none"}. nginx's C{auth_http} is answered by nginx itself (every account to
the same servers, Postfix logging in with nginx's C{XCLIENT LOGIN}).

A session, timed from connect to the server's close:

- POP3: greeting, C{USER}, C{PASS}, C{QUIT} (C{poplib});
- IMAP: greeting, C{LOGIN}, C{LOGOUT} (C{imaplib});
- ManageSieve: the capability greeting, C{AUTHENTICATE "PLAIN"} with an
  initial response, C{LOGOUT} (a small client here);
- SMTP: C{EHLO}, C{STARTTLS}, C{EHLO}, C{AUTH PLAIN}, one small message,
  C{QUIT} (C{smtplib}); and the same without C{STARTTLS};
- IMAP with a message: C{LOGIN}, C{APPEND} of one small message,
  C{LOGOUT} (C{imaplib}, which writes the message and the command's final
  CRLF apart: a proxy that delays its ACKs holds that CRLF back 40 ms).

Run from the repository root::

    /tmp/venv/bin/python benchmarks/latency.py [--count 200] [--json out.json]

It prints a markdown table of p50 and p90 per protocol and path, and the
target mailproxy is held to for plain backends: p50 at most direct + 1 ms.
"""

from __future__ import annotations

import argparse
import base64
import imaplib
import json
import os
import poplib
import shutil
import smtplib
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

_HERE = Path(__file__).resolve().parent
_REPOSITORY = _HERE.parent
if str(_REPOSITORY) not in sys.path:
    sys.path.insert(0, str(_REPOSITORY))

from benchmarks.nginx import Nginx  # noqa: E402
from benchmarks.run import formatNumber, stopServers, submitMessage  # noqa: E402
from tests.integration.postfix import Postfix, dovecotSASLConfig  # noqa: E402
from tests.integration.servers import Dovecot, Proxy, TestCA  # noqa: E402

PASSWORD = "lat-pw"
DOMAINS = {"auto": "auto.test", "none": "none.test"}
#: The paths, as table columns, in order.
PATHS = ("direct", "mailproxy", "mailproxy-none", "nginx")
#: Sessions per row: name, protocol (the listener), client TLS, the
#: client's session (a key of CLIENTS).
SESSIONS = (
    ("POP3 USER/PASS", "pop3", "none", "pop3"),
    ("IMAP LOGIN", "imap", "none", "imap"),
    ("ManageSieve AUTHENTICATE", "sieve", "none", "sieve"),
    ("SMTP EHLO+AUTH+message", "smtp", "none", "smtp"),
    ("SMTP STARTTLS+AUTH+message", "smtp", "starttls", "smtp"),
    # Last: it adds a message to the mailbox each time.
    ("IMAP LOGIN+APPEND", "imap", "none", "imap-append"),
)
MESSAGE = b"From: a@auto.test\r\nTo: a@auto.test\r\nSubject: latency\r\n\r\nHello.\r\n"

#: One long-lived login process per protocol, serving every client, and
#: mail processes kept ready: what is timed is the login, not a fork.
DOVECOT_TUNING = """
service imap-login {
  service_count = 0
  process_min_avail = 1
}
service pop3-login {
  service_count = 0
  process_min_avail = 1
}
service managesieve-login {
  service_count = 0
  process_min_avail = 1
}
service imap {
  service_count = 0
  process_min_avail = 4
}
service pop3 {
  service_count = 0
  process_min_avail = 4
}
service managesieve {
  service_count = 0
  process_min_avail = 4
}
mail_max_userip_connections = 100000
"""

POSTFIX_TUNING = """
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
virtual_transport = discard:benchmark
"""

NGINX_CONFIG = """
load_module /usr/lib/nginx/modules/ngx_mail_module.so;
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    map $http_auth_protocol $backendPort {{
        imap {imapBackend};
        pop3 {pop3Backend};
        smtp {smtpBackend};
    }}
    server {{
        listen 127.0.0.1:{authPort};
        location = /auth {{
            add_header Auth-Status OK;
            add_header Auth-Server 127.0.0.1;
            add_header Auth-Port $backendPort;
            return 204;
        }}
    }}
}}
mail {{
    server_name localhost;
    auth_http 127.0.0.1:{authPort}/auth;
    proxy_pass_error_message on;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {certificate};
    ssl_certificate_key {key};
    imap_auth login plain;
    pop3_auth plain;
    smtp_auth login plain;
    server {{ listen 127.0.0.1:{imap}; protocol imap; starttls off; }}
    server {{ listen 127.0.0.1:{pop3}; protocol pop3; starttls off; }}
    server {{ listen 127.0.0.1:{smtp}; protocol smtp; starttls on; xclient on; }}
}}
"""


class MailNginx(Nginx):
    """
    nginx proxying IMAP, POP3 and SMTP to Dovecot and Postfix (the parent
    class's ports C{plain}, C{starttls} and C{ssl} serve IMAP, POP3 and
    SMTP here).
    """

    def __init__(self, directory: str, backends: dict[str, int], certificate: str, key: str) -> None:
        super().__init__(directory, backends["imap"], certificate, key)
        self.backends = backends

    def configuration(self, authPort: int) -> str:
        """
        The text of C{nginx.conf}: C{auth_http} answers with the backend
        port of the protocol nginx asks for.
        """
        return NGINX_CONFIG.format(
            dir=self.directory, authPort=authPort, certificate=self.certificate, key=self.key,
            imapBackend=self.backends["imap"], pop3Backend=self.backends["pop3"],
            smtpBackend=self.backends["smtp"], imap=self.plain, pop3=self.starttls, smtp=self.ssl,
        )  # fmt: skip

    def ports(self) -> dict[str, int]:
        """
        The listening port of each protocol, once started.
        """
        return {"imap": self.plain, "pop3": self.starttls, "smtp": self.ssl}


def proxyConfig(
    listeners: dict[str, int], backends: dict[str, int], certificate: str, key: str, workers: int = 1
) -> str:
    """
    mailproxy with one plain listener per protocol (SMTP offering STARTTLS)
    and the backends C{auto} and C{none}: the same servers, forwarding the
    client's identity or not.

    @param workers: C{[proxy] workers}: 1, one process, unless given.
    """
    text = (
        '[proxy]\nhostname = "localhost"\n'
        + f"workers = {workers}\n"
        + "\n"
        "[limits]\nconnections_per_address = 0\nfailure_delay = 0\n\n"
        f'[tls]\ncertificate = "{certificate}"\nkey = "{key}"\n\n'
    )
    for protocol, port in listeners.items():
        tls = "starttls" if protocol == "smtp" else "none"
        mode = 'mode = "submission"\n' if protocol == "smtp" else ""
        text += f'[[listener]]\nprotocol = "{protocol}"\n{mode}endpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "{tls}"\n\n'
    text += '[router]\ntype = "static"\npath = "routes.toml"\n\n'
    ports = ", ".join(f"{name} = {port}" for name, port in backends.items())
    for forward in DOMAINS:
        text += f'[backend.{forward}]\nhost = "127.0.0.1"\nports = {{ {ports} }}\ntls = "none"\nforward = "{forward}"\n\n'
    return text


# The clients: one session each, from connect to the server's close.


def pop3Session(port: int, tls: str, user: str, context: ssl.SSLContext) -> None:
    """
    POP3: greeting, C{USER}, C{PASS}, C{QUIT}, each waiting for its reply.
    """
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    client.user(user)
    client.pass_(PASSWORD)
    client.quit()


def imapSession(port: int, tls: str, user: str, context: ssl.SSLContext) -> None:
    """
    IMAP: greeting, C{CAPABILITY} when the greeting lists none (C{imaplib}
    asks), C{LOGIN}, C{LOGOUT}.
    """
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    client.login(user, PASSWORD)
    client.logout()


def imapAppendSession(port: int, tls: str, user: str, context: ssl.SSLContext) -> None:
    """
    IMAP: C{LOGIN}, C{APPEND} of one small message, C{LOGOUT}.
    """
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    client.login(user, PASSWORD)
    status, _ = client.append("INBOX", None, None, MESSAGE)
    if status != "OK":
        raise imaplib.IMAP4.error("APPEND: " + status)
    client.logout()


def sieveSession(port: int, tls: str, user: str, context: ssl.SSLContext) -> None:
    """
    ManageSieve: the capability greeting, C{AUTHENTICATE "PLAIN"} with an
    initial response, C{LOGOUT}, then the server's close.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = connection.makefile("rb")

        def untilStatus() -> bytes:
            while True:
                line = reader.readline()
                if not line:
                    raise ConnectionError("ManageSieve server closed")
                if line[:2].upper() in (b"OK", b"NO", b"BY"):
                    return line

        if not untilStatus().upper().startswith(b"OK"):
            raise ConnectionError("ManageSieve greeting")
        response = base64.b64encode(b"\0" + user.encode() + b"\0" + PASSWORD.encode())
        connection.sendall(b'AUTHENTICATE "PLAIN" "' + response + b'"\r\n')
        line = untilStatus()
        if not line.upper().startswith(b"OK"):
            raise ConnectionError("ManageSieve AUTHENTICATE: " + line.decode("utf-8", "replace"))
        connection.sendall(b"LOGOUT\r\n")
        untilStatus()
        reader.read()


def smtpSession(port: int, tls: str, user: str, context: ssl.SSLContext) -> None:
    """
    ESMTP submission: C{EHLO} (and C{STARTTLS}, C{EHLO} when C{tls} is
    C{"starttls"}), C{AUTH PLAIN}, one small message, C{QUIT}.
    """
    submitMessage("127.0.0.1", port, tls, user, PASSWORD, MESSAGE, context, "latency.example")


CLIENTS: dict[str, Callable[[int, str, str, ssl.SSLContext], None]] = {
    "pop3": pop3Session,
    "imap": imapSession,
    "imap-append": imapAppendSession,
    "sieve": sieveSession,
    "smtp": smtpSession,
}


def measure(
    client: str, port: int, tls: str, user: str, context: ssl.SSLContext, count: int, warmup: int
) -> dict[str, Any]:
    """
    Run C{warmup} and then C{count} sessions of C{client} (a key of
    L{CLIENTS}) one after the other; the latency of those counted, in ms.
    """
    session = CLIENTS[client]
    latencies: list[float] = []
    errors = 0
    error = ""
    for index in range(warmup + count):
        began = time.perf_counter()
        try:
            session(port, tls, user, context)
        except (OSError, EOFError, poplib.error_proto, imaplib.IMAP4.error, smtplib.SMTPException) as e:
            errors += 1
            error = f"{type(e).__name__}: {e}"
            continue
        if index >= warmup:
            latencies.append(1000 * (time.perf_counter() - began))
    latencies.sort()
    return {
        "sessions": len(latencies),
        "errors": errors,
        "error": error,
        "p50ms": statistics.median(latencies) if latencies else None,
        "p90ms": latencies[int(len(latencies) * 0.9)] if latencies else None,
    }


def markdownTable(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """
    p50 / p90 per session kind and path, and the target: mailproxy's p50
    at most direct + 1 ms (with and without forwarding).
    """
    lines = [
        "| session, p50 / p90 ms | direct | mailproxy (forward auto) | mailproxy (forward none) | nginx "
        "| target (mailproxy p50) | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, _, _, _ in SESSIONS:
        row = results.get(label, {})
        cells = [label]
        for path in PATHS:
            r = row.get(path)
            cells.append("n/a" if r is None else f"{formatNumber(r['p50ms'])} / {formatNumber(r['p90ms'])}")
        direct = (row.get("direct") or {}).get("p50ms")
        proxied = [(row.get(path) or {}).get("p50ms") for path in ("mailproxy", "mailproxy-none")]
        verdict = "n/a"
        if direct is not None and None not in proxied:
            verdict = "PASS" if all(p <= direct + 1.0 for p in proxied) else "MISS"
        cells += ["<= direct + 1 ms", verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Start the servers, measure every session kind on every path, print the
    table.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--count", type=int, default=200, help="sessions measured per cell (200)")
    parser.add_argument("--warmup", type=int, default=10, help="sessions before measuring (10)")
    parser.add_argument("--quick", action="store_true", help="20 sessions per cell")
    parser.add_argument("--paths", default=",".join(PATHS), help="subset of: " + ", ".join(PATHS))
    parser.add_argument("--json", help="write the raw results and the table to this file")
    parser.add_argument("--keep", help="keep the servers' files and logs in this directory")
    parser.add_argument(
        "--workers", type=int, default=1, help="mailproxy's [proxy] workers (default 1: one process)"
    )
    options = parser.parse_args(argv)
    if options.quick:
        options.count, options.warmup = 20, 3
    wanted = [p.strip() for p in options.paths.split(",") if p.strip()]
    directory = Path(options.keep or tempfile.mkdtemp(prefix="mailproxy-latency-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    users = {f"lat@{domain}": PASSWORD for domain in DOMAINS.values()}
    ca = TestCA(str(directory / "ca"))
    dovecot = Dovecot(
        str(directory / "dovecot"), "lat", users, ca=ca, extraConfig=dovecotSASLConfig() + DOVECOT_TUNING
    )
    postfix: Postfix | None = None
    proxy: Proxy | None = None
    nginx: MailNginx | None = None
    results: dict[str, dict[str, dict[str, Any]]] = {}
    context = ssl.create_default_context(cafile=ca.caPath)
    try:
        dovecot.start()
        sasl = os.path.join(os.path.realpath(dovecot.directory / "runtime"), "run", "postfix-auth")
        postfix = Postfix(
            str(directory / "postfix"), "lat", domains=list(DOMAINS.values()), mailboxes=list(users),
            lmtpPort=dovecot.lmtp, saslPath=sasl, ca=ca, extraMainCf=POSTFIX_TUNING,
        )  # fmt: skip
        postfix.start()
        for user in users:
            dovecot.deliver(user, MESSAGE)
        dovecot.indexAll()
        backends = {"imap": dovecot.imap, "pop3": dovecot.pop3, "sieve": dovecot.sieve, "smtp": postfix.submission}
        targets: dict[str, dict[str, int]] = {"direct": backends}
        if "mailproxy" in wanted or "mailproxy-none" in wanted:
            certificate, key = ca.issue("mailproxy")
            # Port 0: the proxy logs the ports the kernel chose.
            proxy = Proxy(str(directory / "mailproxy"), proxyConfig({p: 0 for p in backends}, backends, certificate, key, options.workers))
            (proxy.directory / "routes.toml").write_text(
                "[domains]\n" + "".join(f'"{domain}" = "{forward}"\n' for forward, domain in DOMAINS.items())
            )
            proxy.start()
            targets["mailproxy"] = targets["mailproxy-none"] = dict(zip(backends, proxy.ports))
        if "nginx" in wanted:
            certificate, key = ca.issue("nginx")
            nginx = MailNginx(str(directory / "nginx"), backends, certificate, key)
            nginx.start()
            targets["nginx"] = nginx.ports()
        for label, protocol, tls, client in SESSIONS:
            results[label] = {}
            for path in PATHS:
                if path not in wanted or protocol not in targets.get(path, {}):
                    continue
                user = "lat@" + DOMAINS["none" if path == "mailproxy-none" else "auto"]
                print(f"  {label}: {path}", file=sys.stderr, flush=True)
                results[label][path] = measure(
                    client, targets[path][protocol], tls, user, context, options.count, options.warmup
                )
    finally:
        stopServers([proxy, nginx, postfix, dovecot], None)
        if not options.keep:
            shutil.rmtree(directory, ignore_errors=True)
    table = markdownTable(results)
    print(f"mailproxy [proxy] workers: {options.workers}")
    print(table)
    failures = [
        f"{label} ({path}): {r['errors']} errors, {r['error']}"
        for label, row in results.items()
        for path, r in row.items()
        if r["errors"]
    ]
    for line in failures:
        print(f"- errors: {line}")
    if options.json:
        document = {"count": options.count, "workers": options.workers, "results": results, "failures": failures, "table": table}
        Path(options.json).write_text(json.dumps(document, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
