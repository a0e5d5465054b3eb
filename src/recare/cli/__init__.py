"""The `recare` command line: parses arguments, builds configs, calls the library.

Every subcommand is a thin wrapper: `_add_<name>` declares its arguments, `_run_<name>`
loads models (through recare.models) and calls one library function. User errors
(RecareError) are printed as one line without a traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from recare import __version__
from recare.cli.careset import _add_careset
from recare.cli.common import Formatter
from recare.cli.eval import _add_eval
from recare.cli.export import _add_export
from recare.cli.generate import _add_generate
from recare.cli.guard import Parser, command_guard, error_line, print_error
from recare.cli.train import _add_run, _add_train
from recare.cli.world import _add_demo, _add_synthetic
from recare.errors import RecareError

logger = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# ----------------------------------------------------------------------------- main


COMMANDS: tuple[Callable, ...] = (_add_generate, _add_careset, _add_eval, _add_train, _add_run, _add_export,
                                  _add_synthetic, _add_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="recare", formatter_class=Formatter,
                    description="ReCARE concept erasure for Stable Diffusion (ICLR 2026).")
    parser.add_argument("--version", action="version", version=f"recare {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS,
                        help="DEBUG also shows the libraries' own progress bars and notices")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for command in _leaf_parsers(parser):  # `recare train ... --log-level DEBUG` works too
        command.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                             help="as `recare --log-level`")
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of the commands (those without subcommands of their own)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    children = [child for action in subs for child in dict.fromkeys(action.choices.values())]
    return [leaf for child in children for leaf in _leaf_parsers(child)]


def _quiet_libraries(level: str) -> None:
    """transformers' and diffusers' own progress bars and notices (weight loading, embedding resizes)
    only at DEBUG; recare's progress bars stay."""
    if level == "DEBUG":
        return
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit status 0, 2 (user error: one `recare: error:` line), 130 (interrupted)."""
    from recare.interrupts import signal_handlers

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help / --version (0) or a bad argument (2, one line already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    _quiet_libraries(args.log_level)
    try:
        with signal_handlers(), command_guard(args):
            return args.run(args)
    except RecareError as err:
        print_error(str(err))
        return 2
    except OSError as err:  # the operating system refused a read or write that no check foresaw
        print_error(error_line(err))
        return 2
    except KeyboardInterrupt:
        print_error("interrupted; every file already written is complete: rerun the same command to continue "
                    "(training: add --resume)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
