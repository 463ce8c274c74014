"""
The IMAP4 front end: what a client sees before it is relayed to its backend.
"""
