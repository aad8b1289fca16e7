"""Multi-host transport: joining jax.distributed, and the leader -> followers channel of device operations.

Every process runs the same SPMD programs (the jitted step over a mesh spanning all hosts), and XLA's collectives
need each process to launch the same program, with the same inputs, in the same order. So node 0 (the leader) owns
the engine: it schedules, packs every device operation into int32 arrays and broadcasts it; nodes 1.. (followers)
own only a ModelRunner, run each operation as it arrives and never schedule (runtime/follower.py). An operation
travels as a JSON header plus an int32 payload (`Channel`), never as a pickle.

    node 0:  LLM(model, tensor_parallel_size=8, nnodes=2, node_rank=0, master_addr="10.0.0.1")   # or the server
    node 1:  jaxllm.run_worker(EngineConfig(model, tensor_parallel_size=8, nnodes=2, node_rank=1,
                                            master_addr="10.0.0.1"))
"""

import json
import logging

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

LEADER = 0
_HEADER_SIZE = 3  # json bytes, payload ints, padded body ints


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               local_device_ids=None) -> None:
    """jax.distributed.initialize, once per process, before anything touches a device.

    `coordinator_address` is "host:port" of process 0, which runs the coordinator service. A second call with the
    same arguments does nothing. CPU devices use the gloo collectives (jax's CPU default since 0.4.3x; set here in
    case the environment turned them off); GPUs use NCCL whatever that option says.
    """
    if jax.distributed.is_initialized():
        if (jax.process_count(), jax.process_index()) != (num_processes, process_id):
            raise RuntimeError(f"jax.distributed is already initialized as process {jax.process_index()} of "
                               f"{jax.process_count()}, not {process_id} of {num_processes}")
        return
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logger.info("jax.distributed: process %d of %d, coordinator %s", process_id, num_processes,
                coordinator_address)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)


def initialize_from_config(config) -> None:
    """From an EngineConfig's vLLM-named fields (nnodes, node_rank, master_addr, master_port); a no-op on one node."""
    if config.nnodes > 1:
        initialize(f"{config.master_addr}:{config.master_port}", config.nnodes, config.node_rank)


def is_leader() -> bool:
    return jax.process_index() == LEADER


class Channel:
    """Leader -> followers broadcast of (op, meta, payload): `meta` JSON-able, `payload` i32[n].

    Two collective broadcasts per message (a fixed-size header, then the body padded to a power of two so the
    broadcast compiles for few shapes). Every process must call send (the leader) or receive (the others) in the
    same order: the broadcast is itself a collective over every device of every process.
    """

    def send(self, op: str, meta: dict | None = None, payload: np.ndarray | None = None) -> None:
        assert is_leader(), "only the leader sends"
        self._exchange(op, meta or {}, np.zeros(0, np.int32) if payload is None else payload)

    def receive(self) -> tuple[str, dict, np.ndarray]:
        assert not is_leader(), "the leader does not receive"
        return self._exchange("", {}, np.zeros(0, np.int32))

    @staticmethod
    def _exchange(op: str, meta: dict, payload: np.ndarray) -> tuple[str, dict, np.ndarray]:
        text = np.frombuffer(json.dumps({"op": op, **meta}).encode(), np.uint8)
        text_ints = -(-len(text) // 4)
        body_size = 1 << (text_ints + payload.size).bit_length()
        header = multihost_utils.broadcast_one_to_all(np.array([len(text), payload.size, body_size], np.int32))
        text_len, payload_size, body_size = (int(x) for x in header)
        text_ints = -(-text_len // 4)
        body = np.zeros(body_size, np.int32)
        if is_leader():
            padded = np.zeros(text_ints * 4, np.uint8)
            padded[:len(text)] = text
            body[:text_ints] = padded.view(np.int32)
            body[text_ints:text_ints + payload.size] = payload
        body = multihost_utils.broadcast_one_to_all(body)
        message = json.loads(body[:text_ints].view(np.uint8)[:text_len].tobytes())
        return message.pop("op"), message, body[text_ints:text_ints + payload_size].copy()

