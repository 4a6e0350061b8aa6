"""Turn an item into chat messages with Jinja2 templates.

``StrictUndefined`` makes a missing field an error instead of an empty string: a prompt that
silently lost its question would still be sent, paid for, and scored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jinja2
import jinja2.nodes
import jinja2.sandbox

from shardeval.errors import PromptError, SpecError
from shardeval.spec import PromptSpec

Message = dict[str, str]

_UNDEFINED_NAME = re.compile(r"'([^']+)' is undefined|has no attribute '([^']+)'")


class PromptRenderer:
    """Compiled templates of one spec; :meth:`render` is called once per item."""

    def __init__(self, prompt: PromptSpec) -> None:
        # Sandboxed: a spec may come from someone else's repository or bucket.
        env = jinja2.sandbox.SandboxedEnvironment(
            undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False
        )
        self._templates: list[tuple[str, jinja2.Template | str]] = []
        self._simple: list[tuple[str, list[str | tuple[str]]]] | None = []
        for role, source, field in (
            ("system", prompt.system, "prompt.system"),
            ("user", prompt.user, "prompt.user"),
        ):
            if source is None:
                continue
            try:
                template = env.from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                raise SpecError(
                    f"{field}: template syntax error on line {exc.lineno}: {exc.message}"
                ) from None
            # A template without Jinja syntax (a fixed system prompt) renders to the same
            # text for every item: render it once.
            static = not any(mark in source for mark in ("{{", "{%", "{#"))
            self._templates.append((role, template.render() if static else template))
            parts = _simple_parts(env.parse(source))
            if parts is None or self._simple is None:
                self._simple = None
            else:
                self._simple.append((role, parts))
        self._globals = dict(env.globals)
        """The template globals, merged once: ``Template.render`` rebuilds them from a
        ``ChainMap`` for every call, a good part of rendering a short prompt."""

    def render(self, item: Mapping[str, Any], item_id: str) -> list[Message]:
        """Render the messages for one item.

        Raises:
            PromptError: naming the item id and the missing variable.
        """
        if self._simple is not None:
            try:
                return [
                    {"role": role, "content": _join(parts, item)} for role, parts in self._simple
                ]
            except KeyError:
                pass  # a field the item lacks (or a Jinja global): Jinja says what it means
        messages: list[Message] = []
        for role, template in self._templates:
            if isinstance(template, str):
                messages.append({"role": role, "content": template})
                continue
            try:
                context = template.new_context({**self._globals, **item}, shared=True)
                content = "".join(template.root_render_func(context))
            except jinja2.UndefinedError as exc:
                match = _UNDEFINED_NAME.search(str(exc))
                variable = next((g for g in match.groups() if g), str(exc)) if match else str(exc)
                raise PromptError(
                    f"item {item_id!r}: the {role} prompt uses {variable!r}, "
                    f"which the item does not have (fields: {', '.join(sorted(item)) or 'none'})"
                ) from None
            except Exception as exc:
                raise PromptError(
                    f"item {item_id!r}: the {role} prompt failed: {type(exc).__name__}: {exc}"
                ) from exc
            messages.append({"role": role, "content": content})
        return messages


def _simple_parts(template: jinja2.nodes.Template) -> list[str | tuple[str]] | None:
    """A template made only of text and ``{{ name }}`` as parts, else None.

    Such templates (most prompts) are rendered by :func:`_join` without Jinja's per-call
    context, about fifteen times faster, which at a million items is most of planning. The
    parts come from Jinja's own parse, so whitespace control and the trailing newline rule are
    already applied; Jinja outputs a variable as ``str(value)``, and so does :func:`_join`.
    """
    parts: list[str | tuple[str]] = []
    for node in template.body:
        if not isinstance(node, jinja2.nodes.Output):
            return None
        for child in node.nodes:
            if isinstance(child, jinja2.nodes.TemplateData):
                parts.append(child.data)
            elif isinstance(child, jinja2.nodes.Name) and child.ctx == "load":
                parts.append((child.name,))
            else:
                return None
    return parts


def _join(parts: list[str | tuple[str]], item: Mapping[str, Any]) -> str:
    """Render simple parts (see :func:`_simple_parts`); KeyError for a field the item lacks."""
    out = []
    for part in parts:
        if type(part) is str:
            out.append(part)
        else:
            value = item[part[0]]
            out.append(value if type(value) is str else str(value))
    return "".join(out)
