"""Shipping the driver's packages to an SSH machine (bigmachine.py's Packages), on loopback.

The driver (this interpreter) has numpy imported; the machine runs another Python of the same
major.minor that lacks it (--machine-python, default: the first python3.X on PATH or in
/usr/bin that cannot import numpy), through an sshd of the bench's own on 127.0.0.1. It
measures, interleaved:

  cold    a start on a host whose package cache is empty: seconds to RUNNING, bytes shipped,
          and the shipping rate (the bytes over the time of the Supervisor.packages_put call)
  bulk    the transport's bulk rate on the same kind of machine: a 64 MiB streamed argument
  disk    the host's file system: the shipped files' sizes written afresh (create, write,
          rename), as MB/s -- a floor that many small files can put below the transport's
  warm    a start on the same host again: seconds to RUNNING and bytes shipped (0)
  none    the same start with packages=None (the machine then lacks numpy): seconds to RUNNING

and judges the targets: cold shipping >= 50% of bulk; warm ships 0 bytes; warm <= 1.2x none.
Run: python bench/packages.py [--reps 5] [--json-out FILE]. Needs sshd, ssh, ssh-keygen.
"""

import argparse
import contextlib
import io
import json
import logging
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import bigmachine                     # noqa: E402

BULK = 64 << 20


class Sink:
    def take(self, f):
        n = 0
        for chunk in iter(lambda: f.read(1 << 20), b""):
            n += len(chunk)
        return n

    def numpy_sum(self, n):
        import numpy
        return int(numpy.arange(n).sum()), numpy.__file__


class Shipped(logging.Handler):
    """Catches bigmachine's debug record of each packages_put: (bytes, seconds)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.sends = []

    def emit(self, record):
        if record.msg.startswith("%s: sent %d package files"):
            self.sends.append((record.args[2], record.args[3]))


def machine_python(given):
    if given:
        return given
    version = "python%d.%d" % sys.version_info[:2]
    for candidate in (shutil.which(version), "/usr/bin/" + version, "/usr/local/bin/" + version):
        if candidate and os.path.realpath(candidate) != os.path.realpath(sys.executable) and \
                subprocess.run([candidate, "-c", "import numpy"], stderr=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL).returncode != 0:
            return candidate
    sys.exit("no %s without numpy found: give --machine-python" % version)


@contextlib.contextmanager
def sshd(host_tmp=None):
    """An sshd of the bench's own on 127.0.0.1 (as the tests start one), whose sessions have a
    TMPDIR of their own (in host_tmp, if given); yields (host, ssh options, that TMPDIR)."""
    d = tempfile.mkdtemp(prefix="bench-sshd-")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        os.path.join(d, key)], check=True)
    shutil.copy(os.path.join(d, "client_key.pub"), os.path.join(d, "authorized_keys"))
    remote_tmp = tempfile.mkdtemp(prefix="bench-host-tmp-", dir=host_tmp or d)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", 0o755, exist_ok=True)
    port = bigmachine._free_port()
    with open(os.path.join(d, "sshd_config"), "w") as f:
        f.write(textwrap.dedent("""\
            ListenAddress 127.0.0.1
            Port %d
            HostKey %s/host_key
            PidFile %s/sshd.pid
            AuthorizedKeysFile %s/authorized_keys
            PermitRootLogin prohibit-password
            PasswordAuthentication no
            UsePAM no
            StrictModes no
            MaxStartups 100
            SetEnv TMPDIR=%s
            """ % (port, d, d, d, remote_tmp)))
    sshd_path = shutil.which("sshd") or "/usr/sbin/sshd"
    proc = subprocess.Popen([sshd_path, "-D", "-e", "-f", os.path.join(d, "sshd_config")],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        user = pwd.getpwuid(os.getuid()).pw_name
        options = ["-F", "/dev/null", "-o", "UserKnownHostsFile=%s/known_hosts" % d,
                   "-o", "StrictHostKeyChecking=no", "-o", "IdentitiesOnly=yes",
                   "-o", "LogLevel=ERROR", "-i", os.path.join(d, "client_key")]
        yield "%s@127.0.0.1:%d" % (user, port), options, remote_tmp
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(remote_tmp, ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)


def disk_floor(cache, where):
    """MB/s of writing the files of the cache's objects afresh on the host's disk, each
    created under a temporary name and renamed, as a machine receives them: what the host's
    file system allows, whatever the transport."""
    objects = os.path.join(cache, "objects")
    sizes = [os.path.getsize(os.path.join(objects, n)) for n in os.listdir(objects)]
    blob = os.urandom(max(sizes))
    target = tempfile.mkdtemp(dir=where)
    began = time.perf_counter()
    for i, size in enumerate(sizes):
        path = os.path.join(target, "%d" % i)
        with open(path + ".part", "wb") as f:
            f.write(blob[:size])
        os.replace(path + ".part", path)
    seconds = time.perf_counter() - began
    shutil.rmtree(target)
    return sum(sizes) / 1e6 / seconds


def start_one(host, options, python, packages, shipped):
    """Start one machine; returns (seconds to RUNNING, bytes shipped, the system, b, m)."""
    system = bigmachine.SSHSystem([host], python=python, ssh_options=options,
                                  packages=packages)
    before = len(shipped.sends)
    began = time.perf_counter()
    b = bigmachine.start(system)
    m, = b.start(1, {"Sink": Sink()})
    if m.wait(bigmachine.RUNNING, timeout=300) is not bigmachine.RUNNING:
        b.shutdown()
        sys.exit("the machine did not start: %s" % m.err)
    seconds = time.perf_counter() - began
    return seconds, system.packages_sent, shipped.sends[before:], b, m


def main():
    # Imported here, not at the top: machines load this module, and with packages=None
    # theirs has no numpy.
    import numpy                      # what travels
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--machine-python")
    parser.add_argument("--json-out")
    parser.add_argument("--host-tmp", help="where the host's TMPDIR goes (its caches and "
                        "machine directories): by default the system's temporary directory; "
                        "/dev/shm takes the disk out of the measure")
    opts = parser.parse_args()
    python = machine_python(opts.machine_python)
    shipped = Shipped()
    logging.getLogger("bigmachine").addHandler(shipped)
    logging.getLogger("bigmachine").setLevel(logging.DEBUG)
    logging.getLogger("bigmachine").propagate = False
    results = {"cold_s": [], "cold_bytes": [], "ship_mbps": [], "bulk_mbps": [], "disk_mbps": [],
               "warm_s": [], "warm_bytes": [], "none_s": []}
    with sshd(opts.host_tmp) as (host, options, remote_tmp):
        cache = os.path.join(remote_tmp, "bigmachine-%d" % os.getuid(), "packages")
        # A first start caches the code bundle; the measures below are of packages alone.
        _, _, _, b, _ = start_one(host, options, python, None, shipped)
        b.shutdown()
        for rep in range(opts.reps):
            shutil.rmtree(cache, ignore_errors=True)
            seconds, sent, sends, b, m = start_one(host, options, python, "auto", shipped)
            total, where = m.call("Sink.numpy_sum", 1000)
            assert total == 499500 and "/packages/envs/" in where, where
            results["cold_s"].append(seconds)
            results["cold_bytes"].append(sent)
            results["ship_mbps"].append(sum(n for n, _ in sends) / 1e6 /
                                        sum(s for _, s in sends))
            results["disk_mbps"].append(disk_floor(cache, remote_tmp))
            data = io.BytesIO(os.urandom(BULK))
            began = time.perf_counter()
            assert m.call("Sink.take", data) == BULK
            results["bulk_mbps"].append(BULK / 1e6 / (time.perf_counter() - began))
            b.shutdown()
            for packages, key in (("auto", "warm"), (None, "none")):
                seconds, sent, _, b, _ = start_one(host, options, python, packages, shipped)
                b.shutdown()
                results[key + "_s"].append(seconds)
                if key == "warm":
                    results["warm_bytes"].append(sent)
    median = {k: statistics.median(v) for k, v in results.items()}
    best = {"ship_mbps": max(results["ship_mbps"]), "bulk_mbps": max(results["bulk_mbps"])}
    ratio_ship = median["ship_mbps"] / median["bulk_mbps"]
    ratio_warm = median["warm_s"] / median["none_s"]
    print("# Packages over SSH on loopback: numpy %s, driver %s, machine %s, host TMPDIR in %s"
          % (numpy.__version__, sys.executable, python, opts.host_tmp or tempfile.gettempdir()))
    print()
    print("| measure | median of %d | best |" % opts.reps)
    print("|---|---|---|")
    print("| cold start to RUNNING, s | %.2f | %.2f |" % (median["cold_s"], min(results["cold_s"])))
    print("| bytes shipped (cold) | %d | |" % median["cold_bytes"])
    print("| shipping rate, MB/s | %.0f | %.0f |" % (median["ship_mbps"], best["ship_mbps"]))
    print("| transport bulk rate (64 MiB streamed argument), MB/s | %.0f | %.0f |"
          % (median["bulk_mbps"], best["bulk_mbps"]))
    print("| the host's disk: the same files written afresh, MB/s | %.0f | %.0f |"
          % (median["disk_mbps"], max(results["disk_mbps"])))
    print("| warm start to RUNNING, s | %.3f | %.3f |" % (median["warm_s"], min(results["warm_s"])))
    print("| bytes shipped (warm) | %d | |" % max(results["warm_bytes"]))
    print("| start with packages=None, s | %.3f | %.3f |"
          % (median["none_s"], min(results["none_s"])))
    print()
    print("| target | value | met |")
    print("|---|---|---|")
    print("| cold shipping >= 50%% of the bulk rate | %.0f%% | %s |"
          % (100 * ratio_ship, "met" if ratio_ship >= 0.5 else "NOT met"))
    floor = min(median["bulk_mbps"], median["disk_mbps"])
    print("| cold shipping against the slower of bulk and disk | %.0f%% | |"
          % (100 * median["ship_mbps"] / floor))
    print("| warm start ships 0 bytes | %d | %s |" % (
        max(results["warm_bytes"]), "met" if max(results["warm_bytes"]) == 0 else "NOT met"))
    print("| warm start <= 1.2x a start without packages | %.2fx | %s |"
          % (ratio_warm, "met" if ratio_warm <= 1.2 else "NOT met"))
    if opts.json_out:
        with open(opts.json_out, "w") as f:
            json.dump({"runs": results, "median": median, "ship_ratio": ratio_ship,
                       "warm_ratio": ratio_warm}, f, indent=1)


if __name__ == "__main__":
    main()
