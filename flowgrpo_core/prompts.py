"""Prompt lists for GRPO training: parsing ``.txt`` / ``.jsonl`` files, count checks, the common token length.

Conventions:

* a prompt list is a ``list[str]`` of stripped, non-empty prompts; the group sampler
  (:class:`flowgrpo_core.group_sampler.GroupSampler`) picks ``P = prompts_per_iteration`` of them per iteration by
  index and repeats each ``G = group_size`` times;
* ``.txt``: one prompt per line; blank lines and lines whose first non-blank character is ``#`` are skipped;
* ``.jsonl``: one JSON object per line with a string field ``"prompt"`` (the record rides along as the prompt's
  ``metadata``, for rewards such as GenEval that read it); blank lines are
  skipped; anything else is an error naming the line;
* files are read as UTF-8 (a leading byte-order mark is accepted).

Every error is a :class:`PromptError` carrying ``problem`` and ``fix`` separately, so a node can phrase it as
``"<node>: <problem>. Fix: <fix>"``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable

__all__ = [
    "PROMPT_FILE_EXTENSIONS",
    "PromptError",
    "Prompt",
    "prompt_metadata",
    "parse_prompt_lines",
    "parse_prompt_jsonl",
    "load_prompt_file",
    "check_prompt_counts",
    "common_token_length",
]

#: file extensions :func:`load_prompt_file` reads
PROMPT_FILE_EXTENSIONS = (".txt", ".jsonl")


class PromptError(ValueError):
    """A problem with the prompts or their settings; ``problem`` says what is wrong, ``fix`` how to fix it."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}. Fix: {fix}")
        self.problem = problem
        self.fix = fix


def parse_prompt_lines(text: str) -> list[str]:
    """One prompt per non-empty line, stripped; lines starting with ``#`` (after leading blanks) are comments."""
    prompts = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(line)
    return prompts


class Prompt(str):
    """A prompt string that carries the JSONL record it came from as ``metadata`` (e.g. GenEval's ``tag``,
    ``include``, ``exclude``), for rewards that read more than the text. Behaves as the plain string otherwise."""

    metadata: dict

    def __new__(cls, text: str, metadata: dict | None = None) -> "Prompt":
        prompt = super().__new__(cls, text)
        prompt.metadata = dict(metadata or {})
        return prompt


def prompt_metadata(prompts) -> list[dict] | None:
    """The ``metadata`` of each prompt (``{}`` for a plain string), or ``None`` when no prompt has any."""
    records = [dict(getattr(p, "metadata", None) or {}) for p in prompts]
    return records if any(records) else None


def parse_prompt_jsonl(text: str, source: str = "<jsonl>") -> list[str]:
    """The ``"prompt"`` field of each JSON-object line (blank lines skipped), stripped, as :class:`Prompt` strings
    carrying their whole record as ``metadata``; ``source`` names the input in errors. Raises :class:`PromptError` with the 1-based line number for malformed JSON, a line that is not an object,
    or a missing, non-string or empty ``"prompt"``."""
    prompts = []
    fix = 'write one JSON object per line with a non-empty string field "prompt", e.g. {"prompt": "a red cube"}'
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problem = f"{source} line {number} is not valid JSON ({exc.msg} at column {exc.colno})"
            raise PromptError(problem, fix) from None
        if not isinstance(record, dict):
            raise PromptError(f"{source} line {number} is a JSON {type(record).__name__}, not an object", fix)
        if "prompt" not in record:
            raise PromptError(f'{source} line {number} has no "prompt" field (fields: {sorted(record)})', fix)
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise PromptError(f'{source} line {number}: "prompt" is a {type(prompt).__name__}, not a string', fix)
        if not prompt.strip():
            raise PromptError(f'{source} line {number}: "prompt" is empty', fix + " (or delete the line)")
        prompts.append(Prompt(prompt.strip(), record))
    return prompts


def load_prompt_file(path: str | os.PathLike) -> list[str]:
    """The prompts of a ``.txt`` (see :func:`parse_prompt_lines`) or ``.jsonl`` (see :func:`parse_prompt_jsonl`) file.

    Raises :class:`PromptError` for another extension, a file that is not UTF-8, or a malformed ``.jsonl`` line;
    ``FileNotFoundError`` when the file does not exist. An empty list is returned for a file with no prompts.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    ext = os.path.splitext(name)[1].lower()
    if ext not in PROMPT_FILE_EXTENSIONS:
        raise PromptError(f"cannot read prompts from {name!r}: only .txt and .jsonl files are supported",
                          "save the prompts as a .txt file (one prompt per line) or a .jsonl file "
                          '(one {"prompt": "..."} object per line)')
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptError(f"{name} is not UTF-8 text (byte {exc.start} cannot be decoded)",
                          "save the file with UTF-8 encoding") from None
    return parse_prompt_jsonl(text, name) if ext == ".jsonl" else parse_prompt_lines(text)


def check_prompt_counts(num_distinct_prompts: int, prompts_per_iteration: int, group_size: int) -> None:
    """Raise :class:`PromptError` unless a GRPO iteration can draw ``prompts_per_iteration`` distinct prompts from
    ``num_distinct_prompts`` and compare ``group_size >= 2`` samples of each."""
    if group_size < 2:
        raise PromptError(f"group_size must be at least 2 for GRPO (got {group_size}): advantages compare the "
                          "samples of one prompt with each other",
                          "set group_size to 2 or more (larger groups give steadier advantages)")
    if prompts_per_iteration < 1:
        raise PromptError(f"prompts_per_iteration must be at least 1 (got {prompts_per_iteration})",
                          "set prompts_per_iteration to 1 or more")
    if num_distinct_prompts < 1:
        raise PromptError("the prompt list is empty", "write at least one prompt (one per line)")
    if num_distinct_prompts < prompts_per_iteration:
        raise PromptError(f"the prompt list has {num_distinct_prompts} prompts but prompts_per_iteration is "
                          f"{prompts_per_iteration}; each iteration draws that many different prompts",
                          f"add prompts or set prompts_per_iteration to at most {num_distinct_prompts}")


def common_token_length(lengths: Iterable[int], max_growth: float = 4.0) -> int:
    """The token count ``T`` that conditionings of ``lengths`` tokens are batched at: their least common multiple.

    Each conditioning is repeated ``T / t`` times along its tokens (ComfyUI's ``CONDCrossAttn.concat`` rule). That
    leaves cross-attention unchanged (every key and value appears equally often), but in joint attention (MMDiT /
    FLUX / Qwen-Image) it weighs text against image tokens ``T / t`` times more, so it is only an approximation there.
    Raises :class:`PromptError` when ``T`` would exceed ``max_growth`` times the longest length.
    """
    lengths = sorted({int(t) for t in lengths})
    if not lengths or lengths[0] < 1:
        raise ValueError(f"token lengths must be positive, got {lengths}")
    total = math.lcm(*lengths)
    if total > max_growth * lengths[-1]:
        raise PromptError(
            f"the prompts encode to different token lengths {lengths}; batching them repeats each to their least "
            f"common multiple, {total} tokens, more than {max_growth:g}x the longest",
            "use prompts that encode to the same length (short prompts usually do: CLIP pads to 77 tokens, T5 to its "
            "minimum length), or set prompts_per_iteration to 1 so one iteration never mixes lengths",
        )
    return total
