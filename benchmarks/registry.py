"""The benchmarks, each declared once: a command (its arguments and what it runs) and the results
sections it contributes to docs/results.md (its title, how it was measured, its table).

A benchmark module registers itself when imported::

    @command("threads", "LP time with 1 and 2 BLAS threads", order=60,
             arguments=lambda p: p.add_argument("--cap", type=float, default=120.0))
    def _cli(args):
        return run(cap=args.cap)

    section("threads.json", order=70, title=lambda d: "### Threads ...", intro=lambda d: ..., table=table)

``python -m benchmarks.run`` builds its parser from :data:`COMMANDS` and the results page from
:data:`SECTIONS`, both in their ``order``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import common


@dataclass(frozen=True)
class Command:
    """A ``python -m benchmarks.run NAME`` subcommand: ``run(args)`` returns the files it wrote."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Path | Iterable[Path]]
    order: int


@dataclass(frozen=True)
class Section:
    """A part of docs/results.md: ``render(data, link)`` for each ``benchmarks/results`` file matching ``pattern``
    (``link(path)`` gives a figure's path relative to the page)."""

    pattern: str
    render: Callable[[dict, Callable[[Path], str]], list[str]]
    order: int
    headline: Callable[[dict], list[str]] | None = None  # lines for the README's headline results, if any


COMMANDS: dict[str, Command] = {}
SECTIONS: list[Section] = []


def command(name: str, help: str, order: int, arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register the decorated ``run(args)`` as the subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace], Path | Iterable[Path]]):
        COMMANDS[name] = Command(name, help, arguments or (lambda p: None), run, order)
        return run

    return register


def arguments(*specs: tuple[tuple, dict]) -> Callable[[argparse.ArgumentParser], None]:
    """An ``arguments`` callback adding ``parser.add_argument(*args, **kwargs)`` for each (args, kwargs)."""

    def add(parser: argparse.ArgumentParser) -> None:
        for args, kwargs in specs:
            parser.add_argument(*args, **kwargs)

    return add


def arg(*args, **kwargs) -> tuple[tuple, dict]:
    """One argument for :func:`arguments`, written as ``add_argument`` takes it."""
    return args, kwargs


MNIST_DIR = arg("--data-dir", type=Path, default=Path("../shared/datasets/mnist"), help="the MNIST IDX folder")


def names(text: str, known, what: str) -> tuple[str, ...]:
    """The comma-separated names of a ``--shapes``-like option, each one of ``known`` (else the command stops, naming them)."""
    picked = tuple(s for s in text.split(",") if s)
    unknown = [s for s in picked if s not in known]
    if unknown:
        raise SystemExit(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return picked


def section(pattern: str, order: int, title: Callable[[dict], str] | None = None, intro: Callable[[dict], str] | None = None,
            table: Callable[[dict], str] | None = None, render: Callable[[dict, Callable[[Path], str]], list[str]] | None = None,
            headline: Callable[[dict], list[str]] | None = None) -> None:
    """Register a results section: either ``render``, or a ``title``, an ``intro`` sentence and a ``table``; ``headline``:
    what it adds to the README's headline results."""
    if render is None:
        def render(data: dict, link: Callable[[Path], str]) -> list[str]:
            return [title(data), "", intro(data), "", table(data), ""]
    SECTIONS.append(Section(pattern, render, order, headline))


def pct(x) -> str:
    """A share as a percentage with two decimals ("-" for none)."""
    return "-" if x is None else f"{100 * x:.2f}"


def measured_on(d: dict) -> str:
    """How a result was measured: its command, the core count and the date."""
    return f"`{d['command']}` on {d['machine']['cores']} CPU cores, {d['machine']['measured']}"


def headline_lines() -> list[str]:
    """Every registered section's headline lines, in order, for every results file it matches."""
    lines: list[str] = []
    for sec in sorted(SECTIONS, key=lambda s: s.order):
        if sec.headline is not None:
            for path in sorted(common.RESULTS.glob(sec.pattern)):
                lines += sec.headline(json.loads(path.read_text()))
    return lines


def render_sections(link: Callable[[Path], str]) -> list[str]:
    """Every registered section, in order, for every results file it matches."""
    lines: list[str] = []
    for sec in sorted(SECTIONS, key=lambda s: s.order):
        for path in sorted(common.RESULTS.glob(sec.pattern)):
            lines += sec.render(json.loads(path.read_text()), link)
    return lines
