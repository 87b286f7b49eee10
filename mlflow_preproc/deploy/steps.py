"""The progress lines of ``create`` and ``update`` on stderr: ``[n/3] step``, then its result."""

from __future__ import annotations

import sys
import time


def step(number: int, text: str) -> None:
    print(f"[{number}/3] {text}", file=sys.stderr, flush=True)


def done(text: str, since: float) -> None:
    print(f"      {text} ({time.monotonic() - since:.1f} s)", file=sys.stderr, flush=True)


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
