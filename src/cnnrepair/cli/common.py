"""What every command shares: progress bars on stderr, one-line messages, and the command record."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field


EPILOG = """examples:
  cnnrepair reproduce                                   # whole pipeline on the embedded 8x8 digits
  cnnrepair reproduce --dataset mnist --data-dir ../shared/datasets/mnist --out runs/mnist
  cnnrepair train --dataset cifar10 --data-dir ../shared/datasets/cifar10-jpeg.tar.gz --out runs/cifar10 --epochs 12
  cnnrepair hybrid --out runs/cifar10 --kh-train-size 10000
  cnnrepair repair model.pt2 --points wrong.npz --keep clean.npz --out repaired/   # any classifier's last layer
  cnnrepair verify repaired/certificate.json --model repaired/repaired.pt2 --points wrong.npz --keep clean.npz
  cnnrepair repair model.onnx --points wrong.npz --out repaired/                   # ONNX in, repaired/repaired.onnx out
  cnnrepair vnnlib repaired/repaired.onnx --points wrong.npz --eps 0.01 --out props/  # properties for any VNN-COMP verifier
"""


class Bars:
    """Maps the library's ``progress(desc, done, total)`` calls onto tqdm bars on stderr."""

    def __init__(self, enabled: bool, tty: bool):
        self.enabled = enabled
        self.tty = tty
        self.bar = None
        self.desc = None
        self.last = 0.0

    def __call__(self, desc: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if not self.tty:  # logs: one line every 15 s and at the end of each step
            now = time.monotonic()
            if done >= total or now - self.last > 15:
                self.last = now
                say(f"  {desc}: {done}/{total}")
            return
        from tqdm import tqdm

        if desc != self.desc or self.bar is None:
            self.close()
            self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
            self.desc = desc
        self.bar.n = done
        self.bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.desc = None, None


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Command:
    """One subcommand: its parser (``configure``), the checks run before any work (``check``) and the work (``run``).

    ``on_files``: a command on model files, which writes one output folder as a unit (no run
    directory, no checkpoint: an interrupt leaves nothing half-written) and returns its exit code."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Bars], int | None]
    check: Callable[[argparse.Namespace], object] | None = None
    on_files: bool = False
    parser_options: dict = field(default_factory=dict)
