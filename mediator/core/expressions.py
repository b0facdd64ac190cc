"""Step input mappings and conditions: JMESPath over the request and earlier outputs.

An expression is evaluated against the *context*::

    {"payload": <request payload>,
     "steps": {<step id>: <output of that step>, ...},
     "workflow": {"id": ..., "request_id": ..., "name": ...}}

A mapping is a JSON-like template: strings are expressions, mappings and lists are walked,
other scalars are literals. Expressions are compiled once, when the definition is loaded,
and never ``eval``-ed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult

from mediator.claims import CLAIM
from mediator.errors import MediatorError

__all__ = ["Condition", "ExpressionError", "FieldPath", "Template", "compile_expression", "truthy"]


class ExpressionError(MediatorError, ValueError):
    """An expression failed to compile or to evaluate."""


_FIELD_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class FieldPath:
    """A plain dotted path such as ``payload.sku``, the commonest expression of all.

    Evaluated by walking dictionaries, with JMESPath's semantics for such paths (a missing
    key, or a step through something that is not an object, gives null), at a fraction of
    the cost of the general interpreter.
    """

    __slots__ = ("expression", "parts")

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self.parts = tuple(expression.split("."))

    def search(self, value: Any) -> Any:
        """The value at the path, or None. A path reaching into a value stored by
        reference (`mediator.claims`) is an `ExpressionError`: the mediator never opens one."""
        for depth, part in enumerate(self.parts):
            if not isinstance(value, dict):
                return None
            if CLAIM in value and depth:
                where = ".".join(self.parts[:depth])
                msg = (
                    f"{self.expression}: {where} is stored by reference (too large to travel "
                    f"in a record): a step can take {where} whole, not a field of it"
                )
                raise ExpressionError(msg)
            value = value.get(part)
        return value


Compiled = ParsedResult | FieldPath


@lru_cache(maxsize=4096)
def compile_expression(text: str) -> Compiled:
    """Compile one JMESPath expression (cached: definitions repeat expressions a lot)."""
    if _FIELD_PATH.match(text):
        return FieldPath(text)
    try:
        return jmespath.compile(text)
    except JMESPathError as exc:
        raise ExpressionError(_reason(exc)) from exc


def _reason(exc: JMESPathError) -> str:
    # jmespath's message spans lines with a caret diagram; keep the first, plus the position.
    position = getattr(exc, "lex_position", None)
    token = getattr(exc, "token_type", None)
    if token == "eof":
        return f"incomplete expression (ends at position {position})"
    if token is not None:
        value = getattr(exc, "token_value", "")
        return f"unexpected token {value!r} ({token}) at position {position}"
    return str(exc).splitlines()[0].rstrip(":")


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled input mapping: a tree of expressions and literals."""

    tree: Any

    @classmethod
    def compile(cls, source: Any) -> Template:
        """Compile every string in `source` as an expression."""
        return cls(_compile_tree(source))

    def render(self, context: Mapping[str, Any]) -> Any:
        """Evaluate the template against `context`."""
        return _render(self.tree, context)


@dataclass(frozen=True, slots=True)
class Condition:
    """A compiled `when` expression; true when its value is truthy (JMESPath truthiness)."""

    expression: Compiled

    @classmethod
    def compile(cls, source: str) -> Condition:
        """Compile `source`."""
        return cls(compile_expression(source))

    def holds(self, context: Mapping[str, Any]) -> bool:
        """Evaluate the condition against `context`."""
        try:
            return truthy(self.expression.search(context))
        except JMESPathError as exc:
            raise ExpressionError(str(exc)) from exc


def truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null, empty strings, lists and objects are false."""
    if isinstance(value, bool):
        return value
    # False is kept out of this tuple: `0 == False` in Python, but 0 is true in JMESPath.
    return value not in (None, "", [], {})


def _compile_tree(node: Any) -> Any:
    if isinstance(node, str):
        return compile_expression(node)
    if isinstance(node, Mapping):
        return {str(key): _compile_tree(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_compile_tree(value) for value in node]
    return node


def _render(node: Any, context: Mapping[str, Any]) -> Any:
    if isinstance(node, FieldPath):
        return node.search(context)
    if isinstance(node, ParsedResult):
        try:
            return node.search(context)
        except JMESPathError as exc:
            msg = f"{node.expression}: {exc}"
            raise ExpressionError(msg) from exc
    if isinstance(node, dict):
        return {key: _render(value, context) for key, value in node.items()}
    if isinstance(node, list):
        return [_render(value, context) for value in node]
    return node
