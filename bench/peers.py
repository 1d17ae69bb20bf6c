"""The same measures for bigmachine's peers, each worker a separate process on 127.0.0.1.

    python bench/peers.py [--quick] [--json] [--peers mp,execnet,rpyc,pyro5,ray,dask]

Peers that are not importable are reported as n/a; a peer that fails does not
stop the others. Ray and Dask must run inside a network namespace that has only
loopback (run.py arranges it; by hand:
`unshare -n sh -c 'ip link set lo up && exec python bench/peers.py --peers ray,dask'`).

How each peer is driven (its usual, documented way; defaults unless noted):

  mp       multiprocessing.managers.BaseManager, one manager process per worker
           (default start method, fork on Linux; "2 workers ready" is also
           measured with spawn and shown in the notes); proxies make one
           connection per client thread by themselves.
  execnet  one popen gateway per worker; the service is a remote_exec loop on a
           channel; each client thread opens its own channel (remote_exec runs
           each in its own remote thread).
  rpyc     rpyc.Service + ThreadedServer in a child process; one connection per
           client thread; the bound method netref is looked up once. RPyC
           compresses frames with zlib by default; that is left on.
  pyro5    Pyro5 Daemon (thread pool server) in a child process; one Proxy per
           client thread (Pyro5 proxies belong to one thread). Serializer
           "marshal" (the default, serpent, base64-encodes bytes).
  ray      ray.init(address="local", num_cpus=2) + 2 actors (max_concurrency=32);
           "2 workers ready" includes ray.init. Calls are ray.get(a.m.remote()).
  dask     LocalCluster(n_workers=2, processes=True) + one Actor per worker;
           "2 workers ready" includes starting the cluster. Calls are
           actor.m(...).result().
"""

import concurrent.futures as cf
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402

# Children (mp spawn, ray workers, dask workers) must be able to import _common.
os.environ["PYTHONPATH"] = HERE + (os.pathsep + os.environ["PYTHONPATH"]
                                   if os.environ.get("PYTHONPATH") else "")

ALL = ["mp", "execnet", "rpyc", "pyro5", "ray", "dask"]
TITLES = {"mp": "mp.managers", "execnet": "execnet", "rpyc": "RPyC",
          "pyro5": "Pyro5", "ray": "Ray", "dask": "Dask"}
NEEDS_NETNS = {"ray", "dask"}


def _parallel(fns):
    """Run the callables at once; return their results in order."""
    with cf.ThreadPoolExecutor(len(fns)) as ex:
        return [f.result() for f in [ex.submit(fn) for fn in fns]]


# ----------------------------------------------------------------------------
# multiprocessing.managers

from multiprocessing.managers import BaseManager  # noqa: E402


class EchoManager(BaseManager):
    pass


EchoManager.register("Echo", C.Echo)


class ProxyWorker:
    """A worker whose proxy `p` has the service's methods as its own."""

    def inc(self, x):
        return self.p.inc(x)

    def prep(self, n):
        self.p.prep(n)

    def take(self, b):
        return self.p.take(b)

    def blob(self, n):
        return self.p.blob(n)

    def pid(self):
        return self.p.pid()


class MPWorker(ProxyWorker):
    def __init__(self, proxy):
        self.p = proxy

    def per_thread(self):
        return self.p.inc, None  # BaseProxy keeps one connection per thread


class MPPeer:
    name = "mp.managers"

    def __init__(self, method=None):
        import multiprocessing
        self.ctx = multiprocessing.get_context(method)
        self.managers = []

    def _one(self):
        m = EchoManager(address=("127.0.0.1", 0), ctx=self.ctx)
        m.start()
        self.managers.append(m)
        p = m.Echo()
        p.inc(0)
        return MPWorker(p)

    def start(self, n):
        return _parallel([self._one] * n)

    def stop(self):
        for m in self.managers:
            m.shutdown()
        self.managers = []


# ----------------------------------------------------------------------------
# execnet

EXECNET_SERVICE = r'''
import os, random
payload = b""
while True:
    try:
        msg = channel.receive()
    except EOFError:
        break
    op = msg[0]
    if op == "i":
        channel.send(msg[1] + 1)
    elif op == "t":
        channel.send(len(msg[1]))
    elif op == "g":
        n = msg[1]
        if len(payload) != n:
            payload = random.Random(n).getrandbits(8 * n).to_bytes(n, "little")
        channel.send(None)
    elif op == "b":
        channel.send(payload)
    elif op == "p":
        channel.send(os.getpid())
    else:
        break
'''


class ExecnetWorker:
    def __init__(self, gw):
        self.gw = gw
        self.ch = gw.remote_exec(EXECNET_SERVICE)

    def _rt(self, ch, msg):
        ch.send(msg)
        return ch.receive(timeout=600)

    def inc(self, x):
        return self._rt(self.ch, ("i", x))

    def per_thread(self):
        ch = self.gw.remote_exec(EXECNET_SERVICE)
        return (lambda x: self._rt(ch, ("i", x))), (lambda: ch.send(("q",)))

    def prep(self, n):
        self._rt(self.ch, ("g", n))

    def take(self, b):
        return self._rt(self.ch, ("t", b))

    def blob(self, n):
        return self._rt(self.ch, ("b", n))

    def pid(self):
        return self._rt(self.ch, ("p",))


class ExecnetPeer:
    name = "execnet"

    def __init__(self):
        import execnet
        self.execnet = execnet
        self.gws = []

    def _one(self):
        gw = self.execnet.makegateway("popen//python=%s" % sys.executable)
        self.gws.append(gw)
        w = ExecnetWorker(gw)
        w.inc(0)
        return w

    def start(self, n):
        return _parallel([self._one] * n)

    def stop(self):
        for gw in self.gws:
            try:
                gw.exit()
            except Exception:
                pass
        for gw in self.gws:
            try:
                gw.join(timeout=10)
            except Exception:
                pass
        self.gws = []


# ----------------------------------------------------------------------------
# RPyC

RPYC_CONFIG = {"sync_request_timeout": 600}


def serve_rpyc():
    import logging
    import rpyc
    from rpyc.utils.server import ThreadedServer
    echo = C.Echo()

    class EchoService(rpyc.Service):
        def exposed_inc(self, x):
            return echo.inc(x)

        def exposed_prep(self, n):
            return echo.prep(n)

        def exposed_take(self, b):
            return echo.take(b)

        def exposed_blob(self, n):
            return echo.blob(n)

        def exposed_pid(self):
            return echo.pid()

    quiet = logging.getLogger("bench-rpyc")
    quiet.setLevel(logging.ERROR)
    srv = ThreadedServer(EchoService(), hostname="127.0.0.1", port=0,
                         protocol_config=RPYC_CONFIG, logger=quiet)
    C.announce("127.0.0.1", srv.port)
    srv.start()


class RpycWorker:
    def __init__(self, rpyc, addr):
        self.rpyc = rpyc
        self.addr = addr
        self.conn = rpyc.connect(addr[0], addr[1], config=RPYC_CONFIG)
        root = self.conn.root
        self.inc = root.inc
        self.prep = root.prep
        self.take = root.take
        self.blob = root.blob
        self.pid = root.pid

    def per_thread(self):
        c = self.rpyc.connect(self.addr[0], self.addr[1], config=RPYC_CONFIG)
        return c.root.inc, c.close

    def close(self):
        self.conn.close()


class ChildServerPeer:
    """Peers whose worker is `peers.py --serve NAME` in a child process."""
    serve_name = None

    def __init__(self):
        self.children = []
        self.workers = []

    def start(self, n):
        args = [sys.executable, os.path.abspath(__file__), "--serve", self.serve_name]
        self.children = [C.Child(args) for _ in range(n)]
        for ch in self.children:
            ch.ready()
        self.workers = [self.worker(ch.addr) for ch in self.children]
        for w in self.workers:
            w.inc(0)
        return self.workers

    def stop(self):
        for w in self.workers:
            try:
                w.close()
            except Exception:
                pass
        for ch in self.children:
            ch.close()
        self.workers, self.children = [], []


class RpycPeer(ChildServerPeer):
    name = "RPyC"
    serve_name = "rpyc"

    def __init__(self):
        super().__init__()
        import rpyc
        self.rpyc = rpyc

    def worker(self, addr):
        return RpycWorker(self.rpyc, addr)


# ----------------------------------------------------------------------------
# Pyro5

PYRO_SERIALIZER = "marshal"


def serve_pyro5():
    import Pyro5.api

    @Pyro5.api.expose
    @Pyro5.api.behavior(instance_mode="single")
    class PyroEcho(C.Echo):
        # Pyro5 exposes methods defined on the exposed class itself.
        def inc(self, x):
            return x + 1

        def prep(self, n):
            return C.Echo.prep(self, n)

        def take(self, b):
            return len(b)

        def blob(self, n):
            return C.Echo.blob(self, n)

        def pid(self):
            return os.getpid()

    daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
    daemon.register(PyroEcho(), "echo")
    host, port = daemon.sock.getsockname()[:2]
    C.announce(host, port)
    daemon.requestLoop()


class PyroWorker(ProxyWorker):
    def __init__(self, api, addr):
        self.api = api
        self.uri = "PYRO:echo@%s:%d" % addr
        self.p = self._proxy()

    def _proxy(self):
        p = self.api.Proxy(self.uri)
        p._pyroSerializer = PYRO_SERIALIZER
        return p

    def per_thread(self):
        p = self._proxy()
        return p.inc, p._pyroRelease

    def close(self):
        self.p._pyroRelease()


class Pyro5Peer(ChildServerPeer):
    name = "Pyro5"
    serve_name = "pyro5"

    def __init__(self):
        super().__init__()
        import Pyro5.api
        self.api = Pyro5.api

    def worker(self, addr):
        return PyroWorker(self.api, addr)


# ----------------------------------------------------------------------------
# Ray

class RayWorker:
    def __init__(self, ray, actor):
        self.ray = ray
        self.a = actor

    def inc(self, x):
        return self.ray.get(self.a.inc.remote(x))

    def per_thread(self):
        return self.inc, None

    def prep(self, n):
        self.ray.get(self.a.prep.remote(n))

    def take(self, b):
        return self.ray.get(self.a.take.remote(b))

    def blob(self, n):
        return self.ray.get(self.a.blob.remote(n))

    def pid(self):
        return self.ray.get(self.a.pid.remote())


class RayPeer:
    name = "Ray"

    def __init__(self):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray
        self.ray = ray
        self.cls = ray.remote(max_concurrency=32)(C.Echo)

    def start(self, n):
        ray = self.ray
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR",
                 _node_ip_address="127.0.0.1", object_store_memory=1 << 30)
        actors = [self.cls.remote() for _ in range(n)]
        ray.get([a.inc.remote(0) for a in actors])
        return [RayWorker(ray, a) for a in actors]

    def stop(self):
        self.ray.shutdown()


# ----------------------------------------------------------------------------
# Dask

class DaskWorker:
    def __init__(self, actor):
        self.a = actor

    def inc(self, x):
        return self.a.inc(x).result()

    def per_thread(self):
        return self.inc, None

    def prep(self, n):
        self.a.prep(n).result()

    def take(self, b):
        return self.a.take(b).result()

    def blob(self, n):
        return self.a.blob(n).result()

    def pid(self):
        return self.a.pid().result()


class DaskPeer:
    name = "Dask"

    def __init__(self):
        import logging
        import dask
        import distributed
        self.distributed = distributed
        self.logging = logging
        dask.config.set({"distributed.admin.tick.limit": "60s"})
        self.cluster = self.client = None

    def start(self, n):
        d = self.distributed
        self.cluster = d.LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
            scheduler_port=0, dashboard_address=None,
            silence_logs=self.logging.ERROR)
        self.client = d.Client(self.cluster)
        addrs = sorted(self.client.scheduler_info()["workers"])
        futs = [self.client.submit(C.Echo, actor=True, workers=[a], pure=False)
                for a in addrs]
        actors = [f.result() for f in futs]
        for a in actors:
            a.inc(0).result()
        return [DaskWorker(a) for a in actors]

    def stop(self):
        if self.client is not None:
            self.client.close(timeout=30)
        if self.cluster is not None:
            self.cluster.close(timeout=30)
        self.client = self.cluster = None


# ----------------------------------------------------------------------------

FACTORIES = {"mp": MPPeer, "execnet": ExecnetPeer, "rpyc": RpycPeer,
             "pyro5": Pyro5Peer, "ray": RayPeer, "dask": DaskPeer}


def measure_peer(key, opts):
    title = TITLES[key]
    try:
        peer = FACTORIES[key]()
    except ImportError as e:
        return {"error": "not importable: %s" % e, "notes": []}
    except Exception as e:
        return {"error": "setup: %r" % (e,), "notes": []}
    heavy = key in ("ray", "dask")
    C.log("[%s] measuring" % title)
    res = C.run_suite(peer, opts, startup_reps=1 if heavy else None)
    if key == "mp":
        try:
            sp = MPPeer("spawn")
            t0 = time.perf_counter()
            sp.start(2)
            res["startup_spawn_ms"] = (time.perf_counter() - t0) * 1e3
            sp.stop()
            res["notes"].append("2 workers ready with spawn: %.0f ms"
                                % res["startup_spawn_ms"])
        except Exception as e:
            res["notes"].append("spawn startup failed: %r" % (e,))
    try:
        mod = {"mp": None, "execnet": "execnet", "rpyc": "rpyc", "pyro5": "Pyro5",
               "ray": "ray", "dask": "distributed"}[key]
        if mod:
            res["version"] = sys.modules[mod].__version__
    except Exception:
        pass
    return res


def main(argv=None):
    ap = C.options(description="peers: mp.managers, execnet, RPyC, Pyro5, Ray, Dask")
    ap.add_argument("--peers", default=",".join(ALL),
                    help="comma list among " + ",".join(ALL))
    ap.add_argument("--serve", choices=["rpyc", "pyro5"], help=argparse_suppress())
    opts = C.finish_options(ap.parse_args(argv))
    if opts.serve:
        C.die_with_stdin()
        {"rpyc": serve_rpyc, "pyro5": serve_pyro5}[opts.serve]()
        return
    keys = [k.strip().lower() for k in opts.peers.split(",") if k.strip()]
    results = {}
    for k in keys:
        if k not in FACTORIES:
            results[k] = {"error": "unknown peer", "notes": []}
            continue
        t0 = time.perf_counter()
        try:
            results[TITLES[k]] = measure_peer(k, opts)
        except Exception as e:  # never let one peer stop the run
            results[TITLES[k]] = {"error": repr(e), "notes": []}
        C.log("[%s] finished in %.1fs" % (TITLES[k], time.perf_counter() - t0))
    C.emit(results, opts, "peers")


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
