"""Benchmark bookkeeping: the offline-throughput roofline (FLOP time against weight + KV read time, checked by brute
force) and latency.py's record of the garbage collections a timed run sat through."""

import gc
import math

from benchmarks.latency import GcPauses
from benchmarks.throughput import roofline


def test_kv_reads_count_every_decode_pass_context():
    prompt_lens, output_lens = [5, 17, 1], [4, 1, 9]
    kv_tokens = sum(p + t for p, o in zip(prompt_lens, output_lens) for t in range(1, o))  # token 0: the prefill
    bound = roofline(layer_params=1000, head_params=100, read_bytes=3000, kv_bytes_per_token=64,
                     prompt_lens=prompt_lens, output_lens=output_lens, max_num_seqs=2, copy_bandwidth=1e3,
                     matmul_rate=1e6, tensor_parallel_size=2)
    passes = max(max(output_lens), math.ceil(sum(output_lens) / 2))
    assert bound["roofline_forward_passes"] == passes == 9
    assert math.isclose(bound["roofline_kv_read_s"], kv_tokens * 64 / 2e3)
    assert math.isclose(bound["roofline_weight_read_s"], passes * 3000 / 2e3)
    flops = 2 * (1000 * (sum(prompt_lens) + sum(output_lens)) + 100 * sum(output_lens))
    assert math.isclose(bound["roofline_flop_s"], flops / 2e6)
    memory_s = bound["roofline_weight_read_s"] + bound["roofline_kv_read_s"]
    assert memory_s > bound["roofline_flop_s"] and bound["roofline_s"] == memory_s


def test_latency_records_the_collections_it_sat_through():
    with GcPauses() as pauses:
        gc.collect(2)
        gc.collect(0)
    gc.collect()  # after the block: not recorded
    assert [generation for generation, _ in pauses.pauses] == [2, 0]
    assert all(ms >= 0 for _, ms in pauses.pauses)
