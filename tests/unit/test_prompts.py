"""Prompt rendering: simple templates skip Jinja's per-call context and render the same text."""

from __future__ import annotations

from typing import Any

import jinja2
import jinja2.sandbox
import pytest

from shardeval.errors import PromptError
from shardeval.prompts import PromptRenderer
from shardeval.spec import PromptSpec

AWKWARD_VALUES: list[Any] = [
    7,
    -0,
    2**70,
    7.0,
    1e16,
    0.1,
    True,
    None,
    "",
    'naïve \u2603 \\n "quoted" {{ not a template }}',
    [1, 2.5, None, "x"],
    {"nested": {"k": [True]}},
]
TEMPLATES = [
    "What is {{ a }} + {{ b }}?",
    "{{a}}{{b}}",
    "  {{- a }} and {{ b -}}  \n",
    "line one\n{{ a }}\n\n",
    "no variables at all",
]


def jinja_render(source: str, item: dict[str, Any]) -> str:
    env = jinja2.sandbox.SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False
    )
    return env.from_string(source).render(item)


@pytest.mark.parametrize("source", TEMPLATES)
@pytest.mark.parametrize("value", AWKWARD_VALUES, ids=repr)
def test_simple_templates_render_as_jinja_does(source: str, value: Any) -> None:
    item = {"a": value, "b": [value]}
    renderer = PromptRenderer(PromptSpec(system=source, user=source))
    assert renderer._simple is not None  # the fast path is what is tested here
    expected = jinja_render(source, item)
    assert renderer.render(item, "x") == [
        {"role": "system", "content": expected},
        {"role": "user", "content": expected},
    ]


def test_other_templates_go_through_jinja() -> None:
    renderer = PromptRenderer(
        PromptSpec(user="{{ a.b }} {{ a['b'] | upper }}{% if c %}!{% endif %}")
    )
    assert renderer._simple is None
    assert renderer.render({"a": {"b": "x"}, "c": 1}, "x")[0]["content"] == "x X!"


def test_a_missing_field_is_the_same_error_on_the_fast_path() -> None:
    renderer = PromptRenderer(PromptSpec(user="What is {{ a }} + {{ b }}?"))
    with pytest.raises(PromptError, match=r"item 'q1': the user prompt uses 'b'.*fields: a"):
        renderer.render({"a": 1}, "q1")


def test_a_jinja_global_still_resolves() -> None:
    renderer = PromptRenderer(PromptSpec(user="{{ range }}"))
    assert renderer.render({}, "x")[0]["content"] == jinja_render("{{ range }}", {})
