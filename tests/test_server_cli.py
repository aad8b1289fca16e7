"""`jaxllm serve` flags (vLLM's names and defaults, generated from EngineConfig's and ServerOptions' fields) and the
periodic stats log line."""

import dataclasses
import pathlib
import tomllib

import pytest

from jaxllm import EngineConfig, EngineStats
from jaxllm.option import option
from serving import cli
from serving.cli import make_parser, parse_args
from serving.options import ServerOptions
from serving.stats_log import format_stats_line

# API.md's flag list, each with a value where it takes one.
API_FLAGS = [
    ["--model", "m"], ["--host", "0.0.0.0"], ["--port", "9000"], ["--served-model-name", "a", "b"],
    ["--tokenizer", "t"], ["--dtype", "bfloat16"], ["--seed", "3"], ["--max-model-len", "4k"],
    ["--gpu-memory-utilization", "0.8"], ["--tensor-parallel-size", "2"], ["-tp", "2"],
    ["--max-num-batched-tokens", "4096"], ["--max-num-seqs", "8"], ["--block-size", "32"], ["--swap-space", "2"],
    ["--enforce-eager"], ["--quantization", "gguf"], ["-q", "gguf"], ["-q", "awq"], ["-q", "gptq"],
    ["-q", "awq_marlin"], ["-q", "gptq_marlin"], ["-q", "compressed-tensors"], ["-q", "fp8"],
    ["--load-format", "safetensors"],
    ["--enable-prefix-caching"], ["--no-enable-prefix-caching"], ["--max-log-len", "100"],
    ["--enable-log-requests"], ["--disable-log-stats"], ["--api-key", "k"], ["--allowed-origins", '["https://a"]'],
    ["--allowed-methods", '["GET"]'], ["--allowed-headers", '["X-A"]'], ["--allow-credentials"],
    ["--chat-template", "{{ messages }}"], ["--max-logprobs", "5"], ["--max-num-queued-reqs", "10"],
    ["--uvicorn-log-level", "warning"],
]
# The other flags of today, with their aliases, each with a value where it takes one.
MORE_FLAGS = [
    ["--kernel-backend", "xla"], ["--attention-backend", "xla"], ["--kv-cache-memory-bytes", "4M"],
    ["--allow-pickle"], ["--disable-custom-all-reduce"], ["--trust-remote-code"], ["--max-request-body-bytes", "9"],
    ["--shutdown-timeout", "1"], ["--engine-stall-timeout", "2"], ["--disable-uvicorn-access-log"],
    ["--nnodes", "1"], ["--num-nodes", "1"], ["--node-rank", "0"], ["--master-addr", "h"], ["--master-port", "1"],
    ["--headless"], ["--no-async-scheduling"], ["--no-compile-cache"], ["--no-freeze-gc"],
]


@pytest.mark.parametrize("flag", API_FLAGS + MORE_FLAGS, ids=lambda f: f[0])
def test_every_api_md_flag_is_accepted(flag):
    parse_args(flag)


def test_defaults_match_vllm_and_bind_loopback():
    config, options = parse_args([])
    assert (options.host, options.port, config.max_logprobs, config.model) == ("127.0.0.1", 8000, 20, None)
    assert options.allowed_origins is None and options.api_key is None and config.enable_prefix_caching
    assert config == EngineConfig() and options == ServerOptions()  # the flags' defaults are the fields'


def test_flags_reach_the_engine_config_and_the_server_options():
    config, options = parse_args(["some/model", "-tp", "2", "--max-model-len", "32K", "--no-enable-prefix-caching",
                                  "--served-model-name", "name", "alias", "--max-num-seqs", "8",
                                  "--max-num-queued-reqs", "4", "--attention-backend", "xla", "--dtype", "half",
                                  "--allowed-origins", '["https://a"]', "--api-key", "k", "--port", "0"])
    assert config.model == "some/model" and config.tensor_parallel_size == 2 and config.max_model_len == 32768
    assert not config.enable_prefix_caching and config.served_model_name == "name"
    assert config.max_num_seqs == 8 and config.max_num_queued_reqs == 4
    assert config.kernel_backend == "xla" and config.dtype == "half"
    assert options.served_model_name == ("name", "alias") and options.allowed_origins == ("https://a",)
    assert (options.api_key, options.port) == ("k", 0)
    assert parse_args(["--max-model-len", "4k"])[0].max_model_len == 4000  # vLLM: k = 1000, K = 1024
    assert parse_args(["--model", "m"])[0].model == "m"


def test_quantization_flag_lists_its_methods_and_refuses_others(capsys):
    assert parse_args(["-q", "awq_marlin"])[0].quantization == "awq_marlin"  # normalized where it is loaded
    assert parse_args([])[0].quantization is None  # the checkpoint's
    help_text = " ".join(make_parser().format_help().split())
    assert "-q {awq,gptq,compressed-tensors,fp8,gguf,awq_marlin,gptq_marlin}" in help_text
    with pytest.raises(SystemExit):
        parse_args(["-q", "bitsandbytes"])
    assert "invalid choice: 'bitsandbytes'" in capsys.readouterr().err


def test_every_engine_field_but_the_python_only_ones_is_a_flag():
    flags = {a.dest for a in make_parser()._actions}
    fields = {f.name for f in dataclasses.fields(EngineConfig)} | {f.name for f in dataclasses.fields(ServerOptions)}
    assert fields - flags == {"skip_tokenizer_init"}  # served_model_name is the server's list
    assert flags - fields == {"help", "model_tag"}


def test_a_new_engine_field_appears_on_the_command_line_by_itself(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class WithNewOption(EngineConfig):
        new_knob: int = option(7, help="a knob added to the engine")

    monkeypatch.setattr(cli, "EngineConfig", WithNewOption)
    assert parse_args([])[0].new_knob == 7 and parse_args(["--new-knob", "9"])[0].new_knob == 9
    assert "a knob added to the engine (default: 7)" in " ".join(make_parser().format_help().split())


def test_the_jaxllm_command_is_provided_by_serving(capsys):
    project = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"jaxllm": "serving.cli:main"}
    assert cli.main([]) == 0 and "serve [MODEL]" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2 and "usage: jaxllm" in capsys.readouterr().err


def test_conflicting_or_invalid_values_exit_with_usage(capsys):
    for argv in (["a", "--model", "b"], ["--block-size", "7"], ["--dtype", "int3"], ["--max-model-len", "lots"],
                 ["--port", "70000"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "block_size" in err and "port must be in [0, 65535], got 70000" in err


def test_chat_template_file_is_read(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert parse_args(["--chat-template", str(path)])[1].chat_template == path.read_text()


def _stats(prompt: int, generated: int, queries: int, hits: int, running: int = 0, kv: float = 0.0) -> EngineStats:
    return EngineStats(num_requests_running=running, num_requests_waiting=1, kv_cache_usage=kv,
                       prompt_tokens_total=prompt, generation_tokens_total=generated, num_preemptions_total=0,
                       prefix_cache_queries_total=queries, prefix_cache_hits_total=hits,
                       request_success_total={"stop": 1})


def test_stats_line_reports_throughput_queue_kv_and_prefix_hits():
    line = format_stats_line(_stats(100, 50, 40, 0), _stats(300, 250, 140, 25, running=3, kv=0.125), 10.0)
    assert line == ("Avg prompt throughput: 20.0 tokens/s, Avg generation throughput: 20.0 tokens/s, "
                    "Running: 3 reqs, Waiting: 1 reqs, KV cache usage: 12.5%, Prefix cache hit rate: 25.0%")
