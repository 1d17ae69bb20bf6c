"""bench/slurm.py: time from b.start(8) to 8 Slurm machines RUNNING, against 8 bare
`srun -n1 python3 -c pass` started at once (the scheduler's own floor), on a one-node Slurm
cluster that this script starts on loopback and stops at the end (slurmctld, slurmd and a
private munged, as the tests do; needs root and Debian's slurm-wlm and munge).

    python bench/slurm.py [--machines 8] [--reps 3] [--json-out FILE]

The measures alternate (srun, sbatch, bigmachine, bigmachine with sbatch, srun...), each from
an idle cluster with no job in the queue and 3.5 s after the last one ended (Slurm's
batch_sched_delay is 3 s), so that all meet the same load and the same scheduler; the report
gives every repetition, the medians and their ratio, against the target of 2x. The second
measure, one bare `sbatch` job array of the same tasks until the queue is empty, is the batch
floor: sbatch's jobs are started by slurmctld's scheduling pass, not at submission as srun's
allocations are, which takes from a tenth of a second to batch_sched_delay. bigmachine submits
with one srun per machine by default; the last measure is its `submit="sbatch"`, one job array.
"""

import argparse
import functools
import json
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import bigmachine  # noqa: E402


class Work:
    def pid(self):
        return os.getpid()


def become(user):
    """In a child, before exec: be user (Popen's user= and group= need Python 3.9)."""
    os.setgid(user.pw_gid)
    os.setgroups([user.pw_gid])
    os.setuid(user.pw_uid)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for %s" % what)
        time.sleep(0.02)


class Cluster:
    """A one-node cluster with `cpus` CPUs on 127.0.0.1, all state in a temporary directory."""

    def __init__(self, cpus, scheduler_parameters=None):
        self.dir = tempfile.mkdtemp(prefix="bigmachine-bench-slurm-")
        os.chmod(self.dir, 0o755)
        self.procs = []
        munge = pwd.getpwnam("munge")
        munge_dir = os.path.join(self.dir, "munge")
        os.mkdir(munge_dir, 0o755)
        os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
        sock = os.path.join(munge_dir, "socket")
        log = open(os.path.join(self.dir, "daemons.log"), "w")
        self.procs.append(subprocess.Popen(
            ["/usr/sbin/munged", "-F", "--socket=" + sock, "--pid-file=%s/pid" % munge_dir,
             "--log-file=%s/log" % munge_dir, "--seed-file=%s/seed" % munge_dir],
            preexec_fn=functools.partial(become, munge), stdout=log, stderr=log))
        wait_for(lambda: os.path.exists(sock), 10, "munged")
        self.conf = os.path.join(self.dir, "slurm.conf")
        d = self.dir
        with open(self.conf, "w") as f:
            f.write("\n".join([
                "ClusterName=bigmachinebench", "SlurmctldHost=localhost(127.0.0.1)",
                "SlurmctldPort=%d" % free_port(), "SlurmdPort=%d" % free_port(),
                "AuthType=auth/munge", "CredType=cred/munge", "AuthInfo=socket=" + sock,
                "SlurmUser=root", "MailProg=/bin/true", "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
                "MpiDefault=none", "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill", "KillWait=2",
                "StateSaveLocation=%s/state" % d, "SlurmdSpoolDir=%s/spool" % d,
                "SlurmctldLogFile=%s/slurmctld.log" % d, "SlurmdLogFile=%s/slurmd.log" % d,
                "SlurmctldPidFile=%s/slurmctld.pid" % d, "SlurmdPidFile=%s/slurmd.pid" % d,
                "SlurmdParameters=config_overrides", "ReturnToService=2",
                "SchedulerParameters=" + scheduler_parameters if scheduler_parameters else "",
                "NodeName=localhost NodeAddr=127.0.0.1 CPUs=%d RealMemory=4000 State=UNKNOWN"
                % cpus,
                "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
                ""]))
        for sub in ("state", "spool"):
            os.mkdir(os.path.join(d, sub))
        os.environ["SLURM_CONF"] = self.conf
        for args in (["/usr/sbin/slurmctld", "-D", "-f", self.conf],
                     ["/usr/sbin/slurmd", "-D", "-f", self.conf, "-N", "localhost"]):
            self.procs.append(subprocess.Popen(args, stdout=log, stderr=log))
        wait_for(lambda: self.out("sinfo", "--noheader", "--format=%T") == "idle", 30,
                 "the node to be idle")

    def out(self, *args):
        return subprocess.run(args, capture_output=True, text=True).stdout.strip()

    def idle(self):
        wait_for(lambda: self.out("squeue", "--noheader") == "" and
                 self.out("sinfo", "--noheader", "--format=%T") == "idle", 60, "an idle cluster")
        # slurmctld starts batch jobs at most every batch_sched_delay (3 s by default) after
        # its last start: wait that out, so that no measure inherits the previous one's.
        time.sleep(3.5)

    def close(self):
        subprocess.run(["scancel", "--user=" + pwd.getpwuid(os.getuid()).pw_name])
        for proc in reversed(self.procs):
            proc.terminate()
            proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def bare_srun(n):
    began = time.perf_counter()
    procs = [subprocess.Popen(["srun", "-n1", sys.executable, "-c", "pass"]) for _ in range(n)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit("srun failed: %s" % codes)
    return time.perf_counter() - began


def bare_sbatch(n, cluster):
    """One job array of n bare `python3 -c pass` tasks, until the queue is empty again: what
    any batch submission costs on this cluster before a machine's own start."""
    began = time.perf_counter()
    subprocess.run(["sbatch", "--parsable", "--array=0-%d" % (n - 1), "--output=/dev/null",
                    "--wrap", "%s -c pass" % sys.executable], check=True, capture_output=True)
    wait_for(lambda: cluster.out("squeue", "--noheader") == "", 60, "the array to finish")
    return time.perf_counter() - began


def bigmachine_start(n, submit="srun"):
    system = bigmachine.SlurmSystem(python=sys.executable, driver_host="127.0.0.1", cpus=1,
                                    submit=submit)
    with bigmachine.start(system) as b:
        began = time.perf_counter()
        machines = b.start(n, {"Work": Work()})
        for m in machines:
            if m.wait(bigmachine.RUNNING, timeout=120) is not bigmachine.RUNNING:
                raise SystemExit("machine %s: %s" % (m.addr, m.err))
        took = time.perf_counter() - began
        assert len({m.call("Work.pid") for m in machines}) == n
    return took


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machines", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json-out")
    ap.add_argument("--scheduler-parameters", metavar="P",
                    help="SchedulerParameters of the cluster (Slurm's default: none), e.g. "
                         "batch_sched_delay=0 to start batch jobs without batching them up")
    opts = ap.parse_args()
    cluster = Cluster(cpus=max(8, opts.machines), scheduler_parameters=opts.scheduler_parameters)
    srun, sbatch, bm, bm_sbatch = [], [], [], []
    try:
        for _ in range(opts.reps):
            cluster.idle()
            srun.append(bare_srun(opts.machines))
            cluster.idle()
            sbatch.append(bare_sbatch(opts.machines, cluster))
            cluster.idle()
            bm.append(bigmachine_start(opts.machines))
            cluster.idle()
            bm_sbatch.append(bigmachine_start(opts.machines, "sbatch"))
    finally:
        cluster.close()
    ratio = statistics.median(bm) / statistics.median(srun)
    print("| measure | runs (s) | median (s) |")
    print("|---|---|---|")
    print("| %d x bare `srun -n1 python3 -c pass` at once, all finished | %s | %.2f |" % (
        opts.machines, " ".join("%.2f" % t for t in srun), statistics.median(srun)))
    print("| one `sbatch --array` of %d bare `python3 -c pass`, until the queue is empty | %s "
          "| %.2f |" % (opts.machines, " ".join("%.2f" % t for t in sbatch),
                        statistics.median(sbatch)))
    print("| `b.start(%d)` until all %d Slurm machines RUNNING (one srun each, the default) "
          "| %s | %.2f |" % (opts.machines, opts.machines, " ".join("%.2f" % t for t in bm),
                             statistics.median(bm)))
    print("| the same with `submit=\"sbatch\"` (one job array) | %s | %.2f |" % (
        " ".join("%.2f" % t for t in bm_sbatch), statistics.median(bm_sbatch)))
    print("\ncluster: SchedulerParameters=%s" % (opts.scheduler_parameters or "(Slurm's default)"))
    print("bigmachine / srun: %.2fx (target <= 2x): %s; bigmachine / bare sbatch array: %.2fx; "
          "load average %s" % (ratio, "met" if ratio <= 2 else "NOT met",
                               statistics.median(bm) / statistics.median(sbatch),
                               " ".join("%.2f" % x for x in os.getloadavg())))
    if opts.json_out:
        with open(opts.json_out, "w") as f:
            json.dump({"srun": srun, "sbatch": sbatch, "bigmachine": bm,
                       "bigmachine_sbatch": bm_sbatch, "ratio": ratio}, f)


if __name__ == "__main__":
    main()
