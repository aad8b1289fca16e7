"""JAX's persistent compilation cache, on by default in a directory private to the user, so a warm start skips
XLA compilation of every bucket."""

import os
import pathlib

import jax


def default_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "jaxllm" / "xla"


def enable(directory: pathlib.Path | None = None) -> pathlib.Path:
    directory = pathlib.Path(directory or default_dir())
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)  # compiled programs are code: nobody else may plant or read them
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
