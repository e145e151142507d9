"""Transaction decisions: pure functions and small state objects, no sockets (`clock` only formats the
current second's date/time fields, once per second).

Given a decoded request and the terminal's state, they say what to answer, what to send upstream and
what to record; `gateway.service` carries those decisions out over the network and the journal.
"""
