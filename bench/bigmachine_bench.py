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

The machine processes load this file as __mp_main__, so everything at module
top level must stay import-safe: the service class and helpers only.
"""

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402


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
        bm = self.bm
        ms = self.b.start(n, {"Echo": Echo()})
        for m in ms:
            st = m.wait(bm.RUNNING, timeout=120)
            if m.err is not None:
                raise RuntimeError("machine %s stopped: %r" % (m.addr, m.err))
            if st != bm.RUNNING:
                raise RuntimeError("machine %s is %r after 120 s" % (m.addr, st))
        return [BMWorker(m) for m in ms]

    def stop(self):
        if self.b is not None:
            t0 = time.perf_counter()
            self.b.shutdown()
            self.extra["shutdown_ms"] = (time.perf_counter() - t0) * 1e3
            self.b = None

    def extra_steps(self, w, opts):
        return [("async", lambda: measure_async(w.m, opts.duration, opts.max_calls)),
                ("bytearray", lambda: measure_bytearray(w, opts))]


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
    opts = C.finish_options(ap.parse_args(argv))
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
        res["version"] = getattr(bm, "__version__", "?")
    C.emit({"bigmachine": res}, opts, "bigmachine")


if __name__ == "__main__":
    main()
