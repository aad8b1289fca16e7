"""benchmarks/research_cost.py runs end to end on CPU with the tiny llama3 fixture, so it cannot rot before its GPU
run: every mode is timed and the ratios are to the plain step."""

from benchmarks import research_cost
from conftest import FIXTURES


def test_research_cost_benchmark_times_every_mode(tmp_path, capsys):
    result = research_cost.main([
        "--model", str(FIXTURES / "llama3"), "--load-format", "auto", "--dtype", "float32", "--batch", "4",
        "--context", "24", "--decode-steps", "3", "--rounds", "1", "--max-model-len", "128",
        "--max-num-batched-tokens", "64", "--output-json", str(tmp_path / "cost.json")])
    modes = ("plain", "hidden_one_layer", "hidden_all_layers", "steer_one_layer")
    assert tuple(result["decode_step_s"]) == modes
    assert all(result["decode_step_s"][m] > 0 for m in modes) and result["ratio_to_plain"]["plain"] == 1.0
    assert (tmp_path / "cost.json").exists() and "steer_one_layer" in capsys.readouterr().out
