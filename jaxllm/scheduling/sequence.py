"""Sequences and sequence groups: the host-side state of one request while it is scheduled.

A SequenceGroup is one request. With n > 1 it starts as ONE sequence that prefills the prompt up to (not including)
its last token; then it forks into n sequences sharing those blocks by reference count, and each computes the last
prompt token itself and samples its own continuation (the partial last block is copied on write when they diverge).
A forked group preempted by recompute goes through the same dance again: its first unfinished sample (the leader)
re-prefills the shared prompt while the others wait, then they adopt its blocks and recompute only their own tokens,
so a group never needs more blocks after a preemption than before it.
"""

import enum
import hashlib
import struct
import time
from collections.abc import Iterable

from jaxllm.outputs import RequestMetrics
from jaxllm.sampling_params import SamplingParams

# Run-ahead: the token of a sequence whose next step was scheduled before its last sampled token was read back.
# Scheduler.run_ahead appends it and update() overwrites it; the runner feeds the real token on device.
RUN_AHEAD_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    SWAPPED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH_CAPPED: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}
_FINISHED = tuple(_FINISH_REASONS)


class Sequence:
    """One sample's tokens (prompt + output) and where its KV lives.

    token_ids[:num_computed_tokens] have their K/V in the cache; the next step computes token_ids[num_computed_tokens:]
    (the last token of a decoding sequence is the one sampled last step, not yet in the cache).
    block_table holds device block ids, or CPU block ids while the sequence is SWAPPED.
    """

    def __init__(self, group: "SequenceGroup", sample_index: int, token_ids: list[int], num_prompt_tokens: int):
        self.group = group
        self.sample_index = sample_index
        self.token_ids = token_ids
        self.num_prompt_tokens = num_prompt_tokens
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        # Chained hashes of token_ids' full blocks, filled lazily by the BlockManager; token ids of a full block never
        # change, so they stay valid across preemption and are inherited by forks.
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.stop_reason: int | str | None = None

    @property
    def request_id(self) -> str:
        return self.group.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status in _FINISHED  # identity checks: this runs for every sequence in every step

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    @property
    def compute_limit(self) -> int:
        """How many tokens this sequence computes before it next needs a sampled token (or the fork)."""
        group = self.group
        if not group.pending_fork:
            return len(self.token_ids)
        return self.num_prompt_tokens - 1 if self is group.leader else 0

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.compute_limit - self.num_computed_tokens

    def fork(self, sample_index: int) -> "Sequence":
        """A copy sharing this sequence's progress; its block table is filled by BlockManager.fork."""
        child = Sequence(self.group, sample_index, list(self.token_ids), self.num_prompt_tokens)
        child.num_computed_tokens = self.num_computed_tokens
        child.status = self.status
        child.block_hashes = list(self.block_hashes)
        child.num_registered_blocks = self.num_registered_blocks
        return child

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}#{self.sample_index}, {self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")


def _steered_salt(cache_salt: str | None, steering: dict[int, tuple[float, ...]]) -> str:
    digest = hashlib.sha256()
    for layer in sorted(steering):
        vector = steering[layer]
        digest.update(struct.pack(f"<qq{len(vector)}d", layer, len(vector), *vector))
    return f"{'' if cache_salt is None else cache_salt}\x00steering:{digest.hexdigest()}"


class SequenceGroup:
    """One request: its prompt, SamplingParams and sequences (one until the n > 1 fork, then n).

    eos_token_id (one id or several, e.g. Llama 3's <|end_of_text|> and <|eot_id|>) stops a sequence unless
    ignore_eos, with stop_reason None; cache_salt keeps this request's prefix-cache blocks apart from requests with
    another salt (multi-tenant isolation). max_tokens and arrival_index are set by Scheduler.add.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 arrival_time: float | None = None, eos_token_id: int | Iterable[int] | None = None,
                 cache_salt: str | None = None, prompt: str | None = None):
        self.request_id = request_id
        self.prompt = prompt
        # Plain ints, as validate_request made them: not converted again (docs/perf-notes.md#host-work-per-request).
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        if eos_token_id is None or isinstance(eos_token_id, int):
            eos_token_id = () if eos_token_id is None else (eos_token_id,)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_id)
        # Steering changes every K/V after the steered layer: its vectors join the salt of the prefix-cache chain.
        self.cache_salt = cache_salt if params.steering is None else _steered_salt(cache_salt, params.steering)
        self.metrics = RequestMetrics(arrival_time=time.time() if arrival_time is None else arrival_time)
        self.pending_fork = params.n > 1
        self.seqs = [Sequence(self, 0, list(self.prompt_token_ids), len(self.prompt_token_ids))]
        self.max_tokens: int = params.max_tokens if params.max_tokens is not None else -1
        self.arrival_index = -1
        self.num_cached_tokens: int | None = None  # prefix-cache hit (tokens) at the first admission
        self.seed: int | None = None  # the engine's sampling seed for this request (params.seed or a derived one)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def leader(self) -> Sequence:
        """The sequence that prefills the shared prompt while the group waits for its fork."""
        return next(s for s in self.seqs if not s.is_finished)

    def unfinished_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if s.status not in _FINISHED]

    def is_finished(self) -> bool:
        for seq in self.seqs:  # a loop, not all(<generator>): this runs for every request in every step
            if seq.status not in _FINISHED:
                return False
        return True

    @property
    def num_seqs_reserved(self) -> int:
        """Sequences this group may run at once: n before its first fork, since the fork happens without asking."""
        return self.params.n if len(self.seqs) < self.params.n else len(self.unfinished_seqs())

    def __repr__(self) -> str:
        return f"SequenceGroup({self.request_id!r}, n={self.params.n}, seqs={self.seqs})"
