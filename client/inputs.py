"""The `key=value` arguments of `run`: values, forced JSON (`key:=json`) and files to upload (`key=@path`)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """A command line the client cannot act on (exit status 2)."""


@dataclass(frozen=True)
class Assignment:
    """One `key=value`: the input's key, the text after `=`, and how to read it."""

    key: str
    text: str
    kind: str  # "value": JSON when the input is not a string and it parses, else text; "json"; "file"

    @property
    def file(self) -> Path:
        """The file a `key=@path` names."""
        return Path(self.text).expanduser()


def parse_assignment(arg: str) -> Assignment:
    """`key=value`, `key:=json` or `key=@path` as an Assignment; anything else is a UsageError."""
    key, sep, text = arg.partition("=")
    if not sep or not key or key == ":":
        raise UsageError(f"{arg!r} is not key=value (e.g. 3/seed=42, 6/text='a cat', 1/image=@photo.png)")
    if key.endswith(":"):
        try:
            json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{key}= is not valid JSON: {exc}") from None
        return Assignment(key[:-1], text, "json")
    if text.startswith("@"):
        found = Path(text[1:]).expanduser()
        if not text[1:] or not found.is_file():
            raise UsageError(f"{key}: no such file {text[1:]!r}")
        return Assignment(key, text[1:], "file")
    return Assignment(key, text, "value")


def parse_assignments(args: list[str]) -> list[Assignment]:
    """Every argument parsed; a key given twice is a UsageError."""
    parsed = [parse_assignment(arg) for arg in args]
    seen: set[str] = set()
    for item in parsed:
        if item.key in seen:
            raise UsageError(f"input {item.key!r} is given twice")
        seen.add(item.key)
    return parsed


def value_of(item: Assignment, declared: dict[str, Any]) -> Any:
    """The JSON value of a `value` or `json` assignment. A plain value of an input the workflow declares as
    `str` stays text (so 6/text=1984 is a prompt, not a number); any other is JSON when it parses (numbers,
    true/false, null), else text. The bridge checks the result against the input's type."""
    if item.kind == "json":
        return json.loads(item.text)
    info = declared.get(item.key)
    if isinstance(info, dict) and info.get("type") == "str":
        return item.text
    try:
        return json.loads(item.text)
    except ValueError:
        return item.text
