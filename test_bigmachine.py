"""Tests of bigmachine.py, against the real transport: real TLS, real sockets, real processes.

Sections follow the module's: the session (B, Machine, services) on the in-process TestSystem,
where timing is not the point; then the Local system with real processes and signals, and the
SSH and EC2 systems; then faults, bad input and attacks, each done for real (SIGKILL, SIGSTOP,
Ctrl-C to a driver's process group, attackers in processes of their own, a fuzzer), and load
and a soak; then the command line and the example; last, the certificates, checked by openssl
and, when installed, by the cryptography package (used as an independent oracle, never by the
library).
"""

import base64
import collections
import concurrent.futures
import contextlib
import datetime
import functools
import gc
import hashlib
import html
import http.client
import http.server
import importlib
import importlib.util
import io
import itertools
import json
import logging
import mmap
import os
import pickle
import pwd
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import tracemalloc
import typing
import urllib.parse
import zipfile
import zlib

import pytest

import bigmachine
from bigmachine import RUNNING, STARTING, STOPPED, UNSTARTED

HERE = os.path.dirname(os.path.abspath(__file__))
PYENV = os.path.join(os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv")), "versions")

# Short keepalive settings: tests are about behaviour, not Go's minutes.
FAST = dict(keepalive_period=0.5, keepalive_timeout=2.0, keepalive_rpc_timeout=0.5, lease=5.0)

# An elapsed-time bound in a test says "this ended, bounded in time, rather than hung", never
# how fast (bench/ measures that). A loaded machine stretches every such bound alike, so each
# upper bound is written within(seconds), and so are the waits of `eventually`:
# BIGMACHINE_TEST_TIME_SCALE (default 1) multiplies them all, read here and nowhere else.
# Lower bounds ("it waited for the lease") are not scaled: a slow machine does not shorten them.
TIME_SCALE = float(os.environ.get("BIGMACHINE_TEST_TIME_SCALE") or 1)


def within(seconds):
    """An upper bound on elapsed time, in seconds, scaled by TIME_SCALE."""
    return seconds * TIME_SCALE


# A background job of a non-interactive shell starts with Ctrl-C ignored, and an ignored
# signal stays ignored in every program it runs: the Ctrl-C tests (in this process and in
# drivers of their own) would then wait for an interrupt that never comes. Caught here,
# SIGINT is back to its default in the processes the tests start.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ======================================================================================
# Services used by the tests (top level, so that machine processes can import them)
# ======================================================================================

class Flaky(bigmachine.Error):
    temporary = True


class CustomError(Exception):
    def __init__(self, code, text):
        super().__init__(code, text)
        self.code, self.text = code, text


def _refuse_to_load():
    raise RuntimeError("this object cannot be unpickled")


class FailsToLoad:
    def __reduce__(self):
        return _refuse_to_load, ()


class Unrebuildable(Exception):
    """Pickles, but cannot be unpickled: one of its attributes fails to load."""

    def __init__(self, a, b):
        super().__init__("%s/%s" % (a, b))
        self.part = FailsToLoad()


class Echo:
    def __init__(self, tag="echo"):
        self.tag = tag
        self.events = []
        self.attempts = collections.Counter()
        self.b = None

    def init(self, b):
        self.b = b
        self.events.append("init")

    def echo(self, *args, **kwargs):
        return args[0] if len(args) == 1 and not kwargs else (args, kwargs)

    def get_tag(self):
        return self.tag

    def inited(self):
        return self.events[:1] == ["init"] and self.b is not None

    def pid(self):
        return os.getpid()

    def environ(self, name):
        return os.environ.get(name)

    def system(self):
        """What this machine knows of its system: (name, maxprocs)."""
        return self.b.system.name, self.b.system.maxprocs()

    def fail(self, message):
        raise ValueError(message)

    def fail_custom(self, code):
        raise CustomError(code, "custom %d" % code)

    def fail_unrebuildable(self):
        raise Unrebuildable("a", "b")

    def unpicklable_result(self):
        return {"ok": 1, "lock": threading.Lock()}

    def flaky(self, key, failures):
        self.attempts[key] += 1
        if self.attempts[key] <= failures:
            raise Flaky("attempt %d of %s" % (self.attempts[key], key))
        return self.attempts[key]

    def fatal(self, key):
        self.attempts[key] += 1
        raise ValueError("not temporary")

    def sleep(self, seconds):
        context = bigmachine.current_call()
        return context.wait(seconds)

    def spin(self, key):
        """Busy in pure Python until interrupted; records how it ended."""
        self.events.append(("start", key))
        try:
            while True:
                time.sleep(0.001)
        except BaseException as e:
            self.events.append(("interrupted", key, type(e).__name__))
            raise

    def get_events(self):
        return list(self.events)

    def dial_and_call(self, addr, method, *args):
        return self.b.dial(addr).call(method, *args)

    def print_lines(self, *lines):
        for line in lines:
            print(line)
        sys.stdout.flush()
        return len(lines)

    # streams
    def chunks(self, n, size):
        for i in range(n):
            yield bytes([i % 256]) * size

    def file_of(self, data):
        return io.BytesIO(data)

    def chunks_then_fail(self, n):
        for _ in range(n):
            yield b"z" * 1000
        raise CustomError(7, "broke mid-stream")

    def digest(self, f):
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 16), b""):
            h.update(block)
        return h.hexdigest()

    def echo_stream(self, f):
        return f

    def zeros(self, n):
        return bytearray(n)

    def size(self, blob):
        return len(blob)

    def _private(self):
        return "secret"


class Unpicklable:
    def __init__(self):
        self.client = Holder()


class Holder:
    def __init__(self):
        self._sock = socket.socket()

    def __del__(self):
        self._sock.close()


class InitFails:
    def init(self, b):
        raise CustomError(3, "init refused")

    def echo(self, x):
        return x


# ======================================================================================
# Fixtures: sessions that always end, and no process left behind
# ======================================================================================

def _children():
    """This process's live children, counting the Local machines its fork server forked (and
    not the fork server itself, which lives as long as this process)."""
    parents = {os.getpid(), *bigmachine._ForkServer.pids()}
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in parents:
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) in parents and fields[0] != "Z":
                pids.append(int(entry))
    return pids


@pytest.fixture(autouse=True)
def no_process_left_behind():
    before = set(_children())
    yield
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = set(_children()) - before
        if not left:
            return
        time.sleep(0.05)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    pytest.fail("processes left behind: %s" % sorted(left))


@pytest.fixture
def tb():
    """A session on the in-process TestSystem."""
    b = bigmachine.start(bigmachine.TestSystem(**FAST))
    yield b
    b.shutdown()


@pytest.fixture
def lb():
    """A session on the Local system: real processes."""
    b = bigmachine.start(bigmachine.Local(**FAST))
    yield b
    b.shutdown()


def running(b, n=1, services=None, **kw):
    machines = b.start(n, services or {"Echo": Echo()}, **kw)
    for m in machines:
        assert m.wait(RUNNING, timeout=60) is RUNNING, m.err
    return machines


def check_remote_cluster(machines, pids, tag, message):
    """What the machines of every remote system must do: their services arrived with their
    state and were initialised, errors come back as themselves, machines call each other, and
    a stream goes both ways at once. pids are the machines' process ids, in order."""
    m1, m2 = machines[:2]
    assert m1.call("Echo.inited") and m1.call("Echo.get_tag") == tag
    with pytest.raises(ValueError, match=message):
        m1.call("Echo.fail", message)
    assert m1.call("Echo.dial_and_call", m2.addr, "Echo.pid") == pids[1]
    data = os.urandom(3 << 20)
    with machines[-1].call("Echo.echo_stream", io.BytesIO(data)) as f:
        assert f.read() == data


def _read_text(path):
    with open(path) as f:
        return f.read()


def eventually(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + within(timeout)
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("timed out waiting for %s" % what)


def run_script(tmp_path, code, *args, timeout=120, env=None):
    path = tmp_path / "driver.py"
    path.write_text(textwrap.dedent(code))
    full_env = dict(os.environ, PYTHONPATH=HERE)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(path)] + list(args), capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=str(tmp_path))


# ======================================================================================
# Machines and their states (Go: machine_test.go, testsystem_test.go)
# ======================================================================================

def test_machine_boot_states_and_services(tb):
    machines = tb.start(2, {"Echo": Echo("tagged")})
    assert all(m.state in (STARTING, RUNNING) for m in machines)
    assert [m.owned for m in machines] == [True, True]
    for m in machines:
        assert m.wait(RUNNING, timeout=30) is RUNNING
        assert m.err is None
        assert m.addr.startswith("https://127.0.0.1:") and m.hostname == "127.0.0.1"
        assert m.maxprocs == 1
        assert m.call("Echo.get_tag") == "tagged"          # the service's state travelled
        assert m.call("Echo.inited") is True                # init(b) ran before RUNNING
    assert len({m.addr for m in machines}) == 2
    assert set(tb.machines()) == set(machines)
    assert bigmachine.State.UNSTARTED < STARTING < RUNNING < STOPPED
    assert str(RUNNING) == "RUNNING"


def test_wait_is_at_least(tb):
    m, = running(tb)
    assert m.wait(STARTING) is RUNNING                      # already past STARTING
    assert m.wait(STOPPED, timeout=0.05) is RUNNING         # timed out: the state reached
    m.cancel()
    assert m.wait(RUNNING) is STOPPED                       # "at least RUNNING" includes STOPPED
    assert isinstance(m.err, bigmachine.Cancelled)


def test_calls_block_while_starting(tb):
    m, = tb.start(1, {"Echo": Echo()})
    assert m.call("Echo.echo", 41) == 41                    # waited for RUNNING


def test_call_arguments_and_results(tb):
    m, = running(tb)
    assert m.call("Echo.echo", 1, 2, k=3) == ((1, 2), {"k": 3})
    big = {"list": list(range(1000)), "bytes": b"\x00" * 100000, "nested": {"a": (1, [2])}}
    assert m.call("Echo.echo", big) == big
    assert len(m.call("Echo.zeros", 10 << 20)) == 10 << 20     # out-of-band buffers
    assert m.call("Echo.size", bytearray(5 << 20)) == 5 << 20


class OutOfBand:
    """Pickles the way a NumPy array does: its memory out of band under protocol 5."""

    def __init__(self, data):
        self.data = bytearray(data)

    def __reduce_ex__(self, protocol):
        return OutOfBand, (pickle.PickleBuffer(self.data),)


class HoldsArray:
    def __init__(self):
        self.array = OutOfBand(b"abc" * 1000)

    def get(self):
        return bytes(self.array.data)


def test_services_holding_out_of_band_buffers_install(tb):
    # The services travel as one pickle that the machine keeps: their buffers go in band.
    m, = running(tb, services={"Arr": HoldsArray(), "Echo": Echo()})
    assert m.call("Arr.get") == b"abc" * 1000
    assert m.call("Echo.echo", OutOfBand(b"xyz")).data == b"xyz"   # calls: out of band


def test_large_bytes_are_sent_from_their_own_memory(tb):
    big, other = os.urandom(3 << 20), os.urandom(1 << 17)
    pieces, buffers = bigmachine._pickle(((big, "small", other, big), {}, None))
    assert any(p is big for p in pieces) and any(p is other for p in pieces) and not buffers
    assert pickle.loads(b"".join(pieces)) == ((big, "small", other, big), {}, None)
    assert len(bigmachine._sinks.sink.pickler.memo.copy()) == 0    # nothing kept alive

    class Reentrant:
        """Makes a 'call' of its own while being pickled, as a __reduce__ may."""

        def __reduce__(self):
            inner, _ = bigmachine._pickle(("inner", big))
            return bytes, (b"".join(inner)[:10],)

    pieces, _ = bigmachine._pickle(["outer", Reentrant(), other])
    assert pickle.loads(b"".join(pieces))[::2] == ["outer", other]
    m, = running(tb)
    assert m.call("Echo.echo", [big, {"k": other}, b"x" * 70000]) == [big, {"k": other},
                                                                      b"x" * 70000]
    assert m.call("Echo.echo", big) == big                  # the fast path too


def test_library_connections_read_ahead(tb, monkeypatch):
    import ctypes
    get_read_ahead = 40                                     # SSL_CTRL_GET_READ_AHEAD

    def reads_ahead(context):
        ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
        return bigmachine._libssl.SSL_CTX_ctrl(ctx, get_read_ahead, 0, None) == 1

    credentials = bigmachine.CertificateAuthority().issue("x")
    library = bigmachine._Client(credentials).context
    assert reads_ahead(library)
    assert not reads_ahead(bigmachine.client_context(credentials))  # users get stock contexts
    monkeypatch.setenv("BIGMACHINE_TLS_READ_AHEAD", "0")
    assert not reads_ahead(bigmachine._Client(credentials).context)
    m, = running(tb)                                        # and both ends still talk
    assert m.call("Echo.echo", b"y" * (5 << 20)) == b"y" * (5 << 20)


def test_remote_exception_same_type_with_traceback(tb):
    m, = running(tb)
    with pytest.raises(ValueError, match="boom") as info:
        m.call("Echo.fail", "boom")
    cause = info.value.__cause__
    assert "Remote traceback" in str(cause) and "in fail" in str(cause)
    with pytest.raises(CustomError) as info:
        m.call("Echo.fail_custom", 42)
    assert (info.value.code, info.value.text) == (42, "custom 42")


def test_exception_that_cannot_be_rebuilt_is_remote_error(tb):
    m, = running(tb)
    with pytest.raises(bigmachine.RemoteError) as info:
        m.call("Echo.fail_unrebuildable")
    e = info.value
    assert e.type_name.endswith("Unrebuildable") and "a/b" in e.message
    assert "fail_unrebuildable" in e.traceback
    assert m.call("Echo.echo", 1) == 1                       # the machine still serves


def test_not_found(tb):
    m, = running(tb)
    with pytest.raises(bigmachine.NotFound, match="no service 'Nope'.*it has: Echo, Supervisor"):
        m.call("Nope.echo", 1)
    with pytest.raises(bigmachine.NotFound, match="no public method 'nosuch'"):
        m.call("Echo.nosuch")
    with pytest.raises(bigmachine.NotFound, match="no public method '_private'"):
        m.call("Echo._private")
    with pytest.raises(bigmachine.NotFound):
        m.call("Echo.init", None)                            # init is not callable remotely
    with pytest.raises(TypeError):                           # wrong arguments: itself
        m.call("Echo.fail")
    assert not bigmachine.NotFound("x").temporary


def test_unpicklable_arguments_and_results(tb):
    m, = running(tb)
    with pytest.raises(bigmachine.SerializationError, match=r"arguments of Echo.echo.*lock"):
        m.call("Echo.echo", {"x": threading.Lock()})
    with pytest.raises(bigmachine.SerializationError, match=r"result of Echo.unpicklable_result"):
        m.call("Echo.unpicklable_result")
    assert m.call("Echo.echo", 2) == 2


def test_start_rejects_bad_input_before_launching(tb):
    with pytest.raises(bigmachine.SerializationError,
                       match=r"the services\['Bad'\]\.client\._sock is socket\.socket"):
        tb.start(1, {"Bad": Unpicklable()})
    with pytest.raises(ValueError, match="positive integer"):
        tb.start(0, {"Echo": Echo()})
    with pytest.raises(ValueError, match="non-empty mapping"):
        tb.start(1, {})
    with pytest.raises(ValueError, match="non-empty mapping"):
        tb.start(1, [Echo()])
    with pytest.raises(ValueError, match="service names"):
        tb.start(1, {"a.b": Echo()})
    with pytest.raises(ValueError, match="Supervisor"):
        tb.start(1, {"Supervisor": Echo()})
    with pytest.raises(TypeError, match="unknown parameters"):
        tb.start(1, {"Echo": Echo()}, colour="red")
    assert tb.machines() == [] and tb.system.n == 0          # nothing was launched


def test_init_raising_stops_machine_fast(tb):
    began = time.monotonic()
    m, = tb.start(1, {"Bad": InitFails()})
    assert m.wait(RUNNING, timeout=30) is STOPPED
    assert time.monotonic() - began < within(10)
    assert isinstance(m.err, CustomError) and m.err.code == 3
    with pytest.raises(bigmachine.MachineStopped) as info:
        m.call("Bad.echo", 1)
    assert info.value.__cause__ is m.err


def test_call_timeout_cancels_on_machine(tb):
    m, = running(tb)
    view = m.options(timeout=0.3)
    began = time.monotonic()
    with pytest.raises(bigmachine.Timeout) as info:
        view.call("Echo.spin", "t1")
    assert isinstance(info.value, TimeoutError)
    assert 0.25 < time.monotonic() - began < within(5)
    eventually(lambda: ("interrupted", "t1", "_Interrupt") in m.call("Echo.get_events"),
               what="the call to be interrupted on the machine")
    assert m.call("Echo.echo", 3) == 3                       # the pool is not poisoned
    with pytest.raises(ValueError):
        m.options(timeout=0)


def test_future_cancel_reaches_machine(tb):
    m, = running(tb)
    future = m.call_async("Echo.spin", "f1")
    assert isinstance(future, concurrent.futures.Future)
    eventually(lambda: ("start", "f1") in m.call("Echo.get_events"), what="the call to start")
    assert future.running()
    assert future.cancel() is True
    assert future.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(5)
    eventually(lambda: ("interrupted", "f1", "_Interrupt") in m.call("Echo.get_events"),
               what="the cancel to reach the machine")
    assert m.call("Echo.echo", 4) == 4
    done, _ = concurrent.futures.wait([m.call_async("Echo.echo", 5)], timeout=10)
    assert [f.result() for f in done] == [5]


def test_cooperative_cancellation(tb):
    m, = running(tb)
    with pytest.raises(bigmachine.Timeout):
        m.options(timeout=0.2).call("Echo.sleep", 30)
    assert m.call("Echo.sleep", 0.01) is False               # not cancelled: slept the time


def test_in_flight_calls_fail_when_machine_stops(tb):
    m, = running(tb)
    futures = [m.call_async("Echo.sleep", 30) for _ in range(4)]
    eventually(lambda: all(f.running() for f in futures), what="calls to be in flight")
    time.sleep(0.1)
    began = time.monotonic()
    m.cancel()
    for f in futures:
        with pytest.raises(bigmachine.MachineStopped) as info:
            f.result(5)
        assert info.value.__cause__ is m.err
    assert time.monotonic() - began < within(3)
    with pytest.raises(bigmachine.MachineStopped):
        m.call("Echo.echo", 1)
    assert m not in tb.machines()


def test_retry_call_retries_temporary_errors_only(tb):
    m, = running(tb)
    fast = m.options(backoff=bigmachine.Backoff(0.01, 0.05, 2))
    assert fast.retry_call("Echo.flaky", "a", 3) == 4        # three temporary failures, then ok
    with pytest.raises(ValueError):
        fast.retry_call("Echo.fatal", "b")
    assert m.call("Echo.get_events")                          # machine fine
    bounded = m.options(timeout=0.3, backoff=bigmachine.Backoff(0.05, 0.05, 1))
    with pytest.raises(Flaky):
        bounded.retry_call("Echo.flaky", "c", 1000)           # the timeout bounds all attempts
    waits = bigmachine.Backoff().waits()
    assert [next(waits) for _ in range(6)] == [1.0, 1.5, 2.25, 3.375, 5.0, 5.0]   # Go's policy


def test_concurrent_calls(tb):
    m1, m2 = running(tb, 2)
    futures = [(i, m.call_async("Echo.echo", i)) for i in range(200) for m in (m1, m2)]
    assert all(f.result(30) == i for i, f in futures)
    results = []

    def worker(k):
        for i in range(50):
            results.append(m1.call("Echo.echo", (k, i)) == (k, i))
    in_threads(worker, 16)
    assert len(results) == 800 and all(results)


def in_threads(target, n, timeout=60):
    """Run target(k) in n threads at once, k = 0..n-1, and wait for them all."""
    threads = [threading.Thread(target=target, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


class Burner:
    def burn(self):
        """Pure Python, holding the GIL but for the interpreter's switches, until cancelled."""
        context, total = bigmachine.current_call(), 0
        while not context.cancelled:
            for i in range(1000):
                total += i * i % 7
        return total

    def quick(self, x):
        return x

    def threads(self):
        return threading.active_count()


@pytest.mark.parametrize("blocker", ["Echo.sleep", "Burner.burn"])
def test_a_slow_call_does_not_hold_up_the_others(lb, blocker):
    """A machine's connections share one serving thread while calls are quick; a call that
    blocks (or computes) for long is left to finish on that thread while another serves the
    rest. Every quick call below ends while the slow one is still running."""
    m, = running(lb, services={"Echo": Echo(), "Burner": Burner()})
    slow = m.call_async(blocker, *((60,) if blocker == "Echo.sleep" else ()))
    results = []

    def caller(k):
        for i in range(20):
            results.append(m.call("Burner.quick", (k, i)) == (k, i))
    in_threads(caller, 4)
    assert len(results) == 80 and all(results) and not slow.done()
    slow.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        slow.result(30)
    assert m.call("Burner.quick", "after") == "after"


def test_many_callers_few_machine_threads(lb):
    """32 callers at once, each on a connection of its own, are served by a few threads on
    the machine, not one per connection (see _FrameLoop)."""
    m, = running(lb, services={"Burner": Burner()})
    before = m.call("Burner.threads")
    during = []
    barrier = threading.Barrier(32)

    def caller(k):
        barrier.wait(30)
        for i in range(30):
            assert m.call("Burner.quick", (k, i)) == (k, i)
        during.append(m.call("Burner.threads"))
    in_threads(caller, 32)
    assert len(during) == 32
    # 32 connections open, far fewer threads: a few more on a loaded host, where a leader
    # the kernel preempted in mid-call looks stuck to the monitor and is relieved.
    assert max(during) < before + 24, (before, during)


# ======================================================================================
# Streams (Go: rpc/server_test.go TestStream)
# ======================================================================================

def test_stream_reply_from_iterator_and_file(tb):
    m, = running(tb)
    with m.call("Echo.chunks", 5, 1000) as f:
        assert f.read() == b"".join(bytes([i]) * 1000 for i in range(5))
    data = os.urandom(1024)
    with m.call("Echo.file_of", data) as f:
        assert f.read() == data
    with m.call("Echo.chunks", 0, 10) as f:                  # empty stream (Go: teststream)
        assert f.read() == b""
    assert m.call("Echo.echo", 1) == 1                        # the connection went back


def test_stream_error_reaches_reader_past_the_data(tb):
    m, = running(tb)
    f = m.call("Echo.chunks_then_fail", 3)
    assert f.read(3000) == b"z" * 3000
    with pytest.raises(CustomError, match="broke mid-stream"):
        f.read()
    f.close()
    assert m.call("Echo.echo", 1) == 1


def test_stream_argument_and_echo(tb):
    m, = running(tb)
    data = os.urandom(3 << 20)
    assert m.call("Echo.digest", io.BytesIO(data)) == hashlib.sha256(data).hexdigest()
    with m.call("Echo.echo_stream", io.BytesIO(data)) as f:  # both ways at once: no deadlock
        assert f.read() == data
    with pytest.raises(ValueError, match="at most one"):
        m.call("Echo.echo", io.BytesIO(b"a"), io.BytesIO(b"b"))


def test_stream_argument_with_a_deadline(lb):
    """A streamed argument is sent by a thread of its own while the caller waits for the
    reply on the same TLS connection; a deadline must not make the two trip over each other
    (it once did, one call in six), and must still end a call that runs too long."""
    m, = running(lb)
    data = os.urandom(8 << 20)
    digest = hashlib.sha256(data).hexdigest()
    for _ in range(24):
        assert m.options(timeout=60).call("Echo.digest", io.BytesIO(data)) == digest
    with m.options(timeout=60).call("Echo.echo_stream", io.BytesIO(data)) as f:
        assert f.read() == data

    class Endless(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            time.sleep(0.01)
            b[:1] = b"x"
            return 1
    with pytest.raises(bigmachine.Timeout):
        m.options(timeout=0.5).call("Echo.digest", io.BufferedReader(Endless()))
    assert m.call("Echo.echo", "still serving") == "still serving"


def test_large_streamed_reply_and_early_close(tb):
    m, = running(tb)
    total = 0
    with m.call("Echo.chunks", 32, 1 << 20) as f:            # 32 MiB (Go: Gimme)
        for block in iter(lambda: f.read(1 << 20), b""):
            total += len(block)
    assert total == 32 << 20
    f = m.call("Echo.chunks", 1000, 1 << 20)
    f.read(10)
    f.close()                                                 # abandon it mid-stream
    assert m.call("Echo.echo", 9) == 9


# ======================================================================================
# Supervisor, keepalive and the watchdog (Go: supervisor.go)
# ======================================================================================

def test_supervisor_methods(tb):
    m, = running(tb)
    assert m.call("Supervisor.ping", 7) == 7
    info = m.call("Supervisor.info")
    assert info["python"] == "%d.%d" % sys.version_info[:2]
    assert info["version"] == bigmachine.__version__ and info["pid"] == os.getpid()
    assert info["cpus"] >= 1
    assert m.call("Supervisor.getpid") == os.getpid()
    assert "test_supervisor_methods" in m.call("Supervisor.stacks")
    reply = m.call("Supervisor.keepalive", 10.0)
    assert reply["next"] == 10.0 and reply["healthy"] in (True, False)
    assert m.call("Supervisor.services") == ["Echo", "Supervisor"]


def test_keepalive_renews_lease(tb):
    m, = running(tb)
    eventually(lambda: len(m.keepalive_replies) >= 2, what="two keepalives")
    assert m.next_keepalive > time.time()
    assert all(0 <= t < within(1) for t in m.keepalive_replies)


def test_watchdog_ends_machine_without_keepalives():
    ca = bigmachine.CertificateAuthority()
    exited = []
    process = bigmachine._MachineProcess(None, ca.issue("m"), None, lease=0.3,
                                         watchdog_tick=0.05, exit=exited.append).start()
    try:
        eventually(lambda: exited == [1], timeout=5, what="the watchdog")
    finally:
        process.server.close()


def test_killed_test_machine_fails_calls_then_stops(tb):
    m1, m2 = running(tb, 2)
    assert tb.system.n == 2
    assert tb.system.kill(m1) is True
    assert tb.system.kill(m1) is False
    assert tb.system.n == 1
    with pytest.raises((bigmachine.NetworkError, bigmachine.MachineStopped)):
        m1.call("Echo.echo", 1)
    assert m1.wait(STOPPED, timeout=10) is STOPPED            # the keepalive gave up
    assert "keepalive failed" in str(m1.err)
    assert m2.call("Echo.echo", 2) == 2                       # the other machine still serves
    assert tb.system.kill() is True and tb.system.n == 0     # kill(None): a random one
    assert tb.system.kill() is False


# ======================================================================================
# B: dial, shutdown, start
# ======================================================================================

def test_dial_and_machine_to_machine(tb):
    m1, m2 = running(tb, 2)
    d = tb.dial(m2.addr)
    assert d is m2                                            # known address: the same Machine
    assert m1.call("Echo.dial_and_call", m2.addr, "Echo.echo", "hi") == "hi"
    other = bigmachine.start(bigmachine.TestSystem(**FAST))
    try:
        m3, = running(other)
        dialed = tb.dial(m3.addr)
        assert not dialed.owned and dialed.wait(RUNNING, timeout=10) is STOPPED  # other CA
        assert isinstance(dialed.err, bigmachine.AuthenticationError)
    finally:
        other.shutdown()


def test_shutdown_is_bounded_idempotent_and_final():
    with bigmachine.start(bigmachine.TestSystem(**FAST)) as b:
        machines = running(b, 3)
        busy = machines[0].call_async("Echo.sleep", 60)
        eventually(busy.running)
    assert all(m.state is STOPPED for m in machines)
    with pytest.raises(bigmachine.MachineStopped):
        busy.result(5)
    began = time.monotonic()
    b.shutdown()
    b.shutdown()
    assert time.monotonic() - began < within(1)
    with pytest.raises(bigmachine.MachineStopped):
        machines[1].call("Echo.echo", 1)
    with pytest.raises(bigmachine.Error, match="shut down"):
        b.start(1, {"Echo": Echo()})


def test_start_chooses_system(monkeypatch):
    system = bigmachine.TestSystem()
    b = bigmachine.start(system)
    assert b.system is system
    b.shutdown()
    monkeypatch.setattr(sys, "argv", ["prog", "--bigm.system=test"])
    b = bigmachine.start()
    assert isinstance(b.system, bigmachine.TestSystem)
    b.shutdown()
    monkeypatch.setattr(sys, "argv", ["prog"])
    monkeypatch.setenv("BIGMACHINE_SYSTEM", "test")
    b = bigmachine.start(maxprocs=3)
    assert isinstance(b.system, bigmachine.TestSystem) and b.system.maxprocs() == 3
    b.shutdown()
    monkeypatch.delenv("BIGMACHINE_SYSTEM")
    b = bigmachine.start()
    assert isinstance(b.system, bigmachine.Local)            # the default
    b.shutdown()
    with pytest.raises(ValueError, match="unknown bigmachine system 'nope'.*local"):
        bigmachine.start("nope")
    with pytest.raises(ValueError, match="keepalive_period"):
        bigmachine.TestSystem(keepalive_period=-1)


def test_errors_taxonomy():
    for name in ("NetworkError", "MachineStopped", "NotFound", "Timeout", "RemoteError",
                 "SerializationError", "AuthenticationError", "VersionMismatch", "Cancelled"):
        assert issubclass(getattr(bigmachine, name), bigmachine.Error)
    assert bigmachine.NetworkError.temporary and bigmachine.Timeout.temporary
    assert not bigmachine.MachineStopped.temporary and not bigmachine.Error.temporary
    assert issubclass(bigmachine.Timeout, TimeoutError)
    e = pickle.loads(pickle.dumps(bigmachine.RemoteError("T", "m", "tb")))
    assert (e.type_name, e.message, e.traceback) == ("T", "m", "tb")


# ======================================================================================
# The wire: authentication first, then frames; plain HTTP too
# ======================================================================================

def test_strangers_are_refused_and_nothing_is_unpickled(tb, tmp_path):
    m, = running(tb)
    host, port = "127.0.0.1", int(m.addr.rsplit(":", 1)[1].strip("/"))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    bomb = pickle.dumps(((Payload(),), {}, None))
    frame = bigmachine._HEADER.pack(bigmachine.CALL, 0, 0, 9, 1, len(bomb)) + b"Echo.echo" + bomb
    upgrade = (b"GET /bigrpc HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: bigrpc/1\r\n"
               b"Bigmachine-Python: %s\r\nBigmachine-Protocol: 2\r\n\r\n" % bigmachine.PYTHON.encode())
    post = b"POST /bigrpc/Echo.echo HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(bomb), bomb)
    stranger = bigmachine.CertificateAuthority().issue("stranger")
    contexts = {"another CA": bigmachine.client_context(stranger)}
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname, no_cert.verify_mode = False, ssl.CERT_NONE
    contexts["no certificate"] = no_cert
    for what, context in contexts.items():
        for request in (upgrade + frame, post):
            with socket.create_connection((host, port), timeout=5) as raw:
                try:
                    with context.wrap_socket(raw) as s:
                        s.sendall(request)
                        assert s.recv(100) == b"", what
                except (ssl.SSLError, ConnectionError):
                    pass
    for junk in (post, upgrade + frame, os.urandom(4096)):    # plain TCP, no TLS at all
        with socket.create_connection((host, port), timeout=5) as raw:
            raw.sendall(junk)
            with pytest.raises((ConnectionError, socket.timeout)) if False else _nothing():
                raw.settimeout(5)
                try:
                    raw.recv(100)
                except (ConnectionError, socket.timeout):
                    pass
    assert not marker.exists()
    client = bigmachine._Client(stranger)
    try:
        with pytest.raises(bigmachine.AuthenticationError, match="mutual TLS"):
            client.peer(m.addr).call("Echo.echo", (1,), {}, time.monotonic() + 10)
    finally:
        client.close()
    assert m.call("Echo.echo", 5) == 5                        # still serving its own


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_plain_http_post(tb):
    m, = running(tb)
    creds = tb._authority.issue("curl-like client", server=False)
    context = bigmachine.client_context(creds)
    host, port, _ = bigmachine._parse_addr(m.addr)
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=10)
    conn.request("POST", "/bigrpc/Echo.echo", body=pickle.dumps(((21,), {})))
    reply = conn.getresponse()
    assert reply.status == 200 and pickle.loads(reply.read()) == 21
    conn.request("POST", "/bigrpc/Echo.fail", body=pickle.dumps((("bad",), {})))
    reply = conn.getresponse()
    assert reply.status == 590
    assert isinstance(bigmachine._rebuild_error(reply.read()), ValueError)
    conn.request("GET", "/bigrpc")
    assert conn.getresponse().status == 426
    conn.close()


def test_version_mismatch_is_refused(tb):
    m, = running(tb)
    context = bigmachine.client_context(tb._authority.issue("old driver", server=False))
    host, port, _ = bigmachine._parse_addr(m.addr)
    with socket.create_connection((host, port), timeout=10) as raw:
        with context.wrap_socket(raw) as s:
            s.sendall(b"GET /bigrpc HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                      b"Upgrade: bigrpc/1\r\nBigmachine-Python: 2.7\r\n"
                      b"Bigmachine-Protocol: 2\r\n\r\n")
            status, headers, body = bigmachine._read_http_response(s.makefile("rb"))
    assert status == 409
    assert headers["bigmachine-python"] == bigmachine.PYTHON
    assert "peer runs Python 2.7" in body and bigmachine.PYTHON in body


def test_stale_connection_reconnects(tb):
    m, = running(tb)
    assert m.call("Echo.echo", 1) == 1
    peer = m._peer
    for conn in list(peer._idle):
        conn.sock.shutdown(socket.SHUT_RDWR)                   # the peer "restarted"
        conn.last_used -= 10
    assert m.call("Echo.echo", 2) == 2


# ======================================================================================
# Local: real processes
# ======================================================================================

def test_local_machines_are_processes(lb):
    m1, m2 = running(lb, 2, env={"BIGMACHINE_TEST_VAR": "yes"})
    pids = {m1.call("Echo.pid"), m2.call("Echo.pid")}
    assert len(pids) == 2 and os.getpid() not in pids
    assert m1.call("Echo.environ", "BIGMACHINE_TEST_VAR") == "yes"
    for pid in pids:
        assert os.getsid(pid) != os.getsid(0)                 # own session: no terminal Ctrl-C
    assert m1.call("Echo.inited") is True
    with pytest.raises(ValueError, match="x"):
        m1.call("Echo.fail", "x")
    assert m1.call("Echo.dial_and_call", m2.addr, "Echo.pid") == m2.call("Echo.pid")


def test_local_child_exit_noticed_at_once(lb):
    m1, m2 = running(lb, 2)
    future = m1.call_async("Echo.sleep", 60)
    eventually(future.running)
    time.sleep(0.1)
    began = time.monotonic()
    os.kill(m1.call("Echo.pid"), signal.SIGKILL)
    with pytest.raises(bigmachine.MachineStopped):
        future.result(10)
    assert m1.wait(STOPPED, timeout=10) is STOPPED
    assert time.monotonic() - began < within(3)
    assert "SIGKILL" in str(m1.err)
    assert m2.call("Echo.echo", 1) == 1


def test_local_cancel_and_timeout(lb):
    m, = running(lb)
    with pytest.raises(bigmachine.Timeout):
        m.options(timeout=0.3).call("Echo.spin", "lt")
    future = m.call_async("Echo.spin", "lf")
    eventually(lambda: ("start", "lf") in m.call("Echo.get_events"))
    future.cancel()
    eventually(lambda: {("interrupted", "lt", "_Interrupt"), ("interrupted", "lf", "_Interrupt")}
               <= set(m.call("Echo.get_events")), what="both calls interrupted on the machine")


def test_local_streams(lb):
    m, = running(lb)
    data = os.urandom(5 << 20)
    with m.call("Echo.echo_stream", io.BytesIO(data)) as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()


def test_local_output_reaches_driver_prefixed(tmp_path):
    result = run_script(tmp_path, """
        import bigmachine
        class Talk:
            def say(self, text):
                print(text)
                import sys; print("err " + text, file=sys.stderr)
                return True
        if __name__ == "__main__":
            with bigmachine.start("local") as b:
                m, = b.start(1, {"Talk": Talk()})
                m.wait()
                m.call("Talk.say", "hello from the machine")
                print("addr", m.addr)
    """)
    assert result.returncode == 0, result.stderr
    addr = result.stdout.split("addr ")[1].strip()
    assert "%s: hello from the machine\n" % addr in result.stderr
    assert "%s: err hello from the machine\n" % addr in result.stderr


def test_local_unguarded_main_is_explained(tmp_path):
    result = run_script(tmp_path, """
        import bigmachine
        class S:
            def f(self):
                return 1
        b = bigmachine.start("local")
        m, = b.start(1, {"S": S()})
        print("state", m.wait())
        print("err", m.err)
        b.shutdown()
    """)
    assert "state STOPPED" in result.stdout, result.stderr
    # Said once, without a traceback (issue 20, item 12: it came after 100 lines of them).
    assert result.stdout.count('if __name__ == "__main__":') == 1
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


def test_driver_killed_machines_exit(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import sys, time, bigmachine
        class S:
            def pid(self):
                import os; return os.getpid()
        if __name__ == "__main__":
            b = bigmachine.start(bigmachine.Local(keepalive_period=0.5, lease=2.0))
            ms = b.start(2, {"S": S()})
            for m in ms:
                m.wait()
            print(" ".join(str(m.call("S.pid")) for m in ms), flush=True)
            time.sleep(600)
    """))
    for how in ("SIGSTOP", "SIGKILL"):
        # SIGSTOP: the driver is alive but silent (its pipes stay open): the watchdog ends
        # the machines within their lease. SIGKILL: the pipes close, and they exit at once.
        driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                  env=dict(os.environ, PYTHONPATH=HERE), text=True)
        try:
            pids = [int(p) for p in driver.stdout.readline().split()]
            assert len(pids) == 2
            os.kill(driver.pid, getattr(signal, how))
            began = time.monotonic()
            eventually(lambda: not any(_alive(p) for p in pids), timeout=10,
                       what="machines to exit after %s" % how)
            took = time.monotonic() - began
            assert took < within(5 if how == "SIGSTOP" else 2), took
            if how == "SIGSTOP":
                assert took > 1.0                              # it was the lease, not a pipe
        finally:
            driver.kill()
            driver.wait()


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")   # zombie, dead
    except OSError:
        return False


def _other_python():
    mine = "%d.%d" % sys.version_info[:2]
    for version in sorted(os.listdir(PYENV)) if os.path.isdir(PYENV) else ():
        if version.count(".") == 2 and version.rsplit(".", 1)[0] != mine and \
                (3, 8) <= tuple(map(int, version.split(".")[:2])) <= (3, 13):
            path = os.path.join(PYENV, version, "bin", "python3")
            if os.path.exists(path):
                return path
    return None


@pytest.mark.skipif(_other_python() is None, reason="no other CPython 3.8-3.13 installed")
def test_local_version_mismatch():
    other = _other_python()
    with bigmachine.start(bigmachine.Local(python=other, **FAST)) as b:
        m, = b.start(1, {"Echo": Echo()})
        assert m.wait(RUNNING, timeout=60) is STOPPED
        assert isinstance(m.err, bigmachine.VersionMismatch)
        assert bigmachine.PYTHON in str(m.err)
        assert other in str(m.err)


# ======================================================================================
# SSH: machines on hosts reached over real OpenSSH (a private sshd on loopback)
# ======================================================================================

SSHD = shutil.which("sshd") or next(
    (p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.access(p, os.X_OK)), None)
UID = os.getuid()


class Sshd(typing.NamedTuple):
    port: int
    user: str
    host: str                 # user@127.0.0.1:port
    options: list             # ssh options that log in with the authorized key
    stranger: list            # the same with a key that is not authorized
    tmp: str                  # the hosts' TMPDIR: bundle caches and machine directories
    dir: str


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An sshd of the tests' own on 127.0.0.1: its own config, host key, authorized key and
    TMPDIR for the sessions it runs, all in a temporary directory; stopped by pid."""
    missing = [name for name, path in (("sshd", SSHD), ("ssh", shutil.which("ssh")),
                                       ("ssh-keygen", shutil.which("ssh-keygen"))) if not path]
    if missing:
        pytest.skip("OpenSSH's %s not found (apt-get install openssh-server openssh-client)"
                    % " and ".join(missing))
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key", "stranger_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key,
                        "-f", str(d / key)], check=True)
    shutil.copy(str(d / "client_key.pub"), str(d / "authorized_keys"))
    remote_tmp = d / "remote-tmp"
    remote_tmp.mkdir()
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        # sshd started as root insists on its privilege separation directory, which the
        # service would make at boot (it is empty: nothing of the system's sshd is touched).
        os.makedirs("/run/sshd", 0o755, exist_ok=True)
    user = pwd.getpwuid(UID).pw_name
    log = open(str(d / "sshd.log"), "w")
    for _ in range(5):
        port = bigmachine._free_port()
        (d / "sshd_config").write_text(textwrap.dedent("""\
            ListenAddress 127.0.0.1
            Port %d
            HostKey %s
            PidFile %s
            AuthorizedKeysFile %s
            PermitRootLogin prohibit-password
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            StrictModes no
            AllowTcpForwarding yes
            X11Forwarding no
            PrintMotd no
            MaxStartups 100
            SetEnv TMPDIR=%s
            """ % (port, d / "host_key", d / "sshd.pid", d / "authorized_keys", remote_tmp)))
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
                if s.recv(8).startswith(b"SSH-"):
                    break
            time.sleep(0.02)
        if proc.poll() is None:
            break
    else:
        pytest.fail("sshd did not start: %s" % (d / "sshd.log").read_text())
    common = ["-F", "/dev/null", "-o", "UserKnownHostsFile=%s" % (d / "known_hosts"),
              "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes",
              "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR"]
    try:
        yield Sshd(port, user, "%s@127.0.0.1:%d" % (user, port),
                   common + ["-i", str(d / "client_key")],
                   common + ["-i", str(d / "stranger_key")], str(remote_tmp), str(d))
    finally:
        proc.terminate()
        proc.wait()
        log.close()


def ssh_system(sshd, **options):
    settings = dict(FAST, python=sys.executable, ssh_options=sshd.options)
    settings.update(options)
    return bigmachine.SSHSystem([sshd.host], **settings)


def host_dir(sshd):
    """This user's bigmachine directory on the test host."""
    return os.path.join(sshd.tmp, "bigmachine-%d" % UID)


def machine_dirs(sshd):
    root = host_dir(sshd)
    return sorted(n for n in os.listdir(root) if n.startswith("machine-")) \
        if os.path.isdir(root) else []


def ssh_clients(sshd):
    """Live ssh client processes logged in with the tests' key (whoever their parent)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(int(entry)):
            with contextlib.suppress(OSError):
                with open("/proc/%s/cmdline" % entry, "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
                if os.path.basename(argv[0]) == "ssh" and sshd.options[-1] in argv:
                    found.append(int(entry))
    return found


def test_ssh_cluster_serves_calls(sshd, capsys):
    system = ssh_system(sshd, per_host=2)
    with bigmachine.start(system) as b:
        machines = b.start(3, {"Echo": Echo("ssh")}, env={"BIGMACHINE_TEST_VAR": "over ssh"})
        assert len(machines) == 2                              # per_host=2, one host
        for m in machines:
            assert m.wait(RUNNING, timeout=60) is RUNNING, m.err
        m1, m2 = machines
        for m in machines:
            url = urllib.parse.urlsplit(m.addr)
            assert (url.scheme, url.hostname, m.hostname) == ("https", "127.0.0.1", "127.0.0.1")
            assert url.port > 0 and m.call("Supervisor.info")["addr"] == m.addr
            # The host's processors, divided among the machines it may run (issue #16).
            assert m.maxprocs == max(1, os.cpu_count() // 2) == b.system.maxprocs()
        assert sorted(m.addr for m in b.machines()) == sorted(m.addr for m in machines)
        pids = [m.call("Echo.pid") for m in machines]
        workdirs = [m.call("Echo.environ", "TMPDIR") for m in machines]
        assert len(set(pids)) == 2 and os.getpid() not in pids
        assert sorted(os.path.basename(w) for w in workdirs) == machine_dirs(sshd)
        assert m1.call("Echo.environ", "BIGMACHINE_TEST_VAR") == "over ssh"
        assert m1.call("Echo.environ", "BIGMACHINE_MODE") == "machine"
        check_remote_cluster(machines, pids, "ssh", "from afar")
        with pytest.raises(bigmachine.Error, match="per_host=2"):
            b.start(1, {"Echo": Echo()})
        assert m1.call("Echo.print_lines", "hello over ssh") == 1
        seen = []
        eventually(lambda: seen.append(capsys.readouterr().err) or
                   "%s: hello over ssh\n" % m1.addr in "".join(seen), what="forwarded output")
    # Shut down: nothing left on the host.
    assert all(m.state is STOPPED for m in machines)
    assert not any(_alive(pid) for pid in pids)
    assert machine_dirs(sshd) == [] and not any(os.path.exists(w) for w in workdirs)
    assert ssh_clients(sshd) == []


def test_ssh_connection_drop_ends_machine(sshd):
    system = ssh_system(sshd)
    with bigmachine.start(system) as b:
        m, = running(b)
        pid, workdir = m.call("Echo.pid"), m.call("Echo.environ", "TMPDIR")
        client = system._procs[m].proc.pid
        os.kill(client, signal.SIGKILL)                        # the connection drops
        assert m.wait(STOPPED, timeout=10) is STOPPED
        assert "lost: ssh killed by signal SIGKILL" in str(m.err) and sshd.host in str(m.err)
        eventually(lambda: not _alive(pid) and not os.path.exists(workdir), timeout=10,
                   what="the machine to exit and remove its directory")


def test_ssh_machine_killed_on_its_host(sshd):
    # The OOM killer, say: the driver learns how the machine ended, and its directory goes.
    with bigmachine.start(ssh_system(sshd)) as b:
        m, = running(b)
        pid, workdir = m.call("Echo.pid"), m.call("Echo.environ", "TMPDIR")
        os.kill(pid, signal.SIGKILL)
        assert m.wait(STOPPED, timeout=10) is STOPPED
        assert str(m.err) == "machine %s on host %s killed by signal SIGKILL" % (m.addr, sshd.host)
        eventually(lambda: not os.path.exists(workdir), timeout=10, what="its directory to go")


def test_ssh_shutdown_while_starting_leaves_nothing(sshd):
    # Shut down at once, and a little later: the machines are somewhere in their three
    # stages, or not yet launched, and whatever was started must go.
    for delay, tunnel in ((0.0, False), (0.1, False), (0.3, False), (0.6, True)):
        b = bigmachine.start(ssh_system(sshd, per_host=2, tunnel=tunnel))
        try:
            machines = b.start(2, {"Echo": Echo()})
            time.sleep(delay)
        finally:
            b.shutdown()
        assert all(m.state is STOPPED for m in machines)
        eventually(lambda: ssh_clients(sshd) == [] and machine_dirs(sshd) == [], timeout=10,
                   what="ssh clients and machine directories to go")


def test_ssh_bigpi(sshd):
    env = dict(os.environ, BIGMACHINE_SSH_OPTIONS=" ".join(map(shlex.quote, sshd.options)))
    env.pop("BIGMACHINE_SYSTEM", None)
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "examples", "bigpi.py"), "-n", "2000000",
         "-nmach", "2", "--bigm.system=ssh", "--bigm.ssh.hosts=" + sshd.host,
         "--bigm.ssh.per_host", "2", "--bigm.ssh.python=" + sys.executable],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    pi = result.stdout.strip().split("π = ")[1]
    assert abs(float(pi) - 3.14159) < 0.01
    running_at = [line.split()[-2] for line in result.stderr.splitlines()
                  if line.endswith(" RUNNING")]
    assert len(running_at) == 2, result.stderr
    assert all(urllib.parse.urlsplit(addr).port > 0 for addr in running_at)   # real ports
    assert machine_dirs(sshd) == []


@pytest.mark.slow
def test_ssh_driver_killed_machines_exit(sshd, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import os, shlex, sys, time, bigmachine
        class S:
            def where(self):
                return "%d:%s" % (os.getpid(), os.getcwd())
        if __name__ == "__main__":
            system = bigmachine.SSHSystem([sys.argv[1]], python=sys.executable, per_host=2,
                                          ssh_options=shlex.split(sys.argv[2]),
                                          tunnel=sys.argv[3] == "tunnel",
                                          keepalive_period=0.5, lease=2.0)
            b = bigmachine.start(system)
            ms = b.start(2, {"S": S()})
            for m in ms:
                m.wait()
            print(" ".join(m.call("S.where") for m in ms), flush=True)
            time.sleep(600)
    """))
    for how, tunnel in (("SIGKILL", ""), ("SIGKILL", "tunnel"), ("SIGSTOP", "")):
        # SIGKILL: the driver's pipes to its ssh clients close, they pass the EOF on, and the
        # machines exit at once. SIGSTOP: the driver is alive but silent, the ssh connections
        # stay up, and the machines' watchdogs end them within their lease.
        driver = subprocess.Popen(
            [sys.executable, str(script), sshd.host, " ".join(map(shlex.quote, sshd.options)),
             tunnel], stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=HERE), text=True)
        try:
            where = [w.split(":", 1) for w in driver.stdout.readline().split()]
            assert len(where) == 2, "the driver did not start its machines"
            pids, workdirs = [int(p) for p, _ in where], [w for _, w in where]
            assert all(os.path.isdir(w) for w in workdirs)
            os.kill(driver.pid, getattr(signal, how))
            began = time.monotonic()
            eventually(lambda: not any(_alive(p) for p in pids), timeout=15,
                       what="machines to exit after %s" % how)
            took = time.monotonic() - began
            assert not any(os.path.exists(w) for w in workdirs)
            if how == "SIGSTOP":
                assert 1.0 < took < within(10)                         # it was the lease (2s)
            else:
                eventually(lambda: ssh_clients(sshd) == [], timeout=10,
                           what="the orphaned ssh clients to exit")
        finally:
            driver.kill()
            driver.wait()
        eventually(lambda: ssh_clients(sshd) == [], timeout=10, what="ssh clients to exit")
    assert machine_dirs(sshd) == []


def test_ssh_refused_key_names_the_host(sshd):
    with bigmachine.start(ssh_system(sshd, ssh_options=sshd.stranger)) as b:
        m, = b.start(1, {"Echo": Echo()})
        assert m.wait(RUNNING, timeout=60) is STOPPED
        assert "cannot ssh to host %s" % sshd.host in str(m.err)
        assert "Permission denied" in str(m.err)


def test_ssh_missing_python_names_the_host(sshd):
    with bigmachine.start(ssh_system(sshd, python="/nonexistent/python3")) as b:
        m, = b.start(1, {"Echo": Echo()})
        assert m.wait(RUNNING, timeout=60) is STOPPED
        assert not isinstance(m.err, bigmachine.VersionMismatch)
        assert "host %s cannot run /nonexistent/python3" % sshd.host in str(m.err)
    assert machine_dirs(sshd) == []


@pytest.mark.skipif(_other_python() is None, reason="no other CPython 3.8-3.13 installed")
def test_ssh_version_mismatch(sshd):
    other = _other_python()
    with bigmachine.start(ssh_system(sshd, python=other)) as b:
        m, = b.start(1, {"Echo": Echo()})
        assert m.wait(RUNNING, timeout=60) is STOPPED
        assert isinstance(m.err, bigmachine.VersionMismatch), m.err
        text = str(m.err)
        assert sshd.host in text and other in text and bigmachine.PYTHON in text
        assert "Python %d.%d" % tuple(map(int, os.path.basename(
            os.path.dirname(os.path.dirname(other))).split(".")[:2])) in text


def test_ssh_tunnel(sshd):
    system = ssh_system(sshd, tunnel=True)
    with bigmachine.start(system) as b:
        m, = running(b)
        # The driver reaches the machine at a local port that ssh forwards to its real one.
        local, remote = (urllib.parse.urlsplit(a).port
                         for a in (m.addr, m.call("Supervisor.info")["addr"]))
        assert local != remote and m.addr == "https://127.0.0.1:%d/" % local
        assert m.call("Echo.echo", "through the tunnel") == "through the tunnel"
        with m.call("Echo.chunks", 4, 100000) as f:
            assert len(f.read()) == 400000
        tunnel = system._procs[m].tunnel.proc
        assert tunnel.poll() is None
        pid = m.call("Echo.pid")
    assert tunnel.poll() is not None and not _alive(pid) and machine_dirs(sshd) == []


def test_ssh_bundle_is_sent_once_per_host(sshd):
    shutil.rmtree(os.path.join(host_dir(sshd), "bundles"), ignore_errors=True)
    sent = []
    for _ in range(2):
        system = ssh_system(sshd, per_host=2)
        with bigmachine.start(system) as b:
            running(b, 2)
        sent.append(system.bundles_sent)
    # Two machines started at once on a host that lacked it: sent to one of them; then cached.
    assert sent == [1, 0]
    cache = os.path.join(host_dir(sshd), "bundles")
    assert os.stat(host_dir(sshd)).st_mode & 0o777 == 0o700
    assert os.stat(cache).st_mode & 0o777 == 0o700
    cached, = os.listdir(cache)
    with open(os.path.join(cache, cached), "rb") as f:
        assert cached == hashlib.sha256(f.read()).hexdigest() + ".zip"


# --------------------------------------------------------------------------------------
# SSH pieces that need no sshd: bundles, host names, flags
# --------------------------------------------------------------------------------------

def test_bundle_holds_the_programs_own_code_only(tmp_path, monkeypatch):
    package = tmp_path / "src" / "bundled_pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__pycache__").mkdir()
    for name in ("__init__.py", "used.py", "sub/__init__.py", "sub/lazy.py", "data.txt",
                 "__pycache__/used.cpython-311.pyc"):
        (package / name).write_text("VALUE = %r\n" % name)
    (tmp_path / "src" / "bundled_single.py").write_text("X = 1\n")
    (tmp_path / "src" / "not_imported.py").write_text("X = 1\n")
    installed = tmp_path / "lib" / "site-packages"
    installed.mkdir(parents=True)
    (installed / "bundled_installed.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(installed))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    for name in ("bundled_pkg", "bundled_pkg.used", "bundled_single", "bundled_installed"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    importlib.import_module("bundled_pkg.used")
    importlib.import_module("bundled_single")
    importlib.import_module("bundled_installed")
    bundle = bigmachine._make_bundle()
    names = set(bundle.files)
    assert {"bigmachine.py", "test_bigmachine.py", "bundled_single.py", "bundled_pkg/__init__.py",
            "bundled_pkg/used.py", "bundled_pkg/sub/__init__.py", "bundled_pkg/sub/lazy.py"} <= names
    assert not any(n.endswith((".txt", ".pyc")) or "__pycache__" in n for n in names)
    assert "not_imported.py" not in names and "bundled_installed.py" not in names
    assert not any(n.split("/")[0] in ("json", "pytest", "_pytest", "os.py", "ssl.py")
                   for n in names), names                       # stdlib, site-packages
    assert bigmachine._make_bundle().sha256 == bundle.sha256   # the same files, the same zip
    assert hashlib.sha256(bundle.data).hexdigest() == bundle.sha256
    with zipfile.ZipFile(io.BytesIO(bundle.data)) as z:
        assert sorted(z.namelist()) == sorted(names)
        assert z.read("bundled_pkg/sub/lazy.py") == b"VALUE = 'sub/lazy.py'\n"


def test_bundle_main_script_and_relocation(tmp_path):
    # A script's main goes at the top of the bundle; the machine loads it from there.
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent("""
        import json, sys, bigmachine
        if __name__ == "__main__":
            bundle = bigmachine._make_bundle()
            code, host_tmp = sys.argv[1:]
            bigmachine._bundle_unpack(bigmachine._bundle_install(
                bigmachine._bundle_root(host_tmp), bundle.sha256, lambda: bundle.data), code)
            prep = bigmachine._bundle_preparation(bundle.main, code, code)
            print(json.dumps([bundle.main, sorted(bundle.files), prep]))
    """))
    result = run_script(tmp_path, script.read_text(), str(tmp_path / "code"), str(tmp_path))
    assert result.returncode == 0, result.stderr
    main, names, prep = json.loads(result.stdout)
    assert main["init_main_from_path"] == "driver.py" and "driver.py" in names
    assert prep["init_main_from_path"] == str(tmp_path / "code" / "driver.py")
    assert prep["sys_path"][0] == str(tmp_path / "code") and prep["dir"] == str(tmp_path / "code")
    assert (tmp_path / "code" / "driver.py").read_text() == script.read_text()


def test_bundle_install_checks_hashes(tmp_path):
    data = b"not really a zip"
    sha = hashlib.sha256(data).hexdigest()
    root = bigmachine._bundle_root(str(tmp_path))
    assert root == str(tmp_path / ("bigmachine-%d" % UID))
    fetched = []

    def fetch(payload):
        return lambda: fetched.append(1) or payload

    with pytest.raises(ValueError, match="damaged"):
        bigmachine._bundle_install(root, sha, fetch(b"something else"))
    path = bigmachine._bundle_install(root, sha, fetch(data))
    assert bigmachine._bundle_install(root, sha, fetch(data)) == path and len(fetched) == 2
    with open(path, "wb") as f:
        f.write(b"tampered")
    assert bigmachine._bundle_install(root, sha, fetch(data)) == path and len(fetched) == 3
    with open(path, "rb") as f:
        assert f.read() == data
    with pytest.raises(ValueError, match="SHA-256"):
        bigmachine._bundle_install(root, "../../etc/passwd", fetch(data))


def test_bundle_root_is_private(tmp_path):
    os.mkdir(str(tmp_path / ("bigmachine-%d" % UID)), 0o755)
    root = bigmachine._bundle_root(str(tmp_path))
    assert os.stat(root).st_mode & 0o777 == 0o700
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ("bigmachine-%d" % UID)).symlink_to(tmp_path)
    with pytest.raises(PermissionError, match="refusing"):
        bigmachine._bundle_root(str(elsewhere))


def test_machine_workdir_removes_dead_machines_dirs(tmp_path):
    root = bigmachine._bundle_root(str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    for name in ("machine-%s-abc" % dead, "machine-%d-def" % os.getpid(), "bundles"):
        os.mkdir(os.path.join(root, name))
    workdir = bigmachine._machine_workdir(root)
    assert os.path.basename(workdir).startswith("machine-%d-" % os.getpid())
    assert sorted(os.listdir(root)) == sorted(
        ["machine-%d-def" % os.getpid(), "bundles", os.path.basename(workdir)])


def test_machine_without_bootstrap_removes_its_workdir(tmp_path):
    # Its ssh connection cut before the bootstrap arrived: the machine leaves nothing.
    workdir = tmp_path / "machine-1-x"
    (workdir / "code").mkdir(parents=True)
    code = "import bigmachine; bigmachine._machine_main(workdir=%r)" % str(workdir)
    result = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, cwd=HERE,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "expects its bootstrap" in result.stderr
    assert not workdir.exists()


def test_machine_bootstrap_given_directly_with_an_address_path(tmp_path):
    # How a system whose machines get their bootstrap some other way (EC2: user data, then
    # over mutual TLS) runs one: _machine_main(bootstrap), stdin not watched, at an address
    # with a path, in a workdir that goes with it.
    port = bigmachine._free_port()
    addr = "https://127.0.0.1:%d/i-0123456789/" % port
    workdir = tmp_path / "machine-2-y"
    workdir.mkdir()
    with bigmachine.start(bigmachine.TestSystem(**FAST)) as b:
        credentials = b._authority.issue("bigmachine machine", ip_addresses=["127.0.0.1"])
        bootstrap = bigmachine._machine_bootstrap(
            b.system, credentials, {"sys_argv": ["prog"]}, addr=addr, bind="127.0.0.1",
            port=port, watch_stdin=False, env={"BIGMACHINE_TEST_VAR": "direct"})
        code = "import bigmachine, json, sys; bigmachine._machine_main(json.loads(sys.argv[1]), " \
            "workdir=sys.argv[2])"
        machine = subprocess.Popen([sys.executable, "-c", code, json.dumps(bootstrap),
                                    str(workdir)], stdin=subprocess.DEVNULL, cwd=HERE)
        try:
            def listening():
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    return True
            eventually(listening, timeout=30, what="the machine to listen")
            m = b.dial(addr)
            assert m.wait(RUNNING, timeout=30) is RUNNING, m.err
            info = m.call("Supervisor.info")
            assert info["addr"] == addr and info["pid"] == machine.pid
            m.call("Supervisor.register", pickle.dumps({"Echo": Echo()}))
            assert m.call("Echo.environ", "BIGMACHINE_TEST_VAR") == "direct"
            assert m.call("Echo.environ", "TMPDIR") == str(workdir)
            assert m.call("Supervisor.shutdown")
            assert machine.wait(30) == 0
        finally:
            machine.kill()
            machine.wait()
    assert not workdir.exists()


@pytest.mark.parametrize("spec, parsed", [
    ("node1", (None, "node1", None)),
    ("alice@node1", ("alice", "node1", None)),
    ("alice@node1:2222", ("alice", "node1", 2222)),
    ("10.0.0.5:22", (None, "10.0.0.5", 22)),
    ("[::1]:2222", (None, "::1", 2222)),
    ("bob@[fe80::1]", ("bob", "fe80::1", None)),
    ("::1", (None, "::1", None)),
])
def test_ssh_host_specs(spec, parsed):
    assert tuple(bigmachine._SSHHost.parse(spec))[1:] == parsed


@pytest.mark.parametrize("spec", ["", "-oProxyCommand=x", "@node", "node:0", "node:99999",
                                  "node:ssh", "[::1", "a b", "-l@node"])
def test_ssh_bad_host_specs(spec):
    with pytest.raises(ValueError):
        bigmachine._SSHHost.parse(spec)


def test_ssh_system_options_and_flags(monkeypatch):
    with pytest.raises(ValueError, match="--bigm.ssh.hosts"):
        bigmachine.SSHSystem()
    with pytest.raises(ValueError, match="listed twice"):
        bigmachine.SSHSystem(["a", "a"])
    with pytest.raises(ValueError, match="per_host"):
        bigmachine.SSHSystem(["a"], per_host=0)
    system = bigmachine.SSHSystem("a, b:2222", ssh_options="-i '/my key'")
    assert [h.spec for h in system.hosts] == ["a", "b:2222"]
    assert system.ssh_options == ("-i", "/my key") and system.bind is None
    assert bigmachine.SSHSystem(["a"], tunnel=True).bind == "127.0.0.1"
    args = system._ssh_args(system.hosts[1], "true")
    assert args[:3] == ["ssh", "-i", "/my key"] and args[-4:] == ["-p", "2222", "b", "true"]
    options = bigmachine.SSHSystem._command_line_options(
        ["prog", "--bigm.ssh.hosts=x,y@z:2", "-bigm.ssh.options", "-i k -o A=b",
         "--bigm.ssh.python=/py", "--bigm.ssh.per_host=3", "--bigm.ssh.tunnel"],
        {"BIGMACHINE_SSH_HOSTS": "ignored", "BIGMACHINE_SSH_PYTHON": "ignored too"})
    assert options == {"hosts": "x,y@z:2", "ssh_options": ["-i", "k", "-o", "A=b"],
                       "python": "/py", "per_host": 3, "tunnel": True}
    assert bigmachine.SSHSystem._command_line_options(
        ["prog", "--bigm.ssh.tunnel=false"], {"BIGMACHINE_SSH_HOSTS": "h1 h2",
                                               "BIGMACHINE_SSH_OPTIONS": "-v"}) == {
        "hosts": "h1 h2", "ssh_options": ["-v"], "tunnel": False}
    monkeypatch.setattr(sys, "argv", ["prog", "--bigm.system=ssh", "--bigm.ssh.hosts=h1,h2"])
    b = bigmachine.start(per_host=2)            # options given in code go with the flags
    try:
        assert isinstance(b.system, bigmachine.SSHSystem) and b.system.per_host == 2
        assert [h.host for h in b.system.hosts] == ["h1", "h2"]
    finally:
        b.shutdown()
    monkeypatch.setattr(sys, "argv", ["prog", "--bigm.system", "ssh"])
    monkeypatch.delenv("BIGMACHINE_SSH_HOSTS", raising=False)
    with pytest.raises(ValueError, match="needs hosts"):
        bigmachine.start()


# ======================================================================================
# EC2: the system against a real moto server on loopback, whose instances a harness runs
# ======================================================================================
#
# moto keeps EC2's books but runs nothing, so FakeEC2 plays the hypervisor: it polls moto for
# instances tagged bigmachine=true, runs each one's user data as a local process (in a process
# group of its own, with BIGMACHINE_FAKE_EC2=1, BIGMACHINE_PORT, BIGMACHINE_BIND=127.0.0.1 and
# BIGMACHINE_IMDS pointing at a metadata service of its own that wants IMDSv2 tokens as EC2's
# does), and mirrors the two ways an instance ends: its process exits -> the instance's shutdown
# behaviour in moto (terminate); the instance is terminated or stopped in moto -> the process
# group is killed. It tags each instance with the port it gave it (bigmachine-test:port), which
# `fake_ec2_address` hands to EC2System(address=...) in place of moto's fake public names.
#
# Spot capacity is never short in moto: tests that need it short make the system's boto3 client
# refuse spot launches (`refuse_spot`, a botocore event handler), which is how EC2 answers when
# it has none.
#
# Nothing here talks to AWS: boto3 is pointed at moto with AWS_ENDPOINT_URL and dummy
# credentials, and AWS's configuration files are set aside.

def _importable(*names):
    try:
        return all(importlib.util.find_spec(name) is not None for name in names)
    except (ImportError, ValueError):
        return False


# Looked for, not imported: machines import this module too, and moto is slow to import.
EC2_TOOLS = _importable("boto3", "moto", "flask", "flask_cors")

AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"


class FakeIMDS(http.server.ThreadingHTTPServer):
    """The instance metadata service of every fake instance, at /<instance id>/latest/...:
    IMDSv2 only (a token from a PUT first)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeIMDSHandler)
        self.tokens = {}
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def url(self, instance_id):
        return "http://127.0.0.1:%d/%s" % (self.server_address[1], instance_id)

    def close(self):
        self.shutdown()
        self.server_close()


class FakeIMDSHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, text):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        instance_id, _, path = self.path.lstrip("/").partition("/")
        if path != "latest/api/token" or not self.headers.get(
                "X-aws-ec2-metadata-token-ttl-seconds"):
            return self.reply(400, "bad token request")
        token = secrets.token_urlsafe(16)
        self.server.tokens[token] = instance_id
        self.reply(200, token)

    def do_GET(self):
        instance_id, _, path = self.path.lstrip("/").partition("/")
        if self.server.tokens.get(self.headers.get("X-aws-ec2-metadata-token")) != instance_id:
            return self.reply(401, "IMDSv2: no valid token")
        if path == "latest/meta-data/instance-id":
            return self.reply(200, instance_id)
        self.reply(404, "not found")


class FakeEC2:
    """Runs the instances of a moto server on this host: see the section's introduction."""

    def __init__(self, endpoint, directory):
        import boto3
        self.endpoint = endpoint
        self.ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name="us-east-1",
                                aws_access_key_id="testing", aws_secret_access_key="testing")
        self.dir = directory
        self.imds = FakeIMDS()
        # The interpreter instances find, under the name the user data looks for.
        self.bin = directory / "bin"
        self.bin.mkdir()
        (self.bin / ("python" + bigmachine.PYTHON)).symlink_to(sys.executable)
        # The few commands of an image that the user data's optional sections use.
        for tool in ("sh", "mkdir", "chmod", "cat", "cut", "getent", "id", "sleep", "mountpoint"):
            found = shutil.which(tool)
            if found:
                (self.bin / tool).symlink_to(found)
        self.instances = {}           # instance id -> {proc, port, dir, ended}
        self.errors = []
        self.lock = threading.Lock()
        self.armed = threading.Event()
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fake-ec2", daemon=True)
        self.thread.start()

    def _run(self):
        while not self.closing.is_set():
            if self.armed.is_set():
                try:
                    self.poll()
                except Exception:
                    self.errors.append(traceback.format_exc())
            self.closing.wait(0.1)

    def described(self, *filters):
        pages = self.ec2.get_paginator("describe_instances").paginate(Filters=[
            {"Name": "tag:bigmachine", "Values": ["true"]}] + list(filters))
        return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]

    def session(self, session):
        return self.described({"Name": "tag:bigmachine:session", "Values": [session]})

    def poll(self):
        with self.lock:
            states = {}
            for instance in self.described():
                instance_id, state = instance["InstanceId"], instance["State"]["Name"]
                states[instance_id] = state
                known = self.instances.get(instance_id)
                if known is None:
                    if state in ("pending", "running"):
                        self.boot(instance)
                elif state not in ("pending", "running") and not known["ended"]:
                    self.kill(known)              # terminated behind its back: it goes at once
            for instance_id, known in self.instances.items():
                if not known["ended"] and known["proc"].poll() is not None:
                    known["ended"] = True
                    if states.get(instance_id) in ("pending", "running"):
                        # It powered itself off: what EC2 does then is the instance's to say.
                        behaviour = self.ec2.describe_instance_attribute(
                            InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior"
                        )["InstanceInitiatedShutdownBehavior"]["Value"]
                        if behaviour == "terminate":
                            self.ec2.terminate_instances(InstanceIds=[instance_id])
                        else:
                            self.ec2.stop_instances(InstanceIds=[instance_id])

    def boot(self, instance):
        instance_id = instance["InstanceId"]
        value = self.ec2.describe_instance_attribute(
            InstanceId=instance_id, Attribute="userData")["UserData"].get("Value", "")
        port = bigmachine._free_port()
        self.ec2.create_tags(Resources=[instance_id],
                             Tags=[{"Key": "bigmachine-test:port", "Value": str(port)}])
        directory = self.dir / instance_id
        (directory / "tmp").mkdir(parents=True)
        script = directory / "user-data"
        script.write_bytes(base64.b64decode(value))
        script.chmod(0o700)
        path = self.bin
        python = bigmachine._ec2_tags(instance).get("bigmachine-test:python")
        if python:                    # an image with another Python, and not the driver's
            path = directory / "bin"
            path.mkdir()
            (path / "python3").symlink_to(python)
        env = {"PATH": str(path), "HOME": str(directory), "TMPDIR": str(directory / "tmp"),
               "LANG": "C.UTF-8", "BIGMACHINE_FAKE_EC2": "1", "BIGMACHINE_PORT": str(port),
               "BIGMACHINE_BIND": "127.0.0.1", "BIGMACHINE_IMDS": self.imds.url(instance_id)}
        with open(str(directory / "log"), "wb") as log:
            proc = subprocess.Popen([str(script)], env=env, cwd=str(directory),
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.instances[instance_id] = {"proc": proc, "port": port, "dir": directory,
                                       "ended": False}

    def kill(self, known):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(known["proc"].pid, signal.SIGKILL)
        known["proc"].wait()
        known["ended"] = True

    def log(self, instance_id):
        with contextlib.suppress(OSError):
            return (self.instances[instance_id]["dir"] / "log").read_text(errors="replace")
        return ""

    def alive(self):
        """Instances whose processes run."""
        with self.lock:
            return sorted(i for i, known in self.instances.items() if known["proc"].poll() is None)

    def clean(self):
        """Terminate every instance still up, and see that their processes are gone."""
        live = [i["InstanceId"] for i in self.described(
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping",
                                                      "stopped"]})]
        if live:
            self.ec2.terminate_instances(InstanceIds=live)
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self.lock:
            for known in self.instances.values():
                if not known["ended"]:
                    self.kill(known)
        return live

    def close(self):
        self.closing.set()
        self.thread.join()
        with self.lock:
            for known in self.instances.values():
                if not known["ended"]:
                    self.kill(known)
        self.imds.close()


def fake_ec2_address(instance):
    """Where the harness's instance listens: EC2System(address=...) in the tests."""
    port = bigmachine._ec2_tags(instance).get("bigmachine-test:port")
    return ("127.0.0.1", int(port)) if port else None


def aws_environment(endpoint):
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.fixture(scope="module")
def moto_ec2(tmp_path_factory):
    """A moto server on 127.0.0.1, and the harness that runs its instances; stopped by pid."""
    if not EC2_TOOLS:
        pytest.skip("moto[server] and boto3 are not installed (pip install 'moto[server]' boto3)")
    d = tmp_path_factory.mktemp("ec2")
    env = dict(os.environ, MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION="true",
               MOTO_ENABLE_AMI_VALIDATION="true")
    log = open(str(d / "moto.log"), "w")
    for _ in range(5):
        port = bigmachine._free_port()
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                 str(port)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=env)
        deadline = time.monotonic() + 30
        up = False
        while proc.poll() is None and time.monotonic() < deadline and not up:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), 1).close()
                up = True
            time.sleep(0.05)
        if up:
            break
        proc.kill()
        proc.wait()
    else:
        log.close()
        pytest.fail("moto did not start: %s" % (d / "moto.log").read_text())
    harness = None
    try:
        harness = FakeEC2("http://127.0.0.1:%d" % port, d)
        yield harness
    finally:
        if harness is not None:
            harness.close()
        proc.terminate()
        proc.wait()
        log.close()


@pytest.fixture
def ec2(moto_ec2, monkeypatch):
    """The harness, running instances, with boto3 pointed at its moto; every instance is
    terminated and its processes gone afterwards."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_EC2",
                 "AWS_ENDPOINT_URL_SSM", "BIGMACHINE_SYSTEM"):
        monkeypatch.delenv(name, raising=False)
    for name, value in aws_environment(moto_ec2.endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(bigmachine.EC2System, "poll_interval", 0.2)
    del moto_ec2.errors[:]
    moto_ec2.armed.set()
    try:
        yield moto_ec2
    finally:
        moto_ec2.clean()
        moto_ec2.armed.clear()
    assert not moto_ec2.errors, moto_ec2.errors[0]


def ec2_system(**options):
    settings = dict(FAST, address=fake_ec2_address)
    settings.update(options)
    return bigmachine.EC2System(**settings)


def refuse_spot(params, **kwargs):
    """A botocore handler for RunInstances: no spot capacity (dry runs pass)."""
    import botocore.exceptions
    if "InstanceMarketOptions" in params and not params.get("DryRun"):
        raise botocore.exceptions.ClientError({"Error": {
            "Code": "InsufficientInstanceCapacity",
            "Message": "There is no Spot capacity available that matches your request."}},
            "RunInstances")


def ssm_parameter(name):
    import boto3
    return boto3.client("ssm").get_parameter(Name=name)["Parameter"]["Value"]


def instance_id_of(m):
    return urllib.parse.urlsplit(m.addr).path.strip("/")


def all_terminated(ec2, session):
    return all(i["State"]["Name"] == "terminated" for i in ec2.session(session))


def test_ec2_cluster_serves_calls(ec2, capsys):
    system = ec2_system()
    with bigmachine.start(system) as b:
        machines = b.start(3, {"Echo": Echo("ec2")}, env={"BIGMACHINE_TEST_VAR": "on ec2"})
        for m in machines:
            assert m.wait(RUNNING, timeout=60) is RUNNING, m.err
        instances = {i["InstanceId"]: i for i in ec2.session(system.session)}
        assert sorted(instances) == sorted(instance_id_of(m) for m in machines)
        ami = ssm_parameter(AMI_PARAMETER)
        ca_key = bigmachine._private_key_pem(b._authority._key)
        for m in machines:
            instance_id = instance_id_of(m)
            url = urllib.parse.urlsplit(m.addr)
            assert m.addr == "https://127.0.0.1:%d/%s/" % (ec2.instances[instance_id]["port"],
                                                          instance_id)
            assert url.hostname == m.hostname == "127.0.0.1"
            assert m.maxprocs == 2                                  # an m5.large's vCPUs
            assert m.call("Supervisor.info")["addr"] == m.addr
            instance = instances[instance_id]
            tags = bigmachine._ec2_tags(instance)
            assert tags["bigmachine"] == "true" and tags["bigmachine:session"] == system.session
            assert tags["bigmachine:user"] == bigmachine._ec2_user()
            assert tags["bigmachine:program"] == os.path.basename(sys.argv[0])
            assert instance["InstanceLifecycle"] == "spot" and instance["ImageId"] == ami
            assert instance["InstanceType"] == "m5.large"
            assert instance["MetadataOptions"]["HttpTokens"] == "required"
            assert ec2.ec2.describe_instance_attribute(
                InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior"
            )["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
            user_data = base64.b64decode(ec2.ec2.describe_instance_attribute(
                InstanceId=instance_id, Attribute="userData")["UserData"]["Value"])
            assert len(user_data) < 16384 and ca_key.encode() not in user_data
        [group] = ec2.ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": ["bigmachine-443"]}])["SecurityGroups"]
        assert [(p["FromPort"], p["ToPort"]) for p in group["IpPermissions"]] == [(443, 443)]
        assert all(i["SecurityGroups"][0]["GroupId"] == group["GroupId"]
                   for i in instances.values())
        m1, m2, m3 = machines
        pids = [m.call("Echo.pid") for m in machines]
        assert len(set(pids)) == 3 and os.getpid() not in pids
        assert m1.call("Echo.environ", "BIGMACHINE_TEST_VAR") == "on ec2"
        assert m1.call("Echo.environ", "BIGMACHINE_SYSTEM") == "ec2"
        check_remote_cluster(machines, pids, "ec2", "in the cloud")
        assert m2.call("Echo.print_lines", "hello from ec2") == 1
        seen = []
        eventually(lambda: seen.append(capsys.readouterr().err) or
                   "%s: hello from ec2\n" % m2.addr in "".join(seen), what="forwarded output")
    # b.shutdown() leaves every instance terminated, and nothing of theirs running.
    assert all(m.state is STOPPED for m in machines)
    eventually(lambda: all_terminated(ec2, system.session) and not ec2.alive(),
               what="instances to be terminated and their processes to end")
    assert not any(_alive(pid) for pid in pids)


def test_ec2_spot_falls_back_on_demand_unless_spot_only(ec2):
    markets = []

    def record(params, **kwargs):
        if not params.get("DryRun"):
            markets.append(params.get("InstanceMarketOptions", {}).get("MarketType", "on-demand"))

    # No spot capacity: the machines run on demand, and spot is tried no more in that b.start.
    system = ec2_system()
    system.ec2.meta.events.register("before-parameter-build.ec2.RunInstances", record)
    system.ec2.meta.events.register("before-parameter-build.ec2.RunInstances", refuse_spot)
    with bigmachine.start(system) as b:
        machines = running(b, 2)
        assert all(m.call("Echo.echo", 1) == 1 for m in machines)
        assert [i.get("InstanceLifecycle") for i in ec2.session(system.session)] == [None, None]
    assert markets.count("on-demand") == 2 and 1 <= markets.count("spot") <= 2
    # spot_only: no fallback; the machine stops with EC2's reason and nothing is launched.
    system = ec2_system(spot_only=True)
    system.ec2.meta.events.register("before-parameter-build.ec2.RunInstances", refuse_spot)
    with bigmachine.start(system) as b:
        m, = b.start(1, {"Echo": Echo()})
        assert m.wait(RUNNING, timeout=30) is STOPPED
        assert "spot: InsufficientInstanceCapacity" in str(m.err) and "on-demand" not in str(m.err)
    assert ec2.session(system.session) == []
    # on_demand: spot is not tried.
    del markets[:]
    system = ec2_system(on_demand=True)
    system.ec2.meta.events.register("before-parameter-build.ec2.RunInstances", record)
    with bigmachine.start(system) as b:
        running(b, 1)
        assert [i.get("InstanceLifecycle") for i in ec2.session(system.session)] == [None]
    assert markets == ["on-demand"]


def test_ec2_instance_terminated_behind_our_back_is_noticed_fast(ec2):
    # A keepalive budget of a minute: the monitor must not need it.
    system = ec2_system(keepalive_period=0.5, keepalive_timeout=60, keepalive_rpc_timeout=5,
                        lease=30)
    with bigmachine.start(system) as b:
        m, = running(b)
        instance_id = instance_id_of(m)
        began = time.monotonic()
        ec2.ec2.terminate_instances(InstanceIds=[instance_id])     # a spot reclaim, say
        assert m.wait(STOPPED, timeout=30) is STOPPED
        took = time.monotonic() - began
        assert took < within(5), took
        assert "instance %s is terminated" % instance_id in str(m.err), m.err
        with pytest.raises(bigmachine.MachineStopped):
            m.call("Echo.echo", 1)


@pytest.mark.slow
def test_ec2_driver_killed_instances_terminate_themselves(ec2, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import time, bigmachine
        class S:
            def ok(self):
                return True
        if __name__ == "__main__":
            system = bigmachine.EC2System(address="test_bigmachine:fake_ec2_address",
                                          keepalive_period=0.5, lease=5.0)
            b = bigmachine.start(system)
            ms = b.start(2, {"S": S()})
            for m in ms:
                m.wait()
                assert m.call("S.ok")
            print(system.session, flush=True)
            time.sleep(600)
    """))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=HERE), cwd=str(tmp_path))
    try:
        session = driver.stdout.readline().strip()
        assert session, "the driver did not start its machines"
        assert len(ec2.session(session)) == 2 and len(ec2.alive()) == 2
        driver.kill()                                              # SIGKILL: nothing at exit
        began = time.monotonic()
        eventually(lambda: all_terminated(ec2, session) and not ec2.alive(), timeout=20,
                   what="the instances to terminate themselves")
        took = time.monotonic() - began
        assert 1.0 < took < within(5.0 + 3), took                          # within the lease
        for instance in ec2.session(session):
            assert "watchdog expired" in ec2.log(instance["InstanceId"])
    finally:
        driver.kill()
        driver.wait()
        driver.stdout.close()


def test_ec2_instances_refuse_strangers(ec2, tmp_path):
    # A machine: a client of another CA is refused; so is one of its own session that is not
    # the driver, by the bootstrap.
    with bigmachine.start(ec2_system()) as b:
        m, = running(b)
        stranger = bigmachine._Client(bigmachine.CertificateAuthority().issue("stranger"))
        try:
            with pytest.raises(bigmachine.AuthenticationError):
                stranger.peer(m.addr).call("Supervisor.ping", (1,), {}, time.monotonic() + 10)
        finally:
            stranger.close()
        assert m.call("Supervisor.ping", 2) == 2
    # A bootstrap that the driver never reaches: run by hand as the harness would.
    with bigmachine.start(bigmachine.TestSystem(**FAST)) as b:
        credentials = b._authority.issue("bigmachine ec2 machine")
        script = tmp_path / "user-data"
        script.write_text(bigmachine._ec2_user_data("s", 443, 3, b._credentials.cert_pem,
                                                    credentials))
        script.chmod(0o700)
        port = bigmachine._free_port()
        (tmp_path / "tmp").mkdir()
        env = {"PATH": str(ec2.bin), "TMPDIR": str(tmp_path / "tmp"), "BIGMACHINE_FAKE_EC2": "1",
               "BIGMACHINE_PORT": str(port), "BIGMACHINE_IMDS": ec2.imds.url("i-0byhand")}
        proc = subprocess.Popen([str(script)], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            def ask(credentials):
                context = bigmachine.client_context(credentials)
                with socket.create_connection(("127.0.0.1", port), 5) as raw:
                    with context.wrap_socket(raw) as sock:
                        sock.sendall(b"GET /i-0byhand/bigmachine/boot HTTP/1.1\r\nHost: x\r\n"
                                     b"Connection: close\r\n\r\n")
                        return sock.makefile("rb").read()

            def listening():
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    return True
            eventually(listening, timeout=30, what="the bootstrap to listen")
            with pytest.raises(ssl.SSLError):
                ask(bigmachine.CertificateAuthority().issue("stranger"))
            assert ask(b._authority.issue("a machine of the session")) == b""
            answer = ask(b._credentials)
            assert answer.startswith(b"HTTP/1.1 200 ") and b'"python": "%s"' % (
                bigmachine.PYTHON.encode()) in answer
            assert proc.wait(30) == 1                           # no word from the driver
            log = proc.stdout.read().decode()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
    assert "refused 127.0.0.1: a certificate of the session, but not its driver's" in log
    assert "no word from the driver for 3s" in log


def test_ec2_machine_that_ends_early_says_why(ec2, tmp_path):
    # Its output reaches the driver, prefixed, and its last lines explain its end.
    result = run_script(tmp_path, """
        import bigmachine
        class S:
            def f(self):
                return 1
        b = bigmachine.start("ec2", address="test_bigmachine:fake_ec2_address")
        m, = b.start(1, {"S": S()})
        print("state", m.wait())
        print("err", m.err)
        b.shutdown()
    """)
    assert "state STOPPED" in result.stdout, result.stderr
    assert "exited with code 1; its last output:" in result.stdout
    assert 'if __name__ == "__main__":' in result.stdout
    assert re.search(r"^https://127\.0\.0\.1:\d+/i-[0-9a-f]+/: bigmachine: bigmachine.start\(\) "
                     r"was called while a machine was loading", result.stderr, re.M), result.stderr
    eventually(lambda: not ec2.alive(), what="the instance to go")


def test_ec2_user_data_is_small_and_holds_no_ca_key(monkeypatch):
    with bigmachine.start(bigmachine.TestSystem(**FAST)) as b:
        credentials = b._authority.issue("bigmachine ec2 machine")
        text = bigmachine._ec2_user_data("0123abcd", 443, 300, b._credentials.cert_pem,
                                         credentials)
        assert len(text.encode()) < 16384 and text.startswith("#!/bin/sh\n")
        code = text.split('b64decode("""')[1].split('""")')[0]
        source = zlib.decompress(base64.b64decode(code)).decode()
        assert "def _ec2_boot(settings):" in source
        for where in (text, source):
            assert bigmachine._private_key_pem(b._authority._key) not in where
        # This machine's key and no other, the CA's certificate, the driver's certificate's hash.
        assert text.count("PRIVATE KEY-----") == 2 and repr(credentials.key_pem)[1:-1] in text
        assert repr(credentials.cert_pem)[1:-1] in text and repr(credentials.ca_pem)[1:-1] in text
        assert hashlib.sha256(ssl.PEM_cert_to_DER_cert(b._credentials.cert_pem)).hexdigest() in text
        monkeypatch.setattr(bigmachine, "_EC2_USER_DATA_LIMIT", 4096)
        with pytest.raises(bigmachine.Error, match="over EC2's limit of 4096"):
            bigmachine._ec2_user_data("0123abcd", 443, 300, b._credentials.cert_pem, credentials)


def test_ec2_unknown_instance_type_fails_before_launching(ec2):
    before = ec2.described()
    for instance_type, message in (("m5.bogus", "there is no EC2 instance type 'm5.bogus'"),
                                   ("hpc6a.48xlarge", "hpc6a.48xlarge is not offered in region "
                                                      "us-east-1")):
        with bigmachine.start(ec2_system(instance_type=instance_type)) as b:
            with pytest.raises(bigmachine.Error, match=message):
                b.start(2, {"Echo": Echo()})
            assert b.machines() == []
    assert ec2.described() == before
    with bigmachine.start(ec2_system(ami="ami-00000000000000000")) as b:
        with pytest.raises(bigmachine.Error, match="cannot use image ami-00000000000000000"):
            b.start(1, {"Echo": Echo()})
    assert ec2.described() == before


@pytest.mark.skipif(_other_python() is None, reason="no other CPython 3.8-3.13 installed")
def test_ec2_version_mismatch_names_both(ec2):
    other = _other_python()
    system = ec2_system(tags={"bigmachine-test:python": other})
    with bigmachine.start(system) as b:
        m, = b.start(1, {"Echo": Echo()})
        assert m.wait(RUNNING, timeout=60) is STOPPED
        assert isinstance(m.err, bigmachine.VersionMismatch), m.err
        text = str(m.err)
        version = subprocess.run([other, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True).stdout.strip()
        assert "the driver runs Python %s" % bigmachine.PYTHON in text
        assert "instance %s runs Python %s (" % (instance_id_of(m), version) in text
    eventually(lambda: all_terminated(ec2, system.session), what="the instance to be terminated")


@pytest.mark.slow
def test_ec2_list_and_kill_leftovers(ec2):
    ami = ssm_parameter(AMI_PARAMETER)

    def launch(tags):
        return ec2.ec2.run_instances(
            ImageId=ami, MinCount=1, MaxCount=1, InstanceType="m5.large",
            UserData="#!/bin/sh\nexec /bin/sleep 600\n", TagSpecifications=[{
                "ResourceType": "instance",
                "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
        )["Instances"][0]["InstanceId"]

    # What two dead drivers left, and an instance that is none of bigmachine's business (the
    # harness does not run it either: it has no bigmachine tag).
    left = {session: [launch({"bigmachine": "true", "bigmachine:session": session,
                              "bigmachine:user": "alice", "bigmachine:program": "bigpi.py"})
                      for _ in range(n)] for session, n in (("aaaa1111", 2), ("bbbb2222", 1))}
    other = launch({"Name": "not ours"})
    eventually(lambda: len(ec2.alive()) == 3, what="the leftovers to run")

    def command(*args):
        result = subprocess.run([sys.executable, os.path.join(HERE, "bigmachine.py"), "ec2"] +
                                list(args), capture_output=True, text=True, timeout=60)
        return result.returncode, result.stdout, result.stderr

    code, out, err = command("list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["INSTANCE", "STATE", "TYPE", "MARKET", "LAUNCHED", "SESSION",
                                "USER", "PROGRAM", "ADDRESS"]
    assert sorted(line.split()[0] for line in lines[1:-1]) == sorted(
        left["aaaa1111"] + left["bbbb2222"])
    assert all(" alice " in line and " bigpi.py " in line for line in lines[1:-1])
    assert lines[-1] == "3 instances of bigmachine sessions in us-east-1" and other not in out
    assert command("kill")[0] == 2                              # --session or --all
    code, out, err = command("kill", "--session", "aaaa1111")
    assert code == 0 and sorted(out.split()[1::4][:2]) == sorted(left["aaaa1111"]), out + err
    code, out, err = command("list", "--region", "us-east-1")
    live = [line for line in out.splitlines()[1:-1] if "shutting-down" not in line and
            "terminated" not in line]
    assert [line.split()[0] for line in live] == left["bbbb2222"]
    code, out, err = command("kill", "--all")
    assert code == 0 and "1 instance terminated in us-east-1" in out, out + err
    eventually(lambda: ec2.alive() == [], what="the leftovers to go")
    state = ec2.ec2.describe_instances(InstanceIds=[other])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] == "running"                  # not ours: untouched
    ec2.ec2.terminate_instances(InstanceIds=[other])


@pytest.mark.slow
def test_ec2_bigpi(ec2):
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "examples", "bigpi.py"), "-n", "2000000",
         "-nmach", "2", "--bigm.system=ec2", "--bigm.ec2address=test_bigmachine:fake_ec2_address",
         "--bigm.ec2type=m5.large"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=HERE))
    assert result.returncode == 0, result.stderr
    pi = result.stdout.strip().split("π = ")[1]
    assert abs(float(pi) - 3.14159) < 0.01
    running_at = [line.split()[-2] for line in result.stderr.splitlines()
                  if line.endswith(" RUNNING")]
    assert len(running_at) == 2 and all(
        re.match(r"https://127\.0\.0\.1:\d+/i-[0-9a-f]+/$", addr) for addr in running_at)
    assert "distributing work among 4 cores" in result.stderr          # 2 vCPUs each
    eventually(lambda: not ec2.alive(), what="the instances to go")
    assert all(i["State"]["Name"] == "terminated" for i in ec2.described())


def test_ec2_options_and_flags(ec2, monkeypatch):
    options = bigmachine.EC2System._command_line_options(
        ["prog", "--bigm.ec2type=c5.xlarge", "-bigm.ec2ondemand", "--bigm.ec2region", "eu-west-1",
         "--bigm.ec2port=8443"], {"BIGMACHINE_EC2TYPE": "ignored", "BIGMACHINE_EC2SPOTONLY": "1"})
    assert options == {"instance_type": "c5.xlarge", "on_demand": True, "spot_only": True,
                       "region": "eu-west-1", "port": 8443}
    monkeypatch.setattr(sys, "argv", ["prog", "--bigm.system=ec2", "--bigm.ec2type=c5.xlarge",
                                      "--bigm.ec2ondemand"])
    with bigmachine.start(**FAST) as b:
        assert isinstance(b.system, bigmachine.EC2System) and b.system.region == "us-east-1"
        assert (b.system.instance_type, b.system.on_demand, b.system.spot_only) == (
            "c5.xlarge", True, False)
        assert b.system.keepalive_timeout == 2.0
    assert bigmachine.EC2System.defaults == (60.0, 600.0, 120.0, 300.0)   # Go's ec2system
    assert bigmachine.EC2System(spot_only=True, on_demand=True).on_demand is False
    for bad in (dict(port=0), dict(disk_gib=0), dict(tags={"bigmachine:session": "x"}),
                dict(instance_type=""), dict(address="nocolon")):
        with pytest.raises(ValueError):
            bigmachine.EC2System(**bad)
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(bigmachine.Error, match="no AWS region"):
        bigmachine.EC2System()


def test_ec2_without_boto3_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)                 # import boto3 fails
    with pytest.raises(bigmachine.Error, match=r"pip install boto3 \(or pip install "
                                               r"'bigmachine\[ec2\]'\)"):
        bigmachine.EC2System()
    monkeypatch.setattr(sys, "argv", ["prog", "--bigm.system=ec2"])
    with pytest.raises(bigmachine.Error, match="needs boto3"):
        bigmachine.start()


# ======================================================================================
# Debug: profiles, stacks, variables, heap, the debug pages, logs (Go: profile.go,
# status.go, expvar.go, rpc/stats.go; issue #23)
# ======================================================================================

class Busy:
    """A service to look at: one method burns CPU, one hangs, one holds memory."""

    def __init__(self):
        self.burning = 0
        self.blob = None
        self.released = None

    def init(self, b):
        self.released = threading.Event()
        self.hits = bigmachine.publish("hits", bigmachine.Counter())
        bigmachine.publish("answer", {"value": 42, "unit": ["none"]})
        bigmachine.publish("pid", os.getpid)

    def burn(self):
        """Pure Python until cancelled: the method a profile should find at its top."""
        context = bigmachine.current_call()
        self.burning += 1
        total = 0
        while not context.cancelled:
            for i in range(20000):
                total += i * i % 7
        return total

    def burning_calls(self):
        return self.burning

    def hang(self):
        self.released.wait(60)          # the hung frame: a stack trace must show this line

    def hold(self, n):
        self.blob = [bytearray(1000) for _ in range(n)]    # the heap's top allocation site
        return len(self.blob)

    def hit(self):
        return self.hits.add()

    def fail(self):
        raise ValueError("counted as an error")

    def log(self, level, text):
        logging.getLogger("busy").log(level, text)


def get(addr, path, host=None):
    """GET path from a debug server: (status, headers, body bytes)."""
    host_name, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host_name.strip("[]"), int(port), timeout=120)
    try:
        headers = {"Host": host} if host is not None else {}
        conn.request("GET", path, headers=headers)
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        conn.close()


def top_function(stats):
    stats.sort_stats("tottime")
    return stats.fcn_list[0]


def test_profile_merges_machines_and_finds_the_slow_method(lb, tmp_path):
    import pstats
    m1, m2 = running(lb, 2, {"Busy": Busy()})
    burns = [m.call_async("Busy.burn") for m in (m1, m2)]
    hung = m1.call_async("Busy.hang")                    # waiting: must weigh nothing
    eventually(lambda: all(m.call("Busy.burning_calls") == 1 for m in (m1, m2)),
               what="both machines burning")
    try:
        stats = lb.profile(1.0)
        filename, _, name = top_function(stats)
        assert (os.path.basename(filename), name) == ("test_bigmachine.py", "burn")
        assert len(stats.files) == 2 and all("weighted by CPU time" in f for f in stats.files)
        assert {f.split(": ")[0] for f in stats.files} == {m1.addr, m2.addr}
        # The method has its real share: nearly all the CPU the machines used.
        burn = stats.stats[stats.fcn_list[0]]
        assert burn[2] > 0.5 * stats.total_tt
        hang = [s for k, s in stats.stats.items() if k[2] == "hang"]
        assert not hang or hang[0][3] < 0.05 * burn[3]
        # Call edges: burn is called from bigmachine's dispatcher.
        assert any(os.path.basename(caller[0]) == "bigmachine.py" for caller in burn[4])

        # The same over HTTP: a file that pstats and python -m pstats load.
        addr = lb.serve_debug("127.0.0.1:0")
        status, headers, body = get(addr, "/debug/bigmachine/pprof/profile?seconds=1")
        assert status == 200 and headers["Content-Type"] == "application/octet-stream"
        path = tmp_path / "cpu.prof"
        path.write_bytes(body)
        filename, _, name = top_function(pstats.Stats(str(path)))
        assert name == "burn"
        out = subprocess.run([sys.executable, "-m", "pstats", str(path)], input="sort tottime\n"
                             "stats 3\nquit\n", capture_output=True, text=True, timeout=60)
        assert "(burn)" in out.stdout, out.stdout + out.stderr

        # One machine, as text.
        status, _, body = get(addr, "/debug/bigmachine/pprof/profile?seconds=0.5&debug=1&"
                              + urllib.parse.urlencode({"machine": m2.addr}))
        text = body.decode()
        assert status == 200 and m2.addr in text and m1.addr not in text and "(burn)" in text
    finally:
        for f in burns + [hung]:
            f.cancel()


def test_sampler_writes_pstats_with_call_edges(tmp_path):
    import marshal
    import pstats
    stop = threading.Event()

    def inner():
        x = 0
        for i in range(5000):
            x += i
        return x

    def outer():
        while not stop.is_set():
            inner()

    thread = threading.Thread(target=outer)
    thread.start()
    try:
        result = bigmachine._profile(0.5)
    finally:
        stop.set()
        thread.join()
    stats = result["stats"]
    keys = {k[2]: k for k in stats}
    assert {"inner", "outer"} <= set(keys)
    cc, nc, tt, ct, callers = stats[keys["inner"]]
    assert cc == nc > 0 and ct >= tt > 0
    assert keys["outer"] in callers                        # the edge outer -> inner
    assert stats[keys["outer"]][3] >= ct                   # outer's cumulative holds inner's
    assert stats[bigmachine._PROFILER_KEY][0] == result["samples"] > 0
    path = tmp_path / "p.prof"
    path.write_bytes(marshal.dumps(stats))
    loaded = pstats.Stats(str(path))
    assert loaded.stats[keys["inner"]][4][keys["outer"]][0] > 0
    with pytest.raises(ValueError):
        bigmachine._profile(0)
    with pytest.raises(ValueError):
        bigmachine._profile(1, hz=0)


def test_profile_errors(tb):
    with pytest.raises(bigmachine.Error, match="none is running"):
        tb.profile(0.1)
    with pytest.raises(ValueError):
        tb.profile(-1)


def test_stacks_show_the_hung_call(lb):
    m, = running(lb, 1, {"Busy": Busy()})
    hung = m.call_async("Busy.hang")
    try:
        eventually(lambda: "serving Busy.hang" in m.call("Supervisor.stacks"),
                   what="the hung call in the stacks")
        text = m.call("Supervisor.stacks")
        thread = text.split("serving Busy.hang")[1].split("\n\n")[0]
        assert ", in hang\n" in thread and "self.released.wait(60)" in thread
        addr = lb.serve_debug("127.0.0.1:0")
        status, _, body = get(addr, "/debug/bigmachine/stacks")
        page = body.decode()
        assert status == 200 and "== driver (pid %d) ==" % os.getpid() in page
        assert "== %s (RUNNING) ==" % m.addr in page and "self.released.wait(60)" in page
        assert "test_stacks_show_the_hung_call" in page                 # the driver's own
        status, _, body = get(addr, "/debug/bigmachine/stacks?" + urllib.parse.urlencode(
            {"machine": m.addr}))
        assert status == 200 and "== driver" not in body.decode()
    finally:
        hung.cancel()


def test_vars_publish_and_rpc_statistics(lb):
    m1, m2 = running(lb, 2, {"Busy": Busy(), "Echo": Echo()})
    for _ in range(3):
        m1.call("Busy.hit")
    with pytest.raises(ValueError):
        m1.call("Busy.fail")
    assert m1.call("Echo.dial_and_call", m2.addr, "Echo.echo", b"x" * 1000) == b"x" * 1000
    big = b"z" * (3 << 20)                    # large pickles travel differently: still counted
    assert m2.call("Echo.echo", big) == big

    def served(machine, method):
        return lb.vars()[machine.addr]["rpc.server"]["methods"].get(method, {}).get("count")
    # A machine counts a call once its reply is sent: the caller may be quicker to ask.
    eventually(lambda: served(m1, "Busy.fail") == 1 and served(m2, "Echo.echo") == 2,
               what="the calls counted")
    everything = lb.vars()
    assert set(everything) == {m1.addr, m2.addr}
    v1, v2 = everything[m1.addr], everything[m2.addr]
    assert v1["hits"] == 3 and v2["hits"] == 0
    assert v1["answer"] == {"value": 42, "unit": ["none"]}
    assert v1["pid"] == m1.call("Echo.pid") != v2["pid"]
    served = v1["rpc.server"]["methods"]
    assert served["Busy.hit"]["count"] == 3 and served["Busy.hit"]["errors"] == 0
    assert served["Busy.fail"] == dict(served["Busy.fail"], count=1, errors=1)
    assert served["Busy.hit"]["request_bytes"] > 0 and served["Busy.hit"]["reply_bytes"] > 0
    assert served["Busy.hit"]["time_ms"] >= served["Busy.hit"]["max_time_ms"] > 0
    # Machine to machine: m1's client counted its call, m2 served it, 1000 bytes each way.
    made = v1["rpc.client"]["machines"][m2.addr]["Echo.echo"]
    assert made["count"] == 1 and made["request_bytes"] > 1000 and made["reply_bytes"] > 1000
    assert v2["rpc.server"]["methods"]["Echo.echo"]["max_request_bytes"] > len(big)
    assert v2["rpc.server"]["methods"]["Echo.echo"]["errors"] == 0
    # The driver's client counted its calls to each machine.
    mine = lb._client.stats.snapshot()
    assert mine["machines"][m1.addr]["Busy.hit"]["count"] == 3
    assert mine["methods"]["Busy.fail"]["errors"] == 1
    echoed = mine["machines"][m2.addr]["Echo.echo"]
    assert echoed["errors"] == 0 and echoed["reply_bytes"] > len(big) < echoed["request_bytes"]
    assert mine["methods"]["Supervisor.keepalive"]["count"] >= 2

    # /debug/vars: the driver's variables, and every machine's under "machines".
    bigmachine.publish("driver.answer", lambda: [1, 2, 3])
    bigmachine.publish("driver.broken", lambda: 1 / 0)
    try:
        addr = lb.serve_debug("127.0.0.1:0")
        status, headers, body = get(addr, "/debug/vars")
        page = json.loads(body)
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert page["driver.answer"] == [1, 2, 3]
        assert page["driver.broken"].startswith("error: ZeroDivisionError")
        assert page["machines"][m1.addr]["hits"] == 3
        assert page["rpc.client"]["machines"][m1.addr]["Busy.hit"]["count"] == 3
    finally:
        bigmachine.unpublish("driver.answer")
        bigmachine.unpublish("driver.broken")
    assert "driver.answer" not in bigmachine._read_published()


def test_counter_and_publish():
    c = bigmachine.Counter()
    threads = [threading.Thread(target=lambda: [c.add() for _ in range(10000)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value == 40000 and c.add(5) == 40005
    assert bigmachine.publish("t.counter", c) is c
    bigmachine.publish("t.odd", {1: {2, 3}, "lock": threading.Lock()})
    try:
        values = bigmachine._read_published()
        assert values["t.counter"] == 40005
        assert values["t.odd"]["1"] == [2, 3] and "lock" in values["t.odd"]["lock"]
        json.dumps(values)
    finally:
        bigmachine.unpublish("t.counter")
        bigmachine.unpublish("t.odd")
    with pytest.raises(ValueError):
        bigmachine.publish("", 1)


def test_heap_page(lb):
    m1, m2 = running(lb, 2, {"Busy": Busy()})
    addr = lb.serve_debug("127.0.0.1:0")
    status, _, body = get(addr, "/debug/bigmachine/pprof/heap?trace=1")
    assert status == 200 and body.decode().count("it was started now") == 2
    assert m1.call("Busy.hold", 5000) == 5000
    query = urllib.parse.urlencode({"machine": m1.addr, "limit": 5})
    status, _, body = get(addr, "/debug/bigmachine/pprof/heap?" + query)
    text = body.decode()
    assert status == 200 and "started now" not in text and m2.addr not in text
    site = text.split("machines  site\n")[1].splitlines()
    assert site[0].endswith("test_bigmachine.py:%d" % (Busy.hold.__code__.co_firstlineno + 1))
    assert "bytearray(1000)" in site[1]
    assert "MiB" in site[0].split()[1]                 # 5000 blocks of 1000 bytes: ~5 MiB
    status, _, body = get(addr, "/debug/bigmachine/pprof/heap?stop=1")
    assert status == 200
    status, _, body = get(addr, "/debug/bigmachine/pprof/heap?seconds=0.1")
    assert body.decode().count("it ran for 0.1s for this look") == 2   # stopped: a one-off
    status, _, body = get(addr, "/debug/bigmachine/pprof/heap?machine=https://nowhere:1/")
    assert status == 404 and b"no machine https://nowhere:1/" in body


def test_debug_pages_loopback_only(tb):
    m, = running(tb)
    with pytest.raises(ValueError, match="loopback"):
        tb.serve_debug("0.0.0.0:0")
    with pytest.raises(ValueError, match="loopback"):
        tb.serve_debug("192.0.2.1:0")
    addr = tb.serve_debug("127.0.0.1:0")
    host, port = addr.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert tb.serve_debug("localhost:0").startswith("127.0.0.1:")
    assert tb.serve_debug(":0").startswith("127.0.0.1:")             # no host: loopback

    # A request must name a loopback host: a rebound DNS name gets nothing.
    for name in ("127.0.0.1:%s" % port, "localhost:%s" % port, "localhost", "[::1]:%s" % port,
                 "LOCALHOST.:%s" % port):
        assert get(addr, "/debug/vars", host=name)[0] == 200, name
    for name in ("evil.example:%s" % port, "127.0.0.1.evil.example", "0.0.0.0:%s" % port,
                 "localhost:notaport"):
        status, _, body = get(addr, "/debug/vars", host=name)
        assert status == 403 and b"loopback names only" in body, name
    with socket.create_connection((host, int(port)), timeout=10) as s:    # no Host at all
        s.sendall(b"GET /debug/vars HTTP/1.0\r\n\r\n")
        assert s.makefile("rb").readline().split()[1] == b"403"

    # Explicitly allowed elsewhere: any Host is answered.
    wide = tb.serve_debug("0.0.0.0:0", allow_remote=True)
    assert get("127.0.0.1:" + wide.rsplit(":", 1)[1], "/debug/vars",
               host="evil.example")[0] == 200

    status, headers, body = get(addr, "/debug/bigmachine/")
    assert status == 200 and b'href="/debug/bigmachine/status"' in body
    status, headers, body = get(addr, "/debug/bigmachine/pprof/")
    page = body.decode()
    assert status == 200 and "profile?seconds=30" in page
    assert html.escape(urllib.parse.urlencode({"machine": m.addr})) in page
    assert get(addr, "/debug/bigmachine/pprof")[0] == 301
    assert get(addr, "/nothing/here")[0] == 404
    assert get(addr, "/debug/bigmachine/pprof/profile?seconds=x")[0] == 400

    tb.shutdown()                                      # the pages end with the session
    with pytest.raises(OSError):
        get(addr, "/debug/vars")
    with pytest.raises(bigmachine.Error):
        tb.serve_debug("127.0.0.1:0")


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="no chromium to render the status page in "
                    "(apt-get install chromium; .ci/run installs it)")
def test_status_page_in_headless_chromium(lb, tmp_path):
    machines = running(lb, 2, {"Busy": Busy()})
    for m in machines:
        m.call("Busy.hit")
    gone, = lb.start(1, {"Busy": Busy()})
    gone.wait()
    gone.cancel()
    addr = lb.serve_debug("127.0.0.1:0")
    url = "http://%s/debug/bigmachine/status" % addr
    status, headers, body = get(addr, "/debug/bigmachine/status")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<meta http-equiv="refresh" content="5">' in body       # it refreshes itself
    shot = tmp_path / "status.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             "--user-data-dir=%s" % (tmp_path / "profile"), "--window-size=1400,800"]
    dom = subprocess.run([_chromium()] + flags + ["--dump-dom", url], capture_output=True,
                         text=True, timeout=120)
    assert "bigmachine status" in dom.stdout, dom.stderr[-2000:]
    rows = dom.stdout.split("<tbody>")[1].split("</tbody>")[0].split("<tr>")[1:]
    for m in machines:
        row = [r for r in rows if m.addr in r]
        assert len(row) == 1 and "RUNNING" in row[0] and "resident" in row[0], row
    stopped = [r for r in rows if gone.addr in r]
    assert len(stopped) == 1 and "STOPPED" in stopped[0] and "was cancelled" in stopped[0]
    result = subprocess.run([_chromium()] + flags + ["--screenshot=%s" % shot, url],
                            capture_output=True, text=True, timeout=120)
    assert shot.exists(), result.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000


@pytest.mark.parametrize("where", ["ssh", "ec2"])
def test_remote_machine_logs_and_profile(where, request, caplog):
    # Everything above is the same whatever the system; what travels differently from another
    # host is the machine's output, and its profile.
    caplog.set_level(logging.INFO)
    if where == "ssh":
        system = ssh_system(request.getfixturevalue("sshd"))
    else:
        request.getfixturevalue("ec2")
        system = ec2_system()
    with bigmachine.start(system) as b:
        m, = running(b, 1, {"Busy": Busy()})
        m.call("Busy.log", logging.INFO, "info from afar")
        m.call("Busy.log", logging.DEBUG, "debug is not sent")

        def arrived():
            return [r for r in caplog.records if r.name == "busy"]
        eventually(arrived, what="the record from %s" % where)
        record, = arrived()
        assert record.machine == m.addr and record.getMessage() == m.addr + ": info from afar"
        assert record.levelno == logging.INFO and record.process == m.call("Supervisor.getpid")
        burn = m.call_async("Busy.burn")
        try:
            eventually(lambda: m.call("Busy.burning_calls") == 1, what="the machine burning")
            assert top_function(b.profile(0.5))[2] == "burn"
        finally:
            burn.cancel()
    assert len(arrived()) == 1                          # the debug record never left


def test_machine_logs_reach_the_driver_at_its_level(tmp_path):
    result = run_script(tmp_path, """
        import logging, sys, bigmachine
        class Talk:
            def say(self):
                log = logging.getLogger("talk")
                log.debug("debug is below the driver's level")
                log.info("info reaches the driver")
                try:
                    1 / 0
                except ZeroDivisionError:
                    log.exception("with its traceback")
                print("and print too")
                return True
        class Machines(logging.Filter):
            def filter(self, record):
                # One write per line: this runs in the driver's forwarding thread.
                sys.stdout.write("record %s %s %s\\n" % (record.name, record.levelname,
                                                        getattr(record, "machine", None)))
                return True
        if __name__ == "__main__":
            logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                                format="%(levelname)s|%(name)s|%(message)s")
            logging.getLogger("talk").addFilter(Machines())
            with bigmachine.start("local") as b:
                m, = b.start(1, {"Talk": Talk()})
                m.wait()
                m.call("Talk.say")
                sys.stdout.write("addr %s\\n" % m.addr)
    """)
    assert result.returncode == 0, result.stderr
    addr, = [line[5:] for line in result.stdout.splitlines() if line.startswith("addr ")]
    err = result.stderr
    assert "INFO|talk|%s: info reaches the driver\n" % addr in err
    assert "ERROR|talk|%s: with its traceback\nTraceback" % addr in err
    assert "ZeroDivisionError" in err and "debug is below" not in err
    assert "%s: and print too\n" % addr in err
    assert "record talk INFO %s\n" % addr in result.stdout
    assert "record talk ERROR %s\n" % addr in result.stdout


def test_chatty_machine_is_bounded_and_drops_are_counted(tmp_path):
    result = run_script(tmp_path, """
        import bigmachine
        class Chatty:
            def chat(self, n):
                for i in range(n):
                    print("line", i)
                return n
        if __name__ == "__main__":
            system = bigmachine.Local()
            system.output_burst, system.output_rate = 100, 1.0
            with bigmachine.start(system) as b:
                m, = b.start(1, {"Chatty": Chatty()})
                m.wait()
                m.call("Chatty.chat", 5000)
    """)
    assert result.returncode == 0, result.stderr
    shown = [line for line in result.stderr.splitlines() if ": line " in line]
    assert 100 <= len(shown) < 200
    dropped = [int(line.split("] ")[1].split()[0]) for line in result.stderr.splitlines()
               if "lines of output dropped" in line]
    assert dropped and len(shown) + sum(dropped) == 5000             # every line accounted for


def test_nothing_printed_is_lost_at_shutdown(tmp_path):
    # Go issue #23: output printed right before the end went missing.
    result = run_script(tmp_path, """
        import os, sys, bigmachine
        class Loud:
            def shout(self, n):
                for i in range(n):
                    print("out %d" % i)
                    print("err %d" % i, file=sys.stderr)
                return n
        if __name__ == "__main__":
            with bigmachine.start(bigmachine.Local()) as b:
                ms = b.start(2, {"Loud": Loud()})
                for m in ms:
                    m.wait()
                futures = [m.call_async("Loud.shout", 2000) for m in ms]
                print(" ".join(str(f.result()) for f in futures))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2000 2000"
    lines = result.stderr.splitlines()
    for kind in ("out", "err"):
        got = [line for line in lines if ": %s " % kind in line]
        assert len(got) == 4000
        per_machine = collections.defaultdict(list)
        for line in got:
            addr, _, text = line.rpartition(": ")
            per_machine[addr].append(int(text.split()[1]))
        assert [v == list(range(2000)) for v in per_machine.values()] == [True, True]


# ======================================================================================
# Faults, bad input and attacks (issue 4): nothing hangs, nothing is lost, nothing is left
# behind, no one gets in. Every fault is real: real processes, real signals, real sockets.
# ======================================================================================

# --------------------------------------------------------------------------------------
# The section's service and helpers
# --------------------------------------------------------------------------------------

class Victim:
    """The service the fault tests torment. Calls record how they ended in files, which the
    test can read even after the machine is gone."""

    def __init__(self):
        self.events = []
        self.seen = collections.Counter()

    def pid(self):
        return os.getpid()

    def echo(self, x):
        return x

    def hold(self, path):
        """Run in pure Python (so an interrupt lands) until interrupted; write how it ended."""
        with open(path + ".started", "w"):
            pass
        try:
            while True:
                time.sleep(0.002)
        except BaseException as e:
            with open(path, "w") as f:
                f.write(type(e).__name__)
            raise

    def hang(self, seconds, key):
        """Block in C, where no interrupt can land, then note whether the call was cancelled."""
        try:
            threading.Event().wait(seconds)
            time.sleep(0.05)                       # the interrupt lands here, if it was sent
            self.events.append(("finished", key, bigmachine.current_call().cancelled))
        except BaseException as e:
            self.events.append(("cancelled", key, bigmachine.current_call().cancelled,
                                type(e).__name__))
            raise

    def stubborn(self, seconds, reply):
        """Ignore cancellation and answer late: a reply nobody is waiting for any more."""
        end = time.monotonic() + seconds
        while True:
            try:
                while time.monotonic() < end:
                    time.sleep(0.002)
                return reply
            except BaseException:
                self.events.append(("ignored an interrupt", reply))

    def get_events(self):
        return list(self.events)

    def chunks(self, n, size):
        for i in range(n):
            yield bytes([i % 256]) * size

    def chunks_then_raise(self, error):
        yield b"x" * 1000
        raise {"ValueError": ValueError, "OSError": OSError, "EOFError": EOFError}[error](
            "the source broke")

    def count(self, f):
        total = 0
        for block in iter(lambda: f.read(1 << 20), b""):
            total += len(block)
        return total

    def size(self, blob):
        return len(blob)

    def raise_locked(self, text):
        raise LockedError(text)

    def local_class(self):
        class Local:
            pass
        return Local()

    def machine_only(self, directory):
        """An object of a class from a module that only this machine has."""
        sys.path.insert(0, directory)
        try:
            module = __import__("machine_only_module")
        finally:
            sys.path.remove(directory)
        return module.Thing()

    def work(self, token, payload, fail):
        """The load test's call: counts every token it sees, to prove exactly-once."""
        self.seen[token] += 1
        if fail:
            raise CustomError(token[1], "token %r" % (token,))
        return token, payload if len(payload) < 64 else hashlib.sha256(payload).digest()

    def seen_tokens(self):
        return dict(self.seen)

    def resources(self):
        return _resources()


class LockedError(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self, text):
        super().__init__(text)
        self.lock = threading.Lock()


class EndlessFile(io.RawIOBase):
    """A binary file of zeros without end: a streamed argument that is always mid-send."""

    def readable(self):
        return True

    def readinto(self, b):
        n = len(b)
        b[:n] = bytes(n)
        return n


def _resources():
    """This process's threads, open files and resident memory."""
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"threads": threading.active_count(), "fds": len(os.listdir("/proc/self/fd")),
            "rss": rss}


def _outcome(fn):
    """Run fn; return what it returned or the exception it raised, and when it ended."""
    try:
        value = fn()
    except BaseException as e:
        value = e
    return value, time.monotonic()


class _Running:
    """Calls running in threads, each outcome recorded with the time it ended."""

    def __init__(self, **calls):
        self.outcomes = {}
        self.threads = [threading.Thread(target=self._run, args=(name, fn), daemon=True)
                        for name, fn in calls.items()]
        for t in self.threads:
            t.start()

    def _run(self, name, fn):
        self.outcomes[name] = _outcome(fn)

    def join(self, timeout):
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return self.outcomes


def _read_all(f):
    with f:
        for _ in iter(lambda: f.read(1 << 16), b""):
            pass
    return "read to the end"


class _Steady:
    """A client that keeps calling a machine from its own thread: the cluster keeps serving."""

    def __init__(self, machine, pause=0.005):
        self.machine, self.pause = machine, pause
        self.ok, self.failures = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                assert self.machine.call("Victim.echo", i) == i
                self.ok += 1
            except BaseException as e:
                self.failures.append(e)
            self._stop.wait(self.pause)

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        return self.ok, self.failures


# --------------------------------------------------------------------------------------
# Faults: machines that die, hang, stop answering or restart
# --------------------------------------------------------------------------------------

def test_fault_sigkill_mid_calls(lb, tmp_path):
    """SIGKILL a machine in the middle of every kind of call: each fails with MachineStopped
    at once, m.err says which signal, the other machine never misses a call, and shutdown
    is quick."""
    m1, m2 = running(lb, 2, {"Victim": Victim()})
    pid = m1.call("Victim.pid")
    steady = _Steady(m2)
    path = lambda name: str(tmp_path / name)
    futures = [m1.call_async("Victim.hold", path("future%d" % i)) for i in range(4)]
    calls = _Running(
        call=lambda: m1.call("Victim.hold", path("call")),
        deadline=lambda: m1.options(timeout=60).call("Victim.hold", path("deadline")),
        retry=lambda: m1.options(backoff=bigmachine.Backoff(0.01, 0.01, 1)).retry_call(
            "Victim.hold", path("retry")),
        stream_reply=lambda: _read_all(m1.call("Victim.chunks", 1 << 30, 1 << 16)),
        stream_argument=lambda: m1.call("Victim.count", EndlessFile()),
    )
    eventually(lambda: all(os.path.exists(path(n) + ".started") for n in
                           ["future%d" % i for i in range(4)] + ["call", "deadline", "retry"]),
               what="the calls to be running on the machine")
    time.sleep(0.2)                                            # the streams are flowing
    assert all(f.running() for f in futures) and not calls.outcomes
    began = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    outcomes = calls.join(10)
    for f in futures:
        assert isinstance(f.exception(10), bigmachine.MachineStopped)
    ended = time.monotonic()
    assert set(outcomes) == {"call", "deadline", "retry", "stream_reply", "stream_argument"}
    for name, (value, when) in outcomes.items():
        assert isinstance(value, bigmachine.MachineStopped), (name, value)
        assert value.__cause__ is m1.err, name
        assert when - began < within(3), (name, when - began)
    assert ended - began < within(3)
    assert m1.state is STOPPED and "killed by signal SIGKILL" in str(m1.err)
    assert m1.err.exit_code == -signal.SIGKILL
    # Later calls of every kind fail at once, and the same way.
    for later in (lambda: m1.call("Victim.echo", 1),
                  lambda: m1.call_async("Victim.echo", 1).result(5),
                  lambda: m1.retry_call("Victim.echo", 1),
                  lambda: m1.options(timeout=5).call("Victim.echo", 1)):
        t = time.monotonic()
        with pytest.raises(bigmachine.MachineStopped, match="killed by signal SIGKILL"):
            later()
        assert time.monotonic() - t < within(0.5)
    ok, failures = steady.stop()
    assert failures == [] and ok > 10
    assert m2.call("Victim.echo", "still here") == "still here"
    t = time.monotonic()
    lb.shutdown()
    assert time.monotonic() - t < within(5)


def test_fault_stream_source_errors_are_not_connection_breaks(tb):
    """An error the stream's source raises on the machine reaches the reader as itself, even
    when it looks like an I/O error: only a broken connection becomes MachineStopped."""
    m, = running(tb, 1, {"Victim": Victim()})
    for name, error in (("ValueError", ValueError), ("OSError", OSError), ("EOFError", EOFError)):
        with m.call("Victim.chunks_then_raise", name) as f:
            assert f.read(1000) == b"x" * 1000
            with pytest.raises(error, match="the source broke") as info:
                f.read()
            assert "Remote traceback" in str(info.value.__cause__)
    assert m.call("Victim.echo", 1) == 1 and m.state is RUNNING


def test_fault_machine_stops_answering(lb, tmp_path):
    """SIGSTOP a machine: it is alive but silent. A call with a deadline times out on time; the
    machine is STOPPED within the keepalive budget, with the keepalive failure and its last
    error; calls in flight then fail; the other machine never notices."""
    m1, m2 = running(lb, 2, {"Victim": Victim()})
    system = lb.system
    budget = (system.keepalive_period / 2 + system.keepalive_timeout
              + system.keepalive_rpc_timeout + 1.0)
    pid = m1.call("Victim.pid")
    steady = _Steady(m2)
    future = m1.call_async("Victim.hold", str(tmp_path / "held"))
    eventually(lambda: os.path.exists(str(tmp_path / "held.started")))
    os.kill(pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(bigmachine.Timeout):
            m1.options(timeout=0.5).call("Victim.echo", 1)
        assert 0.45 < time.monotonic() - began < within(1.5)
        m1._peer.reset()            # no idle connection: the deadline runs out in the handshake
        t = time.monotonic()
        with pytest.raises(bigmachine.Timeout, match="deadline passed while connecting"):
            m1.options(timeout=0.5).call("Victim.echo", 1)
        assert 0.45 < time.monotonic() - t < within(1.5)
        assert m1.wait(STOPPED, timeout=budget + 5) is STOPPED
        took = time.monotonic() - began
        assert took < within(budget), (took, budget)
        assert "keepalive failed after" in str(m1.err) and "timed out" in str(m1.err)
        assert isinstance(future.exception(5), bigmachine.MachineStopped)
        with pytest.raises(bigmachine.MachineStopped, match="keepalive failed"):
            m1.call("Victim.echo", 2)
        ok, failures = steady.stop()
        assert failures == [] and ok > 10
        t = time.monotonic()
        lb.shutdown()                                  # ends the stopped process too
        assert time.monotonic() - t < within(5)
        eventually(lambda: not _alive(pid), timeout=10, what="the stopped machine to be ended")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("system", ["test", "local"])
def test_fault_hung_machine_times_out_and_pool_stays_clean(system):
    """A call the machine never answers in time: Timeout on time, the call cancelled on the
    machine, and the late answer of a call that ignores cancellation never reaches anyone."""
    cls = bigmachine.TestSystem if system == "test" else bigmachine.Local
    with bigmachine.start(cls(**FAST)) as b:
        m, = running(b, 1, {"Victim": Victim()})
        began = time.monotonic()
        with pytest.raises(bigmachine.Timeout, match="timed out after 0.3s"):
            m.options(timeout=0.3).call("Victim.hang", 1.0, "h1")    # blocked in C
        assert 0.28 < time.monotonic() - began < within(0.8)
        eventually(lambda: ("cancelled", "h1", True, "_Interrupt") in m.call("Victim.get_events"),
                   timeout=5, what="the hung call to be cancelled when it woke")
        with pytest.raises(bigmachine.Timeout):
            m.options(timeout=0.2).call("Victim.stubborn", 0.6, "late")
        deadline = time.monotonic() + 1.0                             # past the late reply
        i = 0
        while time.monotonic() < deadline:
            i += 1
            assert m.call("Victim.echo", i) == i
            futures = [m.call_async("Victim.echo", (i, k)) for k in range(4)]
            assert [f.result(10) for f in futures] == [(i, k) for k in range(4)]
        assert ("ignored an interrupt", "late") in m.call("Victim.get_events")


def test_fault_two_callers_cancel_only_their_own_calls(tb, tmp_path):
    """A machine serves several callers (the driver, other machines), each numbering its own
    calls. A caller's cancel stops its call, never another caller's."""
    m, = running(tb, 1, {"Victim": Victim()})
    clients = {name: bigmachine._Client(tb._credentials) for name in ("a", "b")}
    flights = {name: bigmachine._InFlight() for name in clients}

    def hold(name):
        return lambda: clients[name].peer(m.addr).call(
            "Victim.hold", (str(tmp_path / name),), {}, None, flights[name])
    try:
        calls = _Running(a=hold("a"), b=hold("b"))
        eventually(lambda: all((tmp_path / (n + ".started")).exists() for n in "ab"))
        flights["a"].cancel()
        eventually(lambda: "a" in calls.outcomes)
        assert isinstance(calls.outcomes["a"][0], bigmachine.Cancelled)
        eventually(lambda: (tmp_path / "a").exists(), what="a's call to end on the machine")
        time.sleep(0.3)
        assert not (tmp_path / "b").exists() and "b" not in calls.outcomes   # b's runs on
        flights["b"].cancel()
        calls.join(10)
        # The file exists as soon as it is opened for writing: wait for what it says.
        eventually(lambda: (tmp_path / "b").exists() and (tmp_path / "b").read_text(),
                   what="b's call to end on the machine")
        assert (tmp_path / "b").read_text() == "_Interrupt"
    finally:
        for client in clients.values():
            client.close()


def test_fault_restarted_machine_and_stale_connections(tb):
    """A machine restarted at the same address, at once: the next call reconnects. Connections
    the machine dropped while idle are not reused either."""
    creds = tb._authority.issue("restartable", ip_addresses=["127.0.0.1"])

    def serve(tag, port=0):
        process = bigmachine._MachineProcess(None, creds, None, lease=60, watchdog_tick=1,
                                             exit=lambda code: None, port=port)
        process.dispatcher.register("Echo", Echo(tag))
        return process.start()

    first = serve("first")
    m = tb.dial(first.addr)
    assert m.wait(RUNNING, timeout=10) is RUNNING
    assert [m.call("Echo.get_tag") for _ in range(3)] == ["first"] * 3
    futures = [m.call_async("Echo.sleep", 0.2) for _ in range(4)]   # several pooled connections
    assert [f.result(10) for f in futures] == [False] * 4
    first.exited.set()
    first.server.close()
    time.sleep(0.05)                # a restart: no process starts again faster than this
    second = serve("second", port=first.server.port)
    try:
        assert second.addr == first.addr
        assert [m.call("Echo.get_tag") for _ in range(8)] == ["second"] * 8
        # The machine drops every connection while they are idle in the pool.
        for conn in list(second.server._conns):
            conn.shutdown(socket.SHUT_RDWR)
        time.sleep(0.05)
        assert [m.call("Echo.get_tag") for _ in range(8)] == ["second"] * 8
        assert m.state is RUNNING
    finally:
        second.exited.set()
        second.server.close()


# --------------------------------------------------------------------------------------
# Faults: Ctrl-C, to the driver's process group, its main thread, a call in flight
# --------------------------------------------------------------------------------------

# A driver for the Ctrl-C tests, run as its own process group as a terminal would run it.
CTRL_C_DRIVER = """
import os, sys, threading, time
import bigmachine
from test_bigmachine import Victim as Busy      # its pid() and hold(path)

if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    machines, futures, report = [], [], []
    try:
        with bigmachine.start(bigmachine.Local(keepalive_period=0.5, keepalive_timeout=2.0,
                                               keepalive_rpc_timeout=0.5, lease=5.0)) as b:
            machines = b.start(2, {"Busy": Busy()}, env={"BIGMACHINE_TEST_TAG": out})
            if mode == "starting":
                print("ready", flush=True)
                time.sleep(600)
            for m in machines:
                m.wait()
            print("pids", *[m.call("Busy.pid") for m in machines], flush=True)
            if mode == "idle":
                print("ready", flush=True)
                time.sleep(600)
            futures = [m.call_async("Busy.hold", os.path.join(out, "future%d" % i))
                       for i, m in enumerate(machines)]
            def user_thread():
                try:
                    machines[1].call("Busy.hold", os.path.join(out, "thread"))
                except BaseException as e:
                    report.append("thread: %s" % type(e).__name__)
            threading.Thread(target=user_thread).start()
            print("ready", flush=True)
            machines[0].call("Busy.hold", os.path.join(out, "main"))
    except KeyboardInterrupt:
        for m in machines:
            print("machine:", m.state, m.err, flush=True)
        for f in futures:
            print("future:", type(f.exception(10)).__name__, flush=True)
        time.sleep(0.2)
        print(*report, flush=True)
        print("interrupted", flush=True)
"""


def _tagged_processes(tag):
    """Machine processes started with BIGMACHINE_TEST_TAG=tag, wherever they are now (not the
    fork server they were forked from, which has their environment too)."""
    found = []
    needle = ("BIGMACHINE_TEST_TAG=%s" % tag).encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/environ" % entry, "rb") as f:
                    tagged = needle in f.read().split(b"\0")
                if tagged and _alive(int(entry)) and not _is_fork_server(int(entry)):
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _is_fork_server(pid):
    """Is pid a fork server (a machine forked from one runs the same program, but its parent
    is the fork server)?"""
    def program(pid):
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read()
    with open("/proc/%d/stat" % pid) as f:
        parent = int(f.read().rsplit(")", 1)[1].split()[1])
    return b"_fork_server_main(" in program(pid) and program(parent) != program(pid)


class _Driver:
    """A driver program in a process group of its own, like a command run from a shell."""

    def __init__(self, tmp_path, mode):
        self.out = tmp_path / "out"
        self.out.mkdir()
        script = tmp_path / "driver.py"
        script.write_text(CTRL_C_DRIVER)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), mode, str(self.out)], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
            env=dict(os.environ, PYTHONPATH=HERE), cwd=str(tmp_path))
        self.pids = []
        for line in self.proc.stdout:
            if line.startswith("pids"):
                self.pids = [int(p) for p in line.split()[1:]]
            if line.startswith("ready"):
                break

    def ctrl_c(self):
        """What a terminal does on Ctrl-C: SIGINT to the foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return time.monotonic()

    def finish(self, timeout):
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("the driver did not exit within %ss" % timeout)
        return out, err

    def kill(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()
        for pid in _tagged_processes(str(self.out)):
            os.kill(pid, signal.SIGKILL)

    def started(self, *names):
        return all((self.out / (name + ".started")).exists() for name in names)

    def ended(self, name):
        path = self.out / name
        return path.read_text() if path.exists() else None


def test_fault_ctrl_c_to_the_drivers_process_group(tmp_path):
    """The terminal's Ctrl-C reaches the whole foreground process group. Machines run in
    sessions of their own: the signal does not reach them, and the driver's shutdown ends
    them, bounded in time. The same when the machines are still starting."""
    for mode in ("idle", "starting"):
        directory = tmp_path / mode
        directory.mkdir()
        driver = _Driver(directory, mode)
        try:
            tag = str(driver.out)
            if mode == "idle":
                assert len(driver.pids) == 2
                for pid in driver.pids:
                    assert os.getpgid(pid) != driver.proc.pid
                    assert os.getsid(pid) != os.getsid(driver.proc.pid)
            else:
                eventually(lambda: len(_tagged_processes(tag)) == 2, timeout=30,
                           what="the machine processes to exist")
            began = driver.ctrl_c()
            out, err = driver.finish(timeout=15)
            took = time.monotonic() - began
            assert "interrupted" in out, out + err
            assert took < within(5), took
            eventually(lambda: not _tagged_processes(tag), timeout=5,
                       what="no machine process left")
            if mode == "idle":
                assert out.count("machine: STOPPED machine https://") == 2, out
                assert out.count("was shut down") == 2, out    # by the driver, cleanly
            assert "KeyboardInterrupt" not in "".join(
                line for line in err.splitlines(True) if line.startswith("https://")), err
        finally:
            driver.kill()


def _blocked_signals(thread):
    """The signals thread blocks; None if it has ended (a connection's thread may end at any
    moment)."""
    try:
        with open("/proc/self/task/%d/status" % thread.native_id) as f:
            mask = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
    except FileNotFoundError:
        return None
    return {s for s in signal.Signals if mask >> (s - 1) & 1}


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs /proc")
def test_fault_ctrl_c_reaches_the_main_thread(lb, tb):
    """Python runs signal handlers in the main thread, but the kernel gives a process's signal
    to any thread that does not block it, and a main thread asleep wakes only for one given
    to it. So every thread of the library blocks Ctrl-C (and the other signals a program
    handles): the kernel has to hand it to the main thread."""
    machines = running(lb, 1, {"Victim": Victim()}) + running(tb, 1, {"Victim": Victim()})
    for m in machines:
        assert [f.result(10) for f in [m.call_async("Victim.echo", i) for i in range(8)]] == \
            list(range(8))
        with m.call("Victim.chunks", 2, 10) as f:
            assert f.read() == bytes(10) + bytes([1]) * 10
    ours = [t for t in threading.enumerate() if t.name.startswith("bigmachine")]
    assert len({t.name for t in ours}) >= 5, ours              # boot, accept, conn, worker...
    for thread in ours:
        blocked = _blocked_signals(thread)
        assert blocked is None or {signal.SIGINT, signal.SIGTERM} <= blocked, thread
    assert signal.SIGINT not in _blocked_signals(threading.main_thread())


def test_fault_ctrl_c_with_calls_in_flight(tmp_path):
    """Ctrl-C while calls are in flight in the main thread, in a user's thread and in futures:
    each is cancelled on its machine (its `except`/`finally` runs there), every future and call
    ends, the driver shuts down in bounded time, and no process is left."""
    driver = _Driver(tmp_path, "calls")
    try:
        calls = ("main", "thread", "future0", "future1")
        eventually(lambda: driver.started(*calls), timeout=30, what="the calls to run")
        began = driver.ctrl_c()
        out, err = driver.finish(timeout=15)
        took = time.monotonic() - began
        assert "interrupted" in out, out + err
        assert took < within(5), took
        for name in calls:
            assert driver.ended(name) == "_Interrupt", (name, out, err)
        assert out.count("future: MachineStopped") == 2, out
        assert "thread: MachineStopped" in out, out
        assert out.count("was shut down") == 2, out
        eventually(lambda: not any(_alive(p) for p in driver.pids), timeout=5)
    finally:
        driver.kill()


def test_fault_second_ctrl_c_exits_at_once(tmp_path):
    """A shutdown that would take long (a machine that stopped answering) is cut short by a
    second Ctrl-C: every machine is killed at once, the stopped one included, and the driver
    exits at once."""
    driver = _Driver(tmp_path, "calls")
    try:
        eventually(lambda: driver.started("main", "thread"), timeout=30)
        os.kill(driver.pids[0], signal.SIGSTOP)            # the shutdown will wait for it
        driver.ctrl_c()
        time.sleep(1.5)
        assert driver.proc.poll() is None                  # still shutting down, patiently
        assert _alive(driver.pids[0])
        began = driver.ctrl_c()
        out, err = driver.finish(timeout=10)
        took = time.monotonic() - began
        assert took < within(1.5), took
        assert "interrupted" in out, out + err
        eventually(lambda: not any(_alive(p) for p in driver.pids), timeout=2,
                   what="every machine killed")
    finally:
        for pid in driver.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        driver.kill()


def test_fault_ctrl_c_in_a_call_discards_its_connection(tb, tmp_path):
    """KeyboardInterrupt in the middle of a call (waiting for the reply, or halfway through
    sending a large argument): the call is cancelled on the machine, its connection is thrown
    away rather than reused mid-message, and later calls get their own answers."""
    m, = running(tb, 1, {"Victim": Victim()})
    main = threading.main_thread().ident
    assert threading.get_ident() == main

    def interrupt_when(condition):
        def run():
            eventually(condition, timeout=10)
            signal.pthread_kill(main, signal.SIGINT)
        threading.Thread(target=run, daemon=True).start()

    held = str(tmp_path / "held")
    interrupt_when(lambda: os.path.exists(held + ".started"))
    with pytest.raises(KeyboardInterrupt):
        m.call("Victim.hold", held)
    # The file exists as soon as it is opened for writing: wait for what it says.
    eventually(lambda: os.path.exists(held) and _read_text(held),
               what="the call to be cancelled on the machine")
    with open(held) as f:
        assert f.read() == "_Interrupt"
    assert [m.call("Victim.echo", i) for i in range(20)] == list(range(20))

    # Halfway through sending 1 GiB (which the machine, whose limit is lower, reads and drops:
    # seconds of sending, no memory): the machine has part of a frame, and never the rest.
    blob = mmap.mmap(-1, 1 << 30)                       # zero pages: no memory is used
    with mock_env(BIGMACHINE_MAX_MESSAGE=str(64 << 20)):
        began = time.monotonic()
        interrupt_when(lambda: time.monotonic() - began > 0.3)
        with pytest.raises(KeyboardInterrupt):
            m.call("Victim.size", pickle.PickleBuffer(blob))
        assert time.monotonic() - began < within(2.5)                # long before the send could end
    with contextlib.suppress(BufferError):          # a traceback may still hold a view
        blob.close()
    assert all(conn.sock.fileno() >= 0 for conn in m._peer._idle)
    assert [m.call("Victim.echo", ("after", i)) for i in range(20)] == [
        ("after", i) for i in range(20)]
    futures = [m.call_async("Victim.echo", i) for i in range(20)]
    assert [f.result(10) for f in futures] == list(range(20))


# --------------------------------------------------------------------------------------
# Bad input: each a clear error naming what was wrong; the cluster keeps serving
# --------------------------------------------------------------------------------------

def _write_module(directory, name, source):
    directory.mkdir(exist_ok=True)
    (directory / (name + ".py")).write_text(textwrap.dedent(source))
    return str(directory)


def test_bad_input_is_named_and_the_machine_keeps_serving(lb, tmp_path):
    m, = running(lb, 1, {"Victim": Victim(), "Echo": Echo()})
    pid = m.call("Victim.pid")
    tried = []

    def bad(error, pattern, method, *args, **kwargs):
        with pytest.raises(error, match=pattern) as info:
            m.call(method, *args, **kwargs)
        tried.append(method)
        assert m.call("Victim.echo", len(tried)) == len(tried)    # still serving
        return info.value

    bad(bigmachine.NotFound, r"no service 'Nope' on https://.*\(it has: Echo, Supervisor, "
        r"Victim\)", "Nope.echo", 1)
    bad(bigmachine.NotFound, r"service 'Victim' .* no public method 'nosuch' \(it has: .*echo",
        "Victim.nosuch")
    bad(bigmachine.NotFound, "no public method '_private'", "Echo._private")
    bad(bigmachine.NotFound, "no public method '__init__'", "Echo.__init__")
    bad(bigmachine.NotFound, "no public method ''", "Echo")
    bad(bigmachine.NotFound, "no public method 'tag'", "Echo.tag")           # not a method
    e = bad(TypeError, r"echo\(\) missing 1 required positional argument: 'x'", "Victim.echo")
    assert "Remote traceback" in str(e.__cause__)
    bad(TypeError, r"echo\(\) got an unexpected keyword argument 'y'", "Victim.echo", 1, y=2)
    bad(bigmachine.SerializationError,
        r"cannot pickle the arguments of Victim.echo: args\[0\]\['x'\]\[1\] is _thread.lock",
        "Victim.echo", {"x": [1, threading.Lock()]})
    bad(bigmachine.SerializationError,
        r"cannot pickle the arguments of Victim.echo: kwargs\['x'\]\.client\._sock is "
        r"socket.socket", "Victim.echo", x=Unpicklable())
    bad(bigmachine.SerializationError,
        r"the result of Echo.unpicklable_result: result\['lock'\] is _thread.lock",
        "Echo.unpicklable_result")
    # An exception that cannot be pickled still tells its type, message and traceback.
    e = bad(bigmachine.RemoteError, "LockedError: the lock stays here", "Victim.raise_locked",
            "the lock stays here")
    assert e.type_name == "test_bigmachine.LockedError" and e.message == "the lock stays here"
    assert "in raise_locked" in e.traceback and "Remote traceback" in str(e)

    # Classes the other side cannot import: say what to do.
    class DefinedInATest:
        pass
    bad(bigmachine.SerializationError, r"args\[0\] is test_bigmachine\..*<locals>\."
        r"DefinedInATest.*define it at the top level of a module", "Victim.echo",
        DefinedInATest())
    bad(bigmachine.SerializationError, r"args\[0\] is function.*<lambda>.*top level of a module",
        "Victim.echo", lambda: 1)
    bad(bigmachine.SerializationError, r"the result of Victim.local_class.*<locals>.*top level",
        "Victim.local_class")
    # A module only the driver has (its directory is not on the machines' path).
    sys.modules.pop("driver_only_module", None)
    directory = _write_module(tmp_path / "driver", "driver_only_module", """
        class Thing:
            pass
    """)
    sys.path.insert(0, directory)
    try:
        import driver_only_module
    finally:
        sys.path.remove(directory)
    bad(bigmachine.SerializationError, r"cannot unpickle the arguments of Victim.echo: "
        r".*No module named 'driver_only_module'.*every machine can import",
        "Victim.echo", driver_only_module.Thing())
    # A module only the machine has.
    directory = _write_module(tmp_path / "machine", "machine_only_module", """
        class Thing:
            pass
    """)
    bad(bigmachine.SerializationError, r"cannot unpickle the result of Victim.machine_only from "
        r"https://.*No module named 'machine_only_module'", "Victim.machine_only", directory)

    # Services of such a class: the machine stops, saying why; the session goes on.
    sys.path.insert(0, str(tmp_path / "driver"))
    try:
        services = {"Thing": driver_only_module.Thing()}
    finally:
        sys.path.remove(str(tmp_path / "driver"))
    bad_machine, = lb.start(1, services)
    assert bad_machine.wait(RUNNING, timeout=60) is STOPPED
    assert isinstance(bad_machine.err, bigmachine.SerializationError)
    assert "No module named 'driver_only_module'" in str(bad_machine.err)
    # Services whose init raises, on a real machine: stopped fast, with that very error.
    failing, = lb.start(1, {"Bad": InitFails()})
    assert failing.wait(RUNNING, timeout=60) is STOPPED
    assert isinstance(failing.err, CustomError) and failing.err.code == 3
    # Bad arguments to start, before anything is launched.
    for args, error, pattern in (
            ((0, {"Victim": Victim()}), ValueError, "positive integer, not 0"),
            ((-1, {"Victim": Victim()}), ValueError, "not -1"),
            ((1.5, {"Victim": Victim()}), ValueError, "not 1.5"),
            ((True, {"Victim": Victim()}), ValueError, "not True"),
            ((1, [Victim()]), ValueError, "mapping of names to service objects"),
            ((1, Victim()), ValueError, "mapping of names to service objects"),
            ((1, {}), ValueError, "non-empty mapping"),
            ((1, {3: Victim()}), ValueError, "service names .* not 3"),
            ((1, {"": Victim()}), ValueError, "service names .* not ''"),
            ((1, {"_x": Victim()}), ValueError, "not '_x'"),
            ((1, {"Lambda": lambda: 1}), ValueError,
             r"'Lambda' is a function .*make the function a method of a class"),
            ((1, {"Unpicklable": Unpicklable()}), bigmachine.SerializationError,
             r"services\['Unpicklable'\]\.client\._sock is socket\.socket"),
    ):
        with pytest.raises(error, match=pattern):
            lb.start(*args)
        tried.append("start%r" % (args,))
    with pytest.raises(ValueError, match="env must map names to strings"):
        lb.start(1, {"Victim": Victim()}, env={"N": 1})
    assert m.call("Victim.pid") == pid                       # the same process all along
    print("bad inputs tried: %d" % len(tried))
    assert len(tried) == 29


def test_bad_input_calls_after_shutdown():
    b = bigmachine.start(bigmachine.TestSystem(**FAST))
    m, = running(b, 1, {"Victim": Victim()})
    b.shutdown()
    for call in (lambda: m.call("Victim.echo", 1),
                 lambda: m.call_async("Victim.echo", 1).result(5),
                 lambda: m.retry_call("Victim.echo", 1),
                 lambda: m.options(timeout=1).call("Victim.echo", 1)):
        with pytest.raises(bigmachine.MachineStopped, match="shut down"):
            call()
    with pytest.raises(bigmachine.Error, match="shut down"):
        b.start(1, {"Victim": Victim()})
    with pytest.raises(bigmachine.Error, match="shut down"):
        b.dial("https://127.0.0.1:1/")
    assert b.machines() == []


@pytest.mark.slow
def test_bad_input_two_gibibyte_argument():
    """2 GiB in one argument: a machine that can hold it takes it. A message larger than a
    process accepts (BIGMACHINE_MAX_MESSAGE, or half its memory available) is refused clearly
    before any of it is allocated, on a machine or on the driver, and the cluster keeps serving.
    The arguments are views of untouched zero pages: the driver spends no memory on them."""
    blob = mmap.mmap(-1, 2 << 30)
    try:
        # A lease long enough for the seconds a 2 GiB allocation holds the machine's GIL.
        system = bigmachine.Local(keepalive_period=1.0, keepalive_timeout=60.0, lease=120.0)
        with bigmachine.start(system) as b:
            big, small = running(b, 1, {"Victim": Victim()}) + running(
                b, 1, {"Victim": Victim()}, env={"BIGMACHINE_MAX_MESSAGE": str(16 << 20)})
            began = time.monotonic()
            assert big.call("Victim.size", pickle.PickleBuffer(blob)) == 2 << 30
            took = time.monotonic() - began
            assert big.call("Victim.echo", 1) == 1
            with pytest.raises(bigmachine.SerializationError,
                               match=r"the arguments of Victim.size are 64\.0 MiB, more than "
                                     r"https://.* accepts \(16\.0 MiB, set by "
                                     r"BIGMACHINE_MAX_MESSAGE\); send large data as a stream"):
                small.call("Victim.size", pickle.PickleBuffer(memoryview(blob)[:64 << 20]))
            assert small.call("Victim.echo", "still here") == "still here"
            assert small.call("Victim.size", bytearray(15 << 20)) == 15 << 20
            # A result too large for the driver is refused the same way, on the driver.
            with mock_env(BIGMACHINE_MAX_MESSAGE=str(16 << 20)):
                with pytest.raises(bigmachine.SerializationError,
                                   match=r"the result of Victim.echo from https://.* is "
                                         r"20\.0 MiB, more than this process accepts"):
                    big.call("Victim.echo", bytearray(20 << 20))
            assert big.call("Victim.echo", "and still") == "and still"
            assert small.call("Victim.resources")["rss"] < 200 << 20
    finally:
        with contextlib.suppress(BufferError):          # a traceback may still hold a view
            blob.close()
    print("a 2 GiB argument took %.1fs" % took)


@contextlib.contextmanager
def mock_env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------------------
# Attacks, each from a process of its own over real sockets
# --------------------------------------------------------------------------------------

# The attacker: a plain Python program that knows the wire format but holds no certificate of
# the session (or a bad one). Its payload creates a file when it is unpickled.
ATTACKER = r"""
import json, os, pickle, socket, ssl, struct, sys, time

host, port, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
attacks = json.loads(sys.argv[4])

class Bomb:
    def __reduce__(self):
        return (open, (marker, "w"))

bomb = pickle.dumps(((Bomb(),), {}, None), 5)
frame = struct.pack("!BBHIQQ", 1, 0, 0, 11, 1, len(bomb)) + b"Victim.echo" + bomb
upgrade = (b"GET /bigrpc HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: bigrpc/1\r\n"
           b"Bigmachine-Python: %d.%d\r\nBigmachine-Protocol: 2\r\n\r\n" % sys.version_info[:2])
post = (b"POST /bigrpc/Victim.echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        % len(bomb) + bomb)
requests = {"upgrade": upgrade + frame, "post": post}

def answer(sock):
    sock.settimeout(5)
    try:
        data = sock.recv(100)
    except (ssl.SSLError, ConnectionError) as e:
        return "refused: %s" % e
    except socket.timeout:
        return "no answer in 5s"
    if not data:
        return "closed"
    if data[:1] == b"\x15":
        return "refused: a TLS alert"
    return "answered: %r" % data[:80]

results = []
for attack in attacks:
    began = time.monotonic()
    raw = socket.create_connection((host, port), timeout=5)
    try:
        if attack["how"] == "plain":
            raw.sendall(requests[attack["request"]])
            result = answer(raw)
        elif attack["how"] == "half a record":   # a TLS record header, then too few bytes
            raw.sendall(bytes([0x16, 0x03, 0x01, 0x40, 0x00]) + os.urandom(100))
            result = answer(raw)
        elif attack["how"] == "random":
            junk = bytearray(os.urandom(4096))
            junk[0] = 0x17 if junk[0] == 0x16 else junk[0]    # not the obvious handshake
            raw.sendall(junk)
            result = answer(raw)
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            if attack.get("cert"):
                context.load_cert_chain(attack["cert"])
            try:
                tls = context.wrap_socket(raw)
                tls.sendall(requests[attack["request"]])
                result = answer(tls)
            except (ssl.SSLError, ConnectionError) as e:
                result = "refused: %s" % e
    finally:
        raw.close()
    results.append({"attack": attack["name"], "result": result,
                    "seconds": time.monotonic() - began})
print(json.dumps(results))
"""


def _pem_file(directory, name, credentials):
    path = directory / (name + ".pem")
    path.write_text(credentials.cert_pem + credentials.key_pem)
    return str(path)


def test_attacks_are_refused_and_nothing_is_unpickled(lb, tmp_path):
    # Bytes that could start a TLS record (random ones may) are held until the handshake
    # deadline, which is short here so that every attack ends before the attacker gives up.
    m, = running(lb, 1, {"Victim": Victim()}, env={"BIGMACHINE_HANDSHAKE_TIMEOUT": "2"})
    pid = m.call("Victim.pid")
    host, port, _ = bigmachine._parse_addr(m.addr)
    marker = tmp_path / "unpickled"
    now = datetime.datetime.now(UTC)
    authority = lb._authority
    certificates = {
        "no certificate": None,
        "another CA's certificate": _pem_file(
            tmp_path, "stranger", bigmachine.CertificateAuthority().issue("stranger")),
        "an expired certificate of the session": _pem_file(tmp_path, "expired", authority.issue(
            "expired", not_before=now - datetime.timedelta(days=2),
            not_after=now - datetime.timedelta(days=1))),
        "a server-only certificate of the session": _pem_file(
            tmp_path, "server-only", authority.issue("server only", client=False)),
    }
    attacks = []
    for request in ("upgrade", "post"):
        for name, cert in certificates.items():
            attacks.append({"name": "%s, %s" % (name, request), "how": "tls", "cert": cert,
                            "request": request})
        attacks.append({"name": "plain text, %s" % request, "how": "plain", "request": request})
    attacks += [{"name": "random bytes %d" % i, "how": "random"} for i in range(4)]
    attacks.append({"name": "half a TLS record", "how": "half a record"})
    steady = _Steady(m)
    result = subprocess.run([sys.executable, "-c", ATTACKER, host, str(port), str(marker),
                             json.dumps(attacks)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout)
    ok, failures = steady.stop()
    assert len(outcomes) == len(attacks) == 15
    for outcome in outcomes:
        assert outcome["result"] == "closed" or outcome["result"].startswith("refused"), outcome
        assert outcome["seconds"] < within(4), outcome                 # by the deadline at the latest
    assert not marker.exists()                                 # nothing was unpickled
    assert failures == [] and ok > 10                          # the real client was served
    assert m.call("Victim.pid") == pid


IMPOSTOR = r"""
import json, socket, ssl, sys, threading
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1])
context.verify_mode = ssl.CERT_NONE
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
seen = {"connections": 0, "handshakes": 0, "bytes": 0}

def serve():
    while True:
        raw, _ = listener.accept()
        seen["connections"] += 1
        raw.settimeout(5)
        try:
            with context.wrap_socket(raw, server_side=True) as tls:
                seen["handshakes"] += 1
                while True:
                    data = tls.recv(65536)
                    if not data:
                        break
                    seen["bytes"] += len(data)
        except (OSError, ssl.SSLError):
            pass

threading.Thread(target=serve, daemon=True).start()
sys.stdin.read()
print(json.dumps(seen), flush=True)
"""


def test_attack_impostor_machines_are_refused_by_the_driver(lb, tmp_path):
    """A server in another process that poses as a machine of the session: the driver refuses
    it during the handshake and sends it nothing."""
    now = datetime.datetime.now(UTC)
    authority = lb._authority
    impostors = {
        "another CA": (bigmachine.CertificateAuthority().issue("impostor"),
                       "unable to get local issuer certificate"),
        "a client-only certificate of the session": (
            authority.issue("client only", server=False), "unsuitable certificate purpose"),
        "an expired certificate of the session": (authority.issue(
            "expired", not_before=now - datetime.timedelta(days=2),
            not_after=now - datetime.timedelta(days=1)), "certificate has expired"),
    }
    for name, (credentials, reason) in impostors.items():
        server = subprocess.Popen(
            [sys.executable, "-c", IMPOSTOR, _pem_file(tmp_path, "impostor", credentials)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            addr = "https://127.0.0.1:%s/" % server.stdout.readline().strip()
            dialed = lb.dial(addr)
            assert dialed.wait(RUNNING, timeout=10) is STOPPED, name
            assert isinstance(dialed.err, bigmachine.AuthenticationError), (name, dialed.err)
            assert reason in str(dialed.err), (name, dialed.err)
            client = bigmachine._Client(lb._credentials)
            try:
                with pytest.raises(bigmachine.AuthenticationError, match=reason):
                    client.peer(addr).call("Victim.echo", ("secret",), {}, time.monotonic() + 10)
            finally:
                client.close()
            out, _ = server.communicate("", timeout=10)
        finally:
            server.kill()
            server.wait()
        seen = json.loads(out)
        assert seen["connections"] >= 2 and seen["handshakes"] == 0 and seen["bytes"] == 0, (
            name, seen)


SLOWLORIS = r"""
import json, select, socket, ssl, sys, time
host, port, cert = sys.argv[1], int(sys.argv[2]), sys.argv[3]
raw_count, tls_count, trickle_count = map(int, sys.argv[4:7])
opened = {}
began = time.monotonic()
for i in range(raw_count):                 # TCP connections that never start TLS
    opened[socket.create_connection((host, port), timeout=10)] = ("raw", time.monotonic())
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
context.load_cert_chain(cert)
for i in range(tls_count):                 # TLS done, then not a byte of the HTTP request
    tls = context.wrap_socket(socket.create_connection((host, port), timeout=10))
    opened[tls] = ("tls", time.monotonic())
hello = bytes([0x16, 0x03, 0x01, 0x02, 0x00]) + b"\x01" * 64
trickles = []
for i in range(trickle_count):             # a ClientHello, one byte at a time
    s = socket.create_connection((host, port), timeout=10)
    opened[s] = ("trickle", time.monotonic())
    trickles.append(s)
print("opened %d" % len(opened), flush=True)
closed = []
sent = 0
deadline = time.monotonic() + float(sys.argv[7])
while opened and time.monotonic() < deadline:
    if sent < len(hello):
        for s in trickles:
            if s in opened:
                try:
                    s.send(hello[sent:sent + 1])
                except OSError:
                    pass
        sent += 1
    readable, _, _ = select.select(list(opened), [], [], 0.1)
    for s in readable:
        try:
            data = s.recv(4096) if not isinstance(s, ssl.SSLSocket) else s.recv(4096)
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            kind, t = opened.pop(s)
            closed.append((kind, time.monotonic() - t))
            s.close()
print(json.dumps({"closed": closed, "open": [k for k, _ in opened.values()]}), flush=True)
"""


def test_attack_slowloris_connections_do_not_exhaust_the_machine(lb, tmp_path):
    """300 TCP connections that never start TLS, 30 that finish TLS but never send a request,
    and 10 that trickle a handshake: the machine keeps serving new and old clients, closes
    every one of them after its handshake timeout, and its threads and files come back."""
    timeout = 1.5
    m, = running(lb, 1, {"Victim": Victim()},
                 env={"BIGMACHINE_HANDSHAKE_TIMEOUT": str(timeout)})
    host, port, _ = bigmachine._parse_addr(m.addr)
    baseline = m.call("Victim.resources")
    cert = _pem_file(tmp_path, "insider", lb._authority.issue("insider", server=False))
    attacker = subprocess.Popen(
        [sys.executable, "-c", SLOWLORIS, host, str(port), cert, "300", "30", "10", "20"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert attacker.stdout.readline().strip() == "opened 340"
        during = m.call("Victim.resources")
        assert during["fds"] > baseline["fds"] + 250             # they are really held open
        # Meanwhile clients are served: the pooled connection, and new ones.
        for i in range(10):
            t = time.monotonic()
            client = bigmachine._Client(lb._credentials)
            try:
                assert client.peer(m.addr).call("Victim.echo", (i,), {}, t + 5) == i
            finally:
                client.close()
            assert m.call("Victim.echo", i) == i
            assert time.monotonic() - t < within(1.0)
        report = json.loads(attacker.stdout.readline())
    finally:
        attacker.kill()
        attacker.wait()
    assert report["open"] == []
    kinds = collections.Counter(kind for kind, _ in report["closed"])
    assert kinds == {"raw": 300, "tls": 30, "trickle": 10}
    assert max(seconds for _, seconds in report["closed"]) < within(timeout + 2.5), report
    eventually(lambda: m.call("Victim.resources")["threads"] <= baseline["threads"] + 2 and
               m.call("Victim.resources")["fds"] <= baseline["fds"] + 2, timeout=10,
               what="the machine's threads and files to come back")
    assert m.call("Victim.echo", "done") == "done"


def test_attack_no_thread_for_a_connection_refuses_that_one_only(tb, monkeypatch):
    """When no thread can be started for a new connection (too many threads), that one
    connection is refused; the server goes on accepting the next ones."""
    m, = running(tb, 1, {"Victim": Victim()})
    real_start = threading.Thread.start
    failures = [5]

    def start(thread):
        if thread.name == "bigmachine-conn" and failures[0]:
            failures[0] -= 1
            raise RuntimeError("can't start new thread")
        return real_start(thread)
    monkeypatch.setattr(threading.Thread, "start", start)
    outcomes = []
    for i in range(10):
        client = bigmachine._Client(tb._credentials)
        try:
            outcomes.append(client.peer(m.addr).call("Victim.echo", (i,), {},
                                                      time.monotonic() + 5))
        except bigmachine.NetworkError:
            outcomes.append("refused")
        finally:
            client.close()
    assert outcomes == ["refused"] * 5 + list(range(5, 10))
    assert m.call("Victim.echo", "pooled") == "pooled"


# --------------------------------------------------------------------------------------
# Fuzz: malformed frames and requests on an authenticated connection
# --------------------------------------------------------------------------------------

def _frame(kind, flags, meta, call_id, body, buffers, lie):
    """A frame, its header telling the truth about its lengths unless lie says otherwise."""
    fields = {"nbuffers": len(buffers), "meta": len(meta), "body": len(body)}
    if lie is not None:
        field, value = lie
        fields[field] = value % (1 << {"nbuffers": 16, "meta": 32, "body": 64}[field])
    header = bigmachine._HEADER.pack(kind, flags, fields["nbuffers"], fields["meta"], call_id,
                                     fields["body"])
    lengths = b"".join(bigmachine._LENGTH.pack(len(b)) for b in buffers)
    return header + meta + lengths + body + b"".join(buffers)


def _pickled(obj):
    return pickle.dumps(obj, 5)


def _fuzz_strategies():
    from hypothesis import strategies as st
    small = st.one_of(st.none(), st.integers(-2, 2**70), st.text(max_size=4), st.binary(max_size=8),
                      st.floats(allow_nan=True, allow_infinity=True))
    arguments = st.one_of(
        st.binary(max_size=48),                                  # not a pickle at all
        st.builds(lambda a, k, t: _pickled((a, k, t)),           # the right shape, odd parts
                  st.one_of(st.lists(small, max_size=3).map(tuple), small),
                  st.one_of(st.dictionaries(st.text(max_size=3), small, max_size=2), small),
                  small),
        st.builds(_pickled, small),                              # the wrong shape
        st.builds(lambda a, n: _pickled(((a,), {}, None))[:n],  # a pickle cut short
                  small, st.integers(0, 30)),
    )
    methods = st.one_of(
        st.sampled_from([b"Victim.echo", b"Supervisor.ping", b"Nope.echo", b"Victim._private",
                         b"Victim.init", b"Victim", b"", b".", b"Victim.echo.echo",
                         b"\xff\xfe\x00"]),
        st.binary(max_size=12))
    kinds = st.one_of(st.sampled_from(range(1, 8)), st.integers(0, 255))
    frames = st.builds(
        _frame, kinds, st.one_of(st.sampled_from([0, 1]), st.integers(0, 255)), methods,
        st.integers(0, 2**64 - 1), arguments, st.lists(st.binary(max_size=16), max_size=2),
        st.one_of(st.none(), st.none(), st.tuples(
            st.sampled_from(["nbuffers", "meta", "body"]),
            st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1)))))
    calls = st.builds(                                           # good calls, among the bad
        lambda method, args, timeout, call_id: _frame(bigmachine.CALL, 0, method, call_id,
                                                      _pickled((args, {}, timeout)), [], None),
        st.sampled_from([b"Victim.echo", b"Supervisor.ping"]), st.tuples(small),
        st.one_of(st.none(), st.floats(0.5, 60), small), st.integers(0, 2**64 - 1))
    batches = st.builds(                                         # batches, good and bad
        lambda budget, members, call_id: _frame(bigmachine.CALL, bigmachine._BATCH, b"",
                                                call_id, _pickled((budget, members)), [], None),
        st.one_of(st.floats(0, 1), small),
        st.one_of(st.lists(st.tuples(
            st.integers(0, 2**64 - 1),
            st.sampled_from(["Victim.echo", "Nope.echo", "Victim._private", "Victim.init"]),
            arguments), max_size=4), small, st.lists(small, max_size=2)),
        st.integers(0, 2**64 - 1))
    upgrade = (b"GET /bigrpc HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: bigrpc/1\r\n"
               b"Bigmachine-Python: %s\r\nBigmachine-Protocol: %d\r\n\r\n"
               % (bigmachine.PYTHON.encode(), bigmachine.PROTOCOL))
    lengths = st.one_of(st.sampled_from([b"-1", b"-99999", b"abc", b"", b"1e3", b"0x10",
                                         b"99999999999999999999"]),
                        st.integers(0, 2**64).map(lambda n: str(n).encode()))
    posts = st.builds(
        lambda method, length, body: b"POST /bigrpc/" + method.replace(b"\r", b"").replace(
            b"\n", b"").replace(b" ", b"") + b" HTTP/1.1\r\nContent-Length: " + length +
        b"\r\n\r\n" + body, methods, lengths, arguments)
    requests = st.one_of(
        posts,
        st.binary(max_size=200),                                 # not HTTP
        st.builds(lambda line, headers: line + b"\r\n" + b"".join(
            h + b"\r\n" for h in headers) + b"\r\n",
            st.sampled_from([b"GET /bigrpc HTTP/1.1", b"GET / HTTP/1.1", b"PUT /bigrpc HTTP/1.1",
                             b"GET /bigrpc HTTP/9.9", b"GET /bigrpc", b"BREW /bigrpc HTTP/1.1"]),
            st.lists(st.one_of(st.sampled_from([b"Upgrade: bigrpc/1", b"Upgrade: bigrpc/2",
                                                b"Connection: Upgrade", b"Bigmachine-Python: 3",
                                                b"Bigmachine-Protocol: x",
                                                b"Content-Length: -5", b"X: " + b"y" * 70000]),
                               st.binary(max_size=30)), max_size=5)),
    )
    return st.one_of(st.tuples(st.just(upgrade), st.lists(calls | frames | batches, min_size=1,
                                                          max_size=4)),
                     st.tuples(requests, st.just([])))


def _read_frames(rfile, answers):
    """Count what the server said after an upgrade: frames of a reply or an error only, then
    the end of the connection. (The fuzzer ends its side without a TLS close_notify, to which
    OpenSSL 3 answers with an alert: that is the end of the connection too.)"""
    while True:
        try:
            kind, flags, nbuffers, meta, call_id, body_len = bigmachine._read_header(rfile)
        except (EOFError, OSError):
            answers["closed"] += 1
            return
        assert kind in (bigmachine.REPLY, bigmachine.ERROR), kind
        bigmachine._read_body(rfile, nbuffers, body_len)
        answers["reply" if kind == bigmachine.REPLY else "error"] += 1


def test_fuzz_call_timeouts_are_checked(tb, capfd):
    """A call's timeout comes from the caller: one that is not a usable number of seconds is
    answered with an error naming it, not a traceback in a timer thread."""
    m, = running(tb, 1, {"Victim": Victim()})
    conn = m._peer.checkout(None)
    try:
        for i, timeout in enumerate([float("inf"), float("nan"), 1e300, 10**30, -5, "soon"]):
            bigmachine._send_frame(conn.sock, bigmachine.CALL, 7 + i, b"Victim.echo",
                                   _pickled(((i,), {}, timeout)))
            kind, _, nbuffers, _, call_id, body_len = bigmachine._read_header(conn.rfile)
            body, _ = bigmachine._read_body(conn.rfile, nbuffers, body_len)
            assert (kind, call_id) == (bigmachine.ERROR, 7 + i)
            with pytest.raises(ValueError, match="timeout is a number of seconds, not %s"
                               % re.escape(repr(timeout))):
                raise bigmachine._rebuild_error(body)
        bigmachine._send_frame(conn.sock, bigmachine.CALL, 99, b"Victim.echo",
                               _pickled((("fine",), {}, 5.0)))
        kind, _, nbuffers, _, call_id, body_len = bigmachine._read_header(conn.rfile)
        body, buffers = bigmachine._read_body(conn.rfile, nbuffers, body_len)
        assert (kind, call_id, pickle.loads(body, buffers=buffers)) == (bigmachine.REPLY, 99,
                                                                        "fine")
    finally:
        m._peer.discard(conn)
    time.sleep(0.2)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err


def test_fuzz_authenticated_connection(capfd):
    """Malformed frames and requests over an authenticated connection: the machine answers
    with an error or closes that connection, never crashes, never leaks a thread or a file,
    never prints a traceback, and serves its clients all along."""
    from hypothesis import HealthCheck, given, settings
    system = bigmachine.Local(keepalive_period=1.0, keepalive_timeout=30.0, lease=60.0)
    examples = int(os.environ.get("BIGMACHINE_FUZZ_EXAMPLES", "300"))
    with bigmachine.start(system) as b:
        m, = running(b, 1, {"Victim": Victim()},
                     env={"BIGMACHINE_MAX_MESSAGE": str(4 << 20),
                          "BIGMACHINE_HANDSHAKE_TIMEOUT": "2"})
        pid = m.call("Victim.pid")
        baseline = m.call("Victim.resources")
        host, port, _ = bigmachine._parse_addr(m.addr)
        context = bigmachine.client_context(b._authority.issue("fuzzer", server=False))
        answers = collections.Counter()

        @settings(max_examples=examples, deadline=None, database=None,
                  derandomize=os.environ.get("BIGMACHINE_FUZZ_RANDOM") is None,
                  suppress_health_check=list(HealthCheck))
        @given(_fuzz_strategies())
        def attack(case):
            request, frames = case
            with socket.create_connection((host, port), timeout=10) as raw:
                with context.wrap_socket(raw) as tls:
                    with contextlib.suppress(OSError):
                        tls.sendall(request + b"".join(frames))
                    # Done sending: half-close underneath TLS, so the server reads an end.
                    half = socket.socket(fileno=os.dup(tls.fileno()))
                    with contextlib.suppress(OSError):
                        half.shutdown(socket.SHUT_WR)
                    half.close()
                    rfile = tls.makefile("rb")
                    try:
                        first = rfile.readline(65537)
                    except OSError:
                        first = b""
                    if not first:
                        answers["closed"] += 1
                        return
                    assert first.startswith(b"HTTP/1.1 "), first
                    status = int(first.split()[1])
                    answers[status] += 1
                    with contextlib.suppress(OSError):
                        while rfile.readline(65537) not in (b"\r\n", b""):
                            pass
                        if status != 101:
                            rfile.read()
                            return
                    _read_frames(rfile, answers)

        attack()
        assert m.call("Victim.pid") == pid                     # the same process: no crash
        assert m.call("Victim.echo", "served") == "served"
        eventually(lambda: m.call("Victim.resources")["threads"] <= baseline["threads"] + 2 and
                   m.call("Victim.resources")["fds"] <= baseline["fds"] + 2, timeout=10,
                   what="threads and files back to their baseline")
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err[-3000:]
    print("fuzz: %d examples; answers: %s" % (examples, dict(answers)))
    assert answers["error"] and answers["reply"] and answers["closed"]


# --------------------------------------------------------------------------------------
# Load and soak
# --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_load_64_threads_by_1000_calls_nothing_lost_or_duplicated():
    """64 threads make 1,000 calls each across 2 machines: small and 1 MiB arguments, one
    call in 13 raising. Every result is right, every error is the right one, and each machine
    saw each call exactly once."""
    threads_n, calls_n = 64, 1000
    system = bigmachine.Local(keepalive_period=1.0, keepalive_timeout=30.0,
                              keepalive_rpc_timeout=5.0, lease=60.0)
    with bigmachine.start(system) as b:
        machines = running(b, 2, {"Victim": Victim()})
        wrong = []
        counts = collections.Counter()

        def worker(k):
            big = os.urandom(1 << 20)
            digest = hashlib.sha256(big).digest()
            for i in range(calls_n):
                token = (k, i)
                m = machines[(k + i) % 2]
                payload = big if i % 50 == 0 else b"%d" % i
                fail = i % 13 == 0
                try:
                    result = m.call("Victim.work", token, payload, fail)
                except CustomError as e:
                    if not fail or (e.code, e.text) != (i, "token %r" % (token,)):
                        wrong.append((token, e))
                    counts["raised"] += 1
                except BaseException as e:
                    wrong.append((token, e))
                else:
                    expected = (token, digest if payload is big else payload)
                    if fail or result != expected:
                        wrong.append((token, result))
                    counts["big" if payload is big else "small"] += 1

        began = time.monotonic()
        workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads_n)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(120)
        took = time.monotonic() - began
        assert not any(t.is_alive() for t in workers)
        assert wrong == []
        assert sum(counts.values()) == threads_n * calls_n
        seen = collections.Counter()
        for m in machines:
            for token, n in m.call("Victim.seen_tokens").items():
                seen[tuple(token)] += n
        expected = {(k, i) for k in range(threads_n) for i in range(calls_n)}
        assert set(seen) == expected                            # nothing lost
        assert set(seen.values()) == {1}                        # nothing duplicated
        assert all(m.state is RUNNING for m in machines)
    print("load: %d calls (%s) in %.1fs, %.0f calls/s" % (
        threads_n * calls_n, dict(counts), took, threads_n * calls_n / took))
    assert took < within(60)


def _driver_resources():
    """The driver's threads (not counting idle pool threads), open files and memory."""
    found = _resources()
    found["traced"] = tracemalloc.get_traced_memory()[0]
    return found


def _soak_round(kind, tmp_path, rnd):
    cls = bigmachine.TestSystem if kind == "test" else bigmachine.Local
    with bigmachine.start(cls(**FAST)) as b:
        m1, m2 = running(b, 2, {"Victim": Victim()})
        futures = [m.call_async("Victim.echo", (rnd, i)) for i in range(100) for m in (m1, m2)]
        assert [f.result(30) for f in futures] == [(rnd, i) for i in range(100) for _ in "ab"]
        with pytest.raises(bigmachine.Timeout):
            m1.options(timeout=0.05).call("Victim.hang", 0.2, rnd)
        doomed = m1.call_async("Victim.hold", str(tmp_path / ("hold%d" % rnd)))
        eventually(lambda: os.path.exists(str(tmp_path / ("hold%d.started" % rnd))))
        if rnd % 3 == 0:
            doomed.cancel()
        with m2.call("Victim.chunks", 20, 1 << 16) as f:
            assert len(f.read()) == 20 << 16
        if kind == "local":
            os.kill(m1.call("Victim.pid"), signal.SIGKILL)
        else:
            b.system.kill(m1)
        assert m1.wait(STOPPED, timeout=10) is STOPPED
        # A killed test machine's calls fail as the network failed (see TestSystem.kill).
        with pytest.raises((bigmachine.MachineStopped, bigmachine.NetworkError,
                            concurrent.futures.CancelledError)):
            doomed.result(10)
        m3, = running(b, 1, {"Victim": Victim()})
        assert m3.call("Victim.echo", rnd) == rnd
        assert m2.call("Victim.size", bytearray(1 << 20)) == 1 << 20


@pytest.mark.slow
def test_soak_calls_starts_and_kills_leave_nothing_behind(tmp_path, monkeypatch):
    """Rounds of starts, calls, timeouts, cancels, streams and kills for
    BIGMACHINE_SOAK_SECONDS (15 by default): afterwards the driver's threads, open files and
    memory are back to where they were."""
    seconds = float(os.environ.get("BIGMACHINE_SOAK_SECONDS", "15"))
    monkeypatch.setattr(bigmachine._ThreadPool, "_IDLE", 0.5)   # idle workers leave quickly
    tracemalloc.start()
    try:
        _soak_round("test", tmp_path, 0)                        # warm up: imports, caches
        _soak_round("local", tmp_path, 1)
        gc.collect()
        time.sleep(1.0)
        baseline = _driver_resources()
        began, rounds = time.monotonic(), 2
        while time.monotonic() - began < seconds:
            _soak_round(("test", "local")[rounds % 2], tmp_path, rounds)
            rounds += 1
        took = time.monotonic() - began

        def settled():
            gc.collect()
            now = _driver_resources()
            return (now["threads"] <= baseline["threads"] and now["fds"] <= baseline["fds"]
                    and now["traced"] < baseline["traced"] + (1 << 20))
        eventually(settled, timeout=15, what="the driver's resources to come back")
        after = _driver_resources()
    finally:
        tracemalloc.stop()
    print("soak: %d rounds in %.0fs; before %s; after %s" % (rounds, took, baseline, after))
    assert after["rss"] < baseline["rss"] + (64 << 20)


# ======================================================================================
# Many tasks: call_async's queue, the Executor, worker processes, Pooled services
# ======================================================================================

LOCAL2 = dict(FAST, maxprocs=2)


def task_square(x):
    return x * x


def task_pid(_=None):
    return os.getpid()


def task_add(a, b, c=0):
    return a + b + c


def task_fail_counted(directory, x):
    """Raises its own error, leaving a mark for each run: such a task is never retried."""
    with open(os.path.join(directory, "run-%d-%d" % (x, os.getpid())), "w"):
        pass
    raise CustomError(x, "task %d failed" % x)


def task_marked_sleep(directory, x, seconds):
    with open(os.path.join(directory, "start-%d-%d" % (x, os.getpid())), "w"):
        pass
    time.sleep(seconds)
    return x * x


def task_rendezvous(directory, parties, tag):
    """Arrive, and wait until parties tasks have: finishes only if they run at once."""
    with open(os.path.join(directory, "%s-%d" % (tag, os.getpid())), "w"):
        pass
    deadline = time.monotonic() + 60
    while len(os.listdir(directory)) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError("only %d of %d tasks ran at once" % (len(os.listdir(directory)),
                                                                     parties))
        time.sleep(0.01)
    return os.getpid()


def task_spin_marked(path):
    with open(path, "w"):
        pass
    while True:
        pass


class Rendezvous:
    """A service whose calls wait for one another: queued calls must not deadlock them."""

    def __init__(self, parties):
        self.parties = parties

    def init(self, b):
        self.barrier = threading.Barrier(self.parties)
        self.ran = []

    def meet(self):
        return self.barrier.wait(30)

    def mark(self, key):
        self.ran.append(key)

    def marks(self):
        return list(self.ran)


class Replica:
    """A Pooled service: state per replica, init in each."""

    def init(self, b):
        self.pid = os.getpid()
        self.calls = 0
        self.has_b = b is not None

    def bump(self):
        self.calls += 1
        return self.pid, self.calls, self.has_b

    def meet(self, directory, parties, tag):
        return task_rendezvous(directory, parties, tag)


class BadReplica:
    def init(self, b):
        raise CustomError(7, "replica init failed")

    def hello(self):
        return "hello"


def _thread_peak(stop, peak):
    while not stop.is_set():
        peak[0] = max(peak[0], threading.active_count())
        time.sleep(0.001)


@contextlib.contextmanager
def _peak_threads():
    peak, stop = [threading.active_count()], threading.Event()
    sampler = threading.Thread(target=_thread_peak, args=(stop, peak), daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def _tcp_sockets(pid):
    """The TCP sockets (any state) that process pid holds open."""
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        with contextlib.suppress(OSError):
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/%d/net/tcp" % pid, "/proc/%d/net/tcp6" % pid):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    found.append((table, fields[1], fields[3]))
    return found


def _wait_gone(pids, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def test_call_async_queues_calls_not_threads(lb):
    m1, m2 = running(lb, 2)
    before = threading.active_count()
    with _peak_threads() as peak:
        futures = [(i, m.call_async("Echo.echo", i)) for i in range(600) for m in (m1, m2)]
        done = [f.result(60) == i for i, f in futures]
    assert all(done) and len(done) == 1200
    # 1,200 calls outstanding at once; a thread per call would have made hundreds.
    assert peak[0] - before <= 16, (before, peak[0])


def test_call_async_calls_that_wait_for_each_other_still_finish(tb):
    m, = running(tb, 1, {"R": Rendezvous(8)})
    futures = [m.call_async("R.meet") for _ in range(8)]    # more than the machine's lanes
    assert sorted(f.result(60) for f in futures) == list(range(8))


def test_call_async_cancel_drops_a_queued_call(tb):
    m, = running(tb, 1, {"R": Rendezvous(2), "Echo": Echo()})
    blockers = [m.call_async("Echo.sleep", 30) for _ in range(2)]    # both of its lanes
    eventually(lambda: m.call("Supervisor.status")["in_flight"] == 2)
    queued = m.call_async("R.mark", "queued")
    assert queued.cancel() and queued.cancelled()
    for f in blockers:                       # running: cancelled on the machine too
        assert f.cancel()
    eventually(lambda: m.call("Supervisor.status")["in_flight"] == 0)
    assert m.call_async("R.mark", "later").result(10) is None
    assert m.call("R.marks") == ["later"]


def test_call_async_calls_of_a_cancelled_machine_fail_with_machine_stopped(lb):
    m, = running(lb, 1)
    futures = [m.call_async("Echo.sleep", 60) for _ in range(5)]     # some run, some queue
    eventually(lambda: m.call("Supervisor.status")["in_flight"] >= 2)
    m.cancel()
    for f in futures:
        assert isinstance(f.exception(30), bigmachine.MachineStopped), f.exception()


_BATCH_MARKS = []        # what Batched.mark ran, in machines of this very process (TestSystem)


class Batched:
    """A service for batches of call_async: quick calls that say which call they were, and
    calls that wait for a go or hold a lane."""

    def init(self, b):
        self.go, self.holds_end = threading.Event(), threading.Event()
        self.ran = []

    def who(self, i):
        self.ran.append(i)
        return i, bigmachine.current_call().call_id

    def fail(self, i):
        raise CustomError(i, "call %d failed" % i)

    def unpicklable(self):
        return {"ok": 1, "lock": threading.Lock()}

    def lines(self, n):
        return iter([b"%d\n" % k for k in range(n)])

    def size(self, data):
        return len(data if isinstance(data, bytes) else data.read())

    def hold(self):
        return self.holds_end.wait(30)

    def end_holds(self):
        self.holds_end.set()

    def wait_go(self):
        deadline = time.monotonic() + 30
        while not self.go.wait(0.01):        # (short waits: a cancel's interrupt lands)
            if time.monotonic() > deadline:
                return False
        return True

    def go_now(self):
        self.go.set()

    def mark(self, key):
        _BATCH_MARKS.append(key)
        self.ran.append(key)

    def marks(self):
        return list(self.ran)

    def nap(self, key, seconds):
        time.sleep(seconds)
        self.ran.append(key)


def _queue_behind_holds(m, calls):
    """call_async each of calls ((method, args) pairs) while both of m's lanes are held, so
    that they queue up; then let the lanes go. The futures, in order."""
    holds = [m.call_async("S.hold") for _ in range(2)]
    eventually(lambda: m.call("Supervisor.status")["in_flight"] == 2)
    futures = [m.call_async(method, *args) for method, args in calls]
    m.call("S.end_holds")
    assert all(f.result(30) for f in holds)
    return futures


def test_call_async_batches_queued_calls_each_with_its_own_outcome(lb):
    m, = running(lb, 1, {"S": Batched()})
    for f in [m.call_async("S.who", -1) for _ in range(4)]:
        f.result(30)
    # As if the calls so far had been quick (a loaded host can make them look slow).
    m._queue.typical = 0.0005
    futures = []
    for i in range(300):
        kind = ("fail", "unpicklable", "stream")[i % 10 - 3] if i % 10 in (3, 4, 5) else "who"
        method, args = {"fail": ("S.fail", (i,)), "unpicklable": ("S.unpicklable", ()),
                        "stream": ("S.lines", (i % 4 + 1,)), "who": ("S.who", (i,))}[kind]
        futures.append((kind, i, m.call_async(method, *args)))
    ids = set()
    for kind, i, f in futures:
        if kind == "who":
            got, call_id = f.result(30)
            assert got == i
            ids.add(call_id)
        elif kind == "fail":
            with pytest.raises(CustomError, match="call %d failed" % i):
                f.result(30)
        elif kind == "unpicklable":
            with pytest.raises(bigmachine.SerializationError, match="lock"):
                f.result(30)
        else:
            with f.result(30) as lines:
                assert lines.read() == b"".join(b"%d\n" % k for k in range(i % 4 + 1))
    assert len(ids) == sum(kind == "who" for kind, _, _ in futures)   # an id each, for CANCEL
    status = m.call("Supervisor.status")
    assert status["batches"] > 0 and status["batched_calls"] > status["batches"], status
    assert status["waiting_in_batches"] == 0
    with pytest.raises(bigmachine.NotFound, match="no streamed result of call 12345"):
        m.call("Supervisor.take_stream", 12345)


def test_call_async_a_batch_whose_call_waits_for_a_later_one_hands_back_the_rest(lb,
                                                                                 monkeypatch):
    # Every queued call batched, as many to a batch as a lane's share of the queue.
    monkeypatch.setattr(bigmachine._CallQueue, "_BATCH_TIME", 60.0)
    m, = running(lb, 1, {"S": Batched()})
    waiting, *quick = _queue_behind_holds(m, [("S.wait_go", ())] + [("S.who", (i,))
                                                                    for i in range(5)])
    # The first batch is [wait_go, who 0, who 1]: wait_go runs long, so the batch hands who 0
    # and who 1 back, and they run while wait_go still waits for the go they lead to.
    assert [f.result(30)[0] for f in quick] == list(range(5))
    assert not waiting.done()
    m.call("S.go_now")
    assert waiting.result(30) is True
    assert sorted(m.call("S.marks")) == list(range(5))         # each ran once
    assert m.call("Supervisor.status")["batches"] > 0


def test_call_async_a_cancel_reaches_a_call_waiting_in_a_batch(tb, monkeypatch):
    monkeypatch.setattr(bigmachine._CallQueue, "_BATCH_TIME", 60.0)
    monkeypatch.setattr(bigmachine._Batch, "LONG", 60.0)      # no release: the calls wait
    m, = running(tb, 1, {"S": Batched()})
    futures = _queue_behind_holds(m, [("S.wait_go", ())] + [("S.mark", (k,)) for k in "abcdefg"])
    eventually(lambda: m.call("Supervisor.status")["waiting_in_batches"] >= 3)
    assert futures[2].running() and futures[2].cancel()                 # mark b, in the batch
    dispatcher = tb.system._live[m.addr][1].dispatcher                 # (in this process)
    eventually(lambda: any(batch.cancelled for batch in list(dispatcher._batched.values())),
               what="the cancel to reach the machine")
    addr = tb.serve_debug("127.0.0.1:0")
    status, _, page = get(addr, "/debug/bigmachine/status")
    assert status == 200 and re.search(rb"\d+ calls waiting in batches", page), page[-2000:]
    m.call("S.go_now")
    assert futures[0].result(30) is True
    assert [f.result(30) for f in futures[1:2] + futures[3:]] == [None] * 6
    assert futures[2].cancelled()
    assert sorted(m.call("S.marks")) == list("acdefg")


def _send_batch(m, batch_id, budget, members):
    """Send a batch by hand on a connection of m's and read its reply: (kind, id, body)."""
    conn = m._peer.checkout(None)
    try:
        bigmachine._send_frame(conn.writer, bigmachine.CALL, batch_id,
                               body=_pickled((budget, members)), flags=bigmachine._BATCH)
        kind, _, nbuffers, _, reply_id, body_len = bigmachine._read_header(conn.rfile)
        body, _ = bigmachine._read_body(conn.rfile, nbuffers, body_len)
    finally:
        m._peer.discard(conn)
    return kind, reply_id, body


def test_a_cancel_that_overtakes_its_batch_still_counts(tb):
    # A CANCEL travels on a connection of its own: it can reach the machine before the batch
    # that carries its call. Here it is sent first, on purpose, and the batch then by hand.
    m, = running(tb, 1, {"S": Batched()})
    dispatcher = tb.system._live[m.addr][1].dispatcher                 # (in this process)
    first, second, batch_id = [m._peer.client.next_call_id() for _ in range(3)]
    m._peer._send_cancel(second)
    eventually(lambda: second in dispatcher._early, what="the cancel to reach the machine")
    members = [(first, "S.mark", _pickled((("a",), {}, None))),
               (second, "S.mark", _pickled((("b",), {}, None)))]
    kind, reply_id, body = _send_batch(m, batch_id, 1.0, members)
    assert kind == bigmachine.REPLY and reply_id == batch_id
    outcomes, follows = pickle.loads(body)
    assert follows is None and outcomes[1][0] is False
    assert (outcomes[0][0], pickle.loads(outcomes[0][1])) == (True, None)   # (pickled at once)
    with pytest.raises(bigmachine.Cancelled, match="S.mark"):
        raise bigmachine._rebuild_error(outcomes[1][1])
    assert m.call("S.marks") == ["a"] and second not in dispatcher._early


def test_a_batch_past_its_budget_leaves_the_rest_unrun(tb):
    m, = running(tb, 1, {"S": Batched()})
    ids = [m._peer.client.next_call_id() for _ in range(5)]
    members = [(i, "S.nap", _pickled(((k, 0.1), {}, None))) for i, k in zip(ids, "abcd")]
    kind, reply_id, body = _send_batch(m, ids[4], 0.15, members)
    outcomes, follows = pickle.loads(body)
    # a starts at once and b at 0.1 s, within the budget; c would start at 0.2 s: not run.
    assert kind == bigmachine.REPLY and reply_id == ids[4] and follows is None
    assert [(ok, pickle.loads(value)) for ok, value in outcomes] == [(True, None), (True, None)]
    assert m.call("S.marks") == ["a", "b"]


def test_call_async_calls_waiting_in_a_batch_end_with_their_machine(tb, monkeypatch):
    monkeypatch.setattr(bigmachine._CallQueue, "_BATCH_TIME", 60.0)
    monkeypatch.setattr(bigmachine._Batch, "LONG", 60.0)
    m, = running(tb, 1, {"S": Batched()})
    del _BATCH_MARKS[:]
    futures = _queue_behind_holds(m, [("S.wait_go", ())] + [("S.mark", ("gone",))] * 5)

    def only_the_batch_left():        # the other lane's calls are done, replies and all
        status = m.call("Supervisor.status")
        waiting = status["waiting_in_batches"]
        return waiting >= 2 and status["in_flight"] == 1 and \
            sum(f.done() for f in futures) == len(futures) - 1 - waiting
    eventually(only_the_batch_left)
    m.cancel()
    errors = [f.exception(30) for f in futures]
    assert all(e is None or isinstance(e, bigmachine.MachineStopped) for e in errors), errors
    stopped = sum(e is not None for e in errors)
    time.sleep(0.2)                  # (the machine's threads, in this process, are done)
    # wait_go and the calls behind it in its batch never ran (another lane's batch may have).
    assert errors[0] is not None and stopped >= 3, errors
    assert _BATCH_MARKS == ["gone"] * (len(futures) - stopped)


def test_call_async_calls_with_a_deadline_a_stream_or_large_arguments_go_alone(lb,
                                                                               monkeypatch):
    monkeypatch.setattr(bigmachine._CallQueue, "_BATCH_TIME", 60.0)
    m, = running(lb, 1, {"S": Batched()})
    before = m.call("Supervisor.status")["batched_calls"]
    big = b"x" * (1 << 18)
    holds = [m.call_async("S.hold") for _ in range(2)]
    eventually(lambda: m.call("Supervisor.status")["in_flight"] == 2)
    plain = [m.call_async("S.who", i) for i in range(4)]
    alone = [m.options(timeout=30).call_async("S.who", 9), m.call_async("S.size", big),
             m.call_async("S.size", io.BytesIO(b"streamed")), m.call_async("S.who", Batched)]
    m.call("S.end_holds")
    assert all(f.result(30) for f in holds)
    assert [f.result(30)[0] for f in plain] == [0, 1, 2, 3]
    assert alone[0].result(30)[0] == 9 and alone[1].result(30) == len(big)
    assert alone[2].result(30) == 8 and alone[3].result(30)[0] is Batched
    assert m.call("Supervisor.status")["batched_calls"] - before <= len(plain)


def test_executor_submit_map_and_bad_input(lb, tmp_path):
    m1, m2 = running(lb, 2)
    with lb.executor(progress=False) as ex:
        assert isinstance(ex, bigmachine.Executor)
        assert isinstance(ex, concurrent.futures.Executor)
        assert ex.submit(task_add, 1, 2, c=3).result(30) == 6
        assert ex.submit("Echo.echo", "by name").result(30) == "by name"
        assert list(ex.map(task_square, range(50), chunksize=7)) == [x * x for x in range(50)]
        assert list(ex.map(task_add, range(5), range(100))) == [0, 2, 4, 6, 8]   # shortest
        assert list(ex.map("Echo.echo", "abc")) == ["a", "b", "c"]
        assert {ex.submit(task_pid).result(30) for _ in range(20)} <= {
            m1.call("Supervisor.getpid"), m2.call("Supervisor.getpid")}
        future = ex.submit(task_square, 9)
        future.result(30)
        assert "task_square" in repr(future) and future._machine_addr in (m1.addr, m2.addr)
        assert future._machine_addr in repr(future)
        with pytest.raises(bigmachine.SerializationError, match="top level"):
            ex.submit(lambda x: x, 1)
        factor = 3

        def closure(x):
            return x * factor
        with pytest.raises(bigmachine.SerializationError, match="top level"):
            ex.map(closure, range(3))
        with pytest.raises(bigmachine.SerializationError, match="args"):
            ex.submit(task_square, threading.Lock())
        with pytest.raises(ValueError, match="Service.method"):
            ex.submit("nodot")
        with pytest.raises(ValueError, match="chunksize"):
            ex.map(task_square, range(3), chunksize=0)
        with pytest.raises(bigmachine.NotFound):
            ex.submit("Nope.echo").result(30)
        spin = str(tmp_path / "spin")
        with pytest.raises(concurrent.futures.TimeoutError):   # and the task is cancelled
            list(ex.map(task_spin_marked, [spin], timeout=0.5))
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(task_square, 1)
    with pytest.raises(ValueError, match="per_machine"):
        lb.executor(per_machine=0)


def test_executor_task_errors_arrive_as_themselves_and_are_not_retried(lb, tmp_path):
    running(lb, 2)
    with lb.executor(progress=False) as ex:
        future = ex.submit(task_fail_counted, str(tmp_path), 5)
        with pytest.raises(CustomError) as info:
            future.result(30)
        assert info.value.code == 5 and "Remote traceback" in str(info.value.__cause__)
        results = ex.map(task_fail_counted, [str(tmp_path)] * 3, [10, 11, 12], chunksize=3)
        with pytest.raises(CustomError) as info:
            list(results)
        assert info.value.code == 10
    assert sorted(n.split("-")[1] for n in os.listdir(tmp_path)) == ["10", "11", "12", "5"]
    assert ex.counts()["failed"] == 4 and ex.counts()["retried"] == 0


def test_executor_map_reads_lazily_and_an_endless_iterator_works(lb):
    running(lb, 2)
    read = [0]

    def endless():
        for i in itertools.count():
            read[0] = i + 1
            yield i
    with lb.executor(progress=False) as ex:
        results = ex.map(task_square, endless(), chunksize=4, buffersize=40)
        first = [next(results) for _ in range(100)]
        assert first == [x * x for x in range(100)]
        assert read[0] <= 100 + 40 + 4                      # never far ahead of the reader
        results.close()                                     # what is in flight is cancelled
        assert list(ex.map(task_square, iter([]))) == []


def test_executor_runs_lost_tasks_again_elsewhere(lb, tmp_path):
    m1, m2 = running(lb, 2)
    pid1, pid2 = m1.call("Supervisor.getpid"), m2.call("Supervisor.getpid")
    with lb.executor(progress=False, retries=2) as ex:
        futures = [ex.submit(task_marked_sleep, str(tmp_path), x, 1.0) for x in range(6)]
        eventually(lambda: any(n.endswith("-%d" % pid1) for n in os.listdir(tmp_path)))
        os.kill(pid1, signal.SIGKILL)
        assert [f.result(60) for f in futures] == [x * x for x in range(6)]
        assert m1.wait(STOPPED, timeout=30) is STOPPED
        marks = os.listdir(tmp_path)
        lost = {n.split("-")[1] for n in marks if n.endswith("-%d" % pid1)}
        assert lost and all("start-%s-%d" % (x, pid2) in marks for x in lost)
        assert ex.counts()["retried"] >= 1
    # With no retries left, the loss reaches the caller as itself.
    m3, = running(lb, 1)
    with lb.executor([m3], progress=False, retries=0) as ex:
        future = ex.submit(task_marked_sleep, str(tmp_path), 99, 30)
        eventually(lambda: any(n.startswith("start-99-") for n in os.listdir(tmp_path)))
        m3.cancel()
        with pytest.raises(bigmachine.MachineStopped):
            future.result(30)


def test_executor_waits_for_machines_and_later_machines_join(lb):
    with lb.executor(progress=False) as ex:
        futures = [ex.submit(task_square, x) for x in range(10)]
        assert "waiting for machines" in ex.progress_line()
        m, = running(lb, 1)
        assert [f.result(60) for f in futures] == [x * x for x in range(10)]
        assert {f._machine_addr for f in futures} == {m.addr}
    b = bigmachine.start(bigmachine.Local(**FAST))
    try:
        ex = b.executor(progress=False)
        futures = [ex.submit(task_square, x) for x in range(3)]
        ex.shutdown(wait=True, cancel_futures=True)         # returns, with no machine at all
        assert all(f.cancelled() for f in futures)
    finally:
        b.shutdown()


def test_executor_cancel_queued_and_running_tasks(tmp_path):
    b = bigmachine.start(bigmachine.Local(**LOCAL2))
    ex = b.executor(progress=False, per_machine=2)
    try:
        m, = running(b, 1)
        marks = [str(tmp_path / ("spin%d" % i)) for i in range(2)]
        spinning = [ex.submit(task_spin_marked, p) for p in marks]
        eventually(lambda: all(os.path.exists(p) for p in marks), timeout=60,
                   what="both tasks to start: %r" % (spinning,))
        queued = [ex.submit(task_marked_sleep, str(tmp_path), x, 0) for x in range(5)]
        workers = m.call("Supervisor.worker_pids")
        for f in queued:
            assert f.cancel()
        for f in spinning:                 # CPU-bound, in a worker: the worker is ended
            assert f.cancel()
        assert _wait_gone(workers) == []
        assert ex.submit(task_square, 4).result(60) == 16       # a new worker serves
        assert not [n for n in os.listdir(tmp_path) if n.startswith("start-")]
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
        b.shutdown()


def task_exit(code):
    os._exit(code)


def test_executor_batches_queued_tasks_and_a_cancel_spares_the_rest(lb, tmp_path):
    ex = lb.executor(progress=False, per_machine=1)
    ex._BATCH_TIME = 3600.0        # these tasks count as short: they go in batches
    try:
        futures = [ex.submit(task_marked_sleep, str(tmp_path), x, 0.2) for x in range(40)]
        m, = running(lb, 1)                          # 40 waiting: they go in batches

        def waiting_in_a_batch():
            marks = os.listdir(tmp_path)
            return [(x, f) for x, f in enumerate(futures) if f.running()
                    and not any(n.startswith("start-%d-" % x) for n in marks)]
        eventually(lambda: len(waiting_in_a_batch()) >= 2, timeout=60)
        x, victim = waiting_in_a_batch()[-1]
        assert victim.cancel()
        for y, f in enumerate(futures):
            if y != x:
                assert f.result(120) == y * y
        assert not any(n.startswith("start-%d-" % x) for n in os.listdir(tmp_path))
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def test_executor_a_task_that_ends_its_worker_fails_alone(tmp_path):
    b = bigmachine.start(bigmachine.Local(**LOCAL2))
    ex = b.executor(progress=False)
    try:
        futures = [ex.submit(task_square, x) for x in range(10)] + [ex.submit(task_exit, 3)] + \
            [ex.submit(task_square, x) for x in range(10, 20)]
        running(b, 1)
        with pytest.raises(bigmachine.Error, match="worker process .* ended"):
            futures[10].result(60)
        assert [f.result(60) for f in futures[:10] + futures[11:]] == [x * x for x in range(20)]
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
        b.shutdown()


def test_executor_uses_every_processor_and_workers_end_with_the_machine(tmp_path):
    b = bigmachine.start(bigmachine.Local(**LOCAL2))
    try:
        m, = running(b, 1)
        assert m.maxprocs == 2
        with b.executor(progress=False) as ex:
            # Two tasks that finish only if they run at the same time, in two processes.
            pids = list(ex.map(task_rendezvous, [str(tmp_path)] * 2, [2, 2], ["a", "b"]))
            assert len(set(pids)) == 2 and m.call("Supervisor.getpid") not in pids
        workers = m.call("Supervisor.worker_pids")
        assert set(pids) <= set(workers)
        for pid in workers:                # reached over a socketpair only: no TCP at all
            assert _tcp_sockets(pid) == [], pid
        os.kill(m.call("Supervisor.getpid"), signal.SIGKILL)   # killed outright, even
        assert m.wait(STOPPED, timeout=30) is STOPPED
        assert _wait_gone(workers) == []
    finally:
        b.shutdown()


def test_pooled_service_replicas_use_every_processor(tmp_path):
    b = bigmachine.start(bigmachine.Local(**LOCAL2))
    try:
        m, = running(b, 1, {"P": bigmachine.Pooled(Replica()), "Echo": Echo()})
        machine_pid = m.call("Supervisor.getpid")
        assert m.call("Echo.pid") == machine_pid                # plain: the machine's own
        futures = [m.call_async("P.meet", str(tmp_path), 2, t) for t in "ab"]
        pids = {f.result(60) for f in futures}
        assert len(pids) == 2 and machine_pid not in pids      # two replicas at once
        replies = [m.call("P.bump") for _ in range(4)]
        assert all(has_b for _, _, has_b in replies)           # init(b) ran in each
        counts = collections.Counter(pid for pid, _, _ in replies)
        for pid, calls, _ in replies:                          # state is per replica
            assert pid in pids and calls <= counts[pid]
        workers = m.call("Supervisor.worker_pids")
        assert pids <= set(workers)
        b.shutdown()
        assert _wait_gone(workers) == []
    finally:
        b.shutdown()
    b = bigmachine.start(bigmachine.Local(**LOCAL2))
    try:
        m, = b.start(1, {"Bad": bigmachine.Pooled(BadReplica())})
        assert m.wait(RUNNING, timeout=60) is STOPPED
        assert "replica init failed" in str(m.err)
    finally:
        b.shutdown()


def test_executor_progress_line(lb, capsys):
    running(lb, 1)
    with lb.executor(progress=True) as ex:
        assert list(ex.map(task_square, range(20), chunksize=5)) == [x * x for x in range(20)]
    err = capsys.readouterr().err
    assert "\r" in err and "bigmachine: 20/20 tasks done" in err and "0 failed" in err
    assert err.endswith("\n") and "on 1 machines" in err
    with lb.executor() as ex:                 # stderr is not a terminal here: no line
        assert ex.submit(task_square, 3).result(30) == 9
    with lb.executor(progress=False) as ex:
        assert ex.submit(task_square, 3).result(30) == 9
    assert "tasks done" not in capsys.readouterr().err


def test_status_page_shows_calls_in_flight_and_executors(lb, tmp_path):
    m, = running(lb, 1)
    addr = lb.serve_debug("127.0.0.1:0")
    sleeping = m.call_async("Echo.sleep", 60)
    ex = lb.executor(progress=False, per_machine=1)
    try:
        tasks = [ex.submit(task_marked_sleep, str(tmp_path), x, 60) for x in range(4)]
        eventually(lambda: os.listdir(tmp_path) and ex.counts()["queued"] == 2, timeout=60)

        def shown():
            status, _, body = get(addr, "/debug/bigmachine/status")
            page = body.decode()
            return status == 200 and "Echo.sleep &times;1" in page and \
                "Executor tasks &times;2" in page and "<h2>Executors</h2>" in page and \
                re.search(r"<tr class=executor><td class=mono>executor 1</td>"
                          r"<td class=num>2</td><td class=num>2</td><td class=num>0</td>", page)
        eventually(shown, timeout=30, what="the status page to show the calls and the executor")
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
        for f in [sleeping] + tasks:
            f.cancel()


def test_ssh_machine_runs_tasks_and_replicas_in_workers(sshd, tmp_path):
    """On a remote machine the workers load the driver's code from the machine's bundle."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the SSH host offers one processor: no workers")
    with bigmachine.start(ssh_system(sshd, per_host=1)) as b:
        m, = b.start(1, {"P": bigmachine.Pooled(Replica())})
        assert m.wait(RUNNING, timeout=60) is RUNNING, m.err
        machine_pid = m.call("Supervisor.getpid")
        with b.executor(progress=False, per_machine=2) as ex:
            pids = list(ex.map(task_rendezvous, [str(tmp_path)] * 2, [2, 2], "ab"))
        assert len(set(pids)) == 2 and machine_pid not in pids
        replica_pid, calls, has_b = m.call("P.bump")
        assert has_b and replica_pid not in pids + [machine_pid]
        workers = m.call("Supervisor.worker_pids")
    assert _wait_gone(workers) == []


def test_bigpi_on_one_local_machine_with_two_processors():
    result = subprocess.run([sys.executable, os.path.join(HERE, "examples", "bigpi.py"),
                             "-n", "200000", "-nmach", "1", "--bigm.local.maxprocs=2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "distributing work among 2 cores" in result.stderr
    assert abs(float(result.stdout.split("π = ")[1]) - 3.14159) < 0.05
    with pytest.raises(ValueError, match="maxprocs"):
        bigmachine.Local(maxprocs=0)
    with pytest.raises(ValueError, match="bigm.local.maxprocs"):
        bigmachine.Local._command_line_options(["x", "--bigm.local.maxprocs=two"], {})
    assert bigmachine.Local._command_line_options([], {"BIGMACHINE_LOCAL_MAXPROCS": "3"}) == \
        {"maxprocs": 3}


# ======================================================================================
# Command line and the example
# ======================================================================================

def _interpreters():
    """Every CPython 3.8-3.13 installed with pyenv (the running one at least)."""
    found = {sys.executable}
    for version in sorted(os.listdir(PYENV)) if os.path.isdir(PYENV) else ():
        parts = version.split(".")
        if len(parts) == 3 and parts[0] == "3" and 8 <= int(parts[1]) <= 13:
            path = os.path.join(PYENV, version, "bin", "python3")
            if os.path.exists(path):
                found.add(path)
    return sorted(found)


@pytest.mark.parametrize("python", _interpreters())
def test_import_alone_is_clean_and_cheap(python, tmp_path):
    """Vendoring: the file alone, isolated, imports without a warning and starts nothing
    (no thread, socket or certificate at import time)."""
    shutil.copy(os.path.join(HERE, "bigmachine.py"), str(tmp_path))
    code = textwrap.dedent("""
        import os, sys, threading
        sys.path.insert(0, os.getcwd())                    # -I leaves it out
        before = threading.active_count(), len(os.listdir("/proc/self/fd"))
        modules = set(sys.modules)                         # what site imported already
        import bigmachine
        after = threading.active_count(), len(os.listdir("/proc/self/fd"))
        assert before == after, (before, after)
        assert bigmachine._ed25519_base_table is None       # no key made yet
        assert "boto3" not in sys.modules and "http.server" not in sys.modules
        # What only drivers, bundles or certificates need is imported where it is used:
        # every machine process imports this file, and a machine is up sooner without them.
        drivers_only = {"subprocess", "hashlib", "random", "secrets", "urllib.parse"}
        assert not drivers_only & (set(sys.modules) - modules), set(sys.modules) - modules
        print(bigmachine.__version__)
    """)
    result = subprocess.run([python, "-I", "-W", "error", "-c", code], cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": os.environ.get("PATH", ""), "HOME": "/proc",
                                 "TMPDIR": str(tmp_path)})
    assert result.returncode == 0 and result.stdout.strip() == bigmachine.__version__, \
        result.stderr


@pytest.mark.parametrize("flags", [[], ["-O"]], ids=["plain", "optimized"])
def test_selftest_passes(flags):
    """Also under -O, which compiles bare asserts away: the selftest's checks must not be."""
    result = subprocess.run([sys.executable, *flags, os.path.join(HERE, "bigmachine.py"),
                             "selftest"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout


def test_selftest_checks_still_check_under_optimize():
    """A selftest check that fails is reported as failed under -O too."""
    code = ("import bigmachine\n"
            "try:\n"
            "    bigmachine._expect_equal(1, 2)\n"
            "except bigmachine._CheckFailed as e:\n"
            "    print('failed:', e)\n")
    result = subprocess.run([sys.executable, "-O", "-c", code], cwd=HERE,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "failed: got 1, expected 2", result.stdout + result.stderr


def test_bigpi_example():
    result = subprocess.run([sys.executable, os.path.join(HERE, "examples", "bigpi.py"),
                             "-n", "2000000", "-nmach", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    pi = result.stdout.strip().split("π = ")[1]
    assert len(pi.split(".")[1]) == 6                          # log10(2e6) digits
    assert abs(float(pi) - 3.14159) < 0.01
    assert result.stderr.count(" RUNNING") == 2 and "all machines are ready" in result.stderr


def test_wordcount_example(tmp_path):
    """Mappers stream files in and send partial counts to a reducer machine; the totals
    stream back. Words straddle the example's 64 KiB reads, and some are not ASCII."""
    rng = random.Random(7)
    vocabulary = ["alpha", "beta", "gamma", "Épsilon", "don't", "naïve"]
    expected = collections.Counter()
    paths = []
    for i in range(5):
        words = [rng.choice(vocabulary) for _ in range(20000 + i)] + ["x" * 70000]
        rng.shuffle(words)
        expected.update(w.lower() for w in words)
        path = tmp_path / ("part%d.txt" % i)
        path.write_text(" ".join(words) + "\n", encoding="utf-8")
        paths.append(str(path))
    result = subprocess.run([sys.executable, os.path.join(HERE, "examples", "wordcount.py"),
                             "-nmap", "2", "-top", "100", *paths],
                            capture_output=True, text=True, timeout=300, encoding="utf-8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    counted = {word: int(n) for n, word in (line.split() for line in lines[:-1])}
    assert counted == dict(expected)
    assert lines[-1] == "%d words, %d distinct, in 5 files" % (
        sum(expected.values()), len(expected))


def test_sweep_example():
    """A parameter sweep through the Executor with a Pooled service: the same answer as the
    sweep computed here, one point after another, and a progress line that counts every task."""
    spec = importlib.util.spec_from_file_location(
        "sweep_example", os.path.join(HERE, "examples", "sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    epidemic = sweep.Epidemic(people=2000, runs=3)
    rates = [0.02 + 0.28 * i / 3 for i in range(4)]
    reaching = [(size, rate, share) for rate, size, share in
                (epidemic.evaluate(point) for point in itertools.product(rates, range(1, 13)))
                if share >= 0.5]
    size, rate, share = min(reaching)
    result = subprocess.run([sys.executable, os.path.join(HERE, "examples", "sweep.py"),
                             "-rates", "4", "-sizes", "12", "-progress"],
                            capture_output=True, text=True, timeout=300, encoding="utf-8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "cheapest setting reaching half: %d contacts, rate %.3f -> %.0f%% infected"
        % (size, rate, 100 * share))
    assert "48/48 tasks done" in result.stderr and "0 failed" in result.stderr


def test_multisys_example():
    """Two sessions on two systems in one program, each sampling with its own machines; a
    session whose system fails is reported without taking the others down."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "examples", "multisys.py"),
                             "-window", "0.3", "local:2", "test:1", "nosuch:1"],
                            capture_output=True, text=True, timeout=300, encoding="utf-8")
    lines = result.stdout.splitlines()
    assert result.returncode == 1 and len(lines) == 3, result.stdout + result.stderr
    for line, name in zip(lines, ("local:2", "test:1")):
        label, samples, *_, pi = line.split()
        assert label == name and int(samples) > 0 and abs(float(pi) - 3.14) < 0.1, line
    assert lines[2].startswith("nosuch:1  failed: unknown bigmachine system 'nosuch'")


# ======================================================================================
# Certificates (Go: internal/authority_test.go), checked by openssl and cryptography
# ======================================================================================

certs = bigmachine
OPENSSL = shutil.which("openssl")
UTC = datetime.timezone.utc
# OpenSSL 3 says "unsuitable certificate purpose", older versions "unsupported ...".
BAD_PURPOSE = "certificate purpose"
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl command not found")

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def openssl(*args, input=None):
    return subprocess.run([OPENSSL, *args], input=input, capture_output=True, text=True)


def write(directory, name, text):
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write(text)
    return path


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def handshake(server_ctx, client_ctx, timeout=10.0):
    """One ping/pong over loopback. Returns (client outcome, server outcome): b"pong" /
    the server's view of the peer, or the exception raised on that side. A request and its
    reply are needed because with TLS 1.3 a client learns that the server refused its
    certificate only on its first read."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(timeout)
    server = {}

    def serve():
        try:
            conn, _ = listener.accept()
            conn.settimeout(timeout)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                if recv_exact(tls, 4) != b"ping":
                    raise AssertionError("bad request")
                tls.sendall(b"pong")
                server["peer"] = tls.getpeercert()
                server["version"] = tls.version()
        except Exception as e:  # reported to the test
            server["error"] = e

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=timeout) as raw:
            with client_ctx.wrap_socket(raw) as tls:
                tls.sendall(b"ping")
                client = recv_exact(tls, 4)
    except Exception as e:
        client = e
    thread.join(timeout)
    listener.close()
    assert not thread.is_alive()
    return client, server.get("error", server)


@pytest.fixture(scope="module")
def ca():
    return certs.CertificateAuthority()


@pytest.fixture(scope="module")
def other_ca():
    return certs.CertificateAuthority("some other session CA")


# --------------------------------------------------------------------------------------
# Ed25519
# --------------------------------------------------------------------------------------

RFC8032_VECTORS = [
    # (secret key, public key, message, signature) from RFC 8032 section 7.1
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]


@pytest.mark.parametrize("secret,public,message,signature", RFC8032_VECTORS)
def test_rfc8032_vectors(secret, public, message, signature):
    key = certs._Ed25519Key(bytes.fromhex(secret))
    assert key.public.hex() == public
    assert key.sign(bytes.fromhex(message)).hex() == signature


def test_curve_constants():
    p, d = certs._ED25519_P, certs._ED25519_D
    assert d == 37095705934669439343138083508754565189542113879843219016388785533085940283555
    x, y, z, t = certs._ED25519_BASE
    assert z == 1 and t == x * y % p and x % 2 == 0
    assert (-x * x + y * y - 1 - d * x * x * y * y) % p == 0
    # B has order L: L*B is the neutral element.
    assert certs._ed25519_encode(certs._ed25519_multiply_base(certs._ED25519_L)) == (
        certs._ed25519_encode(certs._ED25519_NEUTRAL)
    )


def test_import_is_cheap():
    # The base-point table is built on first use, never at import.
    code = "import bigmachine as c; assert c._ed25519_base_table is None; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_seed_length():
    with pytest.raises(ValueError):
        certs._Ed25519Key(b"\x00" * 31)


def test_ed25519_against_cryptography():
    ed = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
    from cryptography.hazmat.primitives import serialization

    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    for i in range(100):
        seed = secrets.token_bytes(32)
        message = secrets.token_bytes(i * 7)
        ours = certs._Ed25519Key(seed)
        theirs = ed.Ed25519PrivateKey.from_private_bytes(seed)
        assert ours.public == theirs.public_key().public_bytes(*raw)
        assert ours.sign(message) == theirs.sign(message)


# --------------------------------------------------------------------------------------
# DER
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "value,encoding",
    [
        (0, "020100"),
        (1, "020101"),
        (127, "02017f"),
        (128, "02020080"),
        (255, "020200ff"),
        (256, "02020100"),
        (0x8000, "0203008000"),
        ((1 << 159) - 1, "0214" + "7f" + "ff" * 19),
        ((1 << 159), "0215" + "008" + "0" * 39),
    ],
)
def test_der_integer_is_minimal(value, encoding):
    assert certs._der_integer(value).hex() == encoding


def test_der_pieces():
    assert certs._der_oid("1.3.101.112").hex() == "06032b6570"
    assert certs._der_oid("1.2.840.113549").hex() == "06062a864886f70d"
    assert certs._der(0x04, b"x" * 200)[:3].hex() == "0481c8"
    assert certs._der(0x04, b"x" * 300)[:4].hex() == "0482012c"
    # keyUsage digitalSignature: 1 byte, 7 unused bits; keyCertSign+cRLSign: 0x06, 1 unused.
    assert certs._der_named_bits(0).hex() == "03020780"
    assert certs._der_named_bits(5, 6).hex() == "03020106"
    assert certs._der_set(b"\x02\x01\x05", b"\x02\x01\x01").hex() == "3106020101020105"


def test_der_times():
    assert certs._der_time(datetime.datetime(2049, 12, 31, 23, 59, 59)) == b"\x17\x0d491231235959Z"
    assert certs._der_time(datetime.datetime(2050, 1, 1)) == b"\x18\x0f20500101000000Z"
    # Aware datetimes are converted to UTC; microseconds are dropped.
    eastern = datetime.timezone(datetime.timedelta(hours=-5))
    moment = datetime.datetime(2030, 6, 1, 19, 30, 0, 999999, tzinfo=eastern)
    assert certs._der_time(moment) == b"\x17\x0d300602003000Z"


def test_private_key_is_rfc8410_pkcs8():
    key = certs._Ed25519Key(bytes(range(32)))
    pem = certs._private_key_pem(key)
    assert pem.startswith("-----BEGIN PRIVATE KEY-----\n")
    body = "".join(pem.strip().splitlines()[1:-1])
    der = __import__("base64").b64decode(body)
    assert der.hex() == "302e020100300506032b657004220420" + bytes(range(32)).hex()


# --------------------------------------------------------------------------------------
# Certificates, checked by openssl and cryptography
# --------------------------------------------------------------------------------------

ROLES = {"both": (True, True), "server": (True, False), "client": (False, True)}


@pytest.fixture(scope="module")
def leaves(ca, tmp_path_factory):
    """200 leaves with mixed roles and SANs, written to files: [(role, path, credentials)]."""
    directory = tmp_path_factory.mktemp("leaves")
    out = []
    for i in range(200):
        role = ("both", "server", "client")[i % 3]
        server, client = ROLES[role]
        sans = {}
        if i % 4 == 1:
            sans = {"dns_names": ["localhost", f"m{i}.example.com"]}
        elif i % 4 == 2:
            sans = {"ip_addresses": ["127.0.0.1", "::1"]}
        elif i % 4 == 3:
            sans = {"dns_names": ["localhost"], "ip_addresses": ["127.0.0.1", "::1"]}
        creds = ca.issue(f"machine-{i}", server=server, client=client, **sans)
        out.append((role, write(directory, f"leaf{i}.pem", creds.cert_pem), creds))
    return out


def verify_lines(ca_path, purpose, paths):
    result = openssl("verify", "-x509_strict", "-purpose", purpose, "-CAfile", ca_path, *paths)
    return result, result.stdout + result.stderr


@needs_openssl
def test_openssl_verifies_200_leaves_strictly(ca, leaves, tmp_path):
    ca_path = write(tmp_path, "ca.pem", ca.cert_pem)
    result = openssl("verify", "-x509_strict", "-CAfile", ca_path, ca_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for purpose, roles in (("sslserver", ("both", "server")), ("sslclient", ("both", "client"))):
        paths = [path for role, path, _ in leaves if role in roles]
        result, output = verify_lines(ca_path, purpose, paths)
        assert result.returncode == 0, output
        assert result.stdout.count(": OK") == len(paths), output
        wrong = [path for role, path, _ in leaves if role not in roles]
        for path in wrong[:5]:
            result, output = verify_lines(ca_path, purpose, [path])
            assert result.returncode != 0 and BAD_PURPOSE in output, output


@needs_openssl
def test_leaves_do_not_verify_against_another_ca(other_ca, leaves, tmp_path):
    ca_path = write(tmp_path, "other.pem", other_ca.cert_pem)
    result = openssl("verify", "-CAfile", ca_path, leaves[0][1])
    assert result.returncode != 0


@needs_openssl
def test_openssl_text_shows_the_profile(ca, leaves, tmp_path):
    ca_text = openssl("x509", "-noout", "-text", input=ca.cert_pem).stdout
    assert "Signature Algorithm: ED25519" in ca_text
    assert "X509v3 Basic Constraints: critical\n                CA:TRUE" in ca_text
    assert "Certificate Sign, CRL Sign" in ca_text
    role, _, creds = leaves[3]  # "both", with DNS and IP SANs
    text = openssl("x509", "-noout", "-text", input=creds.cert_pem).stdout
    assert "Version: 3 (0x2)" in text
    assert "CA:FALSE" in text and "Digital Signature" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert "DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1" in text
    assert "X509v3 Authority Key Identifier" in text
    no_san = openssl("x509", "-noout", "-text", input=leaves[0][2].cert_pem).stdout
    assert "Subject Alternative Name" not in no_san


@needs_openssl
def test_keys_match_certificates_and_are_valid(leaves):
    for _, _, creds in leaves[:20]:
        from_cert = openssl("x509", "-noout", "-pubkey", input=creds.cert_pem)
        from_key = openssl("pkey", "-pubout", input=creds.key_pem)
        assert from_cert.returncode == 0 and from_key.returncode == 0
        assert from_cert.stdout == from_key.stdout
        check = openssl("pkey", "-check", "-noout", input=creds.key_pem)
        assert check.returncode == 0 and "Key is valid" in check.stdout + check.stderr


@needs_openssl
def test_far_future_dates_use_generalized_time(ca, tmp_path):
    creds = ca.issue(
        "far",
        not_before=datetime.datetime(2049, 12, 31, 23, 0, 0),
        not_after=datetime.datetime(2051, 1, 1, tzinfo=UTC),
    )
    text = openssl("x509", "-noout", "-dates", input=creds.cert_pem).stdout
    assert "notBefore=Dec 31 23:00:00 2049 GMT" in text
    assert "notAfter=Jan  1 00:00:00 2051 GMT" in text
    # Not yet valid now, but well formed: checking at a time inside the window passes.
    ca_path = write(tmp_path, "ca.pem", ca.cert_pem)
    leaf = write(tmp_path, "far.pem", creds.cert_pem)
    at = str(int(datetime.datetime(2030, 1, 1, tzinfo=UTC).timestamp()))
    ok = openssl("verify", "-x509_strict", "-attime", at, "-CAfile", ca_path, leaf)
    assert "not yet valid" in ok.stdout + ok.stderr  # 2030 is before notBefore (2049)...
    at = str(int(datetime.datetime(2050, 6, 1, tzinfo=UTC).timestamp()))
    late = openssl("verify", "-x509_strict", "-attime", at, "-CAfile", ca_path, leaf)
    # ...and in 2050 the leaf is valid but the (20-year) CA has expired.
    assert "certificate has expired" in late.stdout + late.stderr


def test_cryptography_accepts_everything(ca, leaves):
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import serialization

    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    ca_cert.public_key().verify(ca_cert.signature, ca_cert.tbs_certificate_bytes)
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).critical
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca_cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    ca_skid = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    serials = set()
    for role, _, creds in leaves:
        cert = x509.load_pem_x509_certificate(creds.cert_pem.encode())
        ca_cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes)
        assert cert.version == x509.Version.v3
        assert 0 < cert.serial_number < 1 << 159
        serials.add(cert.serial_number)
        assert cert.issuer == ca_cert.subject
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert basic.critical and not basic.value.ca
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert usage.critical and usage.value.digital_signature
        akid = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert akid.key_identifier == ca_skid.digest
        eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        server, client = ROLES[role]
        assert (x509.ExtendedKeyUsageOID.SERVER_AUTH in eku) == server
        assert (x509.ExtendedKeyUsageOID.CLIENT_AUTH in eku) == client
        key = serialization.load_pem_private_key(creds.key_pem.encode(), password=None)
        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        assert key.public_key().public_bytes(*raw) == cert.public_key().public_bytes(*raw)
    assert len(serials) == len(leaves)


def test_cryptography_sees_san_values(ca):
    x509 = pytest.importorskip("cryptography.x509")
    import ipaddress

    creds = ca.issue("m", dns_names=["localhost"], ip_addresses=["127.0.0.1", "::1"])
    cert = x509.load_pem_x509_certificate(creds.cert_pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_issue_argument_checks(ca):
    with pytest.raises(ValueError):
        ca.issue("nobody", server=False, client=False)
    with pytest.raises(TypeError):
        ca.issue("m", dns_names="localhost")
    with pytest.raises(ValueError):
        ca.issue("m", ip_addresses=["not-an-ip"])
    with pytest.raises(ValueError):
        ca.issue("m", dns_names=["bad name"])
    with pytest.raises(ValueError):
        ca.issue("x" * 65)
    with pytest.raises(ValueError):
        ca.issue("bigmachine session CA")
    now = datetime.datetime.now(UTC)
    with pytest.raises(ValueError):
        ca.issue("m", not_before=now, not_after=now - datetime.timedelta(seconds=1))


def test_secrets_stay_put(ca):
    creds = ca.issue("m")
    assert "PRIVATE" not in repr(creds) and creds.key_pem not in repr(creds)
    with pytest.raises(TypeError):
        pickle.dumps(ca)
    # Credentials travel to machines, so they must pickle.
    assert pickle.loads(pickle.dumps(creds)) == creds


def test_default_validity(ca):
    x509 = pytest.importorskip("cryptography.x509")
    before = datetime.datetime.now(UTC)
    cert = x509.load_pem_x509_certificate(ca.issue("m").cert_pem.encode())
    if hasattr(cert, "not_valid_before_utc"):  # cryptography >= 42
        not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    else:
        not_before = cert.not_valid_before.replace(tzinfo=UTC)
        not_after = cert.not_valid_after.replace(tzinfo=UTC)
    hour, year = datetime.timedelta(hours=1), datetime.timedelta(days=365)
    assert before - hour - datetime.timedelta(seconds=2) <= not_before <= before - hour
    assert 9.9 * year < not_after - before < 10.1 * year


# --------------------------------------------------------------------------------------
# Loading keys without leaving them on disk
# --------------------------------------------------------------------------------------

class RecordingContext:
    """Stands in for an SSLContext to see what load_into hands to OpenSSL."""

    def __init__(self):
        self.real = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.paths = []

    def load_cert_chain(self, path):
        self.paths.append((path, os.stat(path).st_mode & 0o777))
        self.real.load_cert_chain(path)


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd_create")
def test_load_into_uses_memfd(ca, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    context = RecordingContext()
    ca.issue("m").load_into(context)
    [(path, _)] = context.paths
    assert path.startswith("/proc/self/fd/")
    assert os.listdir(str(tmp_path)) == []


def test_load_into_falls_back_to_private_temp_file(ca, tmp_path, monkeypatch):
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    context = RecordingContext()
    ca.issue("m").load_into(context)
    [(path, mode)] = context.paths
    assert os.path.dirname(path) == str(tmp_path) and mode == 0o600
    assert os.listdir(str(tmp_path)) == []


def test_load_into_removes_temp_file_on_error(ca, tmp_path, monkeypatch):
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    good = ca.issue("m")
    broken = good._replace(key_pem=ca.issue("other").key_pem)  # key doesn't match cert
    with pytest.raises(ssl.SSLError):
        broken.load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    assert os.listdir(str(tmp_path)) == []


# --------------------------------------------------------------------------------------
# Mutual TLS
# --------------------------------------------------------------------------------------

def test_context_settings(ca):
    creds = ca.issue("m")
    for context, protocol in (
        (certs.server_context(creds), ssl.PROTOCOL_TLS_SERVER),
        (certs.client_context(creds), ssl.PROTOCOL_TLS_CLIENT),
    ):
        assert context.protocol == protocol
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert not context.check_hostname
        assert context.verify_flags & ssl.VERIFY_X509_STRICT
        [anchor] = context.get_ca_certs()  # the session CA and nothing else
        assert anchor["subject"] == ((("commonName", "bigmachine session CA"),),)


def test_mutual_tls(ca):
    machine = ca.issue("machine-1")
    driver = ca.issue("driver", server=False)
    client, server = handshake(certs.server_context(machine), certs.client_context(driver))
    assert client == b"pong", client
    assert server["peer"]["subject"] == ((("commonName", "driver"),),)
    # Machines talk to each other too.
    client, server = handshake(
        certs.server_context(machine), certs.client_context(ca.issue("machine-2"))
    )
    assert client == b"pong", client


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_mutual_tls_each_version(ca, version):
    server_ctx = certs.server_context(ca.issue("machine"))
    client_ctx = certs.client_context(ca.issue("driver", server=False))
    client_ctx.minimum_version = client_ctx.maximum_version = version
    client, server = handshake(server_ctx, client_ctx)
    assert client == b"pong", client
    assert server["version"] == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]


def assert_refused(client, server, server_reason=None, client_reason=None):
    assert isinstance(client, OSError), f"client unexpectedly succeeded: {client!r}"
    assert isinstance(server, Exception), f"server unexpectedly succeeded: {server!r}"
    if server_reason:
        assert server_reason in str(server), server
    if client_reason:
        assert client_reason in str(client), client


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_from_another_ca_is_refused(ca, other_ca, version):
    client_ctx = certs.client_context(other_ca.issue("intruder")._replace(ca_pem=ca.cert_pem))
    client_ctx.maximum_version = version
    client, server = handshake(certs.server_context(ca.issue("machine")), client_ctx)
    assert_refused(client, server, server_reason="certificate verify failed")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_without_certificate_is_refused(ca, version):
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.load_verify_locations(cadata=ca.cert_pem)
    client_ctx.maximum_version = version
    client, server = handshake(certs.server_context(ca.issue("machine")), client_ctx)
    assert_refused(client, server, server_reason="PEER_DID_NOT_RETURN_A_CERTIFICATE")


def test_server_from_another_ca_is_refused(ca, other_ca):
    impostor = other_ca.issue("impostor")
    client, server = handshake(
        certs.server_context(impostor), certs.client_context(ca.issue("driver", server=False))
    )
    assert_refused(client, server, client_reason="certificate verify failed")
    assert isinstance(client, ssl.SSLCertVerificationError)


def test_expired_client_is_refused(ca):
    now = datetime.datetime.now(UTC)
    expired = ca.issue(
        "old-driver",
        server=False,
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    )
    client, server = handshake(
        certs.server_context(ca.issue("machine")), certs.client_context(expired)
    )
    assert_refused(client, server, server_reason="certificate has expired")


def test_client_only_certificate_cannot_serve(ca):
    driver = ca.issue("driver", server=False)
    client, server = handshake(
        certs.server_context(driver), certs.client_context(ca.issue("machine"))
    )
    assert_refused(client, server, client_reason=BAD_PURPOSE)


def test_server_only_certificate_cannot_be_a_client(ca):
    client, server = handshake(
        certs.server_context(ca.issue("machine")),
        certs.client_context(ca.issue("server-only", client=False)),
    )
    assert_refused(client, server, server_reason=BAD_PURPOSE)


# --------------------------------------------------------------------------------------
# Other Python versions, strict default contexts, isolated mode, unwritable HOME
# --------------------------------------------------------------------------------------

SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import os, socket, ssl, sys, threading
    sys.path.insert(0, sys.argv[1])
    if sys.argv[2] == "no-memfd" and hasattr(os, "memfd_create"):
        del os.memfd_create
    import bigmachine as certs

    def run(server_ctx, client_ctx, hostname=None):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        errors = []
        def serve():
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(4)[::-1])
            except Exception as e:
                errors.append(e)
        t = threading.Thread(target=serve)
        t.start()
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=hostname) as tls:
                tls.sendall(b"ping")
                assert tls.recv(4) == b"gnip"
        t.join()
        listener.close()
        assert not errors, errors

    ca = certs.CertificateAuthority()
    machine, driver = ca.issue("machine"), ca.issue("driver", server=False)
    run(certs.server_context(machine), certs.client_context(driver))

    # What Python 3.13's create_default_context() does, made explicit for older versions.
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=ca.cert_pem)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem)
    client_ctx.check_hostname = False
    for ctx in (server_ctx, client_ctx):
        if sys.version_info >= (3, 13):
            assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    machine.load_into(server_ctx)
    driver.load_into(client_ctx)
    run(server_ctx, client_ctx)

    # Hostname checking also works when SANs are given.
    named = ca.issue("named", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem)
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    driver.load_into(client_ctx)
    run(certs.server_context(named), client_ctx, hostname="localhost")
    run(certs.server_context(named), client_ctx, hostname="127.0.0.1")
    print("OK", sys.version.split()[0], ssl.OPENSSL_VERSION)
    """
)


def interpreters():
    found = []
    for version in ("3.8.18", "3.13.0"):
        path = os.path.join(PYENV, version, "bin", "python")
        if os.path.exists(path):
            found.append(path)
    return found or [sys.executable]


@pytest.mark.parametrize("python", interpreters())
@pytest.mark.parametrize("memfd", ["memfd", "no-memfd"])
def test_other_pythons_isolated_with_unwritable_home(python, memfd, tmp_path):
    script = write(tmp_path, "script.py", SUBPROCESS_SCRIPT)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": "/proc", "TMPDIR": str(tmpdir)}
    result = subprocess.run(
        [python, "-I", script, HERE, memfd],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.startswith("OK"), result.stderr
    assert os.listdir(str(tmpdir)) == []


# ======================================================================================
# What a framework needs from its cluster (issue 16): retried streams, where errors
# happened, typed machine facts, health and out-of-memory, events, testing tools, debug
# pages inside the application, EC2 for real work
# ======================================================================================

class Temporarily(Exception):
    """A user's own exception that says retrying can help."""

    def __init__(self, text):
        super().__init__(text)
        self.temporary = True


class Framework:
    """A service of the kind a framework installs: it reads streams, fails for a while, and
    calls other machines."""

    def __init__(self):
        self.attempts = collections.Counter()
        self.b = None

    def init(self, b):
        self.b = b

    def read_after_failures(self, key, failures, stream):
        """Read the stream; fail (temporarily) the first failures times, having read part."""
        self.attempts[key] += 1
        head = stream.read(10)
        if self.attempts[key] <= failures:
            raise Temporarily("attempt %d of %s" % (self.attempts[key], key))
        return hashlib.sha256(head + stream.read()).hexdigest(), self.attempts[key]

    def flaky(self, key, failures, temporary=True):
        self.attempts[key] += 1
        if self.attempts[key] <= failures:
            error = Temporarily("attempt %d of %s" % (self.attempts[key], key))
            error.temporary = temporary
            raise error
        return self.attempts[key]

    def attempts_of(self, key):
        return self.attempts[key]

    def call_other(self, addr, method, *args):
        return self.b.dial(addr).options(timeout=5.0).call(method, *args)

    def allocate(self, mib):
        self.held = [bytearray(1 << 20) for _ in range(mib)]
        for chunk in self.held:
            chunk[::4096] = b"x" * len(chunk[::4096])      # touch every page
        return len(self.held)

    def fill_memory_to(self, fraction):
        """Hold memory until this machine's cgroup uses fraction of its limit."""
        cgroup = bigmachine._memory_cgroup()
        v2 = os.path.exists(os.path.join(cgroup, "memory.events"))
        limit = bigmachine._cgroup_number(cgroup, "memory.max" if v2 else "memory.limit_in_bytes")
        self.filled = getattr(self, "filled", [])
        while True:
            usage = bigmachine._cgroup_number(
                cgroup, "memory.current" if v2 else "memory.usage_in_bytes")
            if usage >= fraction * limit:
                return usage / limit
            self.filled.append(bytearray(b"x" * (256 << 10)))

    def sleep_then_note(self, seconds, path):
        try:
            bigmachine.current_call().wait(seconds)
        finally:
            with open(path, "w") as f:
                f.write("finally ran")

    def tmpdir(self):
        import tempfile
        return tempfile.gettempdir(), os.environ.get("TMPDIR")


def test_framework_stream_argument_is_reopened_for_each_retry(tb, tmp_path):
    path = tmp_path / "data"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    opened = []

    def opener():
        opened.append(1)
        return open(str(path), "rb")

    m, = running(tb, 1, {"F": Framework()})
    # A user's exception with temporary=True is retried like the library's own.
    digest, attempts = m.options(backoff=bigmachine.Backoff(0.01, 0.05)).retry_call(
        "F.read_after_failures", "a", 2, bigmachine.Stream(opener))
    assert digest == hashlib.sha256(data).hexdigest() and attempts == 3 and len(opened) == 3
    # A plain file is spent by the first attempt: the second one reads nothing of it.
    with open(str(path), "rb") as f:
        with pytest.raises(Exception) as info:
            m.options(backoff=bigmachine.Backoff(0.01, 0.05)).retry_call(
                "F.read_after_failures", "b", 1, f)
    assert isinstance(info.value, ValueError) and "closed file" in str(info.value)
    # An exception whose temporary attribute is false is raised at once.
    with pytest.raises(Temporarily):
        m.retry_call("F.flaky", "c", 5, temporary=False)
    assert m.call("F.attempts_of", "c") == 1
    with pytest.raises(TypeError, match="opens the data"):
        bigmachine.Stream(b"not a function")
    with pytest.raises(TypeError, match="readable binary file"):
        m.call("F.read_after_failures", "d", 0, bigmachine.Stream(lambda: "text"))


def test_framework_errors_say_where_they_happened(lb):
    m1, m2 = running(lb, 2, {"F": Framework()})
    # A library error raised on the machine: remote, and it names the machine.
    with pytest.raises(bigmachine.NotFound) as info:
        m1.call("F.nothing")
    assert info.value.remote and info.value.machine == m1.addr and m1.addr in str(info.value)
    pid2 = m2.call("Supervisor.getpid")
    assert m1.call("F.call_other", m2.addr, "Supervisor.getpid") == pid2
    os.kill(pid2, signal.SIGKILL)
    assert m2.wait(STOPPED, timeout=30) is STOPPED
    local = m2.err
    assert isinstance(local, bigmachine.Error) and not local.remote and local.machine is None
    # Machine 1's call to the dead machine 2 fails on machine 1: the driver hears of it as a
    # remote error, which names machine 1, and not as its own connection to machine 1 failing.
    with pytest.raises(bigmachine.Error) as info:
        m1.call("F.call_other", m2.addr, "Supervisor.getpid")
    error = info.value
    assert error.remote and error.machine == m1.addr, (error, error.machine)
    assert m1.addr in str(error) and m2.addr in str(error)
    assert m1.state is RUNNING and m1.call("Supervisor.getpid") != pid2


def test_framework_machine_facts_are_typed(tb):
    m, = running(tb, 1, {"F": Framework()})
    memory, disk, load = m.mem_info(), m.disk_info(), m.load_info()
    assert isinstance(memory, bigmachine.MemInfo)
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    assert memory.total == total and 0 < memory.available <= memory.total
    assert memory.used == memory.total - memory.available and 0 < memory.used_fraction < 1
    assert memory.rss > 1 << 20 and not memory.rss_is_peak
    usage = shutil.disk_usage(os.getcwd())
    assert isinstance(disk, bigmachine.DiskInfo) and disk.path == os.getcwd()
    assert disk.total == usage.total and disk.used + disk.free <= disk.total
    assert isinstance(load, bigmachine.LoadInfo) and load.cpus == os.cpu_count()
    assert all(x >= 0 for x in load[:3]) and load._fields == ("load1", "load5", "load15", "cpus")
    # The status page shows the same facts.
    page = bigmachine._status_page(tb, 0)
    assert "of %s used" % bigmachine._bytes(memory.total) in page
    assert "%% of %s used" % bigmachine._bytes(disk.total) in page


def test_framework_testsystem_injects_failures_and_waits(tmp_path):
    with pytest.raises(ValueError, match="probability"):
        bigmachine.TestSystem(inject_failures=1.5)
    system = bigmachine.TestSystem(inject_failures=0.5, **FAST)
    with bigmachine.start(system) as b:
        assert system.wait(0) == 0
        machines = b.start(2, {"F": Framework()})
        assert system.wait(2, timeout=30) == 2
        assert system.wait(3, timeout=0.05) == 2
        for m in machines:
            assert m.wait(RUNNING, timeout=30) is RUNNING
        m = machines[0]
        failed = 0
        for i in range(60):
            try:
                m.call("F.flaky", "never", 0)
            except bigmachine.NetworkError as e:
                assert e.temporary and "injected" in str(e)
                failed += 1
        assert 0 < failed < 60
        # The failures happen before a call is sent; retry_call gets through them.
        assert m.options(backoff=bigmachine.Backoff(0.001, 0.002)).retry_call(
            "F.attempts_of", "never") == 60 - failed
        for i in range(20):
            assert m.options(backoff=bigmachine.Backoff(0.001, 0.002)).retry_call(
                "F.flaky", "r%d" % i, 0) == 1
        assert m.state is RUNNING           # the keepalives were not failed


def test_framework_machine_shuts_down_gracefully(lb, tmp_path):
    m1, m2 = running(lb, 2, {"F": Framework()})
    pid = m1.call("Supervisor.getpid")
    note = tmp_path / "note"
    future = m1.call_async("F.sleep_then_note", 60, str(note))
    eventually(lambda: m1.call("Supervisor.status")["in_flight"] == 1, what="the call to run")
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    m1.shutdown()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask     # Ctrl-C still reaches us
    assert m1.state is STOPPED and "shut down" in str(m1.err)
    assert note.read_text() == "finally ran"            # its call was cancelled, not dropped
    with pytest.raises((bigmachine.Cancelled, bigmachine.MachineStopped, bigmachine.NetworkError)):
        future.result(timeout=30)
    assert not _alive(pid)
    assert m2.state is RUNNING and m2.call("F.flaky", "x", 0) == 1
    with pytest.raises(bigmachine.Error, match="dialed"):
        m1._b.dial("https://127.0.0.1:1/").shutdown()


def test_framework_events_say_what_happens_to_machines(tb):
    events = []
    arrived = threading.Condition()

    def hear(event):
        with arrived:
            events.append(event)
            arrived.notify_all()

    unsubscribe = tb.subscribe(hear)
    m1, m2 = running(tb, 2, {"F": Framework()})
    tb.system.kill(m2)
    with arrived:
        assert arrived.wait_for(lambda: any(e.kind == "stopped" for e in events), timeout=30)
    m1.cancel()
    with arrived:
        assert arrived.wait_for(lambda: sum(e.kind == "stopped" for e in events) == 2, 30)
    kinds = {m: [e.kind for e in events if e.machine is m] for m in (m1, m2)}
    assert kinds[m1] == kinds[m2] == ["starting", "running", "stopped"]
    stopped = {e.machine: e for e in events if e.kind == "stopped"}
    assert stopped[m2].reason is m2.err and "keepalive" in str(m2.err)
    assert isinstance(stopped[m1].reason, bigmachine.Cancelled)
    assert all(isinstance(e, bigmachine.MachineEvent) and e.time > 0 for e in events)
    unsubscribe()
    running(tb, 1, {"F": Framework()})
    assert len(events) == 6
    with pytest.raises(TypeError, match="MachineEvent"):
        tb.subscribe("not a function")



def test_framework_unhealthy_machine_has_its_heap_and_variables_saved(tb, tmp_path,
                                                                       monkeypatch):
    events = []
    tb.subscribe(events.append)
    tb.diagnostics_dir = str(tmp_path / "diagnostics")
    m, = running(tb, 1, {"F": Framework()})
    bigmachine.publish("framework.test", {"phase": "unhealthy"})
    try:
        # The machines of a TestSystem run in this process: lowering the line makes the next
        # keepalive report the memory in use now as past it.
        monkeypatch.setattr(bigmachine.Supervisor, "_HEALTH_LIMIT", -1.0)
        eventually(lambda: any(e.kind == "unhealthy" for e in events), 30, "unhealthy")
        assert not m.healthy
        def saved():
            if not os.path.isdir(tb.diagnostics_dir):
                return []                         # made when the first one is saved
            return sorted(n for n in os.listdir(tb.diagnostics_dir) if n.endswith((".txt", ".json")))
        eventually(lambda: len(saved()) == 2, 30, "diagnostics")
        heap, variables = saved()
        assert heap.endswith(".heap.txt") and variables.endswith(".vars.json")
        text = (tmp_path / "diagnostics" / heap).read_text()
        assert m.addr in text and "KiB" in text or "MiB" in text or "B " in text
        saved = json.loads((tmp_path / "diagnostics" / variables).read_text())
        assert saved["framework.test"] == {"phase": "unhealthy"}
        assert saved["memory"]["used_percent"] >= 0 and "rpc.server" in saved
        monkeypatch.setattr(bigmachine.Supervisor, "_HEALTH_LIMIT", 101.0)
        eventually(lambda: any(e.kind == "healthy" for e in events), 30, "healthy again")
        assert m.healthy and m.state is RUNNING
    finally:
        bigmachine.unpublish("framework.test")


@contextlib.contextmanager
def memory_cgroup(limit):
    """A memory cgroup of its own with that limit in bytes (v1 or v2); skips the test where
    this process may not make one."""
    for parent, limit_file in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes"),
                               ("/sys/fs/cgroup", "memory.max")):
        if os.path.exists(os.path.join(parent, limit_file if parent.endswith("memory")
                                       else "cgroup.subtree_control")):
            directory = os.path.join(parent, "bigmachine-test-%d" % os.getpid())
            try:
                os.mkdir(directory)
            except OSError:
                continue
            try:
                with open(os.path.join(directory, limit_file), "w") as f:
                    f.write(str(limit))
            except OSError:
                os.rmdir(directory)
                continue
            try:
                yield directory
            finally:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        os.rmdir(directory)
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
            return
    pytest.skip("cannot make a memory cgroup here (needs root and a writable cgroup fs)")


def test_framework_machine_killed_for_memory_says_out_of_memory(tmp_path, lb):
    with memory_cgroup(96 << 20) as cgroup:
        # The machines' interpreter runs them in the cgroup, as a batch system would.
        python = tmp_path / "python-in-cgroup"
        python.write_text("#!/bin/sh\necho $$ > %s/cgroup.procs\nexec %s \"$@\"\n"
                          % (cgroup, sys.executable))
        python.chmod(0o755)
        with bigmachine.start(bigmachine.Local(python=str(python), **FAST)) as b:
            m, = running(b, 1, {"F": Framework()})
            other, = running(lb, 1, {"F": Framework()})       # not in the cgroup
            pid = m.call("Supervisor.getpid")
            eventually(lambda: m.next_keepalive is not None, what="a keepalive")
            with pytest.raises((bigmachine.MachineStopped, bigmachine.NetworkError)):
                m.call("F.allocate", 400)
            assert m.wait(STOPPED, timeout=30) is STOPPED
            # A machine killed by SIGKILL for another reason is not said to be out of memory.
            os.kill(other.call("Supervisor.getpid"), signal.SIGKILL)
            assert other.wait(STOPPED, timeout=30) is STOPPED
    assert isinstance(m.err, bigmachine.OutOfMemory), m.err
    assert "out of memory" in str(m.err) and "oom_kill 1" in str(m.err)
    assert m.addr in str(m.err) and str(pid) in str(m.err)
    assert not isinstance(other.err, bigmachine.OutOfMemory)
    assert "killed by signal SIGKILL" in str(other.err)


def test_framework_debug_pages_mount_in_a_wsgi_server(tb):
    import wsgiref.simple_server

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args):
            pass

    m, = running(tb, 1, {"F": Framework()})
    app = tb.debug_wsgi(prefix="/admin/debug")

    def user_app(environ, start_response):
        # The user's own application, which hands its /admin/debug pages to bigmachine.
        if environ["PATH_INFO"].startswith("/admin/debug"):
            return app(environ, start_response)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"the user's page"]

    server = wsgiref.simple_server.make_server("127.0.0.1", 0, user_app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]

    def get(path, host=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", path, headers={"Host": host or "127.0.0.1:%d" % port})
        reply = conn.getresponse()
        body = reply.read().decode()
        conn.close()
        return reply.status, reply.getheader("Content-Type"), body

    try:
        assert get("/elsewhere")[2] == "the user's page"
        status, kind, page = get("/admin/debug/bigmachine/status")
        assert status == 200 and kind.startswith("text/html") and m.addr in page
        assert 'href="/admin/debug/bigmachine/stacks?' in page and 'href="/debug/' not in page
        status, kind, text = get("/admin/debug/vars")
        assert status == 200 and m.addr in json.loads(text)["machines"]
        status, _, text = get("/admin/debug/bigmachine/stacks")
        assert status == 200 and "== %s (RUNNING) ==" % m.addr in text
        # The pprof index names every kind of Go's, and those with no Python equivalent say so.
        status, _, page = get("/admin/debug/bigmachine/pprof/")
        for kind in ("profile", "heap", "goroutine", "mutex", "block", "threadcreate", "allocs"):
            assert ">%s</a>" % kind in page
        status, _, text = get("/admin/debug/bigmachine/pprof/mutex")
        assert status == 501 and "no mutex profile: Python's locks record no contention" in text
        status, _, text = get("/admin/debug/bigmachine/pprof/heap")
        assert status == 200 and m.addr in text
        assert get("/admin/debug/bigmachine/nothing")[0] == 404
        # The same checks as serve_debug's server: a name that is not loopback is refused.
        assert get("/admin/debug/vars", host="attacker.example")[0] == 403
    finally:
        server.shutdown()
        server.server_close()
    # The same pages from the built-in server, answered by the same code.
    addr = tb.serve_debug("127.0.0.1:0")
    conn = http.client.HTTPConnection(*bigmachine._split_host_port(addr), timeout=60)
    conn.request("GET", "/debug/bigmachine/pprof/block")
    reply = conn.getresponse()
    assert reply.status == 501 and b"no block profile" in reply.read()
    conn.close()
    with pytest.raises(ValueError, match="URL path"):
        tb.debug_wsgi(prefix="debug")


def test_framework_ec2_data_volume_boot_customisation_and_kept_instances(ec2):
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq1xCkh4y1v2vAMv7Yc4nA8XWcGDh0OHbFQbIfX1dX8 ada@desk"
    for bad in (dict(data_gib=0), dict(ssh_keys=["not a key"]),
                dict(boot_script="echo\nBIGMACHINE_BOOT_SCRIPT\n")):
        with pytest.raises(ValueError):
            ec2_system(**bad)
    system = ec2_system(data_gib=20, ssh_keys=[key], keep_instances=True,
                        boot_script='echo "ran as $(id -u)" > "$HOME/booted"\n')
    events = []
    with bigmachine.start(system) as b:
        b.subscribe(events.append)
        m, = b.start(1, {"F": Framework()})
        assert m.wait(RUNNING, timeout=60) is RUNNING, m.err
        instance_id = instance_id_of(m)
        home = ec2.instances[instance_id]["dir"]
        # The data volume: an EBS volume of data_gib at /dev/sdb, and temporary files on it.
        [instance] = ec2.session(system.session)
        volumes = {d["DeviceName"]: d["Ebs"]["VolumeId"] for d in instance["BlockDeviceMappings"]}
        [volume] = ec2.ec2.describe_volumes(VolumeIds=[volumes["/dev/sdb"]])["Volumes"]
        assert volume["Size"] == 20 and volume["VolumeType"] == "gp3"
        tmp, variable = m.call("F.tmpdir")
        # (the machine's own directory, made in the TMPDIR the data section set)
        assert tmp == variable and tmp.startswith(str(home / "mnt" / "data" / "tmp") + "/")
        # Boot customisation ran before the machine, and a person's key is let in.
        assert (home / "booted").read_text().startswith("ran as ")
        assert (home / ".ssh" / "authorized_keys").read_text().splitlines() == [key]
        assert oct((home / ".ssh" / "authorized_keys").stat().st_mode & 0o777) == "0o600"
        # Events say which market the instance came from.
        running_event = [e for e in events if e.kind == "running"]
        assert running_event and running_event[0].details == {
            "instance_id": instance_id, "instance_type": "m5.large", "market": "spot"}
    # keep_instances: the machine exited, its instance was not terminated.
    assert m.state is STOPPED and "shut down" in str(m.err)
    [instance] = ec2.session(system.session)
    assert instance["State"]["Name"] == "running" and ec2.alive() == [instance_id]
    eventually(lambda: "keeping this instance" in ec2.log(instance_id), 30, "the kept instance")
    # Without the options, none of it: no data volume, no section in the user data.
    plain = ec2_system()
    with bigmachine.start(plain) as b:
        m, = running(b, 1, {"F": Framework()})
        tmp, _ = m.call("F.tmpdir")
        assert "mnt" not in tmp
        [instance] = ec2.session(plain.session)
        assert [d["DeviceName"] for d in instance["BlockDeviceMappings"]] == ["/dev/xvda"]
    eventually(lambda: all_terminated(ec2, plain.session), 30, "the plain instance to end")


def test_framework_ec2_machine_short_of_memory_turns_unhealthy_then_out_of_memory(ec2, tmp_path):
    system = ec2_system()
    with memory_cgroup(160 << 20) as cgroup, bigmachine.start(system) as b:
        events = []
        b.subscribe(events.append)
        b.diagnostics_dir = str(tmp_path)
        m, = running(b, 1, {"F": Framework()})
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(m.call("Supervisor.getpid")))
        # Past 95% of its cgroup's limit (Go's line): the next keepalive says it is unhealthy.
        assert m.call("F.fill_memory_to", 0.965) >= 0.965
        eventually(lambda: any(e.kind == "unhealthy" for e in events) or m.state is STOPPED,
                   30, "the machine to be unhealthy")
        assert not m.healthy
        with pytest.raises((bigmachine.MachineStopped, bigmachine.NetworkError)):
            m.call("F.allocate", 400)
        assert m.wait(STOPPED, timeout=30) is STOPPED
    # The kernel's count of OOM kills is on the instance; the driver judges by the last
    # keepalive, which saw the machine at its limit.
    assert isinstance(m.err, bigmachine.OutOfMemory), m.err
    assert instance_id_of(m) in str(m.err) and "at its last keepalive" in str(m.err)


# ======================================================================================
# Nothing lost, nothing left (issue 20): what an attack-and-fault review and a new user's
# first day broke, each against real processes where it is about processes and the wire
# ======================================================================================

class CodedError(Exception):
    """The most common way to write an exception: __init__ wants what args does not hold."""

    def __init__(self, code, detail):
        super().__init__("%s: %s" % (code, detail))
        self.code = code


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no str")

    def __repr__(self):
        raise RuntimeError("no repr")


class RefusesPickling(Exception):
    def __reduce__(self):
        raise TypeError("this exception refuses to be pickled")


class FailingAfter(io.RawIOBase):
    """A binary file of n bytes (a pattern) whose next read raises ValueError."""

    def __init__(self, n):
        super().__init__()
        self.data, self.at = bytes(i % 251 for i in range(n)), 0

    def readable(self):
        return True

    def readinto(self, b):
        if self.at >= len(self.data):
            raise ValueError("the source broke after %d bytes" % len(self.data))
        n = min(len(b), len(self.data) - self.at, 7000)
        b[:n] = self.data[self.at:self.at + n]
        self.at += n
        return n


class Faulty:
    """A service whose methods fail in the ways a user's code does."""

    def __init__(self):
        self.runs = collections.Counter()
        self.b = None

    def init(self, b):
        self.b = b

    def pid(self):
        return os.getpid()

    def ran(self, name):
        return self.runs[name]

    def exit(self):
        self.runs["exit"] += 1
        raise SystemExit(3)

    def interrupt(self):
        self.runs["interrupt"] += 1
        raise KeyboardInterrupt

    def unprintable(self):
        self.runs["unprintable"] += 1
        raise Unprintable()

    def refuses_pickling(self):
        self.runs["refuses_pickling"] += 1
        raise RefusesPickling("kept its message")

    def coded(self, code):
        raise CodedError(code, "boom")

    def fails_to_load(self):
        e = ValueError("odd state")
        e.part = FailsToLoad()
        raise e

    def relay(self, addr, method, *args):
        return self.b.dial(addr).call(method, *args)

    def yields_then(self, sizes, error):
        for i, size in enumerate(sizes):
            yield bytes([i % 256]) * size
        if error == "exit":
            raise SystemExit(4)
        raise CodedError(7, "broke mid-stream")

    def read_all(self, f, size):
        got = bytearray()
        try:
            while True:
                block = f.read(size) if size else f.read()
                if not block:
                    return len(got), None, None
                got += block
        except Exception as e:
            return bytes(got), type(e).__name__, str(e)

    def start_a_session(self):
        return bigmachine.start("test")

    def spawn(self):
        """Processes of every kind a method may leave: a subprocess, one in a session of its
        own, a fork (which holds the machine's port), and an orphan whose parent exited."""
        pids = [subprocess.Popen(["sleep", "60"]).pid,
                subprocess.Popen(["sleep", "60"], start_new_session=True).pid]
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        pids.append(child)
        r, w = os.pipe()
        middle = os.fork()
        if middle == 0:
            orphan = subprocess.Popen(["sleep", "60"]).pid
            os.write(w, str(orphan).encode())
            os._exit(0)
        os.close(w)
        pids.append(int(os.read(r, 64)))
        os.close(r)
        os.waitpid(middle, 0)
        return pids

    def file_limit(self):
        import resource
        return resource.getrlimit(resource.RLIMIT_NOFILE)


def test_faults_system_exit_and_unprintable_errors_say_what_was_raised(lb):
    """Item 1: SystemExit, KeyboardInterrupt, an exception whose str and repr raise and one
    whose pickling raises: each comes back as an error that says what was raised, is not
    temporary (so retry_call does not run the method again), and the machine goes on."""
    m, = running(lb, 1, {"Faulty": Faulty()})
    pid = m.call("Faulty.pid")
    bounded = m.options(timeout=10)       # retries of a temporary error would go on for ever
    for method, type_name in (("exit", "SystemExit"), ("interrupt", "KeyboardInterrupt")):
        with pytest.raises(bigmachine.RemoteError) as info:
            bounded.retry_call("Faulty." + method)
        e = info.value
        assert e.type_name == type_name and not e.temporary
        assert "not raised in its caller" in str(e) and "in %s" % method in e.traceback
        assert m.call("Faulty.ran", method) == 1                 # it ran once
    with pytest.raises(Unprintable) as info:                     # it arrives as itself
        bounded.retry_call("Faulty.unprintable")
    assert "in unprintable" in str(info.value.__cause__)
    with pytest.raises(bigmachine.RemoteError) as info:
        bounded.retry_call("Faulty.refuses_pickling")
    assert info.value.message == "kept its message"
    assert "this exception refuses to be pickled" in info.value.why
    assert m.call("Faulty.ran", "unprintable") == m.call("Faulty.ran", "refuses_pickling") == 1
    # A SystemExit in the middle of a stream: the bytes, then the error that says so.
    with m.call("Faulty.yields_then", [1000], "exit") as f:
        assert f.read(300) == b"\0" * 300 and f.read() == b"\0" * 700
        with pytest.raises(bigmachine.RemoteError, match="SystemExit"):
            f.read()
    assert m.call("Faulty.pid") == pid and m.state is RUNNING


def test_faults_streams_deliver_every_byte_before_their_error(lb):
    """Item 2: a stream that fails part-way gives its reader every byte that was sent before
    the error, whatever the read sizes, and then the error; both ways."""
    m, = running(lb, 1, {"Faulty": Faulty()})
    sizes = [65536, 1, 70000, 300, 64000]                      # 200,000 bytes in all
    sent = b"".join(bytes([i]) * n for i, n in enumerate(sizes))
    for read_size in (65536, 300, 1 << 20, None):
        got = bytearray()
        with m.call("Faulty.yields_then", sizes, "error") as f:
            while True:
                try:
                    block = f.read(read_size) if read_size else f.read()
                except CodedError as e:
                    assert e.code == 7
                    break
                assert block, "the stream ended without its error"
                got += block
        assert bytes(got) == sent, (read_size, len(got))
    # lines: the last one, without its newline, then the error
    with m.call("Faulty.yields_then", [10, 5], "error") as f:
        assert f.readline() == b"\0" * 10 + b"\1" * 5
        with pytest.raises(CodedError):
            f.readline()
    # A streamed argument whose source breaks: the machine reads all of it, then the error.
    for read_size in (65536, 300, None):
        source = FailingAfter(100000)
        got, name, text = m.call("Faulty.read_all", source, read_size)
        assert got == source.data and name == "ValueError" and "after 100000 bytes" in text
    assert m.call("Faulty.ran", "x") == 0                      # and the machine serves on


def test_faults_a_machines_processes_end_with_it(lb):
    """Item 3: what a service method started -- a subprocess, one in a session of its own, a
    fork holding the machine's port, an orphan -- ends when the machine does, cleanly."""
    m, = running(lb, 1, {"Faulty": Faulty()})
    pids = m.call("Faulty.spawn")
    host, port, _ = bigmachine._parse_addr(m.addr)
    try:
        assert all(_alive(pid) for pid in pids)
        lb.shutdown()
        assert m.state is STOPPED
        eventually(lambda: not any(_alive(pid) for pid in pids), timeout=10,
                   what="the machine's processes to end with it")
        with socket.create_server(("127.0.0.1", port)):     # nobody holds its port
            pass
    finally:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_faults_watchdog_ends_a_machine_with_its_lease():
    """Item 6: a machine whose lease runs out exits then, not at the watchdog's next tick
    (here every 30 s: the lease is 120 s; the driver's next keepalive is 30 s away)."""
    system = bigmachine.Local(keepalive_period=60.0, keepalive_timeout=120.0,
                              keepalive_rpc_timeout=5.0, lease=120.0)
    with bigmachine.start(system) as b:
        m, = running(b, 1)
        eventually(lambda: m.keepalive_replies, what="the first keepalive")
        m.call("Supervisor.keepalive", 1.0)                 # as if the driver froze now
        assert m.wait(STOPPED, timeout=15) is STOPPED, "still %s" % m.state
        assert "exited with code 1" in str(m.err)


def _upgrade_request(addr):
    host, port, prefix = bigmachine._parse_addr(addr)
    return ("GET %sbigrpc HTTP/1.1\r\nHost: %s:%d\r\nConnection: Upgrade\r\nUpgrade: %s\r\n"
            "Bigmachine-Python: %s\r\nBigmachine-Protocol: %d\r\n\r\n" % (
                prefix, host, port, bigmachine._UPGRADE, bigmachine.PYTHON,
                bigmachine.PROTOCOL)).encode()


def test_faults_a_frame_right_behind_the_upgrade_is_served(lb):
    """Item 7: a caller that sends its first frame in the same write as the upgrade request
    (so that the machine reads both at once) gets its reply."""
    m, = running(lb)
    host, port, _ = bigmachine._parse_addr(m.addr)
    context = bigmachine.client_context(lb._authority.issue("eager", server=False))
    body = pickle.dumps(((41,), {}, None), 5)
    frame = bigmachine._HEADER.pack(bigmachine.CALL, 0, 0, len(b"Echo.echo"), 9, len(body))
    with socket.create_connection((host, port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            tls.sendall(_upgrade_request(m.addr) + frame + b"Echo.echo" + body)
            rfile = tls.makefile("rb")
            assert rfile.readline().startswith(b"HTTP/1.1 101")
            while rfile.readline() not in (b"\r\n", b""):
                pass
            kind, _, _, _, call_id, length = bigmachine._HEADER.unpack(
                rfile.read(bigmachine._HEADER.size))              # times out if not served
            assert (kind, call_id, pickle.loads(rfile.read(length))) == (bigmachine.REPLY, 9, 41)


def test_faults_authenticated_peers_get_room_when_files_run_short(lb):
    """Item 8: a machine allowed 200 files, held by 250 connections that never start TLS
    (and would hold them for a minute): a new authenticated caller is still served."""
    import resource
    m, = running(lb, 1, {"Faulty": Faulty()}, env={"BIGMACHINE_HANDSHAKE_TIMEOUT": "60"})
    pid = m.call("Faulty.pid")
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (200, 200))
    host, port, _ = bigmachine._parse_addr(m.addr)
    held = []
    try:
        for _ in range(250):
            held.append(socket.create_connection((host, port), timeout=10))
        client = bigmachine._Client(lb._credentials)
        try:
            assert client.peer(m.addr).call("Faulty.pid", (), {}, time.monotonic() + 20) == pid
        finally:
            client.close()
        assert m.call("Faulty.pid") == pid
    finally:
        for s in held:
            s.close()


def test_faults_machines_raise_their_soft_file_limit(tmp_path):
    """Item 8: a machine raises its soft limit on open files to the hard one."""
    result = run_script(tmp_path, """
        import resource, bigmachine, test_bigmachine
        if __name__ == "__main__":
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
            with bigmachine.start(bigmachine.Local()) as b:
                m, = b.start(1, {"Faulty": test_bigmachine.Faulty()})
                m.wait()
                print("limits", list(m.call("Faulty.file_limit")) + [hard])
    """)
    assert result.returncode == 0, result.stderr
    soft, hard, driver_hard = json.loads(result.stdout.split("limits ")[1])
    assert soft == hard == driver_hard


def test_faults_user_exceptions_arrive_as_themselves_through_hops(lb):
    """Item 9: an exception whose __init__ wants other arguments than args holds arrives as
    itself with its attributes, also through a machine-to-machine hop, which keeps the middle
    machine's frames and names both machines; one that cannot be rebuilt says why."""
    m1, m2 = running(lb, 2, {"Faulty": Faulty()})
    with pytest.raises(CodedError) as info:
        m1.call("Faulty.coded", 5)
    assert info.value.code == 5 and str(info.value) == "5: boom"
    with pytest.raises(CodedError) as info:
        m1.call("Faulty.relay", m2.addr, "Faulty.coded", 6)
    assert info.value.code == 6
    cause = str(info.value.__cause__)
    assert "raised on %s, passed on by %s" % (m2.addr, m1.addr) in cause
    assert "in relay" in cause and "in coded" in cause
    with pytest.raises(bigmachine.RemoteError) as info:
        m1.call("Faulty.relay", m2.addr, "Faulty.fails_to_load")
    e = info.value
    assert e.type_name == "ValueError" and e.message == "odd state"
    assert "could not be rebuilt here: RuntimeError: this object cannot be unpickled" in e.why
    assert m2.addr in str(e) and "in fails_to_load" in str(e)


class Calc:
    def add(self, a, b):
        return a + b


def add(a, b):
    return a + b


def test_faults_services_that_are_not_objects_are_refused(tb):
    """Item 10: a class, or a plain function, as a service is refused by b.start, saying
    what to do, before any machine starts."""
    import functools
    with pytest.raises(ValueError, match=r"'Calc' is the class Calc itself.*\{'Calc': Calc\(\)\}"):
        tb.start(1, {"Calc": Calc})
    for function in (add, lambda a, b: a + b, functools.partial(add, 1), Calc().add):
        with pytest.raises(ValueError, match="'add' is a function .*make the function a method"):
            tb.start(1, {"add": function})
    assert tb.machines() == []
    m, = running(tb, 1, {"Calc": Calc()})
    assert m.call("Calc.add", 2, 3) == 5


def test_faults_start_says_when_it_starts_fewer_machines(sshd, caplog):
    """Item 11: b.start(n) on a system with room for fewer warns how many and why, and
    exact=True makes that an error that starts none."""
    with bigmachine.start(ssh_system(sshd, per_host=1)) as b:
        with pytest.raises(bigmachine.Error, match=r"b.start\(2\) can start only 1 machine: "
                                                   r"SSHSystem runs at most per_host=1"):
            b.start(2, {"Echo": Echo()}, exact=True)
        assert b.machines() == []
        with caplog.at_level(logging.WARNING, logger="bigmachine"):
            machines = b.start(2, {"Echo": Echo()})
        assert len(machines) == 1
        warned = [r.getMessage() for r in caplog.records if "started only 1" in r.getMessage()]
        assert warned and "per_host=1" in warned[0] and "exact=True" in warned[0]
        assert machines[0].wait(RUNNING, timeout=60) is RUNNING
        assert machines[0].call("Echo.echo", 1) == 1


def test_faults_a_service_starting_a_session_is_told_what_to_do(lb):
    """Item 12: bigmachine.start() in a service at run time is not a missing main guard."""
    m, = running(lb, 1, {"Faulty": Faulty()})
    with pytest.raises(bigmachine.Error, match="started by the driver only.*b.dial") as info:
        m.call("Faulty.start_a_session")
    assert "__main__" not in str(info.value)


def test_faults_a_driver_read_from_stdin(tmp_path):
    """Item 12: a driver fed on standard input: services from importable modules work, and
    one whose class lives in the driver's own code is refused with what to do."""
    code = textwrap.dedent("""
        import bigmachine, test_bigmachine
        class Mine:
            def f(self):
                return 1
        if __name__ == "__main__":
            with bigmachine.start("local") as b:
                m, = b.start(1, {"Echo": test_bigmachine.Echo()})
                print("state", m.wait(), m.call("Echo.echo", 7))
                try:
                    b.start(1, {"Mine": Mine()})
                except bigmachine.Error as e:
                    print("refused:", e)
    """)
    result = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, PYTHONPATH=HERE),
                            cwd=str(tmp_path))
    assert "state RUNNING 7" in result.stdout, result.stderr
    assert "refused: service 'Mine'" in result.stdout and "Save the program to a file" in \
        result.stdout, result.stdout + result.stderr
    assert "FileNotFoundError" not in result.stderr


def _debug_get(addr, path, headers=None, timeout=20):
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def _idle_connections(addr, n):
    host, port = addr.rsplit(":", 1)
    return [socket.create_connection((host, int(port)), timeout=10) for _ in range(n)]


def _closed_by_server(s):
    """Did the server close connection s (rather than leave it waiting)? A connection it had
    accepted reads EOF; one still in the listening socket's backlog when that closed is reset."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_faults_debug_server_ends_idle_connections_and_all_at_shutdown(monkeypatch):
    """Item 4: idle connections to the debug pages time out, and shutting the session down
    closes the server and every connection, whose threads end."""
    baseline = threading.active_count()
    b = bigmachine.start(bigmachine.TestSystem(**FAST))
    try:
        addr = b.serve_debug("127.0.0.1:0")
        idle = _idle_connections(addr, 20)
        eventually(lambda: threading.active_count() >= baseline + 20,
                   what="a thread for each connection")
        b.shutdown()
        for s in idle:
            assert _closed_by_server(s)                        # closed, not left waiting
            s.close()
        eventually(lambda: threading.active_count() <= baseline + 1, timeout=10,
                   what="the debug server's threads to end")
        with pytest.raises(OSError):
            _idle_connections(addr, 1)
    finally:
        b.shutdown()
    monkeypatch.setattr(bigmachine._DebugPages, "timeout", 0.5)
    with bigmachine.start(bigmachine.TestSystem(**FAST)) as b:
        addr = b.serve_debug("127.0.0.1:0")
        s, = _idle_connections(addr, 1)
        with s:
            assert _closed_by_server(s)                        # the idle timeout closed it
        assert _debug_get(addr, "/debug/bigmachine/status")[0] == 200


def test_faults_debug_pages_refuse_other_sites_and_leave_tracing_alone(tb):
    """Item 5: requests a browser marks as coming from another site's page are refused before
    they do anything; profiles are capped; the heap page leaves tracemalloc as it was."""
    m, = running(tb)
    addr = tb.serve_debug("127.0.0.1:0")
    profile = "/debug/bigmachine/pprof/profile?seconds=0.2"
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "http://evil.example"}, {"Origin": "null"}):
        status, body = _debug_get(addr, profile, headers)
        assert status == 403 and b"other sites" in body, headers
    assert m.call("Supervisor.vars")["rpc.server"]["methods"].get("Supervisor.profile") is None
    status, _ = _debug_get(addr, profile, {"Sec-Fetch-Site": "same-origin",
                                           "Origin": "http://%s" % addr})
    assert status == 200
    status, body = _debug_get(addr, "/debug/bigmachine/pprof/profile?seconds=3600")
    assert status == 400 and b"between 0 and 300" in body
    assert not tracemalloc.is_tracing()
    try:
        status, body = _debug_get(addr, "/debug/bigmachine/pprof/heap?seconds=0.2")
        assert status == 200 and b"is off again" in body
        assert not tracemalloc.is_tracing()                    # as it found it
    finally:
        tracemalloc.stop()


def test_faults_a_machines_processes_end_with_it_over_ssh(sshd):
    """Item 3, on another system: an SSH machine's processes end with it too (the machine's
    side is the same code on every system)."""
    with bigmachine.start(ssh_system(sshd)) as b:
        m, = running(b, 1, {"Faulty": Faulty()})
        pids = m.call("Faulty.spawn")
        try:
            assert all(_alive(pid) for pid in pids)
            b.shutdown()
            eventually(lambda: not any(_alive(pid) for pid in pids), timeout=10,
                       what="the machine's processes to end with it")
        finally:
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


class SlowToStart:
    """A service whose init takes longer than a short lease."""

    def __init__(self, seconds):
        self.seconds = seconds

    def init(self, b):
        time.sleep(self.seconds)

    def ready(self):
        return True


def test_a_boot_longer_than_the_lease_keeps_its_machine():
    """The lease runs from a machine's start, the keepalive loop from RUNNING: the driver
    renews the lease through the boot steps between (here a slow init), or the machine would
    give up on its driver while the driver waits for it."""
    settings = dict(FAST, lease=1.0, keepalive_period=0.2)
    with bigmachine.start(bigmachine.Local(**settings)) as b:
        m, = b.start(1, {"Slow": SlowToStart(3.0)})
        assert m.wait(RUNNING, timeout=60) is RUNNING, m.err
        assert m.call("Slow.ready") is True


# ======================================================================================
# Slurm: machines as jobs of a real one-node cluster (slurmctld + slurmd + munged on
# loopback, started by the tests), and enrolment (issue #19)
# ======================================================================================

SLURM_DAEMONS = {name: shutil.which(name) or next(
    (p for p in ("/usr/sbin/" + name, "/usr/local/sbin/" + name) if os.access(p, os.X_OK)), None)
    for name in ("slurmctld", "slurmd", "munged")}


class SlurmCluster(typing.NamedTuple):
    conf: str                 # its slurm.conf: SLURM_CONF for every client command
    dir: str
    cpus: int                 # the one node's CPUs

    def run(self, *args):
        return subprocess.run(list(args), capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, SLURM_CONF=self.conf))

    def jobs(self, name=None):
        """squeue's jobs (of job name, if given): {"JOBID_TASK": STATE}."""
        args = ["squeue", "--noheader", "--array", "--format=%i|%T|%j"]
        out = self.run(*args).stdout
        return {f[0]: f[1] for f in (line.split("|") for line in out.splitlines())
                if len(f) == 3 and (name is None or f[2] == name)}


def become(user):
    """In a child, before exec: be user (Popen's user= and group= need Python 3.9)."""
    os.setgid(user.pw_gid)
    os.setgroups([user.pw_gid])
    os.setuid(user.pw_uid)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A Slurm cluster of one node on 127.0.0.1, for the whole test session: munged (as user
    munge, with a socket of its own), slurmctld and slurmd on free ports, all state in a
    temporary directory, stopped by pid at the end. Skipped only where Slurm is not installed
    (apt-get install slurm-wlm munge)."""
    missing = [name for name, path in SLURM_DAEMONS.items() if not path]
    missing += [c for c in ("sbatch", "squeue", "scancel", "scontrol") if not shutil.which(c)]
    if missing:
        pytest.skip("Slurm's %s not found (apt-get install slurm-wlm munge)" % ", ".join(missing))
    import tempfile
    d = tempfile.mkdtemp(prefix="bigmachine-slurm-")
    os.chmod(d, 0o755)                # munged checks every directory up to its socket
    munge = pwd.getpwnam("munge")
    munge_dir = os.path.join(d, "munge")
    os.mkdir(munge_dir, 0o755)
    os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
    socket_path = os.path.join(munge_dir, "socket")
    procs = []
    saved = os.environ.get("SLURM_CONF")
    try:
        log = open(os.path.join(d, "daemons.log"), "w")
        procs.append(subprocess.Popen(
            [SLURM_DAEMONS["munged"], "-F", "--socket=" + socket_path,
             "--pid-file=%s/pid" % munge_dir, "--log-file=%s/log" % munge_dir,
             "--seed-file=%s/seed" % munge_dir], preexec_fn=functools.partial(become, munge),
            stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        eventually(lambda: os.path.exists(socket_path), 10, "munged's socket")
        conf = os.path.join(d, "slurm.conf")
        cpus = 8
        with open(conf, "w") as f:
            f.write(textwrap.dedent("""\
                ClusterName=bigmachinetest
                SlurmctldHost=localhost(127.0.0.1)
                SlurmctldPort=%(ctld)d
                SlurmdPort=%(slurmd)d
                AuthType=auth/munge
                CredType=cred/munge
                AuthInfo=socket=%(socket)s
                SlurmUser=root
                MailProg=/bin/true
                ProctrackType=proctrack/linuxproc
                TaskPlugin=task/none
                JobAcctGatherType=jobacct_gather/none
                MpiDefault=none
                SelectType=select/cons_tres
                SelectTypeParameters=CR_Core
                SchedulerType=sched/backfill
                KillWait=2
                StateSaveLocation=%(d)s/state
                SlurmdSpoolDir=%(d)s/spool
                SlurmctldLogFile=%(d)s/slurmctld.log
                SlurmdLogFile=%(d)s/slurmd.log
                SlurmctldPidFile=%(d)s/slurmctld.pid
                SlurmdPidFile=%(d)s/slurmd.pid
                SlurmdParameters=config_overrides
                ReturnToService=2
                NodeName=localhost NodeAddr=127.0.0.1 CPUs=%(cpus)d RealMemory=4000 State=UNKNOWN
                PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
                """ % dict(ctld=bigmachine._free_port(), slurmd=bigmachine._free_port(),
                           socket=socket_path, d=d, cpus=cpus)))
        for sub in ("state", "spool"):
            os.mkdir(os.path.join(d, sub))
        os.environ["SLURM_CONF"] = conf
        for args in ([SLURM_DAEMONS["slurmctld"], "-D", "-f", conf],
                     [SLURM_DAEMONS["slurmd"], "-D", "-f", conf, "-N", "localhost"]):
            procs.append(subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=log))
        cluster = SlurmCluster(conf, d, cpus)
        eventually(lambda: cluster.run("sinfo", "--noheader", "--format=%T").stdout.strip()
                   == "idle", 30, "the Slurm node to be idle")
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def slurm(slurm_cluster):
    """The cluster, checked after the test: no job of any bigmachine session is left."""
    yield slurm_cluster
    deadline = time.monotonic() + 15
    while True:
        left = {job: state for job, state in slurm_cluster.jobs().items()}
        if not left:
            return
        if time.monotonic() > deadline:
            slurm_cluster.run("scancel", "--user=%s" % pwd.getpwuid(UID).pw_name)
            pytest.fail("Slurm jobs left behind: %s" % left)
        time.sleep(0.1)


def slurm_system(**options):
    settings = dict(FAST, python=sys.executable, driver_host="127.0.0.1")
    settings.update(options)
    return bigmachine.SlurmSystem(**settings)


def test_slurm_cluster_serves_calls(slurm):
    system = slurm_system(cpus=2)
    with bigmachine.start(system) as b:
        machines = b.start(2, {"Echo": Echo("slurm")}, env={"BIGMACHINE_TEST_VAR": "in a job"})
        for m in machines:
            assert m.wait(RUNNING, timeout=60) is RUNNING, m.err
        jobs = slurm.jobs(system.job_name)
        assert len(jobs) == 2 and set(jobs.values()) == {"RUNNING"}, jobs
        pids = [m.call("Echo.pid") for m in machines]
        assert len(set(pids)) == 2 and os.getpid() not in pids
        for m in machines:
            assert m.maxprocs == 2 == b.system.maxprocs()
            assert m.call("Echo.environ", "SLURM_JOB_ID") is not None
            assert m.call("Echo.environ", "BIGMACHINE_TEST_VAR") == "in a job"
            assert m.call("Echo.system") == ("slurm", 2)
        check_remote_cluster(machines, pids, "slurm", "on the cluster")
        # Another b.start of the same session: a job array of its own.
        m3, = running(b, 1, {"Echo": Echo("slurm")})
        assert len(slurm.jobs(system.job_name)) == 3 and len(b.machines()) == 3
        assert m3.call("Echo.dial_and_call", machines[0].addr, "Echo.pid") == pids[0]
    eventually(lambda: slurm.jobs(system.job_name) == {}, 15, "the jobs to end")


def test_slurm_pending_jobs_wait_and_say_why_and_ended_jobs_stop_their_machines(slurm):
    # Each machine takes every CPU of the one node: the second waits for the first's.
    system = slurm_system(cpus=slurm.cpus)
    with bigmachine.start(system) as b:
        machines = b.start(2, {"Echo": Echo()})
        # Which of the two jobs the controller allocates first is its choice (srun: each
        # machine asks for its own allocation at once).
        eventually(lambda: RUNNING in {m.state for m in machines} or
                   STOPPED in {m.state for m in machines}, 60, "a machine to run")
        m1, m2 = sorted(machines, key=lambda m: m.state is not RUNNING)
        assert m1.state is RUNNING, m1.err
        assert m2.wait(RUNNING, timeout=1) is STARTING          # returns: it does not hang
        eventually(lambda: "PENDING (Resources)" in m2.status, 10, "Slurm's reason")
        job1, job2 = (system._jobs[m] for m in (m1, m2))
        assert job2 in m2.status
        page = bigmachine._status_page(b, 0)
        assert "PENDING (Resources)" in page and job2 in page
        # The job ends under the machine (an administrator cancels it, say).
        assert slurm.run("scancel", job1).returncode == 0
        assert m1.wait(STOPPED, timeout=30) is STOPPED
        assert job1 in str(m1.err) and "CANCELLED" in str(m1.err), m1.err
        with pytest.raises(bigmachine.MachineStopped):
            m1.call("Echo.pid")
        # Its CPUs are free: the pending one runs now.
        assert m2.wait(RUNNING, timeout=60) is RUNNING, m2.err
        assert m2.status == "" and m2.call("Echo.environ", "SLURM_CPUS_PER_TASK") == str(slurm.cpus)
    assert m2.state is STOPPED and "shut down" in str(m2.err)
    eventually(lambda: slurm.jobs(system.job_name) == {}, 15, "the jobs to end")


def test_slurm_job_held_forever_does_not_hang_and_shutdown_cancels_it(slurm):
    system = slurm_system(sbatch_args=["--hold"])
    b = bigmachine.start(system)
    try:
        m, = b.start(1, {"Echo": Echo()})
        assert m.wait(RUNNING, timeout=1.5) is STARTING
        eventually(lambda: "PENDING" in m.status, 10, "Slurm's reason")
        assert "Held" in m.status, m.status                     # JobHeldUser
        assert list(slurm.jobs(system.job_name).values()) == ["PENDING"]
        with pytest.raises(bigmachine.Timeout):
            m.options(timeout=0.5).call("Echo.pid")
    finally:
        b.shutdown()
    assert m.state is STOPPED
    eventually(lambda: slurm.jobs(system.job_name) == {}, 15, "the job to be cancelled")


@pytest.mark.parametrize("submit", ["srun", "sbatch"])
def test_slurm_bad_input_is_refused_before_anything_runs(slurm, tmp_path, submit):
    cases = [
        (dict(partition="nosuchpartition"), "no partition 'nosuchpartition' .*it has: debug"),
        (dict(cpus=1000), "cpus=1000: no node of partition debug has more than 8 CPUs"),
        (dict(mem=10 ** 8), "no node of partition debug has more than 4000 MiB"),
        # What only sbatch (srun) itself judges: its own message.
        (dict(sbatch_args=["--mem=99999999"]), "%s failed .submitting 1 machine.*Memory" % submit),
        (dict(sbatch_args=["--partition=nosuch"]), "%s failed .*[Ii]nvalid partition" % submit),
    ]
    for options, message in cases:
        system = slurm_system(submit=submit, **options)
        with bigmachine.start(system) as b:
            with pytest.raises(bigmachine.Error, match=message):
                b.start(1, {"Echo": Echo()})
            assert b.machines() == [] and slurm.jobs(system.job_name) == {}
    # A job that sbatch accepts but that can never run (this cluster does not enforce its
    # partitions' limits at submission): its machine stops, saying why, and it is cancelled.
    system = slurm_system(submit=submit, sbatch_args=["--partition=debug", "--cpus-per-task=1000"])
    with bigmachine.start(system) as b:
        m, = b.start(1, {"Echo": Echo()})
        assert m.wait(RUNNING, timeout=30) is STOPPED
        assert "can never start" in str(m.err) and "PartitionConfig" in str(m.err), m.err
        eventually(lambda: slurm.jobs(system.job_name) == {}, 15, "the job to be cancelled")
    # No Slurm here: no sbatch on PATH, or a configuration that is not there.
    saved = dict(os.environ)
    try:
        os.environ["PATH"] = str(tmp_path)
        with bigmachine.start(slurm_system(submit=submit)) as b:
            with pytest.raises(bigmachine.Error, match="needs %s, which is not on PATH" % submit):
                b.start(1, {"Echo": Echo()})
        os.environ.update(PATH=saved["PATH"], SLURM_CONF=str(tmp_path / "nowhere.conf"))
        with bigmachine.start(slurm_system()) as b:
            with pytest.raises(bigmachine.Error, match="SLURM_CONF=.*nowhere.conf"):
                b.start(1, {"Echo": Echo()})
    finally:
        os.environ.clear()
        os.environ.update(saved)
    with pytest.raises(ValueError, match="cpus"):
        bigmachine.SlurmSystem(cpus=0)


def test_slurm_job_script_holds_only_a_one_time_token(slurm, tmp_path):
    system = slurm_system(submit="sbatch")
    with bigmachine.start(system) as b:
        m, = running(b)
        job = system._jobs[m]
        script = slurm.run("scontrol", "write", "batch_script", job.split("_")[0], "-").stdout
        assert "#!/bin/sh" in script and system.session in script
        # What an administrator can read: no key of any kind, no certificate.
        assert "PRIVATE KEY" not in script and "CERTIFICATE" not in script
        key_pem = b.credentials.key_pem.split("-----")[2].strip()
        assert key_pem[:40] not in script
        # The token in it was used: running the script again (as someone who read it would)
        # is refused, and the machine is not disturbed.
        replay = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60,
                                env=dict(os.environ, SLURM_ARRAY_TASK_ID="0"))
        assert replay.returncode == 1, replay.stderr
        assert "refused this machine" in replay.stderr and "used already" in replay.stderr
        assert m.call("Echo.pid") > 0 and m.state is RUNNING


def test_slurm_killed_driver_jobs_end_within_the_lease(slurm, tmp_path):
    driver = textwrap.dedent("""
        import os, signal, sys
        import bigmachine
        from test_bigmachine import Echo

        if __name__ == "__main__":
            system = bigmachine.SlurmSystem(python=sys.executable, driver_host="127.0.0.1",
                                            lease=3.0, keepalive_period=0.5)
            b = bigmachine.start(system)
            m, = b.start(1, {"Echo": Echo()})
            assert m.wait(bigmachine.RUNNING, timeout=60) is bigmachine.RUNNING, m.err
            print(system.job_name, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = run_script(tmp_path, driver, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    name = result.stdout.strip()
    assert name.startswith("bigmachine-")
    eventually(lambda: slurm.jobs(name) == {}, 30, "the dead driver's job to end")


def test_slurm_list_and_kill_find_the_jobs_of_sessions(slurm):
    system = slurm_system()
    with bigmachine.start(system) as b:
        m, = running(b)
        command = [sys.executable, os.path.join(HERE, "bigmachine.py"), "slurm"]
        listed = subprocess.run(command + ["list"], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        job = system._jobs[m]
        line, = [l for l in listed.stdout.splitlines() if l.startswith(job + " ")]
        assert system.session in line and "RUNNING" in line
        other = subprocess.run(command + ["kill", "000000000000"], capture_output=True,
                               text=True, timeout=60)
        assert other.returncode == 0 and "0 jobs cancelled" in other.stdout
        assert m.state is RUNNING
        killed = subprocess.run(command + ["kill", system.session], capture_output=True,
                                text=True, timeout=60)
        assert killed.returncode == 0 and "cancelled %s" % job in killed.stdout, killed.stderr
        assert m.wait(STOPPED, timeout=30) is STOPPED
        assert "CANCELLED" in str(m.err) and job in str(m.err)


class ShellSystem(bigmachine.System):
    """A system written from outside the library, on its public interface alone (README:
    "Writing a system"): each machine is `sh -c COMMAND` on this host, COMMAND its enrolment's,
    as a scheduler or a cloud's startup script would run it somewhere."""

    name = "shell"

    def __init__(self, **keepalive):
        super().__init__(**keepalive)
        self.enrolments, self.procs = {}, {}

    def start(self, b, n, env):
        machines = []
        for i in range(n):
            m = bigmachine.Machine(b, "https://shell-%d.pending:0/" % i, owned=True, maxprocs=1)
            self.enrolments[m] = b.enrol(m, env=env, host="127.0.0.1")
            machines.append(m)
        return machines

    def launch(self, b, machine):
        enrolment = self.enrolments[machine]
        machine.report_status("running its command")
        self.procs[machine] = subprocess.Popen(
            ["sh", "-c", enrolment.command(sys.executable)], start_new_session=True)
        if not enrolment.wait(60):
            raise bigmachine.Error("machine %s did not enrol in 60s" % machine.addr)

    def terminate(self, machine, deadline):
        enrolment, proc = self.enrolments.pop(machine, None), self.procs.pop(machine, None)
        if enrolment is not None:
            enrolment.revoke()
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def shutdown(self):
        for machine in list(self.enrolments):
            self.terminate(machine, 0)


def test_a_system_written_on_the_public_interface_enrols_its_machines(tmp_path):
    system = ShellSystem(**FAST)
    with bigmachine.start(system) as b:
        machines = b.start(2, {"Echo": Echo("shell")}, env={"BIGMACHINE_TEST_VAR": "enrolled"})
        for m in machines:
            assert m.wait(RUNNING, timeout=60) is RUNNING, m.err
            assert m.hostname == "127.0.0.1" and m.call("Echo.environ", "BIGMACHINE_TEST_VAR") \
                == "enrolled"
            assert m.call("Echo.system") == ("shell", 1)
        pids = [m.call("Echo.pid") for m in machines]
        check_remote_cluster(machines, pids, "shell", "enrolled")
        m1, m2 = machines
        assert all(system.enrolments[m].enrolled for m in machines)
        assert b._enrolment._tokens == {}            # used tokens are forgotten at once
        # A machine whose process ends stops with how it ended.
        os.kill(m1.call("Echo.pid"), signal.SIGKILL)
        assert m1.wait(STOPPED, timeout=10) is STOPPED
        assert "SIGKILL" in str(m1.err), m1.err
        assert m2.call("Echo.echo", 1) == 1
        # A command that meets another server than its driver's says so and sends nothing.
        m3, = b.start(1, {"Echo": Echo()})
        enrolment = system.enrolments[m3]
        settings = enrolment.settings(wait=5)
        settings["fingerprint"] = "0" * 64
        impostor = subprocess.run([sys.executable, "-c", bigmachine._enrol_program(settings)],
                                  capture_output=True, text=True, timeout=60)
        assert impostor.returncode == 1 and "is not this machine's driver" in impostor.stderr
        assert m3.wait(RUNNING, timeout=60) is RUNNING, m3.err     # its token was not spent
        command = enrolment.command(sys.executable)
        assert "PRIVATE KEY" not in command and enrolment.token in command
        replay = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                                timeout=60)
        assert replay.returncode == 1 and "used already" in replay.stderr


def test_ec2_user_data_holds_no_machine_key(ec2):
    """EC2 on the enrolment's principle: what user data holds (readable from the instance's
    metadata and by AWS principals) is a bootstrap's server-only certificate that expires; the
    machine makes its own key on the instance and the driver certifies it."""
    import ast
    system = ec2_system()
    with bigmachine.start(system) as b:
        m1, m2 = running(b, 2)
        text = base64.b64decode(ec2.ec2.describe_instance_attribute(
            InstanceId=instance_id_of(m1), Attribute="userData")["UserData"]["Value"]).decode()
        settings = ast.literal_eval(text.split("sys.exit(_ec2_boot(")[1].split("))\n")[0])
        leaked = bigmachine.Credentials(settings["cert"], settings["key"], settings["ca"])
        # Whoever reads it cannot call the machines: they refuse a certificate without
        # client use, as the TLS handshake shows.
        stranger = bigmachine._Client(leaked)
        try:
            for m in (m1, m2):
                with pytest.raises(bigmachine.AuthenticationError):
                    stranger.peer(m.addr).call("Supervisor.ping", (1,), {},
                                               time.monotonic() + 10)
        finally:
            stranger.close()
        # The machine serves with a key of its own, which user data never held.
        host, port = m1.hostname, urllib.parse.urlsplit(m1.addr).port
        context = bigmachine.client_context(b.credentials)
        with socket.create_connection((host, port), 10) as raw:
            with context.wrap_socket(raw) as sock:
                served = ssl.DER_cert_to_PEM_cert(sock.getpeercert(True))
        assert served.strip() != settings["cert"].strip() and served not in text
        assert m1.call("Echo.dial_and_call", m2.addr, "Echo.pid") == m2.call("Echo.pid")
        # On the machine, b.system is the EC2 system's view: an m5.large's 2 vCPUs (#16).
        assert m1.call("Echo.system") == ("ec2", 2) and b.system.maxprocs() == 2


def test_machines_know_their_system_and_its_maxprocs(sshd):
    """Issue #16: on a machine, b.system says which system it belongs to and what each of its
    machines offers, as the driver's system does."""
    for system, expected in ((bigmachine.Local(maxprocs=3, **FAST), ("local", 3)),
                             (bigmachine.TestSystem(maxprocs=2, **FAST), ("test", 2)),
                             (ssh_system(sshd, per_host=2),
                              ("ssh", max(1, os.cpu_count() // 2)))):
        with bigmachine.start(system) as b:
            m, = running(b, services={"Echo": Echo()})
            assert m.call("Echo.system") == expected
            assert (b.system.name, b.system.maxprocs()) == expected == (
                b.system.name, m.maxprocs)


def test_slurm_node_with_another_python_is_a_version_mismatch(slurm):
    python = _other_python()
    if python is None:
        pytest.skip("no other CPython 3.8+ under %s" % PYENV)
    system = slurm_system(python=python)
    with bigmachine.start(system) as b:
        m, = b.start(1, {"Echo": Echo()})
        assert m.wait(RUNNING, timeout=60) is STOPPED
        assert isinstance(m.err, bigmachine.VersionMismatch), m.err
        assert bigmachine.PYTHON in str(m.err) and python in str(m.err)
    eventually(lambda: slurm.jobs(system.job_name) == {}, 15, "the job to end")


def test_slurm_flags_and_variables(monkeypatch):
    options = bigmachine.SlurmSystem._command_line_options(
        ["prog", "--bigm.slurm.cpus=4", "--bigm.slurm.partition", "short", "-n", "3"],
        {"BIGMACHINE_SLURM_MEM": "512", "BIGMACHINE_SLURM_SBATCH_ARGS": "--qos=low --nice=5",
         "BIGMACHINE_SLURM_CPUS": "2", "BIGMACHINE_SLURM_TIME_LIMIT": "30"})
    assert options == {"cpus": 4, "partition": "short", "mem": 512, "time_limit": 30,
                       "sbatch_args": ["--qos=low", "--nice=5"]}
    monkeypatch.setattr(sys, "argv", ["prog", "--bigm.system=slurm", "--bigm.slurm.cpus=3",
                                      "--bigm.slurm.account", "physics"])
    b = bigmachine.start()
    try:
        assert isinstance(b.system, bigmachine.SlurmSystem)
        assert (b.system.cpus, b.system.account, b.system.maxprocs()) == (3, "physics", 3)
    finally:
        b.shutdown()
    with pytest.raises(ValueError, match="cpus must be a whole number"):
        bigmachine.SlurmSystem._command_line_options(["prog", "--bigm.slurm.cpus=many"], {})


def test_slurm_machine_that_exits_says_how_and_its_job_ends(slurm):
    # setup runs in the job before the machine (here: what `module load` would do).
    system = slurm_system(setup="BIGMACHINE_SETUP_RAN=yes; export BIGMACHINE_SETUP_RAN")
    with bigmachine.start(system) as b:
        m, other = running(b, 2)
        job = system._jobs[m]
        assert other.call("Echo.environ", "BIGMACHINE_SETUP_RAN") == "yes"
        assert m.call("Supervisor.shutdown", 0, 3) is True
        assert m.wait(STOPPED, timeout=30) is STOPPED
        assert "exited with code 3" in str(m.err) and job in str(m.err), m.err
        assert m.err.exit_code == 3
        eventually(lambda: job not in slurm.jobs(system.job_name), 15, "its job to end")
        assert other.call("Echo.echo", 1) == 1 and other.state is RUNNING


@pytest.mark.parametrize("submit", ["srun", "sbatch"])
def test_slurm_machine_killed_by_a_signal_of_its_own_says_so(slurm, submit):
    # A signal death waits for the job's state (Slurm signals a job's processes when it ends
    # the job, NODE_FAIL say); a job that merely ended after its machine did leaves the
    # signal as the reason.
    with bigmachine.start(slurm_system(submit=submit)) as b:
        m, other = running(b, 2, {"Victim": Victim()})
        job = b.system._jobs[m]
        os.kill(m.call("Victim.pid"), signal.SIGKILL)    # the one-node cluster is this host
        assert m.wait(STOPPED, timeout=30) is STOPPED
        assert "killed by signal SIGKILL" in str(m.err) and job in str(m.err), m.err
        assert m.err.exit_code == -signal.SIGKILL
        assert other.call("Victim.echo", 1) == 1 and other.state is RUNNING


# ======================================================================================
# Packages: the driver's distributions on machines whose Python lacks them
# ======================================================================================
#
# A driver in a virtual environment of its own holds distributions that the machines' Python
# (this interpreter, outside that environment) lacks: bmtest_ext, with an extension module
# compiled here by setuptools and gcc; bmtest_pure, Python with a data file; and bmtest_alien,
# whose wheel says it was built for another architecture. Each is a wheel made here and
# installed by pip, so each has the RECORD that pip writes. The driver runs as a process of
# its own (PACKAGES_DRIVER) against the tests' sshd or moto, and prints what it saw as JSON.

PACKAGES_EXT_C = r"""
#include <Python.h>
static PyObject *add(PyObject *self, PyObject *args) {
    long a, b;
    if (!PyArg_ParseTuple(args, "ll", &a, &b)) return NULL;
    return PyLong_FromLong(a + b);
}
static PyMethodDef methods[] = {{"add", add, METH_VARARGS, "a + b, in C"}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speed", NULL, -1, methods};
PyMODINIT_FUNC PyInit__speed(void) { return PyModule_Create(&module); }
"""

PACKAGES_DRIVER = r"""
import importlib, json, os, sys
import bigmachine
import bmtest_ext                          # at the top: machines load it with main
import bmtest_pure

class Probe:
    def use(self):
        import bmtest_ext, bmtest_pure, importlib.metadata
        return {"sum": bmtest_ext.add(2, 3), "ext": bmtest_ext._speed.__file__,
                "value": bmtest_pure.VALUE, "data": bmtest_pure.data(),
                "version": importlib.metadata.version("bmtest_ext"), "path": sys.path}

def address(instance):
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags") or ()}
    port = tags.get("bigmachine-test:port")
    return ("127.0.0.1", int(port)) if port else None

def main():
    import logging
    logging.basicConfig(level=logging.INFO)
    settings = json.loads(sys.argv[1])
    n = settings.pop("n", 1)
    machine_env = settings.pop("env", {})
    if settings.pop("alien", False):
        import bmtest_alien
    fast = dict(keepalive_period=0.5, keepalive_timeout=5.0, keepalive_rpc_timeout=2.0,
                lease=10.0)
    if settings.pop("system") == "ssh":
        system = bigmachine.SSHSystem(settings.pop("hosts"), **fast, **settings)
    else:
        system = bigmachine.EC2System(address=address, **fast, **settings)
    out = {}
    try:
        with bigmachine.start(system) as b:
            machines = b.start(n, {"Probe": Probe()}, env=machine_env)
            for m in machines:
                m.wait(bigmachine.RUNNING, timeout=120)
            out["states"] = [m.state.name for m in machines]
            out["state"] = machines[0].state.name
            out["err"] = str(machines[0].err) if machines[0].err else None
            if all(m.state is bigmachine.RUNNING for m in machines):
                out["results"] = [m.call("Probe.use") for m in machines]
                out["result"] = out["results"][0]
    except Exception as e:
        out["error"] = "%s: %s" % (type(e).__name__, e)
    out["sent"] = system.packages_sent
    print("RESULT " + json.dumps(out))

if __name__ == "__main__":
    main()
"""


def make_wheel(directory, name, files, tag, purelib=True):
    """A wheel of name 1.0 holding files ({path: bytes}), tagged tag, made by hand."""
    info = "%s-1.0.dist-info" % name
    files = dict(files)
    files[info + "/METADATA"] = ("Metadata-Version: 2.1\nName: %s\nVersion: 1.0\n\n"
                                 % name).encode()
    files[info + "/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: bigmachine-tests\n"
                              "Root-Is-Purelib: %s\nTag: %s\n"
                              % (str(purelib).lower(), tag)).encode()
    record = []
    for path, data in sorted(files.items()):
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append("%s,sha256=%s,%d\n" % (path, digest, len(data)))
    record.append(info + "/RECORD,,\n")
    files[info + "/RECORD"] = "".join(record).encode()
    wheel = os.path.join(str(directory), "%s-1.0-%s.whl" % (name, tag))
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in sorted(files.items()):
            z.writestr(path, data)
    return wheel


class PackagesVenv(typing.NamedTuple):
    python: str                   # the driver's interpreter, in the venv
    site: str                     # the venv's site-packages
    wheels: str                   # the directory of the wheels made
    dir: str


@pytest.fixture(scope="module")
def packages_venv(tmp_path_factory):
    if not shutil.which("gcc") or not os.path.exists(os.path.join(
            __import__("sysconfig").get_paths()["include"], "Python.h")):
        pytest.skip("building an extension module needs gcc and Python's headers")
    pytest.importorskip("setuptools", reason="building an extension module needs setuptools")
    d = tmp_path_factory.mktemp("packages")
    project = d / "project"
    (project / "bmtest_ext").mkdir(parents=True)
    (project / "bmtest_ext" / "_speed.c").write_text(PACKAGES_EXT_C)
    subprocess.run([sys.executable, "-c",
                    "from setuptools import setup, Extension; setup(name='bmtest_ext', "
                    "ext_modules=[Extension('bmtest_ext._speed', ['bmtest_ext/_speed.c'])], "
                    "script_args=['-q', 'build_ext', '--inplace'])"],
                   cwd=str(project), check=True, stdout=subprocess.DEVNULL)
    built, = [p for p in (project / "bmtest_ext").iterdir() if p.name.startswith("_speed.")
              and p.suffix == ".so"]
    facts = bigmachine._platform_facts()
    cp = "cp%d%d" % sys.version_info[:2]
    wheels = d / "wheels"
    wheels.mkdir()
    made = [
        make_wheel(wheels, "bmtest_ext", {
            "bmtest_ext/__init__.py": b"from bmtest_ext._speed import add\n"
                                      b"from bmtest_ext import _speed\n",
            "bmtest_ext/" + built.name: built.read_bytes()},
            "%s-%s-%s" % (cp, cp, facts["tags"][-1]), purelib=False),
        make_wheel(wheels, "bmtest_pure", {
            "bmtest_pure/__init__.py": b"import os\nVALUE = 'first'\n"
                                       b"def data():\n    with open(os.path.join(os.path.dirname("
                                       b"__file__), 'data.txt')) as f:\n        return f.read()\n",
            "bmtest_pure/data.txt": b"shipped data\n"}, "py3-none-any"),
        make_wheel(wheels, "bmtest_alien", {"bmtest_alien/__init__.py": b"X = 1\n"},
                   "%s-%s-linux_riscv64" % (cp, cp), purelib=False),
    ]
    venv = d / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                    str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # pip from the base environment installs into the venv (sys.prefix), and writes RECORDs.
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
           "--no-deps", "--ignore-installed"]
    subprocess.run(pip + made[:2], check=True)
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, stdout=subprocess.PIPE).stdout.decode().strip()
    # The foreign wheel goes in the way pip installs for another platform: --target.
    subprocess.run(pip + ["--target", site, "--platform", "linux_riscv64", "--only-binary=:all:",
                          "--python-version", bigmachine.PYTHON, "--implementation", "cp",
                          made[2]], check=True)
    for name in ("bmtest_ext", "bmtest_pure", "bmtest_alien"):
        assert importlib.util.find_spec(name) is None      # the machines' Python lacks them
    yield PackagesVenv(python, site, str(wheels), str(d))


def run_packages_driver(venv, settings, tmp_path, env=None):
    """Run PACKAGES_DRIVER in the venv with settings; returns (its JSON result, its stderr)."""
    script = tmp_path / "driver.py"
    script.write_text(PACKAGES_DRIVER)
    here = os.path.dirname(os.path.abspath(bigmachine.__file__))
    environ = dict(os.environ, PYTHONPATH=here, **(env or {}))
    done = subprocess.run([venv.python, str(script), json.dumps(settings)], cwd=str(tmp_path),
                          env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=240)
    out = done.stdout.decode()
    err = done.stderr.decode(errors="replace")
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert lines, "the driver printed no result (exit %d): %s" % (done.returncode, err[-3000:])
    return json.loads(lines[-1][len("RESULT "):]), err


def package_cache(root):
    objects = os.path.join(root, "packages", "objects")
    return sorted(os.listdir(objects)) if os.path.isdir(objects) else []


def check_packages_used(result, venv):
    assert result["state"] == "RUNNING", result
    used = result["result"]
    assert used["sum"] == 5 and used["data"] == "shipped data\n" and used["version"] == "1.0"
    assert not used["ext"].startswith(venv.dir)                 # the machine's copy
    assert "/packages/envs/" in used["ext"]
    return used


def test_ssh_machine_imports_the_drivers_packages(sshd, packages_venv, tmp_path):
    shutil.rmtree(os.path.join(host_dir(sshd), "packages"), ignore_errors=True)
    settings = {"system": "ssh", "hosts": [sshd.host], "python": sys.executable,
                "ssh_options": sshd.options}
    # Two machines start on a host that lacks the packages: one of them is sent them.
    first, _ = run_packages_driver(packages_venv, dict(settings, n=2, per_host=2), tmp_path)
    assert first["states"] == ["RUNNING", "RUNNING"], first
    used = check_packages_used(first, packages_venv)
    assert used["value"] == "first" and first["results"][1]["ext"] == used["ext"]
    objects = os.path.join(host_dir(sshd), "packages", "objects")
    assert first["sent"] == sum(os.path.getsize(os.path.join(objects, name))
                                for name in package_cache(host_dir(sshd)))
    # The driver's packages come after the bundle and the standard library, and before the
    # host's own installed packages.
    path = used["path"]
    env = next(i for i, p in enumerate(path) if "/packages/envs/" in p)
    site = next(i for i, p in enumerate(path) if "site-packages" in p.split("/"))
    assert env < site and "/code" in path[0]
    assert first["sent"] > os.path.getsize(os.path.join(
        packages_venv.site, "bmtest_ext", os.path.basename(used["ext"])))
    objects = package_cache(host_dir(sshd))
    for name in objects:                                       # each one is what it says
        with open(os.path.join(host_dir(sshd), "packages", "objects", name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == name.split(".")[0]
    # Again: the host has them all, and nothing travels.
    second, _ = run_packages_driver(packages_venv, settings, tmp_path)
    assert check_packages_used(second, packages_venv) and second["sent"] == 0
    assert package_cache(host_dir(sshd)) == objects
    # A file edited on the driver after it was installed no longer matches its RECORD: the
    # driver says so, and ships the file as it is, alone.
    module = os.path.join(packages_venv.site, "bmtest_pure", "__init__.py")
    with open(module) as f:
        source = f.read()
    try:
        with open(module, "w") as f:
            f.write(source.replace("'first'", "'edited'"))
        third, err = run_packages_driver(packages_venv, settings, tmp_path)
        assert "does not match its RECORD" in err and "bmtest_pure" in err
        assert check_packages_used(third, packages_venv)["value"] == "edited"
        assert 0 < third["sent"] < 1000
    finally:
        with open(module, "w") as f:
            f.write(source)
    # packages=None: the machine's Python lacks them, and the machine says which.
    off, _ = run_packages_driver(packages_venv, dict(settings, packages=None), tmp_path)
    assert off["state"] == "STOPPED" and off["sent"] == 0
    assert "No module named 'bmtest_ext'" in off["err"], off
    eventually(lambda: machine_dirs(sshd) == [] and ssh_clients(sshd) == [], timeout=20,
               what="the machines and their ssh clients to go")


def test_ssh_packages_for_another_platform_stop_the_machine(sshd, packages_venv, tmp_path):
    settings = {"system": "ssh", "hosts": [sshd.host], "python": sys.executable,
                "ssh_options": sshd.options, "alien": True}
    result, _ = run_packages_driver(packages_venv, settings, tmp_path)
    assert result["state"] == "STOPPED" and result["sent"] == 0
    err = result["err"]
    assert "bmtest_alien 1.0 (it is built for linux_riscv64)" in err, err
    assert "bmtest_ext" not in err.split("cannot load")[1].split(". The driver")[0]
    facts = bigmachine._platform_facts()
    assert err.count("CPython %s on linux %s" % (bigmachine.PYTHON, facts["machine"])) == 2
    assert "packages=['bmtest_alien==1.0']" in err and "packages=None" in err
    eventually(lambda: machine_dirs(sshd) == [] and ssh_clients(sshd) == [], timeout=20,
               what="the machines and their ssh clients to go")


@pytest.mark.slow
def test_ssh_packages_installed_by_pip_on_the_machine(sshd, packages_venv, tmp_path):
    shutil.rmtree(os.path.join(host_dir(sshd), "packages", "pip"), ignore_errors=True)
    # The driver's pip finds the wheels in a directory (its "index" here: no network).
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": packages_venv.wheels}
    settings = {"system": "ssh", "hosts": [sshd.host], "python": sys.executable,
                "ssh_options": sshd.options, "packages": ["bmtest_ext==1.0", "bmtest_pure"]}
    result, err = run_packages_driver(packages_venv, settings, tmp_path, env)
    assert result["state"] == "RUNNING", (result, err[-2000:])
    used = result["result"]
    assert used["sum"] == 5 and used["value"] == "first" and "/packages/pip/" in used["ext"]
    assert result["sent"] > 0
    again, _ = run_packages_driver(packages_venv, settings, tmp_path, env)
    assert again["state"] == "RUNNING" and again["sent"] == 0
    assert again["result"]["ext"] == used["ext"]               # the cached environment
    # A driver that cannot download them (no index here): the machine's pip installs them
    # from the machine's own index (a directory of wheels, in the machines' environment).
    local, err = run_packages_driver(
        packages_venv, dict(settings, packages=["bmtest_ext", "bmtest_pure==1.0"],
                            env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": packages_venv.wheels}),
        tmp_path, {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""})
    assert local["state"] == "RUNNING", (local, err[-2000:])
    assert local["sent"] == 0 and "pip download for the machines' platform failed" in err
    assert local["result"]["sum"] == 5 and "/packages/pip/" in local["result"]["ext"]
    assert local["result"]["ext"] != used["ext"]
    # A requirement that nobody can satisfy: pip's own words reach the driver.
    bad, _ = run_packages_driver(packages_venv, dict(settings, packages=["bmtest_none==9"]),
                                 tmp_path, env)
    assert bad["state"] == "STOPPED" and "pip could not install bmtest_none==9" in bad["err"]
    eventually(lambda: machine_dirs(sshd) == [] and ssh_clients(sshd) == [], timeout=20,
               what="the machines and their ssh clients to go")


def test_ssh_unwritable_package_cache_is_a_clear_error(sshd, packages_venv, tmp_path):
    root = os.path.join(host_dir(sshd), "packages")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(host_dir(sshd), exist_ok=True)
    with open(root, "w") as f:                 # a file where the cache's directory goes
        f.write("in the way\n")
    try:
        settings = {"system": "ssh", "hosts": [sshd.host], "python": sys.executable,
                    "ssh_options": sshd.options}
        result, _ = run_packages_driver(packages_venv, settings, tmp_path)
        assert result["state"] == "STOPPED" and result["sent"] == 0
        assert "cannot write the package cache at %s" % root in result["err"], result
    finally:
        os.unlink(root)
    eventually(lambda: machine_dirs(sshd) == [] and ssh_clients(sshd) == [], timeout=20,
               what="the machines and their ssh clients to go")


@pytest.mark.slow
def test_ec2_machine_imports_the_drivers_packages(ec2, packages_venv, tmp_path):
    settings = {"system": "ec2"}
    first, err = run_packages_driver(packages_venv, settings, tmp_path)
    used = check_packages_used(first, packages_venv)
    # The venv's distributions travel; those the instance's Python has (boto3...) do not.
    assert used["value"] == "first" and 0 < first["sent"] < 1 << 20
    off, _ = run_packages_driver(packages_venv, dict(settings, packages=None), tmp_path)
    assert off["state"] == "STOPPED" and off["sent"] == 0
    assert "No module named 'bmtest_ext'" in off["err"], off
    eventually(lambda: not ec2.alive(), timeout=20, what="the instances to end")


def test_package_files_arrive_whole_or_not_at_all(tmp_path):
    stage = bigmachine._PackageStage(str(tmp_path), "0" * 64)
    data = b"a package file\n" * 1000
    sha = hashlib.sha256(data).hexdigest()
    objects = tmp_path / "packages" / "objects"
    # A transfer cut short: an error, and nothing in the cache, not even a part.
    with pytest.raises(bigmachine.Error, match="stopped arriving after 1000 bytes"):
        stage.receive([[sha, len(data), False]], io.BytesIO(data[:1000]))
    assert os.listdir(str(objects)) == []
    # Bytes that are not the ones hashed (changed on the driver while it sent them).
    with pytest.raises(bigmachine.Error, match="changed on the driver while it was sent"):
        stage.receive([[sha, len(data), False]], io.BytesIO(data[:-1] + b"?"))
    assert os.listdir(str(objects)) == []
    # Whole: kept under its hash, read-only; an executable one keeps its mode.
    assert stage.receive([[sha, len(data), False], [sha, len(data), True]],
                         io.BytesIO(data + data)) == 2 * len(data)
    assert sorted(os.listdir(str(objects))) == [sha, sha + ".x"]
    assert os.stat(str(objects / sha)).st_mode & 0o777 == 0o444
    assert os.stat(str(objects / (sha + ".x"))).st_mode & 0o777 == 0o555
    # A damaged object is caught when a later machine makes an environment from it, and
    # removed.
    os.chmod(str(objects / sha), 0o644)
    with open(str(objects / sha), "ab") as f:
        f.write(b"damage")
    stage = bigmachine._PackageStage(str(tmp_path), "0" * 64)
    stage.missing({"dists": [{"name": "p", "version": "1", "record": None, "tags": [],
                              "compiled": False, "files": [["p/x.txt", sha, len(data), False]]}]})
    with pytest.raises(bigmachine.Error, match="was damaged: it is removed"):
        stage._assemble()
    assert not (objects / sha).exists() and not os.listdir(str(tmp_path / "packages" / "envs"))
    # The driver's side: a file that shrank after it was hashed is an error, not short data;
    # one that grew sends the bytes it had.
    source = tmp_path / "source"
    source.write_bytes(b"12345")
    with pytest.raises(OSError, match="changed on the driver while it was sent"):
        bigmachine._FilesReader([(str(source), 9)]).read()
    assert bigmachine._FilesReader([(str(source), 3), (str(source), 5)]).read() == b"12312345"


def test_packages_option_is_checked():
    for good, kept in (("auto", "auto"), (None, None),
                       (["numpy==2.1", " six "], ("numpy==2.1", "six"))):
        assert bigmachine.SSHSystem(["h"], packages=good).packages == kept
    for bad in ("numpy", [], ["--index-url=http://x"], [3]):
        with pytest.raises(ValueError, match="packages is 'auto'"):
            bigmachine.SSHSystem(["h"], packages=bad)


@pytest.mark.parametrize("argv, variable, expected", [
    ([], None, "auto"), (["--bigm.packages=none"], None, None), ([], "off", None),
    (["--bigm.packages", "numpy==2.1,six"], None, ("numpy==2.1", "six")),
    (["--bigm.packages=auto"], "none", "auto")])
def test_packages_from_the_command_line(monkeypatch, argv, variable, expected):
    monkeypatch.setattr(sys, "argv", ["prog", "--bigm.ssh.hosts=h"] + argv)
    if variable is None:
        monkeypatch.delenv("BIGMACHINE_PACKAGES", raising=False)
    else:
        monkeypatch.setenv("BIGMACHINE_PACKAGES", variable)
    b = bigmachine.start("ssh")
    try:
        assert b.system.packages == expected
    finally:
        b.shutdown()


def test_a_record_that_lists_a_missing_file_stops_b_start(tmp_path, monkeypatch):
    site = tmp_path / "lib" / "site-packages"
    (site / "bmtest_liar").mkdir(parents=True)
    (site / "bmtest_liar" / "__init__.py").write_text("X = 1\n")
    info = site / "bmtest_liar-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bmtest_liar\nVersion: 2.0\n\n")
    (info / "RECORD").write_text("bmtest_liar/__init__.py,,\nbmtest_liar/gone.py,sha256=x,3\n"
                                 "bmtest_liar-2.0.dist-info/RECORD,,\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "bmtest_liar", raising=False)
    importlib.import_module("bmtest_liar")
    with pytest.raises(bigmachine.Error) as caught:
        bigmachine._make_bundle("auto")
    message = str(caught.value)
    assert "bmtest_liar 2.0" in message and str(site / "bmtest_liar" / "gone.py") in message
    assert "pip install --force-reinstall 'bmtest_liar==2.0'" in message
    assert "packages=None" in message
    assert bigmachine._make_bundle(None).packages is None            # shipping off: no error


# ======================================================================================
# Performance: startup from the library's compiled copy of itself
# ======================================================================================

COMPILED_DRIVER = """
import os, sys, bigmachine

class Where:
    def cached(self):
        return sys.modules["bigmachine"].__cached__

if __name__ == "__main__":
    with bigmachine.start("local") as b:
        m, = b.start(1, {"Where": Where()})
        assert m.wait(bigmachine.RUNNING, timeout=60) == bigmachine.RUNNING, m.err
        print(m.call("Where.cached"))
"""


def _compiled_run(tmp_path, tmpdir, **env):
    """Run COMPILED_DRIVER on a copy of bigmachine.py of its own (so no bytecode of it exists
    anywhere), with TMPDIR tmpdir: (machine's bigmachine.__cached__, the copy's directory)."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(os.path.join(HERE, "bigmachine.py"), str(src))
    env = dict(env, PYTHONPATH=str(src), TMPDIR=str(tmpdir))
    result = run_script(tmp_path, COMPILED_DRIVER, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1], src


def test_local_machines_load_the_compiled_module_from_the_librarys_cache(tmp_path):
    # PYTHONDONTWRITEBYTECODE=1: nothing is written into the user's tree, yet the machine does
    # not compile bigmachine.py: it loads the code the driver cached in its private directory.
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    cached, src = _compiled_run(tmp_path, tmpdir, PYTHONDONTWRITEBYTECODE="1")
    compiled = tmpdir / ("bigmachine-%d" % os.getuid()) / "compiled"
    files = os.listdir(str(compiled))
    assert len(files) == 1 and files[0].endswith(".marshal"), files
    assert cached == str(compiled / files[0])
    assert oct(os.stat(str(compiled)).st_mode & 0o777) == oct(0o700)
    assert not (src / "__pycache__").exists()
    # A second driver finds the same file (same source, same interpreter) and uses it; the
    # copy of another version, unused for more than a week, goes.
    stale = compiled / "0000-another-version.marshal"
    stale.write_bytes(b"")
    week_ago = time.time() - 8 * 86400
    os.utime(str(stale), (week_ago, week_ago))
    os.utime(cached, (week_ago, week_ago))
    shutil.rmtree(str(src))
    cached2, _ = _compiled_run(tmp_path, tmpdir, PYTHONDONTWRITEBYTECODE="1")
    assert cached2 == cached and os.stat(cached).st_mtime > week_ago + 86400
    assert os.listdir(str(compiled)) == files


def test_local_machines_import_the_module_when_the_cache_cannot_be_written(tmp_path):
    # The library's directory cannot be made (a file holds its name; mode bits would not stop
    # root): machines start all the same, importing the module the ordinary way.
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    (tmpdir / ("bigmachine-%d" % os.getuid())).write_text("not a directory")
    cached, src = _compiled_run(tmp_path, tmpdir, PYTHONDONTWRITEBYTECODE="1")
    assert not cached.endswith(".marshal"), cached
    assert not (src / "__pycache__").exists()


# ======================================================================================
# Performance: the caller's spin
# ======================================================================================

def test_a_caller_that_spins_in_vain_backs_off_and_gets_its_replies():
    # A reply that takes longer than the caller's spin: the caller sleeps in recv as before,
    # gets the right result, and does not spin on the next calls (twice as many after each
    # vain spin, up to 255). Whether a quick reply comes within the spin is the host's
    # business (bench/ measures it); the results are the same either way. Only a lone call
    # spins, so the keepalive, which calls the same machine, is kept out of the way: slow,
    # and its first call over before the test's begin.
    with _machine_without_keepalives_in_the_way() as m:
        _spin_backoff_checks(m)


@contextlib.contextmanager
def _machine_without_keepalives_in_the_way():
    """A test machine whose keepalive is slow, and whose first one is over: the calls of the
    test are alone on its connections."""
    with bigmachine.start(bigmachine.TestSystem(
            keepalive_period=60, keepalive_timeout=120, keepalive_rpc_timeout=10,
            lease=120)) as b:
        m, = running(b)
        eventually(lambda: len(m.keepalive_replies) >= 1, what="the first keepalive")
        yield m


def _spin_backoff_checks(m):
    peer = m._peer
    slept = m.call("Echo.sleep", 0)               # the connection is idle in the pool now
    backoffs, peer._spin_backoff = [], 0
    for i in range(5):
        peer._spin_skip = 0
        assert m.call("Echo.sleep", 0.02) is slept
        backoffs.append(peer._spin_backoff)
        assert peer._spin_skip == peer._spin_backoff
    assert backoffs == [1, 3, 7, 15, 31]
    skip = peer._spin_skip
    for i in range(skip):
        assert m.call("Echo.echo", i) == i
    assert peer._spin_skip == 0
    # Calls from many threads at once all get their own replies (only a lone call spins).
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda x: m.call("Echo.echo", x), range(200))) == list(range(200))


class CompiledFrom:
    """Says where a machine's bigmachine module came from."""

    def cached(self):
        return sys.modules["bigmachine"].__cached__


def test_ssh_machines_share_one_compiled_copy_of_the_library(sshd):
    # Each SSH machine unpacks the driver's code afresh: the first one compiles the library
    # and keeps the code in the host's bigmachine directory; the others load it from there.
    compiled = os.path.join(host_dir(sshd), "compiled")
    shutil.rmtree(compiled, ignore_errors=True)
    inodes = []
    for _ in range(2):
        with bigmachine.start(ssh_system(sshd)) as b:
            m, = running(b, 1, {"Where": CompiledFrom()})
            cached = m.call("Where.cached")
            assert os.path.dirname(cached) == compiled, cached
            inodes.append(os.stat(cached).st_ino)
    files = os.listdir(compiled)
    assert files == [os.path.basename(cached)] and files[0].endswith(".marshal")
    assert os.stat(compiled).st_mode & 0o777 == 0o700
    assert inodes[0] == inodes[1]          # loaded again, not written again (that renames)


# ======================================================================================
# Performance: one call path
# ======================================================================================

def test_every_kind_of_call_takes_one_path_with_the_same_results_and_statistics():
    # A plain call, one with keyword arguments, one with a deadline, one a future may cancel,
    # and one whose argument is a stream all go through _Peer.call: each gets the same result,
    # each is counted once with its bytes (an error reply as an error), and afterwards every
    # connection is back in the pool, none left marked busy.
    with _machine_without_keepalives_in_the_way() as m:
        peer, stats = m._peer, m._b._client.stats
        payload = b"p" * 1000
        ways = [
            ("plain", lambda: m.call("Echo.echo", payload)),
            ("keywords", lambda: m.call("Echo.echo", x=payload)[1]["x"]),
            ("deadline", lambda: m.options(timeout=30).call("Echo.echo", payload)),
            ("future", lambda: m.call_async("Echo.echo", payload).result(30)),
        ]
        for name, way in ways:
            before = stats.snapshot()["machines"][m.addr].get("Echo.echo", {})
            for _ in range(3):
                assert way() == payload, name
            after = stats.snapshot()["machines"][m.addr]["Echo.echo"]
            assert after["count"] - before.get("count", 0) == 3, name
            assert after["errors"] == before.get("errors", 0), name
            sent = after["request_bytes"] - before.get("request_bytes", 0)
            got = after["reply_bytes"] - before.get("reply_bytes", 0)
            assert 3 * 1000 < sent < 3 * 1200 and 3 * 1000 < got < 3 * 1200, (name, sent, got)
            assert not peer._busy and peer._idle, name
        # A streamed argument and reply, and an error reply (counted as an error, on every
        # path).
        for view in (m, m.options(timeout=30)):
            with view.call("Echo.echo_stream", io.BytesIO(payload)) as f:
                assert f.read() == payload
        eventually(lambda: not peer._busy, what="the stream's connection back in the pool")
        assert stats.snapshot()["machines"][m.addr]["Echo.echo_stream"]["count"] == 2
        for call in (lambda: m.call("Echo.fail", "no"),
                     lambda: m.options(timeout=30).call("Echo.fail", "no"),
                     lambda: m.call_async("Echo.fail", "no").result(30)):
            with pytest.raises(ValueError, match="no"):
                call()
        assert stats.snapshot()["machines"][m.addr]["Echo.fail"]["errors"] == 3
        with pytest.raises(bigmachine.SerializationError, match="lock"):
            m.call("Echo.echo", threading.Lock())
        assert not peer._busy and peer._idle
        # Connections taken and given back under the pool's lock: many threads at once.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda x: m.call("Echo.echo", x) if x % 2 else
                                m.options(timeout=30).call("Echo.echo", x), range(200)))
        assert got == list(range(200))
        assert not peer._busy and len(peer._idle) >= 2


# ======================================================================================
# Performance: Local machines forked by the fork server
# ======================================================================================

class Process:
    """What a machine process can tell of itself."""

    def facts(self):
        return {"pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0),
                "pgrp": os.getpgrp(), "cwd": os.getcwd(), "var": os.environ.get("FORK_VAR"),
                "mode": os.environ.get("BIGMACHINE_MODE"),
                "stdin": os.readlink("/proc/self/fd/0"),
                "threads": threading.active_count(),
                "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd"))}

    def spawn(self):
        return subprocess.Popen(["sleep", "600"]).pid

    def say(self, text):
        print(text, flush=True)

    def exit(self, code):
        os._exit(code)


def _environ_of(pid):
    """The environment process pid started with, as /proc shows it."""
    with open("/proc/%d/environ" % pid, "rb") as f:
        return dict(v.decode().partition("=")[::2] for v in f.read().split(b"\0") if v)


def test_local_machines_are_forked_by_the_fork_server_as_fresh_ones_would_start(
        tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    with bigmachine.start(bigmachine.Local(**FAST)) as b:
        machines = running(b, 2, {"Process": Process()}, env={"FORK_VAR": "asked"})
        facts = [m.call("Process.facts") for m in machines]
        server = facts[0]["ppid"]
        assert server in bigmachine._ForkServer.pids()
        for f in facts:
            # Forked by the fork server, in a session of its own, with what this launch asked
            # (also where other processes look: /proc, as `ps e` shows it).
            assert f["ppid"] == server != os.getpid()
            assert f["sid"] == f["pgrp"] == f["pid"]
            assert f["cwd"] == str(tmp_path) and f["var"] == "asked" and f["mode"] == "machine"
            assert _environ_of(f["pid"])["FORK_VAR"] == "asked"
            assert f["stdin"].startswith("pipe:")
            # Nothing of the fork server's left open: stdio, its listener, TLS and epoll.
            assert len(f["fds"]) < 20, f["fds"]
        assert facts[0]["pid"] != facts[1]["pid"]
        m1, m2 = machines
        # Output reaches the driver, prefixed; a process the machine starts ends with it.
        m1.call("Process.say", "hello from a fork")
        seen = []
        eventually(lambda: seen.append(capfd.readouterr().err) or
                   "%s: hello from a fork\n" % m1.addr in "".join(seen), what="forwarded output")
        sleeper = m1.call("Process.spawn")
        assert _alive(sleeper)
        # An exit is reported with its code, a kill with its signal, as for a fresh process.
        m1.call_async("Process.exit", 7)
        assert m1.wait(STOPPED, timeout=30) is STOPPED
        assert "exited with code 7" in str(m1.err), m1.err
        eventually(lambda: not _alive(sleeper), what="the machine's process group ended")
        os.kill(facts[1]["pid"], signal.SIGKILL)
        assert m2.wait(STOPPED, timeout=30) is STOPPED
        assert "killed by signal SIGKILL" in str(m2.err), m2.err
        # The fork server stays for the next machines; and it is kept single-threaded.
        m3, = running(b, 1, {"Process": Process()}, env={"FORK_VAR": "asked"})
        assert m3.call("Process.facts")["ppid"] == server
    assert server in bigmachine._ForkServer.pids() and _alive(server)
    with open("/proc/%d/status" % server) as f:
        assert "Threads:\t1\n" in f.read()


def test_local_machines_of_another_environment_fork_from_a_fork_server_of_their_own(
        monkeypatch):
    # A process's environment is fixed as it starts (/proc shows that one), as are the
    # interpreter's PYTHON* settings: machines with another one come from a fork server
    # started with it. A driver that turned the fork server off starts fresh processes.
    with bigmachine.start(bigmachine.Local(**FAST)) as b:
        parents = []
        for env in ({"FORK_VAR": "one"}, {"FORK_VAR": "two", "PYTHONHASHSEED": "7"}):
            m, = running(b, 1, {"Process": Process()}, env=env)
            f = m.call("Process.facts")
            assert f["ppid"] in bigmachine._ForkServer.pids() and f["var"] == env["FORK_VAR"]
            assert _environ_of(f["pid"]).items() >= env.items()
            parents.append(f["ppid"])
        assert parents[0] != parents[1]
    monkeypatch.setenv("BIGMACHINE_FORK_SERVER", "0")
    with bigmachine.start(bigmachine.Local(**FAST)) as b:
        m, = running(b, 1, {"Process": Process()}, env={"FORK_VAR": "fresh"})
        f = m.call("Process.facts")
        assert f["ppid"] == os.getpid() and f["sid"] == f["pid"] and f["var"] == "fresh"


def test_the_fork_server_and_its_machines_end_with_the_driver(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time, bigmachine
        class S:
            def pid(self):
                return os.getpid()
        if __name__ == "__main__":
            b = bigmachine.start(bigmachine.Local(keepalive_period=0.5, lease=60))
            ms = b.start(2, {"S": S()})
            for m in ms:
                m.wait()
            pids = [m.call("S.pid") for m in ms] + bigmachine._ForkServer.pids()
            print(" ".join(map(str, pids)), flush=True)
            time.sleep(600)
    """))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=HERE), text=True)
    pids = []
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) >= 3 and all(_alive(p) for p in pids)
        os.kill(driver.pid, signal.SIGKILL)
        eventually(lambda: not any(_alive(p) for p in pids), timeout=10,
                   what="the machines and the fork server to exit after the driver")
    finally:
        driver.kill()
        driver.wait()
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_machines_of_a_fork_server_that_dies_stop_saying_so_and_new_ones_start():
    with bigmachine.start(bigmachine.Local(**FAST)) as b:
        m, = running(b, 1, {"Process": Process()}, env={"FORK_VAR": "doomed"})
        f = m.call("Process.facts")
        os.kill(f["ppid"], signal.SIGKILL)
        assert m.wait(STOPPED, timeout=30) is STOPPED
        assert "fork server it was forked from (pid %d) died" % f["ppid"] in str(m.err), m.err
        eventually(lambda: not _alive(f["pid"]), what="the orphaned machine to be ended")
        m2, = running(b, 1, {"Process": Process()}, env={"FORK_VAR": "doomed"})
        f2 = m2.call("Process.facts")
        assert f2["ppid"] != f["ppid"] and f2["ppid"] in bigmachine._ForkServer.pids()


# ======================================================================================
# Performance: large messages read into huge pages
# ======================================================================================

def _huge_page_advised(obj):
    """Is some of obj's memory (a large bytes object) marked MADV_HUGEPAGE? /proc/self/smaps
    lists each mapping's flags; "hg" is that advice."""
    start, end = id(obj), id(obj) + len(obj)
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    span = None
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(x, 16) for x in head.split("-"))
            span = (low, high)
        elif line.startswith("VmFlags:") and span and span[0] < end and span[1] > start:
            if "hg" in line.split()[1:]:
                return True
    return False


class HugePages:
    def advised(self, blob):
        return _huge_page_advised(blob)

    def blob(self, n):
        return bytes(n)


def _transparent_huge_pages():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _transparent_huge_pages(), reason="no transparent huge pages here")
def test_a_large_argument_and_result_are_read_into_memory_advised_for_huge_pages(lb):
    m, = running(lb, 1, {"HugePages": HugePages()})
    size = 32 << 20
    assert m.call("HugePages.advised", b"x" * size) is True          # the machine's side
    result = m.call("HugePages.blob", size)
    assert result == bytes(size) and _huge_page_advised(result)        # the caller's side
    # Small ones are left as they are.
    assert m.call("HugePages.advised", b"x" * (4 << 20)) is False


# ======================================================================================
# Many tasks at full speed: batches sized by time, a worker fed a batch in one frame
# ======================================================================================

def _run_tasks_calls(b, m):
    """How many Supervisor.run_tasks calls machine m has served."""
    methods = b.vars()[m.addr]["rpc.server"]["methods"]
    return methods.get("Supervisor.run_tasks", {}).get("count", 0)


def test_executor_sends_long_tasks_one_by_one_and_short_ones_in_batches(lb, tmp_path):
    m, = running(lb, 1)
    with lb.executor(progress=False, per_machine=1) as ex:
        # Tasks that take longer than a batch aims to take go one call each, however long
        # the queue: batched, they would wait in one slot while another idles.
        ex.submit(task_marked_sleep, str(tmp_path), 0, 0.1).result(60)   # timed: long
        before = _run_tasks_calls(lb, m)
        args = [str(tmp_path)] * 12, range(12), [0.1] * 12
        assert list(ex.map(task_marked_sleep, *args)) == [x * x for x in range(12)]
        assert _run_tasks_calls(lb, m) - before == 12
        # Short ones travel many to a call. (What counts as short is made generous here, so
        # that a loaded host cannot make these tasks look long.)
        ex._BATCH_TIME = 60.0
        ex.submit(task_square, 1).result(60)                               # timed: short
        before = _run_tasks_calls(lb, m)
        assert list(ex.map(task_square, range(400))) == [x * x for x in range(400)]
        assert _run_tasks_calls(lb, m) - before < 200


def test_a_worker_runs_a_batch_and_a_task_that_ends_it_fails_alone(tmp_path):
    b = bigmachine.start(bigmachine.Local(**LOCAL2))
    ex = b.executor(progress=False, per_machine=1)
    ex._BATCH_TIME = 60.0          # every task here counts as short: they go in batches
    try:
        futures = [ex.submit(task_square, x) for x in range(20)] + [ex.submit(task_exit, 3)] + \
            [ex.submit(task_square, x) for x in range(20, 40)]
        m, = running(b, 1)
        with pytest.raises(bigmachine.Error, match="worker process .* ended"):
            futures[20].result(60)
        assert [f.result(60) for f in futures[:20] + futures[21:]] == [x * x for x in range(40)]
        assert _run_tasks_calls(b, m) < 41 - 10                   # they went in batches
        assert len(m.call("Supervisor.worker_pids")) == 1         # the one that took over
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
        b.shutdown()


@pytest.mark.parametrize("maxprocs", [1, 2])     # in the machine's process; in a worker
def test_a_batch_sized_by_a_wrong_guess_comes_back_with_the_tasks_it_did_not_start(
        tmp_path, maxprocs):
    lb = bigmachine.start(bigmachine.Local(**dict(FAST, maxprocs=maxprocs)))
    m, = running(lb, 1)
    try:
        _wrong_guess(lb, m, tmp_path)
    finally:
        lb.shutdown()


def _wrong_guess(lb, m, tmp_path):
    with lb.executor(progress=False, per_machine=1) as ex:
        ex._BATCH_TIME = 0.1       # a batch aims at 0.1 s, and comes back after 0.2 s
        warm = tmp_path / "warm"
        warm.mkdir()
        ex.submit(task_marked_sleep, str(warm), 0, 0).result(60)       # timed: quick
        before = _run_tasks_calls(lb, m)
        # Now its tasks take 0.3 s: the batches the old guess made stop after their first
        # task, and what they did not start runs later, once.
        futures = [ex.submit(task_marked_sleep, str(tmp_path), x, 0.3) for x in range(8)]
        assert [f.result(120) for f in futures] == [x * x for x in range(8)]
        assert _run_tasks_calls(lb, m) - before == 8
        starts = sorted(int(n.split("-")[1]) for n in os.listdir(str(tmp_path))
                        if n.startswith("start-"))
        assert starts == list(range(8))


def test_map_chunks_quick_inputs_itself_and_still_answers_one_input_at_a_time(lb):
    m, = running(lb, 1)
    with lb.executor(progress=False) as ex:
        ex._CHUNK_TIME = 60.0      # every input here counts as quick: map chunks them
        ex._BATCH = 1              # and a call carries one chunk, so calls count chunks
        ex.submit(task_square, 1).result(60)                               # timed
        before = _run_tasks_calls(lb, m)
        results = ex.map(task_square, list(range(300)) + ["x"] + list(range(300, 400)))
        assert [next(results) for _ in range(300)] == [x * x for x in range(300)]
        with pytest.raises(TypeError, match="can't multiply sequence"):
            next(results)                      # the failing input, in its place
        assert _run_tasks_calls(lb, m) - before < 40
        # An endless input still works: chunks are read as the results are consumed.
        assert list(itertools.islice(ex.map(task_square, itertools.count()), 5000))[-1] \
            == 4999 * 4999


# ======================================================================================
# The maintainer's pass (issue 18): the file's rules, each checked
# ======================================================================================

_STARTER_EVENTS = []


def _start_threads_for_ever():
    while True:
        thread = threading.Thread(target=int)
        thread.start()
        thread.join()


class ThreadStarter:
    """A method that does nothing but start threads, so that a cancel finds it doing so."""

    def run(self, key):
        _STARTER_EVENTS.append(("start", key))
        try:
            _start_threads_for_ever()
        finally:
            _STARTER_EVENTS.append(("end", key))


def test_a_cancel_interrupts_the_method_not_a_thread_it_is_starting(tb, monkeypatch):
    # Before Python 3.12, a thread being started carries its parent's ident until it runs,
    # and an interrupt raised by ident went to it: it died before it began ("exception
    # ignored in thread started by") and the method waited for it for ever. On those
    # versions nearly every one of these cancels found the method inside Thread.start().
    lost = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: lost.append(repr(u.exc_value)))
    monkeypatch.setattr(threading, "excepthook", lambda a: lost.append(repr(a.exc_value)))
    m, = running(tb, 1, {"Starter": ThreadStarter()})
    for key in range(20):
        future = m.call_async("Starter.run", key)
        eventually(lambda: ("start", key) in _STARTER_EVENTS, what="the method to run")
        time.sleep(random.uniform(0, 0.003))
        future.cancel()
        eventually(lambda: ("end", key) in _STARTER_EVENTS, timeout=10,
                   what="cancelled call %d to end on the machine" % key)
    assert not lost, lost


def test_an_interrupt_waits_while_a_thread_is_starting_then_lands():
    # The same race without the network: many cancels, each at a random moment of a thread
    # that starts threads; every one ends the loop in that thread and nowhere else.
    lost = []
    hook, sys.unraisablehook = sys.unraisablehook, lambda u: lost.append(repr(u.exc_value))
    try:
        for i in range(200):
            box, ready, ended = {}, threading.Event(), []

            def serve():
                context = box["context"] = bigmachine.CallContext("T.m", i, None)
                ready.set()
                try:
                    try:
                        _start_threads_for_ever()
                    finally:
                        context._leave()
                except bigmachine._Interrupt:
                    ended.append(i)

            server = threading.Thread(target=serve, daemon=True)
            server.start()
            ready.wait()
            time.sleep(random.uniform(0, 0.002))
            box["context"].cancel()
            server.join(10)
            assert not server.is_alive(), "trial %d: the thread hangs in Thread.start()" % i
            assert ended == [i] and not lost, (i, ended, lost)
    finally:
        sys.unraisablehook = hook


def _banner_sections(source):
    """The titles of the module's top-level banners, in order ('Errors', 'Wire'...)."""
    lines, titles = source.splitlines(), []
    for i, line in enumerate(lines[:-2]):
        if line.startswith("# =====") and lines[i + 2].startswith("# ====="):
            titles.append(re.split(r":| \(", lines[i + 1][2:])[0].strip())
    return titles


def test_the_module_docstring_names_every_section_in_order():
    with open(os.path.join(HERE, "bigmachine.py")) as f:
        sections = _banner_sections(f.read())
    lines = bigmachine.__doc__.splitlines()
    headings = [re.split(r":| \(", line)[0].strip()              # a line, then an indented one
                for line, after in zip(lines, lines[1:])
                if line[:1].isalpha() and after.startswith("    ") and after.strip()]
    assert len(sections) >= 10, sections
    assert [h for h in headings if h in sections] == sections, (headings, sections)


def test_help_on_machine_shows_its_attributes():
    import pydoc
    text = pydoc.render_doc(bigmachine.Machine, renderer=pydoc.plaintext)
    for name in ("addr", "err", "maxprocs", "hostname", "owned"):
        assert re.search(r"^[ |]+%s +\S" % name, text, re.M), name
    assert "API.md" not in text


def _global_names(code):
    """The global names code (and the code nested in it) reads, by the opcodes that read them."""
    import dis
    import types
    instructions = list(dis.get_instructions(code))
    stored = {i.argval for i in instructions if i.opname == "STORE_NAME"}
    names = {i.argval for i in instructions if i.opname == "LOAD_GLOBAL" or
             (i.opname == "LOAD_NAME" and i.argval not in stored)}     # a class body's
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _writes_globals(code):
    import dis
    import types
    return any(i.opname in ("STORE_GLOBAL", "DELETE_GLOBAL") for i in dis.get_instructions(code)) \
        or any(_writes_globals(c) for c in code.co_consts if isinstance(c, types.CodeType))


@pytest.mark.parametrize("group", sorted(bigmachine._SHIPPED_AS_SOURCE))
def test_shipped_functions_are_self_contained(group):
    # What a host runs before bigmachine.py is there: the group's source alone, executed with
    # nothing but the builtins, defines the group's functions and nothing else, and each of
    # them needs nothing but the builtins and the others.
    import ast
    import builtins
    names = bigmachine._SHIPPED_AS_SOURCE[group]
    source = bigmachine._shipped_source(group)
    assert all(isinstance(node, (ast.FunctionDef, ast.ClassDef))
               for node in ast.parse(source).body)
    namespace = {"__builtins__": builtins}
    code = compile(source, "<shipped %s>" % group, "exec")
    exec(code, namespace)
    assert set(namespace) - {"__builtins__"} == set(names)
    needs = _global_names(code) - set(dir(builtins)) - set(names)
    assert not needs, "the %s group needs %s" % (group, sorted(needs))
    assert not _writes_globals(code), "a function of the %s group sets a global" % group
    # The packed form is the same text.
    packed = bigmachine._shipped_source(group, packed=True)
    assert zlib.decompress(base64.b64decode(packed)).decode() == source


def test_module_level_imports_are_one_block_of_the_standard_library():
    # The rule of the file's top: every process imports this file, so at module level it
    # imports only standard-library modules, all in the one block under the docstring (and
    # pstats for type checkers alone); the rest is imported where it is used.
    import ast
    with open(os.path.join(HERE, "bigmachine.py")) as f:
        tree = ast.parse(f.read())
    block, elsewhere = [], []
    for index, node in enumerate(tree.body):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            (block if index <= 40 else elsewhere).append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.dump(node.test) \
                and "__main__" not in ast.dump(node.test):
            elsewhere += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
        elif isinstance(node, (ast.Try, ast.With)):
            elsewhere += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not elsewhere, [ast.dump(n) for n in elsewhere]
    modules = {alias.name for node in block if isinstance(node, ast.Import)
               for alias in node.names}
    assert modules, "no import block"
    if hasattr(sys, "stdlib_module_names"):
        assert {m.split(".")[0] for m in modules} <= set(sys.stdlib_module_names), modules
    assert not modules & {"subprocess", "hashlib", "random", "secrets", "urllib.parse",
                          "inspect", "zlib", "http.server", "boto3", "ctypes", "shutil"}


def test_no_function_is_longer_than_120_lines():
    # The file's rule: a longer function is several steps, which get names of their own.
    import ast
    with open(os.path.join(HERE, "bigmachine.py")) as f:
        tree = ast.parse(f.read())
    long = ["%s (line %d): %d lines" % (node.name, node.lineno, node.end_lineno - node.lineno + 1)
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 120]
    assert not long, long


def test_bigoom_example(tmp_path):
    # Driver and machine in a memory cgroup of their own, as the example's docstring says to
    # run it: the machine eats until the OOM killer ends it, and the driver says so.
    with memory_cgroup(200 << 20) as cgroup:
        wrapper = tmp_path / "in-cgroup"
        wrapper.write_text("#!/bin/sh\necho $$ > %s/cgroup.procs\nexec %s %s \"$@\"\n" % (
            cgroup, sys.executable, os.path.join(HERE, "examples", "bigoom.py")))
        wrapper.chmod(0o755)
        result = subprocess.run([str(wrapper)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    line, = result.stdout.splitlines()
    assert ": OutOfMemory: machine https://" in line and "ran out of memory" in line, line
    assert "oom_kill 1" in line, line


# ======================================================================================
# Slurm: machines submitted with srun, and how their jobs end (issue #19, start-up speed)
# ======================================================================================

def proc_contains(pid, name, needle):
    """Does /proc/PID/NAME (cmdline, environ) hold needle? False for a process gone."""
    try:
        with open("/proc/%d/%s" % (pid, name), "rb") as f:
            return needle.encode() in f.read()
    except OSError:
        return False


def test_slurm_srun_machines_keep_their_token_out_of_arguments_and_the_controller(slurm):
    system = slurm_system(setup="export BIGMACHINE_TEST_SETUP=ran")
    assert system.submit == "srun"
    with bigmachine.start(system) as b:
        m, = running(b)
        assert m.call("Echo.environ", "BIGMACHINE_TEST_SETUP") == "ran"
        job = system._jobs[m]
        assert job.isdigit() and slurm.jobs(system.job_name) == {job: "RUNNING"}
        token = system._enrolments[m].token
        srun = system._sruns[m].proc
        assert srun.poll() is None and srun.args[0] == "srun"
        # Not in any process's arguments (srun's, the job's), nor in srun's environment (the
        # job's, which slurmd is sent), nor in what the controller keeps of the job.
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        assert not [p for p in pids if proc_contains(p, "cmdline", token)]
        assert not proc_contains(srun.pid, "environ", token)
        shown = slurm.run("scontrol", "show", "job", job).stdout
        assert "JobName=" + system.job_name in shown and token not in shown
        assert slurm.run("scontrol", "write", "batch_script", job, "-").stdout == ""
        # Its token was used: it is refused to anyone who finds it now.
        settings = system._enrolments[m].settings(wait=5)
        replay = subprocess.run([sys.executable, "-c", bigmachine._enrol_program(settings)],
                                capture_output=True, text=True, timeout=60)
        assert replay.returncode == 1 and "used already" in replay.stderr
        assert m.call("Echo.pid") > 0
    # b.shutdown ended srun, and srun its job.
    assert srun.wait(30) is not None
    eventually(lambda: slurm.jobs(system.job_name) == {}, 15, "the job to end")


def test_slurm_srun_from_inside_a_job_still_submits_jobs_of_its_own(slurm, monkeypatch):
    # A driver running in an allocation (salloc, a batch job) has SLURM_JOB_ID and the like;
    # srun would take them to mean a step of that job (here: one that does not exist).
    monkeypatch.setenv("SLURM_JOB_ID", "999999")
    monkeypatch.setenv("SLURM_JOBID", "999999")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    system = slurm_system()
    with bigmachine.start(system) as b:
        m, = running(b)
        assert m.call("Echo.environ", "SLURM_JOB_ID") == system._jobs[m] != "999999"
    eventually(lambda: slurm.jobs(system.job_name) == {}, 15, "the job to end")


@pytest.mark.parametrize("submit", ["srun", "sbatch"])
def test_slurm_node_failure_stops_machines_saying_node_fail(slurm, submit):
    system = slurm_system(submit=submit)
    try:
        with bigmachine.start(system) as b:
            m1, m2 = running(b, 2)
            jobs = {system._jobs[m] for m in (m1, m2)}
            down = slurm.run("scontrol", "update", "NodeName=localhost", "State=DOWN",
                             "Reason=bigmachine test")
            assert down.returncode == 0, down.stderr
            for m in (m1, m2):
                assert m.wait(STOPPED, timeout=30) is STOPPED
                assert system._jobs[m] in str(m.err) and "NODE_FAIL" in str(m.err), m.err
            assert jobs == {system._jobs[m] for m in (m1, m2)}
    finally:
        slurm.run("scontrol", "update", "NodeName=localhost", "State=RESUME")
        eventually(lambda: slurm.run("sinfo", "--noheader", "--format=%T").stdout.strip()
                   == "idle", 30, "the node to be idle again")
    eventually(lambda: slurm.jobs(system.job_name) == {}, 15, "the jobs to end")


def test_enrolled_machines_on_a_host_with_the_drivers_packages_skip_the_package_stage():
    # The driver (pytest's process) imported third-party distributions, which travel with its
    # code; this host has them installed already, so the enrolling machine loads main at once
    # and never waits for the driver to send packages.
    assert bigmachine._make_bundle().packages is not None
    system = ShellSystem(**FAST)
    with bigmachine.start(system) as b:
        m, = running(b, 1, {"Echo": Echo("shell")})
        assert "packages" not in m.call("Supervisor.info")
        with pytest.raises(bigmachine.Error, match="not waiting for packages"):
            m.call("Supervisor.packages_ready")
        assert m.call("Echo.get_tag") == "shell"


@pytest.mark.parametrize("submit", ["srun", "sbatch"])
def test_slurm_job_that_fails_before_its_machine_enrols_stops_it_saying_failed(slurm, tmp_path,
                                                                               submit):
    missing = str(tmp_path / "no-python-here")
    system = slurm_system(submit=submit, python=missing)
    with bigmachine.start(system) as b:
        m, = b.start(1, {"Echo": Echo()})
        assert m.wait(RUNNING, timeout=30) is STOPPED
        job = system._jobs[m]
        assert job in str(m.err) and "FAILED" in str(m.err), m.err
    eventually(lambda: slurm.jobs(system.job_name) == {}, 15, "the job to end")


def test_slurm_submit_is_chosen_by_option_flag_or_variable_and_checked():
    assert bigmachine.SlurmSystem().submit == "srun"
    options = bigmachine.SlurmSystem._command_line_options(
        ["driver.py", "--bigm.slurm.submit=sbatch"], {})
    assert options == {"submit": "sbatch"}
    options = bigmachine.SlurmSystem._command_line_options(
        ["driver.py"], {"BIGMACHINE_SLURM_SUBMIT": "srun"})
    assert bigmachine.SlurmSystem(**options).submit == "srun"
    with pytest.raises(ValueError, match="submit must be 'srun' .* or 'sbatch' .*not 'qsub'"):
        bigmachine.SlurmSystem(submit="qsub")

