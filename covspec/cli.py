"""The ``covspec`` command.

Each subcommand is one small function decorated with :func:`command`: it receives the subparsers object, adds its
parser and sets ``handler`` to a function ``(args) -> int``. Commands that take an experiment config call
:func:`add_config_arguments` and :func:`config_from_args` for the shared ``[CONFIG] [key=value ...]`` pattern::

    @command
    def _generate(commands: Subparsers) -> None:
        parser = commands.add_parser("generate", help="answer one question about one image")
        parser.add_argument("--image", required=True)
        add_config_arguments(parser)
        parser.set_defaults(handler=_run_generate)

User errors (:class:`~covspec.errors.CovspecError`) print one line ``covspec: error: ...`` and exit 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from covspec.config import Config, config_to_yaml, load_config
from covspec.errors import CovspecError, InputError

__all__ = [
    "add_config_arguments", "build_parser", "command", "config_from_args", "main", "pipeline_main",
    "split_config_args",
]  # fmt: skip

Subparsers = Any  # argparse._SubParsersAction, whose name is private
Handler = Callable[[argparse.Namespace], int | None]

_COMMANDS: list[Callable[[Subparsers], None]] = []


def command(register: Callable[[Subparsers], None]) -> Callable[[Subparsers], None]:
    """Decorator: adds a subcommand registration function; subcommands appear in definition order."""
    _COMMANDS.append(register)
    return register


def split_config_args(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """Splits ``[CONFIG] [key=value ...]``: the first item is a config file if it contains no ``=``.

    Raises:
        InputError: a later item is not ``key=value``.
    """
    items = list(items)
    path = items.pop(0) if items and "=" not in items[0] else None
    for item in items:
        if "=" not in item:
            hint = "only one config file is read" if path is not None else "the config file must come first"
            raise InputError(f"expected key=value, got {item!r} ({hint})")
    return path, items


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the positional ``[CONFIG] [key=value ...]`` arguments (read back by :func:`config_from_args`)."""
    parser.add_argument(
        "config_args",
        nargs="*",
        metavar="CONFIG|KEY=VALUE",
        help="an optional YAML config file, then key=value overrides with dotted keys (e.g. data.limit=5)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config named by the arguments that :func:`add_config_arguments` added."""
    path, overrides = split_config_args(args.config_args)
    return load_config(path, overrides)


@command
def _config(commands: Subparsers) -> None:
    parser = commands.add_parser("config", help="inspect configurations")
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print the resolved configuration as YAML")
    add_config_arguments(show)
    show.set_defaults(handler=_config_show)


def _config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(config_to_yaml(config_from_args(args)))
    return 0


def _version() -> str:
    try:
        return version("covspec")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="covspec", description="Device-edge collaborative speculative decoding for vision-language models."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for register in _COMMANDS:
        register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv`` (default: ``sys.argv[1:]``) and returns the exit status.

    Exit status: 0 success, 2 user error (bad arguments, config or input), 130 interrupted.
    """
    _register_commands()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help, --version (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.handler(args) or 0)
    except CovspecError as err:
        if args.debug:
            raise
        message = " ".join(str(err).split("\n")) or type(err).__name__
        print(f"covspec: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("covspec: interrupted", file=sys.stderr)
        return 130


def pipeline_main(name: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorates a ``python -m pipelines.NAME`` entry point with the CLI's error contract: a user error
    (:class:`~covspec.errors.CovspecError`: bad config, missing checkpoint, bad input) prints one line
    ``NAME: error: ...`` and returns 2, Ctrl-C returns 130; ``COVSPEC_DEBUG=1`` re-raises with the traceback."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except CovspecError as err:
                if os.environ.get("COVSPEC_DEBUG") == "1":
                    raise
                message = " ".join(str(err).split("\n")) or type(err).__name__
                print(f"{name}: error: {message}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(f"{name}: interrupted", file=sys.stderr)
                return 130

        return run

    return wrap


def _register_commands() -> None:
    """Imports the modules whose subcommands register themselves with :func:`command`."""
    import covspec.cluster.commands
    import covspec.commands  # noqa: F401
    import tune.commands  # noqa: F401


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's, so commands registered from other modules
    # (into covspec.cli's registry) are present under `python -m covspec.cli` too.
    from covspec.cli import main as _main

    sys.exit(_main())


def start_progress(progress) -> None:
    """Starts a Rich ``progress`` at its first use (not before the work begins), so that an error before it prints
    its one line only."""
    if not progress.live.is_started:
        progress.start()


def stop_progress(progress) -> None:
    """Stops ``progress`` if it started: Rich prints a blank line when a progress that never started is stopped."""
    if progress.live.is_started:
        progress.stop()
