"""The network shell: the only package with sockets and clocks (terminal server, host link, SAF sender,
admin HTTP endpoint). Decisions live in `gateway.core`; this package carries them out over anyio."""
