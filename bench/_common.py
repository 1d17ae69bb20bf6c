"""Shared helpers for the bigmachine.py benchmarks (stdlib only).

Every benchmark column is driven through the same small adaptor interface so
that the numbers are measured the same way for the floors, for bigmachine and
for the peers:

    class SomePeer:
        name = "..."
        def start(self, n) -> list[worker]   # returns when n workers answered a call
        def stop(self)                       # tear everything down, bounded in time

    worker:
        inc(x) -> x + 1                      # the small call
        per_thread() -> (fn, close)          # fn(x) usable by ONE client thread
        prep(n)                              # worker builds its n-byte reply payload
        take(b) -> len(b)                    # 64 MiB argument
        blob(n) -> bytes                     # 64 MiB reply
        pid() -> int                         # worker process id (for its peak RSS)

`run_suite(peer, opts)` measures one column and returns a dict of numbers.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MIB = 1 << 20
BULK_BYTES = 64 * MIB
THREADS = 32
JSON_TAG = "BENCHJSON "
HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------
# The service every peer serves (peers that need decorators wrap it).

class Echo:
    """The benchmark service: plain object, no state worth pickling."""

    def __init__(self):
        self._payload = b""

    def inc(self, x):
        return x + 1

    def prep(self, n):
        if len(self._payload) != n:
            self._payload = payload(n)
        return None

    def blob(self, n):
        if len(self._payload) != n:
            self.prep(n)
        return self._payload

    def take(self, b):
        return len(b)

    def pid(self):
        return os.getpid()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._payload = b""


_PAYLOADS = {}


def payload(n):
    """n incompressible bytes (so transports that compress gain nothing)."""
    p = _PAYLOADS.get(n)
    if p is None:
        # getrandbits: random.randbytes needs Python 3.9
        p = random.Random(n).getrandbits(8 * n).to_bytes(n, "little") if n else b""
        _PAYLOADS.clear()
        _PAYLOADS[n] = p
    return p


# ----------------------------------------------------------------------------
# Options.

def options(argv=None, description=""):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true",
                    help="short durations and one repetition (smoke run)")
    ap.add_argument("--json", action="store_true",
                    help="print one machine-readable line (for run.py)")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds of calls for the small-call and 32-thread measures")
    ap.add_argument("--max-calls", type=int, default=None,
                    help="upper bound on sequential small calls")
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions of the startup measure (median)")
    ap.add_argument("--bulk-reps", type=int, default=None,
                    help="repetitions of each 64 MiB transfer (best is reported)")
    ap.add_argument("--bulk-mib", type=int, default=64,
                    help="size of the big argument / reply in MiB (default 64)")
    return ap


def finish_options(opts):
    if opts.duration is None:
        opts.duration = 0.3 if opts.quick else 2.0
    if opts.max_calls is None:
        opts.max_calls = 3000 if opts.quick else 30000
    if opts.reps is None:
        opts.reps = 1 if opts.quick else 3
    if opts.bulk_reps is None:
        opts.bulk_reps = 1 if opts.quick else 5
    opts.bulk = opts.bulk_mib * MIB
    return opts


def emit(results, opts, title):
    """Print results: one JSON line for run.py, or a readable listing."""
    if opts.json:
        sys.stdout.write(JSON_TAG + json.dumps(results) + "\n")
        sys.stdout.flush()
        return
    print("## " + title)
    for name, r in results.items():
        print("### " + name)
        for k, v in r.items():
            if isinstance(v, float):
                v = "%.4g" % v
            print("  %-22s %s" % (k, v))
    sys.stdout.flush()


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# Memory: peak RSS of a process, resettable on Linux >= 4.0 (clear_refs "5").

def _status_kib(pid, field):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib(pid):
    v = _status_kib(pid, "VmRSS")
    return None if v is None else v / 1024.0


def hwm_mib(pid):
    v = _status_kib(pid, "VmHWM")
    return None if v is None else v / 1024.0


def reset_hwm(pid):
    """Reset the peak-RSS counter of pid; False when the kernel refuses."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """The peak RSS of process pid from now on, over its RSS now: reset the counter on
    creation, read it with delta()."""

    def __init__(self, pid):
        self.pid = pid
        reset_hwm(pid)
        self.base = rss_mib(pid)

    def delta(self):
        """(peak MiB, peak over the start MiB), or (None, None) where /proc cannot tell."""
        peak = hwm_mib(self.pid)
        if peak is None or self.base is None:
            return None, None
        return peak, peak - self.base


# ----------------------------------------------------------------------------
# Measures.

def measure_small(call, duration, max_calls, warmup=50):
    """Median and spread (µs) of sequential call(x) round trips, and the calls per CPU-second
    of this process (all its threads) meanwhile."""
    for i in range(warmup):
        if call(i) != i + 1:
            raise AssertionError("inc returned a wrong value")
    times = []
    deadline = time.perf_counter() + duration
    pc = time.perf_counter
    cpu0, wall0 = time.process_time(), pc()
    i = 0
    while i < max_calls:
        t0 = pc()
        r = call(i)
        t1 = pc()
        times.append(t1 - t0)
        if r != i + 1:
            raise AssertionError("inc returned a wrong value")
        i += 1
        if t1 > deadline:
            break
    cpu, wall = time.process_time() - cpu0, pc() - wall0
    times.sort()
    n = len(times)
    return {
        # what a call costs the calling process: a caller that spins buys latency with CPU
        "small_cps_per_cpu_s": n / cpu if cpu > 0 else None,
        "small_cpu_per_wall": cpu / wall,
        "small_us": statistics.median(times) * 1e6,
        "small_p10_us": times[n // 10] * 1e6,
        "small_p90_us": times[(n * 9) // 10] * 1e6,
        "small_calls": n,
    }


def measure_threads(worker, nthreads, duration):
    """Total calls/s of nthreads client threads calling worker.inc in a loop."""
    counts = [0] * nthreads
    ends = [0.0] * nthreads
    errors = []
    ready = threading.Barrier(nthreads + 1)
    stop_at = [time.perf_counter() + 3600]  # set for real once all are ready

    def body(k):
        fn = close = None
        try:
            fn, close = worker.per_thread()
            fn(0)
        except BaseException as e:  # the barrier must still be reached
            errors.append(repr(e))
            fn = None
        try:
            ready.wait(timeout=120)
        except threading.BrokenBarrierError:
            fn = None
        n = 0
        try:
            if fn is not None:
                while time.perf_counter() < stop_at[0]:
                    fn(n)
                    n += 1
        except BaseException as e:
            errors.append(repr(e))
        counts[k] = n
        ends[k] = time.perf_counter()
        if close is not None:
            try:
                close()
            except Exception:
                pass

    ts = [threading.Thread(target=body, args=(k,), daemon=True) for k in range(nthreads)]
    for t in ts:
        t.start()
    try:
        ready.wait(timeout=120)
    except threading.BrokenBarrierError:
        raise RuntimeError("threads did not get ready: %s" % errors[:3])
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration
    end = t0 + duration + 60
    for t in ts:
        t.join(timeout=max(0.1, end - time.perf_counter()))
    t1 = max(ends) or time.perf_counter()
    hung = sum(t.is_alive() for t in ts)
    if errors:
        raise RuntimeError("%d thread errors, first: %s" % (len(errors), errors[0]))
    if hung:
        raise RuntimeError("%d threads hung" % hung)
    return {"threads_cps": sum(counts) / (t1 - t0), "threads_calls": sum(counts)}


def measure_arg(worker, nbytes, reps, budget=8.0, data=None):
    """Best MB/s of one call carrying an nbytes argument; peak RSS of the worker."""
    if data is None:
        data = payload(nbytes)
    pid = worker.pid()
    rates, peaks, deltas = [], [], []
    give_up = time.perf_counter() + budget  # slow peers: fewer repetitions
    for _ in range(reps):
        if rates and time.perf_counter() > give_up:
            break
        rss = PeakRSS(pid)
        t0 = time.perf_counter()
        r = worker.take(data)
        dt = time.perf_counter() - t0
        if r != nbytes:
            raise AssertionError("take returned %r, want %d" % (r, nbytes))
        peak, delta = rss.delta()
        rates.append(nbytes / dt / 1e6)
        if peak is not None:
            peaks.append(peak)
            deltas.append(delta)
    return _transfer_summary("arg", rates, peaks, deltas)


def _transfer_summary(prefix, rates, peaks, deltas):
    """The numbers of one transfer measure: best and median MB/s, and the receiver's peak."""
    out = {prefix + "_MBps": max(rates), prefix + "_median_MBps": statistics.median(rates),
           prefix + "_reps": len(rates)}
    if peaks:
        out[prefix + "_rss_peak_MiB"] = max(peaks)
        out[prefix + "_rss_delta_MiB"] = max(deltas)
    return out


def drain(f, buf, limit, deadline=None):
    """Read the binary file f to its end into buf, again and again (nothing is kept): the
    number of bytes read. Bounded: raises once more than limit bytes came, or past deadline
    (a time.perf_counter() value) between two reads."""
    n = 0
    while True:
        k = f.readinto(buf)
        if not k:
            return n
        n += k
        if n > limit:
            raise AssertionError("the stream goes on past %d bytes" % limit)
        if deadline is not None and time.perf_counter() > deadline:
            raise TimeoutError("the stream was still going after %d bytes" % n)


def _as_bytes_len(r, limit):
    if hasattr(r, "readinto"):  # a streamed reply
        try:
            return drain(r, bytearray(MIB), limit)
        finally:
            r.close()
    return len(r)


def measure_reply(worker, nbytes, reps, budget=8.0, blob=None):
    """Best MB/s of one call returning nbytes; peak RSS of this (receiving) process."""
    worker.prep(nbytes)
    blob = blob or worker.blob
    me = os.getpid()
    rates, peaks, deltas = [], [], []
    give_up = time.perf_counter() + budget  # slow peers: fewer repetitions
    for _ in range(reps):
        if rates and time.perf_counter() > give_up:
            break
        rss = PeakRSS(me)
        t0 = time.perf_counter()
        r = blob(nbytes)
        n = _as_bytes_len(r, nbytes)
        dt = time.perf_counter() - t0
        peak, delta = rss.delta()
        del r
        if n != nbytes:
            raise AssertionError("blob returned %d bytes, want %d" % (n, nbytes))
        rates.append(nbytes / dt / 1e6)
        if peak is not None:
            peaks.append(peak)
            deltas.append(delta)
    return _transfer_summary("reply", rates, peaks, deltas)


def run_suite(peer, opts, startup_reps=None):
    """Measure one column. Each measure that fails is recorded, not raised."""
    res = {"notes": []}
    reps = startup_reps if startup_reps is not None else opts.reps
    workers = None
    try:
        times = []
        for i in range(reps):
            if hasattr(peer, "open"):  # untimed per-session setup, if any
                peer.open()
            t0 = time.perf_counter()
            workers = peer.start(2)
            times.append((time.perf_counter() - t0) * 1e3)
            if i < reps - 1:
                peer.stop()
                workers = None
        res["startup_ms"] = statistics.median(times)
        res["startup_all_ms"] = [round(t, 1) for t in times]
    except Exception as e:
        res["error"] = "startup: %r" % (e,)
        log("[%s] startup failed: %r" % (peer.name, e))
        _stop(peer)
        return res
    w = workers[0]
    steps = [
        ("small", lambda: measure_small(w.inc, opts.duration, opts.max_calls)),
        ("threads", lambda: measure_threads(w, THREADS, opts.duration)),
        ("arg", lambda: measure_arg(w, opts.bulk, opts.bulk_reps)),
        ("reply", lambda: measure_reply(w, opts.bulk, opts.bulk_reps)),
    ]
    if hasattr(peer, "extra_steps"):
        steps += peer.extra_steps(w, opts)
    for name, fn in steps:
        t0 = time.perf_counter()
        try:
            res.update(fn())
        except Exception as e:
            res["notes"].append("%s failed: %r" % (name, e))
            log("[%s] %s failed: %r" % (peer.name, name, e))
        log("[%s] %s done in %.1fs" % (peer.name, name, time.perf_counter() - t0))
    _stop(peer)
    res.update(getattr(peer, "extra", {}))
    return res


def _stop(peer):
    try:
        peer.stop()
    except Exception as e:
        log("[%s] stop failed: %r" % (peer.name, e))


# ----------------------------------------------------------------------------
# Subprocess servers: a child prints "READY <host> <port>" and lives until its
# stdin closes (so it can never outlive the benchmark).

def die_with_stdin():
    def watch():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except Exception:
            pass
        os._exit(0)
    threading.Thread(target=watch, daemon=True).start()


def announce(host, port):
    sys.stdout.write("READY %s %d\n" % (host, port))
    sys.stdout.flush()


class Child:
    """A server process started with `args`; .addr is its announced address."""

    def __init__(self, args, env=None):
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=HERE)
        self.addr = None

    def ready(self, timeout=60):
        line = _readline_timeout(self.proc.stdout, timeout)
        if not line.startswith(b"READY "):
            self.close()
            raise RuntimeError("server did not start: %r" % line[:200])
        _, host, port = line.decode().split()
        self.addr = (host, int(port))
        return self.addr

    @property
    def pid(self):
        return self.proc.pid

    def close(self):
        p = self.proc
        if p.poll() is None:
            try:
                p.stdin.close()
            except Exception:
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for f in (p.stdout,):
            try:
                f.close()
            except Exception:
                pass


def _readline_timeout(f, timeout):
    box = []
    t = threading.Thread(target=lambda: box.append(f.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        return b"(timeout)"
    return box[0]


# ----------------------------------------------------------------------------
# TLS credentials: bigmachine's own CA when bigmachine.py has it, else a
# throwaway CA made with the openssl command line (bench only).

def import_bigmachine():
    """bigmachine from the repository root (the parent of bench/), or None."""
    root = os.path.dirname(HERE)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import bigmachine
        return bigmachine
    except ImportError:
        return None


class CertFiles:
    """Paths of ca.pem, cert.pem, key.pem in a temp dir, and where they came from."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="bench-tls-")
        self.ca = os.path.join(self.dir, "ca.pem")
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")
        self.source = None
        self.hostname = "localhost"
        err = None
        bm = import_bigmachine()
        if bm is not None and hasattr(bm, "CertificateAuthority"):
            try:
                self._from_bigmachine(bm)
                self.source = "bigmachine"
            except Exception as e:
                err = e
        if self.source is None:
            self._from_openssl()
            self.source = "openssl" + (" (bigmachine CA failed: %r)" % (err,) if err else "")

    def _from_bigmachine(self, bm):
        ca = bm.CertificateAuthority()
        creds = ca.issue(self.hostname, server=True, client=True)
        for path, pem in ((self.cert, creds.cert_pem), (self.key, creds.key_pem),
                          (self.ca, creds.ca_pem)):
            if isinstance(pem, str):
                pem = pem.encode()
            with open(path, "wb") as f:
                f.write(pem)

    def _from_openssl(self):
        d = self.dir
        ext = os.path.join(d, "ext.cnf")
        with open(ext, "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n"
                    "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                    "subjectKeyIdentifier=hash\n"
                    "authorityKeyIdentifier=keyid\n")
        cakey = os.path.join(d, "ca.key")
        csr = os.path.join(d, "req.csr")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=d)
        run("openssl", "req", "-x509", *ec, "-keyout", cakey, "-out", self.ca,
            "-days", "2", "-subj", "/CN=bench-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        run("openssl", "req", *ec, "-keyout", self.key, "-out", csr,
            "-subj", "/CN=localhost")
        run("openssl", "x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", cakey,
            "-CAcreateserial", "-out", self.cert, "-days", "2", "-extfile", ext)

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def _credentials_from_files(bm, d):
    def read(name):
        with open(os.path.join(d, name), "rb") as f:
            return f.read().decode("ascii")
    return bm.Credentials(read("cert.pem"), read("key.pem"), read("ca.pem"))


def tls_context(certdir, server, use_bigmachine=True):
    """Mutual-TLS 1.3 context from the PEM files in certdir.

    bigmachine.server_context / client_context are used when they exist (so the
    floor uses the same TLS settings as the library); otherwise an equivalent
    stdlib context: TLS 1.3 only, peer certificate required and checked
    against the session CA.
    """
    import ssl
    bm = import_bigmachine() if use_bigmachine else None
    fn = getattr(bm, "server_context" if server else "client_context", None) if bm else None
    source = "stdlib"
    if fn is not None and hasattr(bm, "Credentials"):
        try:
            return fn(_credentials_from_files(bm, certdir)), "bigmachine"
        except Exception as e:
            source = "stdlib (bigmachine's context failed: %r)" % (e,)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(os.path.join(certdir, "cert.pem"), os.path.join(certdir, "key.pem"))
    ctx.load_verify_locations(os.path.join(certdir, "ca.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = False  # pinned to the session CA, as bigmachine does
    return ctx, source
