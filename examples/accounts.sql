-- The example accounts table of examples/sql-router.toml:
--   sqlite3 examples/accounts.sqlite < examples/accounts.sql
CREATE TABLE accounts (
    address    TEXT PRIMARY KEY,      -- the login name, lower case
    backend    TEXT NOT NULL,         -- a [backend.NAME] or host[:port]
    password   TEXT,                  -- NULL: the mail server checks it
    login_user TEXT,                  -- NULL: log in with the address
    active     INTEGER NOT NULL DEFAULT 1
);
INSERT INTO accounts (address, backend) VALUES ('alice@example.org', 'old');
INSERT INTO accounts (address, backend) VALUES ('bob@example.org', 'new');
INSERT INTO accounts (address, backend, password, login_user)
    VALUES ('carol@example.org', 'new', 'carol-secret', 'carol');
