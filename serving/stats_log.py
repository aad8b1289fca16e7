"""The periodic engine stats log line (vLLM's "Avg prompt throughput ..." line), from two `engine.stats()` snapshots."""

import asyncio
import logging
import time

logger = logging.getLogger("jaxllm.serving")


def format_stats_line(prev, cur, elapsed_s: float) -> str:
    elapsed_s = max(elapsed_s, 1e-9)
    prompt_tps = (cur.prompt_tokens_total - prev.prompt_tokens_total) / elapsed_s
    gen_tps = (cur.generation_tokens_total - prev.generation_tokens_total) / elapsed_s
    queries = cur.prefix_cache_queries_total - prev.prefix_cache_queries_total
    hits = cur.prefix_cache_hits_total - prev.prefix_cache_hits_total
    hit_rate = 100.0 * hits / queries if queries > 0 else 0.0
    return (f"Avg prompt throughput: {prompt_tps:.1f} tokens/s, Avg generation throughput: {gen_tps:.1f} tokens/s, "
            f"Running: {cur.num_requests_running} reqs, Waiting: {cur.num_requests_waiting} reqs, "
            f"KV cache usage: {100.0 * cur.kv_cache_usage:.1f}%, Prefix cache hit rate: {hit_rate:.1f}%")


def _idle(prev, cur) -> bool:
    return (cur.num_requests_running == 0 and cur.num_requests_waiting == 0
            and cur.prompt_tokens_total == prev.prompt_tokens_total
            and cur.generation_tokens_total == prev.generation_tokens_total)


async def log_stats_forever(engine, interval_s: float) -> None:
    """Logs one line every interval_s while the engine has done something since the last line."""
    prev, prev_t = engine.stats(), time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        cur, now = engine.stats(), time.monotonic()
        if not _idle(prev, cur):
            logger.info(format_stats_line(prev, cur, now - prev_t))
        prev, prev_t = cur, now
