"""wordcount counts the words of many files with mapper machines and one reducer machine.

It shows what bigpi does not: machines that call each other. The driver streams each file to a
mapper; the mapper counts its words and sends the partial counts straight to the reducer
machine (a machine-to-machine call, made with the mapper's own `b.dial`); at the end the
driver reads the totals back from the reducer as a stream of lines.

    python3 examples/wordcount.py FILE...
    python3 examples/wordcount.py -nmap 4 -top 20 books/*.txt
    python3 examples/wordcount.py --bigm.system=ssh ...       # any system: files travel as streams

Flags:
    -nmap N     mapper machines (default 2); one more machine is started for the reducer
    -top K      print the K most common words (default 10), then the number of distinct words
Any --bigm.* flag is left in sys.argv for bigmachine.start() to read.
"""

import argparse
import codecs
import collections
import logging
import os
import re
import sys
import threading

# From a source checkout, use the bigmachine.py one directory up.
_top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.exists(os.path.join(_top, "bigmachine.py")):
    sys.path.insert(0, _top)

import bigmachine  # noqa: E402

log = logging.getLogger("wordcount")

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


class Mapper:
    """Counts the words of one streamed file and sends the counts to the reducer."""

    def init(self, b):
        # The machine's own session: what lets a method call another machine.
        self.b = b

    def count(self, stream, reducer_addr):
        """Count the words read from `stream` (a streamed argument: the file never has to be
        on this machine's disk) and add them to the reducer at `reducer_addr`."""
        counts = collections.Counter()
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        rest = ""
        for chunk in iter(lambda: stream.read(1 << 16), b""):
            text = rest + decoder.decode(chunk)
            # A word may straddle two chunks: its start waits for the next one.
            cut = len(text)
            while cut and not text[cut - 1].isspace():
                cut -= 1
            text, rest = text[:cut], text[cut:]
            counts.update(w.lower() for w in WORD.findall(text))
        counts.update(w.lower() for w in WORD.findall(rest + decoder.decode(b"", final=True)))
        # Retried: the reducer may be briefly unreachable, and adding is what must not be lost.
        self.b.dial(reducer_addr).retry_call("Reduce.add", dict(counts))
        return sum(counts.values())


class Reducer:
    """Sums the partial counts the mappers send, and serves the totals."""

    def __init__(self):
        self.totals = collections.Counter()

    def init(self, b):
        # Calls run at once on a machine, a thread each, and Counter.update is not atomic.
        # The lock is made here, on the machine: a lock cannot be pickled with the service.
        self.lock = threading.Lock()

    def add(self, words):
        with self.lock:
            self.totals.update(words)

    def totals_tsv(self):
        """Every word and its count, most common first, as a stream of "word\\tcount" lines."""
        with self.lock:
            ranked = self.totals.most_common()
        for word, n in ranked:
            yield ("%s\t%d\n" % (word, n)).encode("utf-8")


def main():
    flags = argparse.ArgumentParser(description="Count words on a bigmachine cluster.")
    flags.add_argument("files", nargs="+", help="text files to count")
    flags.add_argument("-nmap", type=int, default=2, metavar="N", help="mapper machines")
    flags.add_argument("-top", type=int, default=10, metavar="K", help="words to print")
    args, _ = flags.parse_known_args()
    if args.nmap < 1:
        flags.error("-nmap must be at least 1")
    for path in args.files:
        if not os.path.isfile(path):
            flags.error("%s is not a file" % path)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)

    with bigmachine.start() as b:
        reducer, = b.start(1, {"Reduce": Reducer()})
        mappers = b.start(args.nmap, {"Map": Mapper()})
        for m in [reducer] + mappers:
            if m.wait(bigmachine.RUNNING) is not bigmachine.RUNNING:
                raise SystemExit("machine %s: %s" % (m.addr, m.err))
        # Each file goes to a mapper in turn, all at once, streamed: the driver never holds
        # a file's bytes, and the mappers need not see the driver's disk.
        calls = []
        for i, path in enumerate(args.files):
            f = open(path, "rb")
            calls.append((path, f, mappers[i % len(mappers)].call_async(
                "Map.count", f, reducer.addr)))
        words = 0
        for path, f, call in calls:
            try:
                n = call.result()
            finally:
                f.close()
            log.info("%s: %d words", path, n)
            words += n
        distinct = 0
        with reducer.call("Reduce.totals_tsv") as lines:
            for line in lines:
                word, n = line.decode("utf-8").rstrip("\n").split("\t")
                if distinct < args.top:
                    print("%7s %s" % (n, word))
                distinct += 1
        print("%d words, %d distinct, in %d files" % (words, distinct, len(args.files)))


if __name__ == "__main__":
    main()
