"""Terminal output as HTML: ANSI colour codes (SGR) become classed spans, everything else
is escaped, and other escape sequences (cursor moves, titles) are dropped.

Done on the server, so the page needs no terminal emulator: a step's output is a stream of
lines, not a screen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from markupsafe import Markup, escape

# CSI sequences (ESC [ ... final byte) and OSC sequences (ESC ] ... BEL or ESC \).
ESCAPE = re.compile(r"\x1b(?:\[([0-9;?]*)([@-~])|\][^\x07\x1b]*(?:\x07|\x1b\\)?|.?)")
COLOURS = ("black", "red", "green", "yellow", "blue", "magenta", "cyan", "white")


@dataclass(frozen=True)
class Style:
    fg: str | None = None
    bg: str | None = None
    bold: bool = False
    underline: bool = False

    def classes(self) -> str:
        names = [f"fg-{self.fg}" if self.fg else "", f"bg-{self.bg}" if self.bg else ""]
        names += ["b" if self.bold else "", "u" if self.underline else ""]
        return " ".join(n for n in names if n)


def _colour(code: int) -> str:
    base = code % 10
    bright = code >= 90
    return ("br-" if bright else "") + COLOURS[base]


def apply(style: Style, params: str) -> Style:
    """The style after one SGR sequence's parameters (``"1;31"``); unknown ones are ignored."""
    codes = [int(p) if p.isdigit() else 0 for p in params.split(";")] if params else [0]
    skip = 0
    for n, code in enumerate(codes):
        if skip:
            skip -= 1
        elif code == 0:
            style = Style()
        elif code == 1:
            style = replace(style, bold=True)
        elif code == 4:
            style = replace(style, underline=True)
        elif code == 22:
            style = replace(style, bold=False)
        elif code == 24:
            style = replace(style, underline=False)
        elif 30 <= code <= 37 or 90 <= code <= 97:
            style = replace(style, fg=_colour(code))
        elif 40 <= code <= 47 or 100 <= code <= 107:
            style = replace(style, bg=_colour(code - 10))
        elif code == 39:
            style = replace(style, fg=None)
        elif code == 49:
            style = replace(style, bg=None)
        elif code in (38, 48):
            # 256-colour and true-colour forms: their arguments are skipped, not shown.
            mode = codes[n + 1] if n + 1 < len(codes) else 0
            skip = 2 if mode == 5 else 4 if mode == 2 else 1
    return style


def to_html(text: str) -> Markup:
    """``text`` escaped, its coloured runs wrapped in ``<span class="fg-red b">``."""
    out: list[str] = []
    style = Style()
    at = 0

    def emit(chunk: str) -> None:
        if not chunk:
            return
        classes = style.classes()
        body = str(escape(chunk))
        out.append(f'<span class="{classes}">{body}</span>' if classes else body)

    for match in ESCAPE.finditer(text):
        emit(text[at : match.start()])
        at = match.end()
        if match.group(2) == "m":
            style = apply(style, match.group(1) or "")
    emit(text[at:])
    return Markup("".join(out))
