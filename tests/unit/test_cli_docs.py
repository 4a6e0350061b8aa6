"""docs/cli.md documents exactly the flags each command has (compared with the click params).

Each ``## shardeval <command>`` section's first code block is its usage line; its option
table (first cell of each row) lists flags too. Every long flag of the command must be in
the usage block, and every flag the section mentions (usage or table) must exist. New
commands (``shardeval/commands/``) need a section as well.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer.main

from shardeval.cli import app

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
FLAG = re.compile(r"(?<![\w-])(--?[a-z][a-z0-9-]*)")


def commands() -> dict[str, Any]:
    """The click commands of the typer app by full name (``alerts install`` for a group's).

    Typer >= 0.29 vendors its own click, so the objects are looked at, not type-checked.
    """
    found: dict[str, Any] = {}

    def walk(prefix: str, group: Any) -> None:
        for name, command in group.commands.items():
            full = f"{prefix}{name}"
            if hasattr(command, "commands"):
                walk(full + " ", command)
            else:
                found[full] = command

    walk("", typer.main.get_command(app))
    return found


def sections() -> dict[str, str]:
    found: dict[str, str] = {}
    for chunk in re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]:
        title, _, body = chunk.partition("\n")
        match = re.fullmatch(r"shardeval ([a-z][a-z -]*)", title.strip())
        if match:
            found[match.group(1)] = body
    return found


def documented(body: str) -> tuple[set[str], set[str]]:
    """(flags in the usage block, flags in the section's option tables)."""
    usage = re.search(r"```[a-z]*\n(.*?)```", body, flags=re.S)
    assert usage is not None, "no usage block"
    in_usage = set(FLAG.findall(usage.group(1)))
    in_table: set[str] = set()
    for line in body.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            first = re.split(r"(?<!\\)\|", line)[1]  # cells split on unescaped pipes
            in_table |= set(FLAG.findall(" ".join(re.findall(r"`([^`]*)`", first))))
    return in_usage, in_table


def actual(command: Any) -> tuple[set[str], set[str]]:
    """(long flags, all flags) of a command, without --help."""
    flags = {
        opt
        for param in command.params
        if param.param_type_name == "option"
        for opt in [*param.opts, *param.secondary_opts]
    } - {"--help"}
    return {f for f in flags if f.startswith("--")}, flags


@pytest.mark.parametrize("name", sorted(commands()))
def test_documented_flags_match_help(name: str) -> None:
    body = sections().get(name)
    assert body is not None, f"docs/cli.md has no '## shardeval {name}' section"
    in_usage, in_table = documented(body)
    long_flags, all_flags = actual(commands()[name])
    assert long_flags - in_usage == set(), f"{name}: flags missing from the usage block"
    assert (in_usage | in_table) - all_flags == set(), f"{name}: documented flags it lacks"
    if in_table:
        assert long_flags - in_table == set(), f"{name}: flags missing from the option table"


def test_every_command_is_in_the_overview() -> None:
    overview = re.search(r"```\n(.*?)```", DOC.read_text(), flags=re.S)
    assert overview is not None
    listed = set(re.findall(r"^shardeval ([a-z-]+)", overview.group(1), flags=re.M))
    assert {name.split()[0] for name in commands()} <= listed


def test_help_texts_keep_their_brackets() -> None:
    """``[dask]`` is an extra's name: help is plain text, not rich markup."""
    run = commands()["run"]
    texts = " ".join(getattr(p, "help", None) or "" for p in run.params)
    assert "[dask]" in texts
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert "needs the [dask] extra" in result.output
