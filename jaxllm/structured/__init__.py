"""Constrained decoding with llguidance: grammars from the request's structured_outputs, a matcher per sample, and
the packed next-token bitmask the on-device sampler applies."""
