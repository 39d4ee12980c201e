"""Two machines and a cluster on one box (network namespaces, Pacemaker), for tests, benchmarks and the walk-through."""
