"""Turn an item into chat messages with Jinja2 templates.

``StrictUndefined`` makes a missing field an error instead of an empty string: a prompt that
silently lost its question would still be sent, paid for, and scored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jinja2
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
        self._globals = dict(env.globals)
        """The template globals, merged once: ``Template.render`` rebuilds them from a
        ``ChainMap`` for every call, a good part of rendering a short prompt."""

    def render(self, item: Mapping[str, Any], item_id: str) -> list[Message]:
        """Render the messages for one item.

        Raises:
            PromptError: naming the item id and the missing variable.
        """
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
