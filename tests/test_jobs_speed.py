"""Training-time estimates from the jobs a server finished (tunelab.jobs.speed): a job run on a
busy machine no longer sets every estimate; a job counts by the tokens it trained; two jobs
that disagree give a range, not a guess."""
from __future__ import annotations

import pytest

from tunelab.jobs.speed import estimate, training_speeds
from tunelab.jobs.store import Job, Store, new_id


def test_a_job_on_a_busy_machine_is_left_out():
    # measured here: 190 tok/s quiet, 8 tok/s while the machine ran other work
    e = estimate([190.0, 185.0, 8.0], [40_000, 38_000, 39_000])
    assert e["left_out"] == 1 and e["used"] == 2 and e["jobs"] == 3
    assert 185 <= e["tokens_per_second"] <= 190 and (e["low"], e["high"]) == (185.0, 190.0)
    # the median of the three was the busy job's neighbour; the mean (127.7) 1.5x off
    assert e["tokens_per_second"] > 1.4 * sum([190.0, 185.0, 8.0]) / 3


def test_jobs_count_by_the_tokens_they_trained():
    # a long run and a 6-step one: the long run's speed is the better measure
    e = estimate([150.0, 250.0], [100_000, 1_000])
    assert 150 <= e["tokens_per_second"] < 152 and e["left_out"] == 0
    same = estimate([150.0, 250.0], [1_000, 1_000])
    assert same["tokens_per_second"] == pytest.approx((150 * 250) ** 0.5, abs=0.1)


def test_two_jobs_that_disagree_keep_both_and_say_how_far_apart():
    e = estimate([190.0, 8.0], [10_000, 10_000])
    assert e["left_out"] == 0 and (e["low"], e["high"]) == (8.0, 190.0)
    assert 8 < e["tokens_per_second"] < 190


def test_training_speeds_reads_succeeded_jobs_by_root_base(tmp_path):
    store = Store(tmp_path)

    def job(status, tps, tokens, model="tiny", base=None):
        store.add(Job(id=new_id("ftjob-"), kind="fine_tune", owner="o", status=status,
                      model=model, base_spec="x", trained_tokens=tokens,
                      request={"base_model": base} if base else {},
                      progress={"tokens_per_s": tps} if tps else None))
    job("succeeded", 190.0, 40_000)
    job("succeeded", 8.0, 40_000)
    job("succeeded", 185.0, 40_000, model="ft:tiny:k::ftjob-1", base="tiny")   # counts as tiny
    job("failed", 1.0, 10)             # not finished well: not counted
    job("running", 1.0, 10)
    job("succeeded", None, 10)         # no speed recorded
    job("succeeded", 300.0, 5_000, model="other")
    speeds = training_speeds(store)
    assert set(speeds) == {"tiny", "other"}
    assert speeds["tiny"]["jobs"] == 3 and speeds["tiny"]["left_out"] == 1
    assert 185 <= speeds["tiny"]["tokens_per_second"] <= 190
    assert speeds["other"] == {"tokens_per_second": 300.0, "low": 300.0, "high": 300.0,
                               "jobs": 1, "used": 1, "left_out": 0}
    store.close()
