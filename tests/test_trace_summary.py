"""trace_summary on two real H100 decode steps and on hand-made traces: counts, busy time as the union over streams,
idle share, per-kernel totals with `.N` instances merged, the newest run, and a host-annotation window.

The fixture is steps 5 and 6 of a 10-step `profile_decode --batch 1 --context 1024` trace of Llama-3.1-8B (dummy
weights, bf16) on one H100: the metadata events and the GPU events, whose args were dropped.
"""

import gzip
import json
import os
import pathlib

import pytest

from benchmarks import trace_summary

H100 = pathlib.Path(__file__).parent / "fixtures" / "trace_h100_decode"


def _gpu_events(path: pathlib.Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu = {e["pid"] for e in events if e.get("name") == "process_name" and e["args"]["name"] == "/device:GPU:0"}
    return [e for e in events if e.get("ph") == "X" and e["pid"] in gpu]


def _busy_by_sweep(events: list[dict]) -> float:
    """Busy time counted by a +1/-1 sweep over start and end points, independent of the module's interval merge."""
    points = sorted([(e["ts"], 1) for e in events] + [(e["ts"] + e["dur"], -1) for e in events])
    busy, depth, last = 0.0, 0, None
    for t, step in points:
        if depth > 0:
            busy += t - last
        depth, last = depth + step, t
    return busy


def test_h100_decode_trace():
    events = _gpu_events(H100 / "plugins/profile/run/host.trace.json.gz")
    summary = trace_summary.summarize(H100, steps=2, top=10)
    (gpu,) = summary["devices"]
    kernels = [e for e in events if not e["name"].startswith("Memcpy")]
    assert gpu["name"] == "/device:GPU:0" and gpu["pid"] == 1
    assert gpu["kernels"] == len(kernels) == 2 * 779
    assert gpu["copies"] == len(events) - len(kernels) == 2 * 3
    assert gpu["per_step"]["kernels"] == 779

    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    busy = _busy_by_sweep(events)
    assert gpu["span_us"] == pytest.approx(span)
    assert gpu["busy_us"] == pytest.approx(busy)
    assert gpu["idle"] == pytest.approx(1 - busy / span)
    assert 0.40 < gpu["idle"] < 0.55  # the python tracer's host time between steps leaves the GPU idle half the time
    # Graph-launched kernels on the one compute stream overlap their neighbours by ~0.3 us: the sum of durations
    # exceeds the busy time, which must count each instant once.
    assert gpu["kernel_us"] == pytest.approx(sum(e["dur"] for e in kernels))
    assert gpu["busy_us"] < gpu["kernel_us"]
    assert 6.8e3 < gpu["per_step"]["busy_us"] < 7.0e3

    totals = {}
    for e in kernels:
        totals[e["name"]] = totals.get(e["name"], 0.0) + e["dur"]
    heaviest = max(totals, key=totals.get)
    assert heaviest == "gemm_fusion_dot_228"
    top = gpu["top"][0]
    assert top["name"] == heaviest and top["count"] == sum(e["name"] == heaviest for e in kernels) == 2 * 64
    assert top["total_us"] == pytest.approx(totals[heaviest])
    assert top["mean_us"] == pytest.approx(totals[heaviest] / top["count"])
    assert len(gpu["top"]) == 10
    assert [k["total_us"] for k in gpu["top"]] == sorted((k["total_us"] for k in gpu["top"]), reverse=True)

    streams = {s["name"]: s["events"] for s in gpu["streams"]}
    assert streams == {"Stream #14(Compute)": 2 * 779, "Stream #15(MemcpyH2D)": 4, "Stream #16(MemcpyD2H)": 2}


def _meta(pid, name, threads):
    events = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}]
    events += [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": n}} for tid, n in threads]
    return events


def _x(pid, tid, name, ts, dur):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


def _write(trace_dir: pathlib.Path, run: str, events: list[dict]) -> None:
    run_dir = trace_dir / "plugins" / "profile" / run
    run_dir.mkdir(parents=True)
    with gzip.open(run_dir / "host.trace.json.gz", "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)


def _two_streams() -> list[dict]:
    """GPU:1 (pid 3) has compute streams 7 and 8 overlapping, and a copy; GPU:0 (pid 2) one kernel; host pid 9."""
    gpu1 = _meta(3, "/device:GPU:1", [(7, "Stream #7(Compute)"), (8, "Stream #8(Compute)"),
                                      (5, "Stream #5(MemcpyH2D)")])
    return (_meta(9, "/host:CPU", [(1, "python3")]) + gpu1 + _meta(2, "/device:GPU:0", [(7, "Stream #7(Compute)")])
            + [_x(3, 7, "fusion.1", 0, 10), _x(3, 7, "gemm", 20, 10), _x(3, 8, "fusion.2", 5, 10),
               _x(3, 8, "fusion", 40, 5), _x(3, 5, "MemcpyH2D", 50, 2), _x(2, 7, "gemm", 100, 4),
               _x(9, 1, "ttft", 8, 17), _x(9, 1, "step", 0, 60), {}])


def test_overlapping_streams_count_once(tmp_path):
    _write(tmp_path, "2026_01_01_00_00_00", _two_streams())
    summary = trace_summary.summarize(tmp_path, steps=2)
    gpu0, gpu1 = summary["devices"]
    assert (gpu0["name"], gpu0["kernels"], gpu0["busy_us"], gpu0["span_us"], gpu0["idle"]) == (
        "/device:GPU:0", 1, 4, 4, 0)
    # Streams 7 and 8: [0, 10) and [5, 15) merge to [0, 15); then [20, 30), [40, 45) and the copy [50, 52).
    assert gpu1["name"] == "/device:GPU:1"
    assert (gpu1["kernels"], gpu1["copies"]) == (4, 1)
    assert gpu1["busy_us"] == 15 + 10 + 5 + 2
    assert gpu1["span_us"] == 52
    assert gpu1["idle"] == pytest.approx(20 / 52)
    assert (gpu1["kernel_us"], gpu1["copy_us"]) == (35, 2)
    assert gpu1["per_step"] == {"kernels": 2, "copies": 0.5, "span_us": 26, "busy_us": 16, "kernel_us": 17.5,
                                "copy_us": 1}
    # fusion.1, fusion.2 and fusion are one kernel; the copy is not a kernel.
    assert [(k["name"], k["count"], k["total_us"], k["mean_us"]) for k in gpu1["top"]] == [
        ("fusion", 3, 25, 25 / 3), ("gemm", 1, 10, 10)]
    assert gpu1["top"][0]["us_per_step"] == 12.5
    assert {s["name"]: (s["events"], s["busy_us"]) for s in gpu1["streams"]} == {
        "Stream #5(MemcpyH2D)": (1, 2), "Stream #7(Compute)": (2, 20), "Stream #8(Compute)": (2, 15)}


def test_annotation_window_clips_and_counts_leading_idle(tmp_path):
    _write(tmp_path, "run", _two_streams())
    summary = trace_summary.summarize(tmp_path, annotation="ttft")
    assert summary["window"] == {"annotation": "ttft", "start_us": 8, "end_us": 25}
    gpu0, gpu1 = summary["devices"]
    # [8, 25) keeps [8, 10) of fusion.1, [8, 15) of fusion.2 and [20, 25) of gemm.
    assert (gpu1["kernels"], gpu1["copies"], gpu1["span_us"], gpu1["kernel_us"]) == (3, 0, 17, 2 + 7 + 5)
    assert gpu1["busy_us"] == 7 + 5
    assert gpu1["idle"] == pytest.approx(5 / 17)
    assert (gpu0["kernels"], gpu0["busy_us"], gpu0["idle"]) == (0, 0, 1)
    with pytest.raises(ValueError, match="no host event named 'prefill'"):
        trace_summary.summarize(tmp_path, annotation="prefill")


def test_newest_run_and_errors(tmp_path):
    _write(tmp_path, "b_old", _two_streams())
    _write(tmp_path, "a_new", _meta(1, "/device:GPU:0", [(7, "Stream #7(Compute)")]) + [_x(1, 7, "k", 0, 3)])
    os.utime(tmp_path / "plugins/profile/b_old", (1, 1))
    summary = trace_summary.summarize(tmp_path)
    assert summary["trace"].endswith("a_new/host.trace.json.gz")
    assert [(d["name"], d["kernels"], d["busy_us"]) for d in summary["devices"]] == [("/device:GPU:0", 1, 3)]
    assert "per_step" not in summary["devices"][0]
    with pytest.raises(FileNotFoundError, match="plugins/profile"):
        trace_summary.summarize(tmp_path / "missing")
    with pytest.raises(ValueError, match="steps must be a positive"):
        trace_summary.summarize(tmp_path, steps=0)


def test_union_us():
    assert trace_summary.union_us([]) == 0
    assert trace_summary.union_us([(5, 7), (0, 10), (10, 12), (11, 11.5), (20, 21)]) == 13


def test_cli_prints_per_step_table(tmp_path, capsys):
    out = tmp_path / "summary.json"
    trace_summary.main([str(H100), "--steps", "2", "--top", "3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "/device:GPU:0 (per step of 2): 779.0 kernels, 3.0 copies" in printed
    assert "gemm_fusion_dot_228" in printed
    saved = json.loads(out.read_text())
    assert saved["devices"][0]["kernels"] == 2 * 779 and len(saved["devices"][0]["top"]) == 3
