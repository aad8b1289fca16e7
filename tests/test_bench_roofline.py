"""Benchmark bookkeeping: the offline-throughput roofline (FLOP time against weight + KV read time, checked by brute
force), latency.py's record of the garbage collections a timed run sat through, and kernels.py's page layouts."""

import gc
import math

from benchmarks import kernels
from benchmarks.latency import GcPauses
from benchmarks.throughput import roofline
from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduling.block_manager import BlockManager
from jaxllm.scheduling.sequence import SequenceGroup


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


def test_kernel_benchmark_pages_in_the_engines_order_are_the_block_managers():
    """kernels.py's "ascending" decode shape lays the pages out as a fresh engine's block manager hands them out;
    its scattered one uses as many distinct pages, anywhere in the cache but the null block."""
    batch, context = 3, 40
    bm = BlockManager(num_blocks=1 + 3 * batch * -(-context // kernels.PAGE), block_size=kernels.PAGE)
    tables = []
    for i in range(batch):
        seq = SequenceGroup(f"r{i}", list(range(context)), SamplingParams(max_tokens=1)).seqs[0]
        bm.allocate(seq, context)
        tables.append(seq.block_table)
    ascending = kernels.DecodeShape(batch, context, cache_factor=3, page_order="ascending").build()
    assert ascending["tables"].tolist() == tables
    scattered = kernels.DecodeShape(batch, context, cache_factor=3).build()
    pages = scattered["tables"].ravel().tolist()
    assert len(set(pages)) == len(pages) == batch * len(tables[0])
    assert min(pages) >= 1 and max(pages) < scattered["k"].shape[1] and pages != sum(tables, [])
