"""Many tasks: the workloads of issue 14, side by side, with the driver's peak thread count.

    python bench/tasks.py [--quick] [--json] [--only bigmachine,ppe,pool,dask,ray]

Workloads (every task is a fixed amount of pure-Python work, measured to take that long
in this process before anything starts, so that one process does them one after the
other and two processors at most twice as fast):
  * 1ms:      2,000 tasks of 1 ms; bigmachine on 2 local machines through
              Executor.map and through call_async + as_completed
  * 0.1ms:    5,000 tasks of 0.1 ms, with chunksize (map)
  * cpu:      one machine offering 2 processors (Local(maxprocs=2)): map of 40
              CPU-bound tasks of 25 ms; two calls of a Pooled service at once
              against one; bigpi's sampler
  * 1e6:      Executor.map over 10^6 inputs, chunksize 1,000: the driver's peak RSS
              over its baseline
Against: one plain process (the serial time; ideal on 2 processors is half of it),
concurrent.futures.ProcessPoolExecutor(2) and multiprocessing.Pool(2), always; Dask
(client.map) and Ray (remote tasks) when they import, run by bench/run.py inside
`unshare -n` since they probe the network by themselves.

Next to each time, *_cpu_us is the CPU time per task (microseconds) of the driver and every
process under it (machines, workers, pool processes): unlike wall-clock times it stays put on
a loaded host, and against tasks_serial_1ms_cpu_us it says what each task costs beyond its
own work.

Each workload runs --repeats times (3; 1 with --quick), between runs of one process doing
half the same tasks (its time doubled is the reference): on this kind of VM the host slows a
processor by a third now and then, for seconds at a time, so a reference measured once, at
another moment, made whoever ran in a slow spell look worse than ideal allows and whoever
ran in a fast one better. Of the runs, the fastest is kept, against the better of the one
process's runs just before and just after it. The peak thread count is the highest over all
the runs.
"""

import concurrent.futures
import json
import multiprocessing
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
import _common as C  # noqa: E402


def spin(n):
    """n rounds of pure-Python work: a fixed amount, so that processes sharing a processor
    take longer (a loop until a deadline would not)."""
    x = 0
    for i in range(n):
        x += i
    return x


_ROUNDS_PER_MS = []


def rounds(ms):
    """The rounds of `spin` that take ms milliseconds here, measured once (best of 5)."""
    if not _ROUNDS_PER_MS:
        n = 200000
        best = min(timed(lambda: spin(n)) for _ in range(5))
        _ROUNDS_PER_MS.append(n / (best * 1000))
    return max(1, int(ms * _ROUNDS_PER_MS[0]))


def busy(n):
    """A task: n rounds of work (n from `rounds`)."""
    spin(n)
    return n


def ident(x):
    return x


class Burner:
    """A CPU-bound service, for Pooled."""

    def burn(self, n):
        return busy(n)


class _PeakThreads:
    """The driver's peak thread count while in the with block (the sampler not counted)."""

    def __enter__(self):
        self.peak = threading.active_count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, threading.active_count() - 1)
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def tree_cpu():
    """CPU seconds (user + system) used so far by this process and its live descendants
    (machines, their workers, pool processes), from /proc; None where there is no /proc."""
    try:
        parent, cpu = {}, {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open("/proc/%s/stat" % name) as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parent[int(name)] = int(fields[1])
                cpu[int(name)] = (int(fields[11]) + int(fields[12])) / _TICK
    except OSError:
        return None
    mine, total = {os.getpid()}, 0.0
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    for pid in mine:
        total += cpu.get(pid, 0.0)
    return total


REPEATS = [3]                # runs of each measure, the best kept (set by main)


def measure(out, key, n, fn, serial):
    """Run fn, which does n tasks, REPEATS times, between runs of serial() (the one process
    doing the same work, which returns its time), and put into out, for the fastest run:
    key + "_s", its time; key + "_serial_s", the better of the one process's just before and
    just after it (the more demanding reference); key + "_eff",
    the one process's time / 2 / its time; key + "_cpu_us", the CPU microseconds per task
    that this process and its descendants spent (processes still alive at the end are
    counted); and key + "_threads", the driver's peak thread count over all the runs."""
    runs, peak = [], 0
    ones = [serial()]
    for _ in range(REPEATS[0]):
        with _PeakThreads() as p:
            before = tree_cpu()
            took = timed(fn)
            after = tree_cpu()
        ones.append(serial())
        peak = max(peak, p.peak)
        cpu = None if before is None or after is None else 1e6 * (after - before) / n
        runs.append((took, min(ones[-2:]), cpu))    # the one process just before, or after
    best = min(runs)
    out[key + "_s"], out[key + "_serial_s"] = best[0], best[1]
    out[key + "_eff"] = best[1] / 2 / best[0]
    if best[2] is not None:
        out[key + "_cpu_us"] = best[2]
    out[key + "_threads"] = peak


R1 = R01 = R25 = None        # rounds of work of a 1 ms, 0.1 ms and 25 ms task, set by main
SERIAL_CPU = {}              # "1ms_cpu_us": CPU microseconds a 1 ms task takes one process
SERIAL_BEST = {}             # workload -> the one process's best time in the whole run


def one_process(workload, opts):
    """A function that times one process doing half the tasks of workload, and returns
    twice that (see the module's docstring); it keeps the best in SERIAL_BEST."""
    rounds_of, n = {"1ms": (R1, opts.n1), "0.1ms": (R01, opts.n01),
                    "cpu": (R25, opts.ncpu)}[workload]

    def run():
        before = tree_cpu()
        took = 2 * timed(lambda: [busy(rounds_of) for _ in range(n // 2)])
        after = tree_cpu()
        if took < SERIAL_BEST.get(workload, float("inf")):
            SERIAL_BEST[workload] = took
            if workload == "1ms" and before is not None and after is not None:
                SERIAL_CPU["1ms_cpu_us"] = 1e6 * (after - before) / (n // 2)
        return took
    return run


def paired(make, fn, repeats=5):
    """make(one, two): the ratio of fn(False)'s time (one call) and fn(True)'s (two at once),
    for the fastest of repeats runs of fn(True), each between runs of fn(False), with the
    better of those two (see `measure`)."""
    ones, runs = [fn(False)], []
    for _ in range(repeats):
        two = fn(True)
        ones.append(fn(False))
        runs.append((two, min(ones[-2:])))
    two, one = min(runs)
    return make(one, two)


def run_bigmachine(opts, out):
    import bigmachine
    from bigpi import CirclePI
    r = {}
    with bigmachine.start(bigmachine.Local()) as b:
        machines = b.start(2, {"Burner": Burner()})
        for m in machines:
            if m.wait(bigmachine.RUNNING) is not bigmachine.RUNNING:
                raise m.err
        with b.executor(progress=False) as ex:
            list(ex.map(busy, [R1] * 20))                           # warm
            measure(r, "1ms_map", opts.n1, lambda: list(ex.map(busy, [R1] * opts.n1)),
                    one_process("1ms", opts))
            measure(r, "0.1ms_chunked", opts.n01, lambda: list(
                ex.map(busy, [R01] * opts.n01, chunksize=opts.n01 // 40)),
                one_process("0.1ms", opts))

            def async_calls():
                futures = [machines[i % 2].call_async("Burner.burn", R1) for i in range(opts.n1)]
                for f in concurrent.futures.as_completed(futures):
                    f.result()
            measure(r, "1ms_async", opts.n1, async_calls, one_process("1ms", opts))
            rss = C.PeakRSS(os.getpid())
            total = 0
            for x in ex.map(ident, range(opts.n6), chunksize=1000):
                total += x
            assert total == opts.n6 * (opts.n6 - 1) // 2
            r["1e6_rss_delta_MiB"] = rss.delta()[1]
    with bigmachine.start(bigmachine.Local(maxprocs=2)) as b:
        m, = b.start(1, {"Burner": bigmachine.Pooled(Burner()),
                         "PI": bigmachine.Pooled(CirclePI())})
        if m.wait(bigmachine.RUNNING) is not bigmachine.RUNNING:
            raise m.err
        with b.executor(progress=False) as ex:
            list(ex.map(busy, [R1] * 4))                            # the workers start
            measure(r, "cpu_map", opts.ncpu, lambda: list(ex.map(busy, [R25] * opts.ncpu)),
                    one_process("cpu", opts))
        m.call("Burner.burn", R1)
        n = rounds(opts.pooled_ms)
        r["pooled_speedup"] = paired(lambda one, two: 2 * one / two, lambda both: timed(
            lambda: [f.result() for f in [m.call_async("Burner.burn", n)
                                          for _ in range(2 if both else 1)]]))
        m.call("PI.sample", 1000)
        r["bigpi_speedup"] = paired(lambda one, two: one / two, lambda both: timed(
            lambda: sum(f.result() for f in [m.call_async("PI.sample", opts.pi // 2)
                                             for _ in range(2)])) if both else timed(
            lambda: CirclePI().sample(opts.pi)))
    out.update(r)


def run_stdlib(opts, out, name, make):
    r = {}
    with make() as pool:
        submit = pool.submit if hasattr(pool, "submit") else pool.apply_async
        get = (lambda f: f.result()) if hasattr(pool, "submit") else (lambda f: f.get())
        list(pool.map(busy, [R1] * 20))                             # the workers start
        measure(r, "1ms_map", opts.n1, lambda: list(pool.map(busy, [R1] * opts.n1)),
                one_process("1ms", opts))

        def each():
            for f in [submit(busy, (R1,)) if not hasattr(pool, "submit") else submit(busy, R1)
                      for _ in range(opts.n1)]:
                get(f)
        measure(r, "1ms_async", opts.n1, each, one_process("1ms", opts))
        measure(r, "0.1ms_chunked", opts.n01, lambda: list(
            pool.map(busy, [R01] * opts.n01, chunksize=opts.n01 // 40)),
            one_process("0.1ms", opts))
        measure(r, "cpu_map", opts.ncpu, lambda: list(pool.map(busy, [R25] * opts.ncpu)),
                one_process("cpu", opts))
    out.update({name + ":" + k: v for k, v in r.items()})


def run_dask(opts, out):
    from dask.distributed import Client, LocalCluster
    r = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.gather(client.map(busy, [R1] * 20, pure=False))
        measure(r, "1ms_map", opts.n1, lambda: client.gather(client.map(
            busy, [R1] * opts.n1, pure=False)), one_process("1ms", opts))
        measure(r, "cpu_map", opts.ncpu, lambda: client.gather(client.map(
            busy, [R25] * opts.ncpu, pure=False)), one_process("cpu", opts))
    out.update({"dask:" + k: v for k, v in r.items()})


def run_ray(opts, out):
    import ray
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        remote = ray.remote(busy)
        ray.get([remote.remote(R1) for _ in range(20)])
        r = {}
        measure(r, "1ms_map", opts.n1, lambda: ray.get([remote.remote(R1)
                                                        for _ in range(opts.n1)]),
                one_process("1ms", opts))
        measure(r, "cpu_map", opts.ncpu, lambda: ray.get([remote.remote(R25)
                                                          for _ in range(opts.ncpu)]),
                one_process("cpu", opts))
    finally:
        ray.shutdown()
    out.update({"ray:" + k: v for k, v in r.items()})


def table(serial, results, n1, n01, ncpu):
    """The workloads side by side, as markdown: seconds (and % of ideal: the one process's
    time beside that run, halved), peak threads. serial: the one process's best times."""
    cols = [("bigmachine", ""), ("ProcessPoolExecutor", "ppe:"), ("multiprocessing.Pool", "pool:"),
            ("Dask", "dask:"), ("Ray", "ray:")]
    cols = [(t, p) for t, p in cols if any(k.startswith(p) and (p or ":" not in k)
                                           for k in results)]
    rows = [("%d x 1 ms, map" % n1, "1ms_map", "1ms"),
            ("%d x 1 ms, one future each" % n1, "1ms_async", "1ms"),
            ("%d x 0.1 ms, chunksize %d" % (n01, n01 // 40), "0.1ms_chunked", "0.1ms"),
            ("%d x 25 ms CPU-bound, 1 machine of 2 processors" % ncpu, "cpu_map", "cpu")]
    lines = ["| workload | one process (best) | " + " | ".join(t for t, _ in cols) + " |",
             "|---" * (2 + len(cols)) + "|"]
    for label, key, w in rows:
        cells = []
        for _, prefix in cols:
            s = results.get(prefix + key + "_s")
            if s is None:
                cells.append("n/a")
                continue
            th = results.get(prefix + key + "_threads")
            cells.append("%.2f s (%.0f%% of ideal)%s" % (
                s, 100 * results[prefix + key + "_eff"],
                ", %d threads" % th if th is not None else ""))
        lines.append("| %s | %s | %s |" % (
            label, "%.2f s" % serial[w] if w in serial else "n/a", " | ".join(cells)))
    return "\n".join(lines)


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", default="bigmachine,ppe,pool,dask,ray")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs of each workload, the fastest kept (default 3; 1 with --quick)")
    opts = ap.parse_args()
    REPEATS[0] = max(1, opts.repeats or (1 if opts.quick else 3))
    only = set(opts.only.split(","))
    opts.n1, opts.n01, opts.ncpu, opts.n6 = 2000, 5000, 40, 10 ** 6
    opts.pooled_ms, opts.pi = 400, 4 * 10 ** 6
    if opts.quick:
        opts.n1, opts.n01, opts.ncpu, opts.n6, opts.pooled_ms, opts.pi = \
            400, 2000, 16, 10 ** 5, 200, 10 ** 6
    global R1, R01, R25
    R1, R01, R25 = rounds(1), rounds(0.1), rounds(25)
    results, notes = {}, []
    parts = [("bigmachine", run_bigmachine),
             ("ppe", lambda o, out: run_stdlib(
                 o, out, "ppe", lambda: concurrent.futures.ProcessPoolExecutor(2))),
             ("pool", lambda o, out: run_stdlib(o, out, "pool", lambda: multiprocessing.Pool(2))),
             ("dask", run_dask), ("ray", run_ray)]
    for name, run in parts:
        if name not in only:
            continue
        C.log("== tasks: %s" % name)
        try:
            run(opts, results)
        except ImportError as e:
            notes.append("%s: not installed (%s)" % (name, e))
            continue
        except Exception as e:
            notes.append("%s: failed: %s: %s" % (name, type(e).__name__, e))
    serial = SERIAL_BEST
    tasks = {"tasks_serial_" + k: v for k, v in serial.items()}
    tasks.update(("tasks_serial_" + k, v) for k, v in SERIAL_CPU.items())
    tasks.update(("tasks_" + k.replace(":", "_"), v) for k, v in results.items())
    # The targets as ratios (see bench/run.py's TARGETS).
    if "1ms_map_s" in results:
        tasks["tasks_1ms_map_eff"] = results["1ms_map_eff"]
        tasks["tasks_1ms_async_eff"] = results["1ms_async_eff"]
        tasks["tasks_peak_threads"] = max(results[k] for k in results
                                          if k.endswith("_threads") and ":" not in k)
        tasks["tasks_chunked_speedup"] = 2 * results["0.1ms_chunked_eff"]
        tasks["tasks_cpu_map_speedup"] = 2 * results["cpu_map_eff"]
        tasks["tasks_pooled_speedup"] = results["pooled_speedup"]
        tasks["tasks_bigpi_speedup"] = results["bigpi_speedup"]
        tasks["tasks_1e6_rss_delta_MiB"] = results["1e6_rss_delta_MiB"]
    tasks["tasks_table"] = table(serial, results, opts.n1, opts.n01, opts.ncpu) if results else ""
    tasks["tasks_notes"] = notes
    if opts.json:
        sys.stdout.write(C.JSON_TAG + json.dumps({"tasks": tasks}) + "\n")
    else:
        print(tasks["tasks_table"])
        for k, v in sorted(tasks.items()):
            if k not in ("tasks_table", "tasks_notes"):
                print("%s: %s" % (k, "%.3f" % v if isinstance(v, float) else v))
        for n in notes:
            print("note:", n)


if __name__ == "__main__":
    main()
