"""Transaction decisions: pure functions and small state objects, no sockets, no clocks of their own.

Given a decoded request and the terminal's state, they say what to answer, what to send upstream and
what to record; `gateway.service` carries those decisions out over the network and the journal.
"""
