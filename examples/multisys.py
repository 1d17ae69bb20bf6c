"""multisys runs one job on several clusters at once, each from a session of its own.

The Python twin of bigmachine's cmd/multisys. One program holds several sessions, each on its
own system -- say two local machines and six, or local machines beside EC2 instances -- and
keeps every machine of every session sampling points for π for the same window of time. It
then says how many samples each cluster took: a quick way to compare systems, and a reminder
that a session is just an object: a program may hold as many as it likes.

    python3 examples/multisys.py                        # local:2 and local:6, 20 s
    python3 examples/multisys.py -window 5 local:2 ec2:2

Arguments are SYSTEM:N pairs: a system name bigmachine.start() accepts ("local", "test",
"ssh", "ec2", "slurm"; each configured by its flags or environment variables) and how many
machines to start on it.
"""

import argparse
import logging
import os
import sys
import threading
import time

# From a source checkout, use the bigmachine.py one directory up.
_top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.exists(os.path.join(_top, "bigmachine.py")):
    sys.path.insert(0, _top)

import bigmachine  # noqa: E402
from bigpi import CirclePI  # noqa: E402  (beside this file: the same service as bigpi's)

log = logging.getLogger("multisys")

#: Samples per call: small enough that a call ends soon after the window closes.
BATCH = 100_000


def cluster(spec):
    """"local:2" -> ("local", 2)."""
    name, _, n = spec.partition(":")
    if not name or not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError("%r is not SYSTEM:N, e.g. local:2" % spec)
    return name, int(n)


def sample_until(machine, deadline, totals, lock):
    """Keep one machine sampling until the deadline; add what it took to totals."""
    while time.monotonic() < deadline:
        inside = machine.call("PI.sample", BATCH)
        with lock:
            totals[0] += BATCH
            totals[1] += inside


def run(name, n, window):
    """One session: start n machines on system `name`, sample for `window` seconds; return
    (samples, inside)."""
    with bigmachine.start(name) as b:
        machines = b.start(n, {"PI": CirclePI()})
        for m in machines:
            if m.wait(bigmachine.RUNNING) is not bigmachine.RUNNING:
                raise m.err
        log.info("%s: %d machines running", name, n)
        totals, lock = [0, 0], threading.Lock()
        deadline = time.monotonic() + window
        workers = [threading.Thread(target=sample_until, args=(m, deadline, totals, lock))
                   for m in machines for _ in range(m.maxprocs)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return totals


def main():
    flags = argparse.ArgumentParser(description="One job on several clusters at once.")
    flags.add_argument("clusters", nargs="*", type=cluster, metavar="SYSTEM:N",
                       default=[("local", 2), ("local", 6)])
    flags.add_argument("-window", type=float, default=20.0, help="seconds of sampling")
    args, _ = flags.parse_known_args()
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)

    # A thread per session: each session is independent of the others, down to its system.
    results = [None] * len(args.clusters)

    def session(i, name, n):
        try:
            results[i] = run(name, n, args.window)
        except Exception as e:
            results[i] = e

    sessions = [threading.Thread(target=session, args=(i, name, n))
                for i, (name, n) in enumerate(args.clusters)]
    for s in sessions:
        s.start()
    for s in sessions:
        s.join()
    failed = False
    for (name, n), result in zip(args.clusters, results):
        if isinstance(result, Exception):
            print("%s:%d  failed: %s" % (name, n, result))
            failed = True
        else:
            samples, inside = result
            print("%s:%d  %12d samples  π ≈ %.4f" % (name, n, samples, 4 * inside / samples))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
