"""What every command goes through: argument errors, checks before work, output locks, OS errors.

- `Parser`: argparse errors become one `recare: error: ...` line, exit status 2.
- `command_guard(args)`: before the command's work starts, the device is validated, a command
  that does not shard refuses to run under several processes, and every output the command
  declared (`set_defaults(outputs=(("out", "folder"), ...))`) is checked (not a file where a
  folder goes, writable) and locked against a second writer; temporaries that an interrupted
  earlier run left there are removed.
- `error_line(err)`: the one line an OSError that escaped the library becomes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator, NoReturn

from recare.errors import RecareError

logger = logging.getLogger(__name__)


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one `recare: error:` line (exit status 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"recare: error: {message} (see `{self.prog} --help`)\n")


def at_least(low: int):
    """argparse type: an int >= `low` ("must be >= 1, got 0" otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def claim_output(stack: contextlib.ExitStack, path: str | Path, kind: str, rank: int = 0) -> Path:
    """Check `path` as an output `kind` ('file'/'folder'), lock it for the stack's lifetime, clear stale temporaries."""
    from recare.io import check_output_path, output_lock, remove_stale_temporaries

    path = check_output_path(path, kind)
    stack.enter_context(output_lock(path, rank))
    if rank == 0:
        if kind == "folder":
            remove_stale_temporaries(path)
        else:
            remove_stale_temporaries(path.parent, name=path.name)
    return path


@contextlib.contextmanager
def command_guard(args: argparse.Namespace) -> Iterator[None]:
    """The checks and locks above around one command (see the module docstring)."""
    from recare.generate.sharding import shard_info_from_env
    from recare.models.precision import check_device

    if getattr(args, "device", None) is not None:
        check_device(args.device)
    shard = shard_info_from_env()
    if shard.distributed and not getattr(args, "shards", False):
        raise RecareError(f"`recare {args.command}` does not shard over processes, and this is rank {shard.rank} "
                          f"of {shard.world_size} (WORLD_SIZE is set by torchrun / accelerate launch): run it as "
                          "one process; `eval all` and `eval robustness` shard")
    with contextlib.ExitStack() as stack:
        for dest, kind in getattr(args, "outputs", ()):
            path = getattr(args, dest, None)
            if path is not None:
                claim_output(stack, path, kind, shard.rank)
        yield


def error_line(err: OSError) -> str:
    """An OSError as one line: the path and the operating system's reason."""
    reason = err.strerror or str(err)
    where = err.filename if err.filename is not None else "a file"
    return f"cannot access {where}: {reason}"


def print_error(text: str) -> None:
    print(f"recare: error: {text}", file=sys.stderr)
