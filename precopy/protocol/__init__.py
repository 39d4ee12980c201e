"""The wire protocol, with no I/O: framing, messages, the phase table, authentication, payload compression."""
