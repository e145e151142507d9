"""Simulators that make the gateway a test harness: a host simulator (`gateway.sim.host`, its rules in
`gateway.sim.host_rules`), a CUP POS terminal simulator (`gateway.sim.terminal`), the load tool's "cup"
driver built on it (`gateway.sim.cup_driver`) and their command line (`gateway.sim.cli`). Modules are
imported on demand; this package imports nothing itself."""
