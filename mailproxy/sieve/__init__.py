"""
The ManageSieve (RFC 5804) front end: what a client sees before it is
relayed to its backend, and the proxy's login there.
"""
