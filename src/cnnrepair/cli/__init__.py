"""The ``cnnrepair`` command: it parses, calls the library and prints, nothing more.

``common`` (progress bars, messages, the :class:`Command` record), ``model`` (the commands on model
files: points, repair, verify, evaluate, vnnlib), ``paper`` (the paper's pipeline over a run
directory: reproduce, train, hybrid, attack, repair-sweep, export, download). Each command is one
:class:`Command`; this module orders them, builds the parser and runs one.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cnnrepair.cli import model, paper
from cnnrepair.cli.common import EPILOG, Bars, Command
from cnnrepair.errors import CnnRepairError
from cnnrepair.outdir import disk_error

ORDER = ("reproduce", "train", "hybrid", "attack", "repair", "layers", "verify", "points", "evaluate", "vnnlib", "repair-sweep", "export", "download")
COMMANDS: dict[str, Command] = {c.name: c for c in sorted(model.COMMANDS + paper.COMMANDS, key=lambda c: ORDER.index(c.name))}
MODEL_COMMANDS = tuple(name for name, c in COMMANDS.items() if c.on_files)  # nothing half-written, no checkpoints


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from cnnrepair import __version__

    parser = argparse.ArgumentParser(
        prog="cnnrepair",
        description="Repair the last linear layer of any classifier's model file with a certificate anyone can re-check "
                    "(points, repair, verify, evaluate, vnnlib), and reproduce Guidotti & Leofante 2020 (reproduce, train, "
                    "hybrid, attack, repair-sweep, export: each writes into one run directory, --out).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--version", action="version", version=f"cnnrepair {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():  # --quiet works before or after the command
        command.configure(sub.add_parser(command.name, parents=[common], help=command.help, **command.parser_options))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns 0 on success, 2 on bad input (one line on stderr), 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    bars = Bars(not args.quiet, sys.stderr.isatty())
    command = COMMANDS[args.command]
    t0 = time.perf_counter()
    try:
        if command.check is not None:
            command.check(args)  # every option, before any work starts
        code = command.run(args, bars)
        if command.on_files:  # a command on model files returns its exit code
            bars.close()
            return int(code)
        paper.record_command(args, list(sys.argv[1:] if argv is None else argv), time.perf_counter() - t0)
    except CnnRepairError as exc:
        bars.close()
        print(f"cnnrepair: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        bars.close()
        if command.on_files:
            print(f"cnnrepair: interrupted; nothing was written into {getattr(args, 'out', None) or 'any folder'}", file=sys.stderr)
        else:
            print("cnnrepair: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read-only folder: one line, the run's files removed by their writers
        bars.close()
        print(f"cnnrepair: error: {disk_error(exc, getattr(args, 'out', None) or Path('.'))}", file=sys.stderr)
        return 2
    bars.close()
    return 0

