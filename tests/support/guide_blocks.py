"""The fenced code blocks of a Markdown guide, the CI markers above them, and the local files it links to.

A marker is an HTML comment on the line directly above a block's opening fence (invisible in rendered Markdown):

* ``<!-- ci: run -->`` above a ```` ```bash ```` block: CI runs the block with bash from the repository root;
* ``<!-- ci: skip (reason) -->`` above a ```` ```bash ```` block: CI does not run it, for the reason given
  (a GPU, real model weights, a server that never exits, ...);
* ``<!-- ci: output -->`` above a ```` ```text ```` block that follows a ``run`` block: lines that block must print,
  in this order, each on one line of its output; ``…`` stands for any text, and runs of spaces match any
  whitespace.

Used by ``tests/comfy/test_guide_commands.py`` (the guide ``docs/rl-for-flow-models.md``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

__all__ = ["Block", "Command", "GuideError", "SHELL_LANGUAGES", "fenced_blocks", "unclassified_shell_blocks",
           "ci_commands", "missing_lines", "linked_paths", "image_paths"]

#: fence languages that hold commands a reader may type, so each needs a run or skip marker
SHELL_LANGUAGES = ("bash", "sh", "shell", "console", "zsh")
ELLIPSIS = "…"

_FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+.-]*)[^`]*$")
_MARKER = re.compile(r"^\s*<!--\s*ci:\s*(?P<kind>[a-z]+)\s*(?:\((?P<reason>.*)\))?\s*-->\s*$")
_MARKER_LIKE = re.compile(r"<!--\s*ci:")
#: Markdown links and images, ``[text](target)`` / ``![alt](target "title")``, and HTML ``<img src="...">``
_LINK = re.compile(r"(?P<bang>!?)\[[^\]\n]*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_IMG_TAG = re.compile(r"<img\s[^>]*src=\"(?P<target>[^\"]+)\"", re.IGNORECASE)


class GuideError(ValueError):
    """A malformed marker or a marker in the wrong place (the message names the line)."""


@dataclass(frozen=True)
class Block:
    """One fenced code block.

    lang:   the fence's info string up to the first space (``bash``, ``text``, ``""``), lower case.
    body:   the lines between the fences, joined with newlines.
    line:   1-based line number of the opening fence.
    marker: ``"run"``, ``"skip"``, ``"output"`` or None (no marker above the fence).
    reason: the text in parentheses after ``skip`` (empty otherwise).
    """

    lang: str
    body: str
    line: int
    marker: Optional[str] = None
    reason: str = ""

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELL_LANGUAGES


@dataclass(frozen=True)
class Command:
    """A ``run`` block and the output lines the guide says it prints (empty when it states none)."""

    block: Block
    expected: tuple[str, ...] = ()


def _marker(line: str, number: int) -> tuple[Optional[str], str]:
    """``(kind, reason)`` of a marker line, ``(None, "")`` for any other line; a GuideError for a bad marker."""
    if not _MARKER_LIKE.search(line):
        return None, ""
    m = _MARKER.match(line)
    if m is None or m["kind"] not in ("run", "skip", "output"):
        raise GuideError(f"line {number}: malformed CI marker {line.strip()!r}; write <!-- ci: run -->, "
                         "<!-- ci: skip (reason) --> or <!-- ci: output -->")
    reason = (m["reason"] or "").strip()
    if m["kind"] == "skip" and not reason:
        raise GuideError(f"line {number}: a skip marker needs a reason: <!-- ci: skip (why CI cannot run it) -->")
    if m["kind"] != "skip" and m["reason"] is not None:
        raise GuideError(f"line {number}: only skip markers take a reason")
    return m["kind"], reason


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced code block of ``text`` in order, with the marker on the line directly above its fence.

    A marker that is not directly above an opening fence is a GuideError (it would silently apply to nothing).
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            kind, _ = _marker(lines[i], i + 1)
            if kind is not None and not (i + 1 < len(lines) and _FENCE.match(lines[i + 1])):
                raise GuideError(f"line {i + 1}: the CI marker must sit on the line directly above a code fence")
            i += 1
            continue
        fence = opening["fence"]
        end = i + 1
        while end < len(lines) and not re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[end]):
            end += 1
        if end == len(lines):
            raise GuideError(f"line {i + 1}: the code fence {fence} is never closed")
        kind, reason = _marker(lines[i - 1], i) if i > 0 else (None, "")
        blocks.append(Block(lang=opening["lang"].lower(), body="\n".join(lines[i + 1:end]), line=i + 1,
                            marker=kind, reason=reason))
        i = end + 1
    return blocks


def unclassified_shell_blocks(blocks: list[Block]) -> list[Block]:
    """Shell blocks with neither a run nor a skip marker."""
    return [b for b in blocks if b.is_shell and b.marker not in ("run", "skip")]


def ci_commands(blocks: list[Block]) -> list[Command]:
    """The ``run`` blocks in order, each with the lines of the ``output`` block that follows it (if any).

    GuideError: a run or skip marker on a block that is not a shell block, or an output block that does not follow a
    run block (another shell block in between, or none before it).
    """
    commands: list[Command] = []
    last_shell: Optional[Block] = None
    for block in blocks:
        if block.marker in ("run", "skip") and not block.is_shell:
            raise GuideError(f"line {block.line}: a {block.marker} marker on a ```{block.lang or '(no language)'} "
                             f"block; run and skip mark shell blocks ({', '.join(SHELL_LANGUAGES)})")
        if block.is_shell:
            last_shell = block
            if block.marker == "run":
                commands.append(Command(block))
        elif block.marker == "output":
            if last_shell is None or last_shell.marker != "run" or commands[-1].expected:
                raise GuideError(f"line {block.line}: an output block must follow a <!-- ci: run --> block (one "
                                 "output block per command)")
            expected = tuple(line for line in block.body.splitlines() if line.strip())
            commands[-1] = Command(commands[-1].block, expected)
    return commands


def _squash(text: str) -> str:
    return " ".join(text.split())


def _pattern(expected_line: str) -> re.Pattern:
    parts = [re.escape(_squash(part)) for part in expected_line.split(ELLIPSIS)]
    return re.compile(".*".join(parts))


def missing_lines(output: str, expected: tuple[str, ...] | list[str]) -> list[str]:
    """The expected lines not found in ``output``, matched in order, each within one output line.

    ``…`` in an expected line matches any text; whitespace runs are compared as single spaces. After the first
    missing line every later one counts as missing too (order is part of what the guide states).
    """
    out_lines = [_squash(line) for line in output.splitlines()]
    position = 0
    for k, line in enumerate(expected):
        pattern = _pattern(line)
        while position < len(out_lines) and not pattern.search(out_lines[position]):
            position += 1
        if position == len(out_lines):
            return list(expected[k:])
        position += 1
    return []


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"(?ms)^ {0,3}(`{3,}|~{3,})[^\n]*\n.*?^ {0,3}\1[`~]*[ \t]*$", "", text)
    return re.sub(r"`[^`\n]*`", "", text)


def _targets(text: str, images_only: bool) -> list[str]:
    text = _prose(text)
    found = []
    for m in _LINK.finditer(text):
        if not images_only or m["bang"]:
            found.append(m["target"])
    found.extend(m["target"] for m in _IMG_TAG.finditer(text))
    local = []
    for target in found:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # a URL (https:, mailto:, ...) or an anchor in the same page
        local.append(target.split("#", 1)[0])
    return list(dict.fromkeys(local))


def linked_paths(text: str) -> list[str]:
    """Relative paths of every local link and image target in ``text`` (no URLs, no ``#anchor`` parts), in order,
    without duplicates. Code blocks and inline code are ignored."""
    return _targets(text, images_only=False)


def image_paths(text: str) -> list[str]:
    """Relative paths of the local images ``text`` shows (``![alt](path)`` and ``<img src="path">``)."""
    return _targets(text, images_only=True)
