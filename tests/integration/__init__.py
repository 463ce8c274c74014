"""
Integration tests: mailproxy between real clients and real mail servers
(Dovecot, Postfix, OpenLDAP, nginx for comparison), all started by the
tests themselves on loopback.
"""
