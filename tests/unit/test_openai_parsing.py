"""What the OpenAI provider makes of a 200's body (the bytes it reads, parsed once)."""

from __future__ import annotations

import pytest

from shardeval.errors import TransientProviderError
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
