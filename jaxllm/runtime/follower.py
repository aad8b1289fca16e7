"""Nodes 1.. of a multi-node run: a ModelRunner that replays node 0's device operations, received over
jaxllm.distributed's Channel, until node 0 closes its engine. Followers never schedule.

    node 1:  jaxllm.run_worker(EngineConfig(model, tensor_parallel_size=8, nnodes=2, node_rank=1,
                                            master_addr="10.0.0.1"))
"""

import dataclasses
import logging

import jax
import numpy as np

from jaxllm import distributed
from jaxllm.config import EngineConfig
from jaxllm.default_model import default_model_path
from jaxllm.runtime import inputs, transfer
from jaxllm.runtime.buckets import BatchLayout
from jaxllm.runtime.runner import ModelRunner
from jaxllm.runtime.sampler import SamplingMetadata

logger = logging.getLogger(__name__)


def run_worker(config: EngineConfig) -> None:
    """Node 1..: join the leader's jax.distributed job, load this host's shards and run the leader's steps until
    it closes its engine. Blocks; returns when the leader shuts down."""
    if config.node_rank == distributed.LEADER:
        raise ValueError("run_worker is for node_rank >= 1; node 0 runs the engine (LLM or the server)")
    distributed.initialize_from_config(config)
    runner = ModelRunner(config, config.model or default_model_path())
    logger.info("node %d: following node 0's steps", config.node_rank)
    follow(runner)


def follow(runner: ModelRunner) -> None:
    """Replay the leader's device operations on `runner` until it closes."""
    assert runner.channel is not None and not distributed.is_leader()
    while True:
        op, meta, payload = runner.channel.receive()
        if op == "step":
            runner.device_step(*decode_step(meta, payload))
        elif op == "copy":
            runner.copy_blocks([tuple(pair) for pair in meta["pairs"]])
        elif op == "close":
            runner.close()
            return
        else:
            raise RuntimeError(f"unknown operation {op!r} from the leader")


def decode_step(meta: dict, payload: np.ndarray):
    """A "step" message (ModelRunner.dispatch sends it) -> ModelRunner.device_step's arguments."""
    layout = BatchLayout(*meta["layout"])
    static = meta["sampling"]
    placeholders = {f.name: 0 for f in dataclasses.fields(SamplingMetadata) if f.name not in static}
    treedef = jax.tree_util.tree_structure(SamplingMetadata(**placeholders, **static))
    leaves = tuple((tuple(shape), dtype) for shape, dtype in meta["leaves"])
    sampling_layout = transfer.PackedLayout(treedef, leaves)
    cuts = np.cumsum([inputs.buffer_size(layout), sampling_layout.size])
    step_inputs, sampling, rest = np.split(payload, cuts)
    rows = tuple(np.split(rest, [layout.num_seqs])) if meta["k"] is not None else ()
    return layout, step_inputs, sampling, sampling_layout, meta["k"], rows
