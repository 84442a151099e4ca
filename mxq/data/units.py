"""Cut each domain's text into the natural units of its register, for the next-unit evaluation task.

Why per domain: a "sentence" means different things in the four texts. Prose (Austen) is split into
sentences inside paragraphs; the World English Bible has one verse a line; the King James text has
numbered verses wrapped at 80 columns under chapter headings; Shakespeare has speeches (a speaker line,
then verse or prose lines). Line wrapping inside a paragraph or verse is undone (joined with one space),
so that the position of a line break cannot tell a true continuation from a distractor.

A ``Unit`` is a piece of text plus the ``group`` (paragraph, chapter, speech, block of verse lines) it sits
in; a context is only built from earlier units of the same group. ``offset`` is the character offset of
the unit's line (Austen: of its paragraph) in the text it was cut from, for tracing an item to its source.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Unit:
    text: str          # the unit, wrapping undone
    group: int         # index of the enclosing paragraph / chapter / speech
    offset: int        # character offset in the source text
    label: str = ""    # KJV: verse number; Shakespeare: speaker line ("DUKE."); else ""


def _blocks(text: str) -> list[tuple[int, list[str]]]:
    """Blank-line separated blocks as (offset of first line, lines)."""
    out: list[tuple[int, list[str]]] = []
    pos, cur, cur_off = 0, [], 0
    for line in text.split("\n"):
        if line.strip():
            if not cur:
                cur_off = pos
            cur.append(line)
        elif cur:
            out.append((cur_off, cur))
            cur = []
        pos += len(line) + 1
    if cur:
        out.append((cur_off, cur))
    return out


_ABBREV = {"Mr", "Mrs", "Dr", "St", "Messrs", "Col", "Capt", "Gen", "Rev"}
_SENT_END = re.compile(r"[.!?]+[\"']?(?=\s+[\"']?[A-Z])")


def split_sentences(paragraph: str) -> list[str]:
    """Rough English sentence split: after . ! ? (and a closing quote) when a capital follows."""
    out, start = [], 0
    for m in _SENT_END.finditer(paragraph):
        word = paragraph[:m.start()].rsplit(None, 1)[-1] if paragraph[:m.start()].strip() else ""
        if word.strip("\"'") in _ABBREV:
            continue
        out.append(paragraph[start:m.end()].strip())
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return [s for s in out if s]


def prose_units(text: str) -> list[Unit]:
    """Austen: sentences of unwrapped paragraphs."""
    units: list[Unit] = []
    for g, (off, lines) in enumerate(_blocks(text)):
        para = " ".join(line.strip() for line in lines)
        for s in split_sentences(para):
            units.append(Unit(s, g, off))
    return units


def verse_line_units(text: str) -> list[Unit]:
    """World English Bible: one verse a line. Very long or very short lines break the group."""
    units: list[Unit] = []
    g, pos = 0, 0
    for line in text.split("\n"):
        s = line.strip()
        if 10 <= len(s) <= 400:
            units.append(Unit(s, g, pos))
        else:
            g += 1
        pos += len(line) + 1
    return units


_KJV_VERSE = re.compile(r"^\s+(\d+) (.*)$")


def numbered_verse_units(text: str) -> list[Unit]:
    """King James: '  N text' verses, continuation lines joined; a heading line starts a new chapter."""
    units: list[Unit] = []
    g, pos = 0, 0
    cur: list[str] | None = None
    cur_num, cur_off = "", 0

    def flush() -> None:
        if cur:
            units.append(Unit(" ".join(cur), g, cur_off, cur_num))

    for line in text.split("\n"):
        m = _KJV_VERSE.match(line)
        if m:
            flush()
            cur, cur_num, cur_off = [m.group(2).strip()], m.group(1), pos
        elif line.strip() and cur is not None and line[:1] not in (" ", "\t") and not re.fullmatch(r"\S.* \d+", line):
            cur.append(line.strip())
        else:
            flush()
            cur = None
            if line.strip():
                g += 1                               # a chapter heading such as "Titus 2"
        pos += len(line) + 1
    flush()
    return units


_SPEAKER = re.compile(r"^[A-Z][A-Z0-9 '&,\-]*\.$")


def speech_units(text: str) -> list[Unit]:
    """Shakespeare: the lines of each speech (block headed by 'NAME.').

    A stage direction ('[Aside.]') is skipped and closes the group, so groups stay contiguous text.
    """
    units: list[Unit] = []
    g = 0
    for off, lines in _blocks(text):
        if not _SPEAKER.match(lines[0].strip()) or len(lines) < 2:
            continue
        g += 1
        label = lines[0].strip()                     # only the speech's first group follows this line
        pos = off + len(lines[0]) + 1
        for line in lines[1:]:
            s = line.strip()
            if s.startswith("["):
                g, label = g + 1, ""
            elif s:
                units.append(Unit(s, g, pos, label))
            pos += len(line) + 1
    return units


UNITS: dict[str, Callable[[str], list[Unit]]] = {
    "austen": prose_units,
    "web_bible": verse_line_units,
    "kjv_bible": numbered_verse_units,
    "shakespeare": speech_units,
}


def render(domain: str, context: list[Unit], nxt: Unit, group_start: bool) -> tuple[str, str]:
    """(context string, true continuation) in the domain's surface form.

    ``group_start``: the context begins its group, so a Shakespeare context can open with the speaker
    line (only then is it contiguous text). The continuation carries its own leading separator
    (" " or "\\n"), so tasks use target_delimiter "".
    """
    if domain == "austen":
        return " ".join(u.text for u in context), " " + nxt.text
    if domain == "web_bible":
        return "\n".join(u.text for u in context), "\n" + nxt.text
    if domain == "kjv_bible":
        lines = [f"  {u.label} {u.text}" for u in context] + [f"  {nxt.label}"]
        return "\n".join(lines), " " + nxt.text
    if domain == "shakespeare":
        head = [context[0].label] if group_start and context[0].label else []
        return "\n".join(head + [u.text for u in context]), "\n" + nxt.text
    raise ValueError(f"unknown domain {domain!r}")


def choice_text(domain: str, unit: Unit) -> str:
    """A (true or distractor) unit rendered as a continuation, with the separator of ``render``."""
    return (" " if domain in ("austen", "kjv_bible") else "\n") + unit.text
