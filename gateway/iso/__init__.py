"""The codec layer: dialect specs as data, framing, messages. Sans-I/O: never touches a socket."""
