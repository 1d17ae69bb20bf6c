"""bigpi estimates π by sampling random points on a cluster of machines.

It is the Python twin of bigmachine's cmd/bigpi: a service samples n points in
the unit square and counts those inside the circle inscribed in it; the driver
spreads the samples over every processor of every machine and sums the counts.

    python3 examples/bigpi.py -n 20000000 -nmach 2
    python3 examples/bigpi.py --bigm.system=ec2 -nmach 5 -n 1e10
    python3 examples/bigpi.py -nmach 1 --bigm.local.maxprocs=2   # one machine, two processors

Flags:
    -n N          samples to take in all (default 1e8, about ten seconds on two
                  cores; the Go original's 1e10 takes a quarter of an hour there)
    -nmach N      machines to start (default 2)
    -debug ADDR   serve bigmachine's debug pages on ADDR, e.g. 127.0.0.1:3333
Any --bigm.* flag is left in sys.argv for bigmachine.start() to read.
"""

import argparse
import logging
import os
import random
import sys
from fractions import Fraction

# From a source checkout, use the bigmachine.py one directory up.
_top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.exists(os.path.join(_top, "bigmachine.py")):
    sys.path.insert(0, _top)

import bigmachine  # noqa: E402

log = logging.getLogger("bigpi")


class CirclePI:
    def sample(self, n):
        """Take n points in the unit square; return how many fall inside the unit circle."""
        # A generator of its own per call, not the module's shared one: calls that
        # run at once on a machine would share its state (and, on free-threaded
        # Python, its lock) -- the contention the Go original's CPU profile caught.
        rand, inside = random.Random().random, 0
        for _ in range(n):
            x, y = rand() - 0.5, rand() - 0.5
            if x * x + y * y < 0.25:
                inside += 1
        return inside


def count(text):
    """A flag value that is a positive whole number: 20000000, 2e7 and 1e10 all do."""
    try:
        value = Fraction(text)
    except ValueError:
        value = None
    if value is None or value.denominator != 1 or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(value)


def float_string(x, digits):
    """x, a Fraction >= 0, with digits decimals, rounded half up like Go's Rat.FloatString."""
    q, r = divmod(x.numerator * 10**digits, x.denominator)
    q += 2 * r >= x.denominator
    whole, frac = divmod(q, 10**digits)
    return f"{whole}.{frac:0{digits}d}" if digits else str(whole)


def fatal(msg, *args):
    log.critical(msg, *args)
    sys.exit(1)


def main():
    flags = argparse.ArgumentParser(description="Estimate π on a bigmachine cluster.")
    flags.add_argument("-n", type=count, default=10**8, help="samples in all (default 1e8)")
    flags.add_argument("-nmach", type=count, default=2, metavar="N", help="machines (default 2)")
    flags.add_argument("-debug", metavar="ADDR", help="serve the debug pages on ADDR")
    args, _ = flags.parse_known_args()  # what is left, --bigm.system=… among it, is bigmachine's
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%Y/%m/%d %H:%M:%S",
                        level=logging.INFO)

    with bigmachine.start() as b:
        if args.debug:
            addr = b.serve_debug(args.debug)
            log.info("debug pages at http://%s/debug/bigmachine/status", addr)

        # Start the machines, each with the CirclePI service, and wait for them. Pooled:
        # a replica of it in each of a machine's processors (worker processes), so that
        # sampling, CPU-bound Python, uses them all despite the GIL.
        machines = b.start(args.nmach, {"PI": bigmachine.Pooled(CirclePI())})
        log.info("waiting for machines to come online")
        for m in machines:
            state = m.wait(bigmachine.RUNNING)
            log.info("machine %s %s", m.addr, state.name)
            if state != bigmachine.RUNNING:
                fatal("machine %s failed: %s", m.addr, m.err)
        log.info("all machines are ready")

        # One call per processor of each machine; the shares add up to exactly n.
        procs = [m for m in machines for _ in range(m.maxprocs)]
        log.info("distributing work among %d cores", len(procs))
        share, extra = divmod(args.n, len(procs))
        futures = [m.call_async("PI.sample", share + (i < extra))
                   for i, m in enumerate(procs)]
        try:
            total = sum(f.result() for f in futures)
        except Exception as err:
            fatal("sampling failed: %s: %s", type(err).__name__, err)
        log.info("total=%d nsamples=%d", total, args.n)

        # As many decimals as the sample count warrants: ⌊log₁₀ n⌋, computed exactly.
        digits = len(str(args.n)) - 1
        print(f"π = {float_string(Fraction(4 * total, args.n), digits)}")


if __name__ == "__main__":
    main()
