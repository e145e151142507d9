"""Conformance runs against recorded traces: record, import, check, replay, compare.

A trace is a JSON-lines file (`format`): a header line, then one object per frame or link event, in
the order the system under test saw them. Secrets never appear in clear: PANs, tracks, PIN blocks,
keys and CVVs are replaced by surrogates that are consistent within one trace, and MACs and PIN blocks
are marked so a replay recomputes them. Everything here streams: no module loads a whole trace.
"""
