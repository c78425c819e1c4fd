"""The loss curves of a training run as a PNG, drawn with the standard library only.

matplotlib is not a dependency of sftflow, and a loss chart needs little: axes, a light grid,
the train loss per step (blue line), the eval loss where the eval split was scored (orange line
and dots), and the step and loss ranges written on the axes in a small bitmap font. The output
is deterministic: the same history gives the same bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

from sftflow.tasks.runtime.declare import compute_task

TRAIN_COLOUR = (31, 119, 180)
EVAL_COLOUR = (255, 127, 14)
_AXIS = (90, 90, 90)
_GRID = (225, 225, 225)
_TEXT = (40, 40, 40)

#: 3x5 glyphs, rows top to bottom, "1" = ink: enough for step numbers and losses.
_GLYPHS = {
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
    ".": ("000", "000", "000", "000", "010"), "-": ("000", "000", "111", "000", "000"),
    "e": ("000", "111", "111", "100", "111"), "+": ("000", "010", "111", "010", "000"),
}
_SCALE = 2  # pixels per glyph dot


class _Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, colour: tuple[int, int, int], size: int = 1) -> None:
        for dx in range(size):
            for dy in range(size):
                px, py = x + dx, y + dy
                if 0 <= px < self.width and 0 <= py < self.height:
                    i = (py * self.width + px) * 3
                    self.pixels[i:i + 3] = bytes(colour)

    def line(self, x0: int, y0: int, x1: int, y1: int, colour: tuple[int, int, int], size: int = 1) -> None:
        """Bresenham's line, ``size`` pixels thick."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        for _ in range(dx - dy + 1):
            self.dot(x0, y0, colour, size)
            if x0 == x1 and y0 == y1:
                break
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, colour: tuple[int, int, int] = _TEXT) -> None:
        for k, ch in enumerate(s):
            for row, bits in enumerate(_GLYPHS.get(ch, ("000",) * 5)):
                for col, bit in enumerate(bits):
                    if bit == "1":
                        self.dot(x + (4 * k + col) * _SCALE, y + row * _SCALE, colour, _SCALE)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[r * self.width * 3:(r + 1) * self.width * 3])
                       for r in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _label(v: float) -> str:
    return f"{v:.3g}"


def series(history: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """``(step, value)`` of every history row that has ``key``, in step order."""
    return sorted((float(r["step"]), float(r[key])) for r in history if r.get(key) is not None)


def loss_curve_png(history: Sequence[dict[str, Any]], width: int = 640, height: int = 360) -> bytes:
    """A PNG of ``loss`` (blue) and ``eval_loss`` (orange) against ``step``; a history without
    either gives empty axes."""
    canvas = _Canvas(width, height)
    train, evals = series(history, "loss"), series(history, "eval_loss")
    points = train + evals
    left, right, top, bottom = 64, width - 16, 16, height - 32
    steps = [p[0] for p in points] or [0.0, 1.0]
    values = [p[1] for p in points] or [0.0, 1.0]
    x_lo, x_hi = min(steps), max(steps)
    y_lo, y_hi = min(values), max(values)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def xy(step: float, value: float) -> tuple[int, int]:
        return (round(left + (step - x_lo) / (x_hi - x_lo) * (right - left)),
                round(bottom - (value - y_lo) / (y_hi - y_lo) * (bottom - top)))

    for k in range(5):
        y = round(top + k * (bottom - top) / 4)
        canvas.line(left, y, right, y, _GRID)
    canvas.line(left, top, left, bottom, _AXIS)
    canvas.line(left, bottom, right, bottom, _AXIS)
    for pts, colour in ((train, TRAIN_COLOUR), (evals, EVAL_COLOUR)):
        coords = [xy(*p) for p in pts]
        for (x0, y0), (x1, y1) in pairwise(coords):
            canvas.line(x0, y0, x1, y1, colour, 2)
        if colour == EVAL_COLOUR or len(coords) == 1:
            for x, y in coords:
                canvas.dot(x - 2, y - 2, colour, 5)
    glyph_w = 4 * _SCALE
    for value, y in ((y_hi, top), (y_lo, bottom - 5 * _SCALE)):
        s = _label(value)
        canvas.text(left - 6 - len(s) * glyph_w, y, s)
    for step, anchor in ((x_lo, left), (x_hi, right)):
        s = str(int(step)) if float(step).is_integer() else _label(step)
        x = anchor if anchor == left else anchor - len(s) * glyph_w
        canvas.text(x, bottom + 8, s)
    return canvas.png()


loss_curve_png_task = compute_task(name="loss-curve-png")(loss_curve_png)
