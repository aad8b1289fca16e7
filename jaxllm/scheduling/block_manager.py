"""Paged KV block accounting on the host: free lists, reference counts, prefix caching, copy-on-write and swap.

The device pool has blocks 0..num_blocks-1, of which block 0 is the null block (padding writes there, see
jaxllm/kv_cache.py) and is never handed out. A separate CPU pool holds swapped-out blocks. The BlockManager only does
bookkeeping: it returns the copies the runner must perform, it never touches memory.

Prefix caching: a FULL block whose tokens are computed is registered under a hash chained on the previous block's
hash and the request's cache salt, so equal prefixes (and only equal salts) share blocks. A freed registered block
keeps its contents and its hash until its memory is needed: free blocks without a hash are handed out first, then
cached ones in least-recently-freed order.
"""

import array
import collections
import hashlib

from jaxllm.scheduling.sequence import Sequence, SequenceStatus

NULL_BLOCK = 0  # == jaxllm.kv_cache.NULL_BLOCK, restated because that module imports jax


def hash_block(parent: bytes | None, token_ids: list[int] | tuple[int, ...], cache_salt: str | None) -> bytes:
    return _chain(parent, _salt(cache_salt), array.array("q", token_ids))


def hash_blocks(parent: bytes | None, token_ids: list[int] | tuple[int, ...], block_size: int,
                cache_salt: str | None) -> list[bytes]:
    """hash_block of each full block of token_ids in turn, the first chained on `parent`. The ids become bytes once
    for all the blocks and each digest is one call (docs/perf-notes.md#host-work-per-request)."""
    salt, data, size = _salt(cache_salt), memoryview(array.array("q", token_ids)).cast("B"), 8 * block_size
    hashes = []
    for start in range(0, len(data) - size + 1, size):
        parent = _chain(parent, salt, data[start:start + size])
        hashes.append(parent)
    return hashes


def _salt(cache_salt: str | None) -> bytes:
    if cache_salt is None:
        return b"\x00"
    encoded = cache_salt.encode()
    return b"\x01" + len(encoded).to_bytes(8, "little") + encoded


def _chain(parent: bytes | None, salt: bytes, ids) -> bytes:
    # sha256 rather than hash(): a collision would silently serve another prompt's KV, and hash() collisions can be
    # forced by a client (vLLM CVE-2025-25183). The encoding is unambiguous: a flag byte before the parent digest
    # (32 bytes) and the salt (length-prefixed), then the ids as 8-byte integers (their bytes: 3x faster than reprs).
    return hashlib.sha256((b"\x00" if parent is None else b"\x01" + parent) + salt + ids).digest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def max_blocks_needed(num_prompt: int, max_tokens: int, n: int, block_size: int) -> int:
    """The most device blocks a request holds at once. The last sampled token is never written to the cache (hence
    - 1); the n samples share the full blocks before the last prompt token and may each own the rest."""
    shared = (num_prompt - 1) // block_size
    return shared + n * (cdiv(num_prompt + max_tokens - 1, block_size) - shared)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_cpu_blocks: int = 0, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (block 0 is reserved), got {num_blocks}.")
        if block_size < 1 or num_cpu_blocks < 0:
            raise ValueError(f"block_size must be >= 1 and num_cpu_blocks >= 0, got {block_size}, {num_cpu_blocks}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_cpu_blocks = num_cpu_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> device block holding those tokens' K/V
        self._free = collections.deque(range(1, num_blocks))  # free, nothing cached
        self._free_cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._cpu_ref = [0] * num_cpu_blocks
        self._cpu_hash: list[bytes | None] = [None] * num_cpu_blocks
        self._cpu_free = collections.deque(range(num_cpu_blocks))
        self.prefix_cache_queries = 0  # tokens looked up by admitted sequences, since start (vLLM's counter)
        self.prefix_cache_hits = 0  # of those, tokens found in the cache

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, cached-but-unused ones included."""
        return len(self._free) + len(self._free_cached)

    @property
    def num_free_cpu_blocks(self) -> int:
        return len(self._cpu_free)

    @property
    def usage(self) -> float:
        """Fraction of the usable device blocks held by sequences (vLLM's kv_cache_usage_perc, as a fraction)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def _pop_free(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._free_cached.popitem(last=False)
            del self._cached[self._hash[block]]
            self._hash[block] = None
        assert self._ref[block] == 0
        return block

    def _take(self, block: int, refs: int = 1) -> None:
        if self._ref[block] == 0:
            del self._free_cached[block]  # only a cached block can be taken while free
        self._ref[block] += refs

    def _release(self, block: int) -> None:
        assert self._ref[block] > 0, block
        self._ref[block] -= 1
        if self._ref[block] == 0:
            if self._hash[block] is not None:
                self._free_cached[block] = None
            else:
                self._free.append(block)

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        hashes, bs = seq.block_hashes, self.block_size
        if len(hashes) < num_blocks:
            hashes += hash_blocks(hashes[-1] if hashes else None, seq.token_ids[len(hashes) * bs:num_blocks * bs], bs,
                                  seq.group.cache_salt)
        return hashes[:num_blocks]

    def lookup_prefix(self, seq: Sequence, max_blocks: int) -> list[int]:
        """Device blocks already holding seq's first full blocks (at most max_blocks); changes nothing."""
        if not self.enable_prefix_caching or max_blocks <= 0:
            return []
        hits = []
        for h in self._block_hashes(seq, max_blocks):
            block = self._cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def count_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hit_tokens

    def attach_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        """Give a sequence with no blocks the cached blocks from lookup_prefix; those tokens count as computed."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for block in blocks:
            self._take(block)
        seq.block_table = list(blocks)
        seq.num_computed_tokens = len(blocks) * self.block_size
        seq.num_registered_blocks = len(blocks)

    def blocks_needed(self, plan: list[tuple[Sequence, int]]) -> int:
        """Free blocks that allocate() will consume to write each (seq, num_tokens) of plan, in that order."""
        bs, new, writes = self.block_size, 0, None
        for seq, num_tokens in plan:
            start = seq.num_computed_tokens
            new += max(0, cdiv(start + num_tokens, bs) - len(seq.block_table))
            if num_tokens and start % bs:
                block = seq.block_table[start // bs]
                if self._ref[block] > 1:
                    writes = writes or collections.Counter()
                    writes[block] += 1
        if writes is None:
            return new
        # A shared partial block written through r of its refs costs a copy per writer but the last owner.
        return new + sum(min(m, self._ref[b] - 1) for b, m in writes.items())

    def allocate(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """Make room to write seq's next num_tokens tokens. Returns the (src, dst) device block copies that must run
        before the step (copy-on-write of a shared partial block). The caller checked blocks_needed first."""
        bs, start, copies = self.block_size, seq.num_computed_tokens, []
        if num_tokens and start % bs:
            i = start // bs
            src = seq.block_table[i]
            if self._ref[src] > 1:
                assert self._hash[src] is None, "a registered block is full and never written again"
                dst = self._pop_free()
                self._ref[dst] = 1
                self._release(src)
                seq.block_table[i] = dst
                copies.append((src, dst))
        for _ in range(cdiv(start + num_tokens, bs) - len(seq.block_table)):
            block = self._pop_free()
            self._ref[block] = 1
            seq.block_table.append(block)
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares all of parent's blocks (copy-on-write later)."""
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            self._take(block)

    def free(self, seq: Sequence) -> None:
        """Drop seq's references (device, or CPU while SWAPPED). Its computed tokens must be recomputed after this."""
        if seq.status is SequenceStatus.SWAPPED:
            for block in seq.block_table:
                self._cpu_release(block)
        else:
            # Reversed: a sequence's last blocks are the least likely to be shared, so they are evicted first.
            for block in reversed(seq.block_table):
                self._release(block)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def register_computed(self, seq: Sequence) -> None:
        """Offer seq's newly computed full blocks to the prefix cache. Called after the step that wrote them ran,
        so no other sequence can read a block in the same step that writes it, whatever the kernel's write order."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_registered_blocks:
            return  # no new full block: a decode fills one every block_size steps
        hashes = self._block_hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block, h = seq.block_table[i], hashes[i]
            # A block computed twice (two equal prompts in one step) stays unregistered: one copy per hash.
            if self._hash[block] is None and h not in self._cached:
                self._hash[block] = h
                self._cached[h] = block
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def _cpu_release(self, block: int) -> None:
        assert self._cpu_ref[block] > 0, block
        self._cpu_ref[block] -= 1
        if self._cpu_ref[block] == 0:
            self._cpu_hash[block] = None
            self._cpu_free.append(block)

    def swap_out(self, seqs: list[Sequence]) -> list[tuple[int, int]] | None:
        """Move seqs (one group) to the CPU pool and mark them SWAPPED. Returns the (device, cpu) copies that must
        run before this step's compute, or None (nothing changed) when the CPU pool is too small."""
        distinct = list(dict.fromkeys(b for s in seqs for b in s.block_table))
        if len(distinct) > len(self._cpu_free):
            return None
        mapping = {}
        for dev in distinct:
            cpu = self._cpu_free.popleft()
            self._cpu_hash[cpu] = self._hash[dev]  # lets swap_in reuse the device block if still cached
            mapping[dev] = cpu
        for seq in seqs:
            for block in reversed(seq.block_table):
                self._release(block)
            seq.block_table = [mapping[b] for b in seq.block_table]
            for cpu in seq.block_table:
                self._cpu_ref[cpu] += 1
            seq.status = SequenceStatus.SWAPPED
        return list(mapping.items())

    def swap_in(self, seqs: list[Sequence]) -> list[tuple[int, int]] | None:
        """Bring SWAPPED seqs back to the device and mark them RUNNING. Returns the (cpu, device) copies that must
        run before this step's compute, or None (nothing changed) when the device pool is too small."""
        refs = collections.Counter(b for s in seqs for b in s.block_table)
        if len(refs) > self.num_free_blocks:
            return None
        mapping, copies = {}, []
        # Reuse blocks still cached on the device before popping fresh ones, which could evict them.
        for cpu in refs:
            dev = self._cached.get(self._cpu_hash[cpu]) if self._cpu_hash[cpu] is not None else None
            if dev is not None:
                self._take(dev, refs[cpu])
                mapping[cpu] = dev
        for cpu in refs:
            if cpu not in mapping:
                dev = self._pop_free()
                self._ref[dev] = refs[cpu]
                if self._cpu_hash[cpu] is not None:  # its contents arrive before compute; safe to share
                    self._hash[dev] = self._cpu_hash[cpu]
                    self._cached[self._cpu_hash[cpu]] = dev
                mapping[cpu] = dev
                copies.append((cpu, dev))
        for seq in seqs:
            for cpu in seq.block_table:
                self._cpu_release(cpu)
            seq.block_table = [mapping[b] for b in seq.block_table]
            seq.status = SequenceStatus.RUNNING
        return copies

    def assert_consistent(self, seqs: list[Sequence]) -> None:
        """Check every invariant against the live sequences (tests and debugging; O(pool))."""
        dev_refs, cpu_refs = collections.Counter(), collections.Counter()
        for seq in seqs:
            if not seq.is_finished:
                (cpu_refs if seq.status is SequenceStatus.SWAPPED else dev_refs).update(seq.block_table)
        assert NULL_BLOCK not in dev_refs and self._ref[NULL_BLOCK] == 0
        free = list(self._free) + list(self._free_cached)
        free_set = set(free)
        assert len(free) == len(free_set) and NULL_BLOCK not in free_set
        for block in range(1, self.num_blocks):
            assert self._ref[block] == dev_refs[block], (block, self._ref[block], dev_refs[block])
            assert (block in free_set) == (self._ref[block] == 0), block
        for block in self._free_cached:
            assert self._hash[block] is not None
        for h, block in self._cached.items():
            assert self._hash[block] == h
        assert sum(h is not None for h in self._hash) == len(self._cached)
        for block in range(self.num_cpu_blocks):
            assert self._cpu_ref[block] == cpu_refs[block], (block, self._cpu_ref[block], cpu_refs[block])
        assert len(self._cpu_free) == sum(r == 0 for r in self._cpu_ref)
