"""Prometheus metrics under vLLM's `vllm:*` names, so existing dashboards and autoscalers work unchanged.

Gauges and counters are read from `engine.stats()` at scrape time, so they are exact (the engine owns the counts;
nothing here can drift from it). Latency histograms are observed when a request finishes, from the timestamps the
engine stamps on its RequestOutput. Each app has its own registry, so several servers can live in one process.
"""

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LABELS = ["model_name", "engine"]
_FINISH_REASONS = ("stop", "length", "abort")

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards built for it bin the same way.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0]
_REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0, 1920.0, 7680.0]


class _EngineCollector:
    """Turns one `engine.stats()` snapshot into the gauges and counters; zeros while the engine is loading."""

    def __init__(self, host, labels: dict[str, str]):
        self._host = host
        self._label_values = [labels[name] for name in _LABELS]

    def collect(self):
        engine = self._host.engine
        stats = engine.stats() if engine is not None else None
        value = (lambda name: getattr(stats, name)) if stats is not None else (lambda name: 0)
        labels = self._label_values

        for name, attr, doc in (
            ("vllm:num_requests_running", "num_requests_running", "Requests in the running batch."),
            ("vllm:num_requests_waiting", "num_requests_waiting", "Requests waiting to be scheduled."),
            ("vllm:kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV-cache blocks in use (1 = 100%)."),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=_LABELS)
            gauge.add_metric(labels, float(value(attr)))
            yield gauge

        for name, attr, doc in (
            ("vllm:prompt_tokens", "prompt_tokens_total", "Prefill tokens processed."),
            ("vllm:generation_tokens", "generation_tokens_total", "Generation tokens produced."),
            ("vllm:num_preemptions", "num_preemptions_total", "Sequences preempted for lack of KV blocks."),
            ("vllm:prefix_cache_queries", "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache."),
            ("vllm:prefix_cache_hits", "prefix_cache_hits_total", "Prompt tokens found in the prefix cache."),
        ):
            counter = CounterMetricFamily(name, doc, labels=_LABELS)
            counter.add_metric(labels, float(value(attr)))
            yield counter

        successes = dict(stats.request_success_total) if stats is not None else {}
        counter = CounterMetricFamily("vllm:request_success", "Finished requests by finish reason.",
                                      labels=_LABELS + ["finished_reason"])
        for reason in sorted(set(_FINISH_REASONS) | set(successes)):
            counter.add_metric(labels + [str(reason)], float(successes.get(reason, 0)))
        yield counter


class ServerMetrics:
    def __init__(self, host, model_name: str):
        self.registry = CollectorRegistry(auto_describe=False)
        labels = {"model_name": model_name, "engine": "0"}
        self.registry.register(_EngineCollector(host, labels))

        def histogram(name: str, doc: str, buckets: list[float]):
            return Histogram(name, doc, _LABELS, buckets=buckets, registry=self.registry).labels(**labels)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between generated tokens.", _ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", _REQUEST_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds", "Arrival to first scheduling.", _REQUEST_BUCKETS)

    def observe_finished(self, output) -> None:
        """Records the latencies of one finished engine request."""
        m = getattr(output, "metrics", None)
        if m is None or m.arrival_time is None:
            return
        if m.first_scheduled_time is not None:
            self.queue.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        if m.first_token_time is not None:
            self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
        end = m.finished_time if m.finished_time is not None else m.last_token_time
        if end is not None:
            self.e2e.observe(max(0.0, end - m.arrival_time))
        if m.first_token_time is not None and m.last_token_time is not None:
            for completion in output.outputs:
                gaps = len(completion.token_ids) - 1
                if gaps > 0:
                    mean_gap = max(0.0, m.last_token_time - m.first_token_time) / gaps
                    for _ in range(gaps):
                        self.itl.observe(mean_gap)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
