"""bigoom: a machine that runs out of memory, and what the driver says about it.

The Python twin of bigmachine's cmd/bigoom. Each machine allocates memory a chunk at a time,
touching every page, until the kernel's OOM killer ends it. A process killed that way dies by
SIGKILL and says nothing; the driver works out why (the kernel's count of OOM kills in the
machine's memory cgroup, or how near its limit the machine's last keepalive found it) and
says so in the machine's `err`, a `bigmachine.OutOfMemory`:

    machine https://127.0.0.1:40123/ (pid 4242) ran out of memory and was killed: the
    kernel's OOM killer ended it (/sys/fs/cgroup/...: oom_kill 1)

Run it where a machine's memory is bounded: an EC2 instance (--bigm.system=ec2 -max 0), a
Slurm job's --mem, or local machines in a memory cgroup of their own, e.g.

    systemd-run --user --scope -p MemoryMax=300M python3 examples/bigoom.py

A machine stops eating at -max MiB (default: 1 GiB, or half of what its host has available
if that is less, so that an unbounded host is never the one that runs short); -max 0 eats
until it is killed.
"""

import argparse
import os
import sys
import time

# From a source checkout, use the bigmachine.py one directory up.
_top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.exists(os.path.join(_top, "bigmachine.py")):
    sys.path.insert(0, _top)

import bigmachine  # noqa: E402

CHUNK = 8 << 20          # bytes a step: small, so keepalives see the machine's memory grow


class Hog:
    """Eats memory."""

    def __init__(self):
        self.eaten = []

    def eat(self, limit):
        """Allocate and touch CHUNK after CHUNK, up to limit bytes (0: no limit), slowly
        enough for keepalives to report it; return the bytes held if still alive."""
        while not limit or len(self.eaten) * CHUNK < limit:
            self.eaten.append(bytearray(b"x") * CHUNK)      # every page written
            time.sleep(0.01)
        return len(self.eaten) * CHUNK


def main():
    flags = argparse.ArgumentParser(description="Machines that run out of memory.")
    flags.add_argument("-n", type=int, default=1, help="machines")
    flags.add_argument("-max", type=int, default=None,
                       help="MiB a machine eats at most (0: until killed)")
    args, _ = flags.parse_known_args()
    with bigmachine.start() as b:
        machines = b.start(args.n, {"Hog": Hog()})
        for m in machines:
            if m.wait(bigmachine.RUNNING) is not bigmachine.RUNNING:
                raise m.err
        # The first keepalive's reply tells the driver the machine's memory cgroup and its
        # count of OOM kills, against which the count after the machine's death is compared.
        while any(m.next_keepalive is None for m in machines):
            time.sleep(0.05)
        futures = []
        for m in machines:
            limit = (args.max << 20 if args.max is not None
                     else min(1 << 30, (m.mem_info().available or 1 << 30) // 2))
            futures.append(m.call_async("Hog.eat", limit))
        failed = 0
        for m, future in zip(machines, futures):
            try:
                print("%s: still alive, holding %d MiB" % (m.addr, future.result() >> 20))
                continue
            except bigmachine.Error:
                pass                             # the call's error: the machine is gone
            m.wait(bigmachine.STOPPED)
            print("%s: %s: %s" % (m.addr, type(m.err).__name__, m.err))
            failed += not isinstance(m.err, bigmachine.OutOfMemory)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
