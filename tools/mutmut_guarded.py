#!/usr/bin/env python3
"""mutmut's command line, with its timeout signal confined to the processes mutmut started.

mutmut (3.x) keeps a heap of (deadline, pid) for its mutant processes and, when a deadline passes,
sends SIGXCPU to that pid — also when the mutant ended long ago (it never cancels an entry). Pids wrap
(32,768 on this machine) and a mutation run forks thousands of processes, so the signal can reach
whatever process holds the pid by then: it killed a gateway of a test run going on beside it (exit
-24 in the PostgreSQL crash soak). Here each registered pid is remembered with its process's start
time (/proc/<pid>/stat), and the signal goes only to that same process. A stale entry whose pid was
reused by one of mutmut's own later mutants can still stop that mutant early (counted as a timeout,
never as a kill); nothing outside mutmut is ever signalled.

tools/mutate.py runs mutmut through this file instead of its `mutmut` script.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace
from typing import Any

import mutmut.workers.isolation as isolation
import mutmut.workers.timeout as timeout
from mutmut.__main__ import cli

_registered_start: dict[int, str | None] = {}
_real_register = timeout.register_timeout


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot), None when there is none."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: count fields after its ")"
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def register_timeout(pid: int, timeout_s: float) -> None:
    _registered_start[pid] = process_start_time(pid)
    _real_register(pid, timeout_s)


def guarded_kill(pid: int, sig: int) -> None:
    """os.kill for the timeout thread: only the very process that was registered under `pid`."""
    expected = _registered_start.get(pid)
    if expected is None or process_start_time(pid) != expected:
        raise ProcessLookupError(pid)  # gone (the thread ignores this), or another process by now
    os.kill(pid, sig)


def install() -> None:
    # the timeout thread calls `os.kill` through its module's `os`: give it one whose kill is guarded
    shim: Any = SimpleNamespace(**{name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
    shim.kill = guarded_kill
    timeout.os = shim
    timeout.register_timeout = register_timeout
    isolation.register_timeout = register_timeout  # imported by name there


if __name__ == "__main__":
    install()
    sys.argv[0] = "mutmut"
    sys.exit(cli())
