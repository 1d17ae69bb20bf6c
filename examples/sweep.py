"""sweep runs a parameter sweep over a cluster with bigmachine's Executor.

Each point of a grid of parameters is one task: a call of a simulation service's method,
which takes a moment and returns a score. The Executor spreads the tasks over every processor of every machine, reads the grid
lazily (however large it is, the driver holds only a bounded window of it), keeps a progress
line on stderr, and hands back the results in the grid's order; the driver keeps the best.

    python3 examples/sweep.py                                   # 2 local machines
    python3 examples/sweep.py -nmach 4 -rates 40 -sizes 40 -progress
    python3 examples/sweep.py --bigm.system=slurm -nmach 16     # any system

The simulation is a toy: an epidemic on a random contact graph, where `rate` is the chance
that a contact infects and `size` how many contacts each person has; the score is how many
people were ever infected, averaged over a few runs, and the sweep looks for the cheapest
setting (fewest contacts, lowest rate) that still reaches half the population.
"""

import argparse
import itertools
import os
import random
import sys

# From a source checkout, use the bigmachine.py one directory up.
_top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.exists(os.path.join(_top, "bigmachine.py")):
    sys.path.insert(0, _top)

import bigmachine  # noqa: E402

class Epidemic:
    """The simulation, as a service: it holds the study's fixed settings, and the sweep calls
    its method by name on whichever machine has a free processor."""

    def __init__(self, people, runs):
        self.people, self.runs = people, runs

    def evaluate(self, point):
        """One task: the share of people ever infected (mean of runs outbreaks) with
        infection chance rate per contact and size contacts per person."""
        rate, size = point
        infected_total = 0
        for run in range(self.runs):
            rand = random.Random(hash((rate, size, run)))
            contacts = [[rand.randrange(self.people) for _ in range(size)]
                        for _ in range(self.people)]
            infected, frontier = {0}, [0]
            while frontier:
                following = []
                for person in frontier:
                    for other in contacts[person]:
                        if other not in infected and rand.random() < rate:
                            infected.add(other)
                            following.append(other)
                frontier = following
            infected_total += len(infected)
        return rate, size, infected_total / (self.runs * self.people)


def main():
    flags = argparse.ArgumentParser(description="A parameter sweep on a bigmachine cluster.")
    flags.add_argument("-nmach", type=int, default=2, help="machines (default 2)")
    flags.add_argument("-rates", type=int, default=12, help="infection rates to try")
    flags.add_argument("-sizes", type=int, default=12, help="contact counts to try")
    flags.add_argument("-progress", action="store_true",
                       help="a progress line even when stderr is not a terminal")
    args, _ = flags.parse_known_args()
    if min(args.nmach, args.rates, args.sizes) < 1:
        flags.error("-nmach, -rates and -sizes must be at least 1")

    rates = [0.02 + 0.28 * i / max(1, args.rates - 1) for i in range(args.rates)]
    sizes = range(1, args.sizes + 1)
    grid = itertools.product(rates, sizes)            # read lazily by the executor
    with bigmachine.start() as b:
        # Pooled: a replica per processor of each machine, so the CPU-bound simulation uses
        # every processor a machine offers, not one.
        b.start(args.nmach, {"Epidemic": bigmachine.Pooled(Epidemic(people=2000, runs=3))})
        best = None
        with b.executor(progress=True if args.progress else None) as ex:
            for rate, size, share in ex.map("Epidemic.evaluate", grid, chunksize=4):
                if share >= 0.5 and (best is None or (size, rate) < (best[1], best[0])):
                    best = (rate, size, share)
    if best is None:
        print("no setting of the grid reaches half the population")
    else:
        print("cheapest setting reaching half: %d contacts, rate %.3f -> %.0f%% infected"
              % (best[1], best[0], 100 * best[2]))


if __name__ == "__main__":
    main()
