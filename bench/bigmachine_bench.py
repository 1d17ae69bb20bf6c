"""The benchmark measures for bigmachine itself, through its public API only.

    python bench/bigmachine_bench.py [--quick] [--json] [--system local]

Measures (same code path as the floors and the peers, see _common.py):
  * small call:   m.call("Echo.inc", x), median µs
  * 32 threads:   32 client threads calling m.call on ONE machine, calls/s
  * 64 MiB:       m.call("Echo.take", <64 MiB bytes>) and m.call("Echo.blob", n),
                  MB/s, with the peak RSS of the receiving process
  * startup:      b.start(2, {"Echo": Echo()}) until both machines are RUNNING, ms
                  (the session, bigmachine.start(...), is opened before the clock
                  starts and its cost is reported apart as session_ms)
Extra, bigmachine only:
  * async_cps:    calls/s of call_async pipelining (up to 64 in flight) from one thread
  * bytearray_*:  the 64 MiB measures with a bytearray argument / reply (the main
                  rows use bytes, as for every peer; bigmachine sends buffers
                  such as bytearray out of band)
  * stream_*:     a 1 GiB streamed reply (Echo.stream returns a generator of 1 MiB
                  chunks) and a 1 GiB streamed argument (an unseekable binary file),
                  each read into one 1 MiB buffer and dropped; MB/s and the peak RSS
                  of both ends over their baseline (constant memory: <= 64 MiB)
  * bigpi_*:      examples/bigpi.py's CirclePI.sample: n samples in one plain Python
                  process, against the same n spread by bigpi's driver code over 2
                  local machines (timed once both are RUNNING); samples/s and ratio

The machine processes load this file as __mp_main__, so everything at module
top level must stay import-safe: the service class and helpers only.
"""

import io
import math
import os
import statistics
import subprocess
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")
STREAM_CHUNK = C.MIB


class Echo(C.Echo):
    """The shared benchmark service (top level, so machines can unpickle it), with the same
    reply as a bytearray too, which pickle protocol 5 can send out of band."""

    _ba = None

    def prep(self, n):
        if len(self._payload) != n:
            self._ba = None
        super().prep(n)

    def blob_ba(self, n):
        self.prep(n)
        if self._ba is None:
            self._ba = bytearray(self._payload)
        return self._ba

    def stream(self, n):
        """n bytes as a streamed reply: a generator of one prebuilt incompressible chunk, so
        that making the data costs nothing and the machine holds one chunk, whatever n."""
        chunk = C.payload(STREAM_CHUNK)
        whole, rest = divmod(n, len(chunk))

        def chunks():
            for _ in range(whole):
                yield chunk
            if rest:
                yield chunk[:rest]
        return chunks()

    def consume(self, f, limit):
        """Read a streamed argument to its end into one buffer: how many bytes came."""
        return C.drain(f, bytearray(STREAM_CHUNK), limit)

    def crc32(self, f, limit):
        """The CRC-32 of a small streamed argument (the warm-up checks the bytes, not only
        how many came)."""
        return zlib.crc32(f.read(limit + 1))


class Repeat(io.RawIOBase):
    """An unseekable binary file of n bytes: one chunk over and over. Passed as an argument,
    bigmachine streams it (any readable binary file); it makes the data at memcpy speed
    and holds one chunk, whatever n."""

    def __init__(self, n, chunk):
        super().__init__()
        self._left, self._chunk = n, memoryview(chunk)

    def readable(self):
        return True

    def readinto(self, b):
        k = min(len(b), len(self._chunk), self._left)
        b[:k] = self._chunk[:k]
        self._left -= k
        return k


class BMWorker:
    def __init__(self, m):
        self.m = m

    def inc(self, x):
        return self.m.call("Echo.inc", x)

    def per_thread(self):
        m = self.m
        return (lambda x: m.call("Echo.inc", x)), None

    def prep(self, n):
        self.m.call("Echo.prep", n)

    def take(self, b):
        return self.m.call("Echo.take", b)

    def blob(self, n):
        return self.m.call("Echo.blob", n)

    def pid(self):
        return self.m.call("Echo.pid")


class BMPeer:
    name = "bigmachine"

    def __init__(self, bm, system):
        self.bm = bm
        self.system = system
        self.b = None
        self.extra = {}
        self._sessions = []

    def open(self):
        t0 = time.perf_counter()
        self.b = self.bm.start(self.system)
        self._sessions.append((time.perf_counter() - t0) * 1e3)
        self.extra["session_ms"] = min(self._sessions)

    def start(self, n):
        return [BMWorker(m) for m in wait_running(self.bm, self.b.start(n, {"Echo": Echo()}))]

    def stop(self):
        if self.b is not None:
            t0 = time.perf_counter()
            self.b.shutdown()
            self.extra["shutdown_ms"] = (time.perf_counter() - t0) * 1e3
            self.b = None

    def extra_steps(self, w, opts):
        return [("startup_env", lambda: measure_startup_env(opts)),
                ("async", lambda: measure_async(w.m, opts.duration, opts.max_calls)),
                ("bytearray", lambda: measure_bytearray(w, opts)),
                ("stream", lambda: measure_stream(w, opts.stream, opts.bulk_reps))]


def wait_running(bm, machines, timeout=120):
    """machines, once every one is RUNNING; raises if one stopped or is slower than timeout."""
    for m in machines:
        st = m.wait(bm.RUNNING, timeout=timeout)
        if m.err is not None:
            raise RuntimeError("machine %s stopped: %r" % (m.addr, m.err))
        if st != bm.RUNNING:
            raise RuntimeError("machine %s is %r after %d s" % (m.addr, st, timeout))
    return machines


def measure_bytearray(w, opts):
    """The 64 MiB measures again with bytearray argument and reply."""
    out = {}
    data = bytearray(C.payload(opts.bulk))
    r = C.measure_arg(w, opts.bulk, opts.bulk_reps, data=data)
    del data
    r.update(C.measure_reply(w, opts.bulk, opts.bulk_reps,
                             blob=lambda n: w.m.call("Echo.blob_ba", n)))
    for k, v in r.items():
        out["bytearray_" + k] = v
    return out


def measure_stream(w, nbytes, reps, budget=8.0):
    """MB/s of an nbytes streamed reply (Echo.stream) and of an nbytes streamed argument
    (Echo.consume(Repeat(...))), best of reps, and the peak RSS of both ends over their RSS
    before (the most of any repetition): a stream holds a chunk or two at each end at a
    time, never the whole of it."""
    m = w.m
    pid = w.pid()
    buf = bytearray(STREAM_CHUNK)
    chunk = C.payload(STREAM_CHUNK)
    # Untimed: the machine builds its chunk, both paths run once, and the bytes that came
    # are checked (the timed runs count them only).
    warm = 4 * STREAM_CHUNK
    with m.call("Echo.stream", warm) as f:
        if f.read(warm + 1) != chunk * 4:
            raise AssertionError("the warm-up streamed reply is not what the machine sent")
    if m.call("Echo.crc32", Repeat(warm, chunk), warm) != zlib.crc32(chunk * 4):
        raise AssertionError("the warm-up streamed argument is not what was sent")

    bounded = m.options(timeout=600)

    def reply():
        # The deadline covers the call up to its reply, drain's the stream that follows.
        f = bounded.call("Echo.stream", nbytes)
        try:
            return C.drain(f, buf, nbytes, time.perf_counter() + 600)
        finally:
            f.close()

    def arg():
        # No deadline here: with one, bigmachine.py (aa9c06c, still in 77742bb) puts the
        # socket in timeout mode, and its thread that sends the argument then fails now and
        # then ("EOF occurred in violation of protocol"; the call: "connection closed by
        # peer") while the calling thread reads the same TLS connection. run.py's timeout
        # of the part bounds it.
        return m.call("Echo.consume", Repeat(nbytes, chunk), nbytes)

    out = {"stream_bytes": nbytes}
    for name, run in (("reply", reply), ("arg", arg)):
        rates, client, machine = [], [], []
        give_up = time.perf_counter() + budget  # 1 GiB takes seconds: fewer repetitions
        for _ in range(reps):
            if rates and time.perf_counter() > give_up:
                break
            here, there = C.PeakRSS(os.getpid()), C.PeakRSS(pid)
            t0 = time.perf_counter()
            n = run()
            dt = time.perf_counter() - t0
            if n != nbytes:
                raise AssertionError("the streamed %s carried %d bytes, want %d"
                                     % (name, n, nbytes))
            rates.append(nbytes / dt / 1e6)
            client.append(here.delta()[1])
            machine.append(there.delta()[1])
        key = "stream_" + name
        out[key + "_MBps"] = max(rates)
        out[key + "_reps"] = len(rates)
        if None not in client + machine:
            out[key + "_client_rss_delta_MiB"] = max(client)
            out[key + "_machine_rss_delta_MiB"] = max(machine)
            out[key + "_rss_delta_MiB"] = max(client + machine)
    return out


def startup_probe(n, reps, idle):
    """Run as a fresh driver (see measure_startup_env): start n machines reps times, each time
    from a new session until all are RUNNING; print one JSON line with the median ms and, if
    idle, the driver's CPU (all its threads) over idle seconds with the n machines RUNNING."""
    import json
    bm = C.import_bigmachine()
    times, idle_pct = [], None
    for _ in range(reps):
        with bm.start("local") as b:
            t0 = time.perf_counter()
            wait_running(bm, b.start(n, {"Echo": Echo()}))
            times.append((time.perf_counter() - t0) * 1e3)
            if idle:
                c0, w0 = time.process_time(), time.perf_counter()
                time.sleep(idle)
                idle_pct = 100 * (time.process_time() - c0) / (time.perf_counter() - w0)
    print(json.dumps({"ms": statistics.median(times), "all_ms": [round(t) for t in times],
                      "idle_pct": idle_pct}))


def measure_startup_env(opts):
    """Machines RUNNING from a fresh driver process, as a user runs one: 2 machines with
    PYTHONDONTWRITEBYTECODE=1 set and without it (the driver's own flags pass to its machines,
    so each setting needs its own driver), and 64 machines, with the driver's CPU while they
    sit RUNNING and idle (their keepalives are all it should do)."""
    import json
    out = {}
    runs = [("startup_nobytecode", 2, opts.reps, 0, {"PYTHONDONTWRITEBYTECODE": "1"}),
            ("startup_bytecode", 2, opts.reps, 0, {"PYTHONDONTWRITEBYTECODE": None}),
            ("startup64", 64, 1, 1.0 if opts.quick else 3.0, {})]
    for key, n, reps, idle, change in runs:
        env = dict(os.environ)
        for k, v in change.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        code = ("import sys; sys.path.insert(0, %r); import bigmachine_bench; "
                "bigmachine_bench.startup_probe(%d, %d, %r)" % (HERE, n, reps, idle))
        p = subprocess.run([sys.executable, "-c", code], env=env, cwd=HERE, timeout=600,
                           stdout=subprocess.PIPE)
        if p.returncode:
            raise RuntimeError("%s: the driver exited with %d" % (key, p.returncode))
        r = json.loads(p.stdout.decode().strip().splitlines()[-1])
        out[key + "_ms"] = r["ms"]
        out[key + "_all_ms"] = r["all_ms"]
        if idle:
            out["idle64_cpu_pct"] = r["idle_pct"]
    return out


def measure_bigpi(bm, system, n, reps, budget=30.0):
    """examples/bigpi.py's CirclePI.sample(n) in one plain Python process, against the same n
    samples spread over 2 local machines the way bigpi's driver does: samples/s of each (best
    of reps, the two interleaved) and their ratio. The machines' startup is not timed (the
    startup measure has it): the clock starts once both are RUNNING, and stops at the sum.
    Each repetition runs on fresh processes on both sides, as bigpi does: a first call's
    costs are counted, and neither side is warmer than the other."""
    # The machines get this process's sys.path, so they can unpickle bigpi.CirclePI. It is
    # imported here, not at the top: machines load this file as __mp_main__, and bigpi's
    # imports would slow every machine's startup.
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import bigpi
    # One process: a fresh interpreter, as the machines are; it times sample(n) alone.
    alone = ("import sys, time; sys.path.insert(0, %r); import bigpi; s = bigpi.CirclePI(); "
             "t = time.perf_counter(); c = s.sample(%d); "
             "print(time.perf_counter() - t, c)" % (EXAMPLES, n))
    one, two, startup = [], [], []
    give_up = time.perf_counter() + budget
    for _ in range(reps):
        if two and time.perf_counter() > give_up:
            break
        p = subprocess.run([sys.executable, "-c", alone], capture_output=True, text=True,
                           timeout=600)
        if p.returncode:
            raise RuntimeError("the one-process run failed: %s" % p.stderr[-500:])
        dt, inside = p.stdout.split()
        one.append(n / float(dt))
        _check_pi(int(inside), n)
        with bm.start(system) as b:
            t0 = time.perf_counter()
            machines = wait_running(bm, b.start(2, {"PI": bigpi.CirclePI()}))
            startup.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            procs = [m for m in machines for _ in range(m.maxprocs)]
            share, extra = divmod(n, len(procs))
            futures = [m.call_async("PI.sample", share + (i < extra))
                       for i, m in enumerate(procs)]
            inside = sum(f.result(timeout=600) for f in futures)
            two.append(n / (time.perf_counter() - t0))
        _check_pi(inside, n)
    return {"bigpi_samples": n, "bigpi_calls": len(procs), "bigpi_reps": len(two),
            "bigpi_one_sps": max(one), "bigpi_two_sps": max(two),
            "bigpi_ratio": max(two) / max(one),
            "bigpi_one_all_sps": [round(x) for x in one],
            "bigpi_two_all_sps": [round(x) for x in two],
            "bigpi_startup_ms": statistics.median(startup)}


def _check_pi(inside, n):
    """A count that does not estimate π (to within 10 sigma) is a broken run, not a result."""
    if abs(4.0 * inside / n - math.pi) > 10 * 1.65 / math.sqrt(n):
        raise AssertionError("%d of %d samples inside the circle is not π" % (inside, n))


def measure_async(m, duration, max_calls, window=64):
    """calls/s with up to `window` call_async futures in flight from one thread."""
    import collections
    inflight = collections.deque()
    done = 0
    t0 = time.perf_counter()
    deadline = t0 + duration
    issued = 0
    while True:
        now = time.perf_counter()
        if now < deadline and issued < max_calls:
            while len(inflight) < window and issued < max_calls:
                inflight.append((issued, m.call_async("Echo.inc", issued)))
                issued += 1
        if not inflight:
            break
        x, f = inflight.popleft()
        if f.result(timeout=120) != x + 1:
            raise AssertionError("inc returned a wrong value")
        done += 1
    return {"async_cps": done / (time.perf_counter() - t0), "async_calls": done}


def main(argv=None):
    ap = C.options(description="bigmachine through its public API")
    ap.add_argument("--system", default="local", help="bigmachine system name (default local)")
    ap.add_argument("--stream-mib", type=int, default=1024,
                    help="size of the streamed reply and argument in MiB (default 1024)")
    ap.add_argument("--bigpi-n", type=int, default=None,
                    help="bigpi samples in all (default 16e6, about 2.5 s in one process "
                    "here; --quick: 4e6)")
    ap.add_argument("--bigpi-reps", type=int, default=None,
                    help="bigpi repetitions, the best counts (default 5, --quick 1; at "
                    "most 30 s of them): the speed of a core here varies by a third "
                    "from one run to the next")
    opts = C.finish_options(ap.parse_args(argv))
    opts.stream = opts.stream_mib * C.MIB
    if opts.bigpi_n is None:
        opts.bigpi_n = 4 * 10**6 if opts.quick else 16 * 10**6
    if opts.bigpi_reps is None:
        opts.bigpi_reps = 1 if opts.quick else 5
    bm = C.import_bigmachine()
    if bm is None or not hasattr(bm, "start"):
        res = {"error": "bigmachine.py not importable from %s" % os.path.dirname(HERE),
               "notes": []}
    else:
        C.log("[bigmachine] measuring (version %s)" % getattr(bm, "__version__", "?"))
        try:
            res = C.run_suite(BMPeer(bm, opts.system), opts)
        except Exception as e:
            res = {"error": repr(e), "notes": []}
        # Last, on machines of its own: it needs both cores to itself.
        t0 = time.perf_counter()
        try:
            res.update(measure_bigpi(bm, opts.system, opts.bigpi_n, opts.bigpi_reps))
        except Exception as e:
            res["notes"].append("bigpi failed: %r" % (e,))
            C.log("[bigmachine] bigpi failed: %r" % (e,))
        C.log("[bigmachine] bigpi done in %.1fs" % (time.perf_counter() - t0))
        res["version"] = getattr(bm, "__version__", "?")
        res["payload_plus_10_MiB"] = opts.bulk_mib * 1.1
    C.emit({"bigmachine": res}, opts, "bigmachine")


if __name__ == "__main__":
    main()
