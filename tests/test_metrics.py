"""Metrics: the node_exporter textfile parsed back, the JSON snapshot, restarts."""

from __future__ import annotations

import json
import os
import re
import threading

from watcher.metrics import STAGES, Metrics

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> tuple[dict, dict]:
    """(samples {(name, frozenset(labels)): value}, types {family: type}) — the exposition format."""
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, fam, kind = line.split()
            types[fam] = kind
            continue
        if line.startswith("#") or not line:
            continue
        m = LINE.match(line)
        assert m, f"not exposition format: {line!r}"
        name, labels, value = m.groups()
        key = (name, frozenset(LABEL.findall(labels or "")))
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(value)
    return samples, types


def val(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def filled() -> Metrics:
    m = Metrics()
    for ms in (5, 10, 40, 900, 1000, 1001, 700_000):
        m.observe("total", ms)
    m.observe("decode", 12.5)
    m.outcome("done")
    m.outcome("done")
    m.outcome("failed")
    m.outcome("retried")
    m.faces(2)
    m.faces(3)
    m.success(1_790_000_000.5)
    return m


def test_textfile_parses_back_with_the_same_numbers(tmp_path):
    m = filled()
    path = tmp_path / "photoenhanced.prom"
    m.write_textfile(path, {"pending": 3, "running": 1, "done": 7, "failed": 1}, backoffs=2,
                     hooks={"sent": 5, "failed": 1, "dropped": 0})
    samples, types = parse(path.read_text())
    assert types["photoenhanced_stage_duration_seconds"] == "histogram"
    assert types["photoenhanced_outcomes_total"] == "counter"
    assert types["photoenhanced_jobs"] == "gauge"
    assert all(fam.startswith("photoenhanced_") for fam in types)
    assert val(samples, "photoenhanced_jobs", state="pending") == 3
    assert val(samples, "photoenhanced_jobs", state="running") == 1
    assert val(samples, "photoenhanced_jobs_backoff") == 2
    assert val(samples, "photoenhanced_outcomes_total", outcome="done") == 2
    assert val(samples, "photoenhanced_outcomes_total", outcome="duplicate") == 0
    assert val(samples, "photoenhanced_faces_total") == 5
    assert val(samples, "photoenhanced_last_success_timestamp_seconds") == 1_790_000_000.5
    assert val(samples, "photoenhanced_hooks_total", result="sent") == 5
    h = "photoenhanced_stage_duration_seconds"
    assert val(samples, h + "_count", stage="total") == 7
    assert abs(val(samples, h + "_sum", stage="total") - 702.956) < 1e-9
    assert val(samples, h + "_bucket", stage="total", le="0.01") == 2  # 5 ms and exactly 10 ms
    assert val(samples, h + "_bucket", stage="total", le="0.05") == 3
    assert val(samples, h + "_bucket", stage="total", le="1") == 5
    assert val(samples, h + "_bucket", stage="total", le="2.5") == 6
    assert val(samples, h + "_bucket", stage="total", le="600") == 6
    assert val(samples, h + "_bucket", stage="total", le="+Inf") == 7
    assert val(samples, h + "_count", stage="decode") == 1
    for stage in STAGES:  # every stage is exported, even before its first observation
        assert (h + "_count", frozenset({("stage", stage)})) in samples
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in samples.items()
                     if k[0] == h + "_bucket" and dict(k[1])["stage"] == "total")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert [p.name for p in tmp_path.iterdir()] == ["photoenhanced.prom"]  # no temp file left


def test_snapshot_is_json_and_restores_across_restarts(tmp_path):
    m = filled()
    snap = json.loads(json.dumps(m.snapshot()))
    assert snap["outcomes"] == {"done": 2, "failed": 1, "duplicate": 0, "retried": 1}
    assert snap["faces"] == 5 and snap["stages"]["total"]["count"] == 7
    again = Metrics(snapshot=snap)  # the daemon restarted: counters go on
    again.outcome("done")
    again.observe("total", 20)
    s2 = again.snapshot()
    assert s2["outcomes"]["done"] == 3 and s2["stages"]["total"]["count"] == 8
    assert s2["last_success"] == 1_790_000_000.5
    broken = Metrics(snapshot={"outcomes": {"done": "many"}})
    assert broken.snapshot()["outcomes"]["failed"] == 0


def test_textfile_is_replaced_atomically_while_read(tmp_path):
    path = tmp_path / "photoenhanced.prom"
    m = Metrics()
    m.write_textfile(path, {}, 0, {})
    stop = threading.Event()
    bad: list[str] = []

    def reader():
        while not stop.is_set():
            text = path.read_text()
            if not text.endswith("\n") or "photoenhanced_stage_duration_seconds_count{stage=\"total\"}" not in text:
                bad.append(text)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            m.observe("total", i)
            m.write_textfile(path, {"pending": i}, 0, {})
    finally:
        stop.set()
        t.join()
    assert bad == []
    samples, _ = parse(path.read_text())
    assert val(samples, "photoenhanced_jobs", state="pending") == 199
    assert sorted(os.listdir(tmp_path)) == ["photoenhanced.prom"]
