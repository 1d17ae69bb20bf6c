"""bigmachine.py: self-managing serverless computing in one file of standard-library Python.

A *driver* process forms an ad-hoc cluster of *machines* -- threads of the driver itself
(`TestSystem`), processes on this host (`Local`), EC2 instances or hosts reached over SSH --
installs *services* on each (plain Python objects, pickled) and calls their methods remotely:
driver to machine and machine to machine. This module re-creates grailbio/bigmachine, the Go
toolkit, for Python; its sections mirror the Go packages so that a reader of one finds the other.

    import bigmachine

    class Square:
        def of(self, x):
            return x * x

    if __name__ == "__main__":
        with bigmachine.start() as b:
            m, = b.start(1, {"Square": Square()})
            print(m.call("Square.of", 7))               # 49, computed in another process

The design, in the order of the sections below:

The file's rules
    What a change must keep, each checked by a test: the standard library only; at module
    level only the imports every process needs; a flat hot path; the functions a system ships
    to hosts as source text self-contained; no function longer than 120 lines.

Module state
    What the module keeps from call to call, gathered, with the section that owns each.

Errors
    Every error the library raises derives from `Error` and says whether retrying can help
    (`temporary`), the way Go's errors carry a severity, and where it happened (`remote`,
    `machine`: Go's errors.Remote). A service's own exception comes back to the caller as
    itself, with the remote traceback as its `__cause__`.

Certificates (Go: internal/authority)
    Each session makes its own certificate authority in pure Python (Ed25519) and issues every
    process a certificate. The CA's private key never leaves the driver. Both sides of every
    connection check the other's certificate against the session CA: the servers are
    authenticated too, which the Go original does not do.

Pickling
    Everything that crosses the wire is pickled (protocol 5, large buffers out of band). When
    something cannot be pickled, the error names the path to it inside the object
    (`service.client._sock (socket.socket)`), not just its type.

Wire (Go: rpc)
    A connection is TLS with client certificates required on both sides. Its first exchange is
    an HTTP request (`GET /bigrpc` with `Upgrade: bigrpc/1`, which also compares versions); the
    connection then carries length-prefixed frames: one call at a time, with pickle protocol 5
    and its out-of-band buffers, so that large arrays are sent without copies. A calling thread
    takes an idle connection from its peer's pool, sends, and reads its own reply; a machine's
    connections wait for their next frame in one epoll set, served inline by one thread at a
    time (`_FrameLoop`, with a monitor like Go's sysmon for methods that block). No thread
    hands a call to another on either side, which is what makes a call cost little more than a
    TLS round trip, and many callers at once cost the machine no context switches. Calls that
    queue up (`call_async`'s) travel several to a frame, as a batch the machine runs one after
    the other, each call still with its own id, outcome and cancel.
    Plain `POST /bigrpc/Service.method` works too, for curl and for people. Nothing is unpickled
    before the peer's certificate has been verified: the TLS handshake comes first.

Services and the Supervisor (Go: supervisor.go)
    A service's public methods are callable as "Name.method". Every machine runs the
    `Supervisor` service: ping, info, register, keepalive, stacks, shutdown... and a watchdog
    that ends the machine when the driver's keepalives stop: machines never outlive their driver.

Machine (Go: machine.go)
    The driver's handle on one machine: its state (UNSTARTED < STARTING < RUNNING < STOPPED),
    calls, futures whose `cancel()` reaches the machine, deadlines, retries (a `Stream`
    argument is opened anew for each attempt), typed facts (`mem_info`...), and the keepalive
    loop that notices a machine that stopped answering, or that is short of memory.

B (Go: bigmachine.go, driver)
    One cluster session: starts machines, dials them, tells subscribers what happens to them
    (`subscribe`), saves what an unhealthy machine holds, shuts everything down in bounded time.

Many tasks
    `B.executor()` is a `concurrent.futures.Executor` over the session's machines: tasks wait
    in a queue on the driver (as `call_async`'s calls do), each machine runs `per_machine` at
    a time, tasks of a lost machine run again elsewhere. A machine with several processors
    runs them in worker processes of its own, reached over a private socketpair, so that
    CPU-bound Python uses every processor; `Pooled(service)` replicates a service in them.

Systems (Go: system.go, local.go, testsystem)
    Where machines come from. `TestSystem` runs them inside the driver's process, each with its
    own TLS server, for fast tests. `Local` runs each one as a child process, loaded the way
    `multiprocessing`'s spawn method loads `__main__`. `SSHSystem` runs them on hosts reached
    over ssh, with the driver's code shipped as a content-addressed bundle. `EC2System` launches
    an EC2 instance per machine, whose user data holds only a small bootstrap and its short-lived,
    server-only certificate; the driver sends it the same bundle over mutual TLS, and certifies
    the key the machine makes there. `SlurmSystem`
    submits a job array, whose tasks *enrol*: they dial the driver with a one-time token, make
    their own keys, and get their certificates and the bundle from it -- the mechanism any
    system that can only run a command somewhere uses (`B.enrol`). Every system is written on
    a public interface (see `System`), so users can write their own. With the bundle go the
    installed distributions the driver imported (packages="auto"), which a machine receives
    over its own mutual TLS before it loads main: content-addressed files, cached per host,
    hashed on arrival, linked into a directory that is complete or absent.

Debug (Go: profile.go, status.go, expvar.go, rpc/stats.go)
    Seeing the whole cluster from the driver: CPU profiles sampled on every machine at once
    and merged into one pstats file, tracemalloc's view of memory, every thread's stack,
    published variables and per-method call statistics, a status page, and the machines'
    output and logging records forwarded to the driver. `B.serve_debug` serves it over HTTP;
    `B.debug_wsgi` hands the same pages to the user's own web server.

Starting a session (Go: driver)
    `start(system)` picks the system by object or by name (from the command line's
    `--bigm.system`, or BIGMACHINE_SYSTEM), and refuses to run where it would start sessions
    recursively: on a machine, or while a machine imports the driver's unguarded main module.

Command line
    `python bigmachine.py selftest` checks the whole system on the machine at hand;
    `python bigmachine.py ec2 list` and `ec2 kill` find and end the EC2 instances of sessions;
    `slurm list` and `slurm kill` their Slurm jobs.
"""

from __future__ import annotations

import atexit
import base64
import collections
import collections.abc
import concurrent.futures
import contextlib
import datetime
import enum
import functools
import io
import itertools
import json
import logging
import os
import pickle
import queue
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
import types
import typing
import weakref

__version__ = "0.1.0"

__all__ = [
    "start", "B", "Machine", "State", "UNSTARTED", "STARTING", "RUNNING", "STOPPED",
    "System", "Local", "TestSystem", "SSHSystem", "EC2System", "Supervisor", "current_call", "CallContext",
    "Error", "NetworkError", "MachineStopped", "NotFound", "Timeout", "RemoteError",
    "SerializationError", "AuthenticationError", "VersionMismatch", "Cancelled",
    "CertificateAuthority", "Credentials", "Backoff", "publish", "unpublish", "Counter",
    "Stream", "MemInfo", "DiskInfo", "LoadInfo", "MachineEvent", "OutOfMemory",
    "SlurmSystem", "Enrolment",
    "Executor", "Pooled",
]

log = logging.getLogger("bigmachine")

#: The wire protocol's version. Peers that differ refuse each other with `VersionMismatch`.
#: 2: a connection carries nothing after a frame until that frame's reply (CANCEL frames
#: travel on a connection of their own), which machines' frame loops rely on.
#: 3: a CALL may carry a batch of calls (`_BATCH`), answered by one or two REPLY frames.
PROTOCOL = 3

#: Python's major.minor: pickles are exchanged only between interpreters that agree on it.
PYTHON = "%d.%d" % sys.version_info[:2]


# ======================================================================================
# The file's rules
# ======================================================================================
#
# What a change must keep, each checked by a test (the tests' section "The maintainer's pass").
#
# One file, the standard library only, in sections under banner comments in dependency order,
# which the module docstring names in the same order; each section opens with an essay that
# says why. Comments give reasons; measurements live in bench/, which reports them.
#
# Module-level imports: only the standard-library modules of the block above, which every
# process needs. Every machine imports this file before it does anything, so what only the
# driver, bundles, certificates or the debug pages need (subprocess, hashlib, inspect, zlib,
# http.server...) is imported inside the function that uses it, and boto3 only inside the
# EC2 system. Importing the module starts nothing: no thread, no socket, no key.
#
# The hot path stays flat: a call's path on both sides (`_Peer.call`, `_serve_frame`,
# `_Dispatcher.serve_call`, `_send_frame`, `_pickle`) runs for every call, and in CPython a
# layer of small functions or a thread per call costs more than the work. bench/ measures it
# ("small call", "32 threads"); tests never assert a time.
#
# Functions shipped as source: some code runs on a host before bigmachine.py is there, so a
# system sends the source text of a group of functions (`_shipped_source`) and the host runs
# it with nothing else defined. Each function of a group is therefore self-contained: it
# imports what it uses from the standard library inside itself, reads no module global, and
# calls only builtins and the other functions of its group. The groups:
_SHIPPED_AS_SOURCE = {
    # SSH's stage 1, sent down the ssh channel (see SSH)
    "ssh": ("_bundle_root", "_bundle_install", "_bundle_unpack", "_machine_workdir",
            "_exec_module", "_import_compiled", "_ssh_stage1"),
    # EC2's bootstrap, in the instance's user data (see EC2)
    "ec2": ("_load_pem_chain", "_pinned_context", "_bundle_root", "_bundle_install",
            "_bundle_unpack", "_machine_workdir", "_ec2_boot", "_ec2_say", "_ec2_instance_id",
            "_EC2Bootstrap", "_ec2_boot_handler"),
    # The enrolment stage, in a job script or a command line (see Enrolment)
    "enrol": ("_bundle_root", "_bundle_install", "_bundle_unpack", "_machine_workdir",
              "_exec_module", "_enrol_stage"),
}
#
# No function is longer than 120 lines: a longer one is several steps, which get names.


# ======================================================================================
# Module state
# ======================================================================================
#
# What the module keeps from call to call, in one place, under the section that owns each
# (the only code that changes it). Locks guard what threads share; thread-local values need
# none. What belongs to a session, a machine or a system lives in that object instead, and
# goes with it. A few are made beside their code: objects of classes defined further down,
# and the state of parts that change often --
#   _threads, _background       the background thread pool (Supervisor: `_ThreadPool`)
#   _stall_watch                queued calls and batches that may be stuck (Supervisor)
#   _sinks                      each thread's pickler (Pickling)
#   _task_functions             task functions unpickled in this process (Many tasks)
#   _compiled_lock, _compiled_path, _stderr_lock    Local's compiled library, stderr
#   _compiled                   the compiled library enrolling machines get (Enrolment)
#   _madvise                    libc's madvise, looked up at the first large read (Wire)
#   _busy_workers               worker processes running a request: no spin (Many tasks)
# and the exit hook that shuts down the sessions left open, `atexit.register(
# _shutdown_sessions)`, which follows its function (B).

# Certificates
_ed25519_base_table: typing.Optional[typing.List[typing.List[tuple]]] = None  # on first use
_libssl = None                       # libssl through ctypes, for TLS read-ahead, once found

# Services
_contexts_lock = threading.Lock()    # the CallContexts' one lock: cancels and their calls' ends
_calls = threading.local()           # .context: the call this thread serves (current_call)
_oom_lock = threading.Lock()
_oom_blamed = {}                     # cgroup -> the OOM kills in it blamed on machines so far

# B
_machine_bootstrapping = False       # true while a machine process imports the driver's main
_sessions = weakref.WeakSet()        # live driver Bs, shut down at exit if the user did not

# Systems: code bundles and packages (all but the first under _packages_lock)
_shipped_sources = {}                # (group, packed) -> its text: see _shipped_source
_packages_lock = threading.Lock()
_package_sets = collections.OrderedDict()   # digest -> _Packages, for the boot threads
_file_hashes = {}                    # (path, size, mtime, ctime, inode) -> SHA-256 (hex)
_site_indexes = {}                   # directory -> (its mtime, {relative path: dist-info})
_host_send_locks = {}                # (system id, host) -> Lock: one machine of a host sends
_wheel_downloads = {}                # (requirements, platform tags) -> [wheel paths], or None
_real_paths = {}                     # a module's __file__ -> its real path
_entries = {}                        # (site, dist-info) -> (the files' stats, manifest entry)
_warned = set()                      # the messages `_warn_once` has said

# Debug
_published = {}                      # name -> value, Counter or callable (under the lock)
_published_lock = threading.Lock()
_tracemalloc_since = None            # time.time() when this module started tracemalloc
_debug_classes = None                # the debug server's handler classes, made on first use


# ======================================================================================
# Errors
# ======================================================================================
#
# Go's bigmachine classifies errors by kind (Net, Remote, Timeout...) and severity (Fatal,
# Temporary...). Here the kind is the class and the severity is one attribute, `temporary`:
# true where trying again can help. `Machine.retry_call` retries exactly those.
#
# A service method's own exception is sent back pickled and raised on the caller as the same
# type, with the remote traceback as its `__cause__`, the way ProcessPoolExecutor does; it is
# rebuilt from its class, args and __dict__, without calling its __init__ (see
# `_pickle_exception`). An exception that cannot make the trip, or must not be raised on the
# caller (SystemExit), becomes a `RemoteError` that keeps its type name, message and traceback
# and says why. A traceback names every machine the exception passed through.

class Error(Exception):
    """Base class of every error raised by bigmachine.

    `remote` is true when the error happened on another machine and was relayed to the caller
    (Go's errors.Remote): a `NetworkError` that machine A met calling machine B reaches the
    driver with `remote` true and `machine` A's address, so the driver does not blame its own
    connection to A. `machine` names where the error happened (None: in this process)."""

    temporary = False
    remote = False
    machine = None

    def __str__(self):
        text = super().__str__()
        if self.remote and self.machine and self.machine not in text:
            text += " (on machine %s)" % self.machine
        return text


class NetworkError(Error):
    """The connection to a machine failed. Temporary: a retry may reach it."""

    temporary = True


class MachineStopped(Error):
    """The machine is STOPPED; `__cause__` is the machine's `err`."""


class NotFound(Error):
    """No such service or method; the message names it."""


class Timeout(Error, TimeoutError):
    """A deadline passed. The call was cancelled on the machine."""

    temporary = True


class Cancelled(Error, concurrent.futures.CancelledError):
    """The call was cancelled by its caller."""


class RemoteError(Error):
    """A remote exception that could not be rebuilt here (its class or state did not pickle),
    or one that must not be raised here (SystemExit, KeyboardInterrupt).

    Keeps what can always travel: `type_name`, `message` and the remote `traceback` text, and
    says in `why` what kept the exception itself from making the trip.
    """

    def __init__(self, type_name, message, traceback_text="", why=""):
        super().__init__(type_name, message, traceback_text)
        self.type_name, self.message, self.traceback = type_name, message, traceback_text
        #: Why the exception itself did not make the trip ("" if nobody knows).
        self.why = why

    def __str__(self):
        text = "%s: %s" % (self.type_name, self.message)
        if self.machine:
            text += " (on machine %s)" % self.machine
        if getattr(self, "why", ""):
            text += "\n(%s)" % self.why
        if self.traceback:
            machines = getattr(self, "machines", None)
            text += "\n\nRemote traceback%s:\n" % (
                " (%s)" % _machine_path(machines) if machines else "") + self.traceback.rstrip()
        return text


class SerializationError(Error):
    """An argument, result, service or exception cannot be pickled or unpickled."""


class AuthenticationError(Error):
    """The peer failed mutual TLS against this session's certificate authority."""


class VersionMismatch(Error):
    """Driver and machine run incompatible Python or protocol versions."""


class OutOfMemory(Error):
    """A machine was killed for using too much memory (the kernel's OOM killer, Slurm's
    OUT_OF_MEMORY...): the machine's `err`. The message says how that is known."""


class _RemoteTraceback(Exception):
    """Carries a remote traceback as the `__cause__` of a re-raised remote exception, and the
    machines it came through (`machines`: where it was raised first, then each machine that
    passed it on); a machine that passes it on keeps it in its own traceback."""

    def __init__(self, traceback_text, machines=()):
        self.machines = list(machines)
        text = '\n"""\nRemote traceback (%s):\n%s"""' % (_machine_path(self.machines),
                                                          traceback_text)
        super().__init__(text)
        self.text = text

    def __str__(self):
        return self.text


def _machine_path(machines):
    """'raised on B, passed on by A' for the machines an error came through, first to last."""
    if not machines:
        return "?"
    text = "raised on %s" % machines[0] if len(machines) > 1 else machines[0]
    if len(machines) > 1:
        text += ", passed on by " + ", then ".join(machines[1:])
    return text


class _Interrupt(BaseException):
    """Raised inside a service method's thread when its call is cancelled or times out.

    A BaseException, like KeyboardInterrupt, so that `except Exception:` in user code does not
    swallow it while `finally:` blocks still run.
    """


# ======================================================================================
# Certificates (Go: internal/authority)
# ======================================================================================
#
# Every connection between a driver and its machines, or between two machines, is mutual
# TLS. This section makes the certificates for it from the standard library alone, because
# bigmachine.py must run on a freshly booted instance where nothing can be pip-installed.
# Python's ssl module can use certificates but cannot make them, so we write the little
# that is needed ourselves: Ed25519 signatures (RFC 8032), a DER encoder for the handful of
# ASN.1 types an X.509 certificate uses, and the certificate profiles.
#
# Why Ed25519. It is the smallest correct signature scheme to write: no nonce to get wrong
# (a repeated ECDSA nonce leaks the key; Ed25519 derives its nonce from the key and the
# message), a fixed 64-byte signature with no DER inside it, a 32-byte key with one
# standard private key encoding, and no curve parameters to carry. OpenSSL has accepted it
# in TLS 1.2 and 1.3 since 1.1.1, and it gives 128-bit security, which OpenSSL's default
# security level accepts.
#
# Why a CA per session. The Go original kept one CA, private key included, in
# /tmp/bigmachine.pem and shipped that file to every instance, so any machine could mint
# certificates and every cluster built from that file trusted every other. Here each
# session makes a fresh CA, and that CA is the only trust anchor its contexts accept (the
# system's default roots are never loaded). Two sessions therefore cannot talk to each
# other, and a certificate leaked from a finished session is worthless to the next one.
#
# Why the CA key never leaves the driver. Machines receive an issued certificate, its key
# and the CA certificate: enough to prove membership and to check others', never enough to
# admit a newcomer. The key lives only in the driver's memory; a CertificateAuthority
# refuses to be pickled so that it cannot be shipped to a machine by accident.
#
# Why certificates are long-lived. A session may run for days, and nothing here renews
# certificates, so a leaf that expired mid-session would silently kill the cluster. The
# lifetime of a certificate does not limit its damage anyway: the CA dies with the driver
# process, and nothing will trust its certificates after that. Leaves default to ten
# years, the CA to twenty so that it outlives every leaf it signs. notBefore is backdated
# an hour because a fresh instance's clock may run behind the driver's.
#
# Why CA pinning instead of hostname checking. Machines' addresses are not known when
# their certificates are made (an EC2 instance's address exists only after launch), and
# they change. What we need to know about a peer is "it holds a key certified by this
# session's CA", and a context that trusts only that CA and requires a certificate from
# the peer establishes exactly that. Hostname checking would add nothing, so it is off;
# subjectAltNames can still be put in a certificate for tools that want them.
#
# Not constant time. Python's big integers take time that depends on their values, so the
# scalar multiplications below leak timing information about the secret scalar. That
# matters when an attacker can make a process sign many messages of its choosing and time
# each one. Here keys are made, and certificates signed, a few times per session inside
# the driver or just before a machine starts, never in response to network input; the TLS
# handshakes, which do sign attacker-influenced data, are done by OpenSSL. Randomness
# comes from the secrets module (the OS's CSPRNG).
#
# All certificates pass OpenSSL's strict mode (VERIFY_X509_STRICT, openssl verify
# -x509_strict), which Python 3.13's ssl.create_default_context() turns on. Details that
# strict checkers insist on, each easy to get wrong and silently accepted elsewhere: DER
# integers are minimal and padded with 0x00 when the high bit is set; serial numbers are
# positive and at most 20 octets; AlgorithmIdentifiers for Ed25519 have no parameters (not
# even NULL); DEFAULT values (cA FALSE, critical FALSE) are omitted, never encoded; the CA's
# basicConstraints is critical and it has a keyUsage with keyCertSign; leaves carry an
# authorityKeyIdentifier; times are UTCTime before 2050 and GeneralizedTime from then on,
# both with seconds and "Z".


# --------------------------------------------------------------------------------------
# Ed25519 (RFC 8032, section 5.1)
# --------------------------------------------------------------------------------------
#
# The curve is the twisted Edwards curve -x^2 + y^2 = 1 + d x^2 y^2 over the field of
# integers modulo p = 2^255 - 19. Points are kept in extended homogeneous coordinates
# (X, Y, Z, T) with x = X/Z, y = Y/Z and x*y = T/Z, which make addition and doubling free of
# field inversions; one inversion is paid when a point is encoded.

_ED25519_P = 2 ** 255 - 19
# The order of the base point, a prime; scalars and the S half of signatures live mod L.
_ED25519_L = 2 ** 252 + 27742317777372353535851937790883648493


def _field_inverse(x: int) -> int:
    # Fermat's little theorem: x^(p-2) = x^-1 mod p.
    return pow(x, _ED25519_P - 2, _ED25519_P)


# A handful of modular exponentiations at import (tens of microseconds): cheap, and
# deriving the constants shows where they come from.
_ED25519_D = -121665 * _field_inverse(121666) % _ED25519_P
_ED25519_D2 = 2 * _ED25519_D % _ED25519_P
_ED25519_NEUTRAL = (0, 1, 1, 0)


def _ed25519_base_point() -> typing.Tuple[int, int, int, int]:
    # B has y = 4/5 and the even ("positive") x that solves the curve equation:
    # x^2 = (y^2 - 1) / (d y^2 + 1). p = 5 mod 8, so a square root of u is u^((p+3)/8),
    # possibly times sqrt(-1) = 2^((p-1)/4).
    p = _ED25519_P
    y = 4 * _field_inverse(5) % p
    x2 = (y * y - 1) * _field_inverse(_ED25519_D * y * y + 1) % p
    x = pow(x2, (p + 3) // 8, p)
    if (x * x - x2) % p:
        x = x * pow(2, (p - 1) // 4, p) % p
    if x & 1:
        x = p - x
    return (x, y, 1, x * y % p)


_ED25519_BASE = _ed25519_base_point()


def _ed25519_add(P, Q):
    # RFC 8032 5.1.4, "add-2008-hwcd-3" for a = -1.
    p = _ED25519_P
    x1, y1, z1, t1 = P
    x2, y2, z2, t2 = Q
    a = (y1 - x1) * (y2 - x2) % p
    b = (y1 + x1) * (y2 + x2) % p
    c = t1 * _ED25519_D2 * t2 % p
    d = z1 * 2 * z2 % p
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % p, g * h % p, f * g % p, e * h % p)


# k*B is needed for every key and every signature, always with the same B, so it pays to
# write k in base 16, k = sum k_i 16^i, and add up k_i (16^i B) from a table: 64 additions
# instead of about 255 doublings and 128 additions. The table (64 rows of 16 points, ~300
# KB) costs about three plain multiplications (a few ms) to build, so it is built on first
# use rather than at import. Two threads racing to build it both get a correct table
# (`_ed25519_base_table`, with the module's state).


def _ed25519_build_base_table() -> typing.List[typing.List[tuple]]:
    rows = []
    point = _ED25519_BASE  # 16^i B for row i
    for _ in range(64):
        row = [_ED25519_NEUTRAL, point]
        for _ in range(14):
            row.append(_ed25519_add(row[-1], point))
        rows.append(row)
        point = _ed25519_add(row[-1], point)
    return rows


def _ed25519_multiply_base(k: int):
    # Which table entries are added depends on k: this is the timing leak discussed in the
    # section's introduction.
    global _ed25519_base_table
    table = _ed25519_base_table
    if table is None:
        table = _ed25519_base_table = _ed25519_build_base_table()
    result = _ED25519_NEUTRAL
    for row in table:
        digit = k & 15
        if digit:
            result = _ed25519_add(result, row[digit])
        k >>= 4
    return result


def _ed25519_encode(P) -> bytes:
    # 32 bytes, little-endian y, with the low bit of x in the top bit (RFC 8032 5.1.2).
    x, y, z, _ = P
    z_inverse = _field_inverse(z)
    x = x * z_inverse % _ED25519_P
    y = y * z_inverse % _ED25519_P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _sha512_int(*parts: bytes) -> int:
    import hashlib
    return int.from_bytes(hashlib.sha512(b"".join(parts)).digest(), "little")


class _Ed25519Key:
    """An Ed25519 private key: the 32-byte seed, and what RFC 8032 expands it into."""

    __slots__ = ("seed", "public", "_scalar", "_prefix")

    def __init__(self, seed: typing.Optional[bytes] = None):
        import hashlib
        self.seed = os.urandom(32) if seed is None else bytes(seed)
        if len(self.seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        digest = hashlib.sha512(self.seed).digest()
        # "Clamping" (RFC 8032 5.1.5): clear the low three bits so that the scalar is a
        # multiple of the cofactor 8, clear bit 255 and set bit 254.
        scalar = int.from_bytes(digest[:32], "little")
        self._scalar = scalar & ((1 << 254) - 8) | (1 << 254)
        self._prefix = digest[32:]
        self.public = _ed25519_encode(_ed25519_multiply_base(self._scalar))

    def sign(self, message: bytes) -> bytes:
        # RFC 8032 5.1.6. The nonce r is a hash of secret key material and the message, so
        # it never repeats for different messages and needs no random number generator.
        r = _sha512_int(self._prefix, message) % _ED25519_L
        R = _ed25519_encode(_ed25519_multiply_base(r))
        k = _sha512_int(R, self.public, message) % _ED25519_L
        S = (r + k * self._scalar) % _ED25519_L
        return R + S.to_bytes(32, "little")


# --------------------------------------------------------------------------------------
# DER (X.690), just the types that certificates and keys need
# --------------------------------------------------------------------------------------

def _der(tag: int, content: bytes) -> bytes:
    # Definite-length encoding: short form below 128, else 0x80|count then the length.
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _der_sequence(*items: bytes) -> bytes:
    return _der(0x30, b"".join(items))


def _der_set(*items: bytes) -> bytes:
    # DER orders the elements of a SET OF by their encodings.
    return _der(0x31, b"".join(sorted(items)))


def _der_integer(value: int) -> bytes:
    # Minimal two's complement: for value >= 0 this adds the 0x00 pad exactly when the
    # high bit of the first byte would otherwise be set (and read as a negative number).
    if value < 0:
        raise ValueError("only non-negative DER integers are needed")
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _der_boolean_true() -> bytes:
    # Only TRUE is ever encoded: DER forbids encoding a DEFAULT FALSE.
    return _der(0x01, b"\xff")


def _der_oid(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1]] + arcs[2:]:
        # Base 128, most significant group first, continuation bit on all but the last.
        groups = [arc & 0x7F]
        arc >>= 7
        while arc:
            groups.append(0x80 | arc & 0x7F)
            arc >>= 7
        body.extend(reversed(groups))
    return _der(0x06, bytes(body))


def _der_bit_string(data: bytes, unused_bits: int = 0) -> bytes:
    return _der(0x03, bytes([unused_bits]) + data)


def _der_named_bits(*bits: int) -> bytes:
    # A NamedBitList BIT STRING (like keyUsage): bit 0 is the most significant bit of the
    # first byte, and DER drops trailing zero bits, recording how many in the first octet.
    data = bytearray(max(bits) // 8 + 1)
    for bit in bits:
        data[bit // 8] |= 0x80 >> bit % 8
    unused = 7 - max(bits) % 8
    return _der_bit_string(bytes(data), unused)


def _der_octet_string(data: bytes) -> bytes:
    return _der(0x04, data)


def _der_utf8_string(text: str) -> bytes:
    return _der(0x0C, text.encode("utf-8"))


def _der_explicit(number: int, content: bytes) -> bytes:
    # [number] EXPLICIT: a constructed context-specific tag around the complete encoding.
    return _der(0xA0 | number, content)


def _as_utc(moment: datetime.datetime) -> datetime.datetime:
    # Naive datetimes are taken to be UTC already, aware ones are converted.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.astimezone(datetime.timezone.utc).replace(microsecond=0)


def _der_time(moment: datetime.datetime) -> bytes:
    # RFC 5280 4.1.2.5: UTCTime for 1950..2049, GeneralizedTime otherwise; both in UTC,
    # with seconds, ending in "Z", and without fractions.
    m = _as_utc(moment)
    clock = f"{m.month:02d}{m.day:02d}{m.hour:02d}{m.minute:02d}{m.second:02d}Z"
    if 1950 <= m.year < 2050:
        return _der(0x17, f"{m.year % 100:02d}{clock}".encode("ascii"))
    return _der(0x18, f"{m.year:04d}{clock}".encode("ascii"))


def _pem(label: str, der: bytes) -> str:
    # RFC 7468: base64 in lines of 64 characters between BEGIN and END lines.
    text = base64.b64encode(der).decode("ascii")
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return "\n".join([f"-----BEGIN {label}-----"] + lines + [f"-----END {label}-----"]) + "\n"


# --------------------------------------------------------------------------------------
# Certificates (RFC 5280) and keys (RFC 8410)
# --------------------------------------------------------------------------------------

_OID_ED25519 = "1.3.101.112"
_OID_COMMON_NAME = "2.5.4.3"
_OID_SUBJECT_KEY_ID = "2.5.29.14"
_OID_KEY_USAGE = "2.5.29.15"
_OID_SUBJECT_ALT_NAME = "2.5.29.17"
_OID_BASIC_CONSTRAINTS = "2.5.29.19"
_OID_AUTHORITY_KEY_ID = "2.5.29.35"
_OID_EXT_KEY_USAGE = "2.5.29.37"
_OID_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
_OID_CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"

# keyUsage bit numbers (RFC 5280 4.2.1.3).
_KEY_USAGE_DIGITAL_SIGNATURE = 0
_KEY_USAGE_KEY_CERT_SIGN = 5
_KEY_USAGE_CRL_SIGN = 6

_CLOCK_SKEW = datetime.timedelta(hours=1)
_LEAF_LIFETIME = datetime.timedelta(days=3653)
_CA_LIFETIME = datetime.timedelta(days=2 * 3653)


def _ed25519_algorithm() -> bytes:
    # RFC 8410 3: the parameters must be absent (not NULL).
    return _der_sequence(_der_oid(_OID_ED25519))


def _public_key_info(key: _Ed25519Key) -> bytes:
    return _der_sequence(_ed25519_algorithm(), _der_bit_string(key.public))


def _key_id(key: _Ed25519Key) -> bytes:
    # RFC 7093 method 1: the leftmost 160 bits of SHA-256 of the public key bits. (SHA-1,
    # RFC 5280's example, would do as well but is unavailable on some FIPS builds.)
    import hashlib
    return hashlib.sha256(key.public).digest()[:20]


def _private_key_pem(key: _Ed25519Key) -> str:
    # PKCS#8 OneAsymmetricKey, version 0. For Ed25519 the privateKey OCTET STRING contains
    # a CurvePrivateKey, which is itself an OCTET STRING holding the seed: a double wrap.
    der = _der_sequence(
        _der_integer(0),
        _ed25519_algorithm(),
        _der_octet_string(_der_octet_string(key.seed)),
    )
    return _pem("PRIVATE KEY", der)


def _name(common_name: str) -> bytes:
    # A Name with a single RDN holding the commonName; the leaf's issuer field reuses the
    # CA's subject bytes verbatim, since strict checkers compare them byte for byte.
    if not isinstance(common_name, str) or not 1 <= len(common_name) <= 64:
        raise ValueError(f"common name must be 1 to 64 characters: {common_name!r}")
    attribute = _der_sequence(_der_oid(_OID_COMMON_NAME), _der_utf8_string(common_name))
    return _der_sequence(_der_set(attribute))


def _extension(oid: str, value: bytes, critical: bool = False) -> bytes:
    flag = _der_boolean_true() if critical else b""
    return _der_sequence(_der_oid(oid), flag, _der_octet_string(value))


def _name_list(names):
    # A bare string is a mistake: iterating it would turn "localhost" into nine names.
    if isinstance(names, (str, bytes)):
        raise TypeError("dns_names and ip_addresses are collections of names, not a name")
    return list(names)


def _alt_names(dns_names, ip_addresses) -> bytes:
    # GeneralNames: dNSName is [2] IMPLICIT IA5String, iPAddress is [7] IMPLICIT OCTET
    # STRING holding the 4 or 16 address bytes.
    general_names = []
    for name in dns_names:
        try:
            encoded = name.encode("ascii")
        except (AttributeError, UnicodeEncodeError):
            raise ValueError(f"DNS names must be ASCII strings: {name!r}") from None
        if not encoded or b" " in encoded:
            raise ValueError(f"invalid DNS name: {name!r}")
        general_names.append(_der(0x82, encoded))
    for address in ip_addresses:
        general_names.append(_der(0x87, _ip_address_bytes(str(address))))
    return _der_sequence(*general_names)


def _ip_address_bytes(address: str) -> bytes:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_pton(family, address)
        except (OSError, ValueError):
            pass
    raise ValueError(f"not an IP address: {address!r}")


def _certificate(
    *,
    subject_key: _Ed25519Key,
    subject: bytes,
    issuer_key: _Ed25519Key,
    issuer: bytes,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    extensions: typing.List[bytes],
) -> str:
    if _as_utc(not_after) <= _as_utc(not_before):
        raise ValueError("not_after must be later than not_before")
    # A random serial: positive, and below 2^159 so that it fits in 20 octets even with
    # the sign pad (RFC 5280 4.1.2.2). Random serials also make every certificate unique.
    serial = int.from_bytes(os.urandom(20), "big") % ((1 << 159) - 1) + 1
    tbs = _der_sequence(
        _der_explicit(0, _der_integer(2)),  # version: v3, needed for extensions
        _der_integer(serial),
        _ed25519_algorithm(),
        issuer,
        _der_sequence(_der_time(not_before), _der_time(not_after)),
        subject,
        _public_key_info(subject_key),
        _der_explicit(3, _der_sequence(*extensions)),
    )
    signature = issuer_key.sign(tbs)
    der = _der_sequence(tbs, _ed25519_algorithm(), _der_bit_string(signature))
    return _pem("CERTIFICATE", der)


class Credentials(typing.NamedTuple):
    """What one participant needs for mutual TLS: its certificate, key and the session CA."""

    cert_pem: str  # this holder's certificate (PEM)
    key_pem: str  # its private key, PKCS#8 PEM
    ca_pem: str  # the session CA's certificate (PEM), the only trust anchor

    def __repr__(self) -> str:
        # Credentials end up in log lines and tracebacks; the key must not.
        return "Credentials(cert_pem=..., key_pem=<redacted>, ca_pem=...)"

    def load_into(self, context: ssl.SSLContext) -> None:
        """Load this certificate and key into context, never writing the key to disk if
        the platform allows it (SSLContext.load_cert_chain accepts only file names)."""
        _load_pem_chain(context, self.cert_pem + self.key_pem)


def _load_pem_chain(context, pem):
    """Load a certificate and its key, both PEM in the one string pem, into an SSLContext
    without leaving the key on disk. Self-contained: the EC2 bootstrap ships its source."""
    import os
    data = pem.encode("ascii")

    def write_all(fd):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    # Linux: an anonymous in-memory file, opened by name through /proc.
    fd = None
    if hasattr(os, "memfd_create"):
        try:
            # CLOEXEC: processes we start (machines, say) must not inherit the key.
            fd = os.memfd_create("bigmachine-credentials", os.MFD_CLOEXEC)
        except OSError:  # e.g. a seccomp filter or an old kernel
            fd = None
    if fd is not None:
        try:
            write_all(fd)
            path = "/proc/self/fd/%d" % fd
            if os.path.exists(path):
                context.load_cert_chain(path)
                return
        finally:
            os.close(fd)
    # Elsewhere: a private (0600) file in the temporary directory, removed as soon as
    # OpenSSL has read it. mkstemp honours TMPDIR, so an unwritable HOME is no problem.
    import tempfile                    # rarely needed: kept out of import time
    fd, path = tempfile.mkstemp(prefix="bigmachine-", suffix=".pem")
    try:
        try:
            write_all(fd)
        finally:
            os.close(fd)
        context.load_cert_chain(path)
    finally:
        os.unlink(path)


class CertificateAuthority:
    """A session's certificate authority: a fresh Ed25519 key and a self-signed CA certificate."""

    def __init__(self, common_name: str = "bigmachine session CA"):
        self._key = _Ed25519Key()
        self._key_id = _key_id(self._key)
        self._name = _name(common_name)
        now = datetime.datetime.now(datetime.timezone.utc)
        # RFC 5280 lets a self-signed CA omit the authorityKeyIdentifier.
        extensions = [
            _extension(_OID_BASIC_CONSTRAINTS, _der_sequence(_der_boolean_true()), critical=True),
            _extension(
                _OID_KEY_USAGE,
                _der_named_bits(_KEY_USAGE_KEY_CERT_SIGN, _KEY_USAGE_CRL_SIGN),
                critical=True,
            ),
            _extension(_OID_SUBJECT_KEY_ID, _der_octet_string(self._key_id)),
        ]
        self.cert_pem = _certificate(
            subject_key=self._key,
            subject=self._name,
            issuer_key=self._key,
            issuer=self._name,
            not_before=now - _CLOCK_SKEW,
            not_after=now + _CA_LIFETIME,
            extensions=extensions,
        )

    def __reduce__(self):
        raise TypeError("a CertificateAuthority's key never leaves the driver; send Credentials")

    def issue(
        self,
        common_name: str,
        *,
        server: bool = True,
        client: bool = True,
        dns_names: typing.Iterable[str] = (),
        ip_addresses: typing.Iterable[str] = (),
        not_before: typing.Optional[datetime.datetime] = None,
        not_after: typing.Optional[datetime.datetime] = None,
        public_key: typing.Optional[bytes] = None,
    ) -> Credentials:
        """Make a new key and a certificate for it signed by this CA.

        server and client select the extended key usages (serverAuth, clientAuth); a driver
        needs client only, machines need both. dns_names and ip_addresses, if any, go into
        a subjectAltName. not_before and not_after are datetimes in UTC (aware, or naive
        meaning UTC), by default an hour ago and ten years from now. public_key (the 32 bytes
        of an Ed25519 public key) certifies a key made elsewhere -- by a machine that enrols,
        whose private key never leaves it -- instead of a new one; key_pem is then empty."""
        if not (server or client):
            raise ValueError("a certificate must allow server use, client use, or both")
        subject = _name(common_name)
        if subject == self._name:
            # The leaf would look self-issued, which confuses path building.
            raise ValueError("a certificate cannot share the CA's common name")
        now = datetime.datetime.now(datetime.timezone.utc)
        if public_key is None:
            key = _Ed25519Key()
        else:
            if not isinstance(public_key, bytes) or len(public_key) != 32:
                raise ValueError("an Ed25519 public key is 32 bytes, not %r" % (public_key,))
            key = types.SimpleNamespace(public=public_key)      # all a certificate needs of it
        usages = [_der_oid(oid) for oid, wanted in
                  ((_OID_SERVER_AUTH, server), (_OID_CLIENT_AUTH, client)) if wanted]
        dns_names, ip_addresses = _name_list(dns_names), _name_list(ip_addresses)
        extensions = [
            _extension(_OID_BASIC_CONSTRAINTS, _der_sequence(), critical=True),
            _extension(
                _OID_KEY_USAGE, _der_named_bits(_KEY_USAGE_DIGITAL_SIGNATURE), critical=True
            ),
            _extension(_OID_EXT_KEY_USAGE, _der_sequence(*usages)),
            _extension(_OID_SUBJECT_KEY_ID, _der_octet_string(_key_id(key))),
            _extension(_OID_AUTHORITY_KEY_ID, _der_sequence(_der(0x80, self._key_id))),
        ]
        if dns_names or ip_addresses:
            extensions.append(
                _extension(_OID_SUBJECT_ALT_NAME, _alt_names(dns_names, ip_addresses))
            )
        cert_pem = _certificate(
            subject_key=key,
            subject=subject,
            issuer_key=self._key,
            issuer=self._name,
            not_before=now - _CLOCK_SKEW if not_before is None else not_before,
            not_after=now + _LEAF_LIFETIME if not_after is None else not_after,
            extensions=extensions,
        )
        return Credentials(cert_pem, "" if public_key is not None else _private_key_pem(key),
                           self.cert_pem)


# --------------------------------------------------------------------------------------
# TLS contexts
# --------------------------------------------------------------------------------------

def _tls_context(protocol: int, credentials: Credentials) -> ssl.SSLContext:
    return _pinned_context(protocol == ssl.PROTOCOL_TLS_SERVER,
                           credentials.cert_pem + credentials.key_pem, credentials.ca_pem)


def _pinned_context(server_side, chain_pem, ca_pem):
    """A mutual-TLS context that presents chain_pem (a certificate and its key) and trusts the
    CA of ca_pem alone. Self-contained: the EC2 bootstrap ships its source."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not server_side:
        # CA pinning instead of names (see the introduction).
        context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    # The same strictness on every Python version as 3.13's create_default_context().
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    # The session CA is the only trust anchor: never load_default_certs().
    context.load_verify_locations(cadata=ca_pem)
    _load_pem_chain(context, chain_pem)
    return context


def server_context(credentials: Credentials) -> ssl.SSLContext:
    """A context for accepting connections: it presents credentials' certificate and
    requires the client to present one issued by the same session CA."""
    return _tls_context(ssl.PROTOCOL_TLS_SERVER, credentials)


def client_context(credentials: Credentials) -> ssl.SSLContext:
    """A context for connecting: it presents credentials' certificate and requires the
    server's to be issued by the same session CA, whatever its name."""
    return _tls_context(ssl.PROTOCOL_TLS_CLIENT, credentials)


# OpenSSL reads a TLS record with two system calls, its 5-byte header and then the rest,
# unless its context "reads ahead": then one read takes whatever the kernel holds, up to
# OpenSSL's buffer. That is one system call fewer for every small message, and half the reads
# of a bulk transfer (bench/'s "64 MiB argument" and "64 MiB reply" measure what that gives).
# Python's ssl module has no switch for it (SSL_CTX_set_read_ahead), so the library sets it
# with ctypes on the SSL_CTX that an SSLContext wraps: the first field after the object
# header, in every CPython from 3.6 to 3.14. It is set only where that holds, and only when
# the pointer proves right: SSL_CTX_get_options on it must give the options the SSLContext
# reports. Anything else leaves the context as it was. The library's own connections only:
# server_context() and client_context() give users the stock behaviour.
# BIGMACHINE_TLS_READ_AHEAD=0 turns it off.
_SSL_CTRL_SET_READ_AHEAD = 41      # OpenSSL's ssl.h, the same in 1.1 and 3.x


def _read_ahead(context: ssl.SSLContext) -> ssl.SSLContext:
    """context, made to read ahead where that can be done safely (see above)."""
    global _libssl
    if (_libssl is False or os.environ.get("BIGMACHINE_TLS_READ_AHEAD", "1") == "0"
            or sys.implementation.name != "cpython" or sys.version_info >= (3, 15)):
        return context
    try:
        import ctypes
        if _libssl is None:
            import _ssl
            lib = ctypes.CDLL(getattr(_ssl, "__file__", None))   # libssl is its dependency
            lib.SSL_CTX_get_options.restype = ctypes.c_uint64
            lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
            lib.SSL_CTX_ctrl.restype = ctypes.c_long
            lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                         ctypes.c_void_p]
            _libssl = lib
        ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
        if ctx and _libssl.SSL_CTX_get_options(ctx) == int(context.options):
            _libssl.SSL_CTX_ctrl(ctx, _SSL_CTRL_SET_READ_AHEAD, 1, None)
    except (ImportError, OSError, AttributeError) as e:
        log.debug("TLS read-ahead not set: %s", e)
        _libssl = False
    return context


# ======================================================================================
# Pickling
# ======================================================================================
#
# Everything that crosses the wire is pickled with protocol 5. Objects that expose their
# memory (bytearray, memoryview, NumPy arrays...) travel out of band: pickle hands us a view of
# their buffer, the wire sends it straight from that memory, and the receiver reads it straight
# into the memory of the new object.
#
# When pickling fails, "cannot pickle '_thread.lock' object" alone rarely tells the user where
# the lock was. `_find_unpicklable` walks the object graph to name the path to it, e.g.
# `service.client._sock (socket.socket)`.

_PICKLE_PROTOCOL = 5


class _PickleSink:
    """One thread's pickler, kept from call to call, and what it wrote: the pieces of the
    pickle, and the buffers it handed out of band (see `_pickle`). The pickler appends to
    these two lists directly, with no Python function in between."""

    __slots__ = ("pieces", "buffers", "pickler", "busy")

    def __init__(self):
        self.pieces, self.buffers, self.busy = [], [], False
        self.pickler = pickle.Pickler(self, _PICKLE_PROTOCOL, buffer_callback=self.buffers.append)

    @property
    def write(self):                  # looked up once, by the Pickler above
        return self.pieces.append


_sinks = threading.local()


def _pickle(obj):
    """Pickle obj for the wire: (pieces, buffers), where the pickle is the pieces back to back
    and buffers are what pickle sent out of band. Raises whatever pickling raises.

    pickle.dumps builds one bytes object, so a 64 MiB argument is first copied into the pickle
    (a large share of sending it: see bench/'s pickle floor). A Pickler that writes to a file
    hands each large bytes object (64 KiB and more) to the file's write as itself, so the
    pieces are a few small ones around the caller's own objects, sent from where they are. Each
    thread keeps its pickler (making one costs more than pickling a small call with it;
    bench/'s small call measures the whole). Its memo is cleared after each use: the memo holds
    what was pickled, and must not keep a large argument alive after its call. A __reduce__
    that makes a call of its own gets a pickler of its own."""
    sink = getattr(_sinks, "sink", None)
    if sink is None or sink.busy:
        sink = _PickleSink()
        if getattr(_sinks, "sink", None) is None:
            _sinks.sink = sink
    sink.busy = True
    try:
        sink.pickler.dump(obj)
        pieces, buffers = sink.pieces.copy(), sink.buffers.copy()
    except BaseException:
        _sinks.sink = None            # whatever state an error left it in, it is not reused
        raise
    finally:
        sink.pickler.clear_memo()
        sink.pieces.clear()
        sink.buffers.clear()
        sink.busy = False
    return pieces, buffers


def _size(pieces, buffers=()):
    """The bytes of a pickle's pieces and its out-of-band buffers."""
    size = len(pieces[0]) if len(pieces) == 1 else sum(map(len, pieces))
    return size + sum(memoryview(b).nbytes for b in buffers) if buffers else size


def _dumps(obj, what):
    """Pickle obj for the wire: (pieces, out-of-band buffers), as `_pickle` does, but a failure
    is a SerializationError that says which part of obj would not pickle. `what` names obj."""
    try:
        return _pickle(obj)
    except Exception as e:
        raise SerializationError(_describe_pickling_failure(obj, what, e)) from e


def _dumps_in_band(obj, what):
    """Pickle obj into one bytes object with every buffer in band: for what is kept and
    unpickled later as a whole (the services a machine installs), not sent as a frame."""
    try:
        return pickle.dumps(obj, _PICKLE_PROTOCOL)
    except Exception as e:
        raise SerializationError(_describe_pickling_failure(obj, what, e)) from e


def _loads(body, buffers, what):
    """Unpickle a frame's body (bytes, or a `_PendingPickle` still on the connection)."""
    try:
        if type(body) is not _PendingPickle:
            return pickle.loads(body, buffers=buffers)
        try:
            obj = pickle.Unpickler(body, buffers=buffers).load()
        finally:
            if body.left:                 # malformed or failed: keep the connection in step
                body.discard()
        return obj
    except OSError:
        raise                             # the connection, not the pickle
    except Exception as e:
        raise SerializationError(
            "cannot unpickle %s: %s: %s. Classes must be defined at the top level of a module "
            "that every machine can import: the driver's main script or a module on its "
            "sys.path when the machines started (not inside a function, not under "
            "`if __name__ == \"__main__\":`, and not in an interactive session)"
            % (what, type(e).__name__, e)) from e


def _describe_pickling_failure(obj, what, error):
    if what.startswith("the arguments of ") and isinstance(obj, tuple) and len(obj) == 3:
        # A call's (args, kwargs, timeout): name the argument as the caller knows it.
        args, kwargs, _ = obj
        path, culprit = (_find_unpicklable(args, "args") if not _picklable(args)
                         else _find_unpicklable(kwargs, "kwargs"))
    elif what.startswith("the result of "):
        path, culprit = _find_unpicklable(obj, "result")
    else:
        path, culprit = _find_unpicklable(obj, what)
    return "cannot pickle %s: %s is %s (%s: %s)%s" % (
        what, path, _type_name(culprit), type(error).__name__, error,
        _pickling_advice(culprit))


def _pickling_advice(culprit):
    """What to do about an object that pickle cannot find by name, if that is the trouble."""
    named = culprit if isinstance(culprit, (type, types.FunctionType)) else type(culprit)
    qualname = getattr(named, "__qualname__", "")
    if "<lambda>" in qualname:
        return ("; a lambda cannot be pickled: use a function defined at the top level of a "
                "module that the machines can import")
    if "<locals>" in qualname:
        return ("; define it at the top level of a module that the machines can import, not "
                "inside a function")
    return ""


def _type_name(obj):
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else "%s.%s" % (t.__module__, t.__qualname__)


def _picklable(obj):
    try:
        pickle.dumps(obj, _PICKLE_PROTOCOL, buffer_callback=lambda b: None)
        return True
    except Exception:
        return False


def _find_unpicklable(obj, path, depth=0):
    """Descend from obj to the innermost part that does not pickle: (path, that object)."""
    if depth > 32:
        return path, obj
    if isinstance(obj, dict):
        children = [("%s[%r]" % (path, k), v) for k, v in obj.items()]
        children += [("%s key %r" % (path, k), k) for k in obj]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = [("%s[%d]" % (path, i), v) for i, v in enumerate(obj)]
    else:
        state = getattr(obj, "__dict__", None)
        children = [("%s.%s" % (path, k), v) for k, v in state.items()] if isinstance(state, dict) else []
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if hasattr(obj, name) and name != "__dict__":
                    children.append(("%s.%s" % (path, name), getattr(obj, name)))
    for child_path, child in children:
        if not _picklable(child):
            return _find_unpicklable(child, child_path, depth + 1)
    return path, obj


def _error_payload(exc, where, why=""):
    """Pickle an exception for the trip back: the exception itself, if it pickles (see
    `_pickle_exception`), and what always travels: its type name, message and traceback text,
    and the machines it came through (where, after those it had come from). A why says that
    the exception itself is not to be sent, and why."""
    try:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception as e:                # a __str__ that fails in an unusual way, say
        tb = "(the traceback could not be formatted: %s)\n" % _exception_text(e)
    if isinstance(exc.__cause__, _RemoteTraceback):        # it came from another machine
        machines = list(exc.__cause__.machines)
    elif isinstance(exc, RemoteError):
        machines = list(getattr(exc, "machines", None) or ())
    else:
        machines = []
    machines.append(where)
    exc_pickle = None
    if not why:
        exc_pickle, why = _pickle_exception(exc)
    return pickle.dumps((exc_pickle, _type_name(exc), _exception_text(exc), tb, machines, why),
                        _PICKLE_PROTOCOL)


def _exception_text(exc):
    """str(exc), or repr(exc) if that fails, or words saying both failed."""
    for text in (str, repr):
        try:
            return text(exc)
        except Exception:
            pass
    return "(its str() and repr() both raised)"


def _pickle_exception(exc):
    """An exception as a pickle (None if it does not pickle) and why not ("").

    Exceptions are rebuilt without calling their `__init__`: from the class, `args` and
    `__dict__`. The way pickle rebuilds them, `cls(*args)`, fails for the most common way of
    writing one, `__init__(self, code, detail)` that passes one message to
    `Exception.__init__`: then args holds one value and `__init__` wants two. Classes that say
    how they are pickled (their own `__reduce__`, as OSError has) are pickled their way, and
    so are the built-in exceptions, whose state can live outside `__dict__`."""
    cls = type(exc)
    if cls.__reduce__ is BaseException.__reduce__ and cls.__module__ != "builtins":
        parts = ("parts", cls, exc.args, getattr(exc, "__dict__", None) or None)
    else:
        parts = ("reduce", exc)
    try:
        return pickle.dumps(parts, _PICKLE_PROTOCOL), ""
    except Exception as e:
        return None, _describe_pickling_failure(exc, "the exception", e)


def _unpickle_exception(data):
    """The exception a `_pickle_exception` pickle holds; raises what stops it."""
    parts = pickle.loads(data)
    if parts[0] == "reduce":
        exc = parts[1]
    else:
        _, cls, args, state = parts
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError("%r is not an exception class" % (cls,))
        try:
            exc = cls.__new__(cls, *args)
        except Exception:                     # a __new__ of its own, with other ideas
            exc = cls.__new__(cls)
        exc.args = args
        if state:
            exc.__setstate__(state)
    if not isinstance(exc, BaseException):
        raise TypeError("%r is not an exception" % (exc,))
    return exc


def _rebuild_error(payload):
    """The exception to raise on the caller for an error payload from a machine."""
    exc_pickle, type_name, message, tb, machines, why = pickle.loads(payload)
    cause = _RemoteTraceback(tb, machines)
    if exc_pickle is not None:
        try:
            exc = _unpickle_exception(exc_pickle)
        except Exception as e:
            why = "it could not be rebuilt here: %s: %s" % (type(e).__name__,
                                                             _exception_text(e))
            if isinstance(e, (ImportError, AttributeError)):
                why += (" (its class, and those of its attributes, must be importable here by "
                        "the same name: defined at the top level of a module both sides have)")
        else:
            exc.__cause__ = cause
            if isinstance(exc, Error):
                _mark_remote(exc, machines)
            return exc
    error = RemoteError(type_name, message, tb, why)
    error.machines = machines
    return _mark_remote(error, machines)


def _mark_remote(error, machines):
    """A library error relayed from other machines: say so, and name the machine where it
    happened, the first of those it came through (a streamed argument's error came through
    the caller's own sending thread, which is no machine)."""
    error.remote = True
    where = next((m for m in machines if m != _STREAM_SENDER), None)
    if error.machine is None and where is not None:
        error.machine = where
    return error


# ======================================================================================
# Wire (Go: rpc)
# ======================================================================================
#
# A connection begins as HTTP over mutual TLS. `POST /bigrpc/Service.method` with a pickled
# `(args, kwargs)` body makes one call per request: simple, and curl-able. The library itself
# sends `GET /bigrpc` with `Upgrade: bigrpc/1`; after `101 Switching Protocols` the connection
# carries frames:
#
#     header   kind u8 | flags u8 | buffers u16 | meta length u32 | call id u64 | body length u64
#     meta     CALL: the method name, UTF-8
#     lengths  one u64 per out-of-band buffer
#     buffers  the out-of-band buffers, back to back
#     body     the pickle (or, in DATA frames, raw stream bytes)
#
# The buffers come first so that a large pickle can be unpickled straight from the
# connection: then a large `bytes` is read into its own memory with no copy of the body.
#
# One call is in flight on a connection at a time, and the thread that makes a call does its
# own sending and receiving: no thread handoff. Concurrency comes from a pool of connections per
# peer (what multiprocessing.managers does too); on the machine the connections wait in one
# epoll set and their frames are served inline, one thread at a time (see _FrameLoop). A CANCEL
# frame names a call by id and can arrive on any connection from the same process, since the
# call's own connection is busy; it travels on a connection of its own, which is then closed,
# because a connection carries nothing after a frame until that frame's reply.
#
# Batches: calls that queue up on the caller (call_async's, see `_CallQueue`) go several to a
# CALL frame flagged BATCH, whose body is a pickled (budget, [(call id, method, pickled
# arguments)]); the machine runs them one after the other and answers with one REPLY of
# their outcomes, or with two when one of them runs long: first the outcomes so far, then
# that call's (see `_Dispatcher.serve_batch`). Each call keeps its own id, for CANCEL.
#
# Streams: a reply that is a file or an iterator of bytes is sent as REPLY(streamed), DATA...,
# END (or STREAM_ERROR, which the reader raises when it reads past the data that arrived). An
# argument that is a readable binary file is sent the same way right after the CALL frame, by a
# separate thread, so that an echo of a large stream cannot deadlock on full socket buffers.

_HEADER = struct.Struct("!BBHIQQ")
_LENGTH = struct.Struct("!Q")
CALL, REPLY, ERROR, CANCEL, DATA, END, STREAM_ERROR = range(1, 8)
_UNPICKLED = -1               # not a frame kind: a reply already unpickled from the connection
_STREAMED = 1                 # flag: REPLY is followed by a stream; CALL carries a stream argument
_BATCH = 2                    # flag: CALL carries a batch of calls (see _Dispatcher.serve_batch)
_MAX_META = 4096
_SMALL = 1 << 16              # frames below this size go out in one write
_CHUNK = 1 << 20              # stream chunk size
_HANDSHAKE_TIMEOUT = 10.0     # seconds an unauthenticated connection may take to identify itself
                              # (servers: BIGMACHINE_HANDSHAKE_TIMEOUT, see _handshake_timeout)
_MAX_CONNECTIONS = 4096       # connections one server keeps open at once

_UPGRADE = "bigrpc/1"


class _TLSReader(io.RawIOBase):
    """The plaintext of a TLS connection, as a raw file for a BufferedReader.

    `socket.makefile()` reads through three Python layers (SocketIO.readinto,
    SSLSocket.recv_into, SSLSocket.read) before reaching OpenSSL; this reads with the
    SSLSocket's own TLS object, which keeps the socket's timeout semantics. Where that object
    is not there (a Python that changed it), it falls back to the SSLSocket's public read."""

    _MAX = 1 << 30               # OpenSSL takes C ints: read at most this much at once

    def __init__(self, sock):
        super().__init__()
        sslobj = getattr(sock, "_sslobj", None)
        self._read = sslobj.read if sslobj is not None and hasattr(sslobj, "read") else sock.read

    def readable(self):
        return True

    def readinto(self, b):
        n = len(b)
        try:
            return self._read(n, b) if n <= self._MAX else self._read(self._MAX, b[:self._MAX])
        except ssl.SSLError as e:
            if e.args[0] == ssl.SSL_ERROR_EOF:    # the peer went away without close_notify
                return 0
            raise


class _TLSWriter:
    """`sendall` for a TLS connection, writing with the SSLSocket's own TLS object (see
    _TLSReader), in pieces OpenSSL can take."""

    __slots__ = ("sock", "_write")
    _MAX = 1 << 28

    def __init__(self, sock):
        self.sock = sock
        sslobj = getattr(sock, "_sslobj", None)
        self._write = sslobj.write if sslobj is not None and hasattr(sslobj, "write") else None

    def sendall(self, data):
        write = self._write
        if write is None:
            self.sock.sendall(data)
            return
        n = len(data)
        if n <= self._MAX:
            done = write(data)
            if done == n:
                return
        else:
            done = 0
        view = memoryview(data).cast("B")
        while done < n:
            done += write(view[done:done + self._MAX])

    def fileno(self):
        return self.sock.fileno()


def _send_frame(sock, kind, call_id, meta=b"", body=b"", buffers=(), flags=0):
    """Send one frame. body is bytes, or the pieces of a pickle (a list, see `_pickle`), which
    go out as they are: large ones from their own memory, small ones joined to what precedes
    them so that a frame costs few writes."""
    pieces = body if type(body) is list else (body,)
    if len(pieces) == 1 and not buffers:
        size = len(pieces[0])
        if size < _SMALL:                 # one write
            sock.sendall(_HEADER.pack(kind, flags, 0, len(meta), call_id, size) + meta
                         + pieces[0])
            return
    else:
        size = sum(map(len, pieces))
    header = _HEADER.pack(kind, flags, len(buffers), len(meta), call_id, size)
    views = [b.raw() if isinstance(b, pickle.PickleBuffer) else memoryview(b).cast("B")
             for b in buffers]
    pending = [header, meta]
    pending.extend(_LENGTH.pack(v.nbytes) for v in views)
    for view in views:
        if pending:
            sock.sendall(b"".join(pending))
            pending = []
        sock.sendall(view)
    for piece in pieces:
        if len(piece) < _SMALL:
            pending.append(piece)
            continue
        if pending:
            sock.sendall(b"".join(pending))
            pending = []
        sock.sendall(piece)
    if pending:
        sock.sendall(b"".join(pending))


def _read_exact(rfile, n):
    data = rfile.read(n)
    if len(data) != n:
        raise EOFError("connection closed by peer")
    return data


def _read_header(rfile):
    """Read one frame header: (kind, flags, buffer count, meta, call id, body length)."""
    head = rfile.read(_HEADER.size)
    if len(head) != _HEADER.size:
        raise EOFError("connection closed by peer")
    kind, flags, nbuffers, meta_len, call_id, body_len = _HEADER.unpack(head)
    if meta_len > _MAX_META:
        raise _ProtocolError("frame metadata of %d bytes" % meta_len)
    meta = _read_exact(rfile, meta_len) if meta_len else b""
    return kind, flags, nbuffers, meta, call_id, body_len


_LARGE = 1 << 20              # pickles from this size on are unpickled from the connection


def _read_body(rfile, nbuffers, body_len):
    """Read a frame's out-of-band buffers, each straight into its own memory, and its pickle:
    (body, buffers). A large body is left on the connection, as a `_PendingPickle` for
    `_loads` to unpickle from there; whoever gets one must consume it before anything else is
    read from the connection (`_loads`, or `_discard`)."""
    lengths = [_LENGTH.unpack(_read_exact(rfile, 8))[0] for _ in range(nbuffers)]
    size = body_len + sum(lengths)
    if size > _CHECKED_SIZE:
        limit, why = _max_message(size)
        if size > limit:
            raise _TooLarge(size, limit, why)      # before any of it is allocated
    buffers = []
    for n in lengths:
        buf = bytearray(n)
        if n and rfile.readinto(buf) != n:
            raise EOFError("connection closed by peer")
        buffers.append(buf)
    if body_len >= _LARGE:
        return _PendingPickle(rfile, body_len), buffers
    return (_read_exact(rfile, body_len) if body_len else b""), buffers


class _PendingPickle:
    """A pickle still on the connection, read only up to its end (a file for pickle's
    Unpickler, which then reads large objects straight into their own memory)."""

    __slots__ = ("_rfile", "left")

    def __init__(self, rfile, length):
        self._rfile, self.left = rfile, length

    def read(self, n=-1):
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self._rfile.read(n)
        if len(data) != n:
            raise ConnectionResetError("connection closed in the middle of a pickle")
        self.left -= n
        return data

    def readinto(self, b):
        view = memoryview(b).cast("B")[:self.left]
        if len(view) >= _HUGE_PAGES_FROM:
            _advise_huge_pages(view)
        n = self._rfile.readinto(view) if len(view) else 0
        if n != len(view):
            raise ConnectionResetError("connection closed in the middle of a pickle")
        self.left -= n
        return n

    def readline(self):
        data = self._rfile.readline(self.left)
        self.left -= len(data)
        return data

    def peek(self, n=0):
        return self._rfile.peek(n)[:self.left]

    def discard(self):
        _skip(self._rfile, self.left)
        self.left = 0


# A large object unpickled from the connection (a 64 MiB bytes, say) is new memory, and the
# kernel maps it a 4 KiB page at a time as the data arrives: one page fault per 4 KiB took
# about as long as the transfer itself. Where the kernel gives huge pages on request
# (transparent huge pages in "madvise" mode), the buffer is marked for them just before the
# data is read into it: a fault per 2 MiB instead. The advice changes nothing else (the
# memory is the object's, and freed with it); where it cannot be given it is not.
_HUGE_PAGE = 2 << 20
_HUGE_PAGES_FROM = 8 * _HUGE_PAGE     # smaller buffers: too few pages to matter
_madvise = []                         # [libc's madvise, or None], once looked up


def _advise_huge_pages(view):
    """Ask the kernel to back the whole 2 MiB pages inside the writable view with huge pages."""
    if not _madvise:
        _madvise.append(None)
        try:
            import ctypes
            import mmap
            advice = mmap.MADV_HUGEPAGE          # Linux only
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _madvise[0] = (libc.madvise, ctypes.c_char.from_buffer, ctypes.addressof, advice)
        except (ImportError, AttributeError, OSError):
            pass
    if _madvise[0] is None:
        return
    madvise, from_buffer, addressof, advice = _madvise[0]
    try:
        start = addressof(from_buffer(view))
    except (TypeError, ValueError):           # read-only, or not contiguous
        return
    first = (start + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    end = (start + len(view)) & ~(_HUGE_PAGE - 1)
    if end > first:
        madvise(first, end - first, advice)


def _discard(body):
    """Drop a body that will not be unpickled, reading it off the connection if need be."""
    if type(body) is _PendingPickle:
        body.discard()


# Messages are read whole into memory, so one larger than a process can hold would end it
# (the out-of-memory killer, or a MemoryError at a bad moment). A process therefore refuses a
# message larger than BIGMACHINE_MAX_MESSAGE bytes if that is set, and otherwise one larger than
# half the memory available when it arrives, saying so before it allocates any of it. Large
# data belongs in streams, which are read a chunk at a time.
_CHECKED_SIZE = 1 << 20            # smaller messages are not checked
_MEMORY_CHECKED_SIZE = 64 << 20    # nor are smaller ones against the memory available


class _TooLarge(SerializationError):
    """A message larger than this process accepts, refused before it was read."""

    def __init__(self, size, limit, why):
        self.size, self.limit, self.why = size, limit, why
        super().__init__(self.explain("a message", "is", "this process"))

    def explain(self, what, verb, who):
        return ("%s %s %s, more than %s accepts (%s, %s); send large data as a stream: an open "
                "binary file as an argument, a file or an iterator of bytes as a result"
                % (what, verb, _bytes(self.size), who, _bytes(self.limit), self.why))


def _max_message(size):
    """The largest message this process accepts now, and why: (bytes, reason)."""
    setting = os.environ.get("BIGMACHINE_MAX_MESSAGE")
    if setting:
        try:
            return int(setting), "set by BIGMACHINE_MAX_MESSAGE"
        except ValueError:
            log.warning("ignoring BIGMACHINE_MAX_MESSAGE=%r: not a number of bytes", setting)
    if size <= _MEMORY_CHECKED_SIZE:
        return size, ""
    available = _memory_available()
    if available is None:
        return size, ""
    return available // 2, ("half of the %s of memory available; BIGMACHINE_MAX_MESSAGE sets "
                            "another limit" % _bytes(available))


def _memory_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _bytes(n):
    """n bytes for people: 512 B, 1.5 KiB, 2.0 GiB."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1024.0


def _skip(rfile, n):
    while n:
        got = len(rfile.read(min(n, _CHUNK)))
        if not got:
            raise EOFError("connection closed by peer")
        n -= got


class _ProtocolError(Exception):
    """A peer sent something that is not a frame of this protocol."""


def _is_binary_file(obj):
    return isinstance(obj, io.IOBase) and not isinstance(obj, io.TextIOBase) or (
        hasattr(obj, "read") and hasattr(obj, "close") and not isinstance(obj, (str, bytes)))


class _StreamPlaceholder:
    """Stands in the pickled arguments for the one argument that is streamed after them."""

    def __reduce__(self):
        return (_StreamPlaceholder, ())


class Stream:
    """A streamed argument that can be sent more than once: `opener()` is called for each
    attempt of a call and returns a readable binary file (Go's fresh reader per retry).

    A plain file argument is read once, as it is sent; if the call fails and `retry_call`
    tries again, the file is spent (or closed). `m.retry_call("Data.load",
    bigmachine.Stream(lambda: open(path, "rb")))` opens the file anew for every attempt."""

    __slots__ = ("opener",)

    def __init__(self, opener: typing.Callable[[], typing.BinaryIO]):
        if not callable(opener):
            raise TypeError("Stream takes a function that opens the data (a readable binary "
                            "file) each time it is called, not %r" % (opener,))
        self.opener = opener

    def __repr__(self):
        return "Stream(%r)" % (self.opener,)

    def __reduce__(self):
        raise TypeError("a bigmachine.Stream is an argument of a call, opened by the caller; "
                        "it cannot be pickled")

    def open(self):
        source = self.opener()
        if not _is_binary_file(source) and not isinstance(source, collections.abc.Iterator):
            raise TypeError("the opener of a bigmachine.Stream must return a readable binary "
                            "file or an iterator of bytes, not %s" % type(source).__name__)
        return source


# Values of these types are never streams: checking them against io.IOBase (an ABC) costs
# more than the rest of a small call's bookkeeping.
_PLAIN_TYPES = frozenset([int, float, str, bytes, bool, type(None), tuple, list, dict, set,
                          bytearray, complex])


def _split_stream_argument(args, kwargs):
    """Find the one readable binary file among the arguments and replace it by a placeholder."""
    if all(type(a) in _PLAIN_TYPES for a in args) and (
            not kwargs or all(type(v) in _PLAIN_TYPES for v in kwargs.values())):
        return None, args, kwargs
    found = None
    for i, a in enumerate(args):
        if _is_binary_file(a) or type(a) is Stream:
            if found is not None:
                raise ValueError("at most one argument of a call can be a stream")
            args = args[:i] + (_StreamPlaceholder(),) + args[i + 1:]
            found = a
    for k, v in kwargs.items():
        if _is_binary_file(v) or type(v) is Stream:
            if found is not None:
                raise ValueError("at most one argument of a call can be a stream")
            kwargs = dict(kwargs)
            kwargs[k] = _StreamPlaceholder()
            found = v
    return found, args, kwargs


_STREAM_SENDER = "the stream's sender"


def _send_stream(sock, call_id, source, where=_STREAM_SENDER):
    """Send source (a binary file or an iterator of bytes) as DATA frames, then END.

    An exception while reading the source is sent as STREAM_ERROR for the reader to raise
    (a SystemExit or KeyboardInterrupt as a RemoteError saying so; see `_not_passed_on`).
    Errors writing the socket propagate: the connection is broken and will be discarded.
    A `Stream` is opened here, as its data is about to be sent: once for each attempt."""
    try:
        if type(source) is Stream:
            source = source.open()
        if hasattr(source, "readinto"):
            chunk = bytearray(_CHUNK)
            view = memoryview(chunk)
            while True:
                n = source.readinto(chunk)
                if not n:
                    break
                _send_frame(sock, DATA, call_id, body=view[:n])
        elif hasattr(source, "read"):
            while True:
                data = source.read(_CHUNK)
                if not data:
                    break
                if isinstance(data, str):
                    raise TypeError("a streamed file must be opened in binary mode")
                _send_frame(sock, DATA, call_id, body=data)
        else:
            for data in source:
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise TypeError("a streamed iterator must yield bytes, not %s"
                                    % type(data).__name__)
                if len(data):
                    _send_frame(sock, DATA, call_id, body=data)
    except OSError as e:
        if _is_socket_error(e, sock):
            raise
        _send_frame(sock, STREAM_ERROR, call_id, body=_error_payload(e, where))
    except (Exception, SystemExit, KeyboardInterrupt) as e:
        _send_frame(sock, STREAM_ERROR, call_id, body=_error_payload(e, where,
                                                                      _not_passed_on(e)))
    else:
        _send_frame(sock, END, call_id)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()


def _send_stream_argument(sock, call_id, source):
    """The thread that streams a call's file argument. A broken connection ends it quietly:
    the call that owns the connection reports the failure."""
    _block_async_signals()
    try:
        _send_stream(sock, call_id, source)
    except (OSError, ValueError) as e:
        log.debug("streaming the argument of call %d stopped: %s", call_id, e)


def _shut_and_close(sock):
    """End a connection both ways, then close it, whatever state it is in. The shutdown wakes a
    thread blocked reading it, which close alone would not do."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _is_socket_error(e, sock):
    """Did this OSError come from the socket (and not from reading the user's file)?"""
    return isinstance(e, (ssl.SSLError, ConnectionError, socket.timeout)) or sock.fileno() < 0


class _StreamReader(io.RawIOBase):
    """The receiving end of a stream of DATA frames, as a raw binary file.

    Bytes are read straight from the connection into the reader's buffer. On the caller, when
    the stream ends the connection goes back to its pool (`on_end`); closing the reader before
    the end discards the connection, since it is in the middle of a message (`on_abort`)."""

    def __init__(self, rfile, call_id, on_end=None, on_abort=None):
        super().__init__()
        self._rfile, self._call_id = rfile, call_id
        self._left = 0          # bytes of the current DATA frame not yet read
        self._done = False
        self._on_end, self._on_abort = on_end, on_abort
        self.error = None       # the error that ended the stream, until a read raises it
        # Turns a broken connection into the error the reader should see (_Peer.stream_broken,
        # which the caller's Machine sets), so that a stream from a machine that died raises
        # MachineStopped like any other call on it.
        self.broken = None

    def readable(self):
        return True

    def readinto(self, b):
        try:
            return self._readinto(b)
        except (OSError, EOFError, ValueError, _ProtocolError) as e:
            # ValueError: the connection's file was closed under us (the machine stopped).
            # An error the stream's source raised on the machine is the user's, not a break.
            if self.broken is None or isinstance(e.__cause__, _RemoteTraceback):
                raise
            error = self.broken(e)
        raise error                 # its __cause__ is what stopped the machine, or e

    def _readinto(self, b):
        while not self._left:
            if self._done or not self._next_frame():
                return 0
        view = memoryview(b).cast("B")
        if not len(view):
            return 0
        n = self._rfile.readinto(view[:min(len(view), self._left)])
        if not n:
            raise EOFError("connection closed in the middle of a stream")
        self._left -= n
        return n

    def _next_frame(self):
        """Read the next frame of the stream: True for data, False at its end; raises the
        error that ended it."""
        kind, _flags, nbuffers, _meta, _call_id, body_len = _read_header(self._rfile)
        if kind == DATA:
            self._left = body_len
            return True
        if kind == END:
            self._finish()
            return False
        if kind == STREAM_ERROR:
            # Not raised here: the buffered reader above may hold bytes of this stream that
            # its caller has not been given yet, and an exception would lose them. It ends
            # the data, and the next read that finds no data raises it (see _StreamFile).
            body, _ = _read_body(self._rfile, nbuffers, body_len)
            self._finish()
            self.error = _rebuild_error(body)
            return False
        raise _ProtocolError("frame kind %d inside a stream" % kind)

    def _finish(self):
        self._done = True
        on_end, self._on_end, self._on_abort = self._on_end, None, None
        if on_end is not None:
            on_end()

    def drain(self):
        """Read and drop the rest of the stream (so the connection can carry the next call).
        An error that ended the stream is of no interest any more."""
        while not self._done:
            if self._left:
                _skip(self._rfile, self._left)
                self._left = 0
            try:
                self._next_frame()
            except (OSError, EOFError, _ProtocolError):
                raise
            except Exception:
                pass

    def close(self):
        if not self.closed and not self._done:
            on_abort, self._on_end, self._on_abort = self._on_abort, None, None
            self._done = True
            if on_abort is not None:
                on_abort()
        super().close()


class _StreamFile(io.BufferedReader):
    """A stream as its reader sees it: a buffered binary file over a `_StreamReader`, which
    returns every byte that arrived before the error that ended the stream, whatever the read
    sizes, and then raises that error from the first read that finds no more data. (A plain
    BufferedReader drops what it has gathered for a read when the raw file raises.)"""

    def _raise_error(self, got):
        error = self.raw.error
        if error is not None and not got:
            self.raw.error = None              # raised once; after it, the stream is at its end
            raise error
        return got

    def read(self, size=-1):
        got = super().read(size)
        return got if size == 0 else self._raise_error(got)

    def read1(self, size=-1):
        got = super().read1(size)
        return got if size == 0 else self._raise_error(got)

    def readinto(self, b):
        n = super().readinto(b)
        return n if not len(memoryview(b)) else self._raise_error(n)

    def readinto1(self, b):
        n = super().readinto1(b)
        return n if not len(memoryview(b)) else self._raise_error(n)

    def readline(self, size=-1):
        got = super().readline(size)
        return got if size == 0 else self._raise_error(got)

    def peek(self, size=0):
        return self._raise_error(super().peek(size))


def _parse_addr(addr):
    """'https://host:port/prefix/' -> (host, port, '/prefix/')."""
    import urllib.parse
    url = urllib.parse.urlsplit(addr)
    if url.scheme != "https" or not url.hostname:
        raise ValueError("not a machine address (want https://host:port/): %r" % addr)
    path = url.path or "/"
    if not path.endswith("/"):
        path += "/"
    return url.hostname, url.port or 443, path


def _classify_connect_error(e, addr):
    if isinstance(e, ssl.SSLError) and not isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        reason = getattr(e, "reason", None) or str(e)
        if getattr(e, "verify_message", None):           # what was wrong with its certificate
            reason = "%s: %s" % (reason, e.verify_message)
        return AuthenticationError(
            "mutual TLS with %s failed: %s (the peer does not hold a certificate of this "
            "session's authority, or refused ours)" % (addr, reason))
    return NetworkError("cannot connect to %s: %s" % (addr, e))


class _Connection:
    """One upgraded connection to a peer, owned by one call at a time."""

    __slots__ = ("sock", "writer", "rfile", "last_used", "timeout", "expired", "readable")

    def __init__(self, sock):
        self.sock = sock
        self.writer = _TLSWriter(sock)
        self.rfile = io.BufferedReader(_TLSReader(sock), 1 << 16)
        self.last_used = time.monotonic()
        self.timeout = None
        self.expired = False          # broken on purpose when its call's deadline passed
        # poll(0) of the socket: has a reply begun to arrive? (See _Peer._CALLER_SPIN.)
        poller = select.poll() if hasattr(select, "poll") else None
        if poller is not None:
            poller.register(sock.fileno(), select.POLLIN)
        self.readable = poller and functools.partial(poller.poll, 0)

    def settimeout(self, timeout):
        if timeout != self.timeout:
            self.sock.settimeout(timeout)
            self.timeout = timeout

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def interrupt(self):
        """Wake a thread blocked on this connection; it will find the connection broken."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class _InFlight:
    """A call in progress, as seen by whoever may cancel it (a future, a stopping machine)."""

    __slots__ = ("lock", "peer", "conn", "call_id", "cancelled")

    def __init__(self):
        self.lock = threading.Lock()
        self.peer = self.conn = self.call_id = None
        self.cancelled = False

    def attach(self, peer, conn, call_id):
        with self.lock:
            if self.cancelled:
                return False
            self.peer, self.conn, self.call_id = peer, conn, call_id
            return True

    def detach(self):
        with self.lock:
            self.peer = self.conn = None

    def cancel(self):
        with self.lock:
            if self.cancelled:
                return
            self.cancelled = True
            peer, conn, call_id = self.peer, self.conn, self.call_id
        if peer is not None:
            if conn is not None:      # (None: a call in a batch, whose connection is shared)
                conn.interrupt()
            peer.cancel_remote(call_id)


class _Peer:
    """Connections to one machine address: a pool of idle ones, and the calls made over them."""

    # A connection idle for longer than this is checked for EOF before it carries a call, so
    # that one the machine closed (it restarted at the same address, say) is not used: the call
    # would fail though the machine is up. The check (a select) is a noticeable share of a
    # small call (bench/'s "small call"), so calls in quick succession skip it; any restart
    # takes longer than this (a process needs tens of milliseconds to start), as does anything
    # else that closes an idle connection.
    _STALE_CHECK = 0.01

    # A thread that waits for a reply asleep in recv is woken by the kernel when it comes, and
    # on a VM an idle core takes tens of microseconds to wake: as long as a quick call itself.
    # So the caller of a call (one without a streamed argument) first looks for its reply for
    # this long, with poll(0), before it sleeps, as the machine does for the next frame (_FrameLoop._SPIN).
    # Only a peer's only call in flight spins: callers in many threads keep each other's
    # cores busy anyway, and spinning would take the GIL from the others. The spin costs at
    # most this much CPU a call, and a reply to a quick call comes within it. A spin that
    # ends without a reply (a slow method; a machine short of cores: on a loaded host a
    # spinning caller takes the core its machine needs; a machine in this very process,
    # which needs the GIL the spinning caller holds) is not repeated for the next
    # _spin_backoff calls, twice as many after each vain one (up to 255), so that such a
    # caller spins on a small fraction of its calls, and one reply in time resets it.
    _CALLER_SPIN = 0.0001
    _spin_skip = _spin_backoff = 0

    def __init__(self, client, addr):
        self.client, self.addr = client, addr
        self.host, self.port, self.prefix = _parse_addr(addr)
        self._idle = []
        self._busy = set()
        self._lock = threading.Lock()
        self._closed = False
        # What reading a streamed reply raises when the connection breaks (error -> exception):
        # the Machine using this peer sets it, so that it can say the machine stopped.
        self.stream_broken = None

    # -- connections --------------------------------------------------------------------

    def _dial(self, deadline):
        timeout = _HANDSHAKE_TIMEOUT if deadline is None else max(0.001, deadline - time.monotonic())
        try:
            raw = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as e:
            raise self._dial_failed(deadline, e, NetworkError(
                "cannot connect to %s: %s" % (self.addr, e))) from e
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock = self.client.context.wrap_socket(raw)
        except OSError as e:
            raw.close()
            raise self._dial_failed(deadline, e, _classify_connect_error(e, self.addr)) from e
        conn = _Connection(sock)
        conn.timeout = timeout
        try:
            request = (
                "GET %sbigrpc HTTP/1.1\r\nHost: %s:%d\r\nConnection: Upgrade\r\n"
                "Upgrade: %s\r\nBigmachine-Python: %s\r\nBigmachine-Protocol: %d\r\n"
                "Bigmachine-Version: %s\r\n\r\n"
                % (self.prefix, self.host, self.port, _UPGRADE, PYTHON, PROTOCOL, __version__))
            sock.sendall(request.encode("ascii"))
            status, headers, body = _read_http_response(conn.rfile)
        except socket.timeout as e:
            conn.close()
            raise self._dial_failed(deadline, e, NetworkError(
                "%s did not answer the connection upgrade in %.1fs" % (self.addr, timeout))) from e
        except (OSError, EOFError, ValueError) as e:
            conn.close()
            raise _classify_connect_error(e, self.addr) from e
        if status != 101:
            conn.close()
            if status == 409:
                raise VersionMismatch(
                    "this process runs Python %s with bigmachine.py %s (protocol %d); machine %s "
                    "runs Python %s with bigmachine.py %s (protocol %s): %s" % (
                        PYTHON, __version__, PROTOCOL, self.addr,
                        headers.get("bigmachine-python", "?"),
                        headers.get("bigmachine-version", "?"),
                        headers.get("bigmachine-protocol", "?"), body.strip()))
            raise NetworkError("%s refused the connection: HTTP %d %s"
                               % (self.addr, status, body.strip()[:200]))
        return conn

    def _dial_failed(self, deadline, e, error):
        """The error for a failed dial: Timeout if it was the call's deadline that ran out
        (a machine that stopped answering still accepts TCP connections, and the TLS
        handshake is what takes forever), else error."""
        if deadline is not None and isinstance(e, socket.timeout):
            return Timeout("the deadline passed while connecting to %s: %s" % (self.addr, e))
        return error

    def checkout(self, deadline):
        with self._lock:
            if self._closed:
                raise NetworkError("connections to %s are closed" % self.addr)
            while self._idle:
                conn = self._idle.pop()
                if time.monotonic() - conn.last_used > self._STALE_CHECK and _is_stale(conn):
                    conn.close()
                    continue
                self._busy.add(conn)
                return conn
        conn = self._dial(deadline)
        with self._lock:
            if self._closed:
                conn.close()
                raise NetworkError("connections to %s are closed" % self.addr)
            self._busy.add(conn)
        return conn

    def checkin(self, conn):
        conn.last_used = time.monotonic()
        with self._lock:
            self._busy.discard(conn)
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def discard(self, conn):
        with self._lock:
            self._busy.discard(conn)
        conn.close()

    def close(self):
        """Close every connection, interrupting the calls in flight on them."""
        with self._lock:
            self._closed = True
            conns = self._idle + list(self._busy)
            self._idle, self._busy = [], set()
        for conn in conns:
            conn.close()

    def reset(self):
        """Close every connection but keep the peer usable (a machine restarted, say)."""
        with self._lock:
            conns, self._idle = self._idle, []
        for conn in conns:
            conn.close()

    # -- calls --------------------------------------------------------------------------

    def call(self, method, args, kwargs, deadline=None, inflight=None):
        """Call method on the peer and return its result; raises what the method raised.

        Every call takes this one path, whatever it carries (a deadline, someone who may
        cancel it, a streamed argument or reply), and is counted in the client's statistics
        here, once, failed or not. The work is in `_exchange`."""
        began = time.perf_counter()
        sizes = [0, 0]                       # request and reply bytes, as far as they got
        failed = True
        try:
            result = self._exchange(method, args, kwargs, deadline, inflight, sizes)
            failed = False
        finally:
            self.client.stats.record((self.addr, method), time.perf_counter() - began,
                                     sizes[0], sizes[1], failed)
        return result

    def _exchange(self, method, args, kwargs, deadline, inflight, sizes):
        """Send the call, wait for its reply and return its result: the hot path of every call
        on the caller. What only some calls need (a timeout, a stream, a cancel) costs the
        others a test of None each; the rest is written flat (see `_serve_frame`)."""
        stream = None
        if kwargs:
            stream, args, kwargs = _split_stream_argument(args, kwargs)
        else:
            for a in args:
                if type(a) not in _PLAIN_TYPES:
                    stream, args, kwargs = _split_stream_argument(args, kwargs)
                    break
        timeout = None
        if deadline is not None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise Timeout("deadline passed before calling %s on %s" % (method, self.addr))
        try:
            body, buffers = _pickle((args, kwargs, timeout))
        except Exception:            # say which part of the arguments would not pickle
            body, buffers = _dumps((args, kwargs, timeout), "the arguments of %s" % method)
        sizes[0] = len(body[0]) if len(body) == 1 and not buffers else _size(body, buffers)
        call_id = next(self.client._ids)
        conn = self.checkout(deadline)
        if inflight is not None and not inflight.attach(self, conn, call_id):
            self.checkin(conn)
            raise Cancelled("call %s on %s was cancelled" % (method, self.addr))
        sender = alarm = None
        try:
            if stream is not None and deadline is not None:
                alarm = self._alarm(conn, deadline)
            elif conn.timeout != timeout:
                conn.settimeout(timeout)
            _send_frame(conn.writer, CALL, call_id, method.encode(), body, buffers,
                        _STREAMED if stream is not None else 0)
            if stream is not None:
                sender = threading.Thread(target=_send_stream_argument,
                                          args=(conn.writer, call_id, stream),
                                          name="bigmachine-stream-send", daemon=True)
                sender.start()
            else:
                if deadline is not None:
                    conn.settimeout(max(0.001, deadline - time.monotonic()))
                if self._spin_skip > 0:        # (threads may race here: any count will do)
                    self._spin_skip -= 1
                elif conn.readable and len(self._busy) == 1:
                    self._spin(conn.readable)
            head = conn.rfile.read(_HEADER.size)       # (_read_header, inline)
            if len(head) != _HEADER.size:
                raise EOFError("connection closed by peer")
            kind, flags, nbuffers, meta_len, _id, body_len = _HEADER.unpack(head)
            if meta_len:
                raise _ProtocolError("a reply frame with metadata")
            if kind == REPLY and flags & _STREAMED:
                if sender is not None:
                    sender.join()
                conn.settimeout(None)
                return self._stream_reply(conn, call_id, inflight)
            if nbuffers or body_len >= _LARGE:
                reply, reply_buffers = _read_body(conn.rfile, nbuffers, body_len)
                sizes[1] = body_len + (sum(len(b) for b in reply_buffers) if nbuffers else 0)
                if type(reply) is _PendingPickle:
                    if kind == REPLY:        # read it before the connection goes back
                        reply = (_loads(reply, reply_buffers, "the result of %s from %s"
                                        % (method, self.addr)),)
                        kind = _UNPICKLED
                    else:
                        _discard(reply)
                        raise _ProtocolError("a %d-byte error frame" % body_len)
            else:
                reply, reply_buffers = conn.rfile.read(body_len), ()
                if len(reply) != body_len:
                    raise EOFError("connection closed by peer")
                sizes[1] = body_len
            if sender is not None:
                sender.join()
            if timeout is not None:
                conn.settimeout(None)
        except socket.timeout:
            self.discard(conn)
            self.cancel_remote(call_id)
            raise Timeout("call %s on %s timed out after %.3gs"
                          % (method, self.addr, timeout)) from None
        except (OSError, EOFError, _ProtocolError) as e:
            self._discard_after(conn, sender)
            if inflight is not None and inflight.cancelled:
                raise Cancelled("call %s on %s was cancelled" % (method, self.addr)) from None
            if alarm is not None and conn.expired:
                self.cancel_remote(call_id)
                raise Timeout("call %s on %s timed out after %.3gs"
                              % (method, self.addr, timeout)) from None
            raise NetworkError("call %s on %s failed: %s"
                               % (method, self.addr, e or type(e).__name__)) from e
        except BaseException:
            # KeyboardInterrupt and the like: the connection is in the middle of a message.
            self._discard_after(conn, sender)
            self.cancel_remote(call_id)
            raise
        finally:
            if alarm is not None:
                alarm.cancel()
                alarm.join()              # one already firing breaks the connection first
            if inflight is not None:
                inflight.detach()
        if conn.expired:                  # the deadline came with the reply: result stands
            self.discard(conn)
        else:
            self.checkin(conn)
        if kind == REPLY:
            try:
                return pickle.loads(reply, buffers=reply_buffers)
            except Exception:
                pass                      # _result says what went wrong
        return self._result(method, kind, reply, reply_buffers)

    def call_batch(self, calls, inflights, budget, settle, release):
        """Make calls, a list of (call id, method, pickled (args, kwargs, None)), in one frame
        (see `_Dispatcher.serve_batch`), each attached to its inflight already. Each outcome
        goes to settle(index, ok, value) as it arrives; release(index) hears that the calls
        from index on will not run there while one before them runs long. Returns the index
        of the first call that was not run (len(calls) if all were)."""
        began = time.perf_counter()
        body = pickle.dumps((budget, calls), _PICKLE_PROTOCOL)
        conn = self.checkout(None)
        done, released = 0, False
        try:
            conn.settimeout(None)
            _send_frame(conn.writer, CALL, next(self.client._ids), body=body, flags=_BATCH)
            while True:
                kind, _, nbuffers, _, _, body_len = _read_header(conn.rfile)
                reply, buffers = _read_body(conn.rfile, nbuffers, body_len)
                if kind == ERROR and type(reply) is bytes:
                    raise _rebuild_error(reply)
                if kind != REPLY:
                    _discard(reply)
                    raise _ProtocolError("a batch of calls answered with a frame of kind %d"
                                         % kind)
                outcomes, follows = _loads(reply, buffers, "the results of a batch of calls "
                                                           "from %s" % self.addr)
                now = time.perf_counter()    # each call counts its share of the wait
                share, began = (now - began) / max(1, len(outcomes)), now
                for ok, value in outcomes:
                    self.client.stats.record((self.addr, calls[done][1]), share,
                                             len(calls[done][2]),
                                             len(value) if ok else 0, ok is False)
                    settle(done, ok, value)
                    done += 1
                if follows is None:
                    break
                # Released: the call running there is now this connection's only one.
                release(follows + 1)
                released = True
                if not inflights[follows].attach(self, conn, calls[follows][0]):
                    raise OSError("cancelled")
        except (OSError, EOFError, _ProtocolError) as e:
            self.discard(conn)
            if released and inflights[done].cancelled:
                raise Cancelled("call %s on %s was cancelled" % (calls[done][1], self.addr))
            raise NetworkError("a batch of calls (%s, ...) on %s failed: %s"
                               % (calls[done][1], self.addr, e or type(e).__name__)) from e
        except BaseException:
            self.discard(conn)
            raise
        self.checkin(conn)
        return done

    def _alarm(self, conn, deadline):
        """A timer that breaks conn at deadline, for a call with a deadline and a streamed
        argument. Two threads on one TLS connection, one sending the stream and one reading
        the reply, must keep it blocking: with a timeout the socket is non-blocking
        underneath, and OpenSSL then took one thread's state for the other's (one call in six
        failed, "EOF in violation of protocol"). The deadline breaks the connection instead,
        and the call then raises Timeout."""
        conn.settimeout(None)             # a new connection has the dial's timeout
        alarm = threading.Timer(max(0.001, deadline - time.monotonic()), self._expire, (conn,))
        alarm.daemon = True
        alarm.start()
        return alarm

    def _spin(self, readable):
        """Look for the reply for up to _CALLER_SPIN seconds before sleeping in recv; after a
        vain spin, skip the next ones (see _CALLER_SPIN)."""
        if readable():
            return
        clock = time.perf_counter
        until = clock() + self._CALLER_SPIN
        while not readable():
            if clock() > until:               # in vain: spin again only after a while
                self._spin_backoff = min(2 * self._spin_backoff + 1, 255)
                self._spin_skip = self._spin_backoff
                return
        self._spin_backoff = 0

    def _result(self, method, kind, reply, reply_buffers):
        if kind == _UNPICKLED:
            return reply[0]
        if kind == REPLY:
            return _loads(reply, reply_buffers, "the result of %s from %s" % (method, self.addr))
        if kind == ERROR:
            raise _rebuild_error(reply)
        raise NetworkError("%s answered %s with a frame of kind %d" % (self.addr, method, kind))

    def _discard_after(self, conn, sender):
        """Discard a connection that a stream-sending thread may still be writing to: break it
        now, close it once that thread has stopped. Closed at once, its descriptor number
        could be reused (by the next connection, or a user's file) and receive the rest."""
        if sender is None or not sender.is_alive():
            self.discard(conn)
            return
        with self._lock:
            self._busy.discard(conn)
        conn.interrupt()

        def close_when_done():
            sender.join()
            conn.close()
        _background(close_when_done)

    @staticmethod
    def _expire(conn):
        """A call's deadline passed: break its connection (see _Peer._exchange)."""
        conn.expired = True
        conn.interrupt()

    def _stream_reply(self, conn, call_id, inflight):
        """The caller's end of a streamed reply: the connection is its until the end."""
        reader = _StreamReader(
            conn.rfile, call_id,
            on_end=functools.partial(self._end_stream, conn, inflight),
            on_abort=functools.partial(self._abort_stream, conn, call_id, inflight))
        reader.broken = self.stream_broken
        return _StreamFile(reader, _CHUNK)

    def _end_stream(self, conn, inflight):
        if inflight is not None:
            inflight.detach()
        self.checkin(conn)

    def _abort_stream(self, conn, call_id, inflight):
        if inflight is not None:
            inflight.detach()
        self.discard(conn)
        self.cancel_remote(call_id)

    def cancel_remote(self, call_id):
        """Ask the peer to cancel a call, from another thread and connection (best effort)."""
        if not self._closed:
            _background(self._send_cancel, call_id)

    def _send_cancel(self, call_id):
        try:
            conn = self.checkout(time.monotonic() + _HANDSHAKE_TIMEOUT)
        except Error:
            return
        try:
            conn.settimeout(_HANDSHAKE_TIMEOUT)
            _send_frame(conn.writer, CANCEL, call_id)
        except OSError:
            pass
        # Not back to the pool: a connection carries nothing after a frame until its reply
        # (see _FrameLoop), and a CANCEL has none. Cancels are rare; a connection is cheap.
        self.discard(conn)


def _is_stale(conn):
    """An idle connection that is readable has been closed by the peer (or is corrupt)."""
    try:
        readable, _, _ = select.select([conn.sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _read_http_response(rfile):
    """Read an HTTP/1.1 response: (status, lower-cased headers, body text)."""
    line = rfile.readline(65537)
    if not line:
        raise EOFError("connection closed by peer")
    parts = line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError("not an HTTP response: %r" % line[:80])
    status = int(parts[1])
    headers = {}
    while True:
        line = rfile.readline(65537)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    length = int(headers.get("content-length", "0") or 0)
    if length and status != 101:
        body = rfile.read(min(length, 65536))
    return status, headers, body.decode("utf-8", "replace")


class _Client:
    """A process's RPC client: its TLS context and one `_Peer` per machine address."""

    def __init__(self, credentials):
        self._credentials, self._context = credentials, None
        self._peers = {}
        self._lock = threading.Lock()
        self.stats = _RPCStats()             # the calls made, per method and per machine
        # A machine knows the calls it runs by id alone (a CANCEL arrives on another connection
        # than its call), and it serves several clients: the driver's and other machines'.
        # Each client's ids therefore start at a random point of a 62-bit range, so that two
        # clients' ids never meet in practice, and one cannot cancel the other's call.
        self._ids = itertools.count((int.from_bytes(os.urandom(8), "big") >> 2) + 1)
        self.next_call_id = functools.partial(next, self._ids)

    @property
    def context(self):
        """The client TLS context, made at the first connection: most machines never call
        out, and a context costs a machine's startup milliseconds (64 at once: many)."""
        context = self._context
        if context is None:
            with self._lock:
                if self._context is None:
                    self._context = _read_ahead(client_context(self._credentials))
                context = self._context
        return context

    def peer(self, addr):
        peer = self._peers.get(addr)
        if peer is None:
            with self._lock:
                peer = self._peers.get(addr)
                if peer is None:
                    peer = self._peers[addr] = _Peer(self, addr)
        return peer

    def forget(self, addr):
        with self._lock:
            peer = self._peers.pop(addr, None)
        if peer is not None:
            peer.close()

    def close(self):
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            peer.close()


def _file_limit():
    """How many files this process may open (its soft RLIMIT_NOFILE; 1024 if unknown)."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1024
    return soft if soft != getattr(resource, "RLIM_INFINITY", -1) and soft > 0 else 1 << 20


def _raise_file_limit():
    """Raise this process's soft limit on open files to its hard limit: a machine's files are
    its connections, and the soft limit is often far below what the system allows."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard and soft != resource.RLIM_INFINITY:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, OSError, ValueError) as e:
        log.debug("could not raise the limit on open files: %s", e)


def _handshake_timeout():
    """Seconds a server gives a new connection to finish TLS, and then to send its first
    request, before it closes it: BIGMACHINE_HANDSHAKE_TIMEOUT if set, else 10. Until then the
    connection holds a thread and a file, so this bounds how long idle or half-open connections
    can hold them."""
    setting = os.environ.get("BIGMACHINE_HANDSHAKE_TIMEOUT")
    if setting:
        try:
            if float(setting) > 0:
                return float(setting)
        except ValueError:
            pass
        log.warning("ignoring BIGMACHINE_HANDSHAKE_TIMEOUT=%r: not a positive number of seconds",
                    setting)
    return _HANDSHAKE_TIMEOUT


class _Server:
    """A machine's RPC server: mutual TLS, HTTP for the first exchange, then frames.

    Each connection gets a thread, which completes the TLS handshake under a deadline (so that
    idle or half-open connections cannot hold threads) and the HTTP exchange; an upgraded
    connection then goes to the server's `_FrameLoop` (where there is epoll; elsewhere its
    thread goes on serving its calls inline). The number of open connections is bounded."""

    def __init__(self, credentials, dispatcher, sock=None, host="127.0.0.1", port=0, prefix="/"):
        self.context = _read_ahead(server_context(credentials))
        self.dispatcher = dispatcher
        self.prefix = prefix
        if sock is None:
            sock = socket.create_server((host, port), backlog=512)
        self.sock = sock
        self.host, self.port = sock.getsockname()[:2]
        self.handshake_timeout = _handshake_timeout()
        self._conns = set()
        # Connections that have not passed the TLS handshake yet, oldest first. When files
        # run short they make room for new ones, which may be authenticated peers: an
        # unauthenticated connection's only claim is that it came first.
        self._unauthenticated = collections.OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        self._frames = _FrameLoop(dispatcher, self._forget) if hasattr(select, "epoll") else None
        self._thread = threading.Thread(target=self._accept_loop, name="bigmachine-accept",
                                        daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _accept_loop(self):
        _block_async_signals()
        while not self._closed:
            try:
                raw, peer_addr = self.sock.accept()
            except OSError:
                if self._closed:
                    return
                # EMFILE and the like: make room, let connections close, then go on.
                self._drop_unauthenticated()
                time.sleep(0.01)
                continue
            # (The limit is looked up each time: it can change under a running process.)
            if (len(self._unauthenticated) >= max(16, _file_limit() // 4)
                    or len(self._conns) >= _MAX_CONNECTIONS):
                self._drop_unauthenticated()
            with self._lock:
                if self._closed or len(self._conns) >= _MAX_CONNECTIONS:
                    raw.close()
                    continue
                self._conns.add(raw)
                self._unauthenticated[raw] = raw
            try:
                threading.Thread(target=self._serve_connection, args=(raw, peer_addr),
                                 name="bigmachine-conn", daemon=True).start()
            except RuntimeError as e:
                # "can't start new thread": refuse this one connection, not every later one,
                # as letting the error end this loop would.
                with self._lock:
                    self._conns.discard(raw)
                    self._unauthenticated.pop(raw, None)
                raw.close()
                log.warning("refused a connection from %s: %s", peer_addr, e)
                time.sleep(0.01)

    def _drop_unauthenticated(self):
        """End the oldest connection that has not passed the TLS handshake: its thread wakes,
        and closes it."""
        with self._lock:
            if not self._unauthenticated:
                return
            raw, current = self._unauthenticated.popitem(last=False)
            # socket.socket's shutdown, also for a TLS socket: SSLSocket's would drop its TLS
            # state under the thread in the middle of the handshake.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(current, socket.SHUT_RDWR)
        log.debug("dropped an unauthenticated connection to make room for new ones")

    def _serve_connection(self, raw, peer_addr):
        sock = None
        adopted = False
        try:
            raw.settimeout(self.handshake_timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            # Wrapped first and then shaken hands with: the TLS socket takes the connection's
            # file from raw, and whoever must break the handshake off (close, or a drop to
            # make room) needs the socket that has it.
            with self._lock:
                if raw not in self._unauthenticated:      # dropped before it got here
                    return
                sock = self.context.wrap_socket(raw, server_side=True,
                                                do_handshake_on_connect=False)
                self._unauthenticated[raw] = sock
                self._conns.discard(raw)
                self._conns.add(sock)
            try:
                sock.do_handshake()
            except (OSError, ValueError) as e:
                log.debug("refused a connection from %s: %s", peer_addr, e)
                return
            with self._lock:
                self._unauthenticated.pop(raw, None)
            if self._closed:
                return
            adopted = self._serve_http(sock)
        except Exception:
            log.debug("connection from %s failed", peer_addr, exc_info=True)
        finally:
            if adopted:                   # the frame loop has it now
                return
            with self._lock:
                self._unauthenticated.pop(raw, None)
                self._conns.discard(raw)
                self._conns.discard(sock)
            for s in (sock, raw):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.close()

    def _forget(self, sock):
        """Close a connection the frame loop is done with."""
        with self._lock:
            self._conns.discard(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def close(self):
        """Stop accepting, and break every open connection (calls in progress fail)."""
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns), set()
        if self._frames is not None:
            self._frames.close()
        # Closing a listening socket does not wake a thread blocked in accept() on it, and the
        # port stays taken until that accept returns; shutting it down first does both, so a
        # machine restarted at once can bind its old address again.
        _shut_and_close(self.sock)
        for s in conns:
            _shut_and_close(s)


    # -- HTTP ------------------------------------------------------------------------------
    #
    # The endpoint speaks the small part of HTTP/1.1 it needs, itself: http.server would be
    # the largest import of every machine process, for the parsing of one request line and a
    # few headers. Requests: `GET <prefix>bigrpc` with `Upgrade: bigrpc/1` (the library's
    # connections), `POST <prefix>bigrpc/Service.method` (one call per request, for curl and
    # people), anything else 404. Until a connection is upgraded it must keep to the handshake
    # deadline, request by request.

    _MAX_HEADERS = 64

    def _serve_http(self, sock):
        """Serve HTTP requests until the connection ends (False) or is upgraded and handed to
        the frame loop (True)."""
        rfile = io.BufferedReader(_TLSReader(sock), 1 << 16)
        writer = _TLSWriter(sock)
        while not self._closed:
            try:
                request = _read_http_request(rfile, self._MAX_HEADERS)
            except ValueError as e:
                _http_reply(writer, 400, str(e).encode(), close=True)
                return False
            if request is None:
                return False
            method, path, headers = request
            if path == self.prefix + "bigrpc" and method == "GET":
                if self._upgrade(writer, headers):
                    # A caller may send its first frame right behind the request, so that it
                    # is read with it: the frame loop would wait for it on the socket, where it
                    # no longer is. Serve what came along here first.
                    while _buffered(sock, rfile):
                        sock.settimeout(None)
                        if not _serve_frame(writer, rfile, self.dispatcher):
                            return False
                    sock.settimeout(None)
                    if self._frames is not None:
                        try:
                            self._frames.adopt(sock, rfile, writer)
                            return True
                        except OSError:       # closed meanwhile
                            return False
                    _serve_frames(writer, rfile, self.dispatcher)
                    return False
            elif path.startswith(self.prefix + "bigrpc/") and method == "POST":
                self._post(writer, rfile, path[len(self.prefix + "bigrpc/"):], headers)
            else:
                _http_reply(writer, 404, b"no such page: " + path.encode("utf-8", "replace"))

    def _upgrade(self, writer, headers):
        """Answer an upgrade request: True if the connection now carries frames."""
        versions = {"Bigmachine-Python": PYTHON, "Bigmachine-Protocol": str(PROTOCOL),
                    "Bigmachine-Version": __version__}
        if headers.get("upgrade", "").lower() != _UPGRADE:
            _http_reply(writer, 426, ("upgrade to %s, or POST to %sbigrpc/Service.method\n"
                                      % (_UPGRADE, self.prefix)).encode())
            return False
        python = headers.get("bigmachine-python", "")
        protocol = headers.get("bigmachine-protocol", "")
        if python != PYTHON or protocol != str(PROTOCOL):
            _http_reply(writer, 409, ("peer runs Python %s (protocol %s); this machine runs "
                                      "Python %s (protocol %d)\n" % (
                                          python or "?", protocol or "?", PYTHON,
                                          PROTOCOL)).encode(), headers=versions)
            return False
        _http_reply(writer, 101, None, headers=dict(versions, Connection="Upgrade",
                                                    Upgrade=_UPGRADE))
        return True

    def _post(self, writer, rfile, method, headers):
        """One call per request: body pickle((args, kwargs)); reply 200 pickle(result), or
        590 with an error payload, like the Go original's method error status."""
        try:
            length = int(headers.get("content-length", ""))
        except ValueError:
            _http_reply(writer, 411, b"Content-Length required\n", close=True)
            raise EOFError("no Content-Length")
        dispatcher = self.dispatcher
        if length < 0:
            _http_reply(writer, 400, b"Content-Length cannot be negative\n", close=True)
            raise EOFError("a negative Content-Length")
        limit, why = _max_message(length)
        if length > limit:
            _http_reply(writer, 413, (_TooLarge(length, limit, why).explain(
                "the arguments of %s" % method, "are", dispatcher.where) + "\n").encode(),
                close=True)
            raise EOFError("a request too large")
        body = _read_exact(rfile, length)
        try:
            fn = dispatcher.lookup(method)
            args, kwargs = _loads(body, (), "the arguments of %s" % method)[:2]
            result = fn(*args, **kwargs)
            status, reply = 200, pickle.dumps(result, _PICKLE_PROTOCOL)
        except (Exception, SystemExit, KeyboardInterrupt) as e:
            status, reply = 590, _error_payload(e, dispatcher.where, _not_passed_on(e))
        _http_reply(writer, status, reply,
                    headers={"Content-Type": "application/x-python-pickle"})


_HTTP_REASONS = {101: "Switching Protocols", 200: "OK", 400: "Bad Request",
                 404: "Not Found", 409: "Conflict", 411: "Length Required",
                 413: "Payload Too Large",
                 426: "Upgrade Required", 590: "Method Error"}


def _buffered(sock, rfile):
    """Has the connection bytes ready to read without waiting: in rfile's buffer, or in TLS's,
    or on the socket? (Looked at without blocking; the socket is left non-blocking.)"""
    sock.settimeout(0.0)
    try:
        return bool(rfile.peek(1))
    except (ssl.SSLWantReadError, BlockingIOError, socket.timeout):
        return False
    except (OSError, ValueError):
        return True                   # broken: reading it says so, and ends the connection


def _read_http_request(rfile, max_headers):
    """Read a request line and its headers: (method, path, {lower-case name: value}), or None
    if the connection ended before a request. Malformed requests raise ValueError."""
    line = rfile.readline(8193)
    if not line:
        return None
    if len(line) > 8192 or not line.endswith(b"\n"):
        raise ValueError("request line too long")
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("not an HTTP/1.x request")
    headers = {}
    for _ in range(max_headers + 1):
        line = rfile.readline(8193)
        if line in (b"\r\n", b"\n"):
            return parts[0], parts[1], headers
        if not line.endswith(b"\n") or b":" not in line:
            raise ValueError("malformed header")
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    raise ValueError("too many headers")


def _http_reply(writer, status, body, headers=None, close=False):
    lines = ["HTTP/1.1 %d %s" % (status, _HTTP_REASONS.get(status, "Error")),
             "Server: bigmachine/" + __version__]
    for name, value in (headers or {}).items():
        lines.append("%s: %s" % (name, value))
    if body is not None:
        lines.append("Content-Length: %d" % len(body))
    if close:
        lines.append("Connection: close")
    writer.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))


def _serve_frames(sock, rfile, dispatcher):
    """The machine side of an upgraded connection, on a thread of its own: read a call, run it,
    reply; repeat. (Where epoll is, connections wait for their calls in a `_FrameLoop`
    instead, which serves one frame at a time with `_serve_frame`.)"""
    while _serve_frame(sock, rfile, dispatcher):
        pass


def _serve_frame(sock, rfile, dispatcher):
    """Read one frame from an upgraded connection and act on it (a call: run it and reply).
    Returns False when the connection is done: closed by the peer, broken, or misused.

    This function and `_Dispatcher.serve_call` are the hot path of every call on a machine,
    and code that runs right after a blocking read runs cold: each Python call here costs
    several times what a benchmark of it alone says. So they are written flat."""
    try:
        head = rfile.read(_HEADER.size)
        if len(head) != _HEADER.size:
            return False
        kind, flags, nbuffers, meta_len, call_id, body_len = _HEADER.unpack(head)
        if meta_len > _MAX_META:
            raise _ProtocolError("frame metadata of %d bytes" % meta_len)
        meta = rfile.read(meta_len)
        if kind == CALL:
            if nbuffers or body_len >= _LARGE:
                try:
                    body, buffers = _read_body(rfile, nbuffers, body_len)
                except _TooLarge as e:
                    _refuse_call(sock, rfile, meta, call_id, flags, dispatcher, e)
                    return True
            else:
                body, buffers = rfile.read(body_len), ()
                if len(body) != body_len:
                    return False
            if len(meta) != meta_len:
                return False
            if flags & _BATCH:
                dispatcher.serve_batch(sock, call_id, body, buffers)
                return True
            dispatcher.serve_call(sock, rfile, meta, call_id, body, buffers, flags)
            return True
        if kind == CANCEL and not body_len:
            dispatcher.cancel(call_id)
            return True
        log.debug("unexpected frame kind %d; closing the connection", kind)
    except (OSError, EOFError, _ProtocolError) as e:
        log.debug("connection closed: %s", e)
    return False


class _Parked:
    """An upgraded connection as the frame loop keeps it."""

    __slots__ = ("sock", "rfile", "writer", "fd")

    def __init__(self, sock, rfile, writer):
        self.sock, self.rfile, self.writer, self.fd = sock, rfile, writer, sock.fileno()


class _Leader:
    """What the thread now running a frame loop is doing, for the loop's monitor to see."""

    __slots__ = ("serving", "calls")

    def __init__(self):
        self.serving = None           # the connection whose frame it is serving, if any
        self.calls = 0                # frames it has served


# The worker processes of this process's machine that are running a request (see the "Many
# tasks" section): while there are any, the frame loop does not spin (see _FrameLoop._lead).
_busy_workers = set()


class _FrameLoop:
    """A machine's upgraded connections, served by one thread at a time.

    With a thread per connection, 32 callers at once mean 32 threads taking turns at the GIL:
    every call wakes a thread, which waits for the GIL, runs, gives the GIL up to write its
    reply, waits for it again and gives it up to read. That was six context switches per call
    on the machine, most of its CPU (perf: futex wake-ups and the scheduler), and the reason
    32 callers got 0.7x the calls of multiprocessing.managers. Here the connections wait for
    their next frame in one epoll set, and one thread, the leader, takes each frame as it
    comes and serves it inline: under load one poll yields many frames and no thread waits
    for another.

    A method may block, though, or run long, and the others must not wait for it. A monitor
    thread, like the Go runtime's sysmon, looks at the leader every `_TAKEOVER` seconds: a
    leader still in the same call as last time is left to finish it alone (its connection
    leaves the epoll set until then) and another thread leads from there. So a slow method
    holds the others up by a few milliseconds at most (plus, if it holds the GIL, the
    interpreter's switch interval, as with threads anyway), and a machine serving quick calls
    runs one thread. The monitor sleeps when nothing is being served.

    Frames are read whole by whoever serves them, so a connection must carry nothing after a
    frame until its reply; the library's connections carry one call at a time."""

    _TAKEOVER = 0.002             # seconds a frame may hold the loop before another thread leads
    _IDLE = 0.05                  # a monitor that saw no call for this long sleeps until one
    _SPIN = 0.00005               # seconds a leader looks for the next frame before it sleeps

    def __init__(self, dispatcher, on_close):
        self.dispatcher = dispatcher
        self._on_close = on_close     # called with the socket of each connection dropped
        self._epoll = select.epoll()
        self._parked = {}             # fd -> _Parked, every connection the loop owns
        self._ready = collections.deque()
        self._lock = threading.Lock()
        self._leader = None           # the _Leader that may run the loop now
        self._closed = False
        self._monitor_asleep = False  # true while the monitor waits for a call to watch
        self._wake_monitor = threading.Event()
        self._wakeup_r, self._wakeup_w = os.pipe()   # wakes a leader blocked in poll at close
        self._epoll.register(self._wakeup_r, select.EPOLLIN)

    def adopt(self, sock, rfile, writer):
        """Take an upgraded connection over: from now on the loop serves and closes it."""
        conn = _Parked(sock, rfile, writer)
        with self._lock:
            if self._closed:
                raise OSError("the server is closed")
            if self._leader is None:
                self._leader = _Leader()      # before its thread starts: the thread checks
                try:
                    _background(self._lead, self._leader)
                    threading.Thread(target=self._monitor, daemon=True,
                                     name="bigmachine-loop-monitor").start()
                except RuntimeError as e:     # "can't start new thread"
                    self._leader = None
                    raise OSError("cannot serve the connection: %s" % e) from e
            self._epoll.register(conn.fd, select.EPOLLIN)
            self._parked[conn.fd] = conn

    def _lead(self, me):
        """Serve frames while this thread is the leader.

        A leader that has just served a frame spins for `_SPIN` seconds before it sleeps in
        epoll: a caller making calls one after another sends its next frame within tens of
        microseconds, and a thread woken from epoll answers later than one that blocked in
        read (bench/'s "small call" shows the difference). Go's scheduler spins the same way
        before it parks a thread. An idle machine does not spin, nor one whose worker
        processes are running tasks: they need the processors a spin would take."""
        while True:
            try:
                return self._lead_frames(me)
            except _Interrupt:
                # A cancel meant for a call this thread served, which landed after it: the
                # thread goes on leading.
                log.debug("an interrupt reached the frame loop after its call had ended")

    def _lead_frames(self, me):
        ready, parked, dispatcher = self._ready, self._parked, self.dispatcher
        poll, clock, served = self._epoll.poll, time.perf_counter, False
        while True:
            if self._closed:
                self._close_descriptors()
                return
            if not ready:
                if self._leader is not me:
                    return
                try:
                    events = None
                    if served and not _busy_workers:   # look for the next frame first
                        until = clock() + self._SPIN
                        events = poll(0)
                        while not events and clock() < until:
                            events = poll(0)
                    if not events:
                        events = poll()
                except (OSError, ValueError):       # closed
                    if self._closed:
                        self._close_descriptors()
                        return
                    raise
                served = False
                # (No demotion to check: a leader is only replaced while it serves a frame.)
                ready.extend(parked[fd] for fd, _ in events if fd in parked)
                continue
            conn = ready.popleft()
            me.serving = conn
            me.calls += 1
            served = True
            if self._monitor_asleep:          # after `serving` is set: see _monitor
                self._wake_monitor.set()
            try:
                keep = _serve_frame(conn.writer, conn.rfile, dispatcher)
            except BaseException:           # SystemExit from a method, say: end its connection
                log.debug("a call ended its connection", exc_info=True)
                keep = False
            with self._lock:
                me.serving = None
                demoted = self._leader is not me
                if keep and demoted:
                    try:
                        self._epoll.register(conn.fd, select.EPOLLIN)   # see _take_over
                    except (OSError, ValueError):  # closed, or out of epoll watches
                        keep = False
                if not keep or self._closed:
                    self._drop(conn, registered=not demoted)
            if demoted:
                return

    def _drop(self, conn, registered):
        if self._parked.pop(conn.fd, None) is None:
            return
        if registered:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(conn.fd)
        with contextlib.suppress(ValueError):
            self._ready.remove(conn)
        self._on_close(conn.sock)

    def _monitor(self):
        idle_since = time.monotonic()
        seen = None
        while not self._closed:
            time.sleep(self._TAKEOVER)
            leader = self._leader
            if leader is None:
                continue
            serving, calls = leader.serving, leader.calls
            if serving is None:
                if time.monotonic() - idle_since > self._IDLE:
                    # Asleep first, then look: a leader sets `serving` first, then looks at
                    # `_monitor_asleep`. One of the two sees the other.
                    self._monitor_asleep = True
                    if self._leader.serving is None and not self._ready:
                        self._wake_monitor.wait()
                    self._wake_monitor.clear()
                    self._monitor_asleep = False
                    idle_since = time.monotonic()
                seen = None
                continue
            idle_since = time.monotonic()
            if seen == (leader, serving, calls):
                self._take_over(leader, serving, calls)
                seen = None
            else:
                seen = (leader, serving, calls)

    def _take_over(self, leader, serving, calls):
        """The leader has been serving one frame too long: leave it that connection and let
        another thread lead."""
        with self._lock:
            if (self._closed or self._leader is not leader or leader.serving is not serving
                    or leader.calls != calls):
                return
            # Out of the epoll set until that frame is served: whatever the connection does
            # meanwhile (its caller may close it to cancel) is for the thread serving it.
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(serving.fd)
            self._leader = _Leader()
            try:
                _background(self._lead, self._leader)
            except RuntimeError as e:         # "can't start new thread": the old one leads on
                log.warning("the frame loop could not start a thread: %s", e)
                self._leader = leader
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.register(serving.fd, select.EPOLLIN)

    def close(self):
        """Stop serving; the connections themselves are closed by their server (those in the
        middle of a frame are dropped by the thread serving them when it is done)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            leading = self._leader is not None
            if leading:
                # The leader may be inside poll, which a closed epoll would not wake: wake it
                # instead, and it closes the descriptors on its way out. Under the lock: that
                # is when no leader can have closed them yet.
                with contextlib.suppress(OSError):
                    os.write(self._wakeup_w, b"x")
        self._wake_monitor.set()
        if not leading:
            self._close_descriptors()

    def _close_descriptors(self):
        with self._lock:
            fds, self._wakeup_r, self._wakeup_w = (self._wakeup_r, self._wakeup_w), None, None
        if fds[0] is None:
            return
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._epoll.close()


def _refuse_call(sock, rfile, meta, call_id, flags, dispatcher, too_large):
    """Answer a call whose arguments are too large with an error saying so. The arguments are
    read and dropped first (that takes time, not memory): the caller is still sending them,
    and reads the answer only when it is done."""
    _skip(rfile, too_large.size)
    if flags & _STREAMED:
        _StreamReader(rfile, call_id).drain()
    method = meta.decode("utf-8", "replace")
    error = SerializationError(too_large.explain(
        "the arguments of %s" % method, "are", dispatcher.where))
    log.warning("refused a call: %s", error)
    _send_frame(sock, ERROR, call_id, body=_error_payload(error, dispatcher.where))


# Python runs signal handlers in the main thread, but the kernel hands a process's signal to
# any thread that does not block it, and a main thread asleep (time.sleep, a lock, a join) is
# woken only if the signal came to it. A Ctrl-C that landed in one of our threads was noticed
# only when the main thread next woke, minutes later perhaps. So the threads the library starts
# block the signals a program handles: each thread that the library starts from a thread of
# the user's blocks them first, and the threads it starts inherit that.
_ASYNC_SIGNALS = {getattr(signal, name) for name in (
    "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")
    if hasattr(signal, name)}


def _block_async_signals():
    if hasattr(signal, "pthread_sigmask"):
        with contextlib.suppress(OSError, ValueError):
            signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)


# A small pool of threads for background work off the calling thread: futures, remote cancels.
# It grows when all of its threads are busy (calls block for as long as a machine takes), and
# threads that stay idle for a while go away.

class _ThreadPool:
    _IDLE = 30.0

    def __init__(self):
        self._queue = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn, *args):
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                threading.Thread(target=self._work, name="bigmachine-worker", daemon=True).start()
        self._queue.put((fn, args))

    def _work(self):
        _block_async_signals()
        while True:
            try:
                fn, args = self._queue.get(timeout=self._IDLE)
            except queue.Empty:
                with self._lock:
                    # A submit may have counted on this thread just now: look once more.
                    if self._idle:
                        self._idle -= 1
                        return
                continue
            try:
                fn(*args)
            except BaseException:
                log.exception("bigmachine: background task failed")
            finally:
                del fn, args
            with self._lock:
                self._idle += 1


_threads = _ThreadPool()
_background = _threads.submit


# Some work waits on something that may never happen: calls that wait for each other, queued
# behind one that is stuck. One thread, while anything needs watching, looks at each such
# thing every _TICK seconds (its tick(now), which says whether it still needs watching), so
# that it can tell a stall from slow work and make room; it ends when nothing needs watching.

class _StallWatch:
    _TICK = 0.05

    def __init__(self):
        self._watched = set()
        self._lock = threading.Lock()
        self._running = False

    def watch(self, thing):
        with self._lock:
            self._watched.add(thing)
            if self._running:
                return
            self._running = True
        _background(self._run)

    def _run(self):
        while True:
            time.sleep(self._TICK)
            now = time.monotonic()
            with self._lock:
                watched = list(self._watched)
            done = [thing for thing in watched if not self._tick(thing, now)]
            with self._lock:
                self._watched.difference_update(done)
                if not self._watched:
                    self._running = False
                    return


    @staticmethod
    def _tick(thing, now):
        try:
            return thing.tick(now)
        except Exception:             # one broken thing must not end the watch for all
            log.exception("bigmachine: watching %r failed", thing)
            return False


_stall_watch = _StallWatch()


# ======================================================================================
# Services and the Supervisor (Go: supervisor.go, rpc/server.go)
# ======================================================================================
#
# A service is any object; its public methods (names not starting with "_") are callable as
# "Name.method". A method runs in the thread of the connection that carried the call, with a
# `CallContext` describing the call: its deadline, and whether it was cancelled. Cancellation
# reaches the method two ways. Cooperatively, through `current_call().cancelled` and
# `current_call().wait(seconds)`, which wakes early on cancellation. And, because most code does
# not check, by raising an interrupt in the method's thread (the way Ctrl-C interrupts a
# program): pure-Python code stops at its next bytecode; a blocking C call finishes first.

class CallContext:
    """The call a service method is serving: see `current_call()`."""

    # One is made for every call, on the hot path, so it is kept small: the Event a method
    # may wait on is made only if it waits, and all contexts share one lock, which only
    # cancellation and the end of a call take.
    __slots__ = ("method", "call_id", "started", "deadline", "reason", "_cancelled", "_event",
                 "_thread_id", "_interrupted")

    def __init__(self, method, call_id, timeout):
        self.method = method
        self.call_id = call_id
        self.started = time.monotonic()
        self.deadline = None if timeout is None else self.started + timeout
        self.reason = None
        self._cancelled = False
        self._event = None
        # The thread serving the call, which a cancel interrupts: known from the start, so a
        # cancel that arrives before the method runs interrupts it before it starts.
        self._thread_id = threading.get_ident()
        self._interrupted = False

    @property
    def cancelled(self):
        """True once the caller cancelled the call or its deadline passed."""
        return self._cancelled

    def wait(self, timeout=None):
        """Sleep up to timeout seconds, waking early if the call is cancelled (or its deadline
        passes). Returns `cancelled`."""
        with _contexts_lock:
            if self._cancelled:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def check(self):
        """Raise `Cancelled` if the call was cancelled."""
        if self._cancelled:
            raise Cancelled("call %s was %s" % (self.method, self.reason or "cancelled"))

    def cancel(self, reason="cancelled"):
        with _contexts_lock:
            if self._cancelled:
                return
            self.reason = reason
            self._cancelled = True
            if self._event is not None:
                self._event.set()
            self._interrupt()

    def _interrupt(self):
        """Raise the interrupt in the call's thread, if it still runs the call (the caller
        holds _contexts_lock, which `_leave` takes once a cancel has begun)."""
        thread_id = self._thread_id           # read once: _leave may clear it meanwhile
        if thread_id is None or self._interrupted:
            return
        interrupted = _interrupt_thread(thread_id)
        if interrupted is None:               # not now: see _interrupt_thread
            _background(self._interrupt_soon)
        else:
            self._interrupted = interrupted

    def _interrupt_soon(self):
        while True:
            time.sleep(0.001)
            with _contexts_lock:
                thread_id = self._thread_id
                if thread_id is None or self._interrupted:
                    return
                interrupted = _interrupt_thread(thread_id)
                if interrupted is not None:
                    self._interrupted = interrupted
                    return

    def _leave(self):
        """The call is over: no interrupt may reach its thread any more.

        Every call ends here, so the shared lock is taken only if a cancel has begun. That is
        safe: cancel() sets _cancelled before it reads _thread_id, and this clears _thread_id
        before it reads _cancelled, so a cancel that finds no _cancelled here will find no
        thread to interrupt. One that has begun is waited for, and its interrupt withdrawn."""
        self._thread_id = None
        if self._cancelled:
            with _contexts_lock:
                if self._interrupted:
                    # Withdraw the interrupt if it has not fired yet.
                    _interrupt_thread(threading.get_ident(), withdraw=True)


def current_call() -> typing.Optional[CallContext]:
    """The `CallContext` of the service call this thread is serving, or None."""
    return getattr(_calls, "context", None)


# Before Python 3.12 a thread being started has, until it first runs, a thread state that
# carries its parent's ident, and PyThreadState_SetAsyncExc raises in the first state with the
# ident it is given: the newest. So an interrupt aimed at a method that is starting a thread
# could land in the new thread instead, which then died before it began (an "exception
# ignored in thread started by") while the method waited in Thread.start() for ever. The
# interrupt is therefore raised with threading's _active_limbo_lock held: Thread.start takes
# it to put the thread in _limbo before it makes the thread state, and the thread leaves
# _limbo only after it has taken its own ident. If _limbo is empty, no state carries a
# borrowed ident; if not, and the method's own stack is inside Thread.start, the interrupt
# waits a millisecond and tries again. (A thread started with _thread directly is not seen;
# threading is what code uses.)
_LIMBO = (getattr(threading, "_limbo", None), getattr(threading, "_active_limbo_lock", None)) \
    if sys.version_info < (3, 12) else (None, None)


def _interrupt_thread(thread_id, withdraw=False):
    """Raise `_Interrupt` asynchronously in a thread (or withdraw a pending one). True if it
    was raised, False if it cannot be, None if not now: the thread is starting a thread."""
    try:
        import ctypes
    except ImportError:          # some locked-down builds lack ctypes: cooperative only
        return False
    exc = ctypes.py_object(_Interrupt) if not withdraw else None
    limbo, limbo_lock = _LIMBO
    if limbo_lock is None or withdraw:        # withdraw: the thread itself, starting nothing
        return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exc) == 1
    with limbo_lock:
        if limbo and _starting_a_thread(thread_id):
            return None
        return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exc) == 1


def _starting_a_thread(thread_id):
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        if frame.f_code is threading.Thread.start.__code__:
            return True
        frame = frame.f_back
    return False


class _Dispatcher:
    """The services of one machine, and the calls they are serving."""

    def __init__(self, where):
        self.where = where                   # names this machine in remote tracebacks
        self.services = {}
        self._methods = {}                   # "Name.method" -> bound method (a cache)
        self._calls = {}                     # call id -> CallContext, for CANCEL
        self._batched = {}                   # call id -> the _Batch it waits in, for CANCEL
        self._early = {}                     # call id -> (why, when): cancels before their call
        self.batches = [0, 0]                # batches served, and the calls they carried
        self._parked = {}                    # call id -> (a batched call's stream, when)
        self._lock = threading.Lock()
        self.stats = _RPCStats()             # the calls served, per method

    def register(self, name, service):
        if not isinstance(name, str) or not name or "." in name or name.startswith("_"):
            raise ValueError("service names are non-empty strings without dots or a leading "
                             "underscore, not %r" % (name,))
        with self._lock:
            if name in self.services:
                raise ValueError("service %r is already registered on %s" % (name, self.where))
            self.services[name] = service

    def lookup(self, method):
        fn = self._methods.get(method)
        if fn is not None:
            return fn
        name, _, attr = method.partition(".")
        service = self.services.get(name)
        if service is None:
            raise NotFound("no service %r on %s (it has: %s)" % (
                name, self.where, ", ".join(sorted(self.services)) or "none"))
        fn = getattr(service, attr, None) if attr and not attr.startswith("_") else None
        if fn is None or not callable(fn) or attr == "init":
            raise NotFound("service %r on %s has no public method %r (it has: %s)" % (
                name, self.where, attr, ", ".join(_public_methods(service)) or "none"))
        self._methods[method] = fn
        return fn

    def cancel(self, call_id, reason="cancelled"):
        context = self._calls.get(call_id)
        if context is None:
            batch = self._batched.get(call_id)
            if batch is not None:
                with batch.lock:             # (see _serve_member: it has begun, or never will)
                    context = self._calls.get(call_id)
                    if context is None:
                        batch.cancelled[call_id] = reason
                        return
            else:
                context = self._calls.get(call_id)     # (it may have begun meanwhile)
                if context is None:
                    self._cancel_early(call_id, reason)
                    return
        context.cancel(reason)

    # A CANCEL travels on a connection of its own, so it can overtake the batch its call is
    # in; it is kept here for a while, for the batch to find (see serve_batch). Ids are
    # random 62-bit counters per caller: one kept for a call that has already ended harms
    # nobody's.
    _EARLY_FOR = 30.0

    def _cancel_early(self, call_id, reason):
        now = time.monotonic()
        with self._lock:
            if call_id in self._batched:     # its batch came meanwhile: cancel it there
                batch = self._batched[call_id]
            else:
                early = self._early
                if len(early) >= 1024:       # (oldest first: a dict keeps its order)
                    for old in [k for k, (_, when) in early.items()
                                if now - when > self._EARLY_FOR] or list(early)[:512]:
                        del early[old]
                early[call_id] = (reason, now)
                return
        with batch.lock:
            if call_id not in self._calls:
                batch.cancelled[call_id] = reason
                return
        self.cancel(call_id, reason)

    def cancel_all(self, reason, wait=0.0):
        """Cancel every call in progress, and those waiting in batches; wait up to wait
        seconds for them to end."""
        for batch in list(self._batched.values()):
            batch.ending = reason
        for context in list(self._calls.values()):
            context.cancel(reason)
        deadline = time.monotonic() + wait
        while self._calls and time.monotonic() < deadline:
            time.sleep(0.005)

    def serve_call(self, sock, rfile, meta, call_id, body, buffers, flags):
        """Run one call that arrived on a connection, send its reply, and count it."""
        began = time.perf_counter()
        method = meta.decode("utf-8", "replace")
        received = ((len(body) if type(body) is not _PendingPickle else body.left)
                    + (sum(len(b) for b in buffers) if buffers else 0))
        # A streamed argument follows the call on the connection: whatever happens, it is
        # read to its end before the connection carries anything else.
        stream_in = _StreamReader(rfile, call_id) if flags & _STREAMED else None
        context = None
        try:
            fn = self._methods.get(method)
            if fn is None:
                try:
                    fn = self.lookup(method)
                except NotFound:
                    _discard(body)
                    raise
            try:
                args, kwargs, timeout = pickle.loads(body, buffers=buffers)
            except Exception:
                args, kwargs, timeout = _loads(body, buffers, "the arguments of %s" % method)
            if stream_in is not None:
                reader = _StreamFile(stream_in, _CHUNK)
                args = tuple(reader if isinstance(a, _StreamPlaceholder) else a for a in args)
                kwargs = {k: reader if isinstance(v, _StreamPlaceholder) else v
                          for k, v in kwargs.items()}
            if timeout is not None and not (
                    isinstance(timeout, (int, float)) and 0 <= timeout <= threading.TIMEOUT_MAX):
                # From the caller: one that a timer cannot take must not reach a timer thread.
                raise ValueError("a call's timeout is a number of seconds, not %r" % (timeout,))
            context = _calls.context = self._calls[call_id] = CallContext(method, call_id, timeout)
            timer = None
            if timeout is not None:
                timer = threading.Timer(timeout, context.cancel, ("timed out",))
                timer.daemon = True
                timer.start()
            try:
                result = fn(*args, **kwargs)
            finally:
                context._leave()          # first: no interrupt may land after the call
                _calls.context = None
                if self._calls.get(call_id) is context:
                    del self._calls[call_id]
                if timer is not None:
                    timer.cancel()
        except BaseException as e:
            if context is not None:
                context._leave()          # an interrupt may have fired before the finally did
                if self._calls.get(call_id) is context:
                    del self._calls[call_id]
            if isinstance(e, _Interrupt):
                e = (Timeout if context.reason == "timed out" else Cancelled)(
                    "call %s on %s was %s" % (method, self.where, context.reason or "cancelled"))
            if stream_in is not None:
                stream_in.drain()
            error = _error_payload(e, self.where, _not_passed_on(e))
            _send_frame(sock, ERROR, call_id, body=error)
            self.stats.record(method, time.perf_counter() - began, received, len(error), True)
            return
        if type(result) not in _PLAIN_TYPES and (
                _is_binary_file(result) or isinstance(result, collections.abc.Iterator)):
            # Streamed before the argument is drained: the reply may be reading from it.
            _send_frame(sock, REPLY, call_id, flags=_STREAMED)
            _send_stream(sock, call_id, result, self.where)
            if stream_in is not None:
                stream_in.drain()
            self.stats.record(method, time.perf_counter() - began, received, 0, False)
            return
        if stream_in is not None:
            stream_in.drain()
        try:
            reply, reply_buffers = _pickle(result)
        except Exception:
            try:
                _dumps(result, "the result of %s" % method)
            except SerializationError as e:
                error = _error_payload(e, self.where)
                _send_frame(sock, ERROR, call_id, body=error)
                self.stats.record(method, time.perf_counter() - began, received, len(error),
                                  True)
                return
            raise
        sent = (len(reply[0]) if len(reply) == 1 and not reply_buffers
                else _size(reply, reply_buffers))
        if reply_buffers or len(reply) != 1 or sent >= _SMALL:
            _send_frame(sock, REPLY, call_id, body=reply, buffers=reply_buffers)
        else:
            sock.sendall(_HEADER.pack(REPLY, 0, 0, 0, call_id, sent) + reply[0])
        self.stats.record(method, time.perf_counter() - began, received, sent, False)


    # -- batches --------------------------------------------------------------------------
    #
    # A batch is the calls that queued up for this machine on a caller (see `_CallQueue`),
    # sent in one frame so that many short calls cost few round trips. They run one after the
    # other in the thread that serves the frame, each with a CallContext of its own (so each
    # can be cancelled by its id, even before it begins or before its batch arrives, and
    # current_call() is its own), and their outcomes go back in one REPLY: (outcomes,
    # None), an outcome per call run, in order -- (True, its result pickled),
    # (False, error payload), or (None, its id) for a result to stream, which the caller then
    # takes with `Supervisor.take_stream`. Calls past the budget (seconds) are not run: the
    # caller queues them again, so that a batch of calls longer than expected does not keep
    # them from an idle lane.
    #
    # Calls in one batch may wait for each other, or for a call the caller has yet to send,
    # which one after the other would never end. So a call that runs longer than
    # `_Batch.LONG` (or four times the calls before it) *releases* the batch: the calls not
    # yet begun will not be, the outcomes so far go back at once as (outcomes, i), and the
    # long call i sends its own in a second REPLY when it ends, ([outcome], None). The caller
    # queues the rest again (for other lanes) and settles what it got.

    def serve_batch(self, sock, call_id, body, buffers):
        """Run a batch of calls that arrived on a connection and send their outcomes."""
        try:
            budget, members = _loads(body, buffers, "a batch of calls")
            if not (type(budget) in (int, float) and 0 <= budget <= threading.TIMEOUT_MAX
                    and type(members) is list and all(
                        type(m) is tuple and len(m) == 3 and type(m[0]) is int
                        and type(m[1]) is str and type(m[2]) is bytes for m in members)):
                raise ValueError("a malformed batch of calls: (budget in seconds, [(call id, "
                                 "method, pickled arguments), ...]) expected")
        except Exception as e:
            _send_frame(sock, ERROR, call_id, body=_error_payload(e, self.where))
            return
        batch = _Batch(sock, call_id, self.where)
        batched, early = self._batched, self._early
        with self._lock:                     # (see _cancel_early)
            self.batches[0] += 1
            self.batches[1] += len(members)
            for member in members:
                batched[member[0]] = batch
                if early and member[0] in early:
                    batch.cancelled[member[0]] = early.pop(member[0])[0]
        _stall_watch.watch(batch)
        try:
            for i, (member_id, method, payload) in enumerate(members):
                if not batch.enter(i, budget):
                    break
                outcome = self._serve_member(batch, member_id, method, payload)
                if batch.leave(outcome):
                    return
            batch.end()
        finally:
            with batch.lock:          # (ended by an exception: no tick may reply any more)
                batch.finished = True
            for member in members:
                if batched.get(member[0]) is batch:
                    del batched[member[0]]

    def _serve_member(self, batch, call_id, method, payload):
        """Run one call of a batch: its outcome (see the batches' essay above), its result
        pickled at once, as a lone call's is (the calls after it may change what it refers
        to, and a released batch's outcomes are sent from another thread)."""
        began = time.perf_counter()
        context = None
        try:
            fn = self.lookup(method)
            args, kwargs, _ = _loads(payload, (), "the arguments of %s" % method)
            context = CallContext(method, call_id, None)
            with batch.lock:
                self._calls[call_id] = context
                if self._batched.get(call_id) is batch:
                    del self._batched[call_id]       # (what waits in batches: not it)
                cancelled = batch.cancelled.get(call_id) or batch.ending
            if cancelled:
                raise Cancelled("call %s on %s was %s" % (method, self.where, cancelled))
            _calls.context = context
            try:
                result = fn(*args, **kwargs)
            finally:
                context._leave()
                _calls.context = None
                del self._calls[call_id]
            if type(result) not in _PLAIN_TYPES and (
                    _is_binary_file(result) or isinstance(result, collections.abc.Iterator)):
                self._park(call_id, result)
                outcome = (None, call_id)
            else:
                outcome = (True, _dumps_in_band(result, "the result of %s on %s"
                                                % (method, self.where)))
        except BaseException as e:
            if context is not None:
                context._leave()
                if self._calls.get(call_id) is context:
                    del self._calls[call_id]
            if isinstance(e, _Interrupt):
                e = Cancelled("call %s on %s was %s"
                              % (method, self.where, context.reason or "cancelled"))
            outcome = (False, _error_payload(e, self.where, _not_passed_on(e)))
        self.stats.record(method, time.perf_counter() - began, len(payload),
                          len(outcome[1]) if outcome[0] else 0, outcome[0] is False)
        return outcome

    # A batched call's result that is to be streamed waits here until its caller takes it
    # (it does so as soon as the batch's reply arrives); one that nobody takes in this long
    # (its caller went away) is closed.
    _PARKED_FOR = 60.0

    def _park(self, call_id, stream):
        now = time.monotonic()
        with self._lock:
            stale = [k for k, (_, since) in self._parked.items()
                     if now - since > self._PARKED_FOR]
            gone = [self._parked.pop(k)[0] for k in stale]
            self._parked[call_id] = (stream, now)
        for old in gone:
            with contextlib.suppress(Exception):
                getattr(old, "close", lambda: None)()

    def take_parked(self, call_id):
        with self._lock:
            found = self._parked.pop(call_id, None)
        if found is None:
            raise NotFound("no streamed result of call %d waits on %s (it is taken once, "
                           "within %.0fs)" % (call_id, self.where, self._PARKED_FOR))
        return found[0]


class _Batch:
    """A batch of calls being served on one connection: see `_Dispatcher.serve_batch`."""

    LONG = 0.1                        # seconds a call of a batch may run before it releases it

    __slots__ = ("sock", "call_id", "where", "lock", "cancelled", "ending", "outcomes",
                 "current", "started", "began", "released", "finished")

    def __init__(self, sock, call_id, where):
        self.sock, self.call_id, self.where = sock, call_id, where
        self.lock = threading.Lock()
        self.cancelled = {}           # call id -> why: cancelled before it began
        self.ending = None            # why every call not yet begun is cancelled (cancel_all)
        self.outcomes = []
        self.current = None           # the index of the call running, if one is
        self.started = self.began = time.monotonic()
        self.released = self.finished = False

    def enter(self, i, budget):
        """Whether call i is to run (the batch has not run past its budget)."""
        now = time.monotonic()
        if i and now - self.began >= budget:
            return False
        with self.lock:
            self.current, self.started = i, now
        return True

    def leave(self, outcome):
        """Call `current` ended. True if that was the batch's last: it was released, so this
        outcome goes back on its own."""
        with self.lock:
            self.current = None
            if not self.released:
                self.outcomes.append(outcome)
                return False
            self.finished = True
            self._send([outcome], None)
            return True

    def end(self):
        with self.lock:
            self.finished = True
            self._send(self.outcomes, None)

    def tick(self, now):
        """From `_StallWatch`: release the batch if its call has run long (see the essay)."""
        with self.lock:
            if self.finished or self.released:
                return False
            if self.current is None:
                return True
            done = len(self.outcomes)
            usual = (self.started - self.began) / done if done else 0.0
            if now - self.started < max(self.LONG, 4 * usual):
                return True
            self.released = True
            self._send(self.outcomes, self.current)
            return False

    def _send(self, outcomes, follows):
        """Send outcomes (under the lock: the two replies of a released batch go in order).
        They are bytes, ids and error payloads: they pickle."""
        body = pickle.dumps((outcomes, follows), _PICKLE_PROTOCOL)
        try:
            _send_frame(self.sock, REPLY, self.call_id, body=body)
        except OSError as e:          # the caller went: its calls are over either way
            log.debug("the reply to a batch of calls was not sent: %s", e)


def _not_passed_on(exc):
    """Why a method's exception is not raised as itself on the caller ("" if it is): a
    SystemExit or KeyboardInterrupt would end or interrupt the caller's program, not say what
    went wrong in the method. The caller gets a RemoteError that says what was raised, and the
    machine goes on serving: a method cannot end its machine this way."""
    if isinstance(exc, Exception):
        return ""
    return ("a method's %s is not raised in its caller, where it would end or interrupt the "
            "program; the machine goes on serving" % type(exc).__name__)


def _public_methods(service):
    return sorted(n for n in dir(service)
                  if not n.startswith("_") and n != "init" and callable(getattr(service, n, None)))


class Supervisor:
    """The service every machine runs (Go: supervisor.go).

    It answers the driver's pings and keepalives, installs the user's services, reports on the
    machine, and runs the watchdog: when no keepalive has renewed the machine's lease in time,
    the machine exits, so machines never outlive their driver."""

    _HEALTH_LIMIT = 95.0                     # percent of memory in use that makes a machine unhealthy

    def __init__(self, machine):
        self._machine = machine              # the _MachineProcess this supervisor watches over
        self._deadline = time.monotonic() + machine.lease
        self._lock = threading.Lock()
        self._lease_changed = threading.Condition(self._lock)    # wakes the watchdog
        self._started = time.time()

    # -- liveness ---------------------------------------------------------------------

    def ping(self, seq=0):
        """Echo seq: proof that the machine is up and serving."""
        return seq

    def keepalive(self, next_seconds):
        """Renew the machine's lease for next_seconds; returns the lease granted and health."""
        with self._lock:
            self._deadline = time.monotonic() + float(next_seconds)
            self._lease_changed.notify_all()
        memory = _memory_report()
        used = memory.get("used_percent")
        return {"next": float(next_seconds), "memory": memory,
                "healthy": used is None or used <= self._HEALTH_LIMIT}

    def _watch(self):
        # It sleeps until the lease's end (a tick at most), and each keepalive wakes it to
        # look again: a machine whose driver is frozen or gone ends when its lease does, not
        # at a tick up to a quarter of the lease later.
        tick = self._machine.watchdog_tick
        with self._lock:
            while not self._machine.exited.is_set():
                left = self._deadline - time.monotonic()
                if left <= 0:
                    break
                self._lease_changed.wait(min(left, tick) + 0.001)
            else:
                return
        log.error("watchdog expired: no keepalive from the driver for %.1fs; exiting",
                  self._machine.lease)
        self._machine.exit(1)

    def _wake(self):
        with self._lock:
            self._lease_changed.notify_all()

    # -- services ---------------------------------------------------------------------

    def register(self, services_pickle, maxprocs=None):
        """Install services (a pickled {name: service}) and run their `init(b)` hooks.
        maxprocs is the number of processors the driver counts this machine as offering."""
        services = _loads(services_pickle, (), "the services")
        if isinstance(maxprocs, int) and maxprocs >= 1:
            self._machine.maxprocs = maxprocs
        for name, service in services.items():
            self._machine.dispatcher.register(name, service)
            if isinstance(service, Pooled):
                service._attach(self._machine, name)
        for name, service in services.items():
            init = getattr(service, "init", None)
            if callable(init):
                init(self._machine.b)
        return sorted(services)

    def services(self):
        """The names of the services installed on this machine."""
        return sorted(self._machine.dispatcher.services)

    # -- packages, before the driver's main is loaded (see Packages) ----------------------

    def packages_missing(self, manifest):
        """Of the driver's distributions (manifest), which files this host lacks (SHA-256s)."""
        return _package_stage_of(self._machine).missing(manifest)

    def packages_put(self, files, stream):
        """Receive files ([[sha256, size, executable], ...]) from stream, one after another,
        into this host's package cache, each checked against its hash."""
        return _package_stage_of(self._machine).receive(files, stream)

    def packages_pip(self, requirements, wheels):
        """Install requirements with pip into a cached environment: from the wheels the
        driver sent (by SHA-256: [[sha256, name], ...]), or this host's package index."""
        return _package_stage_of(self._machine).pip(requirements, wheels)

    def packages_ready(self):
        """Put the packages on the import path and load the driver's main; returns where."""
        return _package_stage_of(self._machine).ready()

    # -- facts --------------------------------------------------------------------------

    def getpid(self):
        return os.getpid()

    def info(self):
        """Python and library versions, pid, processors and the like."""
        return {
            "python": PYTHON,
            "python_version": sys.version.split()[0],
            "implementation": sys.implementation.name,
            "version": __version__,
            "protocol": PROTOCOL,
            "pid": os.getpid(),
            "cpus": os.cpu_count() or 1,
            "maxprocs": self._machine.b.system.maxprocs(),
            "platform": sys.platform,
            "hostname": socket.gethostname(),
            "started": self._started,
            "addr": self._machine.addr,
            **_package_stage_info(self._machine),
        }

    def stacks(self):
        """Every thread's stack, as text: the first thing to read when a cluster hangs. A thread
        serving a call says which, and for how long."""
        now, notes = time.monotonic(), {}
        for context in list(self._machine.dispatcher._calls.values()):
            thread_id = context._thread_id
            if thread_id is not None:
                notes[thread_id] = "serving %s (call %s) for %s" % (
                    context.method, context.call_id, _duration(now - context.started))
        return _format_stacks(notes)

    # -- looking inside (see the Debug section) ------------------------------------------

    def profile(self, seconds=30.0, hz=100):
        """A CPU profile of this machine, sampled for seconds: {"stats": a pstats dict, ...}.
        `B.profile` merges machines' profiles."""
        return _profile(seconds, hz)

    def heap(self, limit=200, stop=False, trace=False, seconds=1.0):
        """The limit allocation sites holding the most memory, from tracemalloc. If it is not
        running, it runs for seconds and stops again, unless trace=True leaves it running;
        stop=True stops it afterwards."""
        return _heap(limit, stop, trace, seconds)

    def vars(self):
        """This process's published variables, and its calls counted per method: "rpc.server"
        (the calls this machine served) and "rpc.client" (the calls it made)."""
        out = _read_published()
        out["rpc.server"] = self._machine.dispatcher.stats.snapshot()
        out["rpc.client"] = self._machine.b._client.stats.snapshot()
        return out

    def status(self):
        """What the status page shows of this machine: uptime, memory, disk, load, calls."""
        facts = _machine_facts()
        dispatcher = self._machine.dispatcher
        facts["uptime"] = time.time() - self._started
        facts["calls"], facts["errors"] = dispatcher.stats.totals()
        now = time.monotonic()
        # The calls in flight, by method, with their age: the Supervisor's own are left out
        # (this very call among them), but not the Executor's tasks, which are user work.
        in_flight = [(context.method, now - context.started)
                     for context in list(dispatcher._calls.values())
                     if not context.method.startswith("Supervisor.")
                     or context.method == "Supervisor.run_tasks"]
        facts["in_flight"] = len(in_flight)
        facts["in_flight_calls"] = sorted(in_flight, key=lambda c: -c[1])[:50]
        facts["waiting_in_batches"] = len(dispatcher._batched)
        facts["batches"], facts["batched_calls"] = dispatcher.batches
        facts["workers"] = len(self.worker_pids())
        return facts

    # -- many tasks (see the Executor) ----------------------------------------------------

    def run_tasks(self, payloads, slots=1, method=None, budget=None):
        """Run some of an Executor's tasks, one after the other: each payload is a pickled
        (function, [argument tuples], keyword arguments), the function None when method names
        a service's method. At most slots calls run at once, in worker processes when the
        machine offers several processors. Returns (replies, seconds): per payload run, the
        pickled outcomes, one per input; and the seconds spent running them (waits for a
        slot not counted), which is how the driver learns how long a task takes. Once budget
        seconds have gone by running them, no further payload starts, and those left out of
        the replies were not run (at least one always is)."""
        return _machine_run_tasks(self._machine, payloads, slots, method, budget)

    def take_stream(self, call_id):
        """The streamed result of a batched call (see `_Dispatcher.serve_batch`): its caller
        takes it, once, right after the batch's reply."""
        return self._machine.dispatcher.take_parked(call_id)

    def worker_pids(self):
        """The process ids of this machine's worker processes (Executor tasks and Pooled)."""
        pids = []
        for pool in [self._machine.workers] + self._machine.pools:
            if pool is not None:
                pids.extend(pool.pids())
        return sorted(pids)

    # -- ending -------------------------------------------------------------------------

    def shutdown(self, delay=0.0, code=0):
        """Exit the machine after delay seconds (after this call has replied)."""
        threading.Timer(max(0.0, float(delay)) + 0.01, self._machine.exit, (code,)).start()
        return True


def _format_stacks(notes=None):
    names = {t.ident: t.name for t in threading.enumerate()}
    notes = notes or {}
    out = []
    for ident, frame in sorted(sys._current_frames().items()):
        out.append("thread %s (%s)%s:\n" % (ident, names.get(ident, "?"),
                                            ", " + notes[ident] if ident in notes else ""))
        out.extend(traceback.format_stack(frame))
        out.append("\n")
    return "".join(out)


def _memory_used_percent():
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        return 100.0 * (1 - info["MemAvailable"] / info["MemTotal"])
    except (OSError, KeyError, ValueError, ZeroDivisionError):
        return None


# -- memory: health, and telling an out-of-memory kill from any other SIGKILL ---------------
#
# A machine killed for memory dies by SIGKILL, which says nothing of why. The kernel counts its
# OOM kills per memory cgroup (cgroup v2: memory.events; v1: memory.oom_control), so each
# keepalive reply carries the machine's cgroup, that count, its RSS and its limit; when the
# machine dies by SIGKILL the driver looks at the count again, and failing that at how near its
# limit the machine last was. Other systems say it their own way (Slurm: OUT_OF_MEMORY) and
# raise `OutOfMemory` too, with `_out_of_memory`.

def _memory_cgroup(pid="self"):
    """The directory of pid's memory cgroup (v2, else v1), or None."""
    try:
        with open("/proc/%s/cgroup" % pid) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            directory = "/sys/fs/cgroup/memory" + path.rstrip("/")
            if os.path.exists(directory + "/memory.oom_control"):
                return directory
    for line in lines:
        if line.startswith("0::"):
            directory = "/sys/fs/cgroup" + line[3:].rstrip("/")
            if os.path.exists(directory + "/memory.events"):
                return directory
    return None


def _cgroup_number(directory, name, key=None):
    """A number from a cgroup file: the whole file, or the line starting with key."""
    try:
        with open(os.path.join(directory, name)) as f:
            for line in f:
                words = line.split()
                if key is None and words:
                    return None if words[0] == "max" else int(words[0])
                if len(words) == 2 and words[0] == key:
                    return int(words[1])
    except (OSError, ValueError):
        pass
    return None


def _oom_kills(directory):
    """How many processes the kernel killed for memory in this cgroup."""
    if directory is None:
        return None
    if os.path.exists(os.path.join(directory, "memory.events")):
        return _cgroup_number(directory, "memory.events", "oom_kill")
    return _cgroup_number(directory, "memory.oom_control", "oom_kill")


def _memory_report():
    """This machine's memory, as each keepalive reply carries it: the percentage in use (the
    host's, or its cgroup's against the cgroup's limit, whichever is higher), its RSS, its limit,
    and its cgroup with the cgroup's count of OOM kills."""
    report = {}
    used = _memory_used_percent()
    if used is not None:
        report["used_percent"] = used
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    report["rss"] = int(line.split()[1]) * 1024
    cgroup = _memory_cgroup()
    if cgroup is not None:
        v2 = os.path.exists(os.path.join(cgroup, "memory.events"))
        limit = _cgroup_number(cgroup, "memory.max" if v2 else "memory.limit_in_bytes")
        usage = _cgroup_number(cgroup, "memory.current" if v2 else "memory.usage_in_bytes")
        report["cgroup"], report["oom_kills"] = cgroup, _oom_kills(cgroup)
        if limit and limit < 1 << 60:             # v1 says "no limit" with a huge number
            report["limit"] = limit
            if usage is not None:
                report["used_percent"] = max(used or 0.0, 100.0 * usage / limit)
    return report


def _out_of_memory(what, how):
    """The error of a machine killed for memory: what names it ("machine ADDR (pid N)"), how
    says how that is known. For the systems: Local here; Slurm from OUT_OF_MEMORY."""
    return OutOfMemory("%s ran out of memory and was killed: %s" % (what, how))


def _killed_for_memory(cgroup, seen, local=True):
    """Why a machine that died by SIGKILL was (most likely) killed for memory, or None.
    cgroup: its memory cgroup when it died; seen: its latest keepalive's memory report; local:
    it ran on this host, so its cgroup can be read here."""
    seen = seen or {}
    # cgroup v1 moves a dead process to the root cgroup: then only the one its keepalive
    # reported says anything, compared with the count it reported then.
    candidates = [(seen.get("cgroup"), seen.get("oom_kills"))] if local else []
    if cgroup not in (None, seen.get("cgroup"), "/sys/fs/cgroup", "/sys/fs/cgroup/memory",
                      _memory_cgroup()):
        candidates.append((cgroup, 0))                  # a cgroup of its own, unseen: from zero
    for directory, before in candidates:
        now = _oom_kills(directory) if directory else None
        if not now or before is None:
            continue
        with _oom_lock:
            # Machines may share a cgroup: each kill counted is blamed on one machine only.
            before = max(before, _oom_blamed.get(directory, 0))
            if now > before:
                _oom_blamed[directory] = before + 1
                return "the kernel's OOM killer ended it (%s: oom_kill %d)" % (directory, now)
    rss, limit = seen.get("rss"), seen.get("limit")
    if rss and limit and rss >= 0.9 * limit:
        return "killed by SIGKILL with %s resident of its %s limit at its last keepalive" % (
            _bytes(rss), _bytes(limit))
    if seen.get("used_percent", 0) > Supervisor._HEALTH_LIMIT:
        return "killed by SIGKILL with %.0f%% of its memory in use at its last keepalive" % (
            seen["used_percent"])
    return None


class _MachineProcess:
    """The machine side of one machine: its server, services, supervisor and watchdog.

    In a Local machine there is one per process; the TestSystem runs several in the driver's
    process. `exit` ends the machine: for a process, the process; in the TestSystem, its server."""

    def __init__(self, b, credentials, addr, lease, watchdog_tick, exit, sock=None,
                 host="127.0.0.1", port=0, prefix="/"):
        self.b = b
        self.addr = addr
        self.lease = lease
        self.watchdog_tick = watchdog_tick
        self.exited = threading.Event()
        self._exit = exit
        self.credentials = credentials
        # Many tasks: the processors the driver says this machine offers, the worker
        # processes of Executor tasks and of Pooled services, and the gate that holds the
        # tasks run in this process to their executor's per_machine.
        self.maxprocs = 1
        self.main_preparation = None          # how workers load the driver's main
        self.lock = threading.Lock()
        self.workers = None
        self.pools = []
        self.gate = _Gate()
        self.dispatcher = _Dispatcher(addr or "machine")
        self.package_stage = None         # a _PackageStage while the driver sends packages
        self.supervisor = Supervisor(self)
        self.dispatcher.register("Supervisor", self.supervisor)
        self.server = _Server(credentials, self.dispatcher, sock=sock, host=host, port=port,
                              prefix=prefix)
        if not addr:
            self.addr = self.dispatcher.where = "https://%s:%d%s" % (host, self.server.port, prefix)

    def start(self):
        self.server.start()
        threading.Thread(target=self.supervisor._watch, name="bigmachine-watchdog",
                         daemon=True).start()
        return self

    def exit(self, code=0):
        if self.exited.is_set():
            return
        # The calls still running are cancelled first, the way a cancel from their caller
        # would: their `except`/`finally` blocks run (to release what they hold, or to save
        # what they did) before the machine goes. A call blocked in C cannot be interrupted;
        # the machine waits for it a second at most.
        self.dispatcher.cancel_all("cancelled: the machine is shutting down", wait=1.0)
        for pool in [self.workers] + self.pools:
            if pool is not None:
                pool.close()                 # worker processes end with their machine
        self.exited.set()
        self.supervisor._wake()
        self._exit(code)


# ======================================================================================
# Machine (Go: machine.go)
# ======================================================================================
#
# A `Machine` is the driver's handle on one machine (or, from `B.dial`, anyone's handle on any
# machine). Its state only moves forward: UNSTARTED < STARTING < RUNNING < STOPPED. Calls made
# while it is STARTING wait for RUNNING; calls in flight when it stops fail at once with
# `MachineStopped`, whose `__cause__` is the machine's `err`.
#
# The machine is watched the way Go watches it: an owned machine's lease is renewed with
# `Supervisor.keepalive` every `min(lease granted, keepalive_period) / 2`; each renewal is
# retried with backoff for up to `keepalive_timeout`, each attempt bounded by
# `keepalive_rpc_timeout`; a machine that cannot be renewed in that budget is STOPPED with the
# reason. A dialed machine is watched the same way with pings, which renew nothing.

class State(enum.IntEnum):
    """A machine's state. States only move forward."""

    UNSTARTED = 0
    STARTING = 1
    RUNNING = 2
    STOPPED = 3

    def __str__(self):
        return self.name


UNSTARTED, STARTING, RUNNING, STOPPED = State.UNSTARTED, State.STARTING, State.RUNNING, State.STOPPED


class Backoff(typing.NamedTuple):
    """Waits between retries: initial, then times factor each time, at most maximum (Go's
    retry.Backoff(1s, 5s, 1.5))."""

    initial: float = 1.0
    maximum: float = 5.0
    factor: float = 1.5

    def waits(self):
        wait = self.initial
        while True:
            yield wait
            wait = min(wait * self.factor, self.maximum)


_RETRY = Backoff()
_FINISHED_STATES = (concurrent.futures._base.CANCELLED,
                    concurrent.futures._base.CANCELLED_AND_NOTIFIED,
                    concurrent.futures._base.FINISHED)


class _CallFuture(concurrent.futures.Future):
    """A `Future` whose `cancel()` also works while the call runs: it cancels it on the machine."""

    _inflight = None

    def cancel(self):
        with self._condition:
            running = self._state == concurrent.futures._base.RUNNING
            if running:
                self._state = concurrent.futures._base.CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                self._condition.notify_all()
        if not running:
            return super().cancel()
        self._inflight.cancel()
        self._invoke_callbacks()
        return True

    def _requeue(self):
        """Back to PENDING from RUNNING: taken for a batch that did not run it (see
        `_CallQueue`). False if it was cancelled meanwhile."""
        with self._condition:
            if self._state != concurrent.futures._base.RUNNING:
                return False
            self._state = concurrent.futures._base.PENDING
            return True

    def _settle(self, result=None, error=None):
        with self._condition:
            if self._state in _FINISHED_STATES:
                return
        try:
            if error is not None:
                self.set_exception(error)
            else:
                self.set_result(result)
        except concurrent.futures.InvalidStateError:
            pass                     # cancelled in between


class _CallQueue:
    """The calls of `call_async` to one machine that wait their turn on the driver.

    A call in flight occupies a thread (it blocks reading its reply, which is what keeps the
    synchronous call cheap), so a thread per outstanding call would mean a thousand threads
    for a thousand futures. Instead calls wait here, in a deque, and a few *lanes* -- threads
    of the shared pool, each making one call at a time over a connection of its own -- take
    them in order. A machine gets maxprocs + 1 lanes: one per processor, and one more so that
    the machine has its next call at hand while a reply travels back. So the driver's threads
    grow with its machines, not with the calls in flight.

    A round trip per call would cost more than a short call itself, on both ends (a thread
    woken per reply, the GIL handed back and forth). So while calls wait, a lane takes several
    at once, as one *batch* (see `_Dispatcher.serve_batch`): as many as run in about
    `_BATCH_TIME` by the calls' usual length so far, and no more than the lane's share of the
    queue. Calls with a deadline, a streamed argument or large arguments go alone, as does the
    first, until a call's length is known.

    Fixed lanes would deadlock calls that wait for one another (a barrier, a call blocked
    until a later call arrives), which a thread per call never did. So a lane is added when
    the queue has made no progress -- no call started or finished -- for several times the
    usual length of a call (`_StallWatch`), up to `_MAX_LANES`: calls that merely take long
    get few lanes, calls that are stuck get more. (A batch whose call runs long hands the
    calls it has not begun back to the queue, for the same reason.) A cancelled call still
    in the deque is dropped when its turn comes (its future is already CANCELLED)."""

    _MAX_LANES = 64
    # Seconds of calls a batch aims at, by their usual length as the lanes see it: a batch
    # shares its machine with the other lanes' batches, so that length counts the wait, and
    # a batch holds about half this in work. Each batch costs both ends a few hundred µs
    # (a lane's wake-up, the GIL changing hands, two frames), which this spreads thin.
    _BATCH_TIME = 0.05
    _MAX_BATCH = 256

    __slots__ = ("machine", "pending", "lock", "lanes", "progress", "typical")

    def __init__(self, machine):
        self.machine = machine
        self.pending = collections.deque()
        self.lock = threading.Lock()
        self.lanes = 0
        self.progress = time.monotonic()     # when a call last started or finished
        self.typical = 0.0                   # a moving average of calls' durations

    def put(self, item):
        with self.lock:
            self.pending.append(item)
            lane = self._add_lane()
        if lane:
            _background(self._drain)

    def requeue(self, items):
        """Put calls taken for a batch that did not run them back at the head of the queue."""
        with self.lock:
            for item in reversed(items):
                if item[0]._requeue():
                    self.pending.appendleft(item)
            lane = self.pending and self._add_lane()
        if lane:
            _background(self._drain)

    def _add_lane(self):
        """(Under the lock.) Whether to start a lane (counted already): yes if the machine
        has fewer than it gets; if not, the stall watch sees to the queue."""
        if self.lanes < (self.machine.maxprocs or 1) + 1:
            self.lanes += 1
            return True
        _stall_watch.watch(self)
        return False

    def tick(self, now):
        """Called by `_StallWatch`: add a lane if the queue is stuck. Returns whether the
        queue still needs watching."""
        with self.lock:
            if not self.pending:
                return False
            if now - self.progress < max(0.1, 4 * self.typical) or self.lanes >= self._MAX_LANES:
                return True
            self.lanes += 1
            self.progress = now
        _background(self._drain)
        return True

    def _drain(self):
        machine = self.machine
        pending, lock = self.pending, self.lock
        while True:
            with lock:
                if not pending:
                    self.lanes -= 1
                    return
                item = pending.popleft()
                n = 1
                if pending and 0 < self.typical < self._BATCH_TIME / 2:
                    n = min(int(self._BATCH_TIME / self.typical), self._MAX_BATCH,
                            -(-(len(pending) + 1) // max(1, self.lanes)))
                if n > 1:
                    item = [item]
                    item.extend(pending.popleft() for _ in range(n - 1))
                began = self.progress = time.monotonic()
            if n > 1:
                n = machine._run_batch(item, self) or 1
            else:
                machine._run_future(*item)
            del item
            now = self.progress = time.monotonic()
            self.typical += ((now - began) / n - self.typical) / 8

    def __len__(self):
        return len(self.pending)


class _Calls:
    """The calling methods of a Machine, with the options of a view (`Machine.options`)."""

    def _options(self):
        raise NotImplementedError

    def call(self, method: str, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:
        """Call "Service.method" with these arguments on the machine and return its result."""
        timeout, _ = self._options()
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._machine._call(method, args, kwargs, deadline, None)

    def call_async(self, method: str, *args: typing.Any,
                   **kwargs: typing.Any) -> concurrent.futures.Future:
        """`call`, as a `concurrent.futures.Future`; its `cancel()` reaches the machine."""
        timeout, _ = self._options()
        deadline = None if timeout is None else time.monotonic() + timeout
        future = _CallFuture()
        future._inflight = _InFlight()
        self._machine._queue.put((future, method, args, kwargs, deadline))
        return future

    def retry_call(self, method: str, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:
        """`call`, repeated with backoff while the error is temporary (`err.temporary`).

        With a timeout (see `options`), the timeout bounds all the attempts together."""
        timeout, backoff = self._options()
        deadline = None if timeout is None else time.monotonic() + timeout
        machine = self._machine
        waits = (backoff or _RETRY).waits()
        while True:
            try:
                return machine._call(method, args, kwargs, deadline, None)
            except Exception as e:
                if not getattr(e, "temporary", False) or machine._state is STOPPED:
                    raise
                wait = next(waits)
                if deadline is not None and time.monotonic() + wait >= deadline:
                    raise
                log.debug("%s: %s failed (%s); retrying in %.2gs", machine.addr, method, e, wait)
                machine._stopped.wait(wait)


class _MachineView(_Calls):
    """A Machine's calls with a deadline and retry policy: see `Machine.options`."""

    def __init__(self, machine, timeout, backoff):
        self._machine, self._timeout, self._backoff = machine, timeout, backoff

    def _options(self):
        return self._timeout, self._backoff

    def __repr__(self):
        return "<%r with timeout=%s>" % (self._machine, self._timeout)


class Machine(_Calls):
    """One machine of a session: the driver's handle on a machine it started (`B.start`), or
    anyone's on a machine it dialed (`B.dial`). See the section's essay for how it is watched.

    Attributes:
        addr      its address, an "https://host:port/" URL, unique for the session
        err       why it stopped, an exception (an `Error`), or None while it has not
        maxprocs  the processors it offers (Local: 1; EC2: the instance's vCPUs); the Executor
                  runs that many tasks on it at once
        hostname  the host part of addr
        owned     True when started by this session (which may shut it down), False when dialed
        status    what its system says it waits for while it starts ("" when nothing)
        details   what its system knows of it (EC2: instance id and type, market); events carry it
        healthy   False while it reports more than 95% of its memory in use
        keepalive_replies  the latest keepalive round trips in seconds, newest last
        next_keepalive     time.time() at which its lease ends
    """

    def __init__(self, b: B, addr: str, *, owned: bool, maxprocs: typing.Optional[int] = 1):
        import urllib.parse
        self.addr = addr
        self.maxprocs = maxprocs
        self.owned = owned
        self.hostname = urllib.parse.urlsplit(addr).hostname or "unknown"
        self.err = None
        self.status = ""              # what its system says it waits for (see report_status)
        self.keepalive_replies = collections.deque(maxlen=10)   # latencies, newest last
        self.next_keepalive = None                               # time.time() the lease ends
        self._b = b
        self._peer = b._client.peer(addr)
        self._peer.stream_broken = self._stream_broken
        self._state = UNSTARTED
        self._cond = threading.Condition()
        self._stopped = threading.Event()
        self._machine = self
        #: What the system knows of the machine (EC2: instance id and type, market "spot" or
        #: "on-demand"); events carry it.
        self.details = {}
        #: False while the machine reports more than 95% of its memory in use (Go's health).
        self.healthy = True
        self._memory_seen = None          # the memory facts of its latest keepalive reply
        self._leaving = False             # shutdown() asked it to go: failures are expected
        self._inject = getattr(b.system, "inject_failures", 0.0) or 0.0
        self._queue = _CallQueue(self)      # the calls of call_async waiting their turn

    def _options(self):
        return None, None

    def __repr__(self):
        return "<Machine %s %s>" % (self.addr, self._state.name)

    @property
    def state(self) -> State:
        """The machine's current `State`."""
        return self._state

    def wait(self, state: State = RUNNING, timeout: typing.Optional[float] = None) -> State:
        """Block until the state is at least state (so waiting for RUNNING also returns when
        the machine stops) or timeout seconds pass; returns the state reached."""
        with self._cond:
            self._cond.wait_for(lambda: self._state >= state, timeout)
            return self._state

    def options(self, timeout: typing.Optional[float] = None,
                backoff: typing.Optional[Backoff] = None) -> _MachineView:
        """A view of this machine whose calls carry a deadline of timeout seconds (past it they
        raise `Timeout` and are cancelled on the machine), and whose `retry_call` waits by
        backoff (a `Backoff`)."""
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive, not %r" % (timeout,))
        return _MachineView(self, timeout, backoff)

    def cancel(self) -> None:
        """Stop the machine (Go's Cancel): calls fail, and an owned machine is ended."""
        self._stop(Cancelled("machine %s was cancelled" % self.addr))

    def shutdown(self, timeout: typing.Optional[float] = None) -> None:
        """Stop this one machine gracefully, the way `B.shutdown` stops each: its running
        calls are cancelled on it (their `finally` blocks run), it exits, and its process (or
        instance) is gone by timeout seconds (default 20); then it is STOPPED, with an `err`
        that says it was shut down. `cancel()`, by contrast, drops it at once."""
        if not self.owned:
            raise Error("machine %s was dialed, not started by this session: only its owner "
                        "can shut it down" % self.addr)
        deadline = time.monotonic() + (B._SHUTDOWN_TIMEOUT if timeout is None else timeout)
        self._leaving = True
        if self._state < RUNNING:
            self.wait(RUNNING, timeout=max(0.0, deadline - time.monotonic()))
        # In a thread of its own, as B.shutdown does it: that thread blocks signals (which
        # its children inherit), and the caller's thread must keep taking Ctrl-C.
        ending = threading.Thread(target=self._b._shutdown_machine, args=(self, deadline),
                                  name="bigmachine-shutdown", daemon=True)
        ending.start()
        ending.join()
        self._stop(Error("machine %s was shut down" % self.addr))

    # -- facts (Go's MemInfo, DiskInfo, LoadInfo; the status page shows the same) ----------

    def mem_info(self) -> MemInfo:
        """The machine's memory: its host's total, available and used, and its own RSS."""
        return _mem_info(self.call("Supervisor.status"))

    def disk_info(self) -> typing.Optional[DiskInfo]:
        """The disk of the machine's working directory: total, free and used bytes."""
        return _disk_info(self.call("Supervisor.status"))

    def load_info(self) -> typing.Optional[LoadInfo]:
        """The machine's host's 1, 5 and 15-minute load averages and its processors."""
        return _load_info(self.call("Supervisor.status"))

    # -- what its system reports (the public System interface) ---------------------------

    def report_stopped(self, err: BaseException) -> bool:
        """For systems: the machine is gone, because of err (an exception saying why, which
        becomes `m.err`). It moves to STOPPED at once, its calls fail with `MachineStopped`,
        and the session asks the system to terminate it. Returns False if it had stopped
        already (the first reason given wins)."""
        return self._stop(err)

    def report_status(self, text: str) -> None:
        """For systems: say in a few words what the machine waits for while it starts (a
        scheduler's queue reason, say); the status page shows it. "" clears it."""
        self.status = str(text or "")

    # -- state ------------------------------------------------------------------------

    def _set_state(self, state):
        with self._cond:
            if state <= self._state:
                return False
            self._state = state
            self._cond.notify_all()
        log.debug("%s: %s", self.addr, state.name)
        self._b._publish(self, state.name.lower())
        return True

    def _stop(self, err):
        """Move to STOPPED because of err; in-flight calls fail at once."""
        with self._cond:
            if self._state is STOPPED:
                return False
            self.err = err
            self._state = STOPPED
            self._cond.notify_all()
        self._stopped.set()
        self._peer.close()
        self._b._machine_stopped(self)
        self._b._publish(self, "stopped", err)
        return True

    def _stopped_error(self, method):
        error = MachineStopped("machine %s is stopped (%s); cannot call %s"
                               % (self.addr, self.err, method))
        error.__cause__ = self.err
        return error

    # -- calls --------------------------------------------------------------------------

    def call(self, method: str, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:
        """Call "Service.method" with these arguments on the machine and return its result."""
        if self._state is RUNNING and not self._inject:     # the hot path: straight to the wire
            try:
                return self._peer.call(method, args, kwargs)
            except _TooLarge as e:
                raise self._too_large(method, e) from None
            except (NetworkError, Cancelled):
                self._check_stopped(method)
                raise
        return self._call(method, args, kwargs, None, None)

    def _call(self, method, args, kwargs, deadline, inflight):
        if self._state is not RUNNING:
            self._await_running(method, deadline)
        if self._inject and not method.startswith("Supervisor."):
            self._injected_failure(method)
        try:
            return self._peer.call(method, args, kwargs, deadline, inflight)
        except _TooLarge as e:
            raise self._too_large(method, e) from None
        except (NetworkError, Cancelled):
            self._check_stopped(method)
            raise

    def _injected_failure(self, method):
        """Fail a call as TestSystem(inject_failures=p) asks: with probability p."""
        import random
        if random.random() < self._inject:
            raise NetworkError("call %s on %s failed: an injected failure (TestSystem("
                               "inject_failures=%g))" % (method, self.addr, self._inject))

    def _stream_broken(self, error):
        """What reading a reply stream raises when its connection broke: MachineStopped if the
        machine is going away, as for any call on it; otherwise a NetworkError."""
        if self._state is not STOPPED and (self._b._closed or self._b.system.lost(self)):
            self.wait(STOPPED, timeout=5.0)
        if self._state is STOPPED:
            broken = MachineStopped("machine %s is stopped (%s); a streamed reply from it broke "
                                    "off" % (self.addr, self.err))
            broken.__cause__ = self.err
        else:
            broken = NetworkError("a streamed reply from %s broke off: %s"
                                  % (self.addr, error or type(error).__name__))
            broken.__cause__ = error
        return broken

    def _too_large(self, method, error):
        return SerializationError(error.explain("the result of %s from %s" % (method, self.addr),
                                                "is", "this process"))

    def _check_stopped(self, method):
        """A call failed: if that is because the machine stopped, raise MachineStopped."""
        if self._state is not STOPPED and (self._b._closed or self._b.system.lost(self)):
            # The connection broke because the machine is going away, which the driver is
            # about to notice: report that, not a network error worth retrying.
            self.wait(STOPPED, timeout=5.0)
        if self._state is STOPPED:
            raise self._stopped_error(method) from self.err

    def _await_running(self, method, deadline):
        with self._cond:
            while self._state < RUNNING:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise Timeout("machine %s was still %s when the deadline of %s passed"
                                  % (self.addr, self._state.name, method))
                self._cond.wait(left)
        if self._state is STOPPED:
            raise self._stopped_error(method) from self.err

    def _run_future(self, future, method, args, kwargs, deadline):
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = self._call(method, args, kwargs, deadline, future._inflight)
        except BaseException as e:
            future._settle(error=self._failure(method, e))
        else:
            future._settle(result)

    def _failure(self, method, error):
        """What a future whose call failed with error gets: MachineStopped if the machine
        stopping is why."""
        if isinstance(error, (NetworkError, Cancelled)):
            try:
                self._check_stopped(method)
            except MachineStopped as stopped:
                return stopped
        elif self._state is STOPPED and not isinstance(error, Error):
            # Stopped from this side (cancel), the machine's connections are closed under
            # their readers, which may then fail with something other than an Error.
            stopped = self._stopped_error(method)
            stopped.__context__ = error
            return stopped
        return error

    def _run_batch(self, items, queue):
        """Make queued calls of call_async, (future, method, args, kwargs, deadline) each, as
        one batch (see `_CallQueue`); those that must go alone go after it. Returns how many
        calls ran."""
        peer = self._peer
        calls, batched, alone = [], [], []
        for item in items:
            future, method, args, kwargs, deadline = item
            payload = None
            try:
                if deadline is None and _split_stream_argument(args, kwargs)[0] is None:
                    # (_pickle: a large argument is not copied only to learn it goes alone)
                    pieces, buffers = _pickle((args, kwargs, None))
                    if not buffers and _size(pieces) < _SMALL:
                        payload = b"".join(pieces)          # (bytes, whatever the pieces)
            except Exception:         # (alone, the call says what is wrong with its arguments)
                pass
            if payload is None:
                alone.append(item)
            elif future.set_running_or_notify_cancel():
                if self._inject and not method.startswith("Supervisor."):
                    try:
                        self._injected_failure(method)
                    except NetworkError as e:
                        future._settle(error=e)
                        continue
                call_id = next(peer.client._ids)
                if future._inflight.attach(peer, None, call_id):
                    calls.append((call_id, method, payload))
                    batched.append(item)
        ran = 0
        if calls:
            ran = self._call_batch(calls, batched, queue)
        for item in alone:
            self._run_future(*item)
        return ran + len(alone)

    def _call_batch(self, calls, items, queue):
        """Send the batch and settle its calls' futures as their outcomes come; those it did
        not run go back to the queue. Returns how many it ran."""
        settled = [False] * len(calls)

        def settle(i, ok, value):
            settled[i] = True
            future = items[i][0]
            if ok is None:            # a result to stream, which waits on the machine
                try:
                    future._settle(self._call("Supervisor.take_stream", (value,), {}, None,
                                              future._inflight))
                except BaseException as e:
                    future._settle(error=e)
            elif ok:
                try:
                    result = _loads(value, (), "the result of %s from %s"
                                    % (calls[i][1], self.addr))
                except Exception as e:
                    future._settle(error=e)
                else:
                    future._settle(result)
            else:
                future._settle(error=_rebuild_error(value))

        released = []

        def release(i):
            for item in items[i:]:    # (before another lane attaches them anew)
                item[0]._inflight.detach()
            queue.requeue(items[i:])
            settled[i:] = [True] * (len(items) - i)
            released.append(i)

        try:
            if self._state is not RUNNING:
                self._await_running(calls[0][1], None)
            ran = self._peer.call_batch(calls, [item[0]._inflight for item in items],
                                        2 * queue._BATCH_TIME, settle, release)
        except BaseException as e:
            error = self._failure(calls[0][1], e)
            for i, item in enumerate(items):
                if not settled[i]:
                    item[0]._settle(error=error)
            return len(calls)
        finally:
            for item in items[:released[0] if released else len(items)]:
                item[0]._inflight.detach()
        if not released:              # (those after a released batch's long call went back then)
            queue.requeue(items[ran:])
        return ran

    def _boot_call(self, method, *args, timeout):
        """A call made while booting (the state is not RUNNING yet)."""
        try:
            return self._peer.call(method, args, {}, time.monotonic() + timeout)
        except (NetworkError, Timeout):
            if self._state is STOPPED:
                raise self._stopped_error(method) from self.err
            raise

    # -- watching -----------------------------------------------------------------------

    def _watch(self, system, method, *args):
        """Keep the machine alive (owned: keepalive) or watched (dialed: ping) until it stops."""
        period, timeout, rpc_timeout = (system.keepalive_period, system.keepalive_timeout,
                                        system.keepalive_rpc_timeout)
        backoff = Backoff(min(1.0, timeout / 10), min(5.0, max(timeout / 4, 0.01)), 1.5)
        while self._state is not STOPPED:
            began = time.monotonic()
            waits = backoff.waits()
            while True:
                sent = time.monotonic()
                try:
                    reply = self._peer.call(method, args, {}, sent + rpc_timeout)
                    break
                except Exception as e:
                    if self._state is STOPPED or self._leaving:
                        return
                    system.keepalive_failed(self, e)
                    wait = next(waits)
                    if not getattr(e, "temporary", False) or time.monotonic() + wait > began + timeout:
                        self._stop(Error(
                            "%s failed after %.1fs (timeout=%gs, rpc timeout=%gs): %s"
                            % ("keepalive" if self.owned else "ping", time.monotonic() - began,
                               timeout, rpc_timeout, e)))
                        return
                    if self._stopped.wait(wait):
                        return
            self.keepalive_replies.append(time.monotonic() - sent)
            lease = reply["next"] if isinstance(reply, dict) else period
            if isinstance(reply, dict):
                self._memory_seen = reply.get("memory", self._memory_seen)
                self.next_keepalive = time.time() + lease
                if reply.get("healthy", True) is not self.healthy:
                    self.healthy = not self.healthy
                    self._b._health_changed(self)
            if self._stopped.wait(min(lease, period) / 2):
                return


@contextlib.contextmanager
def _lease_kept(m, system):
    """Renew m's lease while the block runs. A machine's lease runs from its start, and the
    keepalive loop begins only once it is RUNNING: the boot steps between (packages to
    receive, the services' `init` to run) may take longer than a lease, and the machine must
    not give up on a driver that is busy with it. The renewing thread lives only as long as
    the block, and sends nothing unless the block outlasts a third of the lease."""
    done = threading.Event()
    period = min(system.keepalive_period, system.lease / 3)

    def renew():
        _block_async_signals()
        while not done.wait(period):
            try:
                m._peer.call("Supervisor.keepalive", (system.lease,), {},
                             time.monotonic() + system.keepalive_rpc_timeout)
            except Exception as e:           # the boot step itself will fail and say why
                log.debug("%s: keepalive while booting: %s", m.addr, e)

    threading.Thread(target=renew, name="bigmachine-boot-lease", daemon=True).start()
    try:
        yield
    finally:
        done.set()


# ======================================================================================
# B: one cluster session (Go: bigmachine.go, driver)
# ======================================================================================
#
# The driver's B owns the session's certificate authority and the machines it starts. Starting
# returns at once: each machine boots in a thread of its own (launch the process, ping, install
# the services, RUNNING) and then keeps its lease renewed. Shutting down asks every machine to
# exit, waits a bounded time, and ends whatever is left by force.
#
# A machine has a B of its own, handed to its services' `init(b)`: it can `dial` other machines
# and call them with the machine's own certificate. It cannot start machines.


class MachineEvent(typing.NamedTuple):
    """What happened to a machine of the session, as `B.subscribe` delivers it.

    kind is "starting", "running", "stopped", "unhealthy" (more than 95% of its memory in use)
    or "healthy" (again). reason is the machine's `err` for "stopped" (None otherwise). details
    is what the system knows of the machine (EC2: "instance_id", "instance_type" and "market",
    "spot" or "on-demand"). time is time.time() when it happened."""

    kind: str
    machine: typing.Any
    reason: typing.Optional[BaseException]
    details: typing.Dict[str, typing.Any]
    time: float


class B:
    """One bigmachine session: see `start()`."""

    _SHUTDOWN_TIMEOUT = 20.0

    def __init__(self, system, *, _credentials=None):
        self.system = system
        self._machines = {}
        self._lock = threading.Lock()
        self._closed = False
        self._is_driver = _credentials is None
        if self._is_driver:
            self._authority = CertificateAuthority()
            _credentials = self._authority.issue("bigmachine driver", server=False, client=True)
        else:
            self._authority = None
        self._credentials = _credentials
        self._client = _Client(_credentials)
        self._stopped_machines = collections.deque(maxlen=100)   # for the status page
        self._executors = weakref.WeakSet()  # the Executors over this session, for the status page
        self._debug_servers = []
        self._subscribers = []            # B.subscribe's callbacks
        self._events = None               # their queue, and its delivering thread, once needed
        #: Where the driver saves what it learns of a machine that turns unhealthy (its heap and
        #: variables): BIGMACHINE_DIAGNOSTICS_DIR, else the temporary directory.
        self.diagnostics_dir = os.environ.get("BIGMACHINE_DIAGNOSTICS_DIR") or None
        self._enrolment = None           # the _EnrolmentServer, once a system enrols a machine
        if self._is_driver:
            system.init(self)
            _sessions.add(self)

    def __repr__(self):
        return "<B %s, %d machines>" % (self.system.name, len(self._machines))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is KeyboardInterrupt and self._is_driver and self._machines:
            log.warning("interrupted: shutting down %d machines (Ctrl-C again to kill them "
                        "at once)", len(self._machines))
        self.shutdown()

    # -- machines -----------------------------------------------------------------------

    def start(self, n: int, services: typing.Mapping[str, object], *,
              env: typing.Optional[typing.Mapping[str, str]] = None, exact: bool = False,
              **params: typing.Any) -> typing.List[Machine]:
        """Start up to n machines, each with services ({name: object}) installed; returns at
        once, with the machines STARTING. env adds environment variables on the machines.

        A system may have room for fewer than n (SSHSystem: per_host machines on each host);
        then fewer start, with a warning that says how many and why, or, with exact=True,
        none: an Error says why."""
        if not self._is_driver:
            raise Error("a machine cannot start machines; start them from the driver")
        if self._closed:
            raise Error("this session is shut down; start a new one with bigmachine.start()")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError("the number of machines must be a positive integer, not %r" % (n,))
        if not isinstance(services, collections.abc.Mapping) or not services:
            raise ValueError("services must be a non-empty mapping of names to service objects, "
                             "such as {'PI': CirclePI()}, not %r" % (services,))
        for name in services:
            if not isinstance(name, str) or not name or "." in name or name.startswith("_"):
                raise ValueError("service names are non-empty strings without dots or a leading "
                                 "underscore, not %r" % (name,))
            if name == "Supervisor":
                raise ValueError("the name 'Supervisor' is taken by bigmachine's own service")
            _check_service(name, services[name], not isinstance(self.system, TestSystem))
        if env is not None and (not isinstance(env, collections.abc.Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise ValueError("env must map names to strings, not %r" % (env,))
        if params:
            raise TypeError("unknown parameters for B.start: %s" % ", ".join(sorted(params)))
        if "__main__" in sys.modules:
            sys.modules.setdefault("__mp_main__", sys.modules["__main__"])
        blob = _dumps_in_band(dict(services), "the services")
        machines = self.system.start(self, n, env=dict(env or {}))
        if not machines:
            raise Error("the %s system started no machines" % self.system.name)
        if len(machines) < n:
            why = "b.start(%d) %s %d machine%s: %s" % (
                n, "can start only" if exact else "started only", len(machines),
                "" if len(machines) == 1 else "s", self.system._why_fewer(n, len(machines)))
            if exact:
                now = time.monotonic()
                for m in machines:            # made, not launched: give their room back
                    self.system.terminate(m, now)
                raise Error(why + "; none was started (exact=True)")
            log.warning("%s; pass exact=True to have an error instead", why)
        with self._lock:
            for m in machines:
                self._machines[m.addr] = m
        for m in machines:
            m._set_state(STARTING)
            threading.Thread(target=self._boot, args=(m, blob), name="bigmachine-boot",
                             daemon=True).start()
        return machines

    def _boot(self, m, services_blob):
        _block_async_signals()             # and so do the threads this one starts
        system = self.system
        try:
            system.launch(self, m)
            if self._closed:
                # The session was shut down while this machine was being launched, perhaps
                # too late for the shutdown to find its process: end it here.
                system.terminate(m, time.monotonic() + 1.0)
                raise Error("the session was shut down while machine %s was starting" % m.addr)
            waits = Backoff(0.005, 0.5, 2).waits()
            deadline = time.monotonic() + system.boot_timeout
            while True:
                try:
                    info = m._boot_call("Supervisor.info", timeout=system.keepalive_rpc_timeout)
                    break
                except (NetworkError, Timeout) as e:
                    # Timeout too: a machine still loading the driver's main answers late, and
                    # one not serving yet accepts connections (its port is bound by then) but
                    # not the TLS handshake.
                    if time.monotonic() > deadline or m._state is STOPPED:
                        raise Error("machine %s did not come up in %.0fs: %s"
                                    % (m.addr, system.boot_timeout, e)) from e
                    m._stopped.wait(next(waits))
            if info["python"] != PYTHON:
                raise VersionMismatch("the driver runs Python %s; machine %s runs Python %s"
                                      % (PYTHON, m.addr, info["python"]))
            if m.maxprocs is None:
                m.maxprocs = info.get("maxprocs") or info["cpus"]
            with _lease_kept(m, system):
                if info.get("packages"):
                    _send_packages(system, m, info["packages"])    # see Packages
                m._boot_call("Supervisor.register", services_blob, m.maxprocs,
                             timeout=system.boot_timeout)
        except BaseException as e:
            m._stop(e)
            return
        if m._set_state(RUNNING):
            log.debug("%s: RUNNING", m.addr)
            m._watch(system, "Supervisor.keepalive", system.lease)

    # -- for systems (the public System interface) ----------------------------------------

    @property
    def closed(self) -> bool:
        """True once `shutdown` has begun: machines that end now were asked to."""
        return self._closed

    @property
    def credentials(self) -> Credentials:
        """This participant's own credentials (the driver's, on the driver): for a system that
        talks to its machines' bootstraps over mutual TLS (see `client_context`)."""
        return self._credentials

    def issue_certificate(self, common_name: str = "bigmachine machine", *,
                          ip_addresses: typing.Iterable[str] = (),
                          dns_names: typing.Iterable[str] = (),
                          public_key: typing.Optional[bytes] = None, client: bool = True,
                          lifetime: typing.Optional[float] = None) -> Credentials:
        """For systems: credentials for one machine, signed by the session's certificate
        authority, good as TLS server and client, naming the machine's ip_addresses and
        dns_names. With public_key (an Ed25519 public key made by the machine itself) only the
        certificate is made, and key_pem is empty. client=False makes a server-only
        certificate, which no machine accepts from a caller, and lifetime (seconds) one that
        expires: for a bootstrap that must prove itself to the driver before its machine has
        credentials of its own (EC2). The CA's own key never leaves the driver, so only the
        driver issues certificates."""
        if self._authority is None:
            raise Error("only the driver issues certificates; a machine cannot")
        not_after = None if lifetime is None else (
            datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=lifetime))
        return self._authority.issue(common_name, server=True, client=client,
                                     ip_addresses=ip_addresses, dns_names=dns_names,
                                     public_key=public_key, not_after=not_after)

    def readdress(self, m: Machine, addr: str) -> None:
        """For systems: give m the address it turned out to have. A system that learns a
        machine's address only as the machine comes up (SSH: the port the machine bound;
        Slurm: the node the job landed on) makes the Machine with a provisional one and calls
        this from launch, before the machine is pinged."""
        self._readdress(m, addr)

    def enrol(self, machine: Machine, *, env: typing.Optional[typing.Mapping[str, str]] = None,
              bundle=None, host: typing.Optional[str] = None, port: int = 0,
              on_exit=None) -> Enrolment:
        """For systems whose machines dial the driver (a scheduler's jobs, a cloud's startup
        scripts): a one-time admission for machine. Run `enrolment.command(python)` wherever the
        machine should be: it fetches the driver's code, makes the machine's own key, gets its
        certificate and reports its address (this B readdresses machine); `enrolment.wait()`
        says when. The command holds a token that is useless once used or revoked, and no key.
        env is the machine's environment variables; host (default: this host's fully qualified
        name) and port (default: any) are where the driver serves enrolments, given by the
        first call of a session. on_exit(machine, status, output) is called when the machine's
        process ends (status None: its connection broke); by default it stops the machine
        with the exit status. See the Enrolment section of bigmachine.py."""
        if not self._is_driver:
            raise Error("only the driver enrols machines")
        with self._lock:
            if self._closed:
                raise Error("this session is shut down")
            if self._enrolment is None:
                host = host or socket.getfqdn()
                try:
                    self._enrolment = _EnrolmentServer(self, host, port)
                except OSError as e:
                    raise Error("cannot serve enrolments at %s:%d (%s): give the driver's "
                                "address as the machines reach it, and a free port (Slurm: "
                                "--bigm.slurm.driver_host, --bigm.slurm.driver_port)"
                                % (host, port, e)) from e
            server = self._enrolment
        if bundle is None:
            bundle = _make_bundle(getattr(self.system, "packages", "auto"))
        return server.add(machine, bundle,
                          dict(env or {}), on_exit or _enrolled_exit)

    def _readdress(self, m, addr):
        import urllib.parse
        _parse_addr(addr)
        with m._cond:
            if m._state is STOPPED:
                raise MachineStopped("machine %s stopped while it started" % m.addr) from m.err
            old = m.addr
            with self._lock:
                if self._machines.get(old) is m:
                    del self._machines[old]
                    self._machines[addr] = m
            m.addr, m.hostname = addr, urllib.parse.urlsplit(addr).hostname or "unknown"
            m._peer = self._client.peer(addr)
            m._peer.stream_broken = m._stream_broken
        self._client.forget(old)
        log.debug("%s is %s", old, addr)

    def machines(self) -> typing.List[Machine]:
        """The machines this session knows: started and dialed, not yet stopped."""
        with self._lock:
            return list(self._machines.values())

    def executor(self, machines: typing.Optional[typing.Iterable[Machine]] = None, *,
                 per_machine: typing.Optional[int] = None, retries: int = 3,
                 progress: typing.Optional[bool] = None) -> Executor:
        """A `concurrent.futures.Executor` over machines (default: every machine of this
        session, including those that reach RUNNING later): see `Executor` and the "Many
        tasks" section. Each machine runs at most per_machine tasks at once (default: its
        maxprocs); a task whose machine is lost runs again elsewhere, at most retries times;
        progress draws a progress line on stderr (None: when stderr is a terminal)."""
        if self._closed:
            raise Error("this session is shut down: it has no machines to run tasks on")
        return Executor(self, machines, per_machine=per_machine, retries=retries,
                        progress=progress)

    def dial(self, addr: str) -> Machine:
        """A Machine for the machine at addr, for calls to it (from a service, say)."""
        _parse_addr(addr)
        with self._lock:
            m = self._machines.get(addr)
            if m is not None:
                return m
            if self._closed:
                raise Error("this session is shut down")
            m = self._machines[addr] = Machine(self, addr, owned=False)
        m._set_state(STARTING)
        threading.Thread(target=self._watch_dialed, args=(m,), name="bigmachine-dial",
                         daemon=True).start()
        return m

    def _watch_dialed(self, m):
        _block_async_signals()
        try:
            m._boot_call("Supervisor.ping", 0, timeout=self.system.keepalive_rpc_timeout)
        except BaseException as e:
            m._stop(e)
            return
        if m._set_state(RUNNING):
            m._watch(self.system, "Supervisor.ping", 0)

    def _machine_stopped(self, m):
        with self._lock:
            if self._machines.get(m.addr) is m:
                del self._machines[m.addr]
            self._stopped_machines.append(m)
        self._client.forget(m.addr)
        if m.owned and not self._closed:
            log.warning("%s: machine stopped: %s", m.addr, m.err)
            _background(self.system.terminate, m, time.monotonic() + 5.0)

    # -- events -------------------------------------------------------------------------
    #
    # A framework wants to hear that a machine came up or went away (and why) without polling
    # every machine. Events are delivered in order, one at a time, by a thread of the session's
    # own: a slow callback delays the next event, never a machine.

    def subscribe(self, callback: typing.Callable[[MachineEvent], typing.Any]
                  ) -> typing.Callable[[], None]:
        """Call callback(event) with a `MachineEvent` for everything that happens from now on
        to the machines this session starts: starting, running, stopped (with the reason),
        unhealthy and healthy again. Returns a function that unsubscribes."""
        if not callable(callback):
            raise TypeError("subscribe takes a function of one MachineEvent, not %r"
                            % (callback,))
        with self._lock:
            self._subscribers = self._subscribers + [callback]
            if self._events is None:
                self._events = queue.SimpleQueue()
                threading.Thread(target=self._deliver_events, args=(self._events,),
                                 name="bigmachine-events", daemon=True).start()

        def unsubscribe():
            with self._lock:
                self._subscribers = [c for c in self._subscribers if c is not callback]
        return unsubscribe

    def _publish(self, m, kind, reason=None):
        if self._subscribers and m.owned:
            self._events.put(MachineEvent(kind, m, reason, dict(m.details), time.time()))

    def _deliver_events(self, events):
        _block_async_signals()
        while True:
            event = events.get()
            if event is None:
                return
            for callback in self._subscribers:
                try:
                    callback(event)
                except Exception:
                    log.exception("a subscriber to machine events failed on %s", event)

    def _health_changed(self, m):
        """m's keepalive said it crossed the health line. Unhealthy (Go: more than 95% of its
        memory in use) is when its heap is worth keeping: it may not live much longer."""
        if m.healthy:
            log.info("%s: healthy again", m.addr)
            self._publish(m, "healthy")
            return
        seen = m._memory_seen or {}
        log.warning("%s: unhealthy: %s of its memory in use; saving its heap and variables",
                    m.addr, "%.0f%%" % seen["used_percent"] if "used_percent" in seen else "most")
        self._publish(m, "unhealthy")
        _background(self._save_diagnostics, m)

    def _save_diagnostics(self, m):
        """Save m's heap (tracemalloc's view) and its variables to files named after it, in
        diagnostics_dir; log where. Returns the paths."""
        import tempfile
        directory = self.diagnostics_dir or tempfile.gettempdir()
        stem = os.path.join(directory, "bigmachine-%s-%s-%s" % (
            m.hostname, (m.addr.rstrip("/").rsplit(":", 1)[-1]).replace("/", "-"),
            time.strftime("%Y%m%d-%H%M%S")))
        paths = []
        try:
            os.makedirs(directory, exist_ok=True)
            heap = m.options(timeout=60.0).call("Supervisor.heap", 200)
            paths.append(_write_file(stem + ".heap.txt",
                                     _format_heap([(m.addr, heap, None)], 200)))
            variables = m.options(timeout=30.0).call("Supervisor.vars")
            variables["memory"] = m._memory_seen
            paths.append(_write_file(stem + ".vars.json", json.dumps(
                variables, indent=2, sort_keys=True, default=repr)))
        except Exception as e:
            log.warning("%s: unhealthy, and its diagnostics could not all be saved: %s",
                        m.addr, e)
        if paths:
            log.warning("%s: unhealthy: saved %s", m.addr, " and ".join(paths))
        return paths

    # -- looking inside (see the Debug section) ------------------------------------------

    def profile(self, seconds: float = 30.0,
                machines: typing.Optional[typing.Iterable[Machine]] = None, *,
                hz: float = 100) -> pstats.Stats:
        """A CPU profile taken on machines (by default every running machine this session
        started) at once for seconds, merged: a `pstats.Stats`. `.dump_stats(path)` writes the
        file that `python -m pstats`, snakeviz and gprof2dot read. Machines that fail are
        logged and left out; if none can be profiled, raises `Error`."""
        seconds = float(seconds)
        if not seconds > 0:
            raise ValueError("a profile lasts a positive number of seconds, not %r" % (seconds,))
        if machines is None:
            machines = [m for m in self.machines() if m.owned and m.state is RUNNING]
        machines = list(machines)
        if not machines:
            raise Error("no machine to profile: none is running")
        results = _gather(machines, "Supervisor.profile", seconds, hz, timeout=seconds + 30.0)
        failed = [(m, e) for m, _, e in results if e is not None]
        for m, e in failed:
            log.warning("%s: no profile: %s", m.addr, e)
        if len(failed) == len(results):
            raise Error("no machine could be profiled: %s" % "; ".join(
                "%s: %s" % (m.addr, e) for m, e in failed)) from failed[0][1]
        return _merge_profiles([(m.addr, r) for m, r, e in results if e is None])

    def vars(self) -> typing.Dict[str, typing.Dict[str, typing.Any]]:
        """The variables of every running machine this session started, {addr: {name: value}}:
        what the machine published, and its calls counted per method ("rpc.server",
        "rpc.client"). A machine that does not answer in 30 seconds is left out."""
        machines = [m for m in self.machines() if m.owned and m.state is RUNNING]
        out = {}
        for m, result, error in _gather(machines, "Supervisor.vars", timeout=30.0):
            if error is None:
                out[m.addr] = result
            else:
                log.warning("%s: no variables: %s", m.addr, error)
        return out

    def serve_debug(self, address: str = "127.0.0.1:3333", *, allow_remote: bool = False) -> str:
        """Serve the debug pages over HTTP on address ("host:port"; port 0 picks one) until the
        session shuts down; returns the address bound. The pages have no authentication, so
        address must be a loopback one, and requests must name a loopback host (against DNS
        rebinding), unless allow_remote=True."""
        host, port = _split_host_port(address)
        if not host:
            host = "" if allow_remote else "127.0.0.1"
        elif not allow_remote and not _resolves_to_loopback(host):
            raise ValueError(
                "the debug pages have no authentication, so they are served on loopback "
                "addresses only (127.0.0.1, ::1, localhost), not %s; pass allow_remote=True "
                "to serve them there anyway" % address)
        server = _debug_server(self, host, port, allow_remote)
        with self._lock:
            closed = self._closed
            if not closed:
                self._debug_servers.append(server)
        if closed:
            server.close()
            raise Error("this session is shut down")
        return server.addr

    def debug_wsgi(self, prefix: str = "/debug", *, allow_remote: bool = False):
        """The debug pages (see `serve_debug`) as a WSGI application, to mount in one's own web
        server under prefix: prefix + "/bigmachine/status" is the status page, prefix + "/vars"
        the variables. The same code serves them as serve_debug's server, with the same checks:
        requests must name a loopback host (Host:) unless allow_remote=True, for the pages have
        no authentication of their own."""
        if not isinstance(prefix, str) or (prefix and not prefix.startswith("/")):
            raise ValueError("prefix is a URL path such as '/debug', not %r" % (prefix,))
        return _DebugWSGI(self, prefix.rstrip("/"), allow_remote)

    # -- ending ---------------------------------------------------------------------------

    def shutdown(self, timeout: typing.Optional[float] = None) -> None:
        """Stop every machine this session started and release the system. Bounded in time
        (timeout seconds, 20 by default) and idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            machines = list(self._machines.values())
            servers, self._debug_servers = self._debug_servers, []
        for server in servers:
            server.close()
        deadline = time.monotonic() + (self._SHUTDOWN_TIMEOUT if timeout is None else timeout)
        try:
            threads = []
            for m in machines:
                m._leaving = True         # a keepalive that fails from here on is expected
            for m in machines:
                if m.owned:
                    t = threading.Thread(target=self._shutdown_machine, args=(m, deadline),
                                         name="bigmachine-shutdown", daemon=True)
                    t.start()
                    threads.append(t)
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            self._finish_shutdown(machines)
        except KeyboardInterrupt:
            # Ctrl-C while shutting down (often the second one: the first brought the program
            # here). Wait no more: end every machine's process now, then let the interrupt
            # through, so that the program exits at once and leaves nothing behind.
            with _sigint_ignored():
                log.warning("interrupted again: killing %d machines", len(machines))
                now = time.monotonic()
                for m in machines:
                    if m.owned:
                        with contextlib.suppress(Exception):
                            self.system.terminate(m, now)
                self._finish_shutdown(machines)
            raise

    def _finish_shutdown(self, machines):
        for m in machines:
            m._stop(Error("the session was shut down"))
        if self._is_driver:
            self.system.shutdown()
        if self._enrolment is not None:
            self._enrolment.close()
        self._client.close()
        _sessions.discard(self)
        if self._events is not None:
            self._events.put(None)            # the last event was the last machine stopping

    def _shutdown_machine(self, m, deadline):
        _block_async_signals()
        if m._state is RUNNING:
            try:
                m._peer.call("Supervisor.shutdown", (), {},
                             min(deadline, time.monotonic() + 2.0))
            except Exception as e:
                log.debug("%s: Supervisor.shutdown: %s", m.addr, e)
        self.system.terminate(m, deadline)


def _write_file(path, text):
    """Write text to path whole or not at all (a reader never sees half of it); returns path."""
    with open(path + ".partial", "w") as f:
        f.write(text)
    os.replace(path + ".partial", path)
    return path


def _check_service(name, service, processes):
    """Refuse what cannot serve: a service is an object whose methods are called; and, on
    machines that are processes of their own, one whose class they cannot load."""
    main = sys.modules.get("__main__")
    if (processes and type(service).__module__ == "__main__"
            and getattr(main, "__spec__", None) is None
            and getattr(main, "__file__", None) is not None and _main_file() is None):
        raise Error(
            "service %r is an object of class %s, defined in the driver's main program, which "
            "was not run from a file (it came from %s): machines load the main program from "
            "its file. Save the program to a file and run that, or define the class in a "
            "module the machines can import" % (name, type(service).__qualname__,
                                                main.__file__))
    if isinstance(service, type):
        raise ValueError(
            "service %r is the class %s itself; a service is an object: pass an instance, "
            "such as {%r: %s()}" % (name, service.__qualname__, name, service.__qualname__))
    if isinstance(service, (types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                            functools.partial)):
        raise ValueError(
            "service %r is a function (%s); a service is an object whose methods are called "
            "as %r.method: make the function a method of a class, and pass an instance of "
            "that class" % (name, getattr(service, "__qualname__", service), name))


@contextlib.contextmanager
def _sigint_ignored():
    """Ignore Ctrl-C for a moment (in the main thread; elsewhere signals are not delivered)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:                 # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _shutdown_sessions():
    """At exit, end the machines of sessions the program did not shut down itself."""
    for b in list(_sessions):
        with contextlib.suppress(Exception):
            b.shutdown(timeout=5.0)


atexit.register(_shutdown_sessions)


# ======================================================================================
# Many tasks: the Executor, worker processes and Pooled services
# ======================================================================================
#
# Users of a cluster mostly run many tasks. `B.executor` gives them a
# `concurrent.futures.Executor` over the session's machines. Its tasks wait in a deque on
# the driver, never in a thread each; each machine gets `per_machine` + 1 *lanes* (threads
# of the shared pool), each making one call at a time: per_machine tasks run, and one more
# waits on the machine, ready to start the moment a running one ends, so the machine does
# not idle while a reply travels. A task is its function (or "Service.method") and a chunk
# of inputs, pickled once on the driver into bytes that the machine hands on unread when it
# runs them in a worker; a `Supervisor.run_tasks` call carries one task, or, while the queue
# is long, a batch of them that the machine runs one after the other (so that many small
# tasks cost few round trips). A batch is sized by time, not count: as many tasks of a
# function as take about `Executor._BATCH_TIME` by the times measured so far, since a batch
# of long tasks would keep them in one processor while another idles. Each input's outcome
# comes back on its own, so one failing input fails that input only. A call that fails
# because its machine went (MachineStopped, NetworkError) is put back at the head of the
# deque for another lane, at most `retries` times; an exception raised by the task's own
# code is an outcome, never retried. Machines that come up later are found by the executor's
# one thread, which also draws the progress line.
#
# Python runs one thread of Python at a time, so a machine offering several processors runs
# CPU-bound tasks in *worker processes*: children of the machine process, spawned on first
# need (at most the executor's per_machine of them), which load the driver's main module the
# way the machine did and talk to it over a socketpair. A batch of tasks goes to a worker in
# one frame, and the worker sends each task's outcome back as soon as it is done, so that it
# goes from task to task without waiting for the machine to hand it the next. The socketpair
# is private to the two processes, so the pickles that cross it come only from the
# authenticated peers the machine itself serves: the wire stays mutual TLS end to end. A
# worker ends with its machine (it watches its parent) and is killed when a call it runs is
# cancelled (a cancel must stop CPU-bound code, and a process is the unit that can be
# stopped at any moment).
#
# `Pooled(service)` replicates a service in such workers: one replica per processor, each
# with its own state and its own `init(b)`, and a call goes to a free replica. A plain service
# stays Go's one object per machine, in the machine's own process.

_WORKER_BATCH, _WORKER_INSTALL, _WORKER_CALL, _WORKER_REPLY, _WORKER_ERROR, _WORKER_STOP = \
    b"B", b"I", b"C", b"R", b"E", b"S"
_WORKER_FRAME = struct.Struct(">cQ")


def _send_worker_frame(sock, kind, body):
    sock.sendall(_WORKER_FRAME.pack(kind, len(body)) + body)


def _read_worker_frame(rfile):
    head = rfile.read(_WORKER_FRAME.size)
    if len(head) != _WORKER_FRAME.size:
        raise EOFError("the other end of the worker's socket closed")
    kind, size = _WORKER_FRAME.unpack(head)
    body = rfile.read(size)
    if len(body) != size:
        raise EOFError("the other end of the worker's socket closed")
    return kind, body


def _pickled_outcomes(outcomes, where, what):
    """outcomes ((ok, value) pairs), with each value that does not pickle replaced by a
    SerializationError's payload that says which part of it would not."""
    fixed = list(outcomes)
    for i, (ok, value) in enumerate(outcomes):
        if ok:
            try:
                pickle.dumps(value, _PICKLE_PROTOCOL)
            except Exception as e:
                error = SerializationError(_describe_pickling_failure(value, what % where, e))
                fixed[i] = (False, _error_payload(error, where))
    return fixed


def _run_items(fn, items, kwargs, where):
    """Run fn on each of items (argument tuples); the outcomes, pickled: a list of (True,
    result) or (False, error payload) pairs, one per input."""
    outcomes = []
    for args in items:
        try:
            outcomes.append((True, fn(*args, **kwargs)))
        except Exception as e:
            outcomes.append((False, _error_payload(e, where)))
    try:
        return pickle.dumps(outcomes, _PICKLE_PROTOCOL)
    except Exception:
        return pickle.dumps(_pickled_outcomes(outcomes, where, "the result of a task on %s"),
                            _PICKLE_PROTOCOL)


_task_functions = {}          # pickled function -> function, in a machine or worker


def _task_function(fn):
    """A task's function from its pickle (unpickled once per process and function)."""
    if type(fn) is not bytes:
        return fn
    found = _task_functions.get(fn)
    if found is None:
        found = _loads(fn, (), "a task's function")
        if len(_task_functions) > 64:
            _task_functions.clear()
        _task_functions[fn] = found
    return found


class _Worker:
    """A worker process of a machine, as the machine sees it: one request at a time."""

    def __init__(self, machine, install=None):
        import subprocess
        parent, child = socket.socketpair()
        here = os.path.dirname(os.path.abspath(__file__))
        code = ("import sys; sys.path.insert(0, %r); import bigmachine; "
                "bigmachine._worker_main(%d)" % (here, child.fileno()))
        try:
            self.proc = subprocess.Popen(
                [sys.executable] + _interpreter_flags(sys.executable) + ["-u", "-c", code],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.sock = parent
        self.received = bytearray()          # what came from the worker, not yet read
        self.where = "%s (worker %d)" % (machine.addr, self.proc.pid)
        bootstrap = {"main": machine.main_preparation or _main_preparation(),
                     "credentials": machine.credentials._asdict(), "lease": machine.lease,
                     "where": self.where}
        try:
            parent.sendall((json.dumps(bootstrap) + "\n").encode())
            if install is not None:
                self.request(_WORKER_INSTALL, install)
        except BaseException:
            self.kill()
            raise

    def request(self, kind, body):
        """Send a request and wait for its reply; a cancel of the call being served (an
        interrupt) kills the worker, which is the one sure way to stop what it runs."""
        try:
            _send_worker_frame(self.sock, kind, body)
            kind, reply = self._receive()
        except (OSError, EOFError) as e:
            raise self._ended(e) from None
        except BaseException:
            self.kill()
            raise
        if kind == _WORKER_REPLY:
            return reply
        raise _rebuild_error(reply)

    def run_tasks(self, payloads, replies, budget=None):
        """Run task payloads one after the other, all sent in one frame: the worker goes
        from one to the next without waiting for the machine, and sends each one's reply
        as it is done. Appends to replies each payload's reply (kind, body) as it comes, so
        that if the worker ends, the replies before the payload it was running stand.
        Returns whether the worker stopped early, its budget of seconds spent (see
        `Supervisor.run_tasks`)."""
        try:
            _send_worker_frame(self.sock, _WORKER_BATCH,
                               pickle.dumps((budget, payloads), _PICKLE_PROTOCOL))
            for _ in payloads:
                reply = self._receive()
                if reply[0] == _WORKER_STOP:
                    return True
                replies.append(reply)
            return False
        except (OSError, EOFError) as e:
            raise self._ended(e) from None
        except BaseException:
            self.kill()
            raise

    def _receive(self):
        """The next frame from the worker. It waits in select with a timeout, not in a
        blocking read, so that a cancel's interrupt lands in Python; and it frames the bytes
        itself, since a worker running a batch may send several replies at once."""
        buf, head = self.received, _WORKER_FRAME.size
        while True:
            if len(buf) >= head:
                kind, size = _WORKER_FRAME.unpack_from(buf)
                if len(buf) >= head + size:
                    body = bytes(buf[head:head + size])
                    del buf[:head + size]
                    return kind, body
            while not select.select([self.sock], [], [], 0.05)[0]:
                pass
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("the other end of the worker's socket closed")
            buf += data

    def _ended(self, e):
        """The error for a worker whose socket broke with e (it is killed, to be sure)."""
        self.kill()
        return Error("worker process %d of %s ended (exit status %s) while it ran a task: %s"
                     % (self.proc.pid, self.where, self.proc.returncode, e))

    def kill(self):
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(5.0)
        with contextlib.suppress(OSError):
            self.sock.close()


class _WorkerPool:
    """The worker processes of a machine: taken one request at a time, spawned on demand up
    to the number the caller allows, replaced when one is killed or dies."""

    def __init__(self, machine, install=None):
        self.machine = machine
        self.install = install               # what each new worker installs (Pooled)
        self.idle = []
        self.all = set()
        self.starting = 0
        self.cond = threading.Condition()
        self.closed = False

    def take(self, limit):
        with self.cond:
            while True:
                if self.closed:
                    raise Error("machine %s is shutting down" % self.machine.addr)
                if self.idle:
                    worker = self.idle.pop()
                    _busy_workers.add(worker)
                    return worker
                if len(self.all) + self.starting < limit:
                    self.starting += 1
                    break
                self.cond.wait(0.05)         # a timeout: a cancel's interrupt lands in Python
        worker = None
        try:
            worker = _Worker(self.machine, self.install)
        finally:
            with self.cond:
                self.starting -= 1
                if worker is not None:
                    self.all.add(worker)
                if self.closed and worker is not None:
                    self.all.discard(worker)
                    worker.kill()
                    worker = None
                self.cond.notify()
        if worker is None:
            raise Error("machine %s is shutting down" % self.machine.addr)
        _busy_workers.add(worker)
        return worker

    def give(self, worker):
        _busy_workers.discard(worker)
        with self.cond:
            if worker.proc.poll() is not None or worker.sock.fileno() < 0 or self.closed:
                self.all.discard(worker)
                dead = True
            else:
                self.idle.append(worker)
                dead = False
            self.cond.notify()
        if dead:
            worker.kill()

    def request(self, limit, kind, body):
        worker = self.take(limit)
        try:
            return worker.request(kind, body)
        finally:
            self.give(worker)

    def pids(self):
        with self.cond:
            return sorted(w.proc.pid for w in self.all)

    def close(self):
        with self.cond:
            self.closed = True
            workers, self.all, self.idle = list(self.all), set(), []
            self.cond.notify_all()
        _busy_workers.difference_update(workers)
        for worker in workers:
            worker.kill()


class _Gate:
    """At most limit tasks at once in a machine's own process (limit may differ per call)."""

    def __init__(self):
        self.busy = 0
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def entered(self, limit):
        with self.cond:
            while self.busy >= limit:
                self.cond.wait(0.05)         # a timeout: a cancel's interrupt lands in Python
            self.busy += 1
        try:
            yield
        finally:
            with self.cond:
                self.busy -= 1
                self.cond.notify()


def _machine_run_tasks(machine, payloads, slots, method, budget=None):
    """Run tasks on this machine, one after the other in one slot (see `Supervisor.run_tasks`):
    the pickled outcomes of each payload run, and the seconds they took."""
    slots = max(1, int(slots))
    if method is None and (machine.maxprocs or 1) > 1:
        with machine.lock:
            if machine.workers is None:
                machine.workers = _WorkerPool(machine)
            workers = machine.workers
        replies, left = [], list(payloads)
        worker = workers.take(slots)
        began = time.perf_counter()
        try:
            stopped = False
            while left and not stopped:
                got = []
                try:
                    stopped = worker.run_tasks(left, got, budget)
                except Error as e:
                    # Its worker died under it (the task ended the process, say): the
                    # payload it was running fails with the reason, the rest go on in a new
                    # worker.
                    got.append((_WORKER_ERROR, _error_payload(e, machine.addr)))
                    workers.give(worker)
                    worker = None
                    worker = workers.take(slots)
                for payload, (kind, reply) in zip(left, got):
                    if kind != _WORKER_REPLY:      # the payload failed as a whole
                        try:
                            count = len(_loads(payload, (), "a chunk of tasks")[1])
                        except Exception:
                            count = 1
                        reply = pickle.dumps([(False, reply)] * count, _PICKLE_PROTOCOL)
                    replies.append(reply)
                left = left[len(got):]
        finally:
            if worker is not None:
                workers.give(worker)
        return replies, time.perf_counter() - began
    found = machine.dispatcher.lookup(method) if method is not None else None
    replies = []
    with machine.gate.entered(slots):
        began = time.perf_counter()
        for payload in payloads:
            if budget is not None and replies and time.perf_counter() - began >= budget:
                break
            fn, items, kwargs = _loads(payload, (), "a chunk of tasks")
            replies.append(_run_items(found or _task_function(fn), items, kwargs, machine.addr))
        return replies, time.perf_counter() - began


def _worker_main(fd):
    """The life of a worker process of a machine (see `_Worker`); never returns."""
    code = 0
    if hasattr(signal, "pthread_sigmask"):
        # Spawned from a library thread, which blocks the signals a program handles: the
        # mask is inherited, and a worker must die of SIGTERM like any process.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _ASYNC_SIGNALS)
    try:
        sock = socket.socket(fileno=fd)
        rfile = sock.makefile("rb")
        config = json.loads(rfile.readline() or b"null")
        parent = os.getppid()

        def watch_parent():
            # The machine may be killed outright: a worker must not outlive it.
            while os.getppid() == parent:
                time.sleep(0.1)
            os._exit(1)
        threading.Thread(target=watch_parent, name="bigmachine-parent", daemon=True).start()
        where = config["where"]
        _load_main(config["main"])
        replicas = {}
        while True:
            try:
                kind, body = _read_worker_frame(rfile)
            except EOFError:
                break
            try:
                if kind == _WORKER_BATCH:
                    # One reply per payload, each as soon as it is done (see _Worker.run_tasks).
                    budget, payloads = _loads(body, (), "a batch of tasks")
                    began = time.perf_counter()
                    for i, payload in enumerate(payloads):
                        if i and budget is not None and time.perf_counter() - began >= budget:
                            _send_worker_frame(sock, _WORKER_STOP, b"")
                            break
                        try:
                            fn, items, kwargs = _loads(payload, (), "a chunk of tasks")
                            reply = _run_items(_task_function(fn), items, kwargs, where)
                        except Exception as e:
                            _send_worker_frame(sock, _WORKER_ERROR, _error_payload(e, where))
                        else:
                            _send_worker_frame(sock, _WORKER_REPLY, reply)
                    continue
                if kind == _WORKER_CALL:
                    name, attr, args, kwargs = _loads(body, (), "a call")
                    reply = _run_items(getattr(replicas[name], attr), [args], kwargs, where)
                elif kind == _WORKER_INSTALL:
                    name, service_pickle = _loads(body, (), "a pooled service")
                    service = replicas[name] = _loads(service_pickle, (), "the service %s" % name)
                    init = getattr(service, "init", None)
                    if callable(init):
                        credentials = Credentials(**config["credentials"])
                        init(B(Local(lease=config["lease"]), _credentials=credentials))
                    reply = b""
                else:
                    raise Error("a worker got a request of kind %r" % kind)
            except Exception as e:
                _send_worker_frame(sock, _WORKER_ERROR, _error_payload(e, where))
                continue
            _send_worker_frame(sock, _WORKER_REPLY, reply)
    except BaseException:
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


class Pooled:
    """A service replicated in the worker processes of each machine: see the module's "Many
    tasks" section. `Pooled(service)` has one replica per processor the machine offers
    (`procs` overrides that); each replica is a copy of service with its own state, and its
    `init(b)` runs in each. A call goes to a free replica (waiting for one if all are busy),
    so CPU-bound methods use every processor. Results are pickled (no streams)."""

    def __init__(self, service, procs=None):
        if isinstance(service, Pooled):
            raise ValueError("Pooled(Pooled(...)): a service is pooled once")
        if procs is not None and (not isinstance(procs, int) or procs < 1):
            raise ValueError("procs is a number of replicas, at least 1, not %r" % (procs,))
        self.service = service
        self.procs = procs
        self._pool = None
        self._name = None
        self._machine = None

    def __getstate__(self):
        return {"service": self.service, "procs": self.procs}

    def __setstate__(self, state):
        self.__init__(state["service"], state["procs"])

    def __repr__(self):
        return "Pooled(%r)" % (self.service,)

    def __dir__(self):
        return [n for n in _public_methods(self.service)]

    def _attach(self, machine, name):
        """Called on the machine as the service is registered, before `init`."""
        self._machine, self._name = machine, name

    def init(self, b):
        procs = self.procs or (self._machine.maxprocs if self._machine is not None else 1) or 1
        if procs <= 1 or self._machine is None:
            init = getattr(self.service, "init", None)
            if callable(init):
                init(b)
            return
        install = pickle.dumps((self._name, pickle.dumps(self.service, _PICKLE_PROTOCOL)),
                               _PICKLE_PROTOCOL)
        self._pool = pool = _WorkerPool(self._machine, install)
        self._machine.pools.append(pool)
        # Every replica now, and their init hooks, so that a failing init stops the machine
        # before it is RUNNING, as a plain service's does.
        workers = []
        try:
            for _ in range(procs):
                workers.append(pool.take(procs))
        finally:
            for worker in workers:
                pool.give(worker)
        self._procs = procs

    def __getattr__(self, attr):
        if attr.startswith("_") or attr == "init" or "service" not in self.__dict__:
            raise AttributeError(attr)
        target = getattr(self.service, attr)
        if not callable(target) or self._pool is None:
            return target

        def call(*args, **kwargs):
            body = pickle.dumps((self._name, attr, args, kwargs), _PICKLE_PROTOCOL)
            (ok, value), = pickle.loads(self._pool.request(self._procs, _WORKER_CALL, body))
            if ok:
                return value
            raise _rebuild_error(value)
        call.__name__ = attr
        return call


class _TaskFuture(_CallFuture):
    """A future of an Executor task: its repr names the task and the machine running it."""

    _task = "task"
    _machine_addr = None

    def __repr__(self):
        base = super().__repr__()[:-1]
        return "%s task=%s machine=%s>" % (base, self._task, self._machine_addr or "none yet")


class _Task:
    __slots__ = ("future", "payload", "method", "key", "count", "attempts", "started", "chunk")

    def __init__(self, future, payload, method, key, count, chunk):
        self.future, self.payload, self.method, self.key = future, payload, method, key
        self.count, self.chunk = count, chunk
        self.attempts = 0
        self.started = False


def _task_name(fn):
    if isinstance(fn, str):
        return fn
    name = getattr(fn, "__qualname__", None) or getattr(getattr(fn, "func", None), "__qualname__",
                                                          None) or type(fn).__qualname__
    return name


class Executor(concurrent.futures.Executor):
    """A `concurrent.futures.Executor` over a session's machines: see `B.executor`."""

    _TICK = 0.1                        # how often it looks for machines and redraws progress

    def __init__(self, b, machines=None, *, per_machine=None, retries=3, progress=None):
        if per_machine is not None and (not isinstance(per_machine, int) or per_machine < 1):
            raise ValueError("per_machine is a number of tasks at once, at least 1, not %r"
                             % (per_machine,))
        if not isinstance(retries, int) or retries < 0:
            raise ValueError("retries is a number of times, 0 or more, not %r" % (retries,))
        if machines is not None:
            machines = list(machines)
            for m in machines:
                if not isinstance(m, Machine):
                    raise TypeError("machines are Machine objects (from b.start), not %r" % (m,))
        self._b = b
        self._only = machines
        self.per_machine = per_machine
        self.retries = retries
        self._cond = threading.Condition()
        self._queue = collections.deque()
        self._lanes = {}                       # Machine -> lanes running for it
        self._lane_count = 0                   # lanes running, on all machines
        self._lane_room = 0                    # lanes the running machines may have
        self._machines = []                    # the RUNNING machines, as last seen
        self._running = {}                     # Machine -> tasks in flight on it
        self._took = {}                        # function -> seconds an input of it takes
        self.submitted = self.done = self.failed = self.retried = 0
        self._shutdown = False
        self._wake = threading.Event()         # wakes the watcher early: shutdown
        self._began = time.monotonic()
        if progress is None:
            progress = bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())
        self._progress = progress
        self._progress_drawn = None             # the line last drawn
        self._refresh()
        b._executors.add(self)
        self._thread = threading.Thread(target=self._watch, name="bigmachine-executor",
                                        daemon=True)
        self._thread.start()

    def __repr__(self):
        return "<Executor %d queued, %d running, %d done, %d failed on %d machines>" % (
            self.queued, sum(self._running.values()), self.done, self.failed,
            len(self._machines))

    @property
    def queued(self):
        """Tasks waiting on the driver for a machine."""
        return len(self._queue)

    def counts(self):
        """{queued, running, done, failed, retried, machines}: what the status page shows."""
        with self._cond:
            return {"queued": len(self._queue), "running": sum(self._running.values()),
                    "done": self.done, "failed": self.failed, "retried": self.retried,
                    "machines": len(self._machines)}

    # -- tasks --------------------------------------------------------------------------

    def _function(self, fn):
        """(method name or None, the function's pickle or None, its name)."""
        if isinstance(fn, str):
            service, dot, attr = fn.partition(".")
            if not dot or not service or not attr or "." in attr:
                raise ValueError("a task given by name is \"Service.method\", not %r" % (fn,))
            return fn, None, fn
        if not callable(fn):
            raise TypeError("a task is a callable or a \"Service.method\" string, not %r" % (fn,))
        name = _task_name(fn)
        try:
            blob = pickle.dumps(fn, _PICKLE_PROTOCOL)
        except Exception as e:
            message = _describe_pickling_failure(fn, "the task %s" % name, e)
            if "top level" not in message:    # it holds something that does not pickle
                message += ("; a task travels to the machines by pickle: use a function (or "
                            "class) defined at the top level of a module, with picklable "
                            "arguments bound to it")
            raise SerializationError(message) from e
        return None, blob, name

    def _enqueue(self, method, blob, name, items, kwargs, chunk):
        try:
            payload = pickle.dumps((blob, items, kwargs), _PICKLE_PROTOCOL)
        except Exception as e:
            raise SerializationError(_describe_pickling_failure(
                (tuple(items[0]) if len(items) == 1 else tuple(items), kwargs, None),
                "the arguments of %s" % name, e)) from e
        future = _TaskFuture()
        future._task = name
        future._inflight = _InFlight()         # what a cancel reaches (each attempt has one)
        task = _Task(future, payload, method, method or blob, len(items), chunk)
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.append(task)
            self.submitted += len(items)
            starts = self._lanes_to_start()
        for m in starts:
            _background(self._lane, m)
        return future

    def submit(self, fn, /, *args, **kwargs):
        """Run fn(*args, **kwargs) on some machine; fn is a picklable callable or a
        "Service.method" string. Returns a Future whose result is fn's."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        method, blob, name = self._function(fn)
        return self._enqueue(method, blob, name, [args], kwargs, False)

    def map(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None):
        """Like `ProcessPoolExecutor.map`: fn over the zipped iterables, results in order.
        Inputs are read lazily, at most buffersize ahead of the results consumed (default:
        sixteen chunks per slot of the machines, at least 32 chunks, and for short tasks
        enough for full batches, up to 8,192 inputs), so an endless iterable works;
        chunksize inputs travel in one call. With chunksize 1, inputs of a function
        measured to be quick are chunked all the same, about `_CHUNK_TIME` of work a chunk:
        the results and the exceptions are those of one input at a time."""
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize is a number of inputs, at least 1, not %r" % (chunksize,))
        if buffersize is not None and (not isinstance(buffersize, int) or buffersize < 1):
            raise ValueError("buffersize is a number of inputs, at least 1, not %r"
                             % (buffersize,))
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        method, blob, name = self._function(fn)
        end = None if timeout is None else time.monotonic() + timeout
        inputs = zip(*iterables)
        pending = collections.deque()           # (future, inputs) in input order
        state = {"exhausted": False, "read": 0, "ahead": 0}

        key = method or blob

        def limit():
            if buffersize is not None:
                return max(buffersize, 1)
            slots = sum(self._slots(m) for m in self._machines) or 1
            # Enough queued for each lane to take a full batch (see _take), up to a bound:
            # small tasks, which batch, are usually small inputs too.
            batched = min(2 * self._lane_room * (self._per_time(key, self._BATCH_TIME) or 1),
                          8192)
            return max(chunksize * max(32, 16 * slots), batched)

        def fill():
            most = limit()
            while not state["exhausted"] and state["ahead"] < most:
                size = chunksize
                if size == 1:
                    # Quick inputs, one by one, would cost the driver and the machine more
                    # than they take to run: they go a few milliseconds' worth at a time.
                    size = max(1, min(self._per_time(key, self._CHUNK_TIME) or 1, 1024,
                                      most - state["ahead"]))
                items = list(itertools.islice(inputs, size))
                if not items:
                    state["exhausted"] = True
                    return
                first = state["read"]
                state["read"] += len(items)
                state["ahead"] += len(items)
                label = "%s[%d]" % (name, first) if len(items) == 1 else \
                    "%s[%d:%d]" % (name, first, first + len(items))
                pending.append((self._enqueue(method, blob, label, items, {}, True),
                                len(items)))

        fill()

        def results():
            try:
                while pending:
                    future, count = pending[0]
                    left = None if end is None else end - time.monotonic()
                    outcomes = future.result(left)
                    pending.popleft()
                    state["ahead"] -= count
                    fill()
                    for ok, value in outcomes:
                        if not ok:
                            raise _rebuild_error(value)
                        yield value
                    del outcomes
            finally:
                for future, _ in pending:
                    future.cancel()
        return results()

    def shutdown(self, wait=True, *, cancel_futures=False):
        """As in `concurrent.futures`: no new tasks; cancel_futures cancels the queued ones;
        wait waits for the rest to finish."""
        self._wake.set()
        with self._cond:
            self._shutdown = True
            dropped = []
            if cancel_futures:
                dropped, self._queue = list(self._queue), collections.deque()
            self._cond.notify_all()
        for task in dropped:
            task.future.cancel()
        if wait:
            with self._cond:
                while self._queue or any(self._running.values()):
                    self._cond.wait(self._TICK)
            self._thread.join()

    # -- lanes --------------------------------------------------------------------------

    def _slots(self, m):
        return self.per_machine or m.maxprocs or 1

    def _lanes_to_start(self):
        """The machines to start a lane for now (the lock held)."""
        if self._lane_count >= self._lane_room:
            return ()                          # every machine has all its lanes
        starts, wanted = [], len(self._queue)
        for m in self._machines:
            if not wanted:
                break
            have = self._lanes.get(m, 0)
            room = self._slots(m) + 1 - have
            if room > 0 and m._state is RUNNING:
                n = min(room, wanted)
                self._lanes[m] = have + n
                self._lane_count += n
                starts.extend([m] * n)
                wanted -= n
        return starts

    _BATCH = 64                        # tasks at most in one call (see _take)
    # Seconds a call of a batch aims to take (see _take): each call costs both ends a few
    # hundred µs (a lane's wake-up, the GIL changing hands, two frames), which this spreads
    # thin, and a batch that proves slower comes back after twice this.
    _BATCH_TIME = 0.05
    _CHUNK_TIME = 0.005                # seconds of work in a chunk that map makes (see map)

    def _per_time(self, key, seconds):
        """How many inputs of a function (or "Service.method") run in about seconds, by the
        times measured so far; None until one was timed."""
        took = self._took.get(key)
        if took is None:
            return None
        return int(seconds / max(took, 1e-7))

    def _batch_size(self, key, count=1):
        """How many tasks of count inputs each one call may carry: as many as take
        `_BATCH_TIME`, and one until a task of the function was timed."""
        n = self._per_time(key, self._BATCH_TIME)
        return 1 if n is None else max(1, min(self._BATCH, n // max(1, count)))

    def _take(self, m):
        """The next tasks for a lane on m (the lock held): the head of the queue and, while
        the queue is long, the tasks behind it of the same function (or "Service.method"),
        up to one lane's fair share and to what runs in about `_BATCH_TIME`. Sent in one call,
        which the machine runs one after the other, they cost one round trip: small tasks
        given one by one then run nearly as fast as if the user had chunked them. Tasks that
        take long go one by one (a batch would run its tasks in one processor while another
        idles), as does the first of a function, which measures it; and the batches shrink to
        single tasks as the queue drains, so that the machines finish together."""
        queue = self._queue
        task = queue.popleft()
        batch = [task]
        share = min(self._batch_size(task.key, task.count),
                    len(queue) // max(1, self._lane_count))
        while len(batch) < share and queue and queue[0].key == task.key:
            batch.append(queue.popleft())
        self._running[m] = self._running.get(m, 0) + sum(t.count for t in batch)
        return batch

    def _lane(self, m):
        slots = self._slots(m)
        queue, cond = self._queue, self._cond
        while True:
            with cond:
                if not queue or m._state is not RUNNING:
                    self._lanes[m] -= 1
                    self._lane_count -= 1
                    if self._shutdown:
                        cond.notify_all()
                    return
                batch = self._take(m)
            count = sum(t.count for t in batch)
            try:
                self._run_batch(m, slots, batch)
            finally:
                with cond:
                    self._running[m] -= count
                    if self._shutdown:             # only shutdown(wait=True) waits for this
                        cond.notify_all()

    def _run_batch(self, m, slots, batch):
        """Make one call for a batch of tasks; settle their futures, or put them back."""
        live = []
        for task in batch:
            future = task.future
            if not task.started:
                if not future.set_running_or_notify_cancel():
                    continue
                task.started = True
            elif future.cancelled():
                continue
            live.append(task)
        if not live:
            return
        # One call, so one thing a cancel reaches: cancelling any task of the batch cancels
        # the call, and the others go back to the queue (below).
        inflight = _InFlight()
        for task in live:
            task.future._inflight = inflight
            task.future._machine_addr = m.addr
            if task.future.cancelled():
                inflight.cancel()
        first = live[0].future._task
        try:
            # A batch sized by a guess that proved wrong (the tasks of a function may take
            # longer now) comes back once it has run for a while, with the tasks it did not
            # start, which go back to the head of the queue.
            budget = 2 * self._BATCH_TIME if len(live) > 1 else None
            replies, ran = m._call("Supervisor.run_tasks", ([t.payload for t in live], slots,
                                                            live[0].method, budget), {}, None,
                                   inflight)
            # How long an input of this function takes to run on a machine (the waits for
            # a slot and the round trip not counted: they would make the batches of a busy
            # executor ever smaller), a moving average that follows longer times faster.
            took = ran / max(1, sum(t.count for t in live[:len(replies)]))
            key = live[0].key
            before = self._took.get(key)
            if before is None and len(self._took) >= 256:    # (keyed by pickles: bounded)
                self._took.clear()
            self._took[key] = took if before is None else \
                before + (took - before) / (2 if took > before else 4)
            left = live[len(replies):]
            live = live[:len(replies)]
            for t in left:                # not run: waiting again, as they were
                if t.future._requeue():
                    t.started = False
            if left:
                with self._cond:
                    self._queue.extendleft(reversed(left))
            outcomes = [_loads(reply, (), "the results of %s from %s" % (t.future._task, m.addr))
                        for t, reply in zip(live, replies)]
        except BaseException as e:
            if m._state is STOPPED and not isinstance(e, Error):
                # A machine stopped from this side (cancel) may break the call's
                # connection under its reader with something other than an Error.
                lost = m._stopped_error(first)
                lost.__context__ = e
                e = lost
            again = []
            for task in live:
                if task.future.cancelled():
                    continue
                if isinstance(e, Cancelled) and inflight.cancelled:
                    again.append(task)         # another task of its batch was cancelled
                elif not isinstance(e, (MachineStopped, NetworkError)):
                    self._finish(task, error=e)
                elif task.attempts < self.retries and not self._b._closed:
                    task.attempts += 1
                    log.info("%s: %s lost (%s); running it again elsewhere (retry %d of %d)",
                             m.addr, task.future._task, e, task.attempts, self.retries)
                    again.append(task)
                else:
                    self._finish(task, error=e)
            if again:
                with self._cond:
                    if isinstance(e, (MachineStopped, NetworkError)):
                        self.retried += len(again)
                    self._queue.extendleft(reversed(again))
            return
        for task, outcome in zip(live, outcomes):
            self._finish(task, outcomes=outcome)

    def _finish(self, task, outcomes=None, error=None):
        future = task.future
        if error is not None:
            failed = task.count
            future._settle(error=error)
        elif task.chunk:
            failed = sum(1 for ok, _ in outcomes if not ok)
            future._settle(outcomes)
        else:
            (ok, value), = outcomes
            failed = 0 if ok else 1
            if ok:
                future._settle(value)
            else:
                future._settle(error=_rebuild_error(value))
        with self._cond:
            self.done += task.count
            self.failed += failed

    # -- machines and progress ----------------------------------------------------------

    def _refresh(self):
        machines = self._only if self._only is not None else self._b.machines()
        running = [m for m in machines if m._state is RUNNING]
        with self._cond:
            self._machines = running
            self._lane_room = sum(self._slots(m) + 1 for m in running)

    def _watch(self):
        _block_async_signals()
        while True:
            if self._wake.wait(self._TICK):
                self._wake.clear()
            with self._cond:
                finished = (self._shutdown or self._b._closed) and not self._queue and \
                    not any(self._running.values())
            self._refresh()
            if self._b._closed:
                self._fail_queued(Error("the session was shut down"))
            elif self._only is not None and all(m._state is STOPPED for m in self._only):
                self._fail_queued(Error("every machine of this executor stopped"))
            with self._cond:
                starts = self._lanes_to_start() if self._queue else []
            for m in starts:
                _background(self._lane, m)
            if self._progress:
                self._draw(final=finished)
            if finished:
                self._b._executors.discard(self)
                return

    def _fail_queued(self, error):
        with self._cond:
            dropped, self._queue = list(self._queue), collections.deque()
        for task in dropped:
            if task.started or task.future.set_running_or_notify_cancel():
                self._finish(task, error=error)

    def progress_line(self):
        """The progress line: done/total, rate, failures, machines."""
        counts = self.counts()
        took = max(time.monotonic() - self._began, 1e-9)
        line = "bigmachine: %d/%d tasks done, %.0f/s, %d failed, %d running on %d machines" % (
            counts["done"], self.submitted, counts["done"] / took, counts["failed"],
            counts["running"], counts["machines"])
        if not counts["machines"] and counts["queued"]:
            line += ", waiting for machines"
        return line

    def _draw(self, final=False):
        line = self.progress_line()
        if final:
            if self._progress_drawn or self.submitted:
                _write_stderr("\r\x1b[K" + line + "\n")
        elif line != self._progress_drawn and self.submitted:
            _write_stderr("\r\x1b[K" + line)
            self._progress_drawn = line

    def __exit__(self, *exc):
        self.shutdown(wait=True)
        return False


# ======================================================================================
# Systems (Go: system.go, testsystem, local.go)
# ======================================================================================
#
# A System is where machines come from. `start` makes `Machine`s whose addresses are known at
# once (or provisional); `launch` (in each machine's boot thread) brings the machine's process
# up; `terminate` makes sure it is gone. Keepalive settings are the system's, with Go's defaults
# per system. Systems use public names only -- `b.issue_certificate`, `b.enrol`, `b.readdress`,
# `machine.report_status`, `machine.report_stopped` -- so that one can be written outside this
# file as well as in it (see `System` and the README's "Writing a system").

class System:
    """Base class of machine systems (Go's System interface). Every built-in system is written
    on the public interface below, so a system of your own can be too (README: "Writing a
    system").

    A system implements:
      name                     a short name ("slurm"); shown on the status page
      maxprocs()               the processors each of its machines offers
      start(b, n, env)         make up to n `Machine(b, addr, owned=True, maxprocs=...)` at once,
                               without waiting: addr may be provisional ("https://x-1:0/"); env
                               is the environment variables to set on the machines
      launch(b, machine)       bring the machine up; runs in the machine's own boot thread, so
                               it may block (a queue, a boot); returns once the machine serves
                               at its address, or raises to stop it with that error
      terminate(machine, deadline)  make sure it is gone by deadline (time.monotonic())
      shutdown()               release everything; machines were terminated already
    and may override init(b) (once per session), lost(machine) (is it known to be gone?),
    keepalive_failed(machine, error), `defaults` (keepalive period, timeout, rpc timeout,
    lease) and boot_timeout. It may use, and only needs:
      b.issue_certificate(...) credentials for a machine, or a certificate for the machine's
                               own key (the session CA's key never leaves the driver)
      b.enrol(machine, ...)    a one-time command that, run wherever the machine should be,
                               fetches the driver's code, gets the machine's certificate and
                               reports its address: for systems that only run commands
      b.readdress(machine, addr)  the machine's real address, once known
      b.credentials            the driver's own (to talk to a bootstrap over mutual TLS)
      machine.report_status(text)   what a starting machine waits for (status page)
      machine.report_stopped(err)   the machine is gone, and why
    On a machine, `b.system` is a System describing the one the machine belongs to: its name
    and maxprocs()."""

    name = "system"
    #: Go's defaults: (keepalive period, keepalive timeout, keepalive rpc timeout, lease).
    defaults = (60.0, 120.0, 10.0, 300.0)
    boot_timeout = 540.0            # Go: ping for up to 9 minutes
    #: A machine's output reaching the driver is bounded: at most output_burst lines at once,
    #: and output_rate lines a second in the long run; more is dropped, and counted.
    output_rate = 1000.0
    output_burst = 10000

    #: What travels to machines besides the code bundle (systems whose machines do not share
    #: the driver's disk): see "Packages" under Code bundles. Local machines ignore it.
    packages = "auto"
    packages_sent = 0               # bytes of package files sent to hosts that lacked them

    def __init__(self, *, keepalive_period=None, keepalive_timeout=None,
                 keepalive_rpc_timeout=None, lease=None, boot_timeout=None, packages="auto"):
        values = (keepalive_period, keepalive_timeout, keepalive_rpc_timeout, lease)
        for name, value in zip(("keepalive_period", "keepalive_timeout",
                                "keepalive_rpc_timeout", "lease"), values):
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise ValueError("%s must be a positive number of seconds, not %r"
                                 % (name, value))
        (self.keepalive_period, self.keepalive_timeout, self.keepalive_rpc_timeout,
         self.lease) = (float(d if v is None else v) for v, d in zip(values, self.defaults))
        if boot_timeout is not None:
            self.boot_timeout = float(boot_timeout)
        self.packages = _check_packages(packages)

    def __repr__(self):
        return "<%s system>" % self.name

    @property
    def watchdog_tick(self):
        """How often a machine's watchdog looks at its lease (Go: 30s)."""
        return min(30.0, self.lease / 4)

    def init(self, b):
        """Called once by the driver's B, before any machine starts."""

    def start(self, b, n, env):
        """Make up to n Machines (owned, addresses known); their processes start in launch."""
        raise NotImplementedError

    def launch(self, b, machine):
        """Bring machine's process up (runs in the machine's boot thread)."""
        raise NotImplementedError

    def terminate(self, machine, deadline):
        """Make sure machine's process is gone by deadline (a time.monotonic() value)."""

    def keepalive_failed(self, machine, error):
        """A keepalive attempt on machine failed (Go: KeepaliveFailed; EC2 looks deeper)."""

    def lost(self, machine):
        """Is machine known to be gone (its process exited, say), though not yet STOPPED?"""
        return False

    def maxprocs(self):
        """The processors each machine of this system offers."""
        return 1

    def _why_fewer(self, asked, started):
        """Why start(b, asked) made only started machines, for the warning that says so."""
        return "the %s system had room for no more" % self.name

    def shutdown(self):
        """Release the system's resources; machines were already terminated."""

    def _machine_view(self):
        """What a machine of this system is told about it: {"name", "maxprocs"} (maxprocs
        None: the machine's processors divided by "share"). See `_MachineSystem`."""
        return {"name": self.name, "maxprocs": self.maxprocs()}

    @classmethod
    def _command_line_options(cls, argv, environ):
        """Options for this system from --bigm.* flags in argv and BIGMACHINE_* variables in
        environ, for `start()` given the system by name (options given to start() win)."""
        return {}


class TestSystem(System):
    """Machines inside the driver's process, each with its own TLS server (Go: testsystem).

    Everything but the process boundary is real: certificates, connections, pickling of the
    services and of every call. `kill(machine)` ends a machine the way a crash would: its
    server and connections close, and calls fail with `NetworkError` until the keepalive gives
    up on it.

    For testing a framework's own fault handling: inject_failures=p makes each call to a
    user's service fail, before it is sent, with a temporary `NetworkError` with probability p
    (Go's rpc.InjectFailures); `wait(n)` waits until n machines have been started."""

    name = "test"

    def __init__(self, *, maxprocs=1, inject_failures=0.0, **keepalive):
        super().__init__(**keepalive)
        if isinstance(inject_failures, bool) or not isinstance(inject_failures, (int, float)) \
                or not 0 <= inject_failures <= 1:
            raise ValueError("inject_failures is a probability between 0 and 1, not %r"
                             % (inject_failures,))
        self.inject_failures = float(inject_failures)
        self._maxprocs = maxprocs
        self._lock = threading.Lock()
        self._live = {}                   # addr -> (Machine, _MachineProcess)
        self.exited = False               # a machine's watchdog (or shutdown) ended it
        self._launched = 0                # machines started so far, for wait()
        self._launches = threading.Condition(self._lock)

    def maxprocs(self):
        return self._maxprocs

    def start(self, b, n, env):
        return [self._new_machine(b) for _ in range(n)]

    def _new_machine(self, b):
        """A machine of this process: its server listens at once, and serves once launched."""
        credentials = b.issue_certificate("bigmachine test machine", ip_addresses=["127.0.0.1"])
        process = _MachineProcess(b, credentials, None, self.lease, self.watchdog_tick, exit=None)
        process._exit = functools.partial(self._exited, process)
        m = Machine(b, process.addr, owned=True, maxprocs=self._maxprocs)
        with self._lock:
            self._live[m.addr] = (m, process)
        return m

    def launch(self, b, machine):
        with self._lock:
            entry = self._live.get(machine.addr)
        if entry is None:
            raise Error("machine %s was killed before it started" % machine.addr)
        entry[1].start()
        with self._launches:
            self._launched += 1
            self._launches.notify_all()

    def wait(self, n: int, timeout: typing.Optional[float] = None) -> int:
        """Wait until n machines have been started (launched, whatever became of them since)
        or timeout seconds pass; returns how many have."""
        with self._launches:
            self._launches.wait_for(lambda: self._launched >= n, timeout)
            return self._launched

    def _exited(self, process, code):
        self.exited = True
        process.server.close()
        with self._lock:
            self._live.pop(process.addr, None)

    def machines(self):
        """The machines that are alive."""
        with self._lock:
            return [m for m, _ in self._live.values()]

    @property
    def n(self):
        with self._lock:
            return len(self._live)

    def kill(self, machine=None):
        """End machine (a random live one if None) as a crash would. Returns False if there
        was nothing to kill."""
        import random
        with self._lock:
            if machine is None:
                if not self._live:
                    return False
                machine = random.choice([m for m, _ in self._live.values()])
            entry = self._live.pop(machine.addr, None)
        if entry is None:
            return False
        entry[1].exited.set()
        entry[1].server.close()
        # A crashed process's threads are gone; here they would run on in the driver's process.
        entry[1].dispatcher.cancel_all("cancelled: the machine was killed")
        return True

    def terminate(self, machine, deadline):
        with self._lock:
            entry = self._live.pop(machine.addr, None)
        if entry is not None:
            entry[1].exit(0)

    def shutdown(self):
        for m in self.machines():
            self.terminate(m, 0)


class Local(System):
    """Each machine a separate Python process on this host (Go: local.go).

    The driver binds each machine's listening socket itself and hands it to the child, so the
    address is known at once and no other process can take the port in between. The child
    reads its bootstrap (its certificate and key, the session CA, how to load the driver's
    `__main__`) from a pipe on its standard input, loads the main module the way
    `multiprocessing`'s spawn method does (as `__mp_main__`), and serves. It runs in a session of
    its own, so the terminal's Ctrl-C reaches the driver only; the driver's bounded shutdown
    ends it. When the driver goes away its standard input reaches EOF and it exits at once; its
    watchdog would end it within the lease anyway. Its stdout and stderr go to the driver's
    stderr, each line prefixed with the machine's address, and its `logging` records, at the
    driver's level, to the driver's logging (see the Debug section); all of it is read to the
    end before the machine counts as terminated. Its exit is noticed at once. Machines are
    forked from a fork server that has started the interpreter and loaded this module once
    (see "the fork server" below), or, where that cannot be done, start as fresh
    interpreters."""

    name = "local"

    def __init__(self, *, python=None, maxprocs=1, **keepalive):
        super().__init__(**keepalive)
        self.python = python or sys.executable
        if not self.python:
            raise Error("cannot find the Python interpreter to run machines; pass "
                        "Local(python='/path/to/python3')")
        if not isinstance(maxprocs, int) or isinstance(maxprocs, bool) or maxprocs < 1:
            raise ValueError("Local(maxprocs=...) is the number of processors each machine "
                             "offers, a whole number of at least 1, not %r" % (maxprocs,))
        self._maxprocs = maxprocs
        self._lock = threading.Lock()
        self._procs = {}                # addr -> _LocalProcess
        self._sockets = {}              # addr -> listening socket, until launch hands it over

    def maxprocs(self):
        return self._maxprocs

    def init(self, b):
        # The fork server starts now, so that its interpreter boots while the driver goes on.
        _ForkServer.prepare(self.python, self._machine_environment({}))

    def _machine_environment(self, env):
        child_env = dict(os.environ)
        child_env.update(env)
        child_env["BIGMACHINE_MODE"] = "machine"
        child_env["BIGMACHINE_SYSTEM"] = self.name
        return child_env

    @classmethod
    def _command_line_options(cls, argv, environ):
        # --bigm.local.maxprocs=N: local machines that offer N processors each (their
        # Executor tasks and Pooled services then run in N worker processes).
        maxprocs = _flag_or_variable(argv, environ, "bigm.local.maxprocs",
                                     "BIGMACHINE_LOCAL_MAXPROCS")
        if maxprocs is None:
            return {}
        try:
            return {"maxprocs": int(maxprocs)}
        except ValueError:
            raise ValueError("--bigm.local.maxprocs (BIGMACHINE_LOCAL_MAXPROCS) is a whole "
                             "number of processors, not %r" % (maxprocs,)) from None

    def start(self, b, n, env):
        return [self._new_machine(b, env) for _ in range(n)]

    def _new_machine(self, b, env):
        """A machine whose listening socket is made here, so that its address is known before
        its process starts (the process is handed the socket)."""
        sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        m = Machine(b, "https://127.0.0.1:%d/" % sock.getsockname()[1], owned=True,
                    maxprocs=self._maxprocs)
        with self._lock:
            self._sockets[m.addr] = (sock, env)
        return m

    def launch(self, b, machine):
        with self._lock:
            sock, env = self._sockets.pop(machine.addr)
        try:
            credentials = b.issue_certificate("bigmachine local machine",
                                              ip_addresses=["127.0.0.1"], dns_names=["localhost"])
            process = _LocalProcess(self, b, machine, sock, credentials, env)
            with self._lock:
                self._procs[machine.addr] = process
            process.start()
        finally:
            sock.close()               # the child has its own copy now

    def lost(self, machine):
        # On loopback a broken connection almost always means the process is dying.
        process = self._procs.get(machine.addr)
        return process is not None and process.gone()

    def terminate(self, machine, deadline):
        with self._lock:
            entry = self._sockets.pop(machine.addr, None)
            process = self._procs.get(machine.addr)
        if entry is not None:
            entry[0].close()
        if process is not None:
            process.terminate(deadline)

    def shutdown(self):
        with self._lock:
            procs, self._procs = list(self._procs.values()), {}
            sockets, self._sockets = list(self._sockets.values()), {}
        for sock, _ in sockets:
            sock.close()
        for process in procs:
            process.terminate(time.monotonic() + 1.0)

    def bootstrap(self, b, machine, credentials, fd):
        """The JSON a machine process reads from its stdin before anything else."""
        return _machine_bootstrap(self, credentials, _main_preparation(), addr=machine.addr,
                                  fd=fd)


def _machine_bootstrap(system, credentials, main, **more):
    """What a machine process needs to know before anything else, as JSON, whichever system
    started it: see `_machine_main`. main says how to load the driver's __main__. credentials
    None leaves them out, for a system whose machines have them already (EC2: from user data)."""
    config = {
        "python": PYTHON,
        "protocol": PROTOCOL,
        "system": system._machine_view(),
        "lease": system.lease,
        "watchdog_tick": system.watchdog_tick,
        "log_level": logging.getLogger().getEffectiveLevel(),
        "main": main,
    }
    if credentials is not None:
        config["credentials"] = credentials._asdict()
    config.update(more)
    return config


_EXIT_VERSION_MISMATCH = 3


class _ChildProcess:
    """A child process of the driver that stands for one machine: the machine itself (Local),
    or the ssh client connected to it (SSHSystem). It runs in a session of its own, so that the
    terminal's Ctrl-C reaches the driver only. Its output reaches the driver's stderr line by
    line, prefixed with the machine's address, and the machine's logging records to the driver's
    logging, within the system's bounds (see `_MachineOutput`); its exit stops the machine with
    the reason and, when it exits early, its last lines of output."""

    _TAIL = 20                        # lines of output kept to explain an early exit

    def __init__(self, machine, args, forked=None, **popen):
        import subprocess
        self.machine = machine
        self.forked = forked is not None      # by the fork server (Local): not our child
        self.proc = forked or subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True, **popen)
        self.tail = collections.deque(maxlen=self._TAIL)
        system = machine._b.system
        self._output = _MachineOutput(system.output_rate, system.output_burst)
        self.expected_exit = False
        self._forwarders = []
        self._waiter = None               # the thread that reaps it and reports its end

    def prefix(self):
        """What the lines of its output are prefixed with."""
        return self.machine.addr + ": "

    def forward(self, readline, close):
        """Copy lines from readline() to the driver's stderr until it returns b"" (EOF)."""
        t = threading.Thread(target=self._forward, args=(readline, close),
                             name="bigmachine-output", daemon=True)
        self._forwarders.append(t)
        t.start()

    def _forward(self, readline, close):
        # Read to the end, whatever is dropped: a machine must never block on a full pipe.
        for line in iter(readline, b""):
            self.output(line)
        close()
        self._output.close(self.prefix())

    def output(self, line):
        self.tail.append(self._output.line(line, self.prefix(), self.machine.addr))

    def watch(self):
        """Stop the machine when the process exits."""
        self._waiter = threading.Thread(target=self._wait, name="bigmachine-wait", daemon=True)
        self._waiter.start()

    def _wait(self):
        cgroup = self.memory_cgroup_at_exit()
        if hasattr(os, "waitid") and not self.forked:   # (the fork server does this itself)
            # Wait without reaping first: until it is reaped its pid, which is also its process
            # group's id, cannot be taken by another process. Then end what is left of its
            # group, the processes its code started (see _end_descendants for the machine's
            # own way, which also finds those that left the group).
            with contextlib.suppress(OSError):
                os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait()
        for t in self._forwarders:
            t.join(2.0)                # print what it said before saying it stopped
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        why = code == -signal.SIGKILL and not self.expected_exit and _killed_for_memory(
            cgroup, self.machine._memory_seen)
        if why:
            err = _out_of_memory("machine %s (pid %d)" % (self.machine.addr, self.proc.pid), why)
        else:
            err = self.exit_error(code, _exit_reason(code), "".join(self.tail).rstrip())
        err.exit_code = code
        self.machine.report_stopped(err)

    def memory_cgroup_at_exit(self):
        """The memory cgroup the process dies in (for telling an OOM kill), or None: it waits
        for the exit without reaping the process, whose /proc entry then still says."""
        return None

    def exit_error(self, code, why, output):
        """The machine's err, for an exit of the process (code, described by why) that left
        output as its last lines."""
        if code == _EXIT_VERSION_MISMATCH and "VersionMismatch" in output:
            return VersionMismatch(output.splitlines()[-1].partition("VersionMismatch: ")[2])
        if self.expected_exit and code == 0:
            return Error("machine %s was shut down" % self.machine.addr)
        return Error("machine %s (pid %d) %s%s" % (
            self.machine.addr, self.proc.pid, why,
            "; its last output:\n" + output if output and self.machine.state < RUNNING else ""))

    def exited(self):
        """Has the child exited? Asked without reaping it (the waiter thread does that), so it
        can be asked while the waiter blocks in wait()."""
        if self.proc.returncode is not None:
            return True
        if self.forked:
            return False                  # the fork server reports the exit
        if not hasattr(os, "waitid"):
            return True          # cannot tell: let the caller wait for the waiter to say
        try:
            return os.waitid(os.P_PID, self.proc.pid,
                             os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def gone(self, grace=0.25):
        """Has the child exited, or does it within grace seconds? A dying process's sockets
        close a moment before it can be waited for, so a broken connection is worth a look."""
        deadline = time.monotonic() + grace
        while not self.exited():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def terminate(self, deadline):
        """End the process by deadline: it may have been asked to exit already; then its
        stdin is closed (it exits when its driver goes away); last, it is killed."""
        import subprocess
        self.expected_exit = True
        for step in ("wait", "eof", "kill"):
            if step == "eof":
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            elif step == "kill":
                with contextlib.suppress(OSError):
                    if self.forked:
                        self.proc.kill_group()
                    else:
                        os.killpg(self.proc.pid, signal.SIGKILL)
            left = deadline - time.monotonic()
            try:
                self.proc.wait(5.0 if step == "kill" else max(0.0, min(1.0, left) if step ==
                                                                "wait" else left))
                break
            except subprocess.TimeoutExpired:
                continue
        for t in self._forwarders:
            t.join(max(0.1, deadline - time.monotonic()))
        # The waiter reports how the machine stopped; a shutdown that went on before it did
        # would overwrite "was shut down" with its own, vaguer reason.
        if self._waiter is not None and self._waiter is not threading.current_thread():
            self._waiter.join(max(0.1, deadline - time.monotonic()))


def _exit_reason(code):
    """'exited with code 1', 'killed by signal SIGKILL': a Popen returncode in words."""
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return "killed by signal %s" % signal.Signals(-code).name
        except ValueError:
            return "killed by signal %d" % -code
    return "exited with code %d" % code


class _LocalProcess(_ChildProcess):
    """A Local machine's child process, as the driver sees it."""

    def __init__(self, system, b, machine, sock, credentials, env):
        fd = sock.fileno()
        child_env = system._machine_environment(env)
        forked = _ForkServer.fork(system.python, child_env, sock)
        if forked is not None:
            super().__init__(machine, None, forked=forked)
            fd = forked.listener_fd            # the socket's number in the machine
        else:
            here = os.path.dirname(os.path.abspath(__file__))
            code = _machine_code(here, "_machine_main()", _same_python(system.python))
            args = [system.python] + _interpreter_flags(system.python) + ["-u", "-c", code]
            super().__init__(machine, args, pass_fds=[fd], env=child_env)
        bootstrap = system.bootstrap(b, machine, credentials, fd)
        self._stdin_data = (json.dumps(bootstrap) + "\n").encode()

    def exit_error(self, code, why, output):
        if self.forked and self.proc.orphaned:
            why = ("was ended: the fork server it was forked from (pid %d) died, and nothing "
                   "else could tell its exit" % self.proc.server.proc.pid)
        return super().exit_error(code, why, output)

    def memory_cgroup_at_exit(self):
        if self.forked:
            self.proc.wait()                 # the fork server read it before reaping it
            return self.proc.cgroup
        try:
            os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)
        except (OSError, AttributeError):         # reaped already, or not Linux
            return None
        return _memory_cgroup(self.proc.pid)

    def start(self):
        for pipe in (self.proc.stdout, self.proc.stderr):
            self.forward(functools.partial(pipe.readline, 1 << 16), pipe.close)
        try:
            self.proc.stdin.write(self._stdin_data)
            self.proc.stdin.flush()
        except OSError:
            pass                       # the child died already: the waiter will say why
        self.watch()


# A machine process loads this module before anything else, and Python compiles it first
# unless it finds bytecode it wrote before: where the user's environment forbids writing it
# (PYTHONDONTWRITEBYTECODE=1, a read-only tree), every machine compiled the whole module
# again, which took longer than the rest of its startup. So the driver keeps the module's
# compiled code (marshal) in a cache of the library's own, in this user's private directory
# (`_bundle_root`: <tmp>/bigmachine-<uid>, never the user's tree or HOME), keyed by the
# hash of the source and the interpreter's bytecode tag, and a Local machine on the same
# interpreter loads it from there. Writers race harmlessly: each writes a file of its own
# and renames it into place, whole. Where nothing can be written, or the file cannot be
# read, machines import the module the ordinary way.
_compiled_lock = threading.Lock()
_compiled_path = []               # [path or None], once known
_COMPILED_KEPT = 7 * 86400        # seconds an unused compiled copy is kept


def _same_python(python):
    return os.path.realpath(python) == os.path.realpath(sys.executable or "")


def _compiled_module():
    """The path of this module's compiled code in the library's cache, made if need be; None
    when it cannot be had (no source, nowhere to write)."""
    with _compiled_lock:
        if _compiled_path and (_compiled_path[0] is None or os.path.exists(_compiled_path[0])):
            return _compiled_path[0]
        try:
            path = _write_compiled_module()
        except (OSError, ValueError, SyntaxError) as e:
            log.debug("no compiled copy of bigmachine.py for machines: %s", e)
            path = None
        _compiled_path[:] = [path]
        return path


def _write_compiled_module():
    import hashlib
    import importlib.util
    import marshal
    source_path = os.path.abspath(__file__)
    if not source_path.endswith(".py"):
        return None
    with open(source_path, "rb") as f:
        source = f.read()
    tag = sys.implementation.cache_tag or "python"
    key = "%s-%s-O%d" % (hashlib.sha256(source + importlib.util.MAGIC_NUMBER).hexdigest()[:40],
                         tag, sys.flags.optimize)
    directory = os.path.join(_bundle_root(), "compiled")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, key + ".marshal")
    # Each version of the module leaves its file: those no driver has used for a week go.
    # (One that goes while a driver uses it is written again at its next launch; a machine
    # that finds it gone imports the module the ordinary way.)
    for name in os.listdir(directory):
        old = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            if old != path and time.time() - os.stat(old).st_mtime > _COMPILED_KEPT:
                os.unlink(old)
    if os.path.exists(path):
        os.utime(path)                # in use
        return path
    code = compile(source, source_path, "exec", dont_inherit=True,
                   optimize=sys.flags.optimize)
    partial = "%s.%d.%d.part" % (path, os.getpid(), threading.get_ident())
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            marshal.dump(code, f)
        os.replace(partial, path)     # whole or not at all, even with drivers racing
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    return path


# The first thing a Local machine runs (python -c): bigmachine from its compiled code when
# that loads, else imported the ordinary way; then the machine's life.
_LOAD_COMPILED = """\
import sys; sys.path.insert(0, %r)
def _load(compiled, source):
    import importlib.util, marshal
    try:
        with open(compiled, "rb") as f:
            code = marshal.loads(f.read())   # load(f) reads it in small pieces
    except Exception:
        return
    spec = importlib.util.spec_from_file_location("bigmachine", source)
    spec.cached = compiled              # the module's __cached__: where its code came from
    module = importlib.util.module_from_spec(spec)
    sys.modules["bigmachine"] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        del sys.modules["bigmachine"]
        raise
_load(%r, %r)
import bigmachine; bigmachine.%s
"""


def _machine_code(here, entry, compiled=True):
    """The program (python -c) of a Local machine or of the fork server: load bigmachine,
    from the library's compiled copy where there is one, and run bigmachine.<entry>."""
    path = _compiled_module() if compiled else None
    if path is None:
        return "import sys; sys.path.insert(0, %r); import bigmachine; bigmachine.%s" % (
            here, entry)
    return _LOAD_COMPILED % (here, path, os.path.abspath(__file__), entry)


# -- the fork server --------------------------------------------------------------------
#
# Most of a Local machine's start-up is the same in every machine: an interpreter starts
# (with whatever the site's .pth files import) and loads this module. So the driver starts
# one process that does that once, the fork server, and asks it for each machine: it forks,
# and the child becomes the machine, as a fresh process would have: a session of its own,
# the pipes the driver made as its stdin, stdout and stderr, the driver's working directory
# at the launch, and then the same `_machine_main`. N machines cost one interpreter start
# plus N forks. The fork server stays single-threaded (it only selects, forks and reaps), so
# a fork copies no lock held by another thread. It is started with the session
# (`Local.init`), so that it boots while the driver goes on, and kept for the driver's life.
#
# What a fork cannot give a machine is what a process fixes as it starts: its environment
# (the one /proc shows, and the PYTHON* variables the interpreter read), the interpreter's
# flags, resource limits, the umask. A fork server is started with exactly the machines'
# environment and is keyed by all of these: machines started with another `env` get a fork
# server of their own (a few at most; idle ones are retired for new ones, and past that
# machines start fresh). A Python other than the driver's, a system without fork and
# SCM_RIGHTS, any failure to reach the fork server, or BIGMACHINE_FORK_SERVER=0 start a
# fresh interpreter as before. (`ps` shows a forked machine with its fork server's
# command line.)
#
# Requests come over a Unix socket pair, never in process arguments: the descriptors (the
# machine's pipes and its listening socket) travel with SCM_RIGHTS. The fork server is the
# machines' parent, so it waits for them: it ends what is left of a machine's process group
# before it reaps the machine (as `_ChildProcess._wait` does) and reports the exit status,
# and the memory cgroup the machine died in, to the driver; the driver asks it to kill a
# machine's group rather than signal a pid the fork server may have reaped. When the driver
# goes away the socket reaches EOF and the fork server exits; the machines' stdin reaches
# EOF too, and they exit as they always do. A fork server that dies leaves machines whose
# exit nobody can report: the driver ends them, saying why.

_FORK_SERVER_SETTING = "BIGMACHINE_FORK_SERVER"


def _start_settings(python, env):
    """What a new process fixes as it starts, for env and python: the fork server's key."""
    import resource
    limits = []
    for name in sorted(n for n in dir(resource) if n.startswith("RLIMIT_")):
        with contextlib.suppress(OSError, ValueError):
            limits.append((name, resource.getrlimit(getattr(resource, name))))
    umask = None
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            umask = [line for line in f if line.startswith("Umask:")]
    return (os.path.realpath(python), tuple(_interpreter_flags(python)),
            tuple(sorted(env.items())),
            tuple(limits), tuple(umask or ()))


def _send_message(sock, message, fds=()):
    import array
    data = json.dumps(message).encode()
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def _receive_message(sock, nfds=0):
    """One message from the socket pair: (message, descriptors); (None, []) at EOF."""
    import array
    data, ancillary, _flags, _addr = sock.recvmsg(1 << 22, socket.CMSG_SPACE(4 * nfds)
                                                   if nfds else 0)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), list(fds)


class _ForkedProcess:
    """A machine the fork server forked, as the driver sees it: the part of Popen's interface
    that `_ChildProcess` uses, its exit as the fork server reported it."""

    def __init__(self, server, pid, stdin, stdout, stderr):
        self.server, self.pid, self.args = server, pid, "machine %d" % pid
        self.stdin = os.fdopen(stdin, "wb")
        self.stdout = os.fdopen(stdout, "rb")
        self.stderr = os.fdopen(stderr, "rb")
        self.returncode = self.cgroup = None
        self.orphaned = False             # ended by the driver because its fork server died
        self._exited = threading.Event()

    def exited(self, code, cgroup):
        self.returncode, self.cgroup = code, cgroup
        self._exited.set()

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        if not self._exited.wait(timeout):
            import subprocess
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def kill_group(self):
        """SIGKILL its process group, unless the fork server has reaped it already."""
        self.server.kill(self.pid)


class _ForkServer:
    """A fork server of the driver's (see above), for machines with one environment: started
    for the first Local launch that can use it, then kept for the driver's life."""

    _lock = threading.Lock()
    _servers = {}                 # start settings -> _ForkServer
    _MAX_SERVERS = 4              # a driver starting machines with more environments than
                                  # this retires idle ones, or starts fresh interpreters

    @classmethod
    def prepare(cls, python, env):
        """The fork server for machines of python with env, started if need be; or None."""
        if (os.environ.get(_FORK_SERVER_SETTING, "1") == "0" or not hasattr(os, "fork")
                or not hasattr(os, "waitid") or not hasattr(socket, "SOCK_SEQPACKET")
                or not hasattr(socket, "SCM_RIGHTS") or not _same_python(python)):
            return None
        key = _start_settings(python, env)
        with cls._lock:
            server = cls._servers.get(key)
            if server is not None and not server.closed:
                return server
            for old_key, old in list(cls._servers.items()):
                if old.closed:
                    del cls._servers[old_key]
            if len(cls._servers) >= cls._MAX_SERVERS:
                idle = [k for k, old in cls._servers.items() if old.idle()]
                if not idle:
                    return None
                cls._servers.pop(idle[0]).close()
            try:
                server = cls._servers[key] = cls(python, env, key)
            except (OSError, ValueError) as e:
                log.debug("no fork server: %s", e)
                return None
        return server

    @classmethod
    def _forget(cls):
        """In the child of a fork of the driver: the fork servers are the parent's."""
        cls._lock = threading.Lock()
        cls._servers = {}

    @classmethod
    def pids(cls):
        """The process ids of the fork servers running now."""
        with cls._lock:
            return [server.proc.pid for server in cls._servers.values() if not server.closed]

    @classmethod
    def fork(cls, python, env, listener):
        """A _ForkedProcess running a machine with env, serving listener; or None: start a
        fresh interpreter."""
        server = cls.prepare(python, env)
        if server is None:
            return None
        try:
            return server.request(listener)
        except (OSError, ValueError, EOFError) as e:
            log.debug("the fork server failed (%s); starting the machine afresh", e)
            return None

    def __init__(self, python, env, key):
        import subprocess
        self.key, self.closed = key, False
        here = os.path.dirname(os.path.abspath(__file__))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            code = _machine_code(here, "_fork_server_main(%d)" % theirs.fileno())
            self.proc = subprocess.Popen(
                [python] + _interpreter_flags(python) + ["-u", "-c", code],
                stdin=subprocess.DEVNULL, pass_fds=[theirs.fileno()], env=env,
                start_new_session=True, close_fds=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock, self.owner = ours, os.getpid()
        self._request_lock = threading.Lock()   # one fork at a time: replies come in order
        self._exits_lock = threading.Lock()
        self._forked = {}                        # pid -> _ForkedProcess
        self._early = {}                         # pid -> exit, reported before registered
        self._started = queue.Queue()            # the fork server's answers to requests
        threading.Thread(target=self._read, name="bigmachine-fork-server", daemon=True).start()

    def request(self, listener):
        pipes = [os.pipe() for _ in range(3)]
        ours = [pipes[0][1], pipes[1][0], pipes[2][0]]
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1], listener.fileno()]
        try:
            with self._request_lock:
                if self.closed:
                    raise EOFError("the fork server has exited")
                _send_message(self.sock, {"cwd": os.getcwd()},
                              theirs)
                answer = self._started.get()
                if answer is None:
                    raise EOFError("the fork server has exited")
                process = _ForkedProcess(self, answer["pid"], *ours)
                with self._exits_lock:
                    self._forked[process.pid] = process
                    early = self._early.pop(process.pid, None)
                if early is not None:             # it exited already (a chdir failed, say)
                    process.exited(*early)
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs[:3]:
                os.close(fd)
        process.listener_fd = answer["fd"]
        return process

    def idle(self):
        with self._exits_lock:
            return not self._forked

    def close(self):
        """Let the fork server go (it has no machines): it exits when its socket closes."""
        with self._request_lock:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def kill(self, pid):
        with self._request_lock:
            if not self.closed and pid in self._forked:
                with contextlib.suppress(OSError):
                    _send_message(self.sock, {"kill": pid})

    def _read(self):
        _block_async_signals()
        while True:
            try:
                message, _ = _receive_message(self.sock)
            except (OSError, ValueError):
                message = None
            if message is None:
                break
            if "exit" in message:
                with self._exits_lock:
                    process = self._forked.pop(message["exit"], None)
                    if process is None:
                        self._early[message["exit"]] = (message["code"], message["cgroup"])
                if process is not None:
                    process.exited(message["code"], message["cgroup"])
            else:
                self._started.put(message)
        # The fork server is gone (killed: it exits only when the driver does). Its machines
        # lose the parent that would report their exit: they are ended, and say why.
        self.closed = True
        self._started.put(None)
        with self._exits_lock:
            orphans, self._forked = list(self._forked.values()), {}
        for process in orphans:
            with contextlib.suppress(OSError):
                os.killpg(process.pid, signal.SIGKILL)
            process.orphaned = True
            process.exited(-signal.SIGKILL, None)
        self.sock.close()
        with contextlib.suppress(Exception):
            self.proc.wait(5.0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ForkServer._forget)


def _fork_server_main(fd):
    """The life of the fork server: fork a machine for each request on the socket fd, report
    each one's exit there, and exit when the driver closes it."""
    if hasattr(signal, "pthread_sigmask"):
        # Started from a library thread perhaps, which blocks the signals a program handles:
        # the mask is inherited, and the machines forked from here must die of SIGTERM.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _ASYNC_SIGNALS)
    sock = socket.socket(fileno=fd)
    _prepare_for_machines()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    forked = set()
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 1 << 12)
            _reap_forked(sock, forked)
        if sock not in readable:
            continue
        request, fds = _receive_message(sock, 4)
        if request is None:
            os._exit(0)
        if "kill" in request:
            if request["kill"] in forked:
                with contextlib.suppress(OSError):
                    os.killpg(request["kill"], signal.SIGKILL)
            continue
        pid = os.fork()
        if pid == 0:
            try:
                _forked_machine(sock, (wake_r, wake_w), fds, request)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        forked.add(pid)
        for f in fds:
            os.close(f)
        _send_message(sock, {"pid": pid, "fd": fds[3]})


def _prepare_for_machines():
    """Do once, before any fork, what every machine would do alike after it: import what it
    imports as it starts (to load the driver's main, to run subprocesses) and find OpenSSL
    for the read-ahead of its connections."""
    import multiprocessing.spawn   # noqa: F401
    import subprocess              # noqa: F401
    with contextlib.suppress(Exception):
        _read_ahead(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))


def _reap_forked(sock, forked):
    """Report the machines that exited, each once its process group is ended (see
    `_ChildProcess._wait`: until it is reaped its pid, the group's id, is not reused)."""
    for pid in list(forked):
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                continue
        except ChildProcessError:
            forked.discard(pid)
            continue
        cgroup = _memory_cgroup(pid)
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        forked.discard(pid)
        if os.WIFSIGNALED(status):
            code = -os.WTERMSIG(status)
        else:
            code = os.WEXITSTATUS(status)
        _send_message(sock, {"exit": pid, "code": code, "cgroup": cgroup})


def _forked_machine(sock, wakeup, fds, request):
    """In the child the fork server forked: become the machine a fresh process would be."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sock.close()
    for fd in wakeup:
        os.close(fd)
    os.setsid()
    for fd, standard in zip(fds[:3], (0, 1, 2)):
        os.dup2(fd, standard)
        os.close(fd)
    os.chdir(request["cwd"])
    _machine_main()


_stderr_lock = threading.Lock()


def _write_stderr(text):
    with _stderr_lock:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass


def _interpreter_flags(python):
    """The interpreter flags (-I, -W..., -X...) of this process, for a child on the same
    interpreter."""
    import subprocess
    if os.path.realpath(python) != os.path.realpath(sys.executable or ""):
        return ["-I"] if sys.flags.isolated else []
    return subprocess._args_from_interpreter_flags()


def _main_preparation():
    """How a machine loads the driver's __main__: multiprocessing's spawn preparation data,
    without the parts that would change this process (it fixes no start method)."""
    import multiprocessing.process
    main = sys.modules.get("__main__")
    data = {"sys_path": [p or multiprocessing.process.ORIGINAL_DIR for p in sys.path],
            "sys_argv": sys.argv, "dir": os.getcwd(),
            "orig_dir": multiprocessing.process.ORIGINAL_DIR}
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        data["init_main_from_name"] = name
    elif _main_file() is not None:
        data["init_main_from_path"] = _main_file()
    # Otherwise (an interactive session, a program read from standard input) there is no main
    # module for machines to load; B.start refuses services whose classes live in it.
    return data


def _main_file():
    """The file of the driver's __main__ module, if it was run from one that exists."""
    import multiprocessing.process
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if path is None:
        return None
    if not os.path.isabs(path) and multiprocessing.process.ORIGINAL_DIR is not None:
        path = os.path.join(multiprocessing.process.ORIGINAL_DIR, path)
    path = os.path.normpath(path)
    return path if os.path.isfile(path) else None


def _machine_main(bootstrap=None, **here):
    """The life of a machine process, whichever system started it; never returns.

    Its bootstrap (see `_machine_bootstrap`) is the dict bootstrap, or by default the first line
    of its standard input, as JSON: its credentials, lease, how to load the driver's __main__,
    and where to serve: on the socket the driver bound (`fd`, Local) or on one of its own
    (`bind`, `port`), whose port it then `announce`s on stdout, at `addr` (whose path, if any,
    prefixes its URLs), else at https://`host`:port/. `env` adds environment variables. Unless
    `watch_stdin` is false, EOF on stdin means the driver went away and ends the machine. here
    adds what only the machine knows: `code`, the directory where the driver's code bundle was
    unpacked (then main is relocated into it), and `workdir`, the machine's private directory,
    which goes when the machine does."""
    workdir = here.get("workdir")
    _lead_process_group()
    try:
        config = bootstrap if bootstrap is not None else json.loads(
            sys.stdin.buffer.readline() or b"null")
        if not isinstance(config, dict):
            sys.stderr.write("bigmachine: this process is a machine: it expects its bootstrap "
                             "from the driver on its standard input\n")
            code = 2
        elif config["python"] != PYTHON or config["protocol"] != PROTOCOL:
            sys.stderr.write(
                "bigmachine: VersionMismatch: the driver runs Python %s (protocol %s); machine %s "
                "runs Python %s (protocol %d, %s)\n" % (
                    config["python"], config["protocol"], config.get("addr") or "here", PYTHON,
                    PROTOCOL, sys.executable))
            code = _EXIT_VERSION_MISMATCH
        else:
            config.update(here)
            try:
                code = _run_machine(config)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except _UnguardedMain as e:
                # Said once, without the traceback through multiprocessing's loader: the
                # driver shows the machine's last lines of output as the reason it stopped.
                sys.stderr.write("bigmachine: %s\n" % e)
                code = 1
            except BaseException:
                # The driver's main failed to load, say. Exit here, with the traceback said:
                # ending the interpreter normally would abort on the thread reading stdin.
                traceback.print_exc()
                code = 1
        with contextlib.suppress(Exception):
            logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    finally:
        with contextlib.suppress(Exception):
            _end_descendants()
        if workdir:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)
    os._exit(code)


# A machine's processes end with it: whatever its services started (a subprocess, a fork that
# would keep the machine's port open), on every system, whichever way the machine ends short
# of being killed (and then Local's driver ends its process group). The machine leads a
# process group of its own, which the processes it starts are in unless they leave it, and
# when it ends it kills its descendants (found by their parents, so also those that left the
# group) and the rest of its group (so also orphans, whose parents are gone). It is not made
# a "child subreaper", which would find even orphans that left the group: it would also have
# to reap every orphan that exits while it runs, and a reaper that waits for any child takes
# the exit statuses that the services' own subprocess objects wait for.

def _lead_process_group():
    with contextlib.suppress(OSError, AttributeError):
        if os.getpgrp() != os.getpid():     # a Local machine leads a session already
            os.setpgid(0, 0)


def _descendants(pid):
    """The live processes descended from pid, and those in its process group if it leads
    one, from /proc (nothing where there is none)."""
    parents, group = {}, []
    try:
        entries = os.listdir("/proc")
        leader = os.getpgrp() == pid
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit() and int(entry) != pid:
            try:
                with open("/proc/%s/stat" % entry, "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != b"Z":
                parents.setdefault(int(fields[1]), []).append(int(entry))
                if leader and int(fields[2]) == pid:
                    group.append(int(entry))
    found, todo = set(group), [pid]
    while todo:
        for child in parents.get(todo.pop(), ()):
            found.add(child)
            todo.append(child)
    return sorted(found)


def _end_descendants(grace=5.0):
    """Kill every process descended from this one, and reap those that are its children."""
    me = os.getpid()
    deadline = time.monotonic() + grace
    while True:
        pids = _descendants(me)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        while True:                       # reap: a killed child is a zombie until then
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if not pids or time.monotonic() > deadline:
            return
        time.sleep(0.005)


def _run_machine(config):
    """Serve as a machine until it exits; returns the exit code."""
    workdir = config.get("workdir")
    if workdir:
        # Temporary files of the machine's code go where the machine's files go.
        import tempfile
        os.environ["TMPDIR"] = tempfile.tempdir = workdir
    os.environ.update(config.get("env") or {})
    _raise_file_limit()
    _forward_logging(config["log_level"])
    credentials = Credentials(**config["credentials"])
    system = _MachineSystem(config.get("system") or {}, lease=config["lease"])
    b = B(system, _credentials=credentials)
    if config.get("fd") is not None:
        sock = socket.socket(fileno=config["fd"])
    else:
        sock = _listen(config.get("bind"), config.get("port") or 0)
    port = sock.getsockname()[1]
    addr = config.get("addr") or "https://%s:%d/" % (
        _url_host(config.get("host") or socket.gethostname()), port)
    exit_code = []
    process = _MachineProcess(b, credentials, addr, config["lease"], config["watchdog_tick"],
                              exit_code.append, sock=sock, prefix=_parse_addr(addr)[2])
    if config.get("announce"):
        _announce("listening", port)
    if config.get("watch_stdin", True):
        threading.Thread(target=_watch_stdin, args=(process,), name="bigmachine-stdin",
                         daemon=True).start()
    threading.Thread(target=process.supervisor._watch, name="bigmachine-watchdog",
                     daemon=True).start()
    preparation = config["main"]
    if config.get("code") and preparation.get("packages"):
        # The driver sends the packages its main may import over the machine's own server,
        # which therefore serves before main is loaded: see Packages.
        stage = process.package_stage = _PackageStage(
            os.path.dirname(workdir) if workdir else _bundle_root(), preparation["packages"])
        process.server.start()
        if config.get("announce_serving"):
            _announce("serving")
        packages = stage.await_packages(process.exited)
        if packages is None:
            process.exited.wait()
            return exit_code[0] if exit_code else 0
        # A main that fails to load ends the machine as it would without packages: its
        # traceback is the last output the driver shows.
        _load_main(_bundle_preparation(preparation, config["code"], workdir, packages))
        stage.loaded()
        process.exited.wait()
        return exit_code[0] if exit_code else 0
    if config.get("code"):
        preparation = _bundle_preparation(preparation, config["code"], workdir,
                                          config.get("packages_path"))
    process.main_preparation = preparation
    _load_main(preparation)
    process.server.start()
    if config.get("announce_serving"):
        _announce("serving")
    process.exited.wait()
    return exit_code[0] if exit_code else 0


class _MachineSystem(System):
    """What a machine knows of the system it belongs to (its b.system): the name and the
    processors each machine offers, which the driver's system told it (`System._machine_view`),
    or, for a system that cannot know them in advance (SSH), this host's processors divided
    among the machines it may run ("share"). Its keepalive settings are what its own dials use."""

    def __init__(self, view, **keepalive):
        super().__init__(**keepalive)
        self.name = str(view.get("name") or "local")
        given = view.get("maxprocs")
        self._maxprocs = given if isinstance(given, int) and given > 0 else max(
            1, (os.cpu_count() or 1) // max(1, int(view.get("share") or 1)))

    def maxprocs(self):
        return self._maxprocs


def _listen(host, port):
    """A listening socket of the machine's own. host None means the address of this host that
    the SSH connection which started the process came in on (so that the machine is reachable
    where its host was, and nowhere else), else every interface."""
    if host is None:
        host = (os.environ.get("SSH_CONNECTION") or "").split()[2:3]
        host = host[0] if host else ""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=512)


def _url_host(host):
    """host as the host part of a URL: IPv6 addresses go in brackets."""
    return "[%s]" % host if ":" in host and not host.startswith("[") else host


# A line on a machine's stdout that starts with this mark is for its driver, not its log.
_MARK = "@bigmachine@"


def _announce(*words):
    sys.stdout.flush()
    sys.stdout.buffer.write((" ".join([_MARK] + [str(w) for w in words]) + "\n").encode())
    sys.stdout.buffer.flush()


def _load_main(preparation):
    global _machine_bootstrapping
    import multiprocessing.spawn
    _machine_bootstrapping = True
    try:
        multiprocessing.spawn.prepare(preparation)
    finally:
        _machine_bootstrapping = False


def _watch_stdin(process):
    """The driver holds our stdin open for as long as it lives: EOF means it went away."""
    while sys.stdin.buffer.read(65536):
        pass
    if not process.exited.is_set():
        log.info("the driver went away (its pipe closed); exiting")
        process.exit(1)


# --------------------------------------------------------------------------------------
# Code bundles: the driver's code, for machines that do not share its disk
# --------------------------------------------------------------------------------------
#
# A Local machine reads the driver's code where the driver does. A machine on another host
# (SSH, EC2) gets it as a *bundle*: one zip file holding bigmachine.py, the driver's main
# module, and the modules of the program's own code that the driver has imported -- whole
# packages, so that a submodule imported only on machines is there too -- but not the standard
# library, site- or dist-packages, or the virtual environment: those the host has (or lacks)
# itself, as it has its own Python. The zip is built the same way every time from the same
# files (sorted, with fixed dates), and named by its SHA-256: a host keeps the bundles it has
# received in <tmp>/bigmachine-<uid>/bundles/<sha256>.zip, in a directory only its user may
# enter, and a driver whose bundle a host has already is not asked to send it again. A cached
# bundle is hashed again before each use, so a damaged or tampered one is fetched anew.
#
# The machine unpacks the bundle in a directory of its own, <tmp>/bigmachine-<uid>/machine-
# <pid>-*/code, puts that first on sys.path and loads the driver's __main__ from it the way
# Local does (multiprocessing's spawn preparation, relocated by `_bundle_preparation`). The
# directory is the machine's working and temporary directory too, and it is removed when the
# machine exits; one left by a machine that was killed outright is removed by the next machine
# to start on that host.
#
# How the bundle travels is the system's business; these functions are shared by all. The
# host-side ones (`_bundle_root`, `_bundle_install`, `_bundle_unpack`, `_machine_workdir`)
# run before bigmachine.py is on the host, so each is self-contained -- standard library
# imports inside, no module globals -- and a system ships their source (inspect.getsource):
# SSH sends it over the ssh channel, EC2 can put it in user data and fetch the bundle over
# mutual TLS.

def _shipped_source(group, packed=False):
    """The source text of a group of `_SHIPPED_AS_SOURCE`, which a host runs before it has
    bigmachine.py; packed: zlib-compressed and in base64 (lines of it), for where room is short."""
    text = _shipped_sources.get((group, packed))
    if text is None:
        if packed:
            import zlib
            text = base64.encodebytes(zlib.compress(_shipped_source(group).encode(), 9)).decode()
        else:
            import inspect
            text = "".join(inspect.getsource(globals()[name]) + "\n"
                           for name in _SHIPPED_AS_SOURCE[group])
        _shipped_sources[group, packed] = text
    return text


class _Bundle(typing.NamedTuple):
    """The driver's code as one zip file: see `_make_bundle`."""

    data: bytes                       # the zip file
    sha256: str                       # its hash (hex): its name in a host's cache
    main: dict                        # how to load __main__: see `_bundle_preparation`
    library: str                      # the name the machine imports bigmachine by
    files: typing.Dict[str, str]      # archive name -> the file it holds
    packages: typing.Optional["_Packages"] = None    # what else travels: see Packages


def _make_bundle(packages="auto"):
    """Bundle the driver's code: bigmachine.py, the main module, and the modules of the
    program's own code that it has imported (their whole top-level regular package, if any).
    packages (a system's `packages`) says what else travels with it: see Packages."""
    import hashlib
    wanted = packages
    shared = _shared_code_dirs()
    library = __name__
    files = {library.replace(".", "/") + ".py": os.path.abspath(__file__)}
    packages = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name not in ("__main__", "__mp_main__", library) and isinstance(path, str) and \
                not _is_shared_code(path, shared):
            _bundle_module(files, packages, name, path)
    main = {"sys_argv": list(sys.argv)}
    module = sys.modules.get("__main__")
    spec_name = getattr(getattr(module, "__spec__", None), "name", None)
    path = getattr(module, "__file__", None)
    if spec_name is not None:
        # python -m NAME: the machine imports NAME, from the bundle if it is the program's own.
        main["init_main_from_name"] = spec_name
        if isinstance(path, str) and not _is_shared_code(path, shared):
            _bundle_module(files, packages, spec_name, path)
    elif isinstance(path, str):
        # A script: at the top of the bundle, as its directory was first on the driver's
        # sys.path (unless that name is taken by another file).
        path = _absolute_path(path)
        name = os.path.basename(path)
        if files.get(name, path) != path:
            name = "__main__/" + name
        files[name] = path
        main["init_main_from_path"] = name
    data = _zip_files(files)
    shipped = _make_packages(wanted, shared)
    if shipped is not None:
        main["packages"] = shipped.digest        # the machine waits for them before main
    return _Bundle(data, hashlib.sha256(data).hexdigest(), main, library, files, shipped)


def _absolute_path(path):
    if os.path.isabs(path):
        return os.path.normpath(path)
    import multiprocessing.process
    return os.path.normpath(os.path.join(multiprocessing.process.ORIGINAL_DIR or os.getcwd(),
                                         path))


def _shared_code_dirs():
    """Where this interpreter's standard library and installed packages live (each ending in
    a separator): code that a machine's host provides for itself."""
    import site
    import sysconfig
    dirs = {os.path.dirname(os.__file__)}
    paths = sysconfig.get_paths()
    dirs.update(paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")
                if key in paths)
    with contextlib.suppress(Exception):
        dirs.update(site.getsitepackages())
    with contextlib.suppress(Exception):
        dirs.add(site.getusersitepackages())
    if sys.prefix != sys.base_prefix:
        dirs.add(sys.prefix)          # a virtual environment: all of it
    return tuple(sorted({os.path.join(os.path.realpath(d), "") for d in dirs if d}))


def _is_shared_code(path, shared):
    real = os.path.realpath(_absolute_path(path))
    parts = real.split(os.sep)
    return "site-packages" in parts or "dist-packages" in parts or real.startswith(shared)


def _bundle_module(files, packages, name, path):
    """Add module name, whose file is path, to files: the outermost regular package it is in,
    whole; else the module alone. Archive names are the paths below the sys.path entry the
    module was found in, which its name gives."""
    path = _absolute_path(path)
    parts = name.split(".")
    stem = os.path.basename(path).split(".")[0]       # "mod" of mod.cpython-311-x86_64.so too
    is_package = stem == "__init__"
    if not is_package and stem != parts[-1] or not os.path.isfile(path):
        # Not a file its name can be found by (an alias in sys.modules, a module imported
        # from a zip file...): leave it to the host.
        log.debug("not bundling module %s (%s)", name, path)
        return
    depth = len(parts) if is_package else len(parts) - 1
    root = os.path.dirname(path)
    for part in reversed(parts[:depth]):
        if os.path.basename(root) != part:
            return
        root = os.path.dirname(root)
    for i in range(1, depth + 1):
        package = os.path.join(root, *parts[:i])
        if os.path.isfile(os.path.join(package, "__init__.py")):
            if package not in packages:
                packages.add(package)
                _bundle_tree(files, root, package)
            return
    files.setdefault(os.path.relpath(path, root).replace(os.sep, "/"), path)


def _bundle_tree(files, root, package):
    import importlib.machinery
    suffixes = tuple(importlib.machinery.SOURCE_SUFFIXES + importlib.machinery.EXTENSION_SUFFIXES)
    for directory, subdirectories, names in os.walk(package):
        # Only directories that can be subpackages; never caches of compiled code.
        subdirectories[:] = sorted(d for d in subdirectories
                                   if d.isidentifier() and d != "__pycache__")
        for name in names:
            if name.endswith(suffixes):
                path = os.path.join(directory, name)
                files.setdefault(os.path.relpath(path, root).replace(os.sep, "/"), path)


def _zip_files(files):
    """A zip of files ({archive name: path}) that depends on their names and contents only."""
    import zipfile
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            with open(files[name], "rb") as f:
                data = f.read()
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return out.getvalue()


def _bundle_preparation(main, code, workdir, packages=None):
    """multiprocessing's spawn preparation for a machine running from a bundle unpacked at
    code: main (the bundle's) names the main module, or its path inside the bundle; sys.path
    is the bundle, then this host's own entries, with packages (the directory of the driver's
    distributions, if any) just ahead of the host's installed packages; the working directory
    is the machine's."""
    preparation = dict(main)
    preparation.pop("packages", None)
    if "init_main_from_path" in preparation:
        preparation["init_main_from_path"] = os.path.join(code, preparation["init_main_from_path"])
    cwd = os.getcwd()
    path = [p for p in sys.path if p and p not in (code, cwd, packages)]
    if packages:
        path.insert(_site_packages_index(path), packages)
    preparation["sys_path"] = [code] + path
    if workdir:
        preparation["dir"] = preparation["orig_dir"] = workdir
    return preparation


def _bundle_root(tmp=None):
    """This user's bigmachine directory on this host, <tmp>/bigmachine-<uid>: made private
    (0700) if new, refused if it is not a directory of this user's. Self-contained."""
    import os
    import stat
    import tempfile
    uid = os.getuid()
    root = os.path.join(tmp or tempfile.gettempdir(), "bigmachine-%d" % uid)
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
        raise PermissionError("%s is not a directory of user %d: refusing to use it" % (root, uid))
    if info.st_mode & 0o077:
        os.chmod(root, 0o700)
    return root


def _bundle_install(root, sha256, fetch):
    """The path of bundle sha256 in root's cache, after calling fetch() for its bytes if the
    cache lacks it (or holds a copy that does not hash right). Self-contained."""
    import hashlib
    import os
    if len(sha256) != 64 or set(sha256) - set("0123456789abcdef"):
        raise ValueError("not a SHA-256: %r" % (sha256,))
    cache = os.path.join(root, "bundles")
    os.makedirs(cache, mode=0o700, exist_ok=True)
    path = os.path.join(cache, sha256 + ".zip")
    try:
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() == sha256:
                return path
    except OSError:
        pass
    data = fetch()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError("the code bundle arrived damaged (%d bytes): its SHA-256 is not %s"
                         % (len(data), sha256))
    partial = "%s.%d.part" % (path, os.getpid())
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(partial, path)           # whole or not at all, even with machines racing
    return path


def _bundle_unpack(path, directory):
    """Unpack bundle path into directory. Self-contained."""
    import zipfile
    with zipfile.ZipFile(path) as archive:
        archive.extractall(directory)
    return directory


def _machine_workdir(root):
    """A new private directory for this machine process in root, named after its pid; first,
    the directories of machines whose process is gone (killed before it could clean up) go.
    Self-contained."""
    import os
    import shutil
    import tempfile
    for name in os.listdir(root):
        pid = name.split("-")[1] if name.startswith("machine-") else ""
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            except OSError:
                pass
    return tempfile.mkdtemp(prefix="machine-%d-" % os.getpid(), dir=root)


# --------------------------------------------------------------------------------------
# Packages: the driver's installed distributions, for machines that lack them
# --------------------------------------------------------------------------------------
#
# A program is its own code, which the bundle carries, and the distributions it imports (numpy,
# pandas, ...), which the bundle leaves to the host. By default (`packages="auto"`) they travel
# too: at `b.start` the driver looks at the modules it has imported from installed packages,
# finds the distribution each belongs to by the RECORD that the installer wrote (every file the
# distribution owns, with its SHA-256), and describes them -- name, version, wheel tags, files
# and hashes -- in a *manifest*. Modules in an installed-packages directory that no RECORD
# claims (an egg-info install, a file copied there) travel as their top-level package, whole.
# The driver hashes every file itself (once per process, while the file stays the same): what
# travels is what the driver has. A file that does not match its RECORD (edited after it was
# installed -- a CA appended to certifi's bundle is common -- or the RECORD lies) is said in
# the log and travels as it is, and the host's copy of that distribution is not taken for the
# driver's on the RECORD's word. A file the RECORD lists that cannot be read stops `b.start`
# with an error that names it and says what to do.
#
# The manifest's hash rides in the bootstrap (as `main["packages"]`), so every system that
# ships a code bundle ships packages too, without knowing about them. A machine that has it
# starts serving *before* it loads the driver's main, which may import those packages, and
# says so in Supervisor.info, with its platform. The driver then, over the machine's own mutual
# TLS (the transport every call uses, at its bulk rate):
#   1. checks that the machine can load what has compiled code (the same interpreter ABI for
#      extension modules; wheel platform tags the machine supports; a glibc at least as new);
#      if not, the machine stops with an err naming the distributions, both platforms, and
#      what to do (packages=[requirements], installed there by pip; or packages=None);
#   2. asks which files the host lacks (Supervisor.packages_missing). Distributions that the
#      machine's own Python has -- the same RECORD, or the same version whose files hash the
#      same -- are the host's already and stay out; of the rest, the files the host's cache
#      has are not sent again;
#   3. streams the missing ones (Supervisor.packages_put): each is written under a temporary
#      name, hashed as it arrives, and renamed into <root>/packages/objects/<sha256> only if
#      the hash is right -- a transfer that breaks, a file that changed on the driver while it
#      was read, a full or unwritable disk leave at most a .part file, never an object;
#   4. says go (Supervisor.packages_ready): the host builds the set of distributions this
#      machine needs as one directory of hard links to the objects, envs/<hash of the set>,
#      under a temporary name, hashing once more each object it did not just receive, and
#      renames it into place: a directory there is complete. The machine puts it on sys.path
#      after the bundle and the host's standard library, ahead of the host's own installed
#      packages (so the driver's versions of the distributions it imported win, and nothing
#      else changes), then loads main, and the boot goes on as for any machine.
# A second start on the same host finds the directory and sends nothing; one machine of a host
# sends at a time, so machines starting together send once. `.pth` files travel but are not
# run. Entry-point scripts (bin/) do not travel. Caches are never pruned: <root> is the
# system's temporary directory, which the host cleans in its own time.
#
# `packages=[requirements]` is for machines whose platform differs from the driver's: the
# driver tries `pip download` of the requirements for the machine's platform (its own index
# or pip configuration) and ships the wheels, content-addressed like any file; the machine's
# Python installs them with pip (--no-index) into <root>/packages/pip/<hash>, again under a
# temporary name first. If the driver cannot download them, the machine's pip installs them
# from the machine's own package index.

class _Packages(typing.NamedTuple):
    """What travels besides the bundle: see the section's introduction."""

    digest: str                       # the manifest's hash: the machine asks for it by this
    kind: str                         # "files" (the driver's distributions) or "pip"
    manifest: list                    # files: [{name, version, record, tags, compiled, files}];
                                      # pip: the requirement strings
    paths: dict                       # object name -> the driver's file holding it
    platform: dict                    # the driver's `_platform_facts()`


def _check_packages(packages):
    """A system's packages option, checked: "auto", None, or a tuple of requirements."""
    if packages is None or packages == "auto":
        return packages
    if isinstance(packages, (list, tuple)) and packages and all(
            isinstance(r, str) and r.strip() and not r.strip().startswith("-") for r in packages):
        return tuple(r.strip() for r in packages)
    raise ValueError("packages is 'auto' (ship the driver's imported distributions), None "
                     "(ship none) or a list of pip requirements such as ['numpy==2.1'], not %r"
                     % (packages,))


def _object_name(sha256, executable):
    return sha256 + (".x" if executable else "")


def _make_packages(packages, shared):
    """The _Packages that go with a bundle made now, or None if nothing is to travel."""
    if packages is None:
        return None
    import hashlib
    if packages == "auto":
        made = _auto_packages(shared)
    else:
        requirements = list(packages)
        digest = hashlib.sha256(json.dumps(["pip", requirements]).encode()).hexdigest()
        made = _Packages(digest, "pip", requirements, {}, _platform_facts())
    if made is not None:
        with _packages_lock:
            _package_sets[made.digest] = made
            _package_sets.move_to_end(made.digest)
            while len(_package_sets) > 32:
                _package_sets.popitem(last=False)
    return made


def _stdlib_dirs():
    import sysconfig
    paths = sysconfig.get_paths()
    return tuple(sorted({os.path.join(os.path.realpath(paths[key]), "")
                         for key in ("stdlib", "platstdlib") if paths.get(key)}))


def _is_installed_package(real, shared, stdlib):
    """Is real (a module's real path) in installed packages, as opposed to the standard library
    or the program's own code?"""
    parts = real.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    return real.startswith(shared) and not real.startswith(stdlib)


def _auto_packages(shared):
    """The driver's imported distributions as a _Packages (None if there are none)."""
    import hashlib
    stdlib = _stdlib_dirs()
    entries = sorted({os.path.join(os.path.realpath(p), "") for p in sys.path
                      if p and os.path.isdir(p)}, key=len, reverse=True)
    owned = {}                        # (site, dist-info) -> None
    loose = {}                        # (site, top-level name) -> None
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str):
            continue
        real = _real_paths.get(path)
        if real is None:
            real = _real_paths[path] = os.path.realpath(_absolute_path(path))
        if not _is_installed_package(real, shared, stdlib) or not os.path.isfile(real):
            continue
        site = next((e for e in entries if real.startswith(e)), None)
        if site is None:
            continue
        site = site[:-1]
        rel = os.path.relpath(real, site)
        dist = _site_index(site).get(rel)
        if dist is not None:
            owned[(site, dist)] = None
        else:
            loose[(site, rel.split(os.sep)[0])] = None
    manifest, paths = [], {}
    for site, dist in owned:
        manifest.append(_distribution_entry(site, dist, paths))
    for site, top in loose:
        if not any(top in {f[0].split("/")[0] for f in d["files"]} for d in manifest):
            manifest.append(_loose_entry(site, top, paths))
    manifest = [d for d in manifest if d["files"]]
    if not manifest:
        return None
    manifest.sort(key=lambda d: (d["name"].lower(), d["version"]))
    digest = hashlib.sha256(json.dumps(["files", manifest], sort_keys=True).encode()).hexdigest()
    return _Packages(digest, "files", manifest, paths, _platform_facts())


def _site_index(site):
    """{path relative to site: the dist-info directory whose RECORD lists it}, cached while the
    directory's entries stay the same."""
    import csv
    try:
        mtime = os.stat(site).st_mtime_ns
    except OSError:
        return {}
    with _packages_lock:
        cached = _site_indexes.get(site)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    index = {}
    for entry in sorted(os.listdir(site)):
        if not entry.endswith(".dist-info"):
            continue
        try:
            with open(os.path.join(site, entry, "RECORD"), newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        for row in rows:
            if row and row[0]:
                rel = os.path.normpath(row[0])
                if not os.path.isabs(rel) and not rel.startswith(".."):
                    index.setdefault(rel, entry)
    with _packages_lock:
        _site_indexes[site] = (mtime, index)
    return index


def _file_sha256(path):
    """The SHA-256 of the file at path, and its stat; remembered while the file stays the same."""
    import hashlib
    info = os.stat(path)
    key = (path, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
    with _packages_lock:
        known = _file_hashes.get(key)
    if known is None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        known = digest.hexdigest()
        with _packages_lock:
            _file_hashes[key] = known
    return known, info


def _is_compiled(rel):
    name = os.path.basename(rel)
    return name.endswith((".so", ".pyd", ".dylib", ".dll")) or ".so." in name


def _stat_key(path):
    info = os.stat(path)
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


def _distribution_entry(site, dist, paths):
    """The manifest entry of the distribution whose dist-info directory is site/dist; made
    again only when one of its files (its RECORD included) changed since the last time."""
    key = (site, dist)
    with _packages_lock:
        known = _entries.get(key)
    if known is not None:
        stats, entry, objects = known
        try:
            if all(_stat_key(path) == stat for path, stat in stats):
                paths.update(objects)
                return entry
        except OSError:
            pass
    objects = {}
    entry = _make_distribution_entry(site, dist, objects)
    stats = [(path, _stat_key(path)) for path in
             [os.path.join(site, dist, "RECORD")] + sorted(set(objects.values()))]
    with _packages_lock:
        _entries[key] = (stats, entry, objects)
    paths.update(objects)
    return entry


def _make_distribution_entry(site, dist, paths):
    import csv
    import hashlib
    directory = os.path.join(site, dist)
    with open(os.path.join(directory, "RECORD"), "rb") as f:
        record = f.read()
    metadata, tags, purelib = {}, [], True
    with contextlib.suppress(OSError), open(os.path.join(directory, "METADATA"),
                                            encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                break
            key, _, value = line.partition(":")
            metadata.setdefault(key.strip().lower(), value.strip())
    with contextlib.suppress(OSError), open(os.path.join(directory, "WHEEL"),
                                            encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "Tag":
                tags.append(value.strip())
            elif key.strip() == "Root-Is-Purelib":
                purelib = value.strip().lower() == "true"
    name = metadata.get("name") or dist[:-len(".dist-info")].rpartition("-")[0] or dist
    version = metadata.get("version", "")
    files, altered = [], False
    for row in csv.reader(io.StringIO(record.decode("utf-8", "replace"))):
        if not row or not row[0]:
            continue
        rel = os.path.normpath(row[0])
        parts = rel.split(os.sep)
        if os.path.isabs(rel) or parts[0] == ".." or "__pycache__" in parts or \
                rel.endswith((".pyc", ".pyo")):
            continue                  # scripts outside the directory; compiled bytecode
        path = os.path.join(site, rel)
        try:
            sha256, info = _file_sha256(path)
        except OSError as e:
            raise Error("cannot ship distribution %s %s: its RECORD lists %s, which cannot be "
                        "read (%s): reinstall it (pip install --force-reinstall '%s==%s'), or "
                        "start with packages=None" % (name, version, path, e.strerror or e,
                                                      name, version)) from None
        expected = row[1] if len(row) > 1 else ""
        if expected and not _matches_record(sha256, info.st_size, expected, row[2:3]):
            # Edited after it was installed (a CA appended to certifi's bundle, say), or the
            # RECORD lies: what travels is what this driver has, and the host's copy of the
            # distribution, whatever its RECORD, is not taken for the same.
            altered = True
            _warn_once("%s %s: %s does not match its RECORD (%s); shipping the file as it is "
                       "here" % (name, version, path, expected))
        executable = bool(info.st_mode & 0o111)
        paths[_object_name(sha256, executable)] = path
        files.append([rel.replace(os.sep, "/"), sha256, info.st_size, executable])
    files.sort()
    # The RECORD as the machine's importlib.metadata reads it (universal newlines).
    text = record.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    return {"name": name, "version": version, "tags": tags,
            "record": None if altered else hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "compiled": not purelib or any(_is_compiled(f[0]) for f in files), "files": files}


def _matches_record(sha256, size, expected, sizes):
    """Does a file (its SHA-256 in hex, its size) match its RECORD row's hash and size?"""
    algorithm, _, value = expected.partition("=")
    if algorithm == "sha256":
        ours = base64.urlsafe_b64encode(bytes.fromhex(sha256)).rstrip(b"=").decode()
        if ours != value.rstrip("="):
            return False
    return not (sizes and sizes[0].isdigit() and int(sizes[0]) != size)


def _warn_once(message):
    # Said at the info level: an edited file (a CA added to a certificate bundle) is common
    # and harmless, as what travels is what the driver has.
    with _packages_lock:
        if message in _warned:
            return
        _warned.add(message)
    log.info("%s", message)


def _loose_entry(site, top, paths):
    """A manifest entry for top-level module or package top in site, which no RECORD claims."""
    root = os.path.join(site, top)
    found = []
    if os.path.isdir(root):
        for directory, subdirectories, names in os.walk(root):
            subdirectories[:] = sorted(d for d in subdirectories if d != "__pycache__")
            found.extend(os.path.join(directory, n) for n in names
                         if not n.endswith((".pyc", ".pyo")))
    elif os.path.isfile(root):
        found.append(root)
    files = []
    for path in found:
        with contextlib.suppress(OSError):
            sha256, info = _file_sha256(path)
            executable = bool(info.st_mode & 0o111)
            paths[_object_name(sha256, executable)] = path
            files.append([os.path.relpath(path, site).replace(os.sep, "/"), sha256,
                          info.st_size, executable])
    files.sort()
    log.debug("no RECORD claims %s in %s: shipping it whole", top, site)
    return {"name": top, "version": "", "tags": [], "record": None,
            "compiled": any(_is_compiled(f[0]) for f in files), "files": files}


def _platform_facts():
    """This interpreter's platform, as far as loading compiled code goes."""
    import importlib.machinery
    import platform
    import sysconfig
    libc, libc_version = "", ""
    try:
        libc, _, libc_version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (AttributeError, ValueError, OSError):
        pass
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine) \
        if sys.platform.startswith("linux") else machine
    facts = {"python": PYTHON, "implementation": sys.implementation.cache_tag or "",
             "system": sys.platform, "machine": machine, "libc": libc,
             "libc_version": libc_version,
             "ext_suffixes": list(importlib.machinery.EXTENSION_SUFFIXES),
             "platform": sysconfig.get_platform(), "executable": sys.executable}
    facts["tags"] = _platform_tags(facts)
    return facts


def _platform_tags(facts):
    """The wheel platform tags an interpreter with these facts can load, best first."""
    machine = facts["machine"]
    if facts["system"].startswith("linux"):
        tags = []
        if facts["libc"] == "glibc" and facts["libc_version"].startswith("2."):
            with contextlib.suppress(ValueError):
                minor = int(facts["libc_version"].split(".")[1])
                for m in range(minor, 4, -1):
                    tags.append("manylinux_2_%d_%s" % (m, machine))
                    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}.get(m)
                    if legacy:
                        tags.append("%s_%s" % (legacy, machine))
        return tags + ["linux_%s" % machine]
    return [facts["platform"].replace("-", "_").replace(".", "_")]


def _platform_words(facts):
    """A platform in words: 'CPython 3.11 on linux x86_64 with glibc 2.36'."""
    libc = " with %s %s" % (facts["libc"], facts["libc_version"]) if facts.get("libc") else ""
    return "%s %s on %s %s%s (%s)" % (
        "CPython" if facts["implementation"].startswith("cpython") else facts["implementation"],
        facts["python"], facts["system"], facts["machine"], libc,
        facts["ext_suffixes"][0] if facts["ext_suffixes"] else "no extension modules")


def _cannot_load(dist, driver, machine):
    """Why machine (its platform facts) cannot load dist, which has compiled code for driver;
    None if it can."""
    if not dist["compiled"]:
        return None
    suffixes = tuple(machine["ext_suffixes"])
    for rel, _, _, _ in dist["files"]:
        specific = next((s for s in driver["ext_suffixes"] if rel.endswith(s) and s != ".so"),
                        None)
        if specific is not None and not rel.endswith(suffixes):
            return "its extension module %s is for %s" % (rel, specific)
    if dist["tags"]:
        platforms = {p for tag in dist["tags"] for p in tag.split("-")[-1].split(".")}
        if not platforms & (set(machine["tags"]) | {"any"}):
            return "it is built for %s" % ", ".join(sorted(platforms))
        if platforms & set(machine["tags"]) <= {"linux_" + machine["machine"]} and \
                _glibc(machine) < _glibc(driver):
            return "it was built here, against %s %s" % (driver["libc"], driver["libc_version"])
        return None
    if (driver["platform"], driver["libc"]) != (machine["platform"], machine["libc"]) or \
            _glibc(machine) < _glibc(driver):
        return "it was built for the driver's platform"
    return None


def _glibc(facts):
    with contextlib.suppress(ValueError):
        return tuple(int(x) for x in facts["libc_version"].split(".")[:2])
    return (0, 0)


def _host_send_lock(system, host):
    with _packages_lock:
        return _host_send_locks.setdefault((id(system), host), threading.Lock())


class _FilesReader(io.RawIOBase):
    """Files read one after another as one stream, each exactly the size it had when it was
    hashed: a file that shrank is an error, and bytes it gained are not sent."""

    def __init__(self, files):
        super().__init__()
        self._files = list(files)     # [(path, size)]
        self._file = None
        self._left = 0
        self.sent = 0

    def readable(self):
        return True

    def readinto(self, b):
        view = memoryview(b).cast("B")
        n = 0
        while n < len(view):
            if self._file is None:
                if not self._files:
                    break
                path, self._left = self._files.pop(0)
                self._file = open(path, "rb", buffering=0)
                self._path = path
            if self._left:
                got = self._file.readinto(view[n:n + self._left])
                if not got:
                    raise OSError("%s changed on the driver while it was sent (it is shorter "
                                  "now): start again" % self._path)
                n += got
                self._left -= got
            if not self._left:
                self._file.close()
                self._file = None
        self.sent += n
        return n

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


def _send_packages(system, m, wanted):
    """The driver's part of a machine's boot when the machine waits for packages (wanted, from
    its Supervisor.info): see the section's introduction. Raises Error if they cannot go."""
    with _packages_lock:
        packages = _package_sets.get(wanted.get("digest"))
    if packages is None:
        raise Error("machine %s waits for packages %s, which this driver does not know"
                    % (m.addr, wanted.get("digest")))
    machine = wanted["platform"]
    timeout = system.boot_timeout
    with _host_send_lock(system, m.hostname):
        if packages.kind == "files":
            bad = [(d, _cannot_load(d, packages.platform, machine)) for d in packages.manifest]
            bad = [(d, why) for d, why in bad if why]
            if bad:
                raise Error(
                    "machine %s cannot load distributions that the driver imported: %s. The "
                    "driver runs %s; the machine runs %s (%s). Start the machines with "
                    "packages=[%s] to have pip install them there, for the machine's platform "
                    "(the list replaces the driver's packages: add whatever else the machines' "
                    "Python lacks), or with packages=None if the machine's Python has its "
                    "own" % (
                        m.addr, "; ".join("%s %s (%s)" % (d["name"], d["version"], why)
                                          for d, why in bad),
                        _platform_words(packages.platform), _platform_words(machine),
                        machine.get("executable", "?"),
                        ", ".join(repr("%s==%s" % (d["name"], d["version"]) if d["version"]
                                       else d["name"]) for d, _ in bad)))
            missing = m._boot_call("Supervisor.packages_missing", {"dists": packages.manifest},
                                   timeout=timeout)
            _put_objects(system, m, packages.paths, missing, timeout)
        else:
            if not m._boot_call("Supervisor.packages_pip", packages.manifest, None,
                                timeout=timeout):
                wheels = _download_wheels(packages.manifest, machine)
                if wheels:
                    objects = {}
                    for path in wheels:
                        sha256, info = _file_sha256(path)
                        objects[_object_name(sha256, False)] = (path, info.st_size,
                                                               os.path.basename(path))
                    missing = m._boot_call(
                        "Supervisor.packages_missing",
                        {"objects": [[n.split(".")[0], o[1], False] for n, o in objects.items()]},
                        timeout=timeout)
                    _put_objects(system, m, {n: o[0] for n, o in objects.items()}, missing,
                                 timeout)
                    wheels = [[n.split(".")[0], o[2]] for n, o in sorted(objects.items())]
                else:
                    wheels = "index"
                m._boot_call("Supervisor.packages_pip", packages.manifest, wheels,
                             timeout=timeout)
    try:
        where = m._boot_call("Supervisor.packages_ready", timeout=timeout)
    except NetworkError:
        # The machine went away as it loaded main (which failed, say): how it ended, with its
        # last output, is its system's to say, and about to be said.
        m._stopped.wait(5.0)
        raise
    log.debug("%s: packages ready at %s", m.addr, where)


def _put_objects(system, m, paths, missing, timeout):
    """Send the objects missing ([[sha256, size, executable], ...]) to m, from paths."""
    if not missing:
        return
    size = sum(f[1] for f in missing)
    reader = _FilesReader([(paths[_object_name(f[0], f[2])], f[1]) for f in missing])
    began = time.monotonic()
    m._boot_call("Supervisor.packages_put", missing, reader, timeout=timeout)
    with _packages_lock:
        system.packages_sent += size
    seconds = time.monotonic() - began
    log.debug("%s: sent %d package files, %d bytes in %.3fs (%.0f MB/s)", m.addr, len(missing),
              size, seconds, size / 1e6 / max(seconds, 1e-9))


def _download_wheels(requirements, machine):
    """Wheels of requirements for machine's platform, from the driver's pip and index (cached
    for the driver's life); None if they cannot be had here."""
    import atexit
    import shutil
    import subprocess
    import tempfile
    key = (tuple(requirements), tuple(machine["tags"]), machine["implementation"])
    with _packages_lock:
        if key in _wheel_downloads:
            return _wheel_downloads[key]
    directory = tempfile.mkdtemp(prefix="bigmachine-wheels-")
    atexit.register(shutil.rmtree, directory, True)
    python = machine["python"]
    args = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
            "--no-input", "--only-binary=:all:", "--dest", directory,
            "--python-version", python, "--implementation", "cp" if machine[
                "implementation"].startswith("cpython") else "py"]
    for tag in machine["tags"]:
        args += ["--platform", tag]
    args += list(requirements)
    done = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    wheels = sorted(os.path.join(directory, n) for n in os.listdir(directory)
                    if n.endswith(".whl")) if done.returncode == 0 else None
    if wheels is None:
        log.info("pip download for the machines' platform failed here; the machines' pip will "
                 "use their own package index: %s",
                 done.stdout.decode("utf-8", "replace").strip()[-2000:])
    with _packages_lock:
        _wheel_downloads[key] = wheels
    return wheels


_STOP = object()                      # the end of a queue's work


def _package_stage_of(process):
    stage = process.package_stage
    if stage is None:
        raise Error("machine %s is not waiting for packages" % process.addr)
    return stage


def _package_stage_info(process):
    stage = process.package_stage
    if stage is None or stage.handed.is_set():
        return {}
    return {"packages": {"digest": stage.digest, "platform": _platform_facts()}}


class _DistInfo:
    """A distribution installed in a directory of sys.path (its .dist-info), with what
    `_PackageStage._host_has` asks of importlib.metadata's: found without importing
    importlib.metadata, which costs a starting machine more than the rest of its check."""

    def __init__(self, site, name):
        self._site = site
        self._path = os.path.join(site, name)
        self.version = ""
        with open(os.path.join(self._path, "METADATA"), encoding="utf-8",
                  errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                if key.strip().lower() == "version":
                    self.version = value.strip()
                    break

    def read_text(self, name):
        try:
            with open(os.path.join(self._path, name), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def locate_file(self, rel):
        return os.path.join(self._site, rel)


def _installed_distribution(name):
    """The distribution name as importlib.metadata.distribution finds it: the first directory
    of sys.path that has it. Found directly where that is one .dist-info in a plain directory;
    anything else (an egg, a zip on sys.path, two candidates) is importlib.metadata's to say."""

    def normal(text):
        out = []
        for c in text.lower():
            c = "_" if c in "-_." else c
            if not (c == "_" and out and out[-1] == "_"):
                out.append(c)
        return "".join(out)

    wanted = normal(name)
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except FileNotFoundError:
            continue
        except OSError:
            break                         # a zip, say
        found = [n for n in names if n.lower().endswith((".dist-info", ".egg-info", ".egg"))
                 and normal(n.rpartition(".")[0].partition("-")[0]) == wanted]
        if not found:
            continue
        if len(found) == 1 and found[0].endswith(".dist-info"):
            with contextlib.suppress(OSError):
                return _DistInfo(entry or ".", found[0])
        break
    import importlib.metadata
    return importlib.metadata.distribution(name)


def _site_packages_index(path):
    """Where in path (a sys.path) the host's installed packages begin: len(path) if nowhere."""
    for i, entry in enumerate(path):
        parts = os.path.realpath(entry).split(os.sep)
        if "site-packages" in parts or "dist-packages" in parts:
            return i
    return len(path)


class _PackageStage:
    """A machine's side of receiving packages, before it loads the driver's main (see the
    section's introduction): root is the host's bigmachine directory."""

    def __init__(self, root, digest):
        self.root = os.path.join(root, "packages")
        self.digest = digest
        self.handed = threading.Event()   # the main thread may load main, from path
        self.path = None
        self._lock = threading.Lock()
        self._needed = []                  # manifest entries of what the host lacks
        self._env = None                   # their directory: envs/<hash of them>
        self._pip = None                   # or pip's directory
        self._loaded = threading.Event()
        self._fresh = set()                # objects this machine received, hashed on arrival

    def _dir(self, *names):
        path = os.path.join(self.root, *names)
        try:
            os.makedirs(path, 0o700, exist_ok=True)
        except OSError as e:
            raise self._cache_error(path, e) from None
        return path

    def _cache_error(self, path, e):
        return Error("cannot write the package cache at %s on host %s: %s. Free space there or "
                     "make it writable (it is under the machine's TMPDIR), or start with "
                     "packages=None" % (path, socket.gethostname(), e))

    # -- 2. what is missing ---------------------------------------------------------------

    def missing(self, request):
        import hashlib
        objects = self._dir("objects")
        if "dists" in request:
            needed = [d for d in request["dists"] if not self._host_has(d)]
            with self._lock:
                self._needed = needed
                key = hashlib.sha256(json.dumps(needed, sort_keys=True).encode()).hexdigest()
                self._env = os.path.join(self.root, "envs", key) if needed else None
            if not needed or os.path.isdir(self._env):
                return []
            wanted = {}
            for d in needed:
                for rel, sha256, size, executable in d["files"]:
                    wanted[_object_name(sha256, executable)] = [sha256, size, executable]
        else:
            wanted = {_object_name(f[0], f[2]): f for f in request["objects"]}
        return [f for name, f in sorted(wanted.items())
                if not os.path.isfile(os.path.join(objects, name))]

    @staticmethod
    def _host_has(dist):
        """Has this machine's Python the same distribution already? The same RECORD says so;
        else the same version whose RECORD gives the same hashes, and whose files that do
        not match their RECORD (edited after they were installed) hash the same here."""
        import csv
        import hashlib
        try:
            found = _installed_distribution(dist["name"])
            record = found.read_text("RECORD")
        except Exception:
            return False
        if record is None:
            return False
        if dist.get("record") and \
                hashlib.sha256(record.encode("utf-8")).hexdigest() == dist["record"]:
            return True
        if found.version != dist["version"]:
            return False
        rows = {os.path.normpath(row[0]): row[1] for row in csv.reader(record.splitlines())
                if len(row) > 1 and row[0]}
        for rel, sha256, size, _ in dist["files"]:
            listed = rows.get(os.path.normpath(rel))
            if listed is None:
                return False
            ours = base64.urlsafe_b64encode(bytes.fromhex(sha256)).rstrip(b"=").decode()
            if listed.rstrip("=") == "sha256=" + ours:
                continue
            try:
                path = str(found.locate_file(rel))
                if os.path.getsize(path) != size:
                    return False
                with open(path, "rb") as f:
                    if hashlib.sha256(f.read()).hexdigest() != sha256:
                        return False
            except OSError:
                return False
        return True

    # -- 3. receiving ---------------------------------------------------------------------

    def receive(self, files, stream):
        """Store files ([[sha256, size, executable], ...]) read one after another from stream.
        This thread reads the connection; another hashes and writes, so that the two overlap."""
        objects = self._dir("objects")
        chunks = queue.Queue(32)          # a file's chunks, None after its last, then _STOP
        failed = []                       # the store's error, if any
        store = threading.Thread(target=self._store, args=(files, objects, chunks, failed),
                                 name="bigmachine-packages", daemon=True)
        store.start()
        received = 0
        try:
            for index, (sha256, size, executable) in enumerate(files):
                left = size
                while left and not failed:
                    chunk = stream.read(min(left, 1 << 20))     # errors: the transfer's
                    if not chunk:
                        raise Error("the driver's packages stopped arriving after %d bytes "
                                    "(%d of %d files): start the machine again"
                                    % (received, index, len(files)))
                    chunks.put(chunk)
                    left -= len(chunk)
                    received += len(chunk)
                if failed:
                    break
                chunks.put(None)
        finally:
            chunks.put(_STOP)             # the store drains whatever is left, and goes
            store.join()
        if failed:
            raise failed[0]
        return received

    def _store(self, files, objects, chunks, failed):
        """receive's other half: each file is written under a temporary name, hashed, and
        renamed to its hash only if that is right; a file left unfinished is removed."""
        import hashlib
        index, f, part = 0, None, None
        try:
            while True:
                chunk = chunks.get()
                if chunk is _STOP:
                    return
                if failed:
                    continue              # drain: the reader stops soon
                try:
                    if f is None:
                        sha256, _, executable = files[index]
                        final = os.path.join(objects, _object_name(sha256, executable))
                        part = "%s.%d-%d.part" % (final, os.getpid(), threading.get_ident())
                        f = open(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                                 "wb")
                        digest = hashlib.sha256()
                    if chunk is not None:
                        digest.update(chunk)
                        f.write(chunk)
                        continue
                    f.close()
                    f = None
                    if digest.hexdigest() != sha256:
                        raise Error("a package file arrived with SHA-256 %s, not %s: it "
                                    "changed on the driver while it was sent; start the "
                                    "machine again" % (digest.hexdigest(), sha256))
                    os.chmod(part, 0o555 if executable else 0o444)
                    os.replace(part, final)   # whole, and right, or not there at all
                    part = None
                    self._fresh.add(os.path.basename(final))
                    index += 1
                except OSError as e:
                    failed.append(self._cache_error(objects, e))
                except BaseException as e:
                    failed.append(e)
        finally:
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
            if part is not None:
                with contextlib.suppress(OSError):
                    os.unlink(part)

    # -- pip ------------------------------------------------------------------------------

    def pip(self, requirements, wheels):
        """wheels None: is the environment of requirements cached (True/False)? Else install
        it, from the objects of wheels ([[sha256, file name], ...]) or from "index"."""
        import hashlib
        import subprocess
        facts = _platform_facts()
        key = hashlib.sha256(json.dumps([requirements, facts["tags"], facts["ext_suffixes"],
                                         os.path.realpath(sys.executable)]).encode()).hexdigest()
        final = os.path.join(self.root, "pip", key)
        if os.path.isdir(final):
            self._pip = final
            return True
        if wheels is None:
            return False
        self._dir("pip")
        with self._built_whole(final) as work:
            args = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                    "--no-input", "--no-warn-script-location", "--target",
                    os.path.join(work, "whole")]
            if wheels != "index":
                found = os.path.join(work, "wheels")
                os.mkdir(found)
                for sha256, name in wheels:
                    if os.sep in name or name.startswith("."):
                        raise ValueError("not a wheel's file name: %r" % (name,))
                    self._link(_object_name(sha256, False), sha256, os.path.join(found, name))
                args += ["--no-index", "--find-links", found]
            done = subprocess.run(args + list(requirements), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                raise Error("pip could not install %s on host %s (%s, from %s): %s" % (
                    ", ".join(requirements), socket.gethostname(), sys.executable,
                    "the wheels the driver sent" if wheels != "index" else "its package index",
                    done.stdout.decode("utf-8", "replace").strip()[-3000:]))
        self._pip = final
        return True

    # -- 4. ready -------------------------------------------------------------------------

    def _link(self, name, sha256, target):
        """Link (or copy) object name to target, after checking its hash once more."""
        import hashlib
        import shutil
        source = os.path.join(self.root, "objects", name)
        digest = hashlib.sha256()
        if name not in self._fresh:
            with open(source, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        if name not in self._fresh and digest.hexdigest() != sha256:
            os.unlink(source)
            raise Error("the cached package file %s on host %s was damaged: it is removed; "
                        "start the machine again" % (source, socket.gethostname()))
        try:
            os.link(source, target)
        except FileExistsError:
            pass                          # two distributions with one file: one copy does
        except OSError:
            shutil.copy2(source, target)

    def _assemble(self):
        """The directory of the distributions this host lacks, made if need be."""
        final = self._env
        if final is None or os.path.isdir(final):
            return final
        self._dir("envs")
        with self._built_whole(final) as work:
            for d in self._needed:
                for rel, sha256, size, executable in d["files"]:
                    parts = rel.split("/")
                    if rel.startswith("/") or ".." in parts or "" in parts:
                        raise ValueError("not a relative path: %r" % (rel,))
                    target = os.path.join(work, "whole", *parts)
                    os.makedirs(os.path.dirname(target), 0o700, exist_ok=True)
                    self._link(_object_name(sha256, executable), sha256, target)
        return final

    @contextlib.contextmanager
    def _built_whole(self, final):
        """A directory built in a work directory of its own (what the block puts in its
        "whole" folder), then renamed to final in one step: a later machine finds it complete
        or not at all, and of two machines of a host building the same one at once, the
        second uses the first's."""
        import shutil
        import tempfile
        work = tempfile.mkdtemp(prefix="%s.%d." % (os.path.basename(final), os.getpid()),
                                suffix=".tmp", dir=os.path.dirname(final))
        try:
            yield work
            try:
                os.rename(os.path.join(work, "whole"), final)
            except OSError:
                if not os.path.isdir(final):  # else another machine was first: use its
                    raise
        except OSError as e:
            raise self._cache_error(os.path.dirname(final), e) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def ready(self):
        with self._lock:
            if not self.handed.is_set():
                self.path = self._pip if self._pip else self._assemble() or ""
                self.handed.set()
        self._loaded.wait()
        return {"path": self.path,
                "distributions": [d["name"] for d in self._needed] if not self._pip else None}

    # -- the main thread's side -------------------------------------------------------------

    def await_packages(self, exited):
        """The directory to put on sys.path ("" for none), once the driver says go; None if
        the machine exits first."""
        while not self.handed.wait(0.2):
            if exited.is_set():
                return None
        return self.path

    def loaded(self):
        self._loaded.set()


# --------------------------------------------------------------------------------------
# SSH: machines on any host the user can ssh into
# --------------------------------------------------------------------------------------
#
# The driver runs each machine through an ssh client of its own (OpenSSH's, as the user has it
# configured), and the host needs nothing but a Python of the driver's major.minor. Over the
# ssh channel, which is authenticated and encrypted, the machine starts in three stages:
#
# 0. The remote command is `exec PYTHON -u -c STAGE0`. Stage 0 says which Python it is, and
#    goes on only if that is the driver's major.minor (it parses even on Python 2, so that a
#    host whose python3 is something else gets a clear VersionMismatch, not a syntax error).
# 1. It runs the next line of its input: the source of `_ssh_stage1` and the self-contained
#    bundle functions it calls. Stage 1 answers "have" if the host's cache holds the driver's
#    code bundle, else "need" and reads it (the driver sends the bundle to one machine of a
#    host at a time, so a host is sent it once); then it unpacks it in the machine's private
#    directory and forks: the child imports bigmachine from there and becomes the machine,
#    the parent waits for it, so that however the machine ends (the OOM killer's SIGKILL
#    included) its directory goes and the driver is told how it ended.
# 2. `_machine_main` reads its bootstrap (the credentials among it), binds a port of its own --
#    by default on the address the ssh connection came in on -- and announces it. The
#    machine's address is https://HOST:PORT/, HOST as the driver named it. `B.start` returned
#    the machine with a provisional address (port 0); launch gives it the real one before the
#    machine is pinged.
#
# From then on the ssh client carries the machine's stdout and stderr, prefixed with the
# machine's address as for Local. The machine exits when its lease lapses and when the ssh
# connection ends (EOF on its stdin), whichever comes first: killing the driver, even with
# SIGKILL, closes the pipe to the ssh client, which passes the EOF on. Its directory goes with
# it.
#
# With tunnel=True the machine listens on the host's loopback only, and the driver reaches it
# through `ssh -L` from a local port, a second ssh client whose remote end is a Python waiting
# for EOF, so that the tunnel, too, ends with the driver. Machines then have loopback
# addresses that only the driver can use: machine-to-machine calls (b.dial) need hosts whose
# ports the machines can reach, that is tunnel=False.

_SSH_STAGE0 = (
    'import sys;v="%d.%d"%sys.version_info[:2];'
    'sys.stdout.write("@bigmachine@ python %s %s\\n"%(v,sys.executable));sys.stdout.flush();'
    'v=="{version}" or sys.exit();exec(sys.stdin.buffer.readline())')

# The remote end of a tunnel: it says it is there, then waits for the driver to go away.
_SSH_LIFELINE = ('import sys;sys.stdout.write("@bigmachine@ tunnel\\n");sys.stdout.flush();'
                 'sys.stdin.buffer.read()')


class SSHSystem(System):
    """Machines on hosts reached over SSH, with nothing installed there but Python.

    hosts are ["host", "user@host", "user@host:port", "[v6addr]:port", ...]; machines are
    spread over them round-robin, at most per_host on each; each machine offers its host's
    processors (maxprocs). python is the interpreter to run on the hosts (same major.minor as
    the driver's); ssh the client; ssh_options go to every ssh call, before the system's own
    (-T, BatchMode=yes, ConnectTimeout=30), which they can therefore override. bind is where
    machines listen on their hosts: by default the address the ssh connection came in on, or
    loopback with tunnel=True, which reaches machines through `ssh -L` port forwards for hosts
    whose ports are firewalled. packages (every system's option) says which installed
    distributions travel: see Packages. See the section's introduction."""

    name = "ssh"

    def __init__(self, hosts=None, *, python="python3", ssh="ssh", ssh_options=(), per_host=1,
                 tunnel=False, bind=None, **keepalive):
        super().__init__(**keepalive)
        if isinstance(hosts, str):
            hosts = hosts.replace(",", " ").split()
        if not hosts:
            raise ValueError("SSHSystem needs hosts: SSHSystem(['host', 'user@host:port', ...]), "
                             "or --bigm.ssh.hosts=a,b (BIGMACHINE_SSH_HOSTS) on the command line")
        self.hosts = [_SSHHost.parse(h) for h in hosts]
        specs = [h.spec for h in self.hosts]
        for spec in specs:
            if specs.count(spec) > 1:
                raise ValueError("host %r is listed twice; per_host sets how many machines a "
                                 "host runs" % spec)
        if isinstance(per_host, bool) or not isinstance(per_host, int) or per_host < 1:
            raise ValueError("per_host must be a positive integer, not %r" % (per_host,))
        if isinstance(ssh_options, str):
            import shlex
            ssh_options = shlex.split(ssh_options)
        self.python = python
        self.ssh = ssh
        self.ssh_options = tuple(str(option) for option in ssh_options)
        self.per_host = per_host
        self.tunnel = bool(tunnel)
        self.bind = bind if bind is not None or not self.tunnel else "127.0.0.1"
        self.bundles_sent = 0             # bundles sent to hosts that did not have them
        self._lock = threading.Lock()
        self._host_locks = {h.spec: threading.Lock() for h in self.hosts}
        self._load = {h.spec: 0 for h in self.hosts}   # machines on each host
        self._hosts = {}                  # Machine -> _SSHHost, until terminated
        self._pending = {}                # Machine -> (env, bundle), until launched
        self._procs = {}                  # Machine -> _SSHProcess
        self._serial = itertools.count(1)

    def __repr__(self):
        return "<ssh system: %s>" % ", ".join(h.spec for h in self.hosts)

    @classmethod
    def _command_line_options(cls, argv, environ):
        options = {}

        def value(flag, variable, boolean=False):
            return _flag_or_variable(argv, environ, "bigm.ssh." + flag, variable, boolean)

        hosts = value("hosts", "BIGMACHINE_SSH_HOSTS")
        if hosts:
            options["hosts"] = hosts
        ssh_options = value("options", "BIGMACHINE_SSH_OPTIONS")
        if ssh_options:
            import shlex
            options["ssh_options"] = shlex.split(ssh_options)
        python = value("python", "BIGMACHINE_SSH_PYTHON")
        if python:
            options["python"] = python
        per_host = value("per_host", "BIGMACHINE_SSH_PER_HOST")
        if per_host:
            options["per_host"] = int(per_host)
        tunnel = value("tunnel", "BIGMACHINE_SSH_TUNNEL", boolean=True)
        if tunnel:
            options["tunnel"] = _truth(tunnel)
        return options

    def start(self, b, n, env):
        bundle = _make_bundle(self.packages)
        machines = []
        with self._lock:
            for _ in range(n):
                host = min(self.hosts, key=lambda h: self._load[h.spec])   # the first least busy
                if self._load[host.spec] >= self.per_host:
                    break
                self._load[host.spec] += 1
                addr = "https://%s:0/ssh-%d/" % (_url_host(host.host), next(self._serial))
                m = Machine(b, addr, owned=True, maxprocs=None)   # the host's processors
                self._hosts[m] = host
                self._pending[m] = (env, bundle)
                machines.append(m)
        if not machines:
            raise Error("every host runs %d machine%s already (per_host=%d): %s" % (
                self.per_host, "s" if self.per_host > 1 else "", self.per_host,
                ", ".join(h.spec for h in self.hosts)))
        return machines

    def launch(self, b, machine):
        with self._lock:
            host = self._hosts.get(machine)
            env, bundle = self._pending.pop(machine, (None, None))
        if host is None or bundle is None:
            raise Error("machine %s was stopped before it started" % machine.addr)
        names = {}
        with contextlib.suppress(ValueError):
            _ip_address_bytes(host.host)
            names["ip_addresses"] = [host.host]
        if not names and host.host.replace("-", "").replace(".", "").isalnum():
            names["dns_names"] = [host.host]
        credentials = b.issue_certificate("bigmachine ssh machine", **names)
        env = dict(env, BIGMACHINE_MODE="machine", BIGMACHINE_SYSTEM=self.name)
        config = _machine_bootstrap(self, credentials, bundle.main, host=host.host,
                                    bind=self.bind, port=0, announce=True, env=env)
        deadline = time.monotonic() + self.boot_timeout
        process = _SSHProcess(self, machine, host)
        with self._lock:
            live = machine in self._hosts
            if live:
                self._procs[machine] = process
        if not live:                      # terminated while the ssh client started
            process.terminate(time.monotonic())
            raise Error("machine %s was stopped before it started" % machine.addr)
        port = process.handshake(bundle, config, deadline)
        process.serve()
        if self.tunnel:
            target = self.bind if self.bind not in ("", "0.0.0.0", "::") else "127.0.0.1"
            tunnel = _SSHTunnel(self, host, target, port, deadline)
            with self._lock:
                live = machine in self._hosts
                if live:
                    process.tunnel = tunnel
            if not live:                  # terminated while the tunnel opened
                tunnel.terminate(time.monotonic())
                raise Error("machine %s was stopped while it started" % machine.addr)
            addr = "https://127.0.0.1:%d/" % tunnel.port
        else:
            addr = "https://%s:%d/" % (_url_host(host.host), port)
        b.readdress(machine, addr)
        process.addressed = True

    def maxprocs(self):
        """Each machine offers its host's processors divided among the per_host machines the
        host may run; known once a machine has booted (the smallest such, if hosts differ),
        1 before."""
        with self._lock:
            known = [m.maxprocs for m in self._hosts if m.maxprocs]
        return min(known) if known else 1

    def _machine_view(self):
        return {"name": self.name, "maxprocs": None, "share": self.per_host}

    def _host_lock(self, host):
        return self._host_locks[host.spec]

    def _bundle_sent(self, host, bundle):
        with self._lock:
            self.bundles_sent += 1
        log.debug("sent the code bundle %s (%d files, %d bytes) to %s", bundle.sha256[:12],
                  len(bundle.files), len(bundle.data), host.spec)

    def _ssh_args(self, host, command, *options):
        """The ssh command line that runs command (a shell command) on host."""
        args = [self.ssh] + list(self.ssh_options)
        args += ["-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30"] + list(options)
        if host.port is not None:
            args += ["-p", str(host.port)]
        if host.user is not None:
            args += ["-l", host.user]
        return args + [host.host, command]

    def lost(self, machine):
        process = self._procs.get(machine)
        return process is not None and process.gone()

    def _why_fewer(self, asked, started):
        return ("SSHSystem runs at most per_host=%d machine%s on each host, and has %d host%s "
                "(%s); give it more hosts, or a larger per_host" % (
                    self.per_host, "" if self.per_host == 1 else "s", len(self.hosts),
                    "" if len(self.hosts) == 1 else "s",
                    ", ".join(h.spec for h in self.hosts)))

    def terminate(self, machine, deadline):
        with self._lock:
            host = self._hosts.pop(machine, None)
            if host is not None:
                self._load[host.spec] -= 1
            self._pending.pop(machine, None)
            process = self._procs.pop(machine, None)
        if process is not None:
            process.terminate(deadline)

    def shutdown(self):
        with self._lock:
            procs, self._procs = list(self._procs.values()), {}
            self._hosts.clear()
            self._pending.clear()
            self._load = dict.fromkeys(self._load, 0)
        for process in procs:
            process.terminate(time.monotonic() + 1.0)


class _SSHHost(typing.NamedTuple):
    """A host as SSHSystem's hosts name it: [user@]host[:port], an IPv6 address in brackets
    when a port follows."""

    spec: str
    user: typing.Optional[str]
    host: str
    port: typing.Optional[int]

    @classmethod
    def parse(cls, spec):
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError("a host is a string like 'host', 'user@host:2222', not %r" % (spec,))
        spec = spec.strip()
        user, at, rest = spec.rpartition("@")
        host, port = rest, None
        if rest.startswith("["):
            host, bracket, after = rest[1:].partition("]")
            if not bracket or after and not after.startswith(":"):
                raise ValueError("bad host %r: want [address]:port" % spec)
            port = after[1:] or None
        elif rest.count(":") == 1:
            host, port = rest.split(":")
        if port is not None:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("bad port in host %r" % spec)
            port = int(port)
        if not host or host.startswith("-") or any(c.isspace() for c in host) or \
                at and (not user or user.startswith("-")):
            raise ValueError("bad host %r: want host, user@host or user@host:port" % spec)
        return cls(spec, user if at else None, host, port)


class _Lines:
    """Lines from a pipe, each read by a deadline if need be: the driver's end of a
    handshake on a child's stdout. Reading goes on from the same buffer after it."""

    def __init__(self, pipe):
        self._pipe = pipe
        self._fd = pipe.fileno()
        self._buffer = b""

    def readline(self, deadline=None):
        """The next line, with its newline; b"" at EOF. Raises TimeoutError at the deadline."""
        while True:
            end = self._buffer.find(b"\n") + 1
            if end:
                line, self._buffer = self._buffer[:end], self._buffer[end:]
                return line
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                    raise TimeoutError("no line in time")
            try:
                data = os.read(self._fd, 65536)
            except OSError:
                data = b""
            if not data:
                line, self._buffer = self._buffer, b""
                return line
            self._buffer += data

    def close(self):
        with contextlib.suppress(OSError):
            self._pipe.close()


def _ssh_stage1_line(bundle):
    """Stage 1 as the line of Python source that stage 0 runs."""
    source = _shipped_source("ssh") + "_ssh_stage1(%r, %d, %r)\n" % (
        bundle.sha256, len(bundle.data), bundle.library)
    return ("exec(%r)\n" % source).encode("utf-8")


def _import_compiled(root, directory, name):
    """Import module name (a .py file) from directory, from the compiled copy of it kept in
    root/compiled (see `_compiled_module`; the first machine of a version on a host makes it).
    Each SSH machine unpacks its code afresh, so without it every one compiled this whole
    library again, whether or not the host lets Python write bytecode. Anything amiss with
    the copy, and it is compiled here. Self-contained."""
    import hashlib
    import importlib
    import importlib.util
    import marshal
    import os
    import sys
    source_path = os.path.join(directory, name + ".py")
    try:
        with open(source_path, "rb") as f:
            source = f.read()
    except OSError:
        return importlib.import_module(name)        # a package, say
    key = "%s-%s-O%d" % (hashlib.sha256(source + importlib.util.MAGIC_NUMBER).hexdigest()[:40],
                         sys.implementation.cache_tag or "python", sys.flags.optimize)
    path = os.path.join(root, "compiled", key + ".marshal")
    try:
        with open(path, "rb") as f:
            code = marshal.loads(f.read())
        os.utime(path)
    except (OSError, ValueError, EOFError, TypeError):
        code = compile(source, source_path, "exec", dont_inherit=True, optimize=sys.flags.optimize)
        partial = "%s.%d.part" % (path, os.getpid())
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                           "wb") as f:
                marshal.dump(code, f)
            os.replace(partial, path)               # whole or not at all
        except OSError:
            try:
                os.unlink(partial)
            except OSError:
                pass
    return _exec_module(name, source_path, code, cached=path)


def _exec_module(name, source_path, code, cached=None):
    """Module name, made by running code (compiled from source_path) as an import would: it
    is in sys.modules while it runs, and gone again if it fails. Self-contained."""
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location(name, source_path)
    if cached is not None:
        spec.cached = cached
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _ssh_stage1(sha256, size, library):
    """Stage 1 of an SSH machine, on its host: make sure the host has bundle sha256 ("need": the
    driver then sends its size bytes; "have"), unpack it in the machine's own directory and run
    the machine from there, in a child process. This process stays to wait for it: however the
    machine ends, killed by the OOM killer included, its directory goes and the driver learns
    how it ended ("exited CODE", CODE negative for a signal). Self-contained: it runs before
    bigmachine.py is on the host."""
    import os
    import shutil
    import sys
    import traceback
    out, into = sys.stdout.buffer, sys.stdin.buffer

    def say(word):
        out.write(b"@bigmachine@ " + word + b"\n")
        out.flush()

    def fetch():
        say(b"need")
        return into.read(size)

    root = _bundle_root()
    bundle = _bundle_install(root, sha256, fetch)
    say(b"have")
    workdir = _machine_workdir(root)
    try:
        code = _bundle_unpack(bundle, os.path.join(workdir, "code"))
        pid = os.fork()               # no threads yet: forking is safe
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    if pid == 0:
        status = 1
        try:
            sys.path.insert(0, code)
            _import_compiled(root, code, library)._machine_main(code=code, workdir=workdir)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    shutil.rmtree(workdir, ignore_errors=True)
    status = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    try:
        say(b"exited %d" % status)
    except OSError:
        pass                          # the driver has gone
    os._exit(status if status >= 0 else 128 - status)


class _SSHProcess(_ChildProcess):
    """The ssh client that runs one machine on its host, as the driver sees it."""

    def __init__(self, system, machine, host):
        import shlex
        self.system, self.host = system, host
        self.tunnel = None
        self.addressed = False           # the machine's real address is known
        self.machine_exit = None         # how the machine process ended, as stage 1 saw it
        stage0 = _SSH_STAGE0.replace("{version}", PYTHON)
        command = "exec %s -u -c %s" % (shlex.quote(system.python), shlex.quote(stage0))
        super().__init__(machine, system._ssh_args(host, command))
        self._lines = _Lines(self.proc.stdout)
        self.forward(self.proc.stderr.readline, self.proc.stderr.close)

    def prefix(self):
        return (self.machine.addr if self.addressed else "ssh " + self.host.spec) + ": "

    def handshake(self, bundle, config, deadline):
        """Start the machine through stages 0 to 2 (see the section's introduction); returns
        the port it listens on."""
        words = self._next(deadline, "python")
        if words[:1] != ["python"] or len(words) < 2:
            raise Error("host %s: unexpected answer from %s: %s"
                        % (self.host.spec, self.system.python, " ".join(words)))
        if words[1] != PYTHON:
            python, executable = self.system.python, " ".join(words[2:])
            if executable and executable != python:
                python += " (%s)" % executable
            raise VersionMismatch(
                "the driver runs Python %s (%s); on host %s, %s is Python %s: give "
                "SSHSystem(python=...) a Python %s there" % (
                    PYTHON, sys.executable, self.host.spec, python, words[1], PYTHON))
        with self.system._host_lock(self.host):
            self._send(_ssh_stage1_line(bundle))
            while True:
                words = self._next(deadline, "the code bundle")
                if words == ["need"]:
                    self._send(bundle.data)
                    self.system._bundle_sent(self.host, bundle)
                elif words == ["have"]:
                    break
                else:
                    raise Error("host %s: unexpected answer: %s" % (self.host.spec, words))
        self._send((json.dumps(config) + "\n").encode())
        words = self._next(deadline, "the machine's port")
        if words[:1] != ["listening"] or len(words) != 2 or not words[1].isdigit():
            raise Error("host %s: unexpected answer: %s" % (self.host.spec, words))
        return int(words[1])

    def _send(self, data):
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except OSError:
            pass                          # it went away: reading its answer says why

    def _next(self, deadline, what):
        """The words of the next line for the driver (marked); other lines are output."""
        while True:
            try:
                line = self._lines.readline(deadline)
            except TimeoutError:
                raise Error("host %s: no answer about %s in %.0fs" % (
                    self.host.spec, what, self.system.boot_timeout)) from None
            if not line:
                raise self._failure(what)
            if line.startswith(_MARK.encode() + b" "):
                words = line.decode("utf-8", "replace").split()[1:]
                if words[:1] != ["exited"]:
                    return words
                self.output(line)
                raise self._failure(what)
            self.output(line)

    def output(self, line):
        if line.startswith(_MARK.encode() + b" exited "):
            with contextlib.suppress(ValueError):
                self.machine_exit = int(line.split()[2])
            return
        super().output(line)

    def _failure(self, what):
        """Why the ssh client ended its output before the machine was up."""
        import subprocess
        try:
            code = self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            code = None
        for t in self._forwarders:
            t.join(1.0)
        output = "".join(self.tail).strip()
        detail = (": " + output) if output else ""
        if self.machine_exit is not None:
            return Error("the machine on host %s %s before it served (at %s)%s" % (
                self.host.spec, _exit_reason(self.machine_exit), what, detail))
        if code == 255:
            return Error("cannot ssh to host %s (ssh exited with code 255)%s"
                         % (self.host.spec, detail))
        if what == "python":
            return Error("host %s cannot run %s (it %s)%s" % (
                self.host.spec, self.system.python, _exit_reason(code), detail))
        return Error("the machine on host %s: ssh %s before the machine served (at %s)%s" % (
            self.host.spec, _exit_reason(code), what, detail))

    def serve(self):
        """The machine is up: forward its output and notice when it ends."""
        self.forward(self._lines.readline, self._lines.close)
        self.watch()

    def exit_error(self, code, why, output):
        if self.expected_exit and code == 0:
            return Error("machine %s was shut down" % self.machine.addr)
        if self.machine_exit is not None:
            why = _exit_reason(self.machine_exit)                  # the machine's own end
        elif code == 255:
            why = "lost: ssh exited with code 255 (the connection failed or was cut)"
        else:
            why = "lost: ssh " + why
        return Error("machine %s on host %s %s%s" % (
            self.machine.addr, self.host.spec, why,
            "; its last output:\n" + output if output and self.machine.state < RUNNING else ""))

    def gone(self, grace=0.25):
        # Without its tunnel, a machine is as good as gone to the driver.
        tunnel_closed = self.tunnel is not None and self.tunnel.proc.poll() is not None
        return tunnel_closed or super().gone(grace)

    def terminate(self, deadline):
        super().terminate(deadline)
        if self.tunnel is not None:
            self.tunnel.terminate(deadline)


class _SSHTunnel:
    """A local port forwarded to a machine's port on its host, by `ssh -L`. The remote end
    of the ssh session is a Python that waits for EOF, so that the tunnel ends when the
    driver does, however it ends. ssh's own messages go to the debug log."""

    _ATTEMPTS = 5                         # local ports tried: another process may take one

    def __init__(self, system, host, target, port, deadline):
        import subprocess
        import shlex
        command = "exec %s -c %s" % (shlex.quote(system.python), shlex.quote(_SSH_LIFELINE))
        for attempt in range(self._ATTEMPTS):
            self.port = _free_port()
            forward = "127.0.0.1:%d:%s:%d" % (self.port, _url_host(target), port)
            self.proc = subprocess.Popen(
                system._ssh_args(host, command, "-o", "ExitOnForwardFailure=yes", "-L", forward),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, close_fds=True)
            try:
                line = _Lines(self.proc.stdout).readline(deadline)
            except TimeoutError:
                line = b""
            if line.startswith(_MARK.encode() + b" tunnel"):
                # ssh binds the local port before it runs the remote command: it is open.
                self._logger = threading.Thread(target=self._log, args=(host,),
                                                name="bigmachine-tunnel", daemon=True)
                self._logger.start()
                return
            self.terminate(time.monotonic())
            with self.proc.stderr:
                error = self.proc.stderr.read().decode("utf-8", "replace").strip()
            if "already in use" not in error or attempt + 1 == self._ATTEMPTS:
                raise Error("cannot open an ssh tunnel to port %d of host %s: %s"
                            % (port, host.spec, error or _exit_reason(self.proc.returncode)))

    def _log(self, host):
        for line in iter(self.proc.stderr.readline, b""):
            log.debug("ssh tunnel to %s: %s", host.spec, line.decode("utf-8", "replace").rstrip())
        self.proc.stderr.close()

    def terminate(self, deadline):
        """Close the tunnel: EOF to its remote end, and kill it if it will not go."""
        import subprocess
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(OSError):
            self.proc.stdout.close()


def _free_port():
    """A TCP port on loopback that is free now (someone may take it before it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------
# EC2: a machine per instance, launched by the driver (Go: ec2system)
# --------------------------------------------------------------------------------------
#
# Each machine is an EC2 instance of its own, launched with boto3, which is imported here only,
# when an EC2System is made. By default the instance boots the newest Amazon Linux 2023 image
# of the region (named by AWS's public SSM parameter) for the instance type's architecture. Its
# user data is a short shell script (_EC2_USER_DATA): it makes poweroff the default boot
# target (a reboot then ends the instance too), finds a Python of the driver's major.minor --
# installing the image's python3.X package if need be -- runs the *bootstrap* with it, and powers
# the instance off when the bootstrap returns, however it returns. Instances are launched with
# InstanceInitiatedShutdownBehavior=terminate, so powering off terminates them.
#
# What user data holds. Any process on the instance can read user data (from the metadata
# service), and so can any AWS principal allowed ec2:DescribeInstanceAttribute, for the
# instance's whole life. So it holds no key of a machine, and never the CA's (which the Go
# original shipped to every instance): only the bootstrap's own certificate and key, issued by
# the session CA for serving alone (no client use: no machine accepts it from a caller) and
# expiring an hour after the boot timeout; the CA's certificate; the SHA-256 of the driver's
# certificate; and the bootstrap's source (`_ec2_boot` and the self-contained functions it
# calls). The machine's key is made on the instance, as an enrolling machine's is (see
# Enrolment): whoever reads user data can at most pose as the bootstrap to a driver that
# dials it, before it expires. It holds no code of the program either, and stays under EC2's
# 16 KB (checked before launching).
#
# The bootstrap serves the driver alone: mutual TLS against the session CA, and then only the
# client whose certificate has the driver's hash; the session's other machines are refused too.
# It reads HTTP and JSON, never a pickle. The driver
#   1. GETs /<instance-id>/bigmachine/boot for the instance's Python, which must be the driver's
#      major.minor (else VersionMismatch, naming both);
#   2. PUTs the code bundle (see Code bundles) to /<instance-id>/bigmachine/bundle/<sha256>; the
#      bootstrap keeps it only if it hashes right;
#   3. POSTs to /<instance-id>/bigmachine/key: the bootstrap unpacks the bundle, makes the
#      machine's key with the bundle's bigmachine, and answers its public half, which the
#      driver certifies;
#   4. POSTs the machine's bootstrap configuration (`_machine_bootstrap`, less the key, which
#      stays on the instance) and its certificate to /<instance-id>/bigmachine/start. The
#      bootstrap stops accepting connections, unpacks the bundle in the machine's own directory
#      and runs `_machine_main` in a child process that inherits the listening socket: the machine
#      serves at the same address, behind mutual TLS of its own. The reply to the POST is the
#      machine's stdout and stderr, line by line, for as long as it runs, and then how it ended:
#      the driver prints the lines prefixed with the machine's address, as for local machines.
# A bootstrap that hears nothing from the driver for a lease gives up, and the instance goes.
#
# A machine's address is https://HOST:PORT/<instance-id>/, HOST the first of the instance's
# public DNS name, public IP and private IP; the instance id keeps addresses unique when AWS
# recycles a name. `EC2System(address=f)` maps an instance, as describe_instances gives it, to
# the host and port to use instead (a private subnet reached through a tunnel; the tests).
#
# Launching. Machines have credentials of their own, hence user data of their own, so each
# instance is a RunInstances call of its own, made in the machine's boot thread: `b.start`
# returns at once, having checked what would fail for every machine alike -- the instance type,
# the image, the security group, and a dry run of the launch for permissions. Spot first, by
# default; when a spot launch fails (no capacity, a quota...), that machine and the rest of its
# `b.start` are launched on demand instead. spot_only never falls back; on_demand never tries
# spot. Without security_groups, the system uses one of its own per VPC and port, created once
# (tagged bigmachine=true) and kept, which admits TCP to the port from anywhere: mutual TLS
# guards it.
#
# Watching (Go's monitor). One thread describes the system's instances, in batches, at most
# once every poll_interval seconds, when someone needs to know: the boot threads of machines
# whose instance is starting, and machines whose keepalive failed or whose output stream broke.
# A machine whose instance is found shutting down, terminated, stopping or stopped (a reclaimed
# spot instance, say) stops at once with the instance's state reason, rather than after the
# keepalive budget (10 minutes: Go's).
#
# Every instance is tagged bigmachine=true, bigmachine:session, bigmachine:user and
# bigmachine:program; `python bigmachine.py ec2 list` and `ec2 kill` find leftovers by them.
# Normally there are none: b.shutdown() terminates its instances, and a machine that loses its
# driver ends within a lease, and its instance with it.
#
# The tests run all of this against moto, which does not run user data; a harness runs it as a
# local process with BIGMACHINE_FAKE_EC2=1. In that mode the script changes nothing on the host
# (no package installs, no systemd, no poweroff: it exits where an instance would power off); in
# any mode the bootstrap binds BIGMACHINE_BIND (default: every interface, 127.0.0.1 in that
# mode) on BIGMACHINE_PORT (default: the system's port) and asks the metadata service at
# BIGMACHINE_IMDS (default: EC2's).

_EC2_USER_DATA = """#!/bin/sh
# bigmachine.py: the first boot of a machine of session @SESSION@ (see bigmachine.py's EC2
# section). With BIGMACHINE_FAKE_EC2=1 it changes nothing on the host and exits where an
# instance would power off.
want=python@PYTHON@
keep=@KEEP@
if [ "$BIGMACHINE_FAKE_EC2" != 1 ]; then
    [ "$keep" = 1 ] || systemctl set-default poweroff.target >/dev/null 2>&1  # reboot ends it too
    command -v $want >/dev/null 2>&1 || dnf install -y -q $want || yum install -y -q $want
fi
@BOOT@python=$(command -v $want || command -v python3)
umask 077
"${python:-python3}" -u - <<'BIGMACHINE_BOOTSTRAP'
@BOOTSTRAP@BIGMACHINE_BOOTSTRAP
status=$?
if [ "$keep" = 1 ]; then
    echo "bigmachine: keeping this instance (keep_instances=True); the machine exited: $status" >&2
    [ "$BIGMACHINE_FAKE_EC2" != 1 ] || exec sleep 2147483647     # as an instance that stays
elif [ "$BIGMACHINE_FAKE_EC2" != 1 ]; then
    shutdown -h now || systemctl poweroff || poweroff -f
fi
exit $status
"""

# What EC2System's data_gib, ssh_keys and boot_script add to the user data, before the
# bootstrap runs. The data volume is Go's scratch disk: the instance's own NVMe instance
# storage, striped when there are several, or else (data_gib) an EBS volume at /dev/sdb;
# formatted and mounted at /mnt/data, with the machine's temporary files (TMPDIR) there.
# In the test harness (BIGMACHINE_FAKE_EC2=1) /mnt/data is a directory in the instance's own.
_EC2_DATA_SECTION = """data=/mnt/data
if [ "$BIGMACHINE_FAKE_EC2" = 1 ]; then
    data=$PWD/mnt/data
    mkdir -p "$data"
else
    disks=
    for d in /dev/nvme*n1; do
        case $(cat /sys/block/${d#/dev/}/device/model 2>/dev/null) in
            *"Instance Storage"*) disks="$disks $d";;
        esac
    done
    if [ -z "$disks" ] && [ @EBS@ = 1 ]; then
        for i in $(seq 120); do [ -e /dev/sdb ] || [ -e /dev/xvdb ] && break; sleep 1; done
        disks=$(readlink -f /dev/sdb 2>/dev/null || readlink -f /dev/xvdb)
    fi
    set -- $disks
    dev=$1
    if [ $# -gt 1 ]; then
        command -v mdadm >/dev/null 2>&1 || dnf install -y -q mdadm || yum install -y -q mdadm
        mdadm --create /dev/md/bigmachine --level=0 --raid-devices=$# --run "$@" &&
            dev=/dev/md/bigmachine
    fi
    if [ -n "$dev" ]; then
        mkdir -p $data
        { mkfs.xfs -q -f "$dev" || mkfs.ext4 -q -F "$dev"; } && mount -o noatime "$dev" $data ||
            echo "bigmachine: could not make the data volume on $dev" >&2
    fi
fi
if mountpoint -q $data 2>/dev/null || [ "$BIGMACHINE_FAKE_EC2" = 1 ]; then
    mkdir -p "$data/tmp" && chmod 1777 "$data/tmp" && export TMPDIR="$data/tmp"
fi
"""

_EC2_SSH_KEYS_SECTION = """home=$(getent passwd 1000 | cut -d: -f6)
owner=$(getent passwd 1000 | cut -d: -f1)
[ "$BIGMACHINE_FAKE_EC2" != 1 ] || home=$HOME
if [ -n "$home" ]; then
    mkdir -p "$home/.ssh" && chmod 700 "$home/.ssh"
    cat >> "$home/.ssh/authorized_keys" <<'BIGMACHINE_SSH_KEYS'
@KEYS@
BIGMACHINE_SSH_KEYS
    chmod 600 "$home/.ssh/authorized_keys"
    [ "$BIGMACHINE_FAKE_EC2" = 1 ] || chown -R "$owner:" "$home/.ssh"
fi
"""

_EC2_BOOT_SCRIPT_SECTION = """sh -s <<'BIGMACHINE_BOOT_SCRIPT' || echo "bigmachine: boot_script failed: $?" >&2
@SCRIPT@
BIGMACHINE_BOOT_SCRIPT
"""

_EC2_USER_DATA_LIMIT = 16384          # bytes: EC2's limit, before base64
_EC2_DEAD = ("shutting-down", "terminated", "stopping", "stopped")
_EC2_LIVE = ("pending", "running", "stopping", "stopped")       # what `ec2 kill` ends
_EC2_AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-%s"


def _ec2_boot(settings):
    """An EC2 machine's bootstrap, on its instance (see the section's introduction): serve the
    driver, and nobody else, over mutual TLS until it has sent the code bundle and the machine's
    configuration; then run the machine in a child process on the same listening socket, stream
    its output to the driver, and return its exit status when it ends. Returns 1 if the driver
    stays silent for settings["wait"] seconds before that. Shipped as source (see the file's
    rules): it runs before bigmachine.py is on the instance, on whatever Python the instance
    has (3.8 or newer), as do the steps it takes, each below."""
    import os
    import socket
    import sys
    fake = os.environ.get("BIGMACHINE_FAKE_EC2") == "1"
    port = int(os.environ.get("BIGMACHINE_PORT") or settings["port"])
    bind = os.environ.get("BIGMACHINE_BIND", "127.0.0.1" if fake else "")
    imds = (os.environ.get("BIGMACHINE_IMDS") or "http://169.254.169.254").rstrip("/")
    instance = _ec2_instance_id(imds)
    if instance is None:
        return 1
    context = _pinned_context(True, settings["cert"] + settings["key"], settings["ca"])
    listener = socket.create_server((bind, port), backlog=128,
                                    family=socket.AF_INET6 if ":" in bind else socket.AF_INET)
    boot = _EC2Bootstrap(settings, instance, context, listener)
    _ec2_say("instance %s, Python %s, port %d" % (instance, sys.version.split()[0], port))
    if not boot.accept():
        return 1
    return boot.wait()


def _ec2_say(text):
    """A line of the bootstrap's own on its stderr (the instance's console)."""
    import sys
    sys.stderr.write("bigmachine bootstrap: %s\n" % text)
    sys.stderr.flush()


def _ec2_instance_id(imds):
    """The instance id, from the metadata service, the IMDSv2 way (the only one the instance
    allows): a token from a PUT first, then the token with the request. Never via a proxy.
    None, said, if the service does not answer for a minute."""
    import time
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for attempt in range(60):
        try:
            token = opener.open(urllib.request.Request(
                imds + "/latest/api/token", method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}), timeout=5).read()
            return opener.open(urllib.request.Request(
                imds + "/latest/meta-data/instance-id",
                headers={"X-aws-ec2-metadata-token": token.decode()}), timeout=5).read().decode()
        except OSError as e:
            if attempt == 59:
                _ec2_say("cannot read the instance id from %s: %s" % (imds, e))
                return None
            time.sleep(1)


class _EC2Bootstrap:
    """The state of an EC2 machine's bootstrap, which its connections' threads share, and its
    steps: accept the driver's connections, keep the bundle it PUTs, make the machine's key,
    start the machine and stream its output."""

    def __init__(self, settings, instance, context, listener):
        import threading
        import time
        self.settings, self.instance, self.context = settings, instance, context
        self.listener = listener
        self.prefix = "/%s/bigmachine/" % instance
        self.root = _bundle_root()
        self.handler = _ec2_boot_handler(self)
        self.lock = threading.Lock()
        self.bundles = {}                 # sha256 -> its path in the cache, as the driver sent them
        self.heard = time.monotonic()     # when the driver was last heard
        self.connections = 0              # the driver's connections open now
        self.starting = threading.Event()     # a start request came: stop accepting connections
        self.stopped = threading.Event()      # accepting stopped: the listening socket can go
        self.done = threading.Event()         # the machine ended: status is its exit status
        self.status = None
        self.made = {}                    # the machine's key and where its bundle was unpacked
        self.slots = threading.BoundedSemaphore(64)

    def accept(self):
        """Serve the driver's connections, each in a thread, until a start request came. False
        if the driver stayed silent too long."""
        import select
        import threading
        import time
        wait = self.settings["wait"]
        while not self.starting.is_set():
            with self.lock:
                silent = not self.connections and time.monotonic() - self.heard > wait
            if silent:
                _ec2_say("no word from the driver for %ds: giving up" % wait)
                self.listener.close()
                return False
            if not select.select([self.listener], [], [], 0.2)[0] or self.starting.is_set():
                continue
            try:
                raw, peer = self.listener.accept()
            except OSError:
                continue
            if not self.slots.acquire(False):
                raw.close()
                continue
            threading.Thread(target=self.serve, args=(raw, peer), daemon=True).start()
        self.stopped.set()
        return True

    def wait(self):
        """The machine's exit status, when it has ended."""
        self.done.wait()
        return self.status

    def finish(self, status):
        self.status = status
        self.done.set()

    def serve(self, raw, peer):
        """One connection: the driver's (its certificate's hash says so), or refused."""
        import hashlib
        import time
        try:
            raw.settimeout(10)
            try:
                conn = self.context.wrap_socket(raw, server_side=True)
            except (OSError, ValueError) as e:
                _ec2_say("refused %s: %s" % (peer[0], e))
                return
            with conn:
                if hashlib.sha256(conn.getpeercert(True)).hexdigest() != self.settings["driver"]:
                    _ec2_say("refused %s: a certificate of the session, but not its driver's"
                             % peer[0])
                    return
                with self.lock:
                    self.heard, self.connections = time.monotonic(), self.connections + 1
                try:
                    self.handler(conn, peer, None)
                finally:
                    with self.lock:
                        self.heard, self.connections = time.monotonic(), self.connections - 1
        except Exception as e:
            _ec2_say("connection from %s failed: %s" % (peer[0], e))
        finally:
            raw.close()
            self.slots.release()

    def install(self, sha256, data):
        """Keep a bundle the driver sent, if it hashes right (else ValueError)."""
        path = _bundle_install(self.root, sha256, lambda: data)
        with self.lock:
            self.bundles[sha256] = path

    def make_key(self, request):
        """Unpack the bundle and make the machine's key with its bigmachine, which this
        script does not have: the public half, in hex. Called with the lock held."""
        import importlib
        import os
        import sys
        library = request["library"]
        if not all(part.isidentifier() for part in library.split(".")):
            raise ValueError("not a module name: %r" % (library,))
        workdir = _machine_workdir(self.root)
        code = _bundle_unpack(self.bundles[request["bundle"]], os.path.join(workdir, "code"))
        sys.path.insert(0, code)
        module = importlib.import_module(library)
        key = module._Ed25519Key()
        self.made.update(workdir=workdir, code=code, bundle=request["bundle"],
                         key=module._private_key_pem(key))
        return key.public.hex()

    def run_machine(self, request):
        """Start the machine: a child process that takes the listening socket over."""
        import json
        import subprocess
        import sys
        library = request["library"]
        if self.made.get("bundle") != request["bundle"] or "cert" not in request:
            raise ValueError("no key was made for this bundle: POST key first")
        workdir, code = self.made["workdir"], self.made["code"]
        config = dict(request["config"], fd=self.listener.fileno(), credentials={
            "cert_pem": request["cert"], "key_pem": self.made["key"],
            "ca_pem": self.settings["ca"]})
        launcher = ("import sys; sys.path.insert(0, %r); import %s as library; "
                    "library._machine_main(code=%r, workdir=%r)" % (code, library, code, workdir))
        self.listener.setblocking(True)
        child = subprocess.Popen([sys.executable, "-u", "-c", launcher], cwd=workdir,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, pass_fds=[self.listener.fileno()])
        self.listener.close()             # the machine's now
        # The machine reads its configuration from its stdin, which stays open: EOF would mean
        # that this process died, and the machine would exit.
        child.stdin.write(json.dumps(config).encode() + b"\n")
        child.stdin.flush()
        return child

    def stream(self, handler, child):
        """Answer the start request with the machine's output, line by line, for as long as it
        runs; then how it ended."""
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain; charset=utf-8")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        handler.connection.settimeout(None)
        self.keep_alive(handler.connection)
        stream = self.send(handler.wfile, b"@bigmachine@ started %d\n" % child.pid)
        for line in iter(child.stdout.readline, b""):
            stream = self.send(stream, line)
        status = child.wait()
        self.send(stream, b"@bigmachine@ exited %d\n" % status)
        self.finish(status if status >= 0 else 128 - status)

    @staticmethod
    def send(stream, line):
        """Write a line of the machine's output to the instance's own log and to the driver's
        stream: that stream, or None once it broke (the driver went: the log goes on)."""
        import sys
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        if stream is not None:
            try:
                stream.write(line)
            except OSError:
                return None
        return stream

    @staticmethod
    def keep_alive(connection):
        """Keep the stream alive through NATs and notice a driver that vanished."""
        import socket
        for option, value in (("SO_KEEPALIVE", 1), ("TCP_KEEPIDLE", 60),
                              ("TCP_KEEPINTVL", 20), ("TCP_KEEPCNT", 6)):
            if hasattr(socket, option):
                level = socket.SOL_SOCKET if option == "SO_KEEPALIVE" else socket.IPPROTO_TCP
                try:
                    connection.setsockopt(level, getattr(socket, option), value)
                except OSError:
                    pass

    def post_key(self, handler, request):
        """POST key: make the machine's key, once, from a bundle the driver sent."""
        import json
        import traceback
        with self.lock:
            if self.starting.is_set() or self.made:
                return handler.reply(409, b"the machine has its key already\n")
            if request.get("bundle") not in self.bundles:
                return handler.reply(409, b"no such bundle: PUT it first\n")
            try:
                public = self.make_key(request)
            except Exception:
                return handler.reply(500, traceback.format_exc().encode())
        return handler.reply(200, json.dumps({"public_key": public}).encode(),
                             "application/json")

    def post_start(self, handler, request):
        """POST start: stop accepting connections, start the machine, stream its output."""
        import traceback
        with self.lock:
            if self.starting.is_set():
                return handler.reply(409, b"the machine was started already\n")
            if request.get("bundle") not in self.bundles:
                return handler.reply(409, b"no such bundle: PUT it first\n")
            self.starting.set()
        self.stopped.wait()
        try:
            child = self.run_machine(request)
        except Exception:
            handler.reply(500, traceback.format_exc().encode())
            return self.finish(1)
        self.stream(handler, child)


def _ec2_boot_handler(boot):
    """The HTTP handler class of an `_EC2Bootstrap`'s connections: pages under its prefix."""
    import http.server
    import json
    import sys

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 120

        def log_message(self, format, *args):
            pass

        def reply(self, status, body=b"", kind="text/plain; charset=utf-8"):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def body(self):
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self):
            if self.path != boot.prefix + "boot":
                return self.reply(404, b"no such page\n")
            self.reply(200, json.dumps({
                "python": "%d.%d" % sys.version_info[:2], "executable": sys.executable,
                "instance": boot.instance}).encode(), "application/json")

        def do_PUT(self):
            data = self.body()
            if not self.path.startswith(boot.prefix + "bundle/"):
                return self.reply(404, b"no such page\n")
            try:
                boot.install(self.path[len(boot.prefix + "bundle/"):], data)
            except ValueError as e:
                return self.reply(400, ("%s\n" % e).encode())
            self.reply(200, b"installed\n")

        def do_POST(self):
            data = self.body()
            if self.path not in (boot.prefix + "start", boot.prefix + "key"):
                return self.reply(404, b"no such page\n")
            try:
                request = json.loads(data.decode())
            except ValueError:
                return self.reply(400, b"not JSON\n")
            if self.path == boot.prefix + "key":
                return boot.post_key(self, request)
            boot.post_start(self, request)

    return Handler


def _ec2_user_data(session, port, wait, driver_pem, credentials, boot="", keep=False):
    """The user data of an EC2 machine: the script of the section's introduction, around the
    bootstrap and the settings it runs with (this machine's credentials among them). boot is
    shell run before the bootstrap (`EC2System._boot_section`); keep leaves the instance up
    when the machine exits."""
    import hashlib
    settings = {
        "session": session, "port": port, "wait": wait,
        "driver": hashlib.sha256(ssl.PEM_cert_to_DER_cert(driver_pem)).hexdigest(),
        "cert": credentials.cert_pem, "key": credentials.key_pem, "ca": credentials.ca_pem,
    }
    # The functions' source, compressed: as text it would not leave room under the limit.
    bootstrap = ('import base64, sys, zlib\nexec(zlib.decompress(base64.b64decode("""\n%s""")))\n'
                 'sys.exit(_ec2_boot(%r))\n' % (_shipped_source("ec2", packed=True), settings))
    text = (_EC2_USER_DATA.replace("@SESSION@", session).replace("@PYTHON@", PYTHON)
            .replace("@KEEP@", "1" if keep else "0").replace("@BOOT@", boot)
            .replace("@BOOTSTRAP@", bootstrap))
    size = len(text.encode("utf-8"))
    if size > _EC2_USER_DATA_LIMIT:
        raise Error("the user data of an EC2 machine would be %d bytes, over EC2's limit of %d"
                    % (size, _EC2_USER_DATA_LIMIT))
    return text


def _import_boto3():
    """boto3 and botocore, imported when first needed: only the EC2 system uses them."""
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError as e:
        raise Error("the EC2 system needs boto3, which this Python cannot import (%s): "
                    "pip install boto3 (or pip install 'bigmachine[ec2]')" % e) from None
    return boto3, botocore


def _ec2_session(region=None):
    """A boto3 session for region (None: the AWS configuration's) and an EC2 client of it.
    AWS_ENDPOINT_URL and the rest of boto3's configuration apply as usual."""
    boto3, botocore = _import_boto3()
    config = botocore.config.Config(retries={"mode": "standard", "max_attempts": 8},
                                    user_agent_extra="bigmachine.py/" + __version__)
    session = boto3.session.Session(region_name=region)
    try:
        return session, session.client("ec2", config=config)
    except botocore.exceptions.NoRegionError:
        raise Error("no AWS region is configured: give EC2System(region=...) or --bigm.ec2region, "
                    "or set AWS_REGION, or a region in ~/.aws/config") from None


def _aws_error(e):
    """An AWS error in a few words: 'Code: message'."""
    error = getattr(e, "response", {}).get("Error", {})
    if error.get("Code"):
        return "%s: %s" % (error["Code"], error.get("Message", ""))
    return "%s: %s" % (type(e).__name__, e)


def _aws_error_code(e):
    return getattr(e, "response", {}).get("Error", {}).get("Code", "")


def _ec2_user():
    try:
        import getpass
        return getpass.getuser()
    except Exception:
        return "unknown"


def _ec2_tags(instance):
    return {t["Key"]: t["Value"] for t in instance.get("Tags") or ()}


class EC2System(System):
    """Machines on EC2 instances, one instance each (Go: ec2system). Needs boto3.

    instance_type is any EC2 instance type offered in the region; each machine offers its
    vCPUs (maxprocs). Spot instances first, on demand for whatever spot cannot supply, unless
    spot_only (no fallback) or on_demand (no spot). ami is an image id, or an SSM parameter
    naming one (default: the newest Amazon Linux 2023 for the type's architecture); the image
    needs a Python of the driver's major.minor, or a package python3.X that dnf or yum can
    install. region defaults to the AWS configuration's. instance_profile (a name or an ARN),
    security_groups (ids or names; default: one of the system's own that admits TCP to port),
    subnet, key_name, tags (more instance tags) and disk_gib (the root volume, gp3) go into each
    launch. For real work (see the README): the instance's NVMe instance storage, striped,
    or else data_gib GiB of EBS (gp3), is mounted at /mnt/data with the machine's temporary
    files there; boot_script is shell run as root before the machine starts; ssh_keys are
    public keys let in as the image's default user; keep_instances=True leaves instances up
    when their machines exit, for a person to look into (`ec2 kill` ends them). Machines listen on port. address=f maps an instance (as describe_instances gives it)
    to the (host, port) to reach it at, or None while that is not known; it may be given as
    "module:function". `system.ec2` is the boto3 EC2 client it uses. On the command line: --bigm.system=ec2, with --bigm.ec2type=TYPE,
    --bigm.ec2ondemand, --bigm.ec2spotonly, --bigm.ec2region=REGION, --bigm.ec2ami=AMI,
    --bigm.ec2port=PORT and --bigm.ec2address=MODULE:FUNCTION (or the variables
    BIGMACHINE_EC2TYPE and so on). See the section's introduction and the README for the rest."""

    name = "ec2"
    #: Go's ec2system: keepalives every minute, 10 minutes to give up, 2 per attempt; 5 min lease.
    defaults = (60.0, 600.0, 120.0, 300.0)
    #: seconds between two descriptions of the system's instances, at the most
    poll_interval = 1.0

    _types = {}                       # (region, instance type) -> describe_instance_types entry
    _types_lock = threading.Lock()

    def __init__(self, instance_type="m5.large", *, on_demand=False, spot_only=False, ami=None,
                 region=None, instance_profile=None, security_groups=None, subnet=None,
                 key_name=None, disk_gib=50, tags=None, port=443, address=None,
                 data_gib=None, boot_script=None, ssh_keys=(), keep_instances=False,
                 **keepalive):
        super().__init__(**keepalive)
        if data_gib is not None and (isinstance(data_gib, bool) or not isinstance(
                data_gib, int) or data_gib < 1):
            raise ValueError("data_gib must be a positive whole number of GiB, or None, not %r"
                             % (data_gib,))
        if boot_script is not None and (not isinstance(boot_script, str) or
                                        "BIGMACHINE_BOOT_SCRIPT" in boot_script):
            raise ValueError("boot_script is shell script text (without the line "
                             "BIGMACHINE_BOOT_SCRIPT), not %r" % (boot_script,))
        if isinstance(ssh_keys, str):
            ssh_keys = [ssh_keys]
        ssh_keys = [key.strip() for key in ssh_keys]
        for key in ssh_keys:
            if not key or "\n" in key or len(key.split()) < 2 or not key.split()[0].startswith(
                    ("ssh-", "ecdsa-", "sk-")):
                raise ValueError("ssh_keys are OpenSSH public keys, one line each, such as the "
                                 "contents of ~/.ssh/id_ed25519.pub, not %r" % (key,))
        self.data_gib, self.boot_script = data_gib, boot_script
        self.ssh_keys, self.keep_instances = ssh_keys, bool(keep_instances)
        if not isinstance(instance_type, str) or not instance_type.strip():
            raise ValueError("instance_type is an EC2 instance type such as 'm5.large', not %r"
                             % (instance_type,))
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError("port must be a TCP port number, not %r" % (port,))
        if isinstance(disk_gib, bool) or not isinstance(disk_gib, int) or disk_gib < 1:
            raise ValueError("disk_gib must be a positive whole number of GiB, not %r" % (disk_gib,))
        if isinstance(security_groups, str):
            security_groups = security_groups.replace(",", " ").split()
        tags = dict(tags or {})
        for key, value in tags.items():
            if not isinstance(key, str) or not isinstance(value, str) or \
                    key.lower().startswith("aws:") or key == "bigmachine" or \
                    key.startswith("bigmachine:"):
                raise ValueError("tags map names to strings, and names starting with aws: or "
                                 "bigmachine are reserved: %r: %r" % (key, value))
        if address is not None and not callable(address) and not (
                isinstance(address, str) and address.count(":") == 1):
            raise ValueError("address is a function, or 'module:function', not %r" % (address,))
        self.instance_type = instance_type.strip()
        self.spot_only = bool(spot_only)
        self.on_demand = bool(on_demand) and not self.spot_only
        self.ami = ami
        self.instance_profile = instance_profile
        self.security_groups = list(security_groups or ())
        self.subnet = subnet
        self.key_name = key_name
        self.disk_gib = disk_gib
        self.tags = tags
        self.port = port
        self.address = address
        self._session, self.ec2 = _ec2_session(region)     # `ec2`: boto3's client, public
        self._botocore = sys.modules["botocore"]
        self.region = self.ec2.meta.region_name
        self.session = None               # this session's id, from init
        self._b = None                    # this session's B, from init
        self._prepare_lock = threading.Lock()
        self._spec = None                 # what every launch has in common, once checked
        self.vcpus = None
        self._cond = threading.Condition()
        self._serial = itertools.count(1)
        self._reset()

    def _reset(self):
        old = getattr(self, "_monitor", None)
        if old is not None:               # init again without a shutdown: the old one goes
            old.close()
        self._closed = False
        self._pending = {}                # Machine -> (env, bundle, batch), until launched
        self._ids = {}                    # Machine -> instance id
        self._machines = {}               # instance id -> Machine
        self._stopping = set()            # Machines terminated (their launch may be under way)
        self._boots = {}                  # Machine -> _EC2Boot, while its output streams
        self._terminated = set()          # instance ids we terminated
        self._markets = {}                # instance id -> "spot" or "on-demand", until launch
        self._monitor = _EC2Monitor(self)  # one per session

    def __repr__(self):
        return "<ec2 system: %s in %s>" % (self.instance_type, self.region)

    @property
    def _errors(self):
        return (self._botocore.exceptions.ClientError, self._botocore.exceptions.BotoCoreError)

    @classmethod
    def _command_line_options(cls, argv, environ):
        options = {}

        def value(flag, variable, boolean=False):
            return _flag_or_variable(argv, environ, "bigm." + flag, variable, boolean)

        for flag, option in (("ec2type", "instance_type"), ("ec2region", "region"),
                             ("ec2ami", "ami"), ("ec2address", "address")):
            given = value(flag, "BIGMACHINE_" + flag.upper())
            if given:
                options[option] = given
        for flag, option in (("ec2ondemand", "on_demand"), ("ec2spotonly", "spot_only")):
            given = value(flag, "BIGMACHINE_" + flag.upper(), boolean=True)
            if given:
                options[option] = _truth(given)
        port = value("ec2port", "BIGMACHINE_EC2PORT")
        if port:
            options["port"] = int(port)
        return options

    # -- what every launch has in common ------------------------------------------------

    def init(self, b):
        with self._cond:
            self._reset()
        self._b = b
        self.session = os.urandom(6).hex()

    def _instance_type(self):
        """The instance type's description (cached): a clear error for one that does not exist
        or is not offered in the region."""
        key = (self.region, self.instance_type)
        with self._types_lock:
            info = self._types.get(key)
        if info is not None:
            return info
        try:
            found = self.ec2.describe_instance_types(InstanceTypes=[self.instance_type])
        except self._errors as e:
            if _aws_error_code(e).startswith("InvalidInstanceType"):
                raise Error("there is no EC2 instance type %r (%s)" % (self.instance_type,
                                                                       _aws_error(e))) from None
            raise Error("cannot describe EC2 instance type %s: %s"
                        % (self.instance_type, _aws_error(e))) from e
        offered = self.ec2.describe_instance_type_offerings(LocationType="region", Filters=[
            {"Name": "location", "Values": [self.region]},
            {"Name": "instance-type", "Values": [self.instance_type]}])
        if not found["InstanceTypes"] or not offered["InstanceTypeOfferings"]:
            raise Error("EC2 instance type %s is not offered in region %s"
                        % (self.instance_type, self.region))
        info = found["InstanceTypes"][0]
        with self._types_lock:
            self._types[key] = info
        return info

    def _image(self, architecture):
        """The image to boot, and its description."""
        ami = self.ami or _EC2_AMI_PARAMETER % architecture
        if ami.startswith("resolve:ssm:"):
            ami = ami[len("resolve:ssm:"):]
        if ami.startswith("/"):
            try:
                ami = self._session.client("ssm", region_name=self.region).get_parameter(
                    Name=ami)["Parameter"]["Value"]
            except self._errors as e:
                raise Error("cannot find the image named by SSM parameter %s in %s: %s"
                            % (ami, self.region, _aws_error(e))) from e
        try:
            images = self.ec2.describe_images(ImageIds=[ami])["Images"]
        except self._errors as e:
            images, why = [], _aws_error(e)
        else:
            why = "no such image"
        if not images:
            raise Error("cannot use image %s in region %s: %s" % (ami, self.region, why))
        return ami, images[0]

    def _vpc(self):
        if self.subnet:
            subnets = self.ec2.describe_subnets(SubnetIds=[self.subnet])["Subnets"]
            return subnets[0]["VpcId"]
        vpcs = self.ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise Error("region %s has no default VPC: give EC2System a subnet (and "
                        "security_groups) to launch into" % self.region)
        return vpcs[0]["VpcId"]

    def _security_group_ids(self):
        named = [g for g in self.security_groups if not g.startswith("sg-")]
        ids = [g for g in self.security_groups if g.startswith("sg-")]
        if named:
            groups = self.ec2.describe_security_groups(Filters=[
                {"Name": "group-name", "Values": named},
                {"Name": "vpc-id", "Values": [self._vpc()]}])["SecurityGroups"]
            missing = set(named) - {g["GroupName"] for g in groups}
            if missing:
                raise Error("no security group named %s in the VPC" % ", ".join(sorted(missing)))
            ids += [g["GroupId"] for g in groups]
        if ids:
            return ids
        # The system's own group for this VPC and port: made once, kept for later sessions.
        vpc, name = self._vpc(), "bigmachine-%d" % self.port
        where = [{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc]}]
        groups = self.ec2.describe_security_groups(Filters=where)["SecurityGroups"]
        if groups:
            group = groups[0]["GroupId"]
        else:
            try:
                group = self.ec2.create_security_group(
                    GroupName=name, VpcId=vpc,
                    Description="bigmachine.py machines: TCP %d, guarded by mutual TLS" % self.port,
                    TagSpecifications=[{"ResourceType": "security-group",
                                        "Tags": [{"Key": "bigmachine", "Value": "true"}]}])["GroupId"]
            except self._errors as e:
                if _aws_error_code(e) != "InvalidGroup.Duplicate":     # another driver made it
                    raise
                group = self.ec2.describe_security_groups(Filters=where)["SecurityGroups"][0]["GroupId"]
            log.info("made security group %s (%s) in %s, open to TCP port %d",
                     name, group, vpc, self.port)
        try:
            self.ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[{
                "IpProtocol": "tcp", "FromPort": self.port, "ToPort": self.port,
                "IpRanges": [{"CidrIp": "0.0.0.0/0", "Description": "bigmachine.py"}],
                "Ipv6Ranges": [{"CidrIpv6": "::/0", "Description": "bigmachine.py"}]}])
        except self._errors as e:
            if _aws_error_code(e) != "InvalidPermission.Duplicate":
                raise
        return [group]

    def _prepare(self):
        """What every launch has in common, checked once: the instance type, the image, the
        security groups, and a dry run of a launch (permissions). Raises a clear Error before
        anything is launched."""
        with self._prepare_lock:
            if self._spec is not None:
                return self._spec
            info = self._instance_type()
            architectures = info.get("ProcessorInfo", {}).get("SupportedArchitectures") or []
            architecture = "arm64" if "arm64" in architectures and \
                "x86_64" not in architectures else "x86_64"
            try:
                ami, image = self._image(architecture)
                root_size = max([m["Ebs"].get("VolumeSize", 1) for m in image.get(
                    "BlockDeviceMappings", ()) if m.get("DeviceName") == image.get(
                        "RootDeviceName") and "Ebs" in m] or [1])
                if self.disk_gib < root_size:
                    raise Error("disk_gib=%d is smaller than image %s's root volume (%d GiB)"
                                % (self.disk_gib, ami, root_size))
                spec = {
                    "ImageId": ami, "InstanceType": self.instance_type,
                    "MinCount": 1, "MaxCount": 1,
                    "InstanceInitiatedShutdownBehavior": "terminate",
                    "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                        "HttpPutResponseHopLimit": 1},
                    "BlockDeviceMappings": [{
                        "DeviceName": image.get("RootDeviceName") or "/dev/xvda",
                        "Ebs": {"VolumeSize": self.disk_gib, "VolumeType": "gp3",
                                "DeleteOnTermination": True}}],
                    "SecurityGroupIds": self._security_group_ids(),
                }
                if self.data_gib:
                    spec["BlockDeviceMappings"].append({"DeviceName": "/dev/sdb", "Ebs": {
                        "VolumeSize": self.data_gib, "VolumeType": "gp3",
                        "DeleteOnTermination": True}})
                if self.subnet:
                    spec["SubnetId"] = self.subnet
                if self.key_name:
                    spec["KeyName"] = self.key_name
                if self.instance_profile:
                    spec["IamInstanceProfile"] = {
                        "Arn" if self.instance_profile.startswith("arn:") else "Name":
                            self.instance_profile}
                try:
                    self.ec2.run_instances(DryRun=True, UserData="#!/bin/sh\n",
                                           TagSpecifications=self._tag_specifications(),
                                           **self._market(spec, "spot" if self.spot_only else
                                                          "on-demand"))
                except self._errors as e:
                    if _aws_error_code(e) != "DryRunOperation":
                        raise Error("EC2 would not launch %s instances in %s: %s%s" % (
                            self.instance_type, self.region, _aws_error(e),
                            " (the README's EC2 section lists the permissions needed)"
                            if "Unauthorized" in _aws_error_code(e) else "")) from None
            except self._errors as e:
                raise Error("cannot prepare EC2 launches in %s: %s"
                            % (self.region, _aws_error(e))) from e
            self.vcpus = info["VCpuInfo"]["DefaultVCpus"]
            self._spec = spec
            return spec

    def _boot_section(self):
        """The shell the user data runs before the bootstrap: the data volume, people's SSH
        keys, the user's boot script (see _EC2_DATA_SECTION)."""
        info = self._types.get((self.region, self.instance_type)) or {}
        parts = []
        if self.data_gib or info.get("InstanceStorageSupported"):
            parts.append(_EC2_DATA_SECTION.replace("@EBS@", "1" if self.data_gib else "0"))
        if self.ssh_keys:
            parts.append(_EC2_SSH_KEYS_SECTION.replace("@KEYS@", "\n".join(self.ssh_keys)))
        if self.boot_script:
            parts.append(_EC2_BOOT_SCRIPT_SECTION.replace("@SCRIPT@", self.boot_script.rstrip()))
        return "".join(parts)

    def maxprocs(self):
        """The instance type's vCPUs (asking EC2 once)."""
        if self.vcpus is None:
            self._prepare()
        return self.vcpus

    def _tag_specifications(self):
        program = os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "python")
        tags = dict(self.tags)
        tags.update({
            "Name": ("bigmachine %s %s" % (program, self.session))[:255],
            "bigmachine": "true",
            "bigmachine:session": self.session,
            "bigmachine:user": _ec2_user()[:255],
            "bigmachine:program": program[:255] or "python",
        })
        tags = [{"Key": k, "Value": v} for k, v in sorted(tags.items())]
        return [{"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume")]

    @staticmethod
    def _market(spec, market):
        if market != "spot":
            return spec
        return dict(spec, InstanceMarketOptions={"MarketType": "spot", "SpotOptions": {
            "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}})

    # -- machines ---------------------------------------------------------------------------

    def start(self, b, n, env):
        self._prepare()
        bundle = _make_bundle(self.packages)
        batch = {}                        # what the machines of this b.start share: spot failed?
        machines = []
        with self._cond:
            for _ in range(n):
                serial = next(self._serial)
                # A placeholder until the instance has an address: launch gives the real one.
                m = Machine(b, "https://ec2-%d.pending:%d/%s-%d/" % (
                    serial, self.port, self.session, serial), owned=True, maxprocs=self.vcpus)
                self._pending[m] = (env, bundle, batch)
                machines.append(m)
        return machines

    def launch(self, b, machine):
        with self._cond:
            env, bundle, batch = self._pending.pop(machine, (None, None, None))
        if bundle is None:
            raise Error("machine %s was stopped before it started" % machine.addr)
        deadline = time.monotonic() + self.boot_timeout
        # User data holds the bootstrap's credentials only: good for serving the driver (not for
        # calling anyone), until the machine has had time to boot. The machine's own key is
        # made on the instance; the driver certifies it (see _EC2Boot.run).
        credentials = b.issue_certificate("bigmachine ec2 bootstrap", client=False,
                                          lifetime=self.boot_timeout + 3600)
        user_data = _ec2_user_data(self.session, self.port, self.lease,
                                   b.credentials.cert_pem, credentials,
                                   boot=self._boot_section(), keep=self.keep_instances)
        instance_id = self._run_instance(user_data, batch)
        machine.details.update(instance_id=instance_id, instance_type=self.instance_type,
                               market=self._markets.pop(instance_id, None))
        with self._cond:
            self._ids[machine] = instance_id
            self._machines[instance_id] = machine
            gone = self._closed or machine in self._stopping
        if gone:
            self._terminate([instance_id])
            raise Error("machine %s was stopped while instance %s launched"
                        % (machine.addr, instance_id))
        host, port = self._await_address(machine, instance_id, deadline)
        b.readdress(machine, "https://%s:%d/%s/" % (_url_host(host), port, instance_id))
        boot = _EC2Boot(self, machine, instance_id, host, port, client_context(b.credentials))
        with self._cond:
            self._boots[machine] = boot
        env = dict(env, BIGMACHINE_MODE="machine", BIGMACHINE_SYSTEM=self.name)
        config = _machine_bootstrap(self, None, bundle.main, addr=machine.addr, env=env)
        boot.run(bundle, config, deadline)

    def _run_instance(self, user_data, batch):
        """Launch one instance (spot, then on demand, as configured); returns its id."""
        if self.spot_only:
            markets = ["spot"]
        elif self.on_demand or batch.get("spot failed"):
            markets = ["on-demand"]
        else:
            markets = ["spot", "on-demand"]
        failures = []
        for market in markets:
            request = self._market(dict(self._spec, UserData=user_data,
                                        TagSpecifications=self._tag_specifications()), market)
            try:
                reply = self.ec2.run_instances(**request)
            except self._errors as e:
                failures.append("%s: %s" % (market, _aws_error(e)))
                if market == "spot" and len(markets) > 1:
                    with self._cond:
                        first, batch["spot failed"] = not batch.get("spot failed"), True
                    if first:
                        log.warning("no spot instances of type %s in %s (%s): launching on "
                                    "demand instead", self.instance_type, self.region,
                                    _aws_error(e))
                continue
            instance = reply["Instances"][0]
            log.debug("launched %s instance %s", market, instance["InstanceId"])
            with self._cond:
                self._markets[instance["InstanceId"]] = market
            return instance["InstanceId"]
        raise Error("cannot launch an EC2 instance of type %s in %s: %s"
                    % (self.instance_type, self.region, "; ".join(failures)))

    def _await_address(self, machine, instance_id, deadline):
        """Wait until the instance runs and has an address: (host, port)."""
        while True:
            instance = self._monitor.describe_soon(instance_id,
                                                   max(0.1, deadline - time.monotonic()))
            if machine.state is STOPPED or self._closed:
                raise Error("machine %s was stopped while instance %s started"
                            % (machine.addr, instance_id))
            state = instance["State"]["Name"] if instance else "unknown"
            if state in _EC2_DEAD:
                raise Error(self._dead(instance))
            if state == "running":
                where = self._address(instance)
                if where:
                    return where
            if time.monotonic() > deadline:
                raise Error("instance %s was still %s, with no address, after %.0fs"
                            % (instance_id, state, self.boot_timeout))

    def _address(self, instance):
        address = self.address
        if isinstance(address, str):
            import importlib
            module, _, function = address.partition(":")
            address = self.address = getattr(importlib.import_module(module), function)
        if address is not None:
            where = address(instance)
            return (str(where[0]), int(where[1])) if where else None
        host = instance.get("PublicDnsName") or instance.get("PublicIpAddress") or \
            instance.get("PrivateIpAddress")
        return (host, self.port) if host else None

    @staticmethod
    def _dead(instance):
        reason = (instance.get("StateReason") or {}).get("Message") or \
            instance.get("StateTransitionReason") or "no reason given"
        return "instance %s is %s: %s" % (instance["InstanceId"], instance["State"]["Name"], reason)

    # -- watching (Go's monitor: see _EC2Monitor) ----------------------------------------

    def _instances_dead(self, instances):
        """The monitor found these instances shutting down or gone: their machines stop."""
        with self._cond:
            gone = [(self._machines.get(instance["InstanceId"]), instance)
                    for instance in instances]
        for machine, instance in gone:
            if machine is not None and machine.state is not STOPPED:
                log.debug("%s: %s", machine.addr, self._dead(instance))
                machine.report_stopped(Error(self._dead(instance)))

    def keepalive_failed(self, machine, error):
        # Go's monitor: a machine that does not answer may be an instance that is gone.
        with self._cond:
            instance_id = self._ids.get(machine)
        if instance_id is not None:
            self._monitor.want(instance_id)

    def lost(self, machine):
        with self._cond:
            instance_id = self._ids.get(machine)
        if instance_id is None:
            return False
        self._monitor.want(instance_id)
        return self._monitor.state(instance_id) in _EC2_DEAD

    def _machine_ended(self, machine, instance_id, status, output=""):
        """The output stream of machine ended: with its exit status, or broken (None); output
        is its last lines."""
        with self._cond:
            self._boots.pop(machine, None)
            expected = machine in self._stopping or self._closed or self._b.closed
        if status is None:
            if not expected:
                self.keepalive_failed(machine, None)      # is the instance still there?
            return
        why = status in (137, -signal.SIGKILL) and not expected and _killed_for_memory(
            None, machine._memory_seen, local=False)
        if expected and status == 0:
            err = Error("machine %s was shut down" % machine.addr)
        elif why:
            err = _out_of_memory("machine %s (instance %s)" % (machine.addr, instance_id), why)
        else:
            err = Error("machine %s (instance %s) %s%s" % (
                machine.addr, instance_id, _exit_reason(status),
                "; its last output:\n" + output if output and machine.state < RUNNING else ""))
        err.exit_code = status
        machine.report_stopped(err)

    # -- ending ---------------------------------------------------------------------------

    def terminate(self, machine, deadline):
        with self._cond:
            self._pending.pop(machine, None)
            self._stopping.add(machine)
            instance_id = self._ids.get(machine)
        if instance_id is not None:
            self._terminate([instance_id])

    def _terminate(self, ids):
        ids = sorted(set(ids))
        if self.keep_instances:
            log.warning("keeping EC2 instance%s %s (keep_instances=True); to end them: python "
                        "bigmachine.py ec2 kill --session %s", "s" if len(ids) > 1 else "",
                        ", ".join(ids), self.session)
            with self._cond:
                self._terminated.update(ids)
            return
        try:
            self.ec2.terminate_instances(InstanceIds=ids)
        except self._errors as e:
            if _aws_error_code(e) == "InvalidInstanceID.NotFound" and len(ids) > 1:
                for instance_id in ids:             # one that AWS does not know yet, or any more
                    self._terminate([instance_id])
                return
            log.warning("could not terminate EC2 instance%s %s: %s; to end what this session "
                        "left: python bigmachine.py ec2 kill --session %s",
                        "s" if len(ids) > 1 else "", ", ".join(ids), _aws_error(e), self.session)
            return
        with self._cond:
            self._terminated.update(ids)

    def shutdown(self):
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            ids = [i for i in self._machines if i not in self._terminated]
            boots = list(self._boots.values())
        self._monitor.close()
        if ids:
            self._terminate(ids)
        # Anything else of this session's (a launch the driver did not hear back from, say).
        try:
            pages = self.ec2.get_paginator("describe_instances").paginate(Filters=[
                {"Name": "tag:bigmachine:session", "Values": [self.session]},
                {"Name": "instance-state-name", "Values": list(_EC2_LIVE)}])
            left = [i["InstanceId"] for page in pages for r in page["Reservations"]
                    for i in r["Instances"] if i["InstanceId"] not in self._terminated]
        except self._errors as e:
            log.debug("listing the instances of session %s: %s", self.session, _aws_error(e))
            left = []
        if left:
            self._terminate(left)
        for boot in boots:
            boot.close()


class _EC2Monitor:
    """The instances of one EC2System session, watched (Go: ec2system/internal/monitor).

    One thread describes the instances someone asked about (`want`), in batches, at most once
    every poll_interval seconds; `describe_soon` waits for the next round's description of
    one. The instances it finds shutting down or gone go to the system's `_instances_dead`."""

    _BATCH = 200                          # instance ids in one describe_instances filter

    def __init__(self, system):
        self.system = system
        self._cond = threading.Condition()
        self._closed = False
        self._seen = {}                   # instance id -> its latest description
        self._wanted = set()              # instance ids to describe in the next round
        self._fresh = {}                  # instance id -> the round that last described it
        self._round = 0
        self._thread = None

    def want(self, instance_id):
        """Describe the instance in the next round."""
        with self._cond:
            self._want(instance_id)

    def _want(self, instance_id):
        # Called with self._cond held.
        if self._closed:
            return
        self._wanted.add(instance_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name="bigmachine-ec2-monitor")
            self._thread.start()
        self._cond.notify_all()

    def describe_soon(self, instance_id, timeout):
        """The instance's description from the next round (None if it has none)."""
        with self._cond:
            self._want(instance_id)
            asked = self._round
            self._cond.wait_for(lambda: self._closed or self._fresh.get(instance_id, -1) > asked,
                                timeout)
            return self._seen.get(instance_id)

    def state(self, instance_id):
        """The instance's state ("running"...) when it was last described, or None."""
        with self._cond:
            return (self._seen.get(instance_id) or {}).get("State", {}).get("Name")

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _watch(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wanted or self._closed)
                if self._closed:
                    return
                self._round += 1
                round_, ids = self._round, sorted(self._wanted)
                self._wanted.clear()
            found = self._describe(ids)
            with self._cond:
                self._seen.update(found)
                for instance_id in ids:
                    self._fresh[instance_id] = round_
                self._cond.notify_all()
            dead = [instance for instance in found.values()
                    if instance["State"]["Name"] in _EC2_DEAD]
            if dead:
                self.system._instances_dead(dead)
            with self._cond:
                self._cond.wait_for(lambda: self._closed, self.system.poll_interval)

    def _describe(self, ids):
        """{instance id: its description} for those of ids that EC2 describes."""
        found, system = {}, self.system
        try:
            for i in range(0, len(ids), self._BATCH):
                pages = system.ec2.get_paginator("describe_instances").paginate(
                    Filters=[{"Name": "instance-id", "Values": ids[i:i + self._BATCH]}])
                for page in pages:
                    for reservation in page["Reservations"]:
                        for instance in reservation["Instances"]:
                            found[instance["InstanceId"]] = instance
        except system._errors as e:
            log.debug("describing instances %s: %s", ", ".join(ids), _aws_error(e))
        return found


class _EC2Boot:
    """The driver's end of an EC2 machine's bootstrap: the version check, the upload, the
    start; then the machine's output stream (see the section's introduction)."""

    def __init__(self, system, machine, instance_id, host, port, context):
        self.system, self.machine, self.instance_id = system, machine, instance_id
        self.host, self.port, self.context = host, port, context
        self.prefix = "/%s/bigmachine/" % instance_id
        self.tail = collections.deque(maxlen=_ChildProcess._TAIL)    # to explain an early end
        self.output = _MachineOutput(system.output_rate, system.output_burst)
        self._sock = None
        self._closed = False

    def _request(self, method, what, body=b"", timeout=60.0):
        """One request on a connection of its own: (status, body text, the socket, its reader)."""
        raw = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            sock = self.context.wrap_socket(raw)
        except BaseException:
            raw.close()
            raise
        try:
            sock.sendall(("%s %s%s HTTP/1.1\r\nHost: %s:%d\r\nContent-Length: %d\r\n"
                          "Connection: close\r\nBigmachine-Python: %s\r\n\r\n" % (
                              method, self.prefix, what, self.host, self.port, len(body),
                              PYTHON)).encode("ascii"))
            if body:
                sock.sendall(body)
            rfile = sock.makefile("rb")
            status, _, text = _read_http_response(rfile)
        except BaseException:
            sock.close()
            raise
        return status, text, sock, rfile

    def _call(self, method, what, body=b"", timeout=60.0):
        status, text, sock, rfile = self._request(method, what, body, timeout)
        rfile.close()
        sock.close()
        if status != 200:
            raise Error("the bootstrap of instance %s (%s:%d) answered %s %s with HTTP %d: %s" % (
                self.instance_id, self.host, self.port, method, what, status, text.strip()))
        return text

    def _hello(self, deadline):
        """Ask the bootstrap which Python it runs, waiting for it to come up."""
        waits = Backoff(0.05, 2.0, 1.5).waits()
        while True:
            if self.machine.state is STOPPED or self.system._closed:
                raise Error("machine %s was stopped while it started" % self.machine.addr)
            try:
                return json.loads(self._call("GET", "boot", timeout=10.0))
            except ssl.SSLCertVerificationError as e:
                why = AuthenticationError("%s:%d is not a machine of this session: %s"
                                          % (self.host, self.port, e))
            except (OSError, EOFError, ValueError) as e:
                why = e
            instance = self.system._monitor.describe_soon(self.instance_id, 0)
            if instance is not None and instance["State"]["Name"] in _EC2_DEAD:
                raise Error("%s, before its bootstrap answered (its console output may say why: "
                            "aws ec2 get-console-output --instance-id %s)"
                            % (self.system._dead(instance), self.instance_id))
            wait = next(waits)
            if time.monotonic() + wait > deadline:
                if isinstance(why, Error):
                    raise why
                raise Error("the bootstrap of instance %s did not answer at %s:%d in %.0fs: %s" % (
                    self.instance_id, self.host, self.port, self.system.boot_timeout, why))
            self.machine.wait(STOPPED, wait)

    def run(self, bundle, config, deadline):
        info = self._hello(deadline)
        if info.get("python") != PYTHON:
            raise VersionMismatch(
                "the driver runs Python %s (%s); instance %s runs Python %s (%s): its image has no "
                "python%s and could not install it. Give EC2System an ami with Python %s, or run "
                "the driver on Python %s" % (PYTHON, sys.executable, self.instance_id,
                                             info.get("python"), info.get("executable"), PYTHON,
                                             PYTHON, info.get("python")))
        self._call("PUT", "bundle/" + bundle.sha256, bundle.data,
                   timeout=max(60.0, deadline - time.monotonic()))
        log.debug("sent the code bundle %s (%d files, %d bytes) to instance %s",
                  bundle.sha256[:12], len(bundle.files), len(bundle.data), self.instance_id)
        # The machine's own key, made on the instance by the bundle's bigmachine; the driver
        # certifies its public half. No key of a machine ever travels.
        made = json.loads(self._call("POST", "key", json.dumps({
            "bundle": bundle.sha256, "library": bundle.library}).encode()))
        certificate = self.system._b.issue_certificate(
            "bigmachine ec2 machine", public_key=bytes.fromhex(made["public_key"]))
        body = json.dumps({"bundle": bundle.sha256, "library": bundle.library,
                           "config": config, "cert": certificate.cert_pem}).encode()
        status, text, sock, rfile = self._request("POST", "start", body)
        line = rfile.readline() if status == 200 else b""
        if not line.startswith(_MARK.encode() + b" started "):
            rfile.close()
            sock.close()
            raise Error("the bootstrap of instance %s did not start the machine: HTTP %d %s"
                        % (self.instance_id, status, (text or line.decode("utf-8", "replace"))
                           .strip()))
        # The stream lasts as long as the machine: no timeout, but TCP keepalives.
        sock.settimeout(None)
        for option, value in (("SO_KEEPALIVE", 1), ("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 20),
                              ("TCP_KEEPCNT", 6)):
            if hasattr(socket, option):
                level = socket.SOL_SOCKET if option == "SO_KEEPALIVE" else socket.IPPROTO_TCP
                with contextlib.suppress(OSError):
                    sock.setsockopt(level, getattr(socket, option), value)
        self._sock = sock
        if self._closed:
            self.close()
        threading.Thread(target=self._forward, args=(rfile,), name="bigmachine-ec2-output",
                         daemon=True).start()

    def _forward(self, rfile):
        status = None
        try:
            for line in iter(rfile.readline, b""):
                if line.startswith(_MARK.encode() + b" exited "):
                    with contextlib.suppress(ValueError, IndexError):
                        status = int(line.split()[2])
                else:
                    # Printed lines to the driver's stderr, logging records to its logging.
                    self.tail.append(self.output.line(line, self.machine.addr + ": ",
                                                      self.machine.addr))
        except (OSError, ValueError) as e:
            log.debug("%s: the output stream broke: %s", self.machine.addr, e)
        finally:
            with contextlib.suppress(OSError):
                rfile.close()
            self.close()
            self.output.close(self.machine.addr + ": ")
        self.system._machine_ended(self.machine, self.instance_id, status,
                                   "".join(self.tail).rstrip())

    def close(self):
        self._closed = True
        sock = self._sock
        if sock is not None:
            _shut_and_close(sock)


# --------------------------------------------------------------------------------------
# Enrolment: machines that dial the driver, carrying nothing but a one-time token
# --------------------------------------------------------------------------------------
#
# Local, SSH and EC2 machines are started by a driver that can talk to them from the first
# moment: over a pipe, an ssh channel, or a bootstrap the driver dials. A scheduler (Slurm,
# Kubernetes) or a cloud's metadata (GCP) only runs a command for us, later, somewhere not
# known in advance, and stores that command where its administrators can read it for as long
# as they like. So such a machine comes up by *enrolling*: it dials the driver.
#
# `b.enrol(machine)` makes a one-time token for that machine and returns an `Enrolment`, whose
# `command()` is a shell command holding only the token, the driver's address, the SHA-256 of
# the certificate the driver's enrolment server presents, and a small self-contained stage (the
# bundle functions and `_enrol_stage`). No key. Run anywhere that can reach the driver, it:
#   1. connects to the driver over TLS and checks the server's certificate against the hash
#      it carries: the driver is authenticated before anything is sent;
#   2. sends the token. The driver accepts a token once, only while the machine waits for
#      it, and only if it names a machine that is still starting; it then sends the code
#      bundle, unless the host's cache holds it already (see Code bundles);
#   3. unpacks the bundle, imports bigmachine from it, makes the machine's own Ed25519 key and
#      its listening socket, and sends the public key and the port;
#   4. gets back a certificate for that key, issued by the session CA for the address the
#      driver saw it come from, the CA's certificate and the machine's bootstrap configuration.
#      The driver readdresses the Machine to https://THAT-ADDRESS:PORT/;
#   5. runs the machine in a child process on that socket, and streams its output back over
#      the same connection until it exits, then its exit status, as EC2's bootstrap does.
# The private key never leaves the machine. What the command holds is useless once the machine
# has enrolled, once the system revokes it (Slurm: a boot timeout after the job started), and
# once the driver is gone; whoever reads it first can enrol in the machine's place, which the
# real machine then finds refused, and the driver reports.
#
# The driver serves enrolments on one TLS port per session (`_EnrolmentServer`), opened by the
# first `b.enrol`; it reads JSON lines, never a pickle.

def _enrol_stage(settings):
    """The first stage of an enrolling machine (see the section's introduction): reach the
    driver, check it is the one expected, present the token, get the code bundle, and hand over
    to bigmachine's `_enrolled` from the bundle. Returns the exit status. Self-contained: it runs
    before bigmachine.py is on the host."""
    import hashlib
    import importlib
    import importlib.util
    import json
    import os
    import shutil
    import socket
    import ssl
    import sys
    import time

    def say(text):
        sys.stderr.write("bigmachine enrolment: %s\n" % text)
        sys.stderr.flush()

    host, port = settings["driver"]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE          # checked below, by the certificate's hash
    deadline = time.monotonic() + settings["wait"]
    while True:
        try:
            raw = socket.create_connection((host, port), timeout=30)
            try:
                # Its messages are small and each waits for an answer: none may wait for the
                # ACK of the one before (Nagle's algorithm against delayed ACKs: 40 ms each).
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = context.wrap_socket(raw)
            except BaseException:
                raw.close()
                raise
            break
        except OSError as e:
            if time.monotonic() > deadline:
                say("cannot reach the driver at %s:%d for %ds: %s" % (host, port,
                                                                     settings["wait"], e))
                return 1
            time.sleep(1)
    if hashlib.sha256(conn.getpeercert(True)).hexdigest() != settings["fingerprint"]:
        say("%s:%d is not this machine's driver: its certificate is not the one expected"
            % (host, port))
        return 1
    rfile = conn.makefile("rb")

    def send(message):
        conn.sendall(json.dumps(message).encode() + b"\n")

    def receive():
        line = rfile.readline()
        if not line:
            raise EOFError("the driver closed the connection")
        return json.loads(line.decode())

    send({"token": settings["token"], "python": "%d.%d" % sys.version_info[:2],
          "executable": sys.executable, "host": socket.gethostname()})
    reply = receive()
    if "error" in reply:
        say("the driver refused this machine: %s" % reply["error"])
        return 1

    def fetch():
        send("need")
        data = rfile.read(reply["size"])
        if len(data) != reply["size"]:
            raise EOFError("the code bundle was cut short")
        return data

    root = _bundle_root()
    bundle = _bundle_install(root, reply["bundle"], fetch)
    send("have")
    # bigmachine.py's code, compiled by the driver: the same Python (major.minor and bytecode
    # magic) need not compile it again on every machine.
    compiled = rfile.read(reply.get("compiled_size") or 0)
    workdir = _machine_workdir(root)
    try:
        code = _bundle_unpack(bundle, os.path.join(workdir, "code"))
        sys.path.insert(0, code)
        name, library = reply["library"], None
        if compiled and "." not in name and reply.get("magic") == \
                importlib.util.MAGIC_NUMBER.hex():
            import _imp
            import marshal
            path = os.path.join(code, name + ".py")
            program = marshal.loads(compiled)
            _imp._fix_co_filename(program, path)
            library = _exec_module(name, path, program)
        if library is None:
            library = importlib.import_module(name)
        return library._enrolled(conn, rfile, code, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _enrolled(conn, rfile, code, workdir):
    """The rest of an enrolling machine's first stage, from the bundle's bigmachine: make the
    machine's key and socket, get its certificate, run it, stream its output. Returns the exit
    status."""

    def send(message):
        conn.sendall(json.dumps(message).encode() + b"\n")

    key = _Ed25519Key()
    # Listen on the address this host reached the driver from: the driver and the other
    # machines reach it there too.
    listener = socket.create_server((conn.getsockname()[0], 0), backlog=512)
    send({"public_key": key.public.hex(), "port": listener.getsockname()[1]})
    line = rfile.readline()
    reply = json.loads(line.decode()) if line else {"error": "the driver closed the connection"}
    if "error" in reply:
        _write_stderr("bigmachine enrolment: refused: %s\n" % reply["error"])
        return 1
    config = dict(reply["config"], fd=listener.fileno(), announce_serving=True, credentials={
        "cert_pem": reply["cert"], "key_pem": _private_key_pem(key), "ca_pem": reply["ca"]})
    main = config["main"]
    if main.get("packages") and reply.get("dists") is not None:
        # The driver's distributions (see Packages): when this host has them all already, or
        # their files from an earlier machine, the machine loads main at once, without the
        # driver's round trips of the package stage; else that stage gets what is missing.
        try:
            stage = _PackageStage(os.path.dirname(workdir), main["packages"])
            if not stage.missing({"dists": reply["dists"]}):
                config["packages_path"] = stage._assemble() or ""
                config["main"] = dict(main, packages=None)
        except Exception as e:
            _write_stderr("bigmachine enrolment: the package cache: %s\n" % e)
    # The machine is a child of this process, forked: it has bigmachine loaded already (no
    # second interpreter to start), and this process stays to tell the driver how it ended.
    # Its stdin is a pipe from here: EOF means this process died, and the machine exits.
    output_r, output_w = os.pipe()
    input_r, input_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()                   # no threads yet: forking is safe
    if pid == 0:
        status = 1
        try:
            os.close(conn.fileno())   # the driver's stream is this process's business
            os.dup2(input_r, 0)
            os.dup2(output_w, 1)
            os.dup2(output_w, 2)
            for fd in (output_r, output_w, input_r, input_w):
                os.close(fd)
            _machine_main(bootstrap=config, code=code, workdir=workdir)   # never returns
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    for fd in (output_w, input_r):
        os.close(fd)
    listener.close()                  # the machine's now
    conn.settimeout(None)
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    stream = [conn]

    def forward(data):
        if stream:
            try:
                stream[0].sendall(data)
            except OSError:
                del stream[:]         # the driver went: the machine's lease ends it soon
        else:
            _write_stderr(data.decode("utf-8", "replace"))

    forward(b"%s started %d\n" % (_MARK.encode(), pid))
    with os.fdopen(output_r, "rb") as output:
        for line in iter(output.readline, b""):
            forward(line)
    _, status = os.waitpid(pid, 0)
    os.close(input_w)
    status = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    forward(b"%s exited %d\n" % (_MARK.encode(), status))
    with contextlib.suppress(OSError):
        conn.close()
    return status if status >= 0 else 128 - status


def _enrol_source():
    """The enrolment stage's source, compressed, as a Python expression that defines it."""
    packed = _shipped_source("enrol", packed=True).replace("\n", "")     # one line
    return "exec(zlib.decompress(base64.b64decode(%r)))" % packed


def _enrol_program(settings, pick=None):
    """A Python program (source) that enrols with settings; pick, if given, is an expression
    choosing settings["token"] among settings["tokens"] (one script for a job array)."""
    lines = ["import base64, os, sys, zlib", _enrol_source(), "settings = %r" % (settings,)]
    if pick:
        lines.append("settings['token'] = settings.pop('tokens')[%s]" % pick)
    lines.append("sys.exit(_enrol_stage(settings))")
    return "\n".join(lines) + "\n"


class Enrolment:
    """One machine's admission to a session by a one-time token: see `B.enrol` and the
    Enrolment section of bigmachine.py."""

    def __init__(self, server, machine, token, bundle, env, on_exit):
        self.machine, self.token = machine, token
        self._server, self._bundle, self._env, self._on_exit = server, bundle, env, on_exit
        self._enrolled = threading.Event()
        self._done = threading.Event()        # enrolled, refused or revoked: no waiting more
        self.error = None                     # why it was refused, if it was

    def settings(self, wait):
        """What the stage needs: the driver's address, its certificate's hash, the token;
        wait is how long the stage keeps trying to reach the driver."""
        return {"driver": [self._server.host, self._server.port],
                "fingerprint": self._server.fingerprint, "token": self.token,
                "wait": int(wait)}

    def command(self, python="python3", wait=60):
        """A shell command that brings the machine up wherever it runs, given the Python
        (same major.minor as the driver's) to run there; wait is how many seconds it keeps
        trying to reach the driver."""
        import shlex
        return "%s -u -c %s" % (shlex.quote(python),
                                shlex.quote(_enrol_program(self.settings(wait))))

    @property
    def enrolled(self) -> bool:
        return self._enrolled.is_set()

    def wait(self, timeout=None) -> bool:
        """Wait until the machine has enrolled (True: its address is set, it serves), or was
        refused (raises the reason), or timeout seconds pass or it ended before it served
        (False)."""
        self._done.wait(timeout)
        if self.error is not None:
            raise self.error
        return self._enrolled.is_set()

    def revoke(self):
        """Make the token useless from now on (the machine stopped, or took too long)."""
        self._server.forget(self.token)
        self._done.set()

    def _refuse(self, error):
        self.error = error
        self._server.forget(self.token)
        self._done.set()


class _EnrolmentServer:
    """The driver's end of enrolment, one per session (see the section's introduction)."""

    def __init__(self, b, host, port=0):
        self.b = b
        self.host = host
        try:
            _ip_address_bytes(host)
            bind = host
        except ValueError:
            bind = ""                          # a name: every interface
        self._listener = socket.create_server((bind, port), backlog=128, family=socket.AF_INET6
                                              if ":" in bind else socket.AF_INET)
        self.port = self._listener.getsockname()[1]
        names = {}
        if bind:
            names["ip_addresses"] = [host]
        credentials = b.issue_certificate("bigmachine enrolment", **names)
        self.fingerprint = _sha256_hex(ssl.PEM_cert_to_DER_cert(credentials.cert_pem))
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        credentials.load_into(self._context)
        self._lock = threading.Lock()
        self._tokens = {}                      # token -> Enrolment
        self._closed = False
        self._conns = set()
        self._slots = threading.BoundedSemaphore(256)    # connections served at once, at most
        threading.Thread(target=self._accept, name="bigmachine-enrolment", daemon=True).start()

    def add(self, machine, bundle, env, on_exit):
        token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
        enrolment = Enrolment(self, machine, token, bundle, env, on_exit)
        with self._lock:
            self._tokens[token] = enrolment
        return enrolment

    def forget(self, token):
        with self._lock:
            self._tokens.pop(token, None)

    def _accept(self):
        while True:
            try:
                raw, peer = self._listener.accept()
            except OSError:
                return
            if self._slots.acquire(False):
                threading.Thread(target=self._serve, args=(raw, peer), name="bigmachine-enrol",
                                 daemon=True).start()
            else:
                raw.close()               # as many handshakes at once as it will take

    def _serve(self, raw, peer):
        _block_async_signals()
        enrolment = conn = None
        try:
            raw.settimeout(30)
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)    # as the stage's
            try:
                conn = self._context.wrap_socket(raw, server_side=True)
            except (OSError, ValueError) as e:
                log.debug("enrolment from %s: TLS failed: %s", peer[0], e)
                raw.close()
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            rfile = conn.makefile("rb")
            enrolment = self._enrol(conn, rfile, peer)
            if enrolment is not None:
                self._stream(enrolment, conn, rfile)
        except Exception as e:
            log.debug("enrolment from %s failed: %s", peer[0], e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                (conn or raw).close()
            self._slots.release()

    def _enrol(self, conn, rfile, peer):
        def send(message):
            conn.sendall(json.dumps(message).encode() + b"\n")

        def receive():
            line = rfile.readline(1 << 16)
            if not line:
                raise EOFError("the machine closed the connection")
            return json.loads(line.decode())

        hello = receive()
        token = hello.get("token") if isinstance(hello, dict) else None
        with self._lock:
            enrolment = self._tokens.pop(token, None) if isinstance(token, str) else None
        machine = enrolment.machine if enrolment is not None else None
        if enrolment is None or machine.state is STOPPED or self.b.closed:
            log.warning("refused an enrolment from %s: its token is unknown, used already, "
                        "or expired", peer[0])
            send({"error": "this token is unknown, used already, or expired"})
            return None
        try:
            return self._admit(enrolment, conn, rfile, peer, hello, send, receive)
        except Exception as e:
            # The token is spent: whatever broke, its machine will not come up this way.
            enrolment._refuse(Error("machine %s: its enrolment from %s failed: %s"
                                    % (machine.addr, peer[0], e)))
            raise

    def _admit(self, enrolment, conn, rfile, peer, hello, send, receive):
        machine = enrolment.machine
        if hello.get("python") != PYTHON:
            send({"error": "the driver runs Python %s" % PYTHON})
            enrolment._refuse(VersionMismatch(
                "the driver runs Python %s (%s); machine %s, on host %s, runs Python %s (%s)"
                % (PYTHON, sys.executable, machine.addr, hello.get("host"), hello.get("python"),
                   hello.get("executable"))))
            return None
        bundle = enrolment._bundle
        if isinstance(bundle, concurrent.futures.Future):
            bundle = bundle.result()          # a system that enrols while it is being made
        magic, compiled = _compiled_library(bundle)
        send({"bundle": bundle.sha256, "size": len(bundle.data), "library": bundle.library,
              "magic": magic, "compiled_size": len(compiled)})
        while True:
            answer = receive()
            if answer == "need":
                conn.sendall(bundle.data)
                log.debug("sent the code bundle %s (%d bytes) to %s", bundle.sha256[:12],
                          len(bundle.data), peer[0])
            elif answer == "have":
                break
            else:
                raise Error("unexpected answer %r" % (answer,))
        conn.sendall(compiled)
        conn.settimeout(self.b.system.boot_timeout)     # it unpacks and imports meanwhile
        keys = receive()
        public_key, port = bytes.fromhex(keys["public_key"]), int(keys["port"])
        host = peer[0]
        credentials = self.b.issue_certificate("bigmachine enrolled machine",
                                               ip_addresses=[host], public_key=public_key)
        addr = "https://%s:%d/" % (_url_host(host), port)
        self.b.readdress(machine, addr)
        env = dict(enrolment._env, BIGMACHINE_MODE="machine",
                   BIGMACHINE_SYSTEM=self.b.system.name)
        config = _machine_bootstrap(self.b.system, None, bundle.main, addr=addr, env=env)
        shipped = bundle.packages
        send({"cert": credentials.cert_pem, "ca": credentials.ca_pem, "config": config,
              "dists": shipped.manifest if shipped and shipped.kind == "files" else None})
        line = rfile.readline()
        if not line.startswith(_MARK.encode() + b" started "):
            raise Error("the machine did not start: %r" % line[:200])
        return enrolment

    def _stream(self, enrolment, conn, rfile):
        """The machine's output, to the driver's stderr, until it exits; then its on_exit."""
        machine = enrolment.machine
        system = self.b.system
        output = _MachineOutput(system.output_rate, system.output_burst)
        tail = collections.deque(maxlen=_ChildProcess._TAIL)
        prefix = machine.addr + ": "
        status = None
        conn.settimeout(None)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        try:
            for line in iter(rfile.readline, b""):
                if line.startswith(_MARK.encode() + b" exited "):
                    with contextlib.suppress(ValueError, IndexError):
                        status = int(line.split()[2])
                elif line.startswith(_MARK.encode() + b" serving"):
                    enrolment._enrolled.set()         # it serves: launch may return
                    enrolment._done.set()
                elif not line.startswith(_MARK.encode() + b" "):
                    tail.append(output.line(line, prefix, machine.addr))
        except (OSError, ValueError) as e:
            log.debug("%s: the enrolment stream broke: %s", machine.addr, e)
        finally:
            output.close(prefix)
        enrolment._on_exit(machine, status, "".join(tail).rstrip())
        enrolment._done.set()                 # it ended, if it had not served

    def close(self):
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns), set()
            enrolments, self._tokens = list(self._tokens.values()), {}
        with contextlib.suppress(OSError):
            self._listener.close()
        for conn in conns:
            _shut_and_close(conn)
        for enrolment in enrolments:
            enrolment._done.set()


def _resolve(future, fn, *args):
    """Run fn(*args) into future (in a thread of its own)."""
    try:
        future.set_result(fn(*args))
    except BaseException as e:
        future.set_exception(e)


def _sha256_hex(data):
    import hashlib
    return hashlib.sha256(data).hexdigest()


_compiled = {}                        # bundle sha256 -> (bytecode magic, marshalled code)


def _compiled_library(bundle):
    """bigmachine.py as the bundle holds it, compiled once per bundle: what an enrolling
    machine of the same Python runs instead of compiling it itself (b"" if it cannot be)."""
    import importlib.util
    import marshal
    found = _compiled.get(bundle.sha256)
    if found is None:
        import zipfile
        name = bundle.library.replace(".", "/") + ".py"
        try:
            with zipfile.ZipFile(io.BytesIO(bundle.data)) as archive:
                source = archive.read(name)              # exactly what the machine unpacks
            found = _own_compiled_code(source)
            if found is None:
                found = marshal.dumps(compile(source, name, "exec", dont_inherit=True))
        except (KeyError, SyntaxError, ValueError):
            found = b""
        _compiled.clear()                 # the newest bundle's only
        _compiled[bundle.sha256] = found
    return importlib.util.MAGIC_NUMBER.hex(), found


def _own_compiled_code(source):
    """This module's compiled code (marshalled) if source is this module's own, from the cache
    on disk that Local machines load theirs from (see `_compiled_module`): compiling it takes
    longer than starting a machine does, and the file is there from any earlier driver of this
    version. None if source is another or there is no such file."""
    try:
        with open(os.path.abspath(__file__), "rb") as f:
            if f.read() != source:
                return None
        path = _compiled_module()
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _enrolled_exit(machine, status, output):
    """What stops an enrolled machine by default when its process ends: its exit status (None:
    the connection broke)."""
    if status is None:
        err = Error("machine %s: lost (its enrolment connection broke)" % machine.addr)
    else:
        err = Error("machine %s %s%s" % (
            machine.addr, _exit_reason(status),
            "; its last output:\n" + output if output and machine.state < RUNNING else ""))
        err.exit_code = status
    machine.report_stopped(err)


# --------------------------------------------------------------------------------------
# Slurm: machines as jobs on an HPC cluster
# --------------------------------------------------------------------------------------
#
# On a cluster the driver runs on a login node, and compute nodes are reached only through the
# scheduler. Each machine is a job, submitted through the cluster's own commands (so SLURM_CONF
# and the user's Slurm defaults apply), with `cpus` CPUs (its maxprocs), `mem` MiB, a
# `time_limit` in minutes, in `partition` under `account`, plus any `sbatch_args`. How:
#   submit="srun" (the default): `b.start(n)` runs n `srun`s at once, one job each. srun asks
#     the controller for its allocation and gets it in that call if nodes are free, and starts
#     the job's process at once: a machine's start costs what a bare srun costs, and the
#     driver learns that the job ended the moment its srun exits. The job's command is a
#     one-line loader; the enrolment program with the machine's token follows on srun's stdin,
#     which Slurm forwards to the job and never stores, and which is in no process's
#     arguments. The price: an srun process on the login node per machine, which ends its job
#     when the machine ends (its lease, when the driver is gone); an srun killed outright
#     leaves its job to the cluster's InactiveLimit (or to `slurm kill`).
#   submit="sbatch": one `sbatch` job array of n tasks, each task a machine, whose script
#     holds the enrolment program with one token per task. One command and no process left
#     on the login node, however large n; but batch jobs start at slurmctld's next scheduling
#     pass, which comes at most every batch_sched_delay (3 s by default), not at submission.
# A job that starts enrols (see Enrolment): what it carries is nothing that outlives the
# machine's start, and the code bundle, the machine's certificate and its configuration travel
# over the enrolment's TLS connection, whether or not the cluster shares a filesystem. The
# bundle is made while the jobs are being allocated: a machine needs it only once it enrols.
# The machine reports its address as it enrols, and the other machines reach it there, as the
# driver does.
#
# Watching. One thread per session asks `squeue` about the session's jobs every
# poll_interval seconds (it is not on the way to RUNNING: a machine is up when it enrols). A pending task's machine is STARTING, and says why it waits (Slurm's
# reason: Resources, Priority...) on the status page; a task that has run for boot_timeout
# without enrolling is cancelled and its token revoked. A task that leaves the queue (or shows
# an ending state) stops its machine with an error naming the job and Slurm's state and reason
# (CANCELLED, TIMEOUT, PREEMPTED, NODE_FAIL, OUT_OF_MEMORY, FAILED...), from `scontrol show
# job`, which remembers a job for MinJobAge (300 s by default) after it ends. A machine whose
# process exits while its job goes on says how it exited.
#
# Ending. `b.shutdown()` ends every srun (on SIGTERM srun cancels a pending allocation, or
# ends its running job) and cancels every job of the session (`scancel --name`); a machine whose
# driver is killed ends within its lease (its watchdog), and its job with it; a task that
# starts after its driver is gone finds no driver and ends. Jobs are named
# bigmachine-SESSION, with the user's program in their comment, and `python bigmachine.py
# slurm list` / `slurm kill [SESSION]` find and end whatever is left.

#: Reasons for which a pending job would wait for ever (unless an administrator changes the
#: cluster): a cluster that does not enforce its partitions' limits at submission accepts such
#: jobs and leaves them PENDING with one of these.
_SLURM_NEVER = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
                "InvalidAccount", "InvalidQOS", "AccountNotAllowed", "QOSNotAllowed",
                "DependencyNeverSatisfied", "FrontEndDown")

#: Job states in which a task is still on its way or running (squeue's long names).
_SLURM_LIVE = ("PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
               "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD")


#: What srun runs on the node: the enrolment program follows on its stdin, as one line.
_SRUN_LOADER = "import sys; exec(sys.stdin.readline())"


def _srun_job(line):
    """The job id in srun's words for it (--verbose), or None: "srun: jobid 12: nodes(1):..."
    once allocated, "srun: job 12 queued and waiting for resources" while pending, and as it
    starts the job's process "srun: launching StepId=12.0 on host..." ("12.0" before Slurm
    21)."""
    words = line.split()
    if len(words) > 3 and words[0] == "srun:" and words[1] in ("job", "jobid"):
        job = words[2].rstrip(":")
        if job.isdigit() and (words[1] == "jobid" or words[3] == "queued"):
            return job
    if len(words) > 2 and words[:2] == ["srun:", "launching"]:
        job = words[2].split("=")[-1].split(".")[0]
        if job.isdigit():
            return job
    return None


#: Variables that would make srun start a step of the driver's own job instead of a new job.
_SLURM_ALLOCATION_VARIABLES = ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_ID", "SLURM_STEPID",
                               "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_NNODES", "SLURM_NODELIST",
                               "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES")


class _Srun:
    """One machine's srun process (submit="srun"): its job id once srun says it, and what it
    said that was not chatter."""

    def __init__(self, proc):
        self.proc = proc
        self.job = None
        self.pending = False                  # the job waits in the queue
        self.known = threading.Event()        # the job id is known, or srun ended
        self.tail = collections.deque(maxlen=20)
        self.settled = threading.Event()      # b.start has its machines, or has given up

    def said(self):
        return "; ".join(self.tail)

    def signal(self):
        """Ask srun to end its job: on SIGTERM it cancels a pending allocation, or ends the
        running step and releases the job."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.terminate()

    def end(self, deadline):
        """End srun and its job by deadline; False if it had to be killed (its job may live)."""
        import subprocess
        self.signal()
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                self.proc.kill()
            self.proc.wait()
            return False


def _slurm_run(args, what, input=None, timeout=60.0):
    """Run a Slurm command; its stdout, or an Error naming what failed and why."""
    import shutil
    import subprocess
    if shutil.which(args[0]) is None:
        raise Error("the Slurm system needs %s, which is not on PATH: run the driver where the "
                    "cluster's commands are (a login node), or put them on PATH" % args[0])
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.access(conf, os.R_OK):
        # Slurm's commands would retry reading it for a minute before failing.
        raise Error("SLURM_CONF=%s names no readable file (%s): point it at the cluster's "
                    "slurm.conf, or unset it" % (conf, "it is not there" if not
                                                 os.path.exists(conf) else "not readable"))
    try:
        done = subprocess.run(args, input=input, capture_output=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise Error("%s did not answer in %.0fs (%s): is the Slurm controller up%s?" % (
            args[0], timeout, what, ", and SLURM_CONF=%s right" % conf if conf else "")) from None
    if done.returncode != 0:
        why = done.stderr.decode("utf-8", "replace").strip() or _exit_reason(done.returncode)
        raise Error("%s failed (%s): %s%s" % (
            args[0], what, why, " (SLURM_CONF=%s)" % conf if conf else ""))
    return done.stdout.decode("utf-8", "replace")


class SlurmSystem(System):
    """Machines as jobs on a Slurm cluster: one srun (a job) per machine, or with
    submit="sbatch" one sbatch job array per `b.start`, a task per machine. See the section's
    introduction and the README's Slurm section.

    cpus is each machine's CPUs (--cpus-per-task, its maxprocs), mem its memory in MiB (--mem),
    time_limit its time in minutes (--time), partition and account as for sbatch; sbatch_args
    go last on sbatch's command line. python runs the machines on the compute nodes (same
    major.minor as the driver's; default python3). driver_host is the driver's address as the
    compute nodes reach it (default: this host's fully qualified name) and driver_port the
    port it serves enrolments on (default: any free one). output is where the jobs' own output
    goes (--output; the machines' output comes to the driver anyway). setup is shell
    code the job runs first (`module load python/3.11`, activating an environment). submit is
    "srun" (the default: sbatch_args then go to srun, which takes the same options for what a
    job gets) or "sbatch". On the command line: --bigm.system=slurm with
    --bigm.slurm.partition=P, --bigm.slurm.cpus=N and so on, or the variables
    BIGMACHINE_SLURM_PARTITION and so on."""

    name = "slurm"
    #: seconds between two looks at the session's jobs (squeue)
    poll_interval = 1.0

    def __init__(self, *, partition=None, cpus=1, mem=None, time_limit=None, account=None,
                 sbatch_args=(), python=None, driver_host=None, driver_port=0,
                 output="/dev/null", setup="", submit="srun", **keepalive):
        super().__init__(**keepalive)
        if submit not in ("srun", "sbatch"):
            raise ValueError("submit must be 'srun' (a job per machine, each started as soon as "
                             "it is allocated) or 'sbatch' (one job array), not %r" % (submit,))
        for name, value in (("cpus", cpus), ("mem", mem), ("time_limit", time_limit)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError("%s must be a positive whole number, not %r" % (name, value))
        if cpus is None:
            raise ValueError("cpus must be a positive whole number, not None")
        if isinstance(sbatch_args, str):
            import shlex
            sbatch_args = shlex.split(sbatch_args)
        self.partition = partition
        self.cpus = cpus
        self.mem = mem
        self.time_limit = time_limit
        self.account = account
        self.sbatch_args = tuple(str(a) for a in sbatch_args)
        self.python = python or "python3"
        self.driver_host = driver_host
        self.driver_port = int(driver_port or 0)
        self.output = output
        self.setup = str(setup or "")
        self.submit = submit
        self.session = None
        self._b = None
        self._cond = threading.Condition()
        self._generation = 0              # one per session: a monitor serves one session
        self._reset()

    def _reset(self):
        self._generation += 1
        self._closed = False
        self._jobs = {}                   # Machine -> "JOBID_TASK"
        self._machines = {}               # "JOBID_TASK" -> Machine
        self._enrolments = {}             # Machine -> Enrolment
        self._running_since = {}          # Machine -> time.monotonic() its task began running
        self._ending = set()              # Machines terminated: their job's end is expected
        self._gone = set()                # Machines whose process is known to have ended
        self._signalled = {}              # Machine -> its err, if a signal ended its process
        self._sruns = {}                  # Machine -> its srun process (submit="srun")
        self._submitted = False
        self._serial = itertools.count()  # provisional addresses, unique in the session
        self._monitor = None
        self._wake = threading.Event()

    def __repr__(self):
        return "<slurm system: %d cpus%s>" % (
            self.cpus, " in partition %s" % self.partition if self.partition else "")

    @classmethod
    def _command_line_options(cls, argv, environ):
        options = {}

        def value(flag):
            return _flag_or_variable(argv, environ, "bigm.slurm." + flag,
                                     "BIGMACHINE_SLURM_" + flag.upper())

        for flag in ("partition", "account", "python", "driver_host", "output", "setup",
                     "submit"):
            given = value(flag)
            if given:
                options[flag] = given
        for flag in ("cpus", "mem", "time_limit", "driver_port"):
            given = value(flag)
            if given:
                try:
                    options[flag] = int(given)
                except ValueError:
                    raise ValueError("--bigm.slurm.%s must be a whole number, not %r"
                                     % (flag, given)) from None
        given = value("sbatch_args")
        if given:
            import shlex
            options["sbatch_args"] = shlex.split(given)
        return options

    def maxprocs(self):
        return self.cpus

    def init(self, b):
        with self._cond:
            self._reset()
        self._b = b
        self.session = os.urandom(6).hex()

    @property
    def job_name(self):
        """The name of this session's jobs: bigmachine-SESSION."""
        return "bigmachine-%s" % self.session

    # -- machines -------------------------------------------------------------------------

    def _check_request(self):
        """What sbatch may accept and leave pending for ever, refused here with a clear error:
        a partition that does not exist, more CPUs or memory than any of its nodes has."""
        import shutil
        if shutil.which(self.submit) is None:
            raise Error("the Slurm system needs %s, which is not on PATH: run the driver where "
                        "the cluster's commands are (a login node), or put them on PATH"
                        % self.submit)
        out = _slurm_run(["sinfo", "--noheader", "--format=%P|%c|%m"],
                         "reading the cluster's partitions", timeout=30.0)
        partitions, default = {}, None
        for line in out.split():
            fields = line.split("|")
            if len(fields) != 3:
                continue
            name = fields[0].rstrip("*")
            if fields[0].endswith("*"):
                default = name
            sizes = [int(f.rstrip("+")) if f.rstrip("+").isdigit() else 0 for f in fields[1:]]
            known = partitions.setdefault(name, [0, 0])
            partitions[name] = [max(known[0], sizes[0]), max(known[1], sizes[1])]
        if any(a in ("-p", "--partition") or a.startswith("--partition=")
               for a in self.sbatch_args) or (self.partition and "," in self.partition):
            return                        # the user's own choice: sbatch judges it
        name = self.partition or default
        if name is None:
            return
        if name not in partitions:
            raise Error("there is no partition %r on this Slurm cluster (it has: %s): give "
                        "SlurmSystem(partition=...) or --bigm.slurm.partition one of those"
                        % (name, ", ".join(sorted(partitions)) or "none"))
        cpus, mem = partitions[name]
        if cpus and self.cpus > cpus:
            raise Error("cpus=%d: no node of partition %s has more than %d CPUs"
                        % (self.cpus, name, cpus))
        if mem and self.mem is not None and self.mem > mem:
            raise Error("mem=%d: no node of partition %s has more than %d MiB of memory"
                        % (self.mem, name, mem))

    def start(self, b, n, env):
        if self._closed:
            raise Error("the Slurm system was shut down")
        # The code bundle is not needed before the first machine enrols: it is made (and this
        # module's compiled code, which the enrolments send, found in the cache on disk or
        # compiled once per version) while the jobs are being allocated, by threads started
        # once they are submitted (the submission first: both hold the interpreter's lock for
        # long), and b.start waits for it only once the jobs are allocated or queued.
        bundle = concurrent.futures.Future()
        preparing = [threading.Thread(target=_resolve, args=(bundle, _make_bundle, self.packages),
                                      name="bigmachine-bundle", daemon=True),
                     threading.Thread(target=_compiled_module, name="bigmachine-compile",
                                      daemon=True)]
        # With srun, what the cluster is asked about the partition is asked while the jobs are
        # being allocated (a job it would refuse is one srun refuses too, or one that waits:
        # it is cancelled); sbatch's one command waits for the answer, as does an srun that
        # could not even start (not on PATH, SLURM_CONF naming no file).
        import shutil
        checked = concurrent.futures.Future()
        conf = os.environ.get("SLURM_CONF")
        if self.submit == "srun" and shutil.which("srun") and (not conf or os.access(conf,
                                                                                 os.R_OK)):
            threading.Thread(target=_resolve, args=(checked, self._check_request),
                             name="bigmachine-slurm-check", daemon=True).start()
        else:
            _resolve(checked, self._check_request)
            if checked.exception() is not None:
                raise checked.exception()
        machines, enrolments = [], []
        for _ in range(n):
            m = Machine(b, "https://slurm-%s-%d.pending:0/" % (self.session, next(self._serial)),
                        owned=True, maxprocs=self.cpus)
            enrolments.append(b.enrol(m, env=env, bundle=bundle, host=self.driver_host,
                                      port=self.driver_port, on_exit=self._machine_exited))
            machines.append(m)
        if self.submit == "srun":
            self._start_sruns(machines, enrolments, bundle, checked, preparing)
            return machines
        # One script for the whole array; each task picks its own token.
        settings = enrolments[0].settings(wait=min(self.lease, self.boot_timeout))
        settings.pop("token")
        settings["tokens"] = [e.token for e in enrolments]
        program = _enrol_program(settings, pick="int(os.environ.get('SLURM_ARRAY_TASK_ID', 0))")
        import shlex
        script = ("#!/bin/sh\n# bigmachine.py: %d machine%s of session %s (see bigmachine.py's "
                  "Slurm section)\n%sexec %s -u -c %s\n" % (
                      n, "s" if n > 1 else "", self.session,
                      self.setup.rstrip("\n") + "\n" if self.setup else "",
                      shlex.quote(self.python), shlex.quote(program)))
        args = ["sbatch", "--parsable", "--array=0-%d" % (n - 1),
                "--no-requeue"] + self._allocation_args()
        job = None
        try:
            out = _slurm_run(args, "submitting %d machine%s" % (n, "s" if n > 1 else ""),
                             input=script.encode())
            job = out.strip().split(";")[0]
            if not job.isdigit():
                job = None
                raise Error("sbatch said %r, not a job id" % out.strip())
            for thread in preparing:
                thread.start()
            bundle.result()               # the code bundle could not be made: cancel the job
        except BaseException:
            for e in enrolments:
                e.revoke()
            if job is not None:
                with contextlib.suppress(Error):
                    _slurm_run(["scancel", job], "cancelling job %s" % job)
            raise
        with self._cond:
            self._submitted = True
            for i, (m, e) in enumerate(zip(machines, enrolments)):
                task = "%s_%d" % (job, i)
                self._jobs[m], self._machines[task], self._enrolments[m] = task, m, e
                m.report_status("Slurm job %s submitted" % task)
            self._start_monitor()
        log.debug("submitted Slurm job %s: %d machines", job, n)
        self._wake.set()
        return machines

    def _start_monitor(self):
        if self._monitor is None:
            self._monitor = threading.Thread(target=self._watch, args=(self._generation,),
                                             name="bigmachine-slurm", daemon=True)
            self._monitor.start()

    def _allocation_args(self):
        """The options that say what each machine's job gets, for sbatch and srun alike."""
        args = ["--job-name=" + self.job_name, "--comment=" + self._comment(), "--ntasks=1",
                "--cpus-per-task=%d" % self.cpus, "--output=" + self.output]
        if self.mem is not None:
            args.append("--mem=%dM" % self.mem)
        if self.time_limit is not None:
            args.append("--time=%d" % self.time_limit)
        if self.partition:
            args.append("--partition=" + self.partition)
        if self.account:
            args.append("--account=" + self.account)
        return args + list(self.sbatch_args)

    # -- submit="srun": a job per machine, allocated at once ------------------------------

    def _start_sruns(self, machines, enrolments, bundle, checked, preparing):
        """One `srun` per machine, all at once: each asks the controller for its job's
        allocation and gets it there and then if the nodes are free, where a batch job waits
        for the scheduler's next pass. Returns once every job has been allocated or queued
        (srun says its job id), so that whatever Slurm refuses is refused here, with srun's
        own words, and nothing is left."""
        import subprocess
        args = ["srun", "--verbose"] + self._allocation_args()
        # The program comes on stdin (see _SRUN_LOADER): the token is in no process's arguments
        # and in nothing the controller stores.
        loader = [self.python, "-u", "-c", _SRUN_LOADER]
        if self.setup:
            import shlex
            loader = ["/bin/sh", "-c", "%s\nexec %s" % (self.setup.rstrip("\n"),
                                                       " ".join(map(shlex.quote, loader)))]
        # A driver that runs inside a job of its own (an salloc, a batch job) still submits a
        # job per machine, not steps of its own job: srun would take these for its allocation.
        env = {k: v for k, v in os.environ.items() if k not in _SLURM_ALLOCATION_VARIABLES}
        started = []
        try:
            for m, e in zip(machines, enrolments):
                proc = subprocess.Popen(args + loader, stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True, env=env)
                srun = _Srun(proc)
                # The program waits in the pipe (a few KiB) for the job to read it.
                program = _enrol_program(e.settings(wait=min(self.lease, self.boot_timeout)))
                try:
                    proc.stdin.write(b"exec(%s)\n" % repr(program).encode())
                    proc.stdin.close()
                except OSError:
                    pass                  # srun ended: what it said is the error
                started.append((m, e, srun))
                with self._cond:
                    self._submitted = True
                    self._sruns[m], self._enrolments[m] = srun, e
                m.report_status("Slurm job submitted (srun)")
                threading.Thread(target=self._follow_srun, args=(m, srun), daemon=True,
                                 name="bigmachine-srun").start()
            for thread in preparing:
                thread.start()
            deadline = time.monotonic() + 60.0
            for m, e, srun in started:
                if not srun.known.wait(max(0.0, deadline - time.monotonic())):
                    raise Error("srun did not answer in 60s (submitting %d machines): is the "
                                "Slurm controller up?" % len(machines))
                if srun.job is None:
                    checked.result()      # the clearer reason, if the cluster gave one
                    raise Error("srun failed (submitting %d machine%s): %s" % (
                        len(machines), "s" if len(machines) > 1 else "",
                        srun.said() or _exit_reason(srun.proc.returncode)))
            checked.result()              # the partition cannot run them: end them all
            bundle.result()               # the code bundle could not be made: likewise
        except BaseException:
            for m, e, srun in started:
                with self._cond:
                    self._ending.add(m)
                    self._sruns.pop(m, None)
                    self._enrolments.pop(m, None)
                srun.signal()
            deadline = time.monotonic() + 5.0
            for m, e, srun in started:
                srun.end(deadline)
            for e in enrolments:
                e.revoke()
            raise
        finally:
            for m, e, srun in started:
                srun.settled.set()
        with self._cond:
            self._start_monitor()
        log.debug("srun: %d machines, jobs %s", len(machines),
                  " ".join(srun.job for _, _, srun in started))
        self._wake.set()

    def _job_allocated(self, m, srun):
        """(Under the lock) srun says its job has its nodes: its machine is coming up."""
        enrolment = self._enrolments.get(m)
        if enrolment is not None and not enrolment.enrolled:
            self._running_since.setdefault(m, time.monotonic())
            m.report_status("Slurm job %s is RUNNING; its machine is coming up" % srun.job)

    def _follow_srun(self, m, srun):
        """Read what srun says: its job id, as soon as the job is allocated or queued, and its
        errors; when srun ends, so has the job: stop the machine with how it ended."""
        _block_async_signals()
        for raw in srun.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            job = _srun_job(line)
            if job and srun.job is None:
                srun.job = job
                srun.pending = "queued" in line
                with self._cond:
                    if m in self._sruns:
                        self._jobs[m], self._machines[srun.job] = srun.job, m
                        if srun.pending:
                            m.report_status("Slurm job %s is PENDING" % srun.job)
                        else:
                            self._job_allocated(m, srun)
                srun.known.set()
                if srun.pending:
                    self._wake.set()      # its reason, from squeue
            elif job or (srun.pending and "allocated resources" in line):
                with self._cond:
                    srun.pending = False
                    if m in self._sruns:
                        self._job_allocated(m, srun)
            elif "error" in line.lower() or not line.startswith("srun: "):
                srun.tail.append(line)
        srun.proc.wait()
        srun.known.set()
        srun.settled.wait()               # a failed b.start says what failed, once
        with self._cond:
            ours = self._sruns.get(m) is srun
            expected = m in self._ending or self._closed or self._b.closed
            if ours:
                self._gone.add(m)         # and the monitor looks at its job from now on
        if not ours or expected or m.state is STOPPED:
            return
        if srun.job is not None:
            self._job_ended(m, srun.job, None)    # scontrol says how; else the monitor will
            self._wake.set()
        else:
            m.report_stopped(Error("machine %s: srun failed: %s" % (
                m.addr, srun.said() or _exit_reason(srun.proc.returncode))))

    def _comment(self):
        program = os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "python")
        return "bigmachine session=%s user=%s program=%s" % (self.session, _ec2_user(),
                                                              program or "python")

    def launch(self, b, machine):
        with self._cond:
            enrolment = self._enrolments.get(machine)
            task = self._jobs.get(machine)
        if enrolment is None:
            raise Error("machine %s was stopped before it started" % machine.addr)
        while not enrolment.wait(self.poll_interval):
            if enrolment._done.is_set():      # its process ended before it served
                machine.wait(STOPPED, 10 * self.poll_interval)
                raise machine.err or Error("machine %s (Slurm job %s) ended before it served"
                                           % (machine.addr, task))
            if machine.state is STOPPED or self._closed:
                raise Error("machine %s (Slurm job %s) was stopped while it started"
                            % (machine.addr, task))
            with self._cond:
                since = self._running_since.get(machine)
            if since is not None and time.monotonic() - since > self.boot_timeout:
                enrolment.revoke()
                raise Error("Slurm job %s ran for %.0fs without its machine coming up (is the "
                            "driver at %s:%d reachable from the compute nodes? see the job's "
                            "output: SlurmSystem(output=...))" % (
                                task, self.boot_timeout, enrolment._server.host,
                                enrolment._server.port))
        with self._cond:
            machine.report_status("")

    def _machine_exited(self, machine, status, output):
        """The machine's process ended (status None: its stream broke, as when its job is
        cancelled): the job's own end is the better reason, which the monitor finds."""
        with self._cond:
            task = self._jobs.get(machine)
            expected = machine in self._ending or self._closed or self._b.closed
            self._gone.add(machine)
        if status is None or expected:
            self._wake.set()              # look at the job now
            return
        err = Error("machine %s (Slurm job %s) %s%s" % (
            machine.addr, task, _exit_reason(status),
            "; its last output:\n" + output if output and machine.state < RUNNING else ""))
        err.exit_code = status
        if status < 0 or status in (128 + signal.SIGTERM, 128 + signal.SIGKILL):
            # Slurm signals a job's processes when it ends the job (a node failed, the time
            # limit, preemption), and the signal may be heard before the job's state says
            # so: the job's own end is the better reason, and this one stands if it has none.
            with self._cond:
                self._signalled[machine] = err
            self._wake.set()
            return
        machine.report_stopped(err)

    # -- watching -------------------------------------------------------------------------

    def _watch(self, generation):
        _block_async_signals()
        wake = self._wake
        while True:
            wake.wait(self.poll_interval)
            wake.clear()
            with self._cond:
                if self._closed or self._generation != generation:
                    return
                # An srun says when its job is allocated and when it ends: squeue is asked
                # about the jobs that wait in the queue (their reason), those whose machine's
                # process is gone (srun may take a while to end after them), and the array's.
                watched = {task: m for task, m in self._machines.items()
                           if m not in self._sruns or self._sruns[m].pending or m in self._gone}
            if not watched:
                continue
            try:
                out = _slurm_run(["squeue", "--noheader", "--array", "--name=" + self.job_name,
                                  "--format=%i|%T|%r|%N"], "watching the session's jobs",
                                 timeout=30.0)
            except Error as e:
                log.warning("slurm: %s", e)
                continue
            seen = {}
            for line in out.splitlines():
                fields = line.strip().split("|")
                if len(fields) == 4:
                    seen[fields[0]] = fields[1:]
            for task, m in watched.items():
                state, reason, node = seen.get(task, (None, None, None))
                if state in _SLURM_LIVE:
                    self._job_live(m, task, state, reason, node)
                elif m.state is not STOPPED:
                    self._job_ended(m, task, state)

    def _job_live(self, m, task, state, reason, node):
        with self._cond:             # launch clears the status under it once enrolled
            enrolment = self._enrolments.get(m)
            if enrolment is None or enrolment.enrolled:
                return
            if state == "PENDING" and reason in _SLURM_NEVER:
                never = True
            elif state == "PENDING":
                never = False
                m.report_status("Slurm job %s is PENDING (%s)" % (task, reason))
            else:
                self._running_since.setdefault(m, time.monotonic())
                m.report_status("Slurm job %s is %s on %s; its machine is coming up"
                                % (task, state, node))
                return
        if never:
            m.report_stopped(Error(
                "machine %s: Slurm job %s can never start: it is PENDING (%s), which the "
                "cluster's configuration does not allow (partition, CPUs, memory, time "
                "limit, account...); it was cancelled" % (m.addr, task, reason)))

    def _job_ended(self, m, task, state):
        with self._cond:
            expected = m in self._ending or self._closed or self._b.closed
        if expected:
            return
        info = {}
        with contextlib.suppress(Error):
            out = _slurm_run(["scontrol", "show", "job", "--oneliner", task],
                             "asking how job %s ended" % task, timeout=30.0)
            for word in out.split():
                key, _, value = word.partition("=")
                info.setdefault(key, value)
        state = info.get("JobState") or state or "gone"
        if state in _SLURM_LIVE or state == "COMPLETING":
            # squeue and scontrol disagree for a moment, or the job's processes are still
            # being ended, after which scontrol says how it ended: look again next round.
            return
        with self._cond:
            signalled = self._signalled.pop(m, None)
        if signalled is not None and state in ("COMPLETED", "FAILED", "gone"):
            m.report_stopped(signalled)   # the job ended because its machine did
            return
        details = ", ".join("%s %s" % (k.lower(), info[k]) for k in ("Reason", "ExitCode")
                            if info.get(k) and info[k] != "None")
        m.report_stopped(Error("machine %s: Slurm job %s ended: %s%s" % (
            m.addr, task, state, " (%s)" % details if details else "")))

    def keepalive_failed(self, machine, error):
        self._wake.set()                  # has its job ended? look now

    def lost(self, machine):
        with self._cond:
            return machine in self._gone

    # -- ending -----------------------------------------------------------------------------

    def terminate(self, machine, deadline):
        with self._cond:
            task = self._jobs.get(machine)
            enrolment = self._enrolments.pop(machine, None)
            self._ending.add(machine)
        if enrolment is not None:
            enrolment.revoke()
        with self._cond:
            srun = self._sruns.pop(machine, None)
        if srun is not None and srun.end(deadline):
            return                        # srun ended its job (SIGTERM: srun's way to cancel)
        if task is not None:
            try:
                _slurm_run(["scancel", task], "cancelling job %s" % task,
                           timeout=max(5.0, deadline - time.monotonic()))
            except Error as e:
                log.warning("slurm: %s; to end what this session left: python bigmachine.py "
                            "slurm kill %s", e, self.session)

    def shutdown(self):
        with self._cond:
            if self._closed or self.session is None:
                return
            self._closed = True
            enrolments = list(self._enrolments.values())
            submitted = self._submitted
            sruns, self._sruns = list(self._sruns.values()), {}
            self._cond.notify_all()
        self._wake.set()
        for enrolment in enrolments:
            enrolment.revoke()
        deadline = time.monotonic() + 10.0
        for srun in sruns:
            srun.signal()
        for srun in sruns:
            srun.end(deadline)
        if submitted:
            try:
                _slurm_run(["scancel", "--name=" + self.job_name], "cancelling the session's "
                           "jobs", timeout=30.0)
            except Error as e:
                log.warning("slurm: %s; to end what this session left: python bigmachine.py "
                            "slurm kill %s", e, self.session)


def _slurm_command(args):
    """`slurm list` and `slurm kill [SESSION]`: the jobs of bigmachine sessions on this cluster
    (this user's), and ending them."""
    try:
        import getpass
        user = getpass.getuser()
        out = _slurm_run(["squeue", "--noheader", "--array", "--user=" + user,
                          "--format=%i|%j|%T|%M|%N|%r|%k"], "listing jobs")
    except Error as e:
        print("bigmachine: %s" % e, file=sys.stderr)
        return 1
    jobs = []
    for line in out.splitlines():
        fields = line.strip().split("|", 6)
        if len(fields) == 7 and fields[1].startswith("bigmachine-"):
            session = fields[1][len("bigmachine-"):]
            if args.session in (None, session):
                jobs.append([fields[0], fields[2], session, fields[3], fields[4] or fields[5],
                             fields[6]])
    if args.slurm_command == "list":
        rows = [["JOB", "STATE", "SESSION", "TIME", "NODE/REASON", "COMMENT"]] + jobs
        widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        print("%d job%s of bigmachine sessions" % (len(jobs), "" if len(jobs) == 1 else "s"))
        return 0
    if jobs:
        try:
            _slurm_run(["scancel"] + [job[0] for job in jobs], "cancelling jobs")
        except Error as e:
            print("bigmachine: %s" % e, file=sys.stderr)
            return 1
    for job in jobs:
        print("cancelled %s (session %s)" % (job[0], job[2]))
    print("%d job%s cancelled" % (len(jobs), "" if len(jobs) == 1 else "s"))
    return 0


# ======================================================================================
# Debug: profiles, variables, stacks, status and logs (Go: profile.go, status.go,
# expvar.go, rpc/stats.go)
# ======================================================================================
#
# What a person needs to see a whole cluster from one place, with Python's own tools.
#
# CPU profiles. cProfile cannot do what is needed here: it instruments only the thread that
# enabled it, and a machine serves each call in the thread of its connection. Instrumenting
# every thread (threading.setprofile) would see everything, but cProfile's hooks make
# call-heavy Python code two to three and a half times slower (measured on 3.8 to 3.13), and
# calls would pay that while a profile runs. So a profile is a sampler instead: a hundred
# times a second it reads every thread's stack (sys._current_frames) and charges it with the
# CPU time that thread used since the last look. On Linux each thread's CPU time is read
# from its own CPU clock, so threads blocked on sockets or locks cost nothing and weigh
# nothing, and a machine busy in one method shows that method with its real share of the
# time; elsewhere the weight is wall-clock time. The result is in pstats' format, with the
# edges between callers and callees, so `pstats`, `python -m pstats`, snakeviz and gprof2dot
# read it and machines' profiles merge with `pstats.Stats.add`. What sampling cannot know is
# how many times a function was called: "ncalls" counts the samples it appeared in.
# Functions in C are not seen; their time is their Python caller's.
#
# Memory is tracemalloc's, started on a machine the first time it is asked for (allocations
# made before that are not seen, and tracing then slows allocation down until it is stopped).
#
# Variables are Go's expvar: `publish(name, value)` on any machine (or the driver), and every
# process counts the calls it served and made per method, as Go's rpc/stats.go does.
#
# Logs. A machine's standard output and error reach the driver a line at a time (from a
# Local child's pipes, over ssh, or from an EC2 instance's output stream), prefixed with the
# machine's address; its `logging` records travel as records (one JSON line on its standard
# error) and are handled again by the driver's logging, at the driver's level, with the
# machine's address in front of the message and as `record.machine`. A machine that prints
# more than its system's `output_burst` lines at once, or more than `output_rate` lines a
# second for long, has the rest dropped and counted ("N lines dropped"), so a chatty machine
# cannot flood the driver. Nothing printed before a Local machine exits is lost: its pipes
# are read to their end before its shutdown returns.
#
# The debug pages (`B.serve_debug`) serve all of this over plain HTTP to loopback only: they
# have no authentication, and a profile or a stack trace shows a program's insides.


if typing.TYPE_CHECKING:
    import pstats                   # for B.profile's annotation; imported when a profile is made


# --------------------------------------------------------------------------------------
# Variables (Go: expvar)
# --------------------------------------------------------------------------------------

class Counter:
    """An integer variable that any thread may add to, for `publish`:

        served = bigmachine.publish("served", bigmachine.Counter())
        served.add()
    """

    __slots__ = ("_value", "_lock")

    def __init__(self, value: int = 0):
        self._value = value
        self._lock = threading.Lock()

    def add(self, n: int = 1) -> int:
        """Add n (1 by default); returns the new value."""
        with self._lock:
            self._value += n
            return self._value

    @property
    def value(self) -> int:
        return self._value

    def __repr__(self):
        return "Counter(%r)" % (self._value,)


_Value = typing.TypeVar("_Value")


def publish(name: str, value: _Value) -> _Value:
    """Publish a variable of this process (Go's expvar.Publish) and return value.

    value is read each time the variables are: a `Counter` gives its value, a callable is
    called (with no arguments), anything else is shown as it is then. Values should be made
    of numbers, strings, lists and dicts; others are shown by their repr. On a machine the
    variables appear in `b.vars()` and on the driver's /debug/vars page; publishing a name
    again replaces the variable."""
    if not isinstance(name, str) or not name:
        raise ValueError("a variable's name is a non-empty string, not %r" % (name,))
    with _published_lock:
        _published[name] = value
    return value


def unpublish(name: str) -> None:
    """Remove a published variable; a name that is not published is ignored."""
    with _published_lock:
        _published.pop(name, None)


def _plain(value, depth=0):
    """value as JSON-compatible data: numbers, strings, lists and dicts, else its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth < 16:
        if isinstance(value, collections.abc.Mapping):
            return {str(k): _plain(v, depth + 1) for k, v in list(value.items())}
        if isinstance(value, (list, tuple, set, frozenset, collections.deque)):
            return [_plain(v, depth + 1) for v in list(value)]
    return repr(value)


def _read_published():
    with _published_lock:
        items = list(_published.items())
    out = {}
    for name, value in items:
        try:
            if isinstance(value, Counter):
                value = value.value
            elif callable(value):
                value = value()
            out[name] = _plain(value)
        except Exception as e:
            out[name] = "error: %s: %s" % (type(e).__name__, e)
    return out


class _RPCStats:
    """Calls counted per method, as Go's rpc/stats.go counts them: how many, how many failed,
    time, and the bytes of requests and replies. Each process has one for the calls it makes
    (its client's, per machine and method) and one per machine it serves (per method).

    Recording is on every call's path, where code runs cold and each operation costs several
    times what a benchmark of it says (see `_serve_frames`), so it only appends the call to a
    list; the counts are made from that list in batches, when it is long or when read. Appends
    need no lock: they are atomic, and a batch is taken from the front of the list."""

    __slots__ = ("_pending", "_table", "_lock")

    _BATCH = 1024

    def __init__(self):
        self._pending = []      # (key, seconds, request bytes, reply bytes, failed)
        # key (a method, or (machine address, method) for a client) -> [count, errors, time,
        # max time, request bytes, reply bytes, max request bytes, max reply bytes]
        self._table = {}
        self._lock = threading.Lock()

    def record(self, key, seconds, request_bytes, reply_bytes, failed):
        """Count a call. key is a method, or (machine address, method) for a client."""
        pending = self._pending
        pending.append((key, seconds, request_bytes, reply_bytes, failed))
        if len(pending) >= self._BATCH:
            self._count()

    def _count(self):
        with self._lock:
            pending = self._pending
            n = len(pending)
            batch = pending[:n]
            del pending[:n]         # what was appended since stays, for the next batch
            table = self._table
            for key, seconds, request_bytes, reply_bytes, failed in batch:
                s = table.get(key)
                if s is None:
                    s = table[key] = [0, 0, 0.0, 0.0, 0, 0, 0, 0]
                s[0] += 1
                s[1] += failed
                s[2] += seconds
                s[4] += request_bytes
                s[5] += reply_bytes
                if seconds > s[3]:
                    s[3] = seconds
                if request_bytes > s[6]:
                    s[6] = request_bytes
                if reply_bytes > s[7]:
                    s[7] = reply_bytes
            return {key: list(s) for key, s in table.items()}

    def totals(self, skip_prefix="Supervisor."):
        """(calls, errors) over the methods whose names do not start with skip_prefix."""
        rows = [s for key, s in self._count().items()
                if not (key[1] if isinstance(key, tuple) else key).startswith(skip_prefix)]
        return sum(s[0] for s in rows), sum(s[1] for s in rows)

    def snapshot(self):
        """{"methods": {method: {...}}}, and where calls were counted per machine (a client's)
        "machines": {addr: {method: {...}}} too. Times are in milliseconds, like Go's."""
        methods, machines = {}, {}
        for key, s in sorted(self._count().items(), key=lambda item: str(item[0])):
            addr, method = key if isinstance(key, tuple) else (None, key)
            total = methods.get(method)
            if total is None:
                methods[method] = list(s)
            else:
                for i in (0, 1, 2, 4, 5):
                    total[i] += s[i]
                for i in (3, 6, 7):
                    total[i] = max(total[i], s[i])
            if addr is not None:
                machines.setdefault(addr, {})[method] = _call_counts(s)
        out = {"methods": {method: _call_counts(s) for method, s in methods.items()}}
        if machines:
            out["machines"] = machines
        return out


def _call_counts(s):
    return {"count": s[0], "errors": s[1], "time_ms": round(1000 * s[2], 3),
            "max_time_ms": round(1000 * s[3], 3), "request_bytes": s[4], "reply_bytes": s[5],
            "max_request_bytes": s[6], "max_reply_bytes": s[7]}


def _gather(machines, method, *args, timeout):
    """Call method on every machine at once: [(machine, result, error)], in order. Each call
    carries the deadline, so this returns within timeout (give or take a connection)."""
    futures = [(m, m.options(timeout=timeout).call_async(method, *args)) for m in machines]
    results = []
    for m, future in futures:
        try:
            results.append((m, future.result(), None))
        except Exception as e:
            results.append((m, None, e))
    return results


# --------------------------------------------------------------------------------------
# CPU profiles: a sampler that writes pstats
# --------------------------------------------------------------------------------------

#: The sampler's own entry in every profile: its samples and the CPU time it used.
_PROFILER_KEY = ("~", 0, "<bigmachine profiler>")


def _cpu_clock_id(tid):
    # Linux names a thread's CPU-time clock by its thread id (see clock_getcpuclockid(3)):
    # ~tid << 3, with CPUCLOCK_PERTHREAD (4) and CPUCLOCK_SCHED (2). Unlike
    # pthread_getcpuclockid, a clock id made this way is safe to use after the thread has
    # exited: clock_gettime then fails with EINVAL.
    return (~tid << 3) | 6


def _thread_cpu_clocks():
    """Can this process read each of its threads' CPU time?"""
    if not sys.platform.startswith("linux") or not hasattr(time, "clock_gettime_ns") or \
            not hasattr(threading, "get_native_id"):
        return False
    try:
        time.clock_gettime_ns(_cpu_clock_id(threading.get_native_id()))
        return True
    except (OSError, OverflowError):
        return False


class _Sampler:
    """One CPU profile of this process, taken by the thread that runs it. See the section's
    introduction."""

    def __init__(self, hz=100):
        if not isinstance(hz, (int, float)) or not 1 <= hz <= 1000:
            raise ValueError("hz must be between 1 and 1000, not %r" % (hz,))
        self.hz = hz
        self.clock = "cpu" if _thread_cpu_clocks() else "wall"
        self.samples = 0
        self._stats = {}      # pstats key -> [samples, self time, cumulative time, {caller: edge}]
        self._labels = {}     # code object -> pstats key
        self._natives = {}    # thread ident -> native thread id (0: not known to threading)
        self._cpu = {}        # native thread id -> CPU ns at the last look
        self._wall = None

    def run(self, seconds, wait):
        """Sample for seconds, or until wait(timeout) returns true; returns the pstats dict."""
        me = threading.get_ident()
        began = time.monotonic()
        own = time.thread_time()
        self._look(me)                          # the baselines: nothing before now counts
        interval = 1.0 / self.hz
        end, tick = began + seconds, began
        while True:
            # Looks are due at fixed times, so that time spent waiting for the GIL after a
            # wait (up to sys.getswitchinterval() when a thread is busy) does not slow them.
            now = time.monotonic()
            tick = max(tick + interval, now)
            if now >= end or wait(min(tick, end) - now):
                break
            self._look(me)
            self.samples += 1
        self._look(me)
        own = time.thread_time() - own
        stats = {key: (n, n, tt, ct, {caller: (en, en, ett, ect)
                                      for caller, (en, ett, ect) in callers.items()})
                 for key, (n, tt, ct, callers) in self._stats.items()}
        stats[_PROFILER_KEY] = (self.samples, self.samples, own, own, {})
        return stats

    def _look(self, me):
        frames = sys._current_frames()
        try:
            if self.clock == "cpu":
                for ident, frame in frames.items():
                    if ident != me:
                        seconds = self._cpu_since(ident)
                        if seconds:
                            self._add(frame, seconds)
            else:
                now = time.perf_counter()
                seconds, self._wall = (now - self._wall if self._wall else 0.0), now
                if seconds:
                    for ident, frame in frames.items():
                        if ident != me:
                            self._add(frame, seconds)
        finally:
            del frames                          # they hold every thread's locals

    def _cpu_since(self, ident):
        """The CPU seconds thread ident used since the last look (0.0 the first time)."""
        tid = self._natives.get(ident)
        if tid is None:
            self._natives = {t.ident: t.native_id for t in threading.enumerate()}
            tid = self._natives.setdefault(ident, 0)
        if not tid:
            return 0.0
        try:
            now = time.clock_gettime_ns(_cpu_clock_id(tid))
        except OSError:                         # it exited (and its ident may come back)
            del self._natives[ident]
            return 0.0
        last = self._cpu.get(tid)
        self._cpu[tid] = now
        return (now - last) / 1e9 if last is not None and now > last else 0.0

    def _add(self, frame, seconds):
        """Charge a stack (its innermost frame) with seconds. A function is counted once per
        sample however deep it recurses, as cProfile counts cumulative time once."""
        labels, stats = self._labels, self._stats
        keys = []
        while frame is not None:
            code = frame.f_code
            key = labels.get(code)
            if key is None:
                key = labels[code] = (code.co_filename, code.co_firstlineno, code.co_name)
            keys.append(key)
            frame = frame.f_back
        seen = set()                            # functions, and (caller, callee) pairs
        callee = None
        for depth, key in enumerate(keys):      # from the innermost frame outwards
            entry = stats.get(key)
            if entry is None:
                entry = stats[key] = [0, 0.0, 0.0, {}]
            if depth == 0:
                entry[1] += seconds
            if key not in seen:
                seen.add(key)
                entry[0] += 1
                entry[2] += seconds
            if depth and (key, callee) not in seen:
                seen.add((key, callee))
                edges = stats[callee][3]
                edge = edges.get(key)
                if edge is None:
                    edge = edges[key] = [0, 0.0, 0.0]
                edge[0] += 1
                edge[2] += seconds
                if depth == 1:
                    edge[1] += seconds
            callee = key


def _profile(seconds, hz=100):
    """Profile this process for seconds: {"stats": pstats dict, "samples", "hz", "clock",
    "seconds"}. In a service call, the call's cancellation ends it early."""
    seconds = float(seconds)
    if not seconds > 0:
        raise ValueError("a profile lasts a positive number of seconds, not %r" % (seconds,))
    context = current_call()
    wait = context.wait if context is not None else time.sleep
    sampler = _Sampler(hz)
    began = time.monotonic()
    stats = sampler.run(seconds, wait)
    return {"stats": stats, "samples": sampler.samples, "hz": hz, "clock": sampler.clock,
            "seconds": time.monotonic() - began, "pid": os.getpid()}


class _ProfileSource:
    """One machine's profile as pstats.Stats wants it: an object with create_stats() and
    stats, whose str() names it in the header Stats prints."""

    def __init__(self, addr, result):
        self.addr, self.result = addr, result
        self.stats = dict(result["stats"])

    def create_stats(self):
        pass

    def __str__(self):
        r = self.result
        return "%s: %d samples at %s Hz over %.1fs, weighted by %s time" % (
            self.addr, r["samples"], r["hz"], r["seconds"],
            "CPU" if r["clock"] == "cpu" else "wall-clock")


def _merge_profiles(results):
    """One pstats.Stats from [(addr, profile result)]; its header names every machine."""
    import pstats
    merged = pstats.Stats()
    sources = [_ProfileSource(addr, result) for addr, result in results]
    for source in sources:
        merged.add(source)
    merged.files = [str(source) for source in sources]
    return merged


# --------------------------------------------------------------------------------------
# Memory: tracemalloc
# --------------------------------------------------------------------------------------

def _heap(limit=200, stop=False, trace=False, seconds=1.0):
    """The allocation sites holding the most memory now, from tracemalloc. Tracing slows
    allocation down (several times, for allocation-heavy code), so a look leaves it as it
    found it: if it is not running, it runs for seconds (a call's cancellation ends that early)
    and is stopped again, and the snapshot shows what was allocated in that time and is still
    held. trace=True starts it for good, so that later looks see everything from then on;
    stop=True stops it after this look."""
    global _tracemalloc_since
    import linecache
    import tracemalloc
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
        _tracemalloc_since = time.time()
        if not trace:
            context = current_call()
            (context.wait if context is not None else time.sleep)(max(0.0, float(seconds)))
    try:
        snapshot = tracemalloc.take_snapshot().filter_traces((
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, linecache.__file__),
            tracemalloc.Filter(False, "<unknown>"),
        ))
        current, peak = tracemalloc.get_traced_memory()
        overhead = tracemalloc.get_tracemalloc_memory()
    finally:
        stop = stop or (started and not trace)
        if stop:
            tracemalloc.stop()
            _tracemalloc_since = None
    statistics = snapshot.statistics("lineno")
    sites = []
    for stat in statistics[:max(0, int(limit))]:
        frame = stat.traceback[0]
        sites.append((frame.filename, frame.lineno, stat.size, stat.count,
                      linecache.getline(frame.filename, frame.lineno).strip()))
    return {
        "started_now": started, "since": _tracemalloc_since, "pid": os.getpid(),
        "size": sum(s.size for s in statistics), "count": sum(s.count for s in statistics),
        "traced": current, "peak": peak, "overhead": overhead,
        "sites": sites, "stopped": bool(stop), "window": seconds if started and not trace else None,
    }


def _format_heap(results, limit=50):
    """The text of the heap page for [(addr, heap result or None, error)]."""
    lines, sites, machines = [], {}, 0
    size = count = 0
    for addr, result, error in results:
        if error is not None:
            lines.append("%s: no heap profile: %s" % (addr, error))
            continue
        machines += 1
        size += result["size"]
        count += result["count"]
        if result.get("window") is not None:
            lines.append("%s: tracemalloc was not running: it ran for %gs for this look, which "
                         "shows what was allocated then and is still held, and is off again. "
                         "?trace=1 leaves it running, to see all allocations from then on"
                         % (addr, result["window"]))
        elif result["started_now"]:
            lines.append("%s: tracemalloc was not running; it was started now, so only "
                         "allocations from now on are seen: load this page again later" % addr)
        elif result["since"]:
            lines.append("%s: tracing allocations since %s" % (
                addr, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(result["since"]))))
        lines.append("%s: %s traced now, %s at the peak, %s used by tracemalloc itself" % (
            addr, _bytes(result["traced"]), _bytes(result["peak"]), _bytes(result["overhead"])))
        for filename, lineno, site_size, site_count, text in result["sites"]:
            entry = sites.setdefault((filename, lineno), [0, 0, 0, text])
            entry[0] += site_size
            entry[1] += site_count
            entry[2] += 1
    head = ["heap profile (tracemalloc) of %d machine%s: %s in %d blocks, by allocation site"
            % (machines, "" if machines == 1 else "s", _bytes(size), count),
            "Tracing slows allocation down: a look leaves it as it was; ?trace=1 starts it "
            "for good, ?stop=1 stops it. ?machine=ADDR shows one machine, ?limit=N more "
            "sites.", ""]
    rows = ["%10s %9s %8s  %s" % ("size", "blocks", "machines", "site")]
    for (filename, lineno), (site_size, site_count, n, text) in sorted(
            sites.items(), key=lambda item: -item[1][0])[:limit]:
        rows.append("%10s %9d %8d  %s:%d" % (_bytes(site_size), site_count, n, filename, lineno))
        if text:
            rows.append("%30s%s" % ("", text))
    return "\n".join(head + lines + [""] + rows) + "\n"


# --------------------------------------------------------------------------------------
# Machine facts for the status page: the standard library only
# --------------------------------------------------------------------------------------

def _machine_facts():
    """Memory, disk, load and CPU of this process and its host, where the platform tells."""
    import shutil
    facts = {"pid": os.getpid(), "cpus": os.cpu_count() or 1, "time": time.time(),
             "threads": threading.active_count(), "python": sys.version.split()[0],
             "hostname": socket.gethostname()}
    with contextlib.suppress(OSError, AttributeError):
        facts["load"] = list(os.getloadavg())
    times = os.times()
    facts["cpu_seconds"] = times.user + times.system
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                value = rest.split()[:1]
                if value and value[0].isdigit():
                    info[name] = int(value[0]) * 1024         # kB
        facts["memory"] = {"total": info["MemTotal"], "available": info["MemAvailable"]}
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    facts["rss"] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if "rss" not in facts:
        with contextlib.suppress(ImportError, OSError, ValueError):
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            facts["max_rss"] = peak if sys.platform == "darwin" else peak * 1024
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(os.getcwd())
        facts["disk"] = {"path": os.getcwd(), "total": usage.total, "used": usage.used,
                         "free": usage.free}
    return facts


class MemInfo(typing.NamedTuple):
    """A machine's memory (Go's MemInfo), in bytes; None where its platform does not tell.
    total, available and used are the host's; rss is the machine process's resident set
    (on a platform without /proc, its peak, and rss_is_peak is true)."""

    total: typing.Optional[int]
    available: typing.Optional[int]
    used: typing.Optional[int]
    rss: typing.Optional[int]
    rss_is_peak: bool = False

    @property
    def used_fraction(self) -> typing.Optional[float]:
        """used / total: what makes a machine unhealthy above 0.95 (Go's threshold)."""
        return self.used / self.total if self.total else None


class DiskInfo(typing.NamedTuple):
    """The disk of a machine's working directory (Go's DiskInfo), in bytes."""

    path: str
    total: int
    free: int
    used: int

    @property
    def used_fraction(self) -> float:
        return self.used / self.total if self.total else 0.0


class LoadInfo(typing.NamedTuple):
    """A machine's 1, 5 and 15-minute load averages (Go's LoadInfo), and its processors."""

    load1: float
    load5: float
    load15: float
    cpus: int


def _mem_info(facts):
    memory = facts.get("memory") or {}
    total, available = memory.get("total"), memory.get("available")
    rss = facts.get("rss", facts.get("max_rss"))
    return MemInfo(total, available, None if total is None else total - available, rss,
                   "rss" not in facts and rss is not None)


def _disk_info(facts):
    disk = facts.get("disk")
    return None if disk is None else DiskInfo(disk["path"], disk["total"], disk["free"],
                                              disk["used"])


def _load_info(facts):
    load = facts.get("load")
    return None if load is None else LoadInfo(load[0], load[1], load[2], facts["cpus"])


# --------------------------------------------------------------------------------------
# Logs: machine output and logging records, to the driver
# --------------------------------------------------------------------------------------

_LOG_MARK = "\x1ebigmachine-log "    # a line of a machine's stderr that carries a record


class _LogRecordWriter(logging.Handler):
    """On a Local machine, the root logger's handler: each record goes to the driver as one
    line on standard error, to be handled again by the driver's logging."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def emit(self, record):
        try:
            fields = {
                "name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                "msg": record.getMessage(), "created": record.created, "msecs": record.msecs,
                "pathname": record.pathname, "filename": record.filename,
                "module": record.module, "lineno": record.lineno, "funcName": record.funcName,
                "thread": record.thread, "threadName": record.threadName,
                "process": record.process,
            }
            if record.exc_info:
                fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
            elif record.exc_text:
                fields["exc_text"] = record.exc_text
            if record.stack_info:
                fields["stack_info"] = record.stack_info
            # One write of one line: whole, whatever other threads print.
            self.stream.write(_LOG_MARK + json.dumps(fields) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)


def _forward_logging(level):
    """Send this machine's logging records to the driver, at the driver's level."""
    root = logging.getLogger()
    root.setLevel(level)
    root.addHandler(_LogRecordWriter(sys.stderr))


class _MachineOutput:
    """Where a machine's output lines arrive on the driver: printed lines go to the driver's
    stderr with a prefix naming the machine, logging records to the driver's logging. A token
    bucket (burst lines, refilled at rate lines a second) bounds them; what it drops is
    counted and said."""

    def __init__(self, rate, burst):
        self.rate, self.burst = float(rate), float(burst)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._dropped = 0
        self._lock = threading.Lock()

    def line(self, data, prefix, machine):
        """Forward one line (bytes) of the machine at address machine; returns it as text, for
        the tail kept to explain exits."""
        text = data.decode("utf-8", "replace")
        if not text.endswith("\n"):
            text += "\n"
        record = None
        if text.startswith(_LOG_MARK):
            try:
                record = logging.makeLogRecord(json.loads(text[len(_LOG_MARK):]))
            except (ValueError, TypeError):
                record = None
            else:
                text = "%s %s: %s\n" % (record.levelname, record.name, record.msg)
        if self._admit(prefix):
            if record is None:
                _write_stderr(prefix + text)
            else:
                record.machine = machine
                record.msg, record.args = prefix + str(record.msg), None
                logger = logging.getLogger(record.name)
                if logger.isEnabledFor(record.levelno):
                    logger.handle(record)
        return text

    def _admit(self, prefix):
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1:
                self._dropped += 1
                return False
            self._tokens -= 1
            dropped, self._dropped = self._dropped, 0
        if dropped:
            self._say_dropped(dropped, prefix)
        return True

    def _say_dropped(self, n, prefix):
        _write_stderr("%s[bigmachine] %d line%s of output dropped: more than %d lines at once "
                      "or %g a second\n" % (prefix, n, "" if n == 1 else "s", self.burst,
                                            self.rate))

    def close(self, prefix):
        """An output stream ended: say what was dropped since the last line let through."""
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            self._say_dropped(dropped, prefix)


# --------------------------------------------------------------------------------------
# The debug pages (B.serve_debug)
# --------------------------------------------------------------------------------------

def _split_host_port(address, default_port=None):
    """'host:port', '[::1]:port', ':port' -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or "]" in port:
        host, port = address, default_port
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError("not a host:port address: %r" % (address,)) from None
    if not 0 <= port < 65536:
        raise ValueError("no such port: %r" % (address,))
    return host, port


def _is_loopback_name(host):
    """Is host (a name as it appears in a URL) one that always means this host's loopback?
    Names are not resolved: that is the point (DNS rebinding)."""
    import ipaddress
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


def _resolves_to_loopback(host):
    import ipaddress
    if _is_loopback_name(host):
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(info[4][0].partition("%")[0]).is_loopback for info in infos)


def _debug_server(b, host, port, allow_remote):
    """A running HTTP server of the debug pages. http.server is imported here, not with the
    module: it is a large import (bench/'s process-start floor shows what imports cost) that
    machines never need."""
    global _debug_classes
    if _debug_classes is None:
        import http.server

        class Handler(_DebugPages, http.server.BaseHTTPRequestHandler):
            server_version = "bigmachine-debug/" + __version__
            protocol_version = "HTTP/1.1"

        class Server(_DebugServing, http.server.ThreadingHTTPServer):
            pass

        _debug_classes = Handler, Server
    handler, server = _debug_classes
    return server(b, host, port, allow_remote, handler)


class _DebugServing:
    """The server of the debug pages: an http.server.ThreadingHTTPServer (see _debug_server)
    that serves in a thread of its own until closed."""

    daemon_threads = True
    block_on_close = False          # a profile being taken must not hold up shutdown

    def __init__(self, b, host, port, allow_remote, handler):
        self.b = b
        self.allow_remote = allow_remote
        self.profiling = threading.Lock()
        self._open = set()          # the connections being served, closed with the server
        self._open_lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address_family = family
        super().__init__((host, port), handler)
        bound = self.socket.getsockname()
        self.addr = ("[%s]:%d" if family == socket.AF_INET6 else "%s:%d") % bound[:2]
        self._thread = threading.Thread(target=self.serve_forever, name="bigmachine-debug",
                                        daemon=True)
        self._thread.start()

    def server_bind(self):
        # HTTPServer's would look the host's name up (socket.getfqdn), which can take seconds.
        import socketserver
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        # A reader that went away in the middle of a page, typically: not worth a traceback.
        log.debug("debug page for %s failed", client_address, exc_info=True)

    def process_request(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close(self):
        self.shutdown()
        self.server_close()
        # Every connection too: their threads wake, find the connection gone, and end.
        with self._open_lock:
            connections, self._open = list(self._open), set()
        for request in connections:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)


_INDEX = [
    ("/debug/bigmachine/status", "status",
     "every machine: state, keepalive, memory, disk, load, uptime, calls"),
    ("/debug/bigmachine/pprof/", "pprof", "CPU profiles and memory, merged and per machine"),
    ("/debug/bigmachine/stacks", "stacks", "every thread's stack on every machine, and the "
                                           "driver's"),
    ("/debug/vars", "vars", "variables (JSON): the driver's, and every machine's under "
                            "\"machines\""),
]


# Go's pprof offers these kinds of profile; the index says which exist here, and what each
# kind that has no Python equivalent would have been, rather than answer 404.
_PPROF_MISSING = [
    ("allocs", "tracemalloc traces the memory held now, not every past allocation: see heap"),
    ("block", "Python does not record where threads block on synchronization; the stacks "
              "show where each thread waits now"),
    ("mutex", "Python's locks record no contention"),
    ("threadcreate", "Python does not record where threads were created"),
    ("trace", "there is no execution tracer; sys.setprofile would slow every call"),
]
_PPROF_KINDS = [
    ("profile", "profile?seconds=30", "CPU: sampled on every machine, merged (pstats)"),
    ("heap", "heap", "memory held, by allocation site (tracemalloc)"),
    ("goroutine", "goroutine", "every thread's stack (Python's threads for goroutines)"),
] + [(kind, kind, "none: " + why) for kind, why in _PPROF_MISSING]


class _DebugPages:
    """The debug pages: an http.server.BaseHTTPRequestHandler (see _debug_server), or one
    WSGI request (`_DebugWSGIRequest`); both go through do_GET."""

    def log_message(self, format, *args):
        log.debug("debug page: %s: " + format, self.address_string(), *args)

    # An idle connection is closed after this many seconds: each holds a thread and a file.
    timeout = 30.0

    def do_GET(self):
        import urllib.parse
        host = self.headers.get("Host")
        if not self.server.allow_remote and not _loopback_host_header(host):
            # A page of another site may make a browser ask us for these pages under a name of
            # its own that resolves to 127.0.0.1 (DNS rebinding); such a request names its host.
            self._send(403, "text/plain", "the debug pages answer to loopback names only, "
                                          "not to Host: %s\n" % (host,))
            return
        # Any page on the web can also make a browser ask for http://127.0.0.1:PORT/... (a link,
        # an image): it cannot read the answer, but the request alone would start a profile on
        # every machine. Browsers say where such a request comes from: refuse other sites'.
        site = (self.headers.get("Sec-Fetch-Site") or "").lower()
        origin = self.headers.get("Origin")
        if site in ("cross-site", "same-site") or (
                origin is not None and origin != "http://%s" % host):
            self._send(403, "text/plain", "the debug pages do not answer requests from other "
                                          "sites' pages; open them directly\n")
            return
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        routes = {
            "/": self._index, "/debug/bigmachine/": self._index,
            "/debug/bigmachine/status": self._status,
            "/debug/bigmachine/pprof/": self._pprof_index,
            "/debug/bigmachine/pprof/profile": self._profile,
            "/debug/bigmachine/pprof/heap": self._heap,
            "/debug/bigmachine/pprof/goroutine": self._stacks,
            "/debug/bigmachine/stacks": self._stacks,
            "/debug/vars": self._vars,
        }
        for kind, _ in _PPROF_MISSING:
            routes["/debug/bigmachine/pprof/" + kind] = functools.partial(self._no_equivalent, kind)
        route = routes.get(url.path)
        if route is None:
            if url.path + "/" in routes:
                self.send_response(301)
                self.send_header("Location", url.path + "/")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send(404, "text/plain", "no such page: %s\n" % url.path)
            return
        try:
            route(query)
        except _PageError as e:
            self._send(e.status, "text/plain", str(e) + "\n")
        except Exception as e:
            log.debug("debug page %s failed", self.path, exc_info=True)
            self._send(500, "text/plain", "%s: %s\n" % (type(e).__name__, e))

    def _send(self, status, content_type, body, headers=()):
        if isinstance(body, str):
            body = body.encode("utf-8")
        if content_type.startswith("text/"):
            content_type += "; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy",
                         "default-src 'none'; style-src 'unsafe-inline'")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    # -- what to show ---------------------------------------------------------------------

    def _machines(self, query):
        """The machines a page is about: ?machine=ADDR, else all the running ones."""
        b = self.server.b
        addr = query.get("machine")
        machines = sorted(b.machines(), key=lambda m: m.addr)
        if addr is not None:
            machines = [m for m in machines if m.addr == addr]
            if not machines:
                raise _PageError(404, "no machine %s in this session" % addr)
        else:
            machines = [m for m in machines if m.state is RUNNING]
        return machines

    def _index(self, query):
        import html
        items = "".join("<li>%s: %s</li>" % (_link(path, name), html.escape(what))
                        for path, name, what in _INDEX)
        self._send(200, "text/html", _page("bigmachine debug", "<ul>%s</ul>" % items))

    def _pprof_index(self, query):
        import html
        machines = sorted(self.server.b.machines(), key=lambda m: m.addr)

        def links(**machine):
            return " &middot; ".join((
                _link("profile", "CPU profile, 30s", seconds=30, **machine),
                _link("profile", "10s, as text", seconds=10, debug=1, **machine),
                _link("heap", "heap", **machine),
                _link("../stacks", "stacks", **machine)))
        rows = ["<tr><td>all %d machines, merged</td><td>%s</td></tr>" % (len(machines),
                                                                         links())]
        for m in machines:
            rows.append("<tr><td><span class=mono>%s</span> <span class='state %s'>%s</span>"
                        "</td><td>%s</td></tr>" % (html.escape(m.addr), m.state.name,
                                                  m.state.name, links(machine=m.addr)))
        kinds = "".join("<tr><td>%s</td><td>%s</td></tr>" % (
            _link(path, kind), html.escape(what))
            for kind, path, what in _PPROF_KINDS)
        body = ("<p>A CPU profile is sampled (%d times a second, by each thread's CPU time where "
                "the platform tells it) on every machine at once and merged into one file in "
                "pstats' format: <code>python3 -m pstats FILE</code>, snakeviz and gprof2dot "
                "read it. Its ncalls column counts samples, not calls. The heap is "
                "tracemalloc's, started on a machine when first asked for.</p>"
                "<table><tbody>%s</tbody></table>"
                "<h2>Go's profile kinds, here</h2><table><tbody>%s</tbody></table>"
                % (_DEFAULT_HZ, "".join(rows), kinds))
        self._send(200, "text/html", _page("bigmachine profiles", body))

    def _no_equivalent(self, kind, query):
        self._send(501, "text/plain", "no %s profile: %s\n" % (kind, dict(_PPROF_MISSING)[kind]))

    def _profile(self, query):
        try:
            seconds = float(query.get("seconds", "30") or 30)
            hz = float(query.get("hz", _DEFAULT_HZ))
            lines = int(query.get("lines", 40))
        except ValueError:
            raise _PageError(400, "seconds, hz and lines are numbers") from None
        if seconds == 0:
            seconds = 30.0                         # as Go's pprof handler
        if not 0 < seconds <= _MAX_PAGE_SECONDS or not 1 <= hz <= 1000:
            raise _PageError(400, "seconds must be between 0 and %d, hz between 1 and 1000"
                             % _MAX_PAGE_SECONDS)
        machines = self._machines(query)
        if not machines:
            raise _PageError(404, "no profiles are available at this time: no machine is "
                                  "running")
        # One profile at a time: each one slows every machine down while it lasts.
        if not self.server.profiling.acquire(blocking=False):
            raise _PageError(409, "a profile is being taken already; ask again when it is done")
        try:
            stats = self.server.b.profile(seconds, machines, hz=hz)
        finally:
            self.server.profiling.release()
        if query.get("debug", "0") not in ("", "0"):
            out = io.StringIO()
            stats.stream = out
            stats.sort_stats("tottime").print_stats(max(1, lines))
            self._send(200, "text/plain", out.getvalue())
            return
        import marshal
        name = "bigmachine-%s.prof" % time.strftime("%Y%m%d-%H%M%S")
        self._send(200, "application/octet-stream", marshal.dumps(stats.stats),
                   [("Content-Disposition", 'attachment; filename="%s"' % name)])

    def _heap(self, query):
        machines = self._machines(query)
        try:
            limit = max(1, int(query.get("limit", 50)))
        except ValueError:
            raise _PageError(400, "limit is a number") from None
        stop = query.get("stop", "0") not in ("", "0")
        trace = query.get("trace", "0") not in ("", "0")
        try:
            seconds = float(query.get("seconds", 1.0))
        except ValueError:
            raise _PageError(400, "seconds is a number") from None
        if not 0 <= seconds <= _MAX_PAGE_SECONDS:
            raise _PageError(400, "seconds must be between 0 and %d" % _MAX_PAGE_SECONDS)
        results = _gather(machines, "Supervisor.heap", max(limit, 200), stop, trace, seconds,
                          timeout=seconds + 60.0)
        if not results:
            raise _PageError(404, "no machine is running")
        self._send(200, "text/plain", _format_heap(
            [(m.addr, r, e) for m, r, e in results], limit))

    def _stacks(self, query):
        machines = self._machines(query)
        parts = []
        if "machine" not in query:
            parts.append("== driver (pid %d) ==\n%s" % (os.getpid(), _format_stacks()))
        for m, text, error in _gather(machines, "Supervisor.stacks", timeout=10.0):
            parts.append("== %s (%s) ==\n%s" % (
                m.addr, m.state.name, text if error is None else "no stacks: %s\n" % error))
        self._send(200, "text/plain", "\n".join(parts))

    def _vars(self, query):
        b = self.server.b
        out = _read_published()
        out["cmdline"] = sys.argv               # as Go's expvar
        out["rpc.client"] = b._client.stats.snapshot()
        out["machines"] = b.vars()
        self._send(200, "application/json", json.dumps(out, indent=2, sort_keys=True) + "\n")

    def _status(self, query):
        try:
            refresh = max(0, int(query.get("refresh", 5)))
        except ValueError:
            raise _PageError(400, "refresh is a number of seconds") from None
        self._send(200, "text/html", _status_page(self.server.b, refresh))


class _DebugWSGIHeaders(dict):
    """A WSGI request's HTTP headers, looked up by name in any case, as http.server's are."""

    def get(self, name, default=None):
        return super().get(name.lower(), default)


class _DebugWSGIRequest(_DebugPages):
    """One request to `B.debug_wsgi`'s application: it offers what _DebugPages uses of
    http.server's handler (server, headers, path, send_response...), so that the pages and
    their checks are the built-in server's own, and collects the reply for WSGI."""

    def __init__(self, app, environ, path):
        self.server = app
        self.environ = environ
        self.path = path + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "")
        headers = _DebugWSGIHeaders((key[5:].replace("_", "-").lower(), value)
                                    for key, value in environ.items() if key.startswith("HTTP_"))
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                headers[key.replace("_", "-").lower()] = environ[key]
        self.headers = headers
        self.wfile = io.BytesIO()
        self.status, self.reply_headers = "500 Internal Server Error", []

    def address_string(self):
        return self.environ.get("REMOTE_ADDR", "-")

    def send_response(self, code, message=None):
        import http
        try:
            message = message or http.HTTPStatus(code).phrase
        except ValueError:
            message = message or "Status"
        self.status = "%d %s" % (code, message)

    def send_header(self, name, value):
        self.reply_headers.append((name, str(value)))

    def end_headers(self):
        pass


class _DebugWSGI:
    """The debug pages as a WSGI application: see `B.debug_wsgi`."""

    def __init__(self, b, prefix, allow_remote):
        self.b, self.prefix, self.allow_remote = b, prefix, allow_remote

    def __repr__(self):
        return "<bigmachine debug pages at %s>" % (self.prefix or "/")

    def __call__(self, environ, start_response):
        path = environ.get("SCRIPT_NAME", "") + (environ.get("PATH_INFO", "") or "/")
        if path != self.prefix and not path.startswith(self.prefix + "/"):
            body = ("not a bigmachine debug page: %s (they are under %s)\n"
                    % (path, self.prefix or "/")).encode()
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                             ("Content-Length", str(len(body)))])
            return [body]
        # The pages know themselves under /debug: the rest of the path is theirs.
        rest = path[len(self.prefix):]
        path = "/debug" + rest if rest not in ("", "/") else "/debug/bigmachine/"
        request = _DebugWSGIRequest(self, environ, path)
        if environ.get("REQUEST_METHOD", "GET") in ("GET", "HEAD"):
            request.do_GET()
        else:
            request._send(405, "text/plain", "the debug pages answer GET only\n",
                          [("Allow", "GET, HEAD")])
        body = request.wfile.getvalue()
        headers = request.reply_headers
        if self.prefix != "/debug":
            # Links between the pages name /debug/...: name them where the pages are mounted.
            if any(k == "Content-Type" and v.startswith("text/html") for k, v in headers):
                body = body.replace(b'href="/debug/', ('href="%s/' % self.prefix).encode())
            headers = [(k, self.prefix + v[len("/debug"):] if k == "Location" and
                        v.startswith("/debug") else v) for k, v in headers]
            headers = [(k, str(len(body)) if k == "Content-Length" else v) for k, v in headers]
        start_response(request.status, headers)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


def _loopback_host_header(value):
    """Does a Host header name this host's loopback (and nothing that DNS could move)?"""
    if not value:
        return False
    try:
        host, _ = _split_host_port(value.strip(), 80)
    except ValueError:
        return False
    return _is_loopback_name(host)


def _link(path, text, **params):
    """An HTML link to path with the query params; text is HTML already."""
    import urllib.parse
    import html
    href = path + ("?" + urllib.parse.urlencode(params) if params else "")
    return '<a href="%s">%s</a>' % (html.escape(href), text)


class _PageError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


_DEFAULT_HZ = 100
_MAX_PAGE_SECONDS = 300       # the longest profile (or heap window) a page takes

_STYLE = """
:root { color-scheme: light; --ink: #1d2330; --dim: #6b7385; --line: #e3e6ee; --bg: #f6f7fb;
        --ok: #1f9d55; --warn: #c98a04; --bad: #c0392b; --accent: #3559d1; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: var(--bg); }
header { background: #1d2330; color: #fff; padding: 14px 28px; }
header h1 { margin: 0; font-size: 20px; font-weight: 600; letter-spacing: .2px; }
header .sub { color: #b9c0d0; font-size: 13px; margin-top: 2px; }
nav { margin-top: 8px; font-size: 13px; }
nav a { color: #9fb4ff; margin-right: 16px; text-decoration: none; }
main { padding: 20px 28px; }
a { color: var(--accent); }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line);
        border-radius: 8px; overflow: hidden; box-shadow: 0 1px 2px rgba(0,0,0,.04); }
th, td { text-align: left; padding: 9px 12px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { background: #fafbfd; color: var(--dim); font-weight: 600; font-size: 12px;
     text-transform: uppercase; letter-spacing: .5px; }
tr:last-child td { border-bottom: 0; }
.dim { color: var(--dim); font-size: 12px; }
.mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 13px; }
.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.state { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
         font-weight: 600; color: #fff; }
.RUNNING { background: var(--ok); } .STARTING, .UNSTARTED { background: var(--warn); }
.STOPPED { background: #8a93a6; } .bad { color: var(--bad); }
.bar { height: 6px; width: 120px; background: var(--line); border-radius: 3px; margin: 4px 0 2px; }
.bar span { display: block; height: 6px; border-radius: 3px; background: var(--accent); }
.bar span.high { background: var(--bad); }
.cards { display: flex; gap: 14px; margin-bottom: 18px; flex-wrap: wrap; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px;
        min-width: 130px; }
.card b { display: block; font-size: 22px; font-weight: 600; }
.err { color: var(--bad); font-size: 12px; white-space: pre-wrap; max-width: 60ch; }
p { max-width: 90ch; }
"""


def _page(title, body, refresh=0, subtitle=""):
    import html
    meta = '<meta http-equiv="refresh" content="%d">' % refresh if refresh else ""
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>%s<title>%s</title>"
            "<meta name=viewport content='width=device-width, initial-scale=1'>"
            "<style>%s</style></head><body><header><h1>%s</h1><div class=sub>%s</div><nav>"
            "<a href='/debug/bigmachine/status'>status</a>"
            "<a href='/debug/bigmachine/pprof/'>profiles</a>"
            "<a href='/debug/bigmachine/stacks'>stacks</a>"
            "<a href='/debug/vars'>vars</a></nav></header><main>%s</main></body></html>"
            % (meta, html.escape(title), _STYLE, html.escape(title), subtitle, body))


def _duration(seconds):
    """3d 4h, 2h 5m, 4m 12s, 9.5s: two units at most."""
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return "%.1fs" % seconds if seconds < 10 else "%ds" % seconds
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    if days:
        return "%dd %dh" % (days, h)
    if hours:
        return "%dh %dm" % (hours, m)
    return "%dm %ds" % (m, s)


def _bar(fraction):
    fraction = max(0.0, min(1.0, fraction))
    return '<div class=bar><span class="%s" style="width:%d%%"></span></div>' % (
        "high" if fraction > 0.9 else "", round(100 * fraction))


def _in_flight_html(result):
    """A machine's calls in flight on the status page: per method, how many and the oldest."""
    import html
    by_method = {}
    for method, age in result.get("in_flight_calls", ()):
        if method == "Supervisor.run_tasks":
            method = "Executor tasks"
        count, oldest = by_method.get(method, (0, 0.0))
        by_method[method] = (count + 1, max(oldest, age))
    lines = ["<div class='dim in-flight'>%s &times;%d, oldest %s</div>" % (
        html.escape(method), count, _duration(oldest))
        for method, (count, oldest) in sorted(by_method.items(), key=lambda i: -i[1][1])]
    if result.get("waiting_in_batches"):
        lines.append("<div class=dim>%d calls waiting in batches</div>"
                     % result["waiting_in_batches"])
    if result.get("workers"):
        lines.append("<div class=dim>%d worker processes</div>" % result["workers"])
    return "".join(lines)


def _executors_html(b):
    """The session's Executors on the status page: their tasks queued, running and done."""
    executors = list(b._executors)
    if not executors:
        return ""
    rows = "".join(
        "<tr class=executor><td class=mono>executor %d</td><td class=num>%d</td>"
        "<td class=num>%d</td><td class=num>%d</td><td class=num>%d</td><td class=num>%d</td>"
        "<td class=num>%d</td></tr>" % (
            i + 1, c["queued"], c["running"], c["done"], c["failed"], c["retried"],
            c["machines"])
        for i, c in enumerate(ex.counts() for ex in executors))
    return ("<h2>Executors</h2><table><thead><tr><th></th><th>queued</th><th>running</th>"
            "<th>done</th><th>failed</th><th>retried</th><th>machines</th></tr></thead>"
            "<tbody>%s</tbody></table>" % rows)


def _status_page(b, refresh):
    """The HTML of /debug/bigmachine/status."""
    import html
    esc = html.escape
    machines = sorted(b.machines(), key=lambda m: m.addr)
    running = [m for m in machines if m.state is RUNNING]
    facts = {m: (result, error) for m, result, error in
             _gather(running, "Supervisor.status", timeout=5.0)}
    rows = []
    calls = errors = 0
    for m in machines + [m for m in b._stopped_machines if m not in machines]:
        result, error = facts.get(m, (None, None))
        links = " &middot; ".join((
            _link("/debug/bigmachine/stacks", "stacks", machine=m.addr),
            _link("/debug/bigmachine/pprof/profile", "profile", seconds=10, debug=1,
                  machine=m.addr),
            _link("/debug/bigmachine/pprof/heap", "heap", machine=m.addr)))
        cells = ["<td><span class=mono>%s</span>%s<div class=dim>%s</div></td>" % (
            esc(m.addr), "" if m.owned else " <span class=dim>(dialed)</span>",
            links if m.state is RUNNING else "")]
        cells.append("<td><span class='state %s'>%s</span>%s</td>" % (
            m.state.name, m.state.name,
            "<div class=err>%s</div>" % esc(str(m.err))[:600] if m.err is not None else
            "<div class=dim>%s</div>" % esc(m.status) if m.status and m.state < RUNNING else ""))
        replies = list(m.keepalive_replies)
        if replies:
            keepalive = "<span class=num>%.1f ms</span><div class=dim>avg %.1f ms of %d</div>" % (
                1000 * replies[-1], 1000 * sum(replies) / len(replies), len(replies))
        else:
            keepalive = "<span class=dim>%s</span>" % (
                "&ndash;" if m.state is STOPPED else "none yet")
        if m.next_keepalive is not None and m.state is RUNNING:
            keepalive += "<div class=dim>lease ends in %s</div>" % _duration(
                m.next_keepalive - time.time())
        if result is None:
            reason = ("no answer: %s" % error) if error is not None else ""
            cells.append("<td class=dim>&ndash;</td><td>%s</td>" % keepalive)
            cells.append("<td colspan=4 class='dim%s'>%s</td>" % (
                " bad" if error is not None else "", esc(reason)))
            rows.append("<tr>%s</tr>" % "".join(cells))
            continue
        calls += result["calls"]
        errors += result["errors"]
        cells.append("<td class=num>%s<div class=dim>pid %d &middot; %d thread%s</div></td>" % (
            _duration(result["uptime"]), result["pid"], result["threads"],
            "" if result["threads"] == 1 else "s"))
        cells.append("<td>%s</td>" % keepalive)
        # The same typed facts that m.mem_info(), m.disk_info() and m.load_info() return.
        memory, disk, load = _mem_info(result), _disk_info(result), _load_info(result)
        text = "<span class=num>%s</span> <span class=dim>%s</span>" % (
            _bytes(memory.rss), "at most" if memory.rss_is_peak else "resident"
        ) if memory.rss is not None else ""
        if memory.total:
            used = memory.used_fraction
            text += "%s<div class=dim>host %d%% of %s used</div>" % (
                _bar(used), round(100 * used), _bytes(memory.total))
        cells.append("<td>%s</td>" % (text or "<span class=dim>?</span>"))
        if disk:
            used = disk.used_fraction
            cells.append("<td><span class=num>%s free</span>%s<div class=dim>%d%% of %s used</div>"
                         "</td>" % (_bytes(disk.free), _bar(used), round(100 * used),
                                    _bytes(disk.total)))
        else:
            cells.append("<td class=dim>?</td>")
        cells.append("<td class=num>%s<div class=dim>%d cpu%s &middot; %s cpu time</div></td>" % (
            " ".join("%.2f" % x for x in load[:3]) if load else "?", result["cpus"],
            "" if result["cpus"] == 1 else "s", _duration(result["cpu_seconds"])))
        cells.append("<td class=num>%d<div class=dim>%s%d running</div>%s</td>" % (
            result["calls"], "<span class=bad>%d errors</span> &middot; " % result["errors"]
            if result["errors"] else "0 errors &middot; ", result["in_flight"],
            _in_flight_html(result)))
        rows.append("<tr>%s</tr>" % "".join(cells))
    if not rows:
        rows.append("<tr><td colspan=9 class=dim>no machines yet</td></tr>")
    counts = collections.Counter(m.state.name for m in machines)
    cards = "".join("<div class=card><b>%s</b><span class=dim>%s</span></div>" % (value, what)
                    for value, what in (
                        (counts.get("RUNNING", 0), "running"),
                        (counts.get("STARTING", 0) + counts.get("UNSTARTED", 0), "starting"),
                        (len(b._stopped_machines), "stopped"),
                        ("{:,}".format(calls), "calls served"),
                        ("{:,}".format(errors), "calls failed")))
    table = ("<table><thead><tr><th>machine</th><th>state</th><th>uptime</th><th>keepalive"
             "</th><th>memory</th><th>disk</th><th>load</th><th>calls</th></tr></thead>"
             "<tbody>%s</tbody></table>" % "".join(rows))
    table += _executors_html(b)
    subtitle = "%s system &middot; driver pid %d on %s &middot; %s%s" % (
        esc(b.system.name), os.getpid(), esc(socket.gethostname()),
        time.strftime("%H:%M:%S"),
        " &middot; refreshes every %ds" % refresh if refresh else "")
    return _page("bigmachine status", "<div class=cards>%s</div>%s" % (cards, table),
                 refresh, subtitle)


# ======================================================================================
# Starting a session (Go: driver)
# ======================================================================================

_SYSTEMS = {"local": Local, "test": TestSystem, "testsystem": TestSystem, "ssh": SSHSystem,
            "ec2": EC2System, "slurm": SlurmSystem}


def start(system: typing.Union[System, str, None] = None, **options: typing.Any) -> B:
    """Start a session (Go's driver.Start) and return its `B`.

    system is a `System`, or a name ("local", "test", "ssh", "ec2"); None reads
    `--bigm.system=NAME` from sys.argv, then the BIGMACHINE_SYSTEM environment variable, then
    uses "local". options go to the system's constructor when system is a name, after the
    system's own flags and variables (for "ssh": --bigm.ssh.hosts=a,b and the like, see
    `SSHSystem`; for "ec2": --bigm.ec2type=m5.xlarge, --bigm.ec2ondemand, see `EC2System`)."""
    if _machine_bootstrapping:
        raise _UnguardedMain(
            "bigmachine.start() was called while a machine was loading the driver's main module. "
            "Machines import the main module the way multiprocessing does, so the driver's code "
            "must be guarded with `if __name__ == \"__main__\":`")
    if os.environ.get("BIGMACHINE_MODE") == "machine":
        raise Error(
            "bigmachine.start() was called on a machine (by a service, say): sessions are "
            "started by the driver only. A service reaches other machines through the B that "
            "its init(b) method is given: b.dial(addr).call(...)")
    if system is None:
        system = _system_from_command_line(sys.argv) or os.environ.get("BIGMACHINE_SYSTEM") or "local"
    if isinstance(system, str):
        cls = _SYSTEMS.get(system)
        if cls is None:
            raise ValueError("unknown bigmachine system %r; known systems: %s"
                             % (system, ", ".join(sorted(_SYSTEMS))))
        flags = dict(cls._command_line_options(sys.argv, os.environ))
        packages = _flag_or_variable(sys.argv, os.environ, "bigm.packages", "BIGMACHINE_PACKAGES")
        if packages:                  # every system's: auto, none, or requirements a,b
            flags["packages"] = None if packages.strip().lower() in ("none", "off") else \
                "auto" if packages.strip() == "auto" else packages.replace(",", " ").split()
        system = cls(**dict(flags, **options))
    elif options:
        raise TypeError("options are for a system given by name; configure the %s instance "
                        "itself" % type(system).__name__)
    if not isinstance(system, System):
        raise TypeError("system must be a bigmachine.System or a name, not %r" % (system,))
    return B(system)


class _UnguardedMain(Error):
    """bigmachine.start() in a driver's main module that a machine is loading (see start)."""


def _system_from_command_line(argv):
    return _flag(argv, "bigm.system")


def _flag(argv, name, boolean=False):
    """The value of the first --NAME=VALUE or --NAME VALUE in argv[1:] (one dash will do, as
    with Go's flags), or None. A boolean flag may also stand alone, meaning "true"."""
    for i, arg in enumerate(argv[1:], 1):
        for flag in ("--" + name, "-" + name):
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
            if arg == flag:
                if boolean:
                    return "true"
                if i + 1 < len(argv):
                    return argv[i + 1]
    return None


def _flag_or_variable(argv, environ, name, variable, boolean=False):
    """A system's option: --NAME on the command line, else the environment variable."""
    given = _flag(argv, name, boolean)
    return environ.get(variable) if given is None else given


def _truth(value):
    """A boolean flag's or variable's value."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("not a boolean: %r (want true or false)" % (value,))


# ======================================================================================
# Command line: python bigmachine.py selftest
# ======================================================================================
#
# The selftest is what a user runs after copying this file somewhere new: it checks, with the
# standard library alone, that everything works on the machine at hand, one line per check.
# `ec2 list` and `ec2 kill` (with boto3) are for EC2 instances that drivers left behind.

class _SelftestService:
    """The service the selftest installs."""

    def __init__(self, greeting):
        self.greeting = greeting

    def hello(self, name):
        return "%s, %s" % (self.greeting, name)

    def fail(self, message):
        raise KeyError(message)

    def chunks(self, n, size):
        for _ in range(n):
            yield b"x" * size

    def count(self, stream):
        return len(stream.read())

    def sleep(self, seconds):
        context = current_call()
        return context.wait(seconds) if context else time.sleep(seconds)

    def burn(self):
        """Pure Python until cancelled: what a profile must find."""
        self._burning = True
        context, total = current_call(), 0
        while not context.cancelled:
            for i in range(10000):
                total += i * i % 7
        return total

    def burning(self):
        return getattr(self, "_burning", False)


class _CheckFailed(Exception):
    """A selftest check whose result was not the expected one."""


def _expect(condition, message):
    """The selftest's assertion: unlike `assert`, it still checks under `python -O`, where a
    bare assert would be compiled away and a check that did nothing reported as passed."""
    if not condition:
        raise _CheckFailed(message)


def _expect_equal(got, expected):
    _expect(got == expected, "got %.200r, expected %.200r" % (got, expected))


def _selftest(out=sys.stdout):
    """Run every check; print one line each; return the number that failed."""
    failures = []

    def check(name):
        def run(fn):
            began = time.perf_counter()
            try:
                detail = fn()
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                failures.append(name)
                out.write("FAIL %-44s %s: %s\n" % (name, type(e).__name__, e))
            else:
                out.write("ok   %-44s %6.1f ms  %s\n" % (
                    name, 1000 * (time.perf_counter() - began), detail or ""))
            out.flush()
            return fn
        return run

    out.write("bigmachine.py %s selftest on Python %s (%s), %s\n" % (
        __version__, sys.version.split()[0], sys.executable, ssl.OPENSSL_VERSION))

    @check("certificates: CA and leaf")
    def _():
        ca = CertificateAuthority()
        creds = ca.issue("selftest", ip_addresses=["127.0.0.1"])
        server_context(creds)
        client_context(creds)
        return "Ed25519"

    @check("mutual TLS: strangers are refused both ways")
    def _():
        with B(TestSystem()) as b, B(TestSystem()) as other:
            m, = b.start(1, {"Self": _SelftestService("hello")})
            impostor, = other.start(1, {"Self": _SelftestService("hello")})
            for machine in (m, impostor):
                if machine.wait(RUNNING, timeout=30) is not RUNNING:
                    raise machine.err or Error("machine did not start")
            stranger = _Client(CertificateAuthority().issue("stranger"))
            try:
                for client, addr, who in ((stranger, m.addr, "a client of another session"),
                                          (b._client, impostor.addr, "a server of another session")):
                    try:
                        client.peer(addr).call("Supervisor.ping", (1,), {}, time.monotonic() + 10)
                    except AuthenticationError:
                        pass
                    else:
                        raise _CheckFailed("%s was let in" % who)
            finally:
                stranger.close()

    for name in ("test", "local"):
        _selftest_system(name, check)
    return len(failures)


def _selftest_system(name, check):
    system = (TestSystem if name == "test" else Local)(
        keepalive_period=2.0, keepalive_timeout=4.0, keepalive_rpc_timeout=2.0, lease=10.0)
    state = {}

    @check("%s: start 2 machines" % name)
    def _():
        state["b"] = b = B(system)
        state["ms"] = ms = b.start(2, {"Self": _SelftestService("hello")})
        for m in ms:
            if m.wait(RUNNING, timeout=60) is not RUNNING:
                raise m.err or Error("machine %s did not start" % m.addr)
        return ", ".join(m.addr for m in ms)
    if "ms" not in state:
        state.get("b") and state["b"].shutdown()
        return
    b, (m1, m2) = state["b"], state["ms"]
    try:
        @check("%s: call" % name)
        def _():
            _expect_equal(m1.call("Self.hello", "world"), "hello, world")

        @check("%s: remote exception" % name)
        def _():
            try:
                m1.call("Self.fail", "boom")
            except KeyError as e:
                _expect(isinstance(e.__cause__, _RemoteTraceback),
                        "the remote traceback is missing from __cause__")
            else:
                raise _CheckFailed("no exception")

        @check("%s: unknown method" % name)
        def _():
            try:
                m1.call("Self.nosuch")
            except NotFound:
                pass
            else:
                raise _CheckFailed("no NotFound")

        @check("%s: streams both ways" % name)
        def _():
            with m1.call("Self.chunks", 8, 100000) as f:
                data = f.read()
            _expect_equal(len(data), 800000)
            _expect_equal(m2.call("Self.count", io.BytesIO(data)), 800000)

        @check("%s: deadline" % name)
        def _():
            try:
                m1.options(timeout=0.2).call("Self.sleep", 30)
            except Timeout:
                pass
            else:
                raise _CheckFailed("no Timeout")
            _expect_equal(m1.call("Self.hello", "again"), "hello, again")

        @check("%s: profile" % name)
        def _():
            future = m1.call_async("Self.burn")
            try:
                deadline = time.monotonic() + 30
                while not m1.call("Self.burning"):
                    if time.monotonic() > deadline:
                        raise _CheckFailed("Self.burn did not start")
                    time.sleep(0.01)
                stats = b.profile(0.5, [m1])
            finally:
                future.cancel()
            top = max(stats.stats, key=lambda key: stats.stats[key][2])
            if top[2] != "burn":
                raise _CheckFailed("the busiest function is %s, not burn" % (top,))
            return "%d samples" % stats.stats[_PROFILER_KEY][0]

        @check("%s: concurrent calls" % name)
        def _():
            futures = [m.call_async("Self.hello", i) for i in range(50) for m in (m1, m2)]
            _expect_equal([f.result(30) for f in futures], [
                "hello, %d" % i for i in range(50) for _ in (1, 2)])

        if name == "local":
            @check("local: a killed machine is noticed")
            def _():
                pid = m2.call("Supervisor.getpid")
                os.kill(pid, signal.SIGKILL)
                if m2.wait(STOPPED, timeout=10) is not STOPPED:
                    raise _CheckFailed("machine still %s" % m2.state)
                try:
                    m2.call("Self.hello", "ghost")
                except MachineStopped:
                    pass
                return str(m2.err)
    finally:
        @check("%s: shutdown" % name)
        def _():
            b.shutdown()
            _expect(all(m.state is STOPPED for m in (m1, m2)),
                    "machines still up: %s" % [m.state.name for m in (m1, m2)])


def _ec2_command(args):
    """`ec2 list` and `ec2 kill`: the instances of bigmachine sessions in a region, found by
    their tags wherever their drivers ran -- what a driver could not terminate itself."""
    try:
        _, ec2 = _ec2_session(args.region)
    except Error as e:
        print("bigmachine: %s" % e, file=sys.stderr)
        return 1
    botocore = sys.modules["botocore"]
    states = list(_EC2_LIVE) + (["shutting-down"] if args.ec2_command == "list" else [])
    filters = [{"Name": "tag:bigmachine", "Values": ["true"]},
               {"Name": "instance-state-name", "Values": states}]
    if args.session:
        filters.append({"Name": "tag:bigmachine:session", "Values": [args.session]})
    try:
        pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)
        instances = [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
        print("bigmachine: cannot list the instances in %s: %s" % (ec2.meta.region_name,
                                                                   _aws_error(e)), file=sys.stderr)
        return 1
    instances.sort(key=lambda i: (_ec2_tags(i).get("bigmachine:session", ""),
                                  str(i.get("LaunchTime", "")), i["InstanceId"]))
    region = ec2.meta.region_name
    if args.ec2_command == "list":
        rows = [("INSTANCE", "STATE", "TYPE", "MARKET", "LAUNCHED", "SESSION", "USER", "PROGRAM",
                 "ADDRESS")]
        for i in instances:
            tags = _ec2_tags(i)
            launched = i.get("LaunchTime")
            rows.append((
                i["InstanceId"], i["State"]["Name"], i.get("InstanceType", "?"),
                i.get("InstanceLifecycle") or "on-demand",
                launched.strftime("%Y-%m-%dT%H:%MZ") if hasattr(launched, "strftime") else "?",
                tags.get("bigmachine:session", "?"), tags.get("bigmachine:user", "?"),
                tags.get("bigmachine:program", "?"),
                i.get("PublicDnsName") or i.get("PublicIpAddress") or
                i.get("PrivateIpAddress") or "-"))
        widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        print("%d instance%s of bigmachine sessions in %s" % (
            len(instances), "" if len(instances) == 1 else "s", region))
        return 0
    ids = [i["InstanceId"] for i in instances]
    try:
        for k in range(0, len(ids), 500):
            ec2.terminate_instances(InstanceIds=ids[k:k + 500])
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
        print("bigmachine: cannot terminate instances in %s: %s" % (region, _aws_error(e)),
              file=sys.stderr)
        return 1
    for i in instances:
        print("terminated %s (session %s)" % (i["InstanceId"],
                                              _ec2_tags(i).get("bigmachine:session", "?")))
    print("%d instance%s terminated in %s" % (len(ids), "" if len(ids) == 1 else "s", region))
    return 0


def _main(argv):
    import argparse
    parser = argparse.ArgumentParser(prog="bigmachine.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("selftest", help="check that everything works on this machine")
    commands.add_parser("version", help="print the library version")
    ec2 = commands.add_parser("ec2", help="list or terminate the EC2 instances of bigmachine "
                                          "sessions (those their drivers left)")
    ec2_commands = ec2.add_subparsers(dest="ec2_command")
    ec2_list = ec2_commands.add_parser("list", help="list the instances of bigmachine sessions")
    ec2_list.add_argument("--session", help="only those of this session")
    ec2_kill = ec2_commands.add_parser("kill", help="terminate the instances of bigmachine "
                                                    "sessions")
    which = ec2_kill.add_mutually_exclusive_group(required=True)
    which.add_argument("--session", help="those of this session")
    which.add_argument("--all", action="store_true", help="those of every session")
    for command in (ec2_list, ec2_kill):
        command.add_argument("--region", help="the AWS region (default: the AWS configuration's; "
                                              "AWS_ENDPOINT_URL and the like apply too)")
    slurm = commands.add_parser("slurm", help="list or cancel the Slurm jobs of bigmachine "
                                              "sessions (those their drivers left)")
    slurm_commands = slurm.add_subparsers(dest="slurm_command")
    slurm_commands.add_parser("list", help="list this user's jobs of bigmachine sessions")
    slurm_kill = slurm_commands.add_parser("kill", help="cancel this user's jobs of bigmachine "
                                                        "sessions (of SESSION only, if given)")
    slurm_kill.add_argument("session", nargs="?", help="the session whose jobs to cancel")
    args = parser.parse_args(argv)
    if args.command == "slurm":
        if args.slurm_command is None:
            slurm.print_help()
            return 2
        args.session = getattr(args, "session", None)
        return _slurm_command(args)
    if args.command == "ec2":
        if args.ec2_command is None:
            ec2.print_help()
            return 2
        return _ec2_command(args)
    if args.command == "selftest":
        failed = _selftest()
        print("selftest: %s" % ("all checks passed" if not failed else "%d checks FAILED" % failed))
        return 1 if failed else 0
    if args.command == "version":
        print(__version__)
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    # Run as a script, this file is __main__; the library proper is the module `bigmachine`,
    # whose classes the machines know by that name. Import it as such and run from there.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bigmachine
    sys.exit(bigmachine._main(sys.argv[1:]))
