"""
Benchmarks: mailproxy against direct Dovecot and nginx (see README.md).
"""
