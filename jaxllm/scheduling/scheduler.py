"""Continuous batching: which sequences run in the next step and how many tokens each computes.

Each step has a budget of max_num_batched_tokens tokens and at most max_num_seqs running sequences:
1. Running requests: every decode gets its one token first, so a long prompt never stalls decodes; the rest of the
   budget continues chunked prefills, oldest request first. When the KV pool cannot hold a request's tokens, the
   NEWEST running request is preempted: swapped to the CPU pool if it has room, else freed to be recomputed.
2. If nothing was preempted, swapped requests come back, oldest first.
3. If nothing is left swapped, waiting requests are admitted first come first served, with their prefix-cache hits
   attached and their first prompt chunk in what is left of the budget. The head of the queue blocks the rest, so
   a large request is never starved by small ones behind it.
add() takes only requests validated to fit the pool alone (jaxllm.validation), so the oldest running request always
makes progress.

Engine loop: out = schedule(); run out on the device; seqs = update(out, sampled); detokenize seqs and call finish()
on stop strings. abort() may be called between steps.
"""

import bisect
import collections
import dataclasses

from jaxllm.scheduling.block_manager import BlockManager, max_blocks_needed
from jaxllm.scheduling.scheduler_output import ScheduledSequence, SchedulerOutput
from jaxllm.scheduling.sequence import RUN_AHEAD_TOKEN, Sequence, SequenceGroup, SequenceStatus


@dataclasses.dataclass
class _Step:
    scheduled: list = dataclasses.field(default_factory=list)
    swap_out: list = dataclasses.field(default_factory=list)
    swap_in: list = dataclasses.field(default_factory=list)
    copies: list = dataclasses.field(default_factory=list)
    preempted: list = dataclasses.field(default_factory=list)
    num_tokens: int = 0


def _arrival(group: SequenceGroup) -> int:
    return group.arrival_index


class Scheduler:
    """Continuous batching over a BlockManager (which holds the pool sizes, block size and prefix-caching switch).

    preemption_mode None or "swap": swap to the CPU pool when it has room, else recompute; "recompute": always.
    """

    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, preemption_mode: str | None = None):
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_model_len", max_model_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least max_num_seqs "
                             f"({max_num_seqs}), so that every running sequence can decode in every step.")
        if preemption_mode not in (None, "swap", "recompute"):
            raise ValueError(f"preemption_mode must be None, 'swap' or 'recompute', got {preemption_mode!r}.")
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.preemption_mode = preemption_mode
        self.waiting: collections.deque[SequenceGroup] = collections.deque()  # admission order
        self.running: list[SequenceGroup] = []  # by arrival
        self.swapped: list[SequenceGroup] = []  # by arrival
        self._groups: dict[str, SequenceGroup] = {}  # every unfinished request, wherever it is
        self._finished: list[SequenceGroup] = []  # finished (not aborted) since the last take_finished()
        self._next_arrival = 0
        self.num_preemptions = 0

    def add(self, group: SequenceGroup) -> None:
        """Queue a request that `jaxllm.validation.validate_request` accepted for these limits (asserted here, not
        checked again); raises ValueError for a request_id in use. Resolves group.max_tokens (None -> up to
        max_model_len)."""
        rid = group.request_id
        if rid in self._groups:
            raise ValueError(f"request_id {rid!r} is already in use.")
        num_prompt = group.num_prompt_tokens
        max_tokens = group.params.max_tokens
        max_tokens = self.max_model_len - num_prompt if max_tokens is None else max_tokens
        assert num_prompt > 0 and max_tokens >= 1 and num_prompt + max_tokens <= self.max_model_len, group
        assert group.params.n <= self.max_num_seqs, group
        need = max_blocks_needed(num_prompt, max_tokens, group.params.n, self.block_size)
        assert need <= self.block_manager.num_usable_blocks, group
        group.max_tokens = max_tokens
        group.arrival_index = self._next_arrival
        self._next_arrival += 1
        self.waiting.append(group)
        self._groups[rid] = group

    def abort(self, request_id: str) -> SequenceGroup | None:
        """Finish the request wherever it is and free all its blocks; None if it is unknown or already finished."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return None
        for queue in (self.waiting, self.running, self.swapped):
            if group in queue:
                queue.remove(group)
                break
        for seq in group.seqs:
            if not seq.is_finished:
                self.block_manager.free(seq)  # before the status changes: free() reads SWAPPED
                seq.status = SequenceStatus.FINISHED_ABORTED
                if seq.token_ids[-1] == RUN_AHEAD_TOKEN:  # its token will never be read
                    seq.token_ids.pop()
        return group

    def finish(self, seq: Sequence, status: SequenceStatus = SequenceStatus.FINISHED_STOPPED,
               stop_reason: int | str | None = None) -> None:
        """End one sequence (e.g. the detokenizer found a stop string) and free its blocks."""
        assert status.is_finished
        if seq.is_finished:
            return
        self.block_manager.free(seq)
        seq.status, seq.stop_reason = status, stop_reason
        group = seq.group
        if group.is_finished() and self._groups.pop(group.request_id, None) is group:
            for queue in (self.running, self.swapped, self.waiting):
                if group in queue:
                    queue.remove(group)
                    break
            self._finished.append(group)

    def run_ahead(self, output: SchedulerOutput) -> None:
        """Let the next schedule() run before `output`'s tokens are known: each sequence sampling in `output`
        gets RUN_AHEAD_TOKEN, a placeholder that update(..., ran_ahead=True) later replaces. The next step computes the
        placeholder from the device-side result; a sequence whose length limit ends it with this token is not
        scheduled again, and one that stops otherwise (EOS, stop string) has its extra step discarded."""
        for item in output.scheduled:
            if item.do_sample and item.seq.status is SequenceStatus.RUNNING:
                item.seq.token_ids.append(RUN_AHEAD_TOKEN)

    def update(self, output: SchedulerOutput, sampled_token_ids, *, ran_ahead: bool = False) -> list[Sequence]:
        """Record a step: one sampled token per entry of output.scheduled (ignored where do_sample is False).
        Appends tokens (or fills the placeholders of run_ahead), checks EOS / stop_token_ids / min_tokens /
        max_tokens / max_model_len and frees finished sequences. Returns the sequences that received a token, in
        order (check seq.status for finished)."""
        if len(sampled_token_ids) != len(output.scheduled):
            raise ValueError(f"expected {len(output.scheduled)} sampled tokens, got {len(sampled_token_ids)}.")
        updated = []
        for item, token in zip(output.scheduled, sampled_token_ids):
            seq = item.seq
            if seq.is_finished:  # aborted (or stopped) while the step ran
                continue
            if item.do_sample:
                if ran_ahead:  # the sequence may have been preempted since; its placeholder is filled all the same
                    seq.token_ids[item.seq_len] = int(token)
                else:
                    seq.token_ids.append(int(token))
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.register_computed(seq)
            if item.do_sample:
                updated.append(seq)
                stop = self._check_stop(seq)
                if stop is not None:
                    self.finish(seq, *stop)
        return updated

    def _check_stop(self, seq: Sequence) -> tuple[SequenceStatus, int | None] | None:
        # vLLM V1's order: length first, then nothing before min_tokens, then EOS, then stop_token_ids.
        group, params = seq.group, seq.group.params
        if seq.num_tokens >= self.max_model_len or seq.num_output_tokens >= group.max_tokens:
            return SequenceStatus.FINISHED_LENGTH_CAPPED, None
        if seq.num_output_tokens < params.min_tokens:
            return None
        last = seq.token_ids[-1]
        if not params.ignore_eos and last in group.eos_token_ids:
            return SequenceStatus.FINISHED_STOPPED, None
        if last in params.stop_token_ids:
            return SequenceStatus.FINISHED_STOPPED, last
        return None

    def schedule(self) -> SchedulerOutput:
        step = _Step()
        for group in self.running:
            self._maybe_fork(group)
        budget = self._schedule_running(step, self.max_num_batched_tokens)
        if not step.preempted:
            budget = self._schedule_swapped(step, budget)
            if not self.swapped:
                self._schedule_waiting(step, budget)
        return SchedulerOutput(tuple(step.scheduled), tuple(step.swap_out), tuple(step.swap_in), tuple(step.copies),
                               tuple(step.preempted), step.num_tokens)

    def _maybe_fork(self, group: SequenceGroup) -> None:
        if not group.pending_fork:
            return
        leader = group.leader
        if leader.num_computed_tokens < leader.num_prompt_tokens - 1:
            return
        group.pending_fork = False
        for seq in group.unfinished_seqs():  # samples of a recomputed group adopt the re-prefilled prompt
            if seq is not leader:
                self.block_manager.fork(leader, seq)
                seq.num_computed_tokens = leader.num_computed_tokens
                seq.num_registered_blocks = leader.num_registered_blocks
        for i in range(len(group.seqs), group.params.n):  # a new group creates its samples
            child = leader.fork(i)
            self.block_manager.fork(leader, child)
            group.seqs.append(child)

    def _plan(self, seqs: list[Sequence], budget: int) -> tuple[dict[Sequence, int], int]:
        """Tokens per sequence: decodes (one token left) first, then prompt chunks in order, within budget.
        A sequence whose pending (run-ahead) token is its last by length computes nothing more."""
        left = [0 if s.num_output_tokens >= s.group.max_tokens or s.num_tokens >= self.max_model_len
                else s.num_uncomputed_tokens for s in seqs]
        plan = {}
        for seq, n in zip(seqs, left):
            if n == 1 and budget > 0:
                plan[seq] = 1
                budget -= 1
        for seq, n in zip(seqs, left):
            if n > 1 and budget > 0:
                plan[seq] = min(n, budget)
                budget -= plan[seq]
        return plan, budget

    @staticmethod
    def _group_plan(group: SequenceGroup, plan: dict[Sequence, int]) -> list[tuple[Sequence, int]]:
        return [(s, plan[s]) for s in group.seqs if s in plan]

    def _run(self, step: _Step, seq: Sequence, num_tokens: int) -> None:
        step.copies.extend(self.block_manager.allocate(seq, num_tokens))
        start = seq.num_computed_tokens
        seq.num_computed_tokens += num_tokens
        do_sample = not seq.group.pending_fork and seq.num_computed_tokens == seq.num_tokens
        step.scheduled.append(ScheduledSequence(seq, tuple(seq.token_ids[start:start + num_tokens]), start,
                                                tuple(seq.block_table), do_sample))
        step.num_tokens += num_tokens

    def _schedule_running(self, step: _Step, budget: int) -> int:
        plan, budget = self._plan([s for g in self.running for s in g.unfinished_seqs()], budget)
        i = 0
        while i < len(self.running):
            group = self.running[i]
            group_plan = self._group_plan(group, plan)
            if self.block_manager.blocks_needed(group_plan) > self.block_manager.num_free_blocks:
                # Groups before i are older and already scheduled; the newest may be this one, which ends the loop.
                self._preempt(self.running[-1], step)
                continue
            for seq, num_tokens in group_plan:
                self._run(step, seq, num_tokens)
            i += 1
        return budget

    def _preempt(self, group: SequenceGroup, step: _Step) -> None:
        self.running.remove(group)
        self.num_preemptions += 1
        step.preempted.append(group.request_id)
        seqs = group.unfinished_seqs()
        if self.preemption_mode != "recompute" and any(s.block_table for s in seqs):
            copies = self.block_manager.swap_out(seqs)
            if copies is not None:
                step.swap_out.extend(copies)
                bisect.insort(self.swapped, group, key=_arrival)
                return
        for seq in seqs:
            self.block_manager.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
        if len(seqs) > 1:  # re-share the prompt rather than re-prefill it per sample (see sequence.py)
            group.pending_fork = True
        self.waiting.appendleft(group)  # newest preempted first, so the queue front stays in arrival order

    def _num_running_seqs(self) -> int:
        return sum(g.num_seqs_reserved for g in self.running)

    def _schedule_swapped(self, step: _Step, budget: int) -> int:
        while self.swapped:
            group = self.swapped[0]
            if self._num_running_seqs() + group.num_seqs_reserved > self.max_num_seqs:
                break
            seqs = group.unfinished_seqs()
            copies = self.block_manager.swap_in(seqs)
            if copies is None:
                break
            step.swap_in.extend(copies)
            self.swapped.pop(0)
            bisect.insort(self.running, group, key=_arrival)
            planned, left = self._plan(seqs, budget)
            plan = self._group_plan(group, planned)
            if self.block_manager.blocks_needed(plan) <= self.block_manager.num_free_blocks:
                budget = left
                for seq, num_tokens in plan:
                    self._run(step, seq, num_tokens)
        return budget

    def _schedule_waiting(self, step: _Step, budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0:
            group = self.waiting[0]
            if self._num_running_seqs() + group.num_seqs_reserved > self.max_num_seqs:
                break
            seqs = group.unfinished_seqs()
            hits = [self._attach_prefix(seq) for seq in seqs]
            planned, left = self._plan(seqs, budget)
            plan = self._group_plan(group, planned)
            if bm.blocks_needed(plan) > bm.num_free_blocks:
                for seq in seqs:
                    bm.free(seq)
                    seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            budget = left
            for seq, hit in zip(seqs, hits):
                seq.status = SequenceStatus.RUNNING
                if hit is not None:  # counted once admitted, not each time a blocked queue head is looked up
                    bm.count_prefix_query(seq.num_tokens, hit)
            bisect.insort(self.running, group, key=_arrival)
            if group.num_cached_tokens is None:
                group.num_cached_tokens = hits[0] or 0
            for seq, num_tokens in plan:
                self._run(step, seq, num_tokens)

    def _attach_prefix(self, seq: Sequence) -> int | None:
        """Attach seq's cached prefix; returns the tokens hit, or None when the cache is not consulted."""
        # Prompt logprobs need the logits of every prompt position, which cached tokens would skip (as vLLM V1);
        # hidden states need the stream at every position, so such requests recompute their prefix too.
        group = seq.group
        params = group.params
        if (not self.block_manager.enable_prefix_caching or params.prompt_logprobs is not None
                or params.return_hidden_states):
            return None
        if group.pending_fork and seq is not group.leader:  # it adopts the leader's blocks instead
            return None
        # A sequence that samples next must compute at least its last token; hits are whole blocks.
        needs_logits = not group.pending_fork
        blocks = self.block_manager.lookup_prefix(seq, (seq.compute_limit - needs_logits) // self.block_size)
        self.block_manager.attach_prefix(seq, blocks)
        return len(blocks) * self.block_size

    def take_finished(self) -> list[SequenceGroup]:
        """Requests that finished (stop, length) since the last call; aborted ones are returned by abort() instead."""
        finished, self._finished = self._finished, []
        return finished

    def has_unfinished(self) -> bool:
        return bool(self._groups)

    def num_unfinished(self) -> int:
        return len(self._groups)

    def num_running(self) -> int:
        return len(self.running)

    def num_waiting(self) -> int:
        return len(self.waiting)

    def num_swapped(self) -> int:
        return len(self.swapped)

    def request_ids(self) -> list[str]:
        return list(self._groups)

    def get_group(self, request_id: str) -> SequenceGroup | None:
        return self._groups.get(request_id)

    def live_sequences(self) -> list[Sequence]:
        """Every sequence of every unfinished request (for BlockManager.assert_consistent)."""
        return [s for g in self._groups.values() for s in g.seqs]

