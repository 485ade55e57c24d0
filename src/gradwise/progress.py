"""Live progress on stderr: a rich progress bar on a terminal, plain lines in logs and with --quiet."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console

REFRESH_S = 0.1  # the bar is redrawn at most this often; updating it every step would cost time


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}"
    return str(value)


class Progress:
    """Progress of a training run: ``advance`` every optimizer step, ``update`` when numbers change."""

    def __init__(self, total_steps: int, *, mode: str = "auto", start_step: int = 0) -> None:
        """mode: auto (bar on a terminal, else lines), bar, lines or off."""
        self.console = Console(stderr=True)
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() and self.console.is_terminal else "lines"
        self.mode, self.total, self.step = mode, total_steps, start_step
        self.fields: dict[str, Any] = {}
        self._start, self._start_step, self._last_draw = time.perf_counter(), start_step, 0.0
        self._bar = None
        if mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=False,
            )
            self._task = self._bar.add_task(
                "train", total=total_steps, completed=start_step, info=""
            )
            self._bar.start()

    def steps_per_s(self) -> float:
        elapsed = time.perf_counter() - self._start
        return (self.step - self._start_step) / elapsed if elapsed > 0 else 0.0

    def advance(self, step: int) -> None:
        self.step = step
        if self._bar is not None:
            now = time.perf_counter()
            if now - self._last_draw >= REFRESH_S:
                self._last_draw = now
                self._draw()

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)

    def _info(self) -> str:
        parts = [f"{self.steps_per_s():.1f} steps/s"]
        parts += [f"{k} {_fmt(v)}" for k, v in self.fields.items() if k != "epoch"]
        return "  ".join(parts)

    def _draw(self) -> None:
        epoch = self.fields.get("epoch", "")
        self._bar.update(
            self._task, completed=self.step, description=f"epoch {epoch}", info=self._info()
        )

    def line(self, text: str) -> None:
        """A line of text above the bar (or on its own)."""
        if self.mode == "off":
            return
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def epoch_done(self) -> None:
        if self.mode == "lines":
            epoch = self.fields.get("epoch", "")
            self.line(f"epoch {epoch}  step {self.step}/{self.total}  {self._info()}")
        elif self._bar is not None:
            self._draw()

    def close(self) -> None:
        if self._bar is not None:
            self._draw()
            self._bar.stop()
            self._bar = None
