"""Tests for flowgrpo_core.prompts: .txt/.jsonl parsing, comments, errors with line numbers, counts, token lengths."""

from __future__ import annotations

import json
import math

import pytest

from flowgrpo_core.prompts import (
    PromptError,
    check_prompt_counts,
    common_token_length,
    load_prompt_file,
    parse_prompt_jsonl,
    parse_prompt_lines,
)


# ----------------------------------------------------------------------------------------------- text
def test_lines_are_stripped_and_blank_and_comment_lines_skipped():
    text = "  a red cube  \n\n# a comment\n   # indented comment\n\ta blue sphere\r\nnot # a comment\n   \n"
    assert parse_prompt_lines(text) == ["a red cube", "a blue sphere", "not # a comment"]


def test_duplicates_and_order_are_kept():
    assert parse_prompt_lines("b\na\nb\n") == ["b", "a", "b"]


def test_only_comments_give_no_prompts():
    assert parse_prompt_lines("# one\n\n  # two\n") == []


# ----------------------------------------------------------------------------------------------- files
def test_txt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# header\nune pomme rouge\n\n日本の庭\n", encoding="utf-8")
    assert load_prompt_file(path) == ["une pomme rouge", "日本の庭"]


def test_txt_file_with_byte_order_mark(tmp_path):
    path = tmp_path / "bom.TXT"
    path.write_bytes("\ufefffirst\nsecond\n".encode("utf-8"))
    assert load_prompt_file(str(path)) == ["first", "second"]


def test_jsonl_file(tmp_path):
    records = [{"prompt": " a cat ", "tag": 1}, {"prompt": "ein Hund", "metadata": {"x": [1, 2]}}]
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(records[0]) + "\n\n   \n" + json.dumps(records[1], ensure_ascii=False) + "\n",
                    encoding="utf-8")
    assert load_prompt_file(path) == ["a cat", "ein Hund"]


@pytest.mark.parametrize("bad_line, words", [
    ('{"prompt": "unterminated}', ["not valid JSON"]),
    ('["a list"]', ["JSON list", "not an object"]),
    ('{"text": "wrong field"}', ['no "prompt" field', "text"]),
    ('{"prompt": 42}', ["int", "not a string"]),
    ('{"prompt": "   "}', ["empty"]),
])
def test_malformed_jsonl_names_the_line(tmp_path, bad_line, words):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + bad_line + '\n{"prompt": "after"}\n', encoding="utf-8")
    with pytest.raises(PromptError) as info:
        load_prompt_file(path)
    message = str(info.value)
    assert "data.jsonl line 3" in message
    for word in words:
        assert word in message
    assert "Fix:" in message and info.value.fix in message


def test_jsonl_line_numbers_count_blank_lines():
    with pytest.raises(PromptError, match=r"<jsonl> line 4\b"):
        parse_prompt_jsonl('{"prompt": "a"}\n\n\n{"prompt": null}\n')


@pytest.mark.parametrize("name", ["prompts.csv", "prompts.json", "prompts"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("a prompt\n", encoding="utf-8")
    with pytest.raises(PromptError, match=r"only \.txt and \.jsonl") as info:
        load_prompt_file(path)
    assert name in info.value.problem


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(PromptError, match="not UTF-8"):
        load_prompt_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_prompt_file(tmp_path / "absent.txt")


# ----------------------------------------------------------------------------------------------- counts
def test_counts_accept_a_valid_setup():
    check_prompt_counts(num_distinct_prompts=3, prompts_per_iteration=3, group_size=2)


@pytest.mark.parametrize("counts, text", [
    ((5, 2, 1), "group_size must be at least 2 for GRPO"),
    ((5, 0, 4), "prompts_per_iteration must be at least 1"),
    ((0, 1, 4), "empty"),
    ((3, 4, 4), "the prompt list has 3 prompts but prompts_per_iteration is 4"),
])
def test_counts_errors(counts, text):
    with pytest.raises(PromptError) as info:
        check_prompt_counts(*counts)
    assert text in info.value.problem
    assert info.value.fix


# ----------------------------------------------------------------------------------------------- token lengths
@pytest.mark.parametrize("lengths", [[77], [77, 77], [77, 154], [77, 154, 231], [256, 128, 64]])
def test_common_token_length_is_the_lcm(lengths):
    total = common_token_length(lengths)
    assert total == math.lcm(*lengths)
    assert all(total % t == 0 for t in lengths)


def test_common_token_length_refuses_a_blow_up():
    with pytest.raises(PromptError, match=r"\[37, 41\].*1517 tokens"):
        common_token_length([41, 37])
    assert common_token_length([41, 37], max_growth=41) == 1517


def test_common_token_length_needs_positive_lengths():
    with pytest.raises(ValueError):
        common_token_length([])
    with pytest.raises(ValueError):
        common_token_length([0, 77])
