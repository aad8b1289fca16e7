"""The `jaxllm` command: `jaxllm serve [MODEL] [flags]` (the OpenAI-compatible server) and `jaxllm bench ...`.

The flags are generated from the fields of EngineConfig and ServerOptions (help, choices, spellings in their
metadata, jaxllm/option.py), so a new engine option is a flag with no edit here. `python -m serving.api_server
--model MODEL [flags]` is the same server. `make_parser()` is also what the deployment tests run the Kubernetes
container args through, so the manifests cannot drift from the flags.
"""

import argparse
import dataclasses
import os
import sys
import types
import typing

from jaxllm import EngineConfig
from jaxllm.option import option_of
from serving.options import ServerOptions

_USAGE = "usage: jaxllm {serve,bench} ...\n  serve [MODEL] [flags]   OpenAI-compatible server (see --help)\n"
_GROUPS = {"server": "server", "engine": "engine",
           "multi-host": "multi-host (one model over several machines; -tp counts all their devices)"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE, end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "bench":
        from benchmarks.cli import main as bench  # the benchmarks ship beside the server; only `bench` loads them

        return bench(rest)
    print(_USAGE, end="", file=sys.stderr)
    return 2


def serve(argv: list[str]) -> int:
    engine_config, options = parse_args(argv)
    from serving.server import run  # uvicorn and fastapi are the optional [serve] extra: `jaxllm bench` needs neither

    return run(engine_config, options)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm serve", description="OpenAI-compatible server for jaxllm "
                                     "(vLLM's flags).")
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="model directory or .gguf file (same as --model)")
    groups = {name: parser.add_argument_group(title) for name, title in _GROUPS.items()}
    for cls in (ServerOptions, EngineConfig):
        for field in dataclasses.fields(cls):
            _add_flag(groups, field)
    return parser


def parse_args(argv: list[str]) -> tuple[EngineConfig, ServerOptions]:
    """argv -> the engine's config and the server's options; bad values exit 2 with the usage and the reason."""
    parser = make_parser()
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(parser.parse_args(argv)).items()}
    model_tag = values.pop("model_tag")
    if model_tag and values["model"] and model_tag != values["model"]:
        parser.error(f"the model is given twice: {model_tag!r} and --model {values['model']!r}")
    values["model"] = values["model"] or model_tag
    server = {f.name: values.pop(f.name) for f in dataclasses.fields(ServerOptions)}
    if server["chat_template"] and os.path.isfile(server["chat_template"]):
        with open(server["chat_template"], encoding="utf-8") as f:
            server["chat_template"] = f.read()
    try:
        options = ServerOptions(**server)
        names = options.served_model_name
        return EngineConfig(**values, served_model_name=names[0] if names else None), options
    except ValueError as exc:
        parser.error(str(exc))


def _add_flag(groups: dict[str, argparse._ArgumentGroup], field: dataclasses.Field) -> None:
    opt = option_of(field)
    if not opt.cli:
        return
    names = [_flag(field.name), *opt.flags, *map(_flag, opt.aliases)]
    shown = field.default is not None and field.default is not False
    kwargs = {"dest": field.name, "default": field.default,
              "help": f"{opt.help or ''}{' (default: %(default)s)' if shown else ''}".strip() or None}
    if field.type is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if field.default else "store_true"
    else:
        kwargs.update(type=opt.type or _value_type(field.type), choices=opt.choices, nargs=opt.nargs)
    groups[opt.group].add_argument(*names, **kwargs)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_type(annotation) -> type:
    """`int | None` -> int: what the flag's text parses into."""
    if isinstance(annotation, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


if __name__ == "__main__":
    sys.exit(main())
