"""The region and what changed in it: the shared mapping, page digests, kernel write tracking."""
