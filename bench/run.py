"""One command for the whole benchmark: floors, bigmachine, peers -> one markdown table.

    python bench/run.py [--quick] [--peers mp,execnet,rpyc,pyro5,ray,dask|none]
                        [--python /tmp/bench-venv/bin/python] [--json-out FILE]

Each part runs in its own process, one after the other (never concurrently: the
machine has 2 cores). Every part runs on ONE interpreter, --python (default:
$BENCH_PYTHON, else /tmp/bench-venv/bin/python when it exists, else this
interpreter), so interpreter start-up costs are the same for every column
(bigmachine is stdlib-only, so it runs in the peers' venv as well). Ray and Dask run inside `unshare -n` (a
network namespace with only loopback) because they probe cloud metadata and
public DNS by themselves; without root or unshare they are skipped with a note.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402

PEERS = ["mp", "execnet", "rpyc", "pyro5", "ray", "dask"]
NETNS_PEERS = {"ray", "dask"}
COLUMNS = ["raw TCP", "raw TLS 1.3", "bigmachine", "mp.managers", "execnet",
           "RPyC", "Pyro5", "Ray", "Dask"]
TITLES = {"mp": "mp.managers", "execnet": "execnet", "rpyc": "RPyC",
          "pyro5": "Pyro5", "ray": "Ray", "dask": "Dask"}
DEFAULT_VENV_PY = "/tmp/bench-venv/bin/python"
PYC_PREFIX = "/tmp/bench-pycache"

# Targets for bigmachine: (key, label, reference, goal, higher is better). The reference is
# a column (its value of the same key), a number (an absolute limit), (label, key) of
# bigmachine's own results, or (label, column, key): another key of a column (the floors
# that are limits: the spin-polled round trip, the recv_into read). {stream} in a label is
# the size the stream measures used.
SPIN_TLS = ("spin-polled TLS round trip", "raw TLS 1.3", "spin_us")
TARGETS = [
    ("small_us", "small call <= 1.5x spin-polled TLS 1.3 round trip", SPIN_TLS, 1.5, False),
    ("threads_cps", "32 threads >= 1.6x mp.managers calls/s", "mp.managers", 1.6, True),
    ("arg_MBps", "64 MiB argument >= 85% of the recv_into floor",
     ("recv_into argument", "raw TLS 1.3", "recv_into_arg_MBps"), 0.85, True),
    ("reply_MBps", "64 MiB reply >= 85% of the recv_into floor",
     ("recv_into reply", "raw TLS 1.3", "recv_into_reply_MBps"), 0.85, True),
    ("arg_rss_delta_MiB", "64 MiB argument: receiver peak RSS <= payload + 10%",
     ("payload + 10%", "bigmachine", "payload_plus_10_MiB"), 1.0, False),
    ("reply_rss_delta_MiB", "64 MiB reply: receiver peak RSS <= payload + 10%",
     ("payload + 10%", "bigmachine", "payload_plus_10_MiB"), 1.0, False),
    ("startup_ms", "2 machines RUNNING <= 100 ms", 100.0, 1.0, False),
    ("startup_nobytecode_ms", "2 machines RUNNING <= 100 ms, PYTHONDONTWRITEBYTECODE=1",
     100.0, 1.0, False),
    ("startup64_ms", "64 machines RUNNING <= 2.5 s", 2500.0, 1.0, False),
    ("idle64_cpu_pct", "driver CPU with 64 idle machines < 1%", 1.0, 1.0, False),
    ("bigpi_two_sps", "bigpi: 2 machines >= 1.9x one process, samples/s",
     ("one process", "bigpi_one_sps"), 1.9, True),
    ("stream_reply_rss_delta_MiB", "{stream} streamed reply in constant memory: peak RSS "
     "<= 64 MiB over baseline, both ends", 64.0, 1.0, False),
    # Many tasks (bench/tasks.py): ratios against one plain process, ideal = serial / 2.
    ("tasks_1ms_map_eff", "2,000 x 1 ms tasks, Executor.map on 2 machines >= 90% of ideal",
     1.0, 0.9, True),
    ("tasks_1ms_async_eff", "2,000 x 1 ms tasks, call_async on 2 machines >= 90% of ideal",
     1.0, 0.9, True),
    ("tasks_peak_threads", "driver threads <= 16 + 2 per machine (2 machines)", 20.0, 1.0,
     False),
    ("tasks_chunked_speedup", "5,000 x 0.1 ms tasks with chunksize >= 1.5x one process",
     1.0, 1.5, True),
    ("tasks_cpu_map_speedup", "1 machine of 2 processors: map of CPU-bound tasks >= 1.8x "
     "one process", 1.0, 1.8, True),
    ("tasks_pooled_speedup", "1 machine of 2 processors: 2 Pooled calls at once >= 1.8x one",
     1.0, 1.8, True),
    ("tasks_bigpi_speedup", "bigpi on one Local(maxprocs=2) machine >= 1.9x one process",
     1.0, 1.9, True),
    ("tasks_1e6_rss_delta_MiB", "map over 10^6 inputs: driver RSS <= 100 MiB over baseline",
     100.0, 1.0, False),
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run_part(label, cmd, timeout):
    """Run one part; return its parsed JSON results, or {} and a note."""
    log("== %s: %s" % (label, " ".join(cmd)))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, cwd=HERE,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {}, "%s: timed out after %d s" % (label, timeout)
    except OSError as e:
        return {}, "%s: could not run: %s" % (label, e)
    log("== %s: %.1f s, exit %d" % (label, time.perf_counter() - t0, p.returncode))
    for line in p.stdout.decode(errors="replace").splitlines():
        if line.startswith(C.JSON_TAG):
            return json.loads(line[len(C.JSON_TAG):]), None
    return {}, "%s: exit %d, no results" % (label, p.returncode)


def _loadavg():
    try:
        return "%.2f" % os.getloadavg()[0]
    except OSError:
        return "?"


def _py_version(py):
    try:
        return subprocess.run([py, "-c", "import platform; print(platform.python_version())"],
                              capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception:
        return "?"


def only_loopback():
    """True when this network namespace has no interface but lo."""
    try:
        with open("/proc/net/dev") as f:
            names = [l.split(":")[0].strip() for l in f.readlines()[2:]]
        return names == ["lo"]
    except OSError:
        return False


def netns_wrap(cmd):
    """cmd to run inside a fresh network namespace with only loopback, or None."""
    if only_loopback():
        return cmd
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return None
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"'] + cmd


# ----------------------------------------------------------------------------
# Formatting.

def fmt(v, kind):
    if v is None:
        return "n/a"
    if kind == "int" or v >= 1e5:
        return "{:,.0f}".format(v)
    if kind == "ratio":
        return "%.2fx" % v
    if v >= 100:
        return "%.0f" % v
    if v >= 10:
        return "%.1f" % v
    return "%.2f" % v


def table(header, rows):
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    for r in rows:
        out.append("| " + " | ".join(r) + " |")
    return "\n".join(out)


ROWS = [
    ("small call int->int, median µs (floors: blocking, threaded server)", "small_us", "num"),
    ("  calls per CPU-second of the caller", "small_cps_per_cpu_s", "int"),
    ("spin-polled round trip, median µs (both ends busy-poll: no idle-core wake-up)",
     "spin_us", "num"),
    ("  calls per CPU-second of the caller", "spin_cps_per_cpu_s", "int"),
    ("32 client threads, calls/s", "threads_cps", "int"),
    ("64 MiB argument, MB/s", "arg_MBps", "num"),
    ("  receiver peak RSS over baseline, MiB", "arg_rss_delta_MiB", "num"),
    ("64 MiB reply, MB/s", "reply_MBps", "num"),
    ("  receiver peak RSS over baseline, MiB", "reply_rss_delta_MiB", "num"),
    ("64 MiB reply read with recv_into into one preallocated buffer, MB/s",
     "recv_into_reply_MBps", "num"),
    ("64 MiB argument read with recv_into into one preallocated buffer, MB/s",
     "recv_into_arg_MBps", "num"),
    ("64 MiB reply read with recv_into into a new buffer each time, MB/s",
     "recv_into_fresh_reply_MBps", "num"),
    ("2 workers ready, ms", "startup_ms", "num"),
]

RATIO_ROWS = [
    ("small call / spin-polled TLS round trip (lower is better)", "small_us", SPIN_TLS),
    ("small call / blocking raw TLS round trip (lower is better)", "small_us", "raw TLS 1.3"),
    ("32 threads / mp.managers", "threads_cps", "mp.managers"),
    ("64 MiB argument / recv_into floor", "arg_MBps",
     ("recv_into argument", "raw TLS 1.3", "recv_into_arg_MBps")),
    ("64 MiB reply / recv_into floor", "reply_MBps",
     ("recv_into reply", "raw TLS 1.3", "recv_into_reply_MBps")),
    ("64 MiB reply / recv_into into a new buffer", "reply_MBps",
     ("recv_into new buffer", "raw TLS 1.3", "recv_into_fresh_reply_MBps")),
    ("64 MiB argument / blocking raw TLS (threaded server)", "arg_MBps", "raw TLS 1.3"),
    ("64 MiB reply / blocking raw TLS (threaded server)", "reply_MBps", "raw TLS 1.3"),
    ("2 workers ready / 100 ms (lower is better)", "startup_ms", 100.0),
]

# bigmachine only, absolute: (label, key, kind)
BM_MORE = [
    ("2 machines RUNNING, a fresh driver with PYTHONDONTWRITEBYTECODE=1, ms",
     "startup_nobytecode_ms", "num"),
    ("2 machines RUNNING, a fresh driver without it, ms", "startup_bytecode_ms", "num"),
    ("64 machines RUNNING, a fresh driver, ms", "startup64_ms", "num"),
    ("  driver CPU while the 64 sit RUNNING and idle, %", "idle64_cpu_pct", "num"),
    ("bigpi, one plain Python process, samples/s", "bigpi_one_sps", "int"),
    ("bigpi, 2 local machines (bigpi's driver code), samples/s", "bigpi_two_sps", "int"),
    ("  2 machines / one process", "bigpi_ratio", "ratio"),
    ("{stream} streamed reply (generator of 1 MiB chunks), MB/s", "stream_reply_MBps", "num"),
    ("  client peak RSS over baseline, MiB", "stream_reply_client_rss_delta_MiB", "num"),
    ("  machine peak RSS over baseline, MiB", "stream_reply_machine_rss_delta_MiB", "num"),
    ("{stream} streamed argument (a binary file), MB/s", "stream_arg_MBps", "num"),
    ("  client peak RSS over baseline, MiB", "stream_arg_client_rss_delta_MiB", "num"),
    ("  machine peak RSS over baseline, MiB", "stream_arg_machine_rss_delta_MiB", "num"),
]


def get(results, col, key):
    r = results.get(col) or {}
    v = r.get(key)
    return v if isinstance(v, (int, float)) else None


def reference(results, ref, key):
    """(label, value) of a reference: a column's value of key, a number (a limit), or
    (label, key) of bigmachine's own results."""
    if isinstance(ref, (int, float)):
        return "limit", float(ref)
    if isinstance(ref, tuple) and len(ref) == 3:
        return ref[0], get(results, ref[1], ref[2])
    if isinstance(ref, tuple):
        return ref[0], get(results, "bigmachine", ref[1])
    return ref, get(results, ref, key)


def ratio(results, col, key, ref):
    v = get(results, col, key)
    base = reference(results, ref, key)[1]
    if v is None or not base:
        return None
    return v / base


def size_label(nbytes):
    if not isinstance(nbytes, int):
        return "1 GiB"  # the default: the measure did not run
    if nbytes % (1 << 30) == 0:
        return "%d GiB" % (nbytes >> 30)
    return "%d MiB" % (nbytes >> 20)


def report(results, notes, opts, cols):
    lines = []
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines.append("# bigmachine.py benchmark (%s%s)" % (now, ", --quick" if opts.quick else ""))
    lines.append("")
    lines.append("Python %s on %s, %d cores; loopback only. MB/s = 10^6 bytes/s; "
                 "64 MiB = 67,108,864 incompressible bytes."
                 % (platform.python_version(), platform.machine(), os.cpu_count() or 0))
    lines.append("")
    lines.append("## Absolute numbers")
    lines.append("")
    rows = []
    for label, key, kind in ROWS:
        rows.append([label] + [fmt(get(results, c, key), kind) for c in cols])
    lines.append(table(["measure"] + cols, rows))
    lines.append("")
    lines.append("## Ratios (references: the floors that are limits -- the spin-polled TLS "
                 "round trip and the recv_into read -- and, for comparison, the blocking "
                 "threaded raw TLS server; mp.managers for 32 threads; 100 ms for startup)")
    lines.append("")
    rows = []
    for label, key, ref in RATIO_ROWS:
        rows.append([label] + [fmt(ratio(results, c, key, ref), "ratio") for c in cols])
    lines.append(table(["ratio"] + cols, rows))
    lines.append("")
    lines.append("## bigmachine targets")
    lines.append("")
    bmr = results.get("bigmachine") or {}
    stream = size_label(bmr.get("stream_bytes"))
    rows = []
    for key, label, ref, goal, higher in TARGETS:
        v = get(results, "bigmachine", key)
        r = ratio(results, "bigmachine", key, ref)
        if r is None:
            met = "n/a"
        else:
            met = "met" if (r >= goal if higher else r <= goal) else "NOT met"
        reflabel, refv = reference(results, ref, key)
        rows.append([label.format(stream=stream), fmt(v, "num"),
                     "%s %s" % (reflabel, fmt(refv, "num")), fmt(r, "ratio"), met])
    lines.append(table(["target", "bigmachine", "reference", "ratio", "result"], rows))
    rows = [[label.format(stream=stream), fmt(get(results, "bigmachine", key), kind)]
            for label, key, kind in BM_MORE]
    if any(r[1] != "n/a" for r in rows):
        lines.append("")
        lines.append("## bigmachine: startup, bigpi scaling and streams")
        lines.append("")
        lines.append("bigpi: %s samples of examples/bigpi.py's CirclePI.sample, best of %s; "
                     "the machines' clock starts once both are RUNNING. Streams: read "
                     "into one 1 MiB buffer and dropped, best of %s."
                     % (fmt(bmr.get("bigpi_samples"), "int"), bmr.get("bigpi_reps", "n/a"),
                        bmr.get("stream_reply_reps", "n/a")))
        lines.append("")
        lines.append(table(["measure", "bigmachine"], rows))
    idle = []
    for c in ("raw TCP", "raw TLS 1.3"):
        blocking, spin = get(results, c, "small_us"), get(results, c, "spin_us")
        if blocking and spin and spin > blocking:
            idle.append("%s: blocking %s µs, spin-polled %s µs (spinning lost: the host had "
                        "no core to spare)" % (c, fmt(blocking, "num"), fmt(spin, "num")))
        elif blocking and spin:
            idle.append("%s: blocking %s µs, spin-polled %s µs (%s µs, %.1fx)"
                        % (c, fmt(blocking, "num"), fmt(spin, "num"),
                           fmt(blocking - spin, "num"), blocking / spin))
    if idle:
        lines.append("")
        lines.append("Idle-core effect, this run: the same round trip with both ends blocking "
                     "in the kernel, against both ends spin-polling (an idle core woken for "
                     "each message): " + "; ".join(idle) + ".")
    tasks = results.get("tasks") or {}
    if tasks.get("tasks_table"):
        lines.append("")
        lines.append("## Many tasks (bench/tasks.py)")
        lines.append("")
        lines.append("Seconds, the share of ideal (one process's time / 2 processors) and the "
                     "driver's peak thread count. Ideal needs both cores free: the driver "
                     "and the machines share them.")
        lines.append("")
        lines.append(tasks["tasks_table"])
        netns = results.get("tasks_netns") or {}
        if netns.get("tasks_table"):
            lines.append("")
            lines.append("Dask and Ray, run apart inside `unshare -n` (their own one-process "
                         "time):")
            lines.append("")
            lines.append(netns["tasks_table"])
        for n in tasks.get("tasks_notes", []) + netns.get("tasks_notes", []):
            lines.append("")
            lines.append("- " + n)
    pk = results.get("pickle")
    if pk:
        lines.append("")
        lines.append("## pickle floor (protocol %s)" % pk.get("protocol"))
        lines.append("")
        lines.append("small int tuple: dumps %.2f µs, loads %.2f µs; 64 MiB bytes: "
                     "dumps %.0f MB/s, loads %.0f MB/s (in-band, one copy each)."
                     % (pk.get("small_dumps_us", 0), pk.get("small_loads_us", 0),
                        pk.get("bulk_dumps_MBps", 0), pk.get("bulk_loads_MBps", 0)))
    pr = results.get("process")
    if pr:
        lines.append("")
        bits = ["`python -c pass` %s ms" % fmt(pr.get("python_c_pass_ms"), "num"),
                "importing ssl/socket/threading/pickle %s ms"
                % fmt(pr.get("python_import_ssl_ms"), "num")]
        if "python_import_bigmachine_ms" in pr:
            bits.append("importing bigmachine %s ms"
                        % fmt(pr.get("python_import_bigmachine_ms"), "num"))
        lines.append("Process start floor (wall time of a fresh interpreter, one at a "
                     "time): " + "; ".join(bits) + ".")
    extra = []
    for k, label, kind in (
            ("session_ms", "bigmachine.start() session, ms", "num"),
            ("shutdown_ms", "b.shutdown(), ms", "num"),
            ("async_cps", "call_async with 64 in flight, calls/s", "int"),
            ("bytearray_arg_MBps", "64 MiB bytearray argument, MB/s", "num"),
            ("bytearray_arg_rss_delta_MiB", "its receiver peak RSS +MiB", "num"),
            ("bytearray_reply_MBps", "64 MiB bytearray reply, MB/s", "num"),
            ("bytearray_reply_rss_delta_MiB", "its receiver peak RSS +MiB", "num")):
        if isinstance(bmr.get(k), (int, float)):
            extra.append("%s: %s" % (label, fmt(bmr[k], kind)))
    if extra:
        lines.append("")
        lines.append("bigmachine extras: " + "; ".join(extra) + ".")
    lines.append("")
    lines.append("## Notes")
    lines.append("")
    for c in cols:
        r = results.get(c) or {}
        bits = []
        if r.get("version"):
            bits.append("version %s" % r["version"])
        if r.get("error"):
            bits.append("n/a: " + r["error"])
        bits += r.get("notes", [])
        if bits:
            lines.append("- %s: %s" % (c, "; ".join(str(b) for b in bits)))
    for n in notes:
        lines.append("- " + n)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description="run every benchmark part, print one table")
    ap.add_argument("--quick", action="store_true", help="short durations (smoke run)")
    ap.add_argument("--peers", default=",".join(PEERS),
                    help="comma list among %s, or none (mp always runs: it is the "
                    "reference of the 32-thread target)" % ",".join(PEERS))
    ap.add_argument("--python", default=None,
                    help="interpreter with the optional peers installed (a venv)")
    ap.add_argument("--no-floors", action="store_true")
    ap.add_argument("--no-bigmachine", action="store_true")
    ap.add_argument("--json-out", default=None, help="also write all results as JSON here")
    ap.add_argument("--keep-env", action="store_true",
                    help="do not touch PYTHONDONTWRITEBYTECODE / PYTHONPYCACHEPREFIX")
    opts = ap.parse_args(argv)

    peers = [] if opts.peers.strip().lower() == "none" else \
        [p.strip().lower() for p in opts.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        ap.error("unknown peers: %s" % ", ".join(unknown))
    if "mp" not in peers:  # stdlib, and the reference of the 32-thread target
        peers.insert(0, "mp")
    py = opts.python or os.environ.get("BENCH_PYTHON") or \
        (DEFAULT_VENV_PY if os.path.exists(DEFAULT_VENV_PY) else sys.executable)
    common = ["--json"] + (["--quick"] if opts.quick else [])
    timeout = 600 if opts.quick else 1800

    results, notes = {}, []
    load0 = _loadavg()
    if not opts.keep_env:
        # Users' interpreters cache bytecode; without it every machine process
        # compiles bigmachine.py again (~30 ms). Cache outside the work tree.
        if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
            notes.append("PYTHONDONTWRITEBYTECODE was set; unset for the run, bytecode "
                         "cached under %s (--keep-env to keep it)" % PYC_PREFIX)
        os.environ.setdefault("PYTHONPYCACHEPREFIX", PYC_PREFIX)
        root = os.path.dirname(HERE)
        subprocess.run([py, "-c", "import sys; sys.path[:0] = [%r, %r]; import _common, "
                        "bigmachine" % (HERE, root)], cwd=HERE, capture_output=True,
                       timeout=120)

    def part(label, cmd):
        r, note = run_part(label, cmd, timeout)
        results.update(r)
        if note:
            notes.append(note)

    if not opts.no_floors:
        part("floors", [py, "floors.py"] + common)
    if not opts.no_bigmachine:
        part("bigmachine", [py, "bigmachine_bench.py"] + common)
        part("tasks", [py, "tasks.py", "--only", "bigmachine,ppe,pool"] + common)
        # Dask and Ray probe the network by themselves: measured apart, in a netns.
        netns = [p for p in ("dask", "ray") if p in peers]
        cmd = netns_wrap([py, os.path.join(HERE, "tasks.py"), "--only", ",".join(netns)]
                         + common) if netns else None
        if cmd is not None:
            more, note = run_part("tasks in netns", cmd, timeout)
            if note:
                notes.append(note)
            results["tasks_netns"] = more.get("tasks") or {}
        results.setdefault("bigmachine", {}).update(
            (k, v) for k, v in (results.get("tasks") or {}).items()
            if isinstance(v, (int, float)))
    plain = [p for p in peers if p not in NETNS_PEERS]
    isolated = [p for p in peers if p in NETNS_PEERS]
    if plain:
        part("peers", [py, "peers.py", "--peers", ",".join(plain)] + common)
    if isolated:
        cmd = netns_wrap([py, os.path.join(HERE, "peers.py"), "--peers",
                          ",".join(isolated)] + common)
        if cmd is None:
            for p in isolated:
                results[TITLES[p]] = {"error": "skipped: needs a loopback-only network "
                                      "namespace (run as root with unshare)", "notes": []}
        else:
            part("peers in netns", cmd)
    notes.append("every part ran on %s (Python %s)" % (py, _py_version(py)))
    notes.append("load average (1 min) before the run %s, after %s; on 2 cores "
                 "anything else running makes the numbers noisy" % (load0, _loadavg()))

    cols = [c for c in COLUMNS
            if (c in ("raw TCP", "raw TLS 1.3") and not opts.no_floors)
            or (c == "bigmachine" and not opts.no_bigmachine)
            or c in [TITLES[p] for p in peers]]
    sys.stdout.write(report(results, notes, opts, cols))
    sys.stdout.flush()
    if opts.json_out:
        with open(opts.json_out, "w") as f:
            json.dump({"results": results, "notes": notes}, f, indent=1)


if __name__ == "__main__":
    main()
