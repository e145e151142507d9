"""Load generator: open-loop (fixed schedule, coordinated-omission corrected) and closed-loop load against
any request/response endpoint through the `Driver` protocol, with HDR latency reports, JSON, PNG plots
and several worker processes. `gateway.load.echo` is the raw framed echo server used as the I/O floor.

Python API: `await run_load(driver, LoadConfig(...))` in one process, `run_load_processes(name_or_factory,
options, LoadConfig(...), processes)` over several; `register_driver(name, factory)` adds a driver.
"""

from gateway.load.config import LoadConfig, parse_mix
from gateway.load.driver import Driver, LoadError, Session, register_driver
from gateway.load.processes import run_load_processes
from gateway.load.report import LoadReport
from gateway.load.runner import run_load

__all__ = [
    "Driver",
    "LoadConfig",
    "LoadError",
    "LoadReport",
    "Session",
    "parse_mix",
    "register_driver",
    "run_load",
    "run_load_processes",
]
