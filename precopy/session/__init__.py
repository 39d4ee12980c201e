"""One migration on each side: the source's phase driver, the destination's server, the guardian, the report."""
