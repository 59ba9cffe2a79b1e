"""``mimco``: the command line, its commands gathered by purpose from :mod:`mimco.cli.train`,
:mod:`mimco.cli.probe` and :mod:`mimco.cli.tools`. User errors (:class:`~mimco.errors.MimcoError`) print one line
and exit with code 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

from mimco.distributed import destroy
from mimco.errors import MimcoError, message
from mimco.plugins import load_file, load_plugins


def _modules() -> list[Any]:
    """The command modules, in the order ``mimco --help`` lists them."""
    return [importlib.import_module(f"mimco.cli.{m}") for m in ("train", "probe", "tools")]


def handlers() -> dict[str, Callable[[argparse.Namespace], int]]:
    """Every subcommand of :func:`build_parser` and the function that runs it."""
    return {name: fn for mod in _modules() for name, fn in mod.HANDLERS.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimco", description="MimCo pre-training: MoCo v3 teacher, then masked image "
                                                          "modeling against it.")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="a Python file that registers a method (and its config section), e.g. examples/simsiam.py; "
                        "may come anywhere on the line, and more than once (installed plugins load by themselves)")
    sub = p.add_subparsers(dest="command", required=True)
    for mod in _modules():
        mod.add_parsers(sub)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as :func:`main` reads it (argparse exits with code 2 on a bad one)."""
    parser = build_parser()
    argv, plugins = _plugin_files(list(sys.argv[1:] if argv is None else argv))
    args, extra = parser.parse_known_args(argv)
    args.plugin = [*args.plugin, *plugins]
    # key=value overrides may come after options too (argparse stops collecting positionals at the first option)
    if unknown := [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _plugin_files(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` without its ``--plugin FILE`` / ``--plugin=FILE`` pairs after the subcommand, and those files."""
    rest, files = argv[:1], []
    after = iter(argv[1:])
    for a in after:
        if a.startswith("--plugin="):
            files.append(a.split("=", 1)[1])
        elif a == "--plugin" and (path := next(after, None)) is not None:
            files.append(path)
        else:
            rest.append(a)
    return rest, files


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        load_plugins()
        for path in args.plugin:
            load_file(path)
        return handlers()[args.command](args)
    except MimcoError as e:
        print(f"mimco: error: {message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mimco: interrupted", file=sys.stderr)
        return 130
    finally:
        destroy()


if __name__ == "__main__":
    raise SystemExit(main())
