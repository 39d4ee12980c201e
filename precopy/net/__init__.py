"""Sockets: the asyncio channel that carries a protocol connection, and TLS around it."""
