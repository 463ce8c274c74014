"""
The POP3 front end: what a client sees before it is relayed to its backend,
and the login dialogue towards a POP3 backend.
"""
