"""BlockManager: free list, reference counts, chained prefix hashes, salts, LRU reuse, copy-on-write, swap, fork."""

import pytest

from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduling.block_manager import NULL_BLOCK, BlockManager, hash_block, hash_blocks
from jaxllm.scheduling.sequence import SequenceGroup, SequenceStatus

BS = 4


def make_seq(tokens, salt=None, rid="r"):
    group = SequenceGroup(rid, tokens, SamplingParams(max_tokens=8), cache_salt=salt)
    seq = group.seqs[0]
    seq.status = SequenceStatus.RUNNING
    return seq


def compute(bm, seq, num_tokens):
    """Allocate and mark num_tokens as computed, as one scheduler step + update would."""
    assert bm.blocks_needed([(seq, num_tokens)]) <= bm.num_free_blocks
    copies = bm.allocate(seq, num_tokens)
    seq.num_computed_tokens += num_tokens
    bm.register_computed(seq)
    return copies


def test_never_hands_out_the_null_block_and_counts_free_blocks():
    bm = BlockManager(num_blocks=9, block_size=BS)
    assert bm.num_usable_blocks == 8 and bm.num_free_blocks == 8 and bm.usage == 0.0
    seq = make_seq(list(range(32)))
    assert bm.blocks_needed([(seq, 32)]) == 8
    compute(bm, seq, 32)
    assert NULL_BLOCK not in seq.block_table and sorted(seq.block_table) == list(range(1, 9))
    assert bm.num_free_blocks == 0 and bm.usage == 1.0
    assert bm.blocks_needed([(make_seq([1]), 1)]) == 1 > bm.num_free_blocks
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []
    bm.assert_consistent([])


def test_allocation_grows_one_block_at_block_boundaries():
    bm = BlockManager(num_blocks=10, block_size=BS)
    seq = make_seq(list(range(6)))
    compute(bm, seq, 3)
    assert len(seq.block_table) == 1
    assert bm.blocks_needed([(seq, 1)]) == 0  # position 3 is in block 0
    compute(bm, seq, 1)
    assert bm.blocks_needed([(seq, 1)]) == 1  # position 4 opens block 1
    compute(bm, seq, 2)
    assert len(seq.block_table) == 2
    bm.assert_consistent([seq])


def test_prefix_hashes_are_chained_on_the_parent():
    a = hash_block(None, (1, 2, 3, 4), None)
    assert a == hash_block(None, (1, 2, 3, 4), None)  # stable
    b1 = hash_block(a, (5, 6, 7, 8), None)
    b2 = hash_block(hash_block(None, (9, 9, 9, 9), None), (5, 6, 7, 8), None)
    assert b1 != b2  # same tokens, different parent
    assert hash_block(None, (1, 2, 3, 4), "tenant-a") != a
    assert hash_block(None, (1, 2, 3, 4), "") not in (a, hash_block(None, (1, 2, 3, 4), "tenant-a"))
    assert hash_block(None, [1, 2, 3, 4], None) == a  # a list slice of a sequence's ids hashes as the tuple does
    assert hash_block(None, (1, 2, 3, 4 + (1 << 32)), None) != a  # every id whole, not truncated to 32 bits
    assert hash_block(a, (5, 6, 7, 8), None) != hash_block(None, (5, 6, 7, 8), None)
    # Several blocks at once chain as one at a time; a partial last block is left out.
    assert hash_blocks(None, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4, "s") == [
        h := hash_block(None, (1, 2, 3, 4), "s"), hash_block(h, (5, 6, 7, 8), "s")]
    assert hash_blocks(a, [5, 6, 7, 8], 4, None) == [b1]


def test_prefix_reuse_hits_full_computed_blocks_only():
    bm = BlockManager(num_blocks=20, block_size=BS)
    first = make_seq(list(range(10)))
    compute(bm, first, 10)  # blocks 0, 1 full, block 2 partial
    second = make_seq(list(range(10)) + [99, 98])
    hits = bm.lookup_prefix(second, max_blocks=3)
    assert hits == first.block_table[:2]  # the partial block is never shared
    other = make_seq([0, 1, 2, 3, 7, 7, 7, 7])
    assert bm.lookup_prefix(other, max_blocks=2) == first.block_table[:1]  # diverges in block 1
    bm.attach_prefix(second, hits)
    assert second.num_computed_tokens == 8
    assert bm._ref[hits[0]] == 2
    bm.assert_consistent([first, second])


def test_registration_waits_until_tokens_are_computed():
    bm = BlockManager(num_blocks=20, block_size=BS)
    seq = make_seq(list(range(8)))
    bm.allocate(seq, 8)  # scheduled, not yet run
    assert bm.lookup_prefix(make_seq(list(range(8))), max_blocks=2) == []
    seq.num_computed_tokens = 8
    bm.register_computed(seq)
    assert bm.lookup_prefix(make_seq(list(range(8))), max_blocks=2) == seq.block_table


def test_different_salts_never_share_blocks():
    bm = BlockManager(num_blocks=20, block_size=BS)
    a = make_seq(list(range(8)), salt="tenant-a")
    compute(bm, a, 8)
    assert bm.lookup_prefix(make_seq(list(range(8)), salt="tenant-b"), 2) == []
    assert bm.lookup_prefix(make_seq(list(range(8))), 2) == []
    assert bm.lookup_prefix(make_seq(list(range(8)), salt="tenant-a"), 2) == a.block_table


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_blocks=20, block_size=BS, enable_prefix_caching=False)
    a = make_seq(list(range(8)))
    compute(bm, a, 8)
    bm.free(a)
    assert bm.lookup_prefix(make_seq(list(range(8))), 2) == []
    assert len(bm._free_cached) == 0


def test_freed_blocks_stay_cached_until_needed_then_evicted_lru():
    bm = BlockManager(num_blocks=7, block_size=BS)  # 6 usable
    old, new = make_seq(list(range(8)), rid="old"), make_seq(list(range(100, 108)), rid="new")
    compute(bm, old, 8)
    compute(bm, new, 8)
    old_blocks, new_blocks = list(old.block_table), list(new.block_table)
    bm.free(old)
    bm.free(new)
    assert bm.num_free_blocks == 6
    # Free blocks holding nothing go first: both prefixes survive.
    filler = make_seq(list(range(200, 208)))
    compute(bm, filler, 8)
    assert bm.lookup_prefix(make_seq(list(range(8))), 2) == old_blocks
    assert bm.lookup_prefix(make_seq(list(range(100, 108))), 2) == new_blocks
    # Then the least recently freed request's blocks are evicted, its last block first.
    more = make_seq(list(range(300, 304)))
    compute(bm, more, 4)
    assert more.block_table == [old_blocks[1]]
    assert bm.lookup_prefix(make_seq(list(range(8))), 2) == old_blocks[:1]
    assert bm.lookup_prefix(make_seq(list(range(100, 108))), 2) == new_blocks
    bm.assert_consistent([filler, more])


def test_a_hit_on_a_free_cached_block_takes_it_out_of_the_free_pool():
    bm = BlockManager(num_blocks=5, block_size=BS)
    a = make_seq(list(range(8)))
    compute(bm, a, 8)
    bm.free(a)
    b = make_seq(list(range(8)) + [1])
    hits = bm.lookup_prefix(b, 2)
    assert bm.blocks_needed([(b, 1)]) == 1
    bm.attach_prefix(b, hits)
    assert bm.num_free_blocks == 2
    compute(bm, b, 1)
    assert bm.num_free_blocks == 1
    bm.assert_consistent([b])


def test_fork_shares_blocks_and_copy_on_write_splits_the_partial_block():
    bm = BlockManager(num_blocks=20, block_size=BS)
    parent = make_seq(list(range(6)))
    compute(bm, parent, 5)  # block 0 full, block 1 holds positions 4
    children = [parent.fork(i) for i in (1, 2)]
    for child in children:
        bm.fork(parent, child)
    shared = parent.block_table[1]
    assert bm._ref[shared] == 3 and bm._ref[parent.block_table[0]] == 3
    family = [parent] + children
    # Three writers of the shared partial block: two copies, the last one writes in place.
    assert bm.blocks_needed([(s, 1) for s in family]) == 2
    copies = [c for s in family for c in bm.allocate(s, 1)]
    assert [src for src, _ in copies] == [shared, shared]
    assert len({dst for _, dst in copies}) == 2 and shared not in {dst for _, dst in copies}
    assert [s.block_table[1] for s in family] == [copies[0][1], copies[1][1], shared]
    assert bm._ref[shared] == 1
    bm.assert_consistent(family)
    for s in family:
        bm.free(s)
    assert bm.num_free_blocks == bm.num_usable_blocks
    bm.assert_consistent([])


def test_copy_on_write_of_one_writer_among_three_refs():
    bm = BlockManager(num_blocks=20, block_size=BS)
    parent = make_seq(list(range(6)))
    compute(bm, parent, 5)
    child = parent.fork(1)
    bm.fork(parent, child)
    assert bm.blocks_needed([(child, 1)]) == 1
    assert bm.allocate(child, 1) == [(parent.block_table[1], child.block_table[1])]
    assert bm.blocks_needed([(parent, 1)]) == 0  # now the only owner


def test_swap_round_trip_keeps_sharing_and_returns_every_block():
    bm = BlockManager(num_blocks=20, block_size=BS, num_cpu_blocks=8, enable_prefix_caching=False)
    parent = make_seq(list(range(7)))
    compute(bm, parent, 6)
    child = parent.fork(1)
    bm.fork(parent, child)
    family = [parent, child]
    dev_tables = [list(s.block_table) for s in family]
    out = bm.swap_out(family)
    assert sorted(d for d, _ in out) == sorted(set(dev_tables[0]))  # each shared block copied once
    assert all(s.status is SequenceStatus.SWAPPED for s in family)
    assert parent.block_table == child.block_table  # sharing preserved on the CPU side
    assert bm.num_free_blocks == bm.num_usable_blocks and bm.num_free_cpu_blocks == 6
    bm.assert_consistent(family)
    back = bm.swap_in(family)
    cpu_to_dev = dict(back)
    assert sorted(cpu_to_dev) == sorted(c for _, c in out)
    assert all(s.status is SequenceStatus.RUNNING for s in family)
    assert parent.block_table == child.block_table and bm._ref[parent.block_table[0]] == 2
    assert bm.num_free_cpu_blocks == 8
    bm.assert_consistent(family)
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == bm.num_usable_blocks
    bm.assert_consistent([])


def test_swap_out_refused_when_the_cpu_pool_is_too_small():
    bm = BlockManager(num_blocks=20, block_size=BS, num_cpu_blocks=1)
    seq = make_seq(list(range(8)))
    compute(bm, seq, 8)
    assert bm.swap_out([seq]) is None
    assert seq.status is SequenceStatus.RUNNING and bm.num_free_cpu_blocks == 1
    bm.assert_consistent([seq])


def test_swap_in_refused_when_the_device_pool_is_too_small():
    bm = BlockManager(num_blocks=4, block_size=BS, num_cpu_blocks=4)
    seq = make_seq(list(range(12)))
    compute(bm, seq, 12)
    bm.swap_out([seq])
    hog = make_seq(list(range(50, 54)))
    compute(bm, hog, 4)
    assert bm.swap_in([seq]) is None and seq.status is SequenceStatus.SWAPPED
    bm.assert_consistent([seq, hog])


def test_swap_in_reuses_a_block_still_cached_on_the_device():
    bm = BlockManager(num_blocks=20, block_size=BS, num_cpu_blocks=8)
    seq = make_seq(list(range(6)))
    compute(bm, seq, 6)
    full_block = seq.block_table[0]
    bm.swap_out([seq])
    copies = bm.swap_in([seq])
    assert seq.block_table[0] == full_block  # no copy for the cached full block
    assert len(copies) == 1 and copies[0][1] == seq.block_table[1]
    bm.assert_consistent([seq])


def test_free_of_a_swapped_sequence_returns_cpu_blocks():
    bm = BlockManager(num_blocks=20, block_size=BS, num_cpu_blocks=8)
    seq = make_seq(list(range(6)))
    compute(bm, seq, 6)
    bm.swap_out([seq])
    bm.free(seq)
    assert bm.num_free_cpu_blocks == 8 and bm.num_free_blocks == bm.num_usable_blocks


@pytest.mark.parametrize("num_blocks", [1, 0])
def test_rejects_a_pool_without_usable_blocks(num_blocks):
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockManager(num_blocks=num_blocks, block_size=BS)
