"""`jaxllm serve` flags (vLLM's names and defaults, mapped onto EngineConfig) and the periodic stats log line."""

import pytest

from jaxllm import EngineStats
from serving.cli import engine_config, parse_args
from serving.stats_log import format_stats_line

# API.md's flag list, each with a value where it takes one.
API_FLAGS = [
    ["--model", "m"], ["--host", "0.0.0.0"], ["--port", "9000"], ["--served-model-name", "a", "b"],
    ["--tokenizer", "t"], ["--dtype", "bfloat16"], ["--seed", "3"], ["--max-model-len", "4k"],
    ["--gpu-memory-utilization", "0.8"], ["--tensor-parallel-size", "2"], ["-tp", "2"],
    ["--max-num-batched-tokens", "4096"], ["--max-num-seqs", "8"], ["--block-size", "32"], ["--swap-space", "2"],
    ["--enforce-eager"], ["--quantization", "gguf"], ["-q", "gguf"], ["--load-format", "safetensors"],
    ["--enable-prefix-caching"], ["--no-enable-prefix-caching"], ["--max-log-len", "100"],
    ["--enable-log-requests"], ["--disable-log-stats"], ["--api-key", "k"], ["--allowed-origins", '["https://a"]'],
    ["--allowed-methods", '["GET"]'], ["--allowed-headers", '["X-A"]'], ["--allow-credentials"],
    ["--chat-template", "{{ messages }}"], ["--max-logprobs", "5"], ["--max-num-queued-reqs", "10"],
    ["--uvicorn-log-level", "warning"],
]


@pytest.mark.parametrize("flag", API_FLAGS, ids=lambda f: f[0])
def test_every_api_md_flag_is_accepted(flag):
    parse_args(flag)


def test_defaults_match_vllm_and_bind_loopback():
    args = parse_args([])
    assert (args.host, args.port, args.max_logprobs, args.model) == ("127.0.0.1", 8000, 20, None)
    assert args.allowed_origins is None and args.api_key is None and args.enable_prefix_caching


def test_flags_reach_the_engine_config():
    args = parse_args(["some/model", "-tp", "2", "--max-model-len", "32K", "--no-enable-prefix-caching",
                       "--served-model-name", "name", "--max-num-seqs", "8", "--max-num-queued-reqs", "4"])
    config = engine_config(args)
    assert config.model == "some/model" and config.tensor_parallel_size == 2 and config.max_model_len == 32768
    assert not config.enable_prefix_caching and config.served_model_name == "name"
    assert config.max_num_seqs == 8 and config.max_num_queued_reqs == 4
    assert parse_args(["--max-model-len", "4k"]).max_model_len == 4000  # vLLM: k = 1000, K = 1024


def test_conflicting_or_invalid_values_exit_with_usage(capsys):
    for argv in (["a", "--model", "b"], ["--block-size", "7"], ["--dtype", "int3"], ["--max-model-len", "lots"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2
    assert "block_size" in capsys.readouterr().err


def test_chat_template_file_is_read(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert parse_args(["--chat-template", str(path)]).chat_template == path.read_text()


def _stats(prompt: int, generated: int, queries: int, hits: int, running: int = 0, kv: float = 0.0) -> EngineStats:
    return EngineStats(num_requests_running=running, num_requests_waiting=1, kv_cache_usage=kv,
                       prompt_tokens_total=prompt, generation_tokens_total=generated, num_preemptions_total=0,
                       prefix_cache_queries_total=queries, prefix_cache_hits_total=hits,
                       request_success_total={"stop": 1})


def test_stats_line_reports_throughput_queue_kv_and_prefix_hits():
    line = format_stats_line(_stats(100, 50, 40, 0), _stats(300, 250, 140, 25, running=3, kv=0.125), 10.0)
    assert line == ("Avg prompt throughput: 20.0 tokens/s, Avg generation throughput: 20.0 tokens/s, "
                    "Running: 3 reqs, Waiting: 1 reqs, KV cache usage: 12.5%, Prefix cache hit rate: 25.0%")
