#!/bin/bash
# Profile one 1 GiB idle loopback migration with py-spy on both agents.
#
#   benchmarks/profile_migration.sh [existing|fresh] [OUTDIR]
#
# existing: the destination already holds a region of the right size with
# other contents (every page moves, none is touched for the first time);
# fresh: it creates the region.  Writes OUTDIR/{dest,src}-MODE.txt (py-spy
# raw stacks, 1 kHz: pauses each agent while it samples, so the run is
# slower than unprofiled), OUTDIR/report-MODE.json and a summary of both
# profiles (benchmarks/pyspy_summary.py).  Needs py-spy in .venv
# (.venv/bin/pip install py-spy) and ~3 GiB of /dev/shm.
# With NOSPY=1: no profiler; prints the CPU seconds each agent used instead
# (wall time vs CPU time of a 2-core machine shared by both agents).
# GUEST="--rate 200000 --hot-fraction 1" sets the guest's writes (default
# idle); CONTROL=1 drives it through its guest-control socket (kernel write
# tracking, uffd-wp) instead of --pid; SRCARGS and DESTARGS add agent options;
# SPYARGS py-spy's (SPYARGS=--native: C frames too, e.g. what the event loop's
# own time is). The summary leaves out waiting threads (pyspy_summary.py --skip-idle).
# PERF=1: Linux perf instead of py-spy (both agents, kernel and native code:
# the copies, the hashing, page tables; the source's figures then include
# perf's own CPU; needs perf, Debian's linux-perf); writes
# OUTDIR/perf-{dest,src}-MODE.data and prints each agent's top symbols.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-existing}
OUT=${2:-benchmarks/out/profile}
PY=.venv/bin/python
SPY=.venv/bin/py-spy
NOSPY=${NOSPY:-0}
PERF=${PERF:-0}
if [ "$PERF" = 1 ]; then
    NOSPY=1
    command -v perf >/dev/null || { echo "perf missing: apt-get install linux-perf" >&2; exit 2; }
fi
[ "$NOSPY" = 1 ] || [ -x "$SPY" ] || { echo "py-spy missing: .venv/bin/pip install py-spy" >&2; exit 2; }
mkdir -p "$OUT"
W=$(mktemp -d /dev/shm/precopy-profile.XXXXXX)
PIDS=()
# The guest is left stopped by the commit (SIGSTOP): it gets SIGKILL.
cleanup() { for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
mkdir -p "$W/dest"
$PY - "$W" "$MODE" <<'PYEOF'
import sys
from pathlib import Path
from precopy.guest import create_region
w, mode = Path(sys.argv[1]), sys.argv[2]
create_region(w / "src.mem", 1 << 30, "random", 1)
if mode == "existing":
    create_region(w / "dest" / "bench", 1 << 30, "random", 1001)
PYEOF
GUEST=${GUEST:---rate 0}
CONTROL=${CONTROL:-0}
CTL=()
[ "$CONTROL" = 1 ] && CTL=(--control "$W/guest.sock")
# shellcheck disable=SC2086
$PY -m precopy.guest dirty --memory "$W/src.mem" $GUEST "${CTL[@]}" & PIDS+=($!); G=$!
$PY -m precopy_agents.dest_main --listen 127.0.0.1:0 --memory-dir "$W/dest" --ready-file "$W/ready" \
    --log-level warning --insecure ${DESTARGS:-} & PIDS+=($!); D=$!
for _ in $(seq 100); do [ -s "$W/ready" ] && break; sleep 0.1; done
sleep 0.7
WHO=(--pid "$G")
if [ "$CONTROL" = 1 ]; then
    for _ in $(seq 100); do [ -S "$W/guest.sock" ] && break; sleep 0.1; done
    WHO=(--guest-control "$W/guest.sock")
fi
cpu() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }
D0=$(cpu "$D")
G0=$(cpu "$G")
PD=""; PS=""
[ "$NOSPY" = 1 ] || { $SPY record -r 1000 ${SPYARGS:-} -f raw -o "$OUT/dest-$MODE.txt" --pid "$D" >/dev/null 2>&1 & PD=$!; }
[ "$PERF" = 1 ] && { perf record -q -g -o "$OUT/perf-dest-$MODE.data" -p "$D" >/dev/null 2>&1 & PD=$!; }
PRE=()
[ "$PERF" = 1 ] && PRE=(perf record -q -g -o "$OUT/perf-src-$MODE.data" --)
/usr/bin/time -f "source CPU: %U s user + %S s system, wall %e s" -o "$W/time" "${PRE[@]}" $PY -m precopy_agents.source_main --to "$(cat "$W/ready")" --memory "$W/src.mem" "${WHO[@]}" --name bench \
    --downtime-ms 50 --compress off --on-nonconvergence force --report "$OUT/report-$MODE.json" \
    --progress off --log-level warning ${SRCARGS:-} & S=$!
[ "$NOSPY" = 1 ] || { $SPY record -s -r 1000 ${SPYARGS:-} -f raw -o "$OUT/src-$MODE.txt" --pid "$S" >/dev/null 2>&1 & PS=$!; }
wait "$S" || true
echo "destination CPU: $(awk -v a="$D0" -v b="$(cpu "$D")" 'BEGIN{printf "%.2f", b - a}') s (user + system)"
cat "$W/time"
echo "guest CPU: $(awk -v a="$G0" -v b="$(cpu "$G")" 'BEGIN{printf "%.2f", b - a}') s over the migration (a writer's share of the 2 cores)"
/usr/bin/time -f "  of which starting the interpreter and imports: %U s user + %S s system" $PY -c "import precopy_agents.source_main"
$PY -c "import json,sys; r=json.load(open(sys.argv[1])); print('migration', round(r['total_time_s'], 3), 's;', ', '.join(f\"{x['kind']} {x['seconds']:.3f} s\" for x in r['rounds']))" "$OUT/report-$MODE.json"
if [ "$PERF" = 1 ]; then
    kill -INT "$PD" 2>/dev/null || true
    wait "$PS" "$PD" 2>/dev/null || true
    for side in src dest; do
        echo "== $side: top symbols (perf, self) =="
        perf report -i "$OUT/perf-$side-$MODE.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null \
            | grep -v '^#' | grep '%' | head -25 || true
    done
elif [ "$NOSPY" = 1 ]; then
    # The yardstick beside it: the same bytes raw (benchmarks/limits.py), and the CPU both ends used.
    $PY - "$W/src.mem" "$MODE" <<'PYEOF'
import sys
from pathlib import Path
from benchmarks.limits import raw_copy
into = "existing" if sys.argv[2] == "existing" else None
for name, kw in (("link (reused buffer)", dict(fresh=False)), (f"into {'an existing' if into else 'a fresh'} file", dict(fresh=True, into=into))):
    cpu: list[float] = []
    s = raw_copy(Path(sys.argv[1]), cpu=cpu, **kw)
    print(f"raw copy {name}: {s:.3f} s; CPU of the copy, both processes: {cpu[0]:.2f} s")
PYEOF
else
    sleep 0.5
    kill -INT "$PD" 2>/dev/null || true
    wait "$PS" "$PD" 2>/dev/null || true
    $PY benchmarks/pyspy_summary.py --skip-idle "$OUT/dest-$MODE.txt" "$OUT/src-$MODE.txt"
fi
