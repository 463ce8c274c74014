"""
Migrating accounts between backends while the proxy runs: copy the mail
with a real sync tool, hold the account's logins, copy what changed, verify
both sides, flip the route.

L{MigrationManager} runs campaigns (a list of accounts and a target
backend); the management endpoint, the command line and the on-login
trigger use it.  See L{mailproxy.migration._manager} for the steps and
L{mailproxy.migration._tools} for how the tools are run.
"""

from ._manager import (
    ACCOUNT_STATES,
    CAMPAIGN_STATES,
    STEPS,
    AccountJob,
    Campaign,
    MigrationError,
    MigrationManager,
    MigrationSettings,
)

__all__ = [
    "MigrationManager",
    "MigrationError",
    "MigrationSettings",
    "Campaign",
    "AccountJob",
    "STEPS",
    "ACCOUNT_STATES",
    "CAMPAIGN_STATES",
]
