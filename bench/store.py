"""The job store under many claimers: claims per second and claim latency on a real PostgreSQL
(tests/pg.py starts one as an unprivileged user) against SQLite in the same run, and how long a
worker's store takes to answer again after `pg_ctl restart`.

    python bench/store.py [--jobs 400] [--claimers 1,4,16] [--procs]
    python bench/store.py --fleet 10,50,150 [--seconds 20] [--step-s 1]

Each claimer is a thread with its own Store (its own engine and connection) unless --procs
(processes: no GIL between them). A claim here is claim_job + finish_job (the two writes a job
costs the store besides its events). Not part of the test suite.

--fleet N: N simulated workers (spread over processes, each with its own Store) doing what a
real worker does to the database, without training: an idle one claims every 0.5 s (poll_s) and
beats its presence row every 5 s; one with a job renews its lease every 1 s (the heartbeat, which
reads the cancel flag too), and every --step-s writes a metrics event and the job's progress (as
JobRun does per logged step), then finishes the job with two events. Measured against the
same PostgreSQL, for each N: claim latency (p50 / p99) of the empty polls and of the claims
that got a job, the transactions/s PostgreSQL committed (pg_stat_database) and the CPU its
processes used (from /proc: cores busy), first with every worker idle, then with every worker
busy (a queue that never empties: N concurrent jobs).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tunelab.jobs.store import Job, Store, database_url, new_id  # noqa: E402


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


# -- a simulated fleet ---------------------------------------------------------------------------

def _fleet_worker(root, url, name, go, until, step_s, out):
    """One simulated worker's database traffic (see the module's --fleet)."""
    store = Store(root, url)
    idle_lat, got_lat, jobs = [], [], 0
    go.wait()
    next_beat = 0.0
    while time.time() < until:
        if time.time() >= next_beat:
            store.worker_beat(name, resources={"cpus": 8} if not next_beat else None)
            next_beat = time.time() + 5.0
        t = time.perf_counter()
        job = store.claim_job(name, 30)
        dt = time.perf_counter() - t
        if job is None:
            idle_lat.append(dt)
            time.sleep(0.5)
            continue
        got_lat.append(dt)
        store.worker_beat(name, job_id=job.id)
        step, last_renew, next_step = 0, time.time(), time.time() + step_s
        while time.time() < until and step < 20:
            now_ = time.time()
            if now_ - last_renew >= 1.0:
                store.renew_lease(job.id, name, 30)
                last_renew = now_
            if now_ >= next_step:
                step += 1
                store.add_event(job.id, f"Step {step}/20: training loss=1.2345", type="metrics",
                                data={"step": step, "total_steps": 20, "train_loss": 1.2345,
                                      "train_mean_token_accuracy": 0.5, "learning_rate": 2e-4,
                                      "grad_norm": 0.9, "tokens_seen": 1000 * step,
                                      "trained_tokens_seen": 100 * step, "tokens_per_s": 150.0,
                                      "elapsed_s": 1.0 * step})
                store.update(Job, job.id, progress={"step": step, "total_steps": 20,
                                                    "updated_at": now_})
                next_step += step_s
            time.sleep(min(0.05, max(0.0, min(next_step, last_renew + 1.0) - time.time())))
        if step >= 20:
            store.finish_job(job.id, name, "succeeded")
            store.add_event(job.id, "New fine-tuned model created")
            store.add_event(job.id, "The job has successfully completed")
            jobs += 1
    store.worker_gone(name)
    out.put((idle_lat, got_lat, jobs))


def _fleet_process(root, url, names, go, until, step_s, out):
    threads = [threading.Thread(target=_fleet_worker, args=(root, url, n, go, until, step_s,
                                                             out)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _pg_cpu_seconds(server) -> float:
    """CPU seconds used so far by every process of the PostgreSQL server (postmaster and its
    backends), from /proc."""
    pid = int((server.data / "postmaster.pid").read_text().split()[0])
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(proc.name) == pid or int(fields[1]) == pid:    # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _commits(url) -> int:
    import psycopg
    from sqlalchemy.engine import make_url
    u = make_url(url)
    with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database,
                         autocommit=True) as conn:
        return int(conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s",
                                (u.database,)).fetchone()[0])


def fleet(server, n: int, seconds: float, step_s: float, busy: bool) -> dict:
    root = tempfile.mkdtemp(prefix="tl-fleet-")
    url = database_url(server.new_database(), Path(root))
    store = Store(root, url)
    if busy:
        fill(store, n * 50)           # more than the fleet can finish: every worker stays busy
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    per = max(1, -(-n // 8))          # 8 processes at most
    names = [f"sim{i}" for i in range(n)]
    until = time.time() + 6 + seconds
    procs = [ctx.Process(target=_fleet_process, args=(root, url, names[i:i + per], go, until,
                                                      step_s, out))
             for i in range(0, n, per)]
    for p in procs:
        p.start()
    time.sleep(5)                      # every Store opened (and migrated once)
    cpu0, tx0, t0 = _pg_cpu_seconds(server), _commits(url), time.perf_counter()
    go.set()
    results = [out.get() for _ in range(n)]
    wall = time.perf_counter() - t0
    cpu, tx = _pg_cpu_seconds(server) - cpu0, _commits(url) - tx0
    for p in procs:
        p.join()
    idle = sorted(x for r in results for x in r[0])
    got = sorted(x for r in results for x in r[1])

    def q(xs, f):
        return 1e3 * xs[int(f * (len(xs) - 1))] if xs else float("nan")
    return {"n": n, "busy": busy, "idle_p50": q(idle, 0.5), "idle_p99": q(idle, 0.99),
            "got_p50": q(got, 0.5), "got_p99": q(got, 0.99), "claims": len(got),
            "jobs": sum(r[2] for r in results), "tx_s": tx / wall, "cores": cpu / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--claimers", default="1,4,16")
    ap.add_argument("--procs", action="store_true")
    ap.add_argument("--fleet", default=None, help="simulated worker counts, e.g. 10,50,150")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--step-s", type=float, default=1.0)
    args = ap.parse_args()
    import pg
    server = pg.Postgres().start()
    if args.fleet:
        try:
            print(f"{'workers':>7} {'state':>5} {'poll p50':>9} {'poll p99':>9} {'claim p50':>10} "
                  f"{'claim p99':>10} {'claims':>7} {'tx/s':>7} {'pg cores':>8}   (ms; "
                  f"{args.seconds:.0f} s each, a step every {args.step_s:g} s)")
            for n in map(int, args.fleet.split(",")):
                for busy in (False, True):
                    r = fleet(server, n, args.seconds, args.step_s, busy)
                    print(f"{n:>7} {'busy' if busy else 'idle':>5} {r['idle_p50']:>9.1f} "
                          f"{r['idle_p99']:>9.1f} {r['got_p50']:>10.1f} {r['got_p99']:>10.1f} "
                          f"{r['claims']:>7} {r['tx_s']:>7.0f} {r['cores']:>8.2f}", flush=True)
        finally:
            server.stop()
        return
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
