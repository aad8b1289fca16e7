"""What the GPU did in a jax.profiler trace: kernels, busy time, idle share and the kernels that take the time.

    python -m benchmarks.trace_summary /tmp/trace --steps 10 [--top 20] [--annotation ttft] [--json out.json]

Reads the newest run's `plugins/profile/<run>/<host>.trace.json.gz` (Chrome trace format; `ts` and `dur` in us).
Each `/device:GPU:N` process has one thread per CUDA stream (`Stream #14(Compute)`, `Stream #15(MemcpyH2D)`, ...).
Busy time is the union of every event on every stream of the device, so work on overlapping streams counts once;
idle = 1 - busy / span, the span running from the device's first event to its last. With an annotation (a host
`jax.profiler.TraceAnnotation` name) the window is instead the host time from its first start to its last end,
events are clipped to it, and time before the first kernel counts as idle.
"""

import argparse
import collections
import gzip
import json
import pathlib
import re

DEVICE = re.compile(r"^/device:GPU:(\d+)$")
# CUPTI names copy and memset activity this way; kernels keep their own names (XLA's `memcpy32_post` is a kernel).
COPY = re.compile(r"^Mem(cpy|set)")
INSTANCE = re.compile(r"\.\d+$")


def trace(trace_dir: str):
    """jax.profiler.trace for the traces we summarize: no Python tracer. Its ~1,100 events per engine step cost
    milliseconds of host time, which would show up as GPU idle time that an untraced run does not have."""
    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    return jax.profiler.trace(trace_dir, profiler_options=options)


def find_trace(trace_dir: str | pathlib.Path) -> pathlib.Path:
    """The trace of the newest run under `trace_dir` (or `trace_dir` itself when it is a trace file)."""
    path = pathlib.Path(trace_dir)
    if path.is_file():
        return path
    runs = [p for p in (path / "plugins" / "profile").glob("*") if p.is_dir() and any(p.glob("*.trace.json.gz"))]
    if not runs:
        raise FileNotFoundError(f"no plugins/profile/<run>/*.trace.json.gz under {path}")
    newest = max(runs, key=lambda p: (p.stat().st_mtime, p.name))
    traces = sorted(newest.glob("*.trace.json.gz"))
    if len(traces) > 1:
        raise ValueError(f"{newest} holds {len(traces)} host traces; pass one of them: {[t.name for t in traces]}")
    return traces[0]


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _clip(events: list[dict], window: tuple[float, float] | None) -> list[tuple[int, str, float, float]]:
    """(tid, name, start, end) of each event, cut to the window; events wholly outside it are dropped."""
    spans = []
    for e in events:
        start, end = e["ts"], e["ts"] + e["dur"]
        if window is not None:
            start, end = max(start, window[0]), min(end, window[1])
            if end <= start and not window[0] <= e["ts"] < window[1]:
                continue
        spans.append((e["tid"], e["name"], start, end))
    return spans


def _device(name: str, pid: int, threads: dict[int, str], events: list[dict], *, window, steps, top) -> dict:
    spans = _clip(events, window)
    kernels = [s for s in spans if not COPY.match(s[1])]
    copies = [s for s in spans if COPY.match(s[1])]
    if window is not None:
        first, last = window
    else:
        first, last = min((s[2] for s in spans), default=0.0), max((s[3] for s in spans), default=0.0)
    span, busy = last - first, union_us([(s[2], s[3]) for s in spans])
    by_stream = collections.defaultdict(list)
    for s in spans:
        by_stream[s[0]].append((s[2], s[3]))
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for _, kernel, start, end in kernels:
        entry = by_name[INSTANCE.sub("", kernel)]
        entry[0] += 1
        entry[1] += end - start
    ranked = sorted(by_name.items(), key=lambda item: -item[1][1])[:top]
    result = {
        "name": name, "pid": pid, "kernels": len(kernels), "copies": len(copies),
        "start_us": first, "end_us": last, "span_us": span, "busy_us": busy,
        "kernel_us": sum(s[3] - s[2] for s in kernels), "copy_us": sum(s[3] - s[2] for s in copies),
        "idle": 1 - busy / span if span > 0 else None,
        "streams": [{"tid": tid, "name": threads.get(tid, f"tid {tid}"), "events": len(v), "busy_us": union_us(v)}
                    for tid, v in sorted(by_stream.items())],
        "top": [{"name": k, "count": n, "total_us": t, "mean_us": t / n} for k, (n, t) in ranked],
    }
    if steps:
        result["per_step"] = {key: result[key] / steps
                              for key in ("kernels", "copies", "span_us", "busy_us", "kernel_us", "copy_us")}
        for entry in result["top"]:
            entry["count_per_step"], entry["us_per_step"] = entry["count"] / steps, entry["total_us"] / steps
    return result


def summarize(trace_dir: str | pathlib.Path, steps: int | None = None, top: int = 20, *,
              annotation: str | None = None) -> dict:
    """Per-GPU summary of the newest trace under `trace_dir`; `steps` adds per-step figures (totals / steps)."""
    if steps is not None and steps <= 0:
        raise ValueError(f"steps must be a positive number of traced steps, got {steps}")
    path = find_trace(trace_dir)
    with gzip.open(path, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") in ("M", "X")]
    processes = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    threads = collections.defaultdict(dict)
    for e in events:
        if e["ph"] == "M" and e["name"] == "thread_name":
            threads[e["pid"]][e["tid"]] = e["args"]["name"]
    devices = {pid: name for pid, name in processes.items() if DEVICE.match(name)}
    window = None
    if annotation is not None:
        marks = [e for e in events if e["ph"] == "X" and e["pid"] not in devices and e["name"] == annotation]
        if not marks:
            raise ValueError(f"no host event named {annotation!r} in {path}")
        window = (min(e["ts"] for e in marks), max(e["ts"] + e["dur"] for e in marks))
    on_device = collections.defaultdict(list)
    for e in events:
        if e["ph"] == "X" and e["pid"] in devices:
            on_device[e["pid"]].append(e)
    order = sorted(devices, key=lambda pid: int(DEVICE.match(devices[pid]).group(1)))
    return {
        "trace": str(path), "steps": steps,
        "window": None if window is None else {"annotation": annotation, "start_us": window[0], "end_us": window[1]},
        "devices": [_device(devices[pid], pid, threads[pid], on_device[pid], window=window, steps=steps, top=top)
                    for pid in order],
    }


def format_summary(summary: dict) -> str:
    """A short table per GPU, per step when the summary has steps."""
    steps = summary["steps"] or 1
    unit = f"per step of {summary['steps']}" if summary["steps"] else "total"
    window = summary["window"]
    lines = [f"trace {summary['trace']}" + (f", window of host annotation {window['annotation']!r}" if window else "")]
    if not summary["devices"]:
        lines.append("no /device:GPU:N process in this trace")
    for d in summary["devices"]:
        idle = "n/a" if d["idle"] is None else f"{d['idle']:.1%}"
        lines.append(f"{d['name']} ({unit}): {d['kernels'] / steps:.1f} kernels, {d['copies'] / steps:.1f} copies; "
                     f"busy {d['busy_us'] / steps / 1e3:.3f} ms of {d['span_us'] / steps / 1e3:.3f} ms wall, "
                     f"idle {idle}; kernel time summed {d['kernel_us'] / steps / 1e3:.3f} ms, "
                     f"copies {d['copy_us'] / steps / 1e3:.3f} ms")
        for s in d["streams"]:
            lines.append(f"  {s['name']:<28} {s['events'] / steps:8.1f} events  "
                         f"busy {s['busy_us'] / steps / 1e3:8.3f} ms")
        lines.append(f"  {'kernel':<44} {'count':>8} {'ms':>9} {'mean us':>9} {'share':>6}")
        for k in d["top"]:
            share = k["total_us"] / d["kernel_us"] if d["kernel_us"] else 0.0
            lines.append(f"  {k['name'][:44]:<44} {k['count'] / steps:8.1f} {k['total_us'] / steps / 1e3:9.3f} "
                         f"{k['mean_us']:9.2f} {share:6.1%}")
    return "\n".join(lines)


def one_line(device: dict) -> str:
    """kernels, busy, span, idle and the top kernels of one device's summary (totals) on one line."""
    idle = "n/a" if device["idle"] is None else f"{device['idle']:.1%}"
    kernels = ", ".join(f"{k['name']} {k['total_us'] / 1e3:.2f} ms x{k['count']}" for k in device["top"])
    return (f"{device['name']}: {device['kernels']} kernels, busy {device['busy_us'] / 1e3:.2f} ms of "
            f"{device['span_us'] / 1e3:.2f} ms span, idle {idle}; top: {kernels}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace_dir", help="the directory given to jax.profiler.trace, or a .trace.json.gz file")
    parser.add_argument("--steps", type=int, default=None, help="steps traced: report per step")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--annotation", default=None, help="restrict to this host TraceAnnotation's time window")
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    summary = summarize(args.trace_dir, steps=args.steps, top=args.top, annotation=args.annotation)
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
