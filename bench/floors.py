"""Floors: what the hardware, the kernel, OpenSSL and pickle allow on this machine.

    python bench/floors.py [--quick] [--json] [--only tcp,tls,pickle]

Columns "raw TCP" and "raw TLS 1.3" run the same measures as bigmachine and
the peers (small call, 32 threads, 64 MiB argument / reply, 2 workers ready),
against a minimal threaded server in a separate process on 127.0.0.1:

  * wire format: 9-byte header (op, u64), then payload; one connection per
    client thread; TCP_NODELAY; the server reads a big argument into one
    buffer of its size and answers from a prepared buffer.
  * TLS: TLS 1.3 only, mutual (client certificate required), contexts from
    bigmachine.server_context / client_context when bigmachine.py has them,
    else an equivalent stdlib context; certificates from
    bigmachine.CertificateAuthority, else a throwaway CA made with `openssl`.
  * "2 workers ready": two fresh interpreters started in parallel, each
    serving and answering one call (with a TLS handshake for TLS).

That server blocks in recv, and so does its client: each message wakes a core, and on a
VM an idle core takes tens of microseconds to wake. So two floors that are limits come on
top, and bigmachine's targets are set against them:

  * spin_us: the round trip on a connection of its own where both ends are non-blocking
    and busy-poll (no thread ever sleeps, no core is woken), for TCP and TLS.
  * recv_into_*_MBps (TLS): a 64 MiB reply read with recv_into into one preallocated,
    already touched buffer, and a 64 MiB argument the server reads the same way; and the
    reply into a new buffer each time (recv_into_fresh_reply_MBps), which pays for first
    touching its memory, as any transfer that makes a new object does.

Every round trip measure also gives the calls per CPU-second of the calling process.

"pickle" gives dumps/loads cost of a small int tuple (µs) and of 64 MiB of
bytes (MB/s), the serialization share of any pickle-based RPC.
"""

import os
import pickle
import socket
import statistics
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

HDR = struct.Struct("!cQ")
U64 = struct.Struct("!Q")


def recv_into_exact(sock, view, chunk=1 << 20):
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, chunk))
        if k == 0:
            return False
        got += k
    return True


# The spin-polled round trip: both ends non-blocking, each polling its socket in a loop, so
# that no thread ever sleeps in the kernel. On a VM an idle core that has to be woken for
# every message adds tens of microseconds to a round trip (the same blocking ping-pong
# measures very differently on a quiet machine and a loaded one); spinning removes that
# wake-up, and what is left is TCP, TLS and the interpreter: the limit of a round trip.

def _spin_want():
    import ssl
    return (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


# Each poll that finds nothing yields the core (sched_yield): on a quiet host that returns at
# once, and on a host with more runnable processes than cores it lets the other end run
# instead of spinning away a whole time slice while it waits for this core.

def spin_send(s, data, want, pass_core=os.sched_yield):
    view, done = memoryview(data), 0
    while done < len(view):
        try:
            done += s.send(view[done:])
        except want:
            pass_core()


def spin_recv_exact(s, view, want, pass_core=os.sched_yield):
    got, n = 0, len(view)
    while got < n:
        try:
            k = s.recv_into(view[got:])
        except want:
            pass_core()
            continue
        if k == 0:
            return False
        got += k
    return True


def spin_serve(c):
    """Answer pings (op p) on c, spin-polling, until the connection ends."""
    want = _spin_want()
    c.setblocking(False)
    hdr = bytearray(HDR.size)
    hv = memoryview(hdr)
    unpack, pack = HDR.unpack, U64.pack
    while spin_recv_exact(c, hv, want):
        op, n = unpack(hdr)
        if op != b"p":
            return
        spin_send(c, pack(n + 1), want)


# ----------------------------------------------------------------------------
# Server (runs in its own process).

def serve(kind, certdir):
    C.die_with_stdin()
    # stdlib context here: importing bigmachine would add its import time to
    # the "2 workers ready" floor (same certificates, same TLS 1.3 suite).
    ctx = C.tls_context(certdir, server=True, use_bigmachine=False)[0] \
        if kind == "tls" else None
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(128)
    C.announce("127.0.0.1", ls.getsockname()[1])
    while True:
        c, _ = ls.accept()
        threading.Thread(target=handle, args=(c, ctx), daemon=True).start()


def handle(c, ctx):
    try:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            c = ctx.wrap_socket(c, server_side=True)
        hdr = bytearray(HDR.size)
        hv = memoryview(hdr)
        keep = None
        while recv_into_exact(c, hv):
            op, n = HDR.unpack(hdr)
            if op == b"p":
                c.sendall(U64.pack(n + 1))
            elif op == b"u":
                buf = bytearray(n)
                if not recv_into_exact(c, memoryview(buf)):
                    return
                c.sendall(U64.pack(len(buf)))
                del buf
            elif op == b"g":
                C.payload(n)
                c.sendall(U64.pack(0))
            elif op == b"d":
                p = C.payload(n)
                c.sendall(U64.pack(n))
                c.sendall(p)
            elif op == b"U":
                # the argument floor: into one buffer of the connection's, kept between calls
                if keep is None or len(keep) != n:
                    keep = bytearray(n)
                if not recv_into_exact(c, memoryview(keep), n):
                    return
                c.sendall(U64.pack(n))
            elif op == b"i":
                c.sendall(U64.pack(os.getpid()))
            elif op == b"s":
                c.sendall(U64.pack(n))
                spin_serve(c)
                return
            else:
                return
    except (OSError, EOFError):
        pass
    finally:
        try:
            c.close()
        except OSError:
            pass


# ----------------------------------------------------------------------------
# Client side adaptor (see _common's docstring).

class RawConn:
    def __init__(self, addr, ctx, hostname):
        s = socket.create_connection(addr)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            s = ctx.wrap_socket(s, server_hostname=hostname)
        self.s = s
        self.b8 = bytearray(8)
        self.v8 = memoryview(self.b8)

    def op(self, op, n, body=None):
        if body is None:
            self.s.sendall(HDR.pack(op, n))
        else:
            self.s.sendall(HDR.pack(op, n))
            self.s.sendall(body)
        if not recv_into_exact(self.s, self.v8):
            raise EOFError("server closed")
        return U64.unpack(self.b8)[0]

    def close(self):
        self.s.close()


class RawWorker:
    def __init__(self, peer, addr):
        self.peer = peer
        self.addr = addr
        self.conn = peer.connect(addr)

    def inc(self, x):
        return self.conn.op(b"p", x)

    def per_thread(self):
        c = self.peer.connect(self.addr)
        return (lambda x: c.op(b"p", x)), c.close

    def prep(self, n):
        self.conn.op(b"g", n)

    def take(self, b):
        return self.conn.op(b"u", len(b), b)

    def blob(self, n):
        c = self.conn
        c.s.sendall(HDR.pack(b"d", n))
        if not recv_into_exact(c.s, c.v8):
            raise EOFError("server closed")
        m = U64.unpack(c.b8)[0]
        buf = bytearray(m)
        if not recv_into_exact(c.s, memoryview(buf)):
            raise EOFError("server closed")
        return buf

    def pid(self):
        return self.conn.op(b"i", 0)

    def close(self):
        self.conn.close()

    def spin_round_trip(self, duration, max_calls):
        """Round trips on a connection of their own, both ends spin-polling (see
        spin_serve): median µs, and calls per CPU-second of this (the calling) process."""
        c = self.peer.connect(self.addr)
        try:
            if c.op(b"s", 0) != 0:
                raise AssertionError("the server did not switch to spinning")
            s, want = c.s, _spin_want()
            s.setblocking(False)
            b8, v8 = c.b8, c.v8
            pack, unpack = HDR.pack, U64.unpack

            def call(x):
                spin_send(s, pack(b"p", x), want)
                if not spin_recv_exact(s, v8, want):
                    raise EOFError("server closed")
                return unpack(b8)[0]
            return measure_small_cpu(call, duration, max_calls, "spin_")
        finally:
            c.close()

    def recv_into_floor(self, n, reps, budget=8.0):
        """The bulk floor: an n-byte reply read with recv_into into one preallocated (and
        already touched) buffer, and an n-byte argument the server reads the same way: MB/s,
        best of reps. What is left is the kernel's copy, TLS and the interpreter's loop."""
        c = self.conn
        self.prep(n)
        buf = bytearray(n)
        view = memoryview(buf)
        data = C.payload(n)
        out = {}
        # And the reply read the same way into a new buffer each time: a transfer that makes
        # a new object pays for first touching its memory (zeroing and a page fault per page;
        # on a VM that costs about as much as the transfer itself), which a preallocated
        # buffer does not.
        fresh = lambda: self._read_reply_into(memoryview(bytearray(n)), n)
        for name, run in (("reply", lambda: self._read_reply_into(view, n)),
                          ("arg", lambda: c.op(b"U", n, data)),
                          ("fresh_reply", fresh)):
            run()                      # untimed: both buffers are allocated and touched
            rates = []
            give_up = time.perf_counter() + budget
            for _ in range(reps):
                if rates and time.perf_counter() > give_up:
                    break
                t0 = time.perf_counter()
                got = run()
                dt = time.perf_counter() - t0
                if got != n:
                    raise AssertionError("recv_into %s: %d bytes, want %d" % (name, got, n))
                rates.append(n / dt / 1e6)
            out["recv_into_%s_MBps" % name] = max(rates)
            out["recv_into_%s_median_MBps" % name] = statistics.median(rates)
        return out

    def _read_reply_into(self, view, n):
        c = self.conn
        c.s.sendall(HDR.pack(b"d", n))
        if not recv_into_exact(c.s, c.v8):
            raise EOFError("server closed")
        m = U64.unpack(c.b8)[0]
        if m != n or not recv_into_exact(c.s, view, n):
            raise EOFError("server closed")
        return n


def measure_small_cpu(call, duration, max_calls, prefix):
    """measure_small, its keys renamed small_* -> prefix*."""
    r = C.measure_small(call, duration, max_calls)
    return {prefix + k[len("small_"):]: v for k, v in r.items()}


class RawPeer:
    def __init__(self, kind, certs):
        self.kind = kind
        self.name = "raw TCP" if kind == "tcp" else "raw TLS 1.3"
        self.certs = certs
        self.ctx = None
        if kind == "tls":
            self.ctx, self.ctx_source = C.tls_context(certs.dir, server=False)
        self.children = []
        self.workers = []

    def connect(self, addr):
        return RawConn(addr, self.ctx, self.certs.hostname if self.certs else None)

    def start(self, n):
        args = [sys.executable, os.path.abspath(__file__), "--serve", self.kind]
        if self.certs is not None:          # TLS only: raw TCP runs without certificates
            args += ["--certdir", self.certs.dir]
        self.children = [C.Child(args) for _ in range(n)]
        for ch in self.children:
            ch.ready()
        self.workers = [RawWorker(self, ch.addr) for ch in self.children]
        for w in self.workers:
            w.inc(0)
        s = self.workers[0].conn.s
        if hasattr(s, "version"):
            self.negotiated = "%s, %s" % (s.version(), s.cipher()[0])
        return self.workers

    def extra_steps(self, w, opts):
        steps = [("spin", lambda: w.spin_round_trip(opts.duration, opts.max_calls))]
        if self.kind == "tls":
            steps.append(("recv_into", lambda: w.recv_into_floor(opts.bulk, opts.bulk_reps)))
        return steps

    def stop(self):
        for w in self.workers:
            w.close()
        for ch in self.children:
            ch.close()
        self.workers, self.children = [], []


# ----------------------------------------------------------------------------
# pickle.

def per_op_us(fn, duration, batch=2000):
    best = float("inf")
    deadline = time.perf_counter() + duration
    while True:
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        dt = (time.perf_counter() - t0) / batch
        best = min(best, dt)
        if time.perf_counter() > deadline:
            return best * 1e6


def pickle_floor(opts):
    proto = pickle.HIGHEST_PROTOCOL
    small = (1, 2, 3)
    small_p = pickle.dumps(small, proto)
    d = max(0.1, opts.duration / 4)
    res = {
        "protocol": proto,
        "small_dumps_us": per_op_us(lambda: pickle.dumps(small, proto), d),
        "small_loads_us": per_op_us(lambda: pickle.loads(small_p), d),
    }
    data = C.payload(opts.bulk)
    dumps_rates, loads_rates = [], []
    for _ in range(opts.bulk_reps):
        t0 = time.perf_counter()
        p = pickle.dumps(data, proto)
        t1 = time.perf_counter()
        back = pickle.loads(p)
        t2 = time.perf_counter()
        assert len(back) == len(data)
        del p, back
        dumps_rates.append(len(data) / (t1 - t0) / 1e6)
        loads_rates.append(len(data) / (t2 - t1) / 1e6)
    res["bulk_dumps_MBps"] = max(dumps_rates)
    res["bulk_loads_MBps"] = max(loads_rates)
    res["note"] = ("bulk dumps/loads are in-band (one copy each way); "
                   "small = %r" % (small,))
    return res


# ----------------------------------------------------------------------------
# Process start: the part of "2 workers ready" no RPC library can avoid.

def process_floor(opts):
    import subprocess
    reps = 3 if opts.quick else 7

    def wall(code):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=C.HERE)
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    res = {"python_c_pass_ms": wall("pass"),
           "python_import_ssl_ms": wall("import ssl, socket, threading, pickle")}
    root = os.path.dirname(C.HERE)
    if os.path.exists(os.path.join(root, "bigmachine.py")):
        res["python_import_bigmachine_ms"] = wall(
            "import sys; sys.path.insert(0, %r); import bigmachine" % root)
    return res


# ----------------------------------------------------------------------------

def main(argv=None):
    ap = C.options(description="floors: raw TCP, raw TLS 1.3, pickle")
    ap.add_argument("--only", default="tcp,tls,pickle,process",
                    help="comma list among tcp,tls,pickle,process")
    ap.add_argument("--serve", choices=["tcp", "tls"], help=argparse_hidden())
    ap.add_argument("--certdir", help=argparse_hidden())
    opts = C.finish_options(ap.parse_args(argv))
    if opts.serve:
        serve(opts.serve, opts.certdir)
        return
    only = set(opts.only.split(","))
    results = {}
    certs = C.CertFiles() if "tls" in only else None
    try:
        for kind in ("tcp", "tls"):
            if kind not in only:
                continue
            peer = RawPeer(kind, certs)
            C.log("[%s] measuring" % peer.name)
            r = C.run_suite(peer, opts)
            if kind == "tls":
                r["notes"].append("certificates: %s; client context: %s, server: stdlib "
                                  "equivalent; negotiated: %s"
                                  % (certs.source, peer.ctx_source,
                                     getattr(peer, "negotiated", "?")))
            results[peer.name] = r
        if "pickle" in only:
            C.log("[pickle] measuring")
            results["pickle"] = pickle_floor(opts)
        if "process" in only:
            C.log("[process] measuring")
            results["process"] = process_floor(opts)
    finally:
        if certs is not None:
            certs.cleanup()
    C.emit(results, opts, "floors")


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
