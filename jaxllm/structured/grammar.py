"""StructuredOutputsParams -> one llguidance grammar string (the field it came from names its errors)."""

import json
import re

import llguidance

from jaxllm.sampling_params import StructuredOutputsParams

# Any JSON object: the schema json_object means.
_ANY_OBJECT = {"type": "object"}
# Compact JSON (no whitespace between tokens beyond single separators): a model cannot spend its max_tokens on
# blank runs the grammar would allow forever.
_JSON_OPTIONS = {"whitespace_flexible": False}


def to_grammar(so: StructuredOutputsParams) -> tuple[str, str]:
    """-> (field name, llguidance grammar). Raises ValueError naming the field when it cannot be read at all."""
    if so.json is not None:
        schema = so.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(schema).__name__}.")
        try:
            return "json", llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"structured_outputs.json: {e}") from None
    if so.json_object:
        return "json_object", llguidance.LLMatcher.grammar_from_json_schema(_ANY_OBJECT, defaults=_JSON_OPTIONS)
    if so.regex is not None:
        return "regex", llguidance.LLMatcher.grammar_from_regex(so.regex)
    if so.choice is not None:
        # A regex alternation of the escaped choices: exactly one of them, nothing else.
        return "choice", llguidance.LLMatcher.grammar_from_regex("|".join(f"({re.escape(c)})" for c in so.choice))
    assert so.grammar is not None, "StructuredOutputsParams checks that one kind is set"
    return "grammar", llguidance.LLMatcher.grammar_from_lark(so.grammar)
