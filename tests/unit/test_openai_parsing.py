"""What the OpenAI provider makes of a 200's body (the bytes it reads, parsed once)."""

from __future__ import annotations

import pytest

from shardeval.errors import TransientProviderError
from shardeval.outcome import Outcome
from shardeval.providers.openai import _parse_completion


def body(content: str) -> bytes:
    return (
        '{"choices":[{"message":{"role":"assistant","content":"' + content + '"},'
        '"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":2}}'
    ).encode()


def test_a_completion_is_parsed_from_bytes() -> None:
    completion = _parse_completion(body("caf\\u00e9 \\ud83d\\ude00"))
    assert completion.text == "café 😀"
    assert (completion.prompt_tokens, completion.completion_tokens) == (5, 2)
    assert completion.finish_reason == "length"


def test_half_an_emoji_cut_by_the_token_limit_becomes_a_replacement_character() -> None:
    # Valid JSON, but a lone surrogate is no string UTF-8 (the journal, Parquet) can store.
    completion = _parse_completion(body("a \\ud83d"))
    assert completion.text == "a \ufffd"
    completion.text.encode("utf-8")


@pytest.mark.parametrize("raw", [b"<html>bad gateway</html>", b'{"choices": []}', b"\xff\xfe"])
def test_a_body_that_is_no_completion_is_a_passing_fault(raw: bytes) -> None:
    with pytest.raises(TransientProviderError, match="malformed response"):
        _parse_completion(raw)


def test_usage_of_the_wrong_type_is_unknown_and_the_answer_is_kept() -> None:
    # Paid for either way: a count that is no whole number must not make the batch's Parquet
    # write fail on every rerun.
    raw = (
        b'{"choices":[{"message":{"content":[{"type":"text","text":"4"},{"type":"text",'
        b'"text":"2"}]},"finish_reason":7}],"usage":{"prompt_tokens":"12","completion_tokens":3.0}}'
    )
    outcome = Outcome.answered("k", _parse_completion(raw), latency_s=0, attempts=1, finished_at=1)
    assert outcome.response == "42"
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (None, 3)
    assert outcome.finish_reason == "7"
    assert type(outcome.completion_tokens) is int
    assert _parse_completion(b'{"choices":[{"message":{"content":"x"}}],"usage":[]}').text == "x"
