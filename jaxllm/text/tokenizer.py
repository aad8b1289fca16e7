"""The engine's tokenizer: HF `tokenizer.json` directories and GGUF checkpoints behind one small interface.

A GGUF file is read once, by the loader (`jaxllm.loading.load_tokenizer`), which hands its checkpoint to `from_gguf`.

Only the `tokenizers` library is used (no transformers, no torch); behaviour follows transformers' fast tokenizers:
the tokenizer.json post-processor adds BOS/EOS unless tokenizer_config.json sets add_bos_token / add_eos_token,
which then rebuild it, and `skip_special_tokens` drops the added tokens marked special.
"""

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers

from jaxllm.text.chat_template import render_chat_template


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | dict[str, str] | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ):
        self.backend = backend
        # Named templates ({"default": ..., "tool_use": ...}) are how tokenizer_config.json stores several.
        self.chat_templates = chat_template if isinstance(chat_template, dict) else {"default": chat_template}
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.bos_token_id = self._id(bos_token)
        self.eos_token_id = self._id(eos_token)
        self.pad_token_id = self._id(pad_token)
        self.eos_token_ids = frozenset(
            {i for i in extra_eos_token_ids if i is not None} | ({self.eos_token_id} - {None})
        )
        named = {self.bos_token_id, self.eos_token_id, self._id(unk_token), self.pad_token_id} - {None}
        flagged = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.all_special_ids = sorted(named | flagged)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """An HF model directory (tokenizer.json); for a .gguf file, use `jaxllm.loading.load_tokenizer`."""
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise FileNotFoundError(
                f"no tokenizer.json in {path!r}: jaxllm needs a fast-tokenizer file (slow sentencepiece-only "
                "tokenizers are not supported) or a .gguf file (jaxllm.loading.load_tokenizer)"
            )
        return cls._from_hf_dir(path)

    @classmethod
    def from_gguf(cls, checkpoint) -> "Tokenizer":
        """From a `jaxllm.loading.gguf.GGUFCheckpoint` (its tokenizer was rebuilt from the file's metadata)."""
        return cls(
            checkpoint.tokenizer,
            chat_template=checkpoint.chat_template,
            bos_token=checkpoint.bos_token,
            eos_token=checkpoint.eos_token,
            unk_token=checkpoint.unk_token,
            pad_token=checkpoint.pad_token,
            extra_eos_token_ids=checkpoint.eos_token_ids,
        )

    @classmethod
    def _from_hf_dir(cls, path: str) -> "Tokenizer":
        backend = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        model_config = _read_json(os.path.join(path, "config.json"))
        generation_config = _read_json(os.path.join(path, "generation_config.json"))

        _register_added_tokens(backend, config)
        names = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            names[key] = _token_content(config.get(key))
            if names[key] is None and model_config.get(f"{key}_id") is not None:
                names[key] = backend.id_to_token(_first_id(model_config[f"{key}_id"]))
        if "add_bos_token" in config or "add_eos_token" in config:
            bos, eos = names["bos_token"], names["eos_token"]
            backend.post_processor = template_post_processor(
                bool(config.get("add_bos_token")), bos, _token_id(backend, bos),
                bool(config.get("add_eos_token")), eos, _token_id(backend, eos),
            )  # fmt: skip
        eos_ids = generation_config.get("eos_token_id", model_config.get("eos_token_id"))
        eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
        return cls(backend, chat_template=_chat_template(path, config), extra_eos_token_ids=eos_ids, **names)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (HF's `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text. Encode it with `add_special_tokens=False`: the template already wrote BOS if wanted.

        `chat_template` is either template text or the name of one of the model's named templates.
        """
        if chat_template is not None:
            template = self.chat_templates.get(chat_template, chat_template)
        else:
            template = self.chat_templates.get("tool_use") if tools else None
            template = template or self.chat_templates.get("default")
        if not template:
            raise ValueError(
                "this model's tokenizer has no chat template; pass one with chat_template= (--chat-template) "
                "or use completions instead of chat"
            )
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                     "unk_token": self.unk_token, "pad_token": self.pad_token, **kwargs}  # fmt: skip
        return render_chat_template(
            template, messages, add_generation_prompt=add_generation_prompt, tools=tools, documents=documents,
            **variables,
        )  # fmt: skip

    def _id(self, token: str | None) -> int | None:
        return _token_id(self.backend, token)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value) -> str | None:
    # tokenizer_config.json writes special tokens as a string or as an AddedToken dict.
    return value.get("content") if isinstance(value, dict) else value


def _token_id(backend: tokenizers.Tokenizer, token: str | None) -> int | None:
    return None if token is None else backend.token_to_id(token)


def _first_id(value):
    return value[0] if isinstance(value, list) else value


def _register_added_tokens(backend: tokenizers.Tokenizer, config: dict) -> None:
    """Tokens that tokenizer_config.json declares but tokenizer.json lacks, with their special flag."""
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    for spec in config.get("added_tokens_decoder", {}).values():
        if spec["content"] in known:
            continue
        flags = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in spec}
        token = tokenizers.AddedToken(spec["content"], **flags)
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])


def _chat_template(path: str, config: dict) -> str | dict[str, str] | None:
    """tokenizer_config.json's chat_template (text or a list of named ones), else chat_template.jinja / .json."""
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}
    if template is None and os.path.isfile(os.path.join(path, "chat_template.jinja")):
        with open(os.path.join(path, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    if template is None:
        template = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
    return template


def template_post_processor(
    add_bos: bool, bos: str | None, bos_id: int | None, add_eos: bool, eos: str | None, eos_id: int | None
) -> tokenizers.processors.TemplateProcessing:
    """transformers' `update_post_processor`: BOS/EOS around each sequence as the add_* flags say."""
    add_bos, add_eos = add_bos and bos_id is not None, add_eos and eos_id is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    specials = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos and eos != bos else [])
    return tokenizers.processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

