"""The guardian's first stage: wait on the agent's pipe with nothing loaded, the guardian proper only if it must act.

:class:`precopy.session.guardian.Guardian` starts ``python -S
guardian_boot.py PATH/guardian.py`` with every migration.  Nearly every
time the agent ends by writing ``done`` and the guardian has nothing to
do; starting it as the whole guardian script (its standard-library
imports, ``site``) cost ~49 ms of CPU a migration, ~4 % of both agents'
CPU for an idle 1 GiB copy, against ~7 ms for this stage (benchmarks/
RESULTS.md, issue 21).  So this stage only ignores the signals meant for
the agent and reads the pipe; if the pipe ends without ``done`` (the agent
died, or left a post-copy to the guardian), it loads ``site`` (skipped by
``-S``) and the guardian's file, and hands it every line read
(:func:`precopy.session.guardian.settle`), which acts as if it had read
them itself.  Only built-in modules here: no import may cost a start.
"""

import sys

import _signal

DONE = b"done"


def main() -> int:
    # Only the pipe's end may end the guardian: not a Ctrl-C or a hang-up meant for the agent.
    for sig in (_signal.SIGINT, _signal.SIGHUP, _signal.SIGTERM):
        _signal.signal(sig, _signal.SIG_IGN)
    lines: list[bytes] = []
    for raw in sys.stdin.buffer:
        if lines and raw.strip() == DONE:  # (the first line is the specification)
            return 0
        lines.append(raw)
    # The site's packages, then the guardian proper as when run as a script
    # (not imported as precopy.session.guardian: the package would load the
    # whole engine first, ~0.3 s before a dead agent's workload is resumed),
    # importing the engine from the package its file is in.
    import site

    site.main()
    sys.path[0] = sys.argv[1].rsplit("/", 3)[0]
    import runpy

    settle = runpy.run_path(sys.argv[1], run_name="precopy_guardian")["settle"]
    return int(settle(lines))


if __name__ == "__main__":
    sys.exit(main())
