"""Paced metric reports (ropo_ray.train.reports) and the metric log that unpacks them."""

from __future__ import annotations

import json
from types import SimpleNamespace

from ropo_ray.train.ray_trainer import MetricsLog, read_metrics
from ropo_ray.train.reports import EARLIER, INTERVAL_ENV, Reports, poll_interval, unpack


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def recorder() -> tuple[list, object]:
    sent: list[tuple[dict, object]] = []
    return sent, lambda metrics, checkpoint=None: sent.append((metrics, checkpoint))


def test_step_records_wait_for_the_interval_and_ride_on_the_next_report():
    sent, send = recorder()
    clock = Clock()
    reports = Reports(send, interval=2.0, clock=clock)
    assert reports.due()  # nothing sent yet: the queue is empty
    reports.log({"step": 1}, due=True)
    assert [m["step"] for m, _ in sent] == [1] and EARLIER not in sent[0][0]
    clock.now += 1.9
    assert not reports.due()
    reports.log({"step": 2}, due=False)
    clock.now += 0.05
    reports.log({"step": 3}, due=False)
    assert len(sent) == 1  # kept, not sent
    clock.now += 0.05  # 2.0 s after the first report
    assert reports.due()
    reports.log({"step": 4}, due=True)
    metrics, checkpoint = sent[-1]
    assert [r["step"] for r in unpack(metrics)] == [2, 3, 4] and checkpoint is None
    assert reports.pending == [] and not reports.due()
    # an evaluation or a checkpoint goes at once, with whatever is pending
    clock.now += 0.5
    reports.log({"step": 5}, due=False)
    reports.send({"step": 6, "eval/loss": 0.5}, checkpoint="ckpt")
    metrics, checkpoint = sent[-1]
    assert [r["step"] for r in unpack(metrics)] == [5, 6] and checkpoint == "ckpt"
    assert unpack(metrics)[-1]["eval/loss"] == 0.5 and EARLIER not in unpack(metrics)[-1]
    assert len(sent) == 3


def test_the_ranks_verdict_overrides_this_ranks_clock():
    """Every rank must report equally often: a rank whose own interval has passed still keeps the record
    when the common verdict says not due, and sends when it says due."""
    sent, send = recorder()
    clock = Clock()
    reports = Reports(send, interval=2.0, clock=clock)
    reports.send({"step": 0})
    clock.now += 5.0
    assert reports.due()
    reports.log({"step": 1}, due=False)
    assert len(sent) == 1
    clock.now += 0.1
    reports.send({"step": 2})
    reports.log({"step": 3}, due=True)  # another rank's interval had passed
    assert [[r["step"] for r in unpack(m)] for m, _ in sent] == [[0], [1, 2], [3]]


def test_records_are_stamped_when_made():
    sent, send = recorder()
    clock = Clock()
    reports = Reports(send, interval=2.0, clock=clock)
    reports.send({"step": 0})
    reports.log({"step": 1}, due=False)
    reports.send({"step": 2, "time": 7.0})  # a record's own time is kept
    earlier, last = unpack(sent[-1][0])
    assert earlier["time"] >= sent[0][0]["time"] > 1e9 and last["time"] == 7.0


def test_poll_interval_follows_ray_trains_setting(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert poll_interval() == 2.0  # Ray Train V2's DEFAULT_HEALTH_CHECK_INTERVAL_S
    monkeypatch.setenv(INTERVAL_ENV, "0.5")
    assert poll_interval() == 0.5 and Reports(lambda *a, **k: None).interval == 0.5


def test_metrics_log_writes_each_carried_record_on_its_own_line(tmp_path):
    log = MetricsLog(str(tmp_path / "m.jsonl"))
    log.after_report(None, [{"step": 0, "eval/loss": 0.69, "time": 1.0}], None)
    log.after_report(None, [{"step": 3, "loss": 0.6, "time": 4.0, EARLIER: [{"step": 1, "loss": 0.68, "time": 2.0},
                                                                            {"step": 2, "loss": 0.65, "time": 3.0}]},
                            {"step": 3, "loss": 0.7, "time": 4.0}],  # rank 1's record is not logged
                     SimpleNamespace(path="/ckpt/3"))
    records = read_metrics(tmp_path / "m.jsonl")
    assert [(r["step"], r["time"], r["report"], r["checkpoint"]) for r in records] == [
        (0, 1.0, 1, None), (1, 2.0, 2, None), (2, 3.0, 2, None), (3, 4.0, 2, "/ckpt/3")]
    assert [r.get("loss") for r in records] == [None, 0.68, 0.65, 0.6]
    assert all(EARLIER not in r for r in records)
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 4
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[1])["step"] == 1
