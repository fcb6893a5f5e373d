"""The job store under many claimers: claims per second and claim latency on a real PostgreSQL
(tests/pg.py starts one as an unprivileged user) against SQLite in the same run, and how long a
worker's store takes to answer again after `pg_ctl restart`.

    python bench/store.py [--jobs 400] [--claimers 1,4,16] [--procs]

Each claimer is a thread with its own Store (its own engine and connection) unless --procs
(processes: no GIL between them). A claim here is claim_job + finish_job (the two writes a job
costs the store besides its events). Not part of the test suite.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tunelab.jobs.store import Job, Store, new_id  # noqa: E402


def fill(store: Store, n: int) -> None:
    with store.session() as s:
        s.add_all([Job(id=new_id("ftjob-"), kind="fine_tune", owner="o", status="queued",
                       model="m", base_spec="m") for _ in range(n)])


def claimer(root, url, i, go, out):
    store = Store(root, url)
    lat, n = [], 0
    go.wait()
    while True:
        t = time.perf_counter()
        job = store.claim_job(f"w{i}", 30)
        lat.append(time.perf_counter() - t)
        if job is None:
            break
        store.finish_job(job.id, f"w{i}", "succeeded")
        n += 1
    out.put((n, lat))


def run(root, url, jobs, k, procs) -> tuple[float, list[float], int]:
    store = Store(root, url)
    fill(store, jobs)
    ctx = multiprocessing.get_context("spawn") if procs else None
    if procs:
        go, out = ctx.Event(), ctx.Queue()
        workers = [ctx.Process(target=claimer, args=(root, url, i, go, out)) for i in range(k)]
    else:
        import queue
        go, out = threading.Event(), queue.Queue()
        workers = [threading.Thread(target=claimer, args=(root, url, i, go, out))
                   for i in range(k)]
    for w in workers:
        w.start()
    time.sleep(4 if procs else 1)
    t = time.perf_counter()
    go.set()
    results = [out.get() for _ in workers]
    took = time.perf_counter() - t
    for w in workers:
        w.join()
    done = sum(n for n, _ in results)
    assert done == jobs and store.count(Job, Job.status == "succeeded") == jobs, done
    return took, [x for _, lat in results for x in lat], done


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--claimers", default="1,4,16")
    ap.add_argument("--procs", action="store_true")
    args = ap.parse_args()
    import pg
    server = pg.Postgres().start()
    try:
        print(f"{'store':10} {'claimers':>8} {'jobs/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
        for k in map(int, args.claimers.split(",")):
            for name in ("sqlite", "postgresql"):
                root = tempfile.mkdtemp(prefix="tl-bench-")
                url = server.new_database() if name == "postgresql" else None
                took, lat, n = run(root, url, args.jobs, k, args.procs)
                lat.sort()
                print(f"{name:10} {k:>8} {n / took:>8.0f} {1e3 * statistics.median(lat):>8.1f} "
                      f"{1e3 * lat[int(0.99 * (len(lat) - 1))]:>8.1f}", flush=True)
        # reconnect: a store that has connections in its pool, the server restarted under it
        store = Store(tempfile.mkdtemp(prefix="tl-bench-"), server.new_database())
        fill(store, 5)
        store.claim_job("w", 30)
        took = server.restart()
        t = time.perf_counter()
        store.claim_job("w", 30)     # the pooled connection is dead: pinged, replaced
        print(f"pg_ctl restart took {took:.2f}s; the next claim answered "
              f"{1e3 * (time.perf_counter() - t):.0f} ms after it")
        # a store used while the server is down: how long after it is back it answers
        server._run("pg_ctl", "-D", str(server.data), "-m", "fast", "-w", "stop")
        done = {}
        th = threading.Thread(target=lambda: done.setdefault("t", (store.claim_job("w", 30),
                                                                   time.perf_counter())))
        th.start()
        time.sleep(3)
        server.start()
        up = time.perf_counter()
        th.join(60)
        print(f"down 3 s: a claim made during the outage answered "
              f"{1e3 * (done['t'][1] - up):.0f} ms after the server was up again")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
