"""A servable directory for dummy-weight benchmarks: a model config plus a synthetic word-level tokenizer with the
config's vocabulary size (token i is the word "w<i>"), so the server can run real OpenAI requests on random weights
without any download. Written to a temporary directory at benchmark time, never committed."""

import json
import pathlib
import shutil

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def make_model_dir(config_dir: str, out_dir: str) -> str:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(pathlib.Path(config_dir) / "config.json", out / "config.json")
    config = json.loads((out / "config.json").read_text())
    vocab = {f"w{i}": i for i in range(config["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(str(out / "tokenizer.json"))
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"w{eos}", "bos_token": "w0"}))
    return str(out)
