"""Multi-host: two processes on this machine, 2 CPU devices each, one model at tensor_parallel_size 4 over both
through jax.distributed. Node 0 runs LLM.generate; node 1 runs jaxllm.run_worker and replays node 0's
device operations. The outputs must be exactly the single-process ones (= Hugging Face's greedy tokens, which
TP = 1 reproduces: test_tensor_parallel), and prompt logprobs must match the golden logits."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxllm import EngineConfig
from jaxllm.runtime import kv_sizing

pytestmark = pytest.mark.server

ROOT = pathlib.Path(__file__).resolve().parents[1]
LLAMA3 = ROOT / "tests" / "fixtures" / "llama3"

NODE = r"""
import collections, json, sys
import numpy as np
import jaxllm.distributed as distributed
from jaxllm.config import EngineConfig

rank, port, fixture = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
config = dict(model=fixture, dtype="float32", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=1 << 22,
              tensor_parallel_size=4, nnodes=2, node_rank=rank, master_addr="127.0.0.1", master_port=port)
ops = collections.Counter()  # what crossed the channel, counted on both sides
send, receive = distributed.Channel.send, distributed.Channel.receive
def counting_send(self, op, meta=None, payload=None):
    ops[op] += 1
    return send(self, op, meta, payload)
def counting_receive(self):
    op, meta, payload = receive(self)
    ops[op] += 1
    return op, meta, payload
distributed.Channel.send, distributed.Channel.receive = counting_send, counting_receive

if rank == 0:
    import jax
    from jaxllm import LLM, SamplingParams
    golden = np.load(f"{fixture}/golden.npz")
    prompts = [{"prompt_token_ids": golden[f"prompt_{i}"].tolist()} for i in range(3)]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with LLM(**config) as llm:
        assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
        k0 = llm.llm_engine.runner.kv_cache.k[0]
        kv = {"global": list(k0.shape), "local": sorted(tuple(s.data.shape) for s in k0.addressable_shards)}
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        # n = 2 forks the sequence: copy-on-write of its last, shared block crosses the channel as a "copy"
        forked = llm.generate(prompts[0], SamplingParams(n=2, temperature=0, max_tokens=32, ignore_eos=True),
                              use_tqdm=False)[0]
        scored = llm.generate(prompts[2], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                              use_tqdm=False)[0]
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
              "forked": [list(c.token_ids) for c in forked.outputs],
              "prompt_logprobs": [None if lp is None else {str(t): v.logprob for t, v in lp.items()}
                                  for lp in scored.prompt_logprobs],
              "kv": kv, "ops": ops}
else:
    from jaxllm import run_worker
    run_worker(EngineConfig(**config))
    result = {"ops": ops}
print("RESULT" + json.dumps(result))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_the_single_process_output():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-c", NODE, str(rank), str(port), str(LLAMA3)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        logs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for node, (out, err) in zip(nodes, logs):
        assert node.returncode == 0, out[-2000:] + err[-6000:]
    leader, worker = (json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[6:])
                      for out, _ in logs)

    golden = np.load(LLAMA3 / "golden.npz")
    assert leader["tokens"] == [golden[f"greedy_{i}"].tolist() for i in range(3)]
    assert leader["forked"] == [golden["greedy_0"].tolist()] * 2
    # llama3 has 2 kv-heads for 4 devices: 4 cache slots, one per device, two on each host
    assert leader["kv"]["global"][0] == 4 and [s[0] for s in leader["kv"]["local"]] == [1, 1]

    prompt, logits = golden["prompt_2"], golden["logits_2"]
    top = logits.max(-1, keepdims=True)
    logprobs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    got = leader["prompt_logprobs"]
    assert got[0] is None and len(got) == len(prompt)
    for i in range(1, len(prompt)):
        assert got[i][str(prompt[i])] == pytest.approx(logprobs[i - 1, prompt[i]], abs=1e-4)

    # every device operation the leader broadcast was replayed by the worker, in kind and number
    assert leader["ops"] == worker["ops"]
    # at least 32 steps per generate call that decodes 32 tokens, one for the prompt-logprobs call
    assert leader["ops"]["close"] == 1 and leader["ops"]["copy"] >= 1 and leader["ops"]["step"] >= 32 + 32 + 1


def test_multi_node_config_is_validated():
    with pytest.raises(ValueError, match="master_addr is required with nnodes"):
        EngineConfig(nnodes=2, tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"node_rank must be in \[0, nnodes - 1\] = \[0, 1\], got 2"):
        EngineConfig(nnodes=2, node_rank=2, master_addr="10.0.0.1", tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(1\) must be >= nnodes \(2\)"):
        EngineConfig(nnodes=2, master_addr="10.0.0.1")
    config = EngineConfig(nnodes=2, node_rank=1, master_addr="10.0.0.1", tensor_parallel_size=2, swap_space=4)
    assert kv_sizing.num_cpu_blocks(config, 2**20) == 0  # preemption recomputes across hosts
    assert kv_sizing.num_cpu_blocks(EngineConfig(swap_space=4), 2**20) == 4096


def test_multinode_example_is_one_consistent_jax_distributed_job():
    """deploy/multinode: both pods run the same model over all GPUs of the group, ranks and the coordinator address
    come from LWS, and the flags build a valid EngineConfig (the server-only flags go through its own parser)."""
    import yaml

    from serving.cli import parse_args

    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy/multinode/leaderworkerset.yaml").read_text())}
    group = docs["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
    (leader,) = group["leaderTemplate"]["spec"]["containers"]
    (worker,) = group["workerTemplate"]["spec"]["containers"]
    lws_env = {"LWS_GROUP_SIZE": str(group["size"]), "LWS_LEADER_ADDRESS": "jaxllm-70b-0.jaxllm-70b"}

    def flags(container, index: int) -> dict[str, str]:
        env = dict(lws_env, LWS_WORKER_INDEX=str(index), JAXLLM_API_KEY="k")
        args = [env.get(a[2:-1], a) if a.startswith("$(") else a for a in container["args"]]
        return dict(zip(args[::2], args[1::2]))

    gpus = int(leader["resources"]["limits"]["nvidia.com/gpu"])
    configs = []
    for container, index in ((leader, 0), (worker, 1)):
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == gpus
        # Every container arg goes through the server's own parser, multi-node flags included.
        configs.append(parse_args([a for kv in flags(container, index).items() for a in kv])[0])
    lead, work = configs
    assert (lead.node_rank, work.node_rank) == (0, 1) and lead.nnodes == work.nnodes == group["size"]
    assert lead.tensor_parallel_size == work.tensor_parallel_size == gpus * group["size"]  # tp spans every GPU
    assert lead.model == work.model and lead.master_addr == work.master_addr == lws_env["LWS_LEADER_ADDRESS"]
    coordinator = {p["name"]: p["containerPort"] for p in leader["ports"]}["coordinator"]
    assert lead.master_port == work.master_port == coordinator

    # The worker serves no HTTP and has no port or key.
    _, options = parse_args([a for kv in flags(leader, 0).items() for a in kv])
    assert options.port == {p["name"]: p["containerPort"] for p in leader["ports"]}["http"]
    assert options.host == "0.0.0.0"
    assert "--port" not in flags(worker, 1) and "--api-key" not in flags(worker, 1)
    assert docs["Service"]["spec"]["selector"]["role"] == group["leaderTemplate"]["metadata"]["labels"]["role"]
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadOnlyMany"]  # both hosts read the weights
