"""Copy language: the template syntax operators write (`${name}`, `{name}`, FreeMarker-style `<#if>`/`<#list>`,
native Jinja2), translated once per template version into sandboxed Jinja2 and rendered per message under a time
and size limit.

Syntax:

- `${name}`, `${user.vip_level}`, `{userName}`: a field, a dotted path into the message data (`items.0.name`
  indexes a list). `${name!"friend"}` (or `!'friend'`, `!0`) is an inline default; `${name!}` is refused, since a
  field never renders empty. `{...}` is a field only when the braces hold exactly a path; `${{ x }}` is a `$` before
  Jinja; `$` without `{` is text.
- `<#if c>...<#elseif c>...<#else>...</#if>`, `<#list items as item>...<#else>...</#list>`, `<#-- comment -->`.
  A line holding only these tags and blanks disappears from the output, as in FreeMarker.
- Conditions: `> >= < <= == != =`, `gt gte lt lte`, `&& || !` (`!` negates a whole comparison), parentheses,
  "strings" or 'strings', numbers, `true`/`false`, paths, `path??` (has a value). A missing value makes `??` and a
  bare `<#if path>` false, and every comparison with it false. A number and a numeric string compare as numbers.
- `{{ }}`, `{% %}`, `{# #}`: Jinja2, unchanged, except that include/import/from/extends are refused.

Where `<#if ...>` ends. Operators write `<#if age>30>` meaning "age above 30", so the tag does not end at its first
`>`. From the tag's start, take the run of characters a condition can hold (letters, digits, blanks, `_ . ( ) ! & |
= ? < > -`, quoted strings on one line). Each `>` in that run that is outside parentheses and not directly followed
by `=` or `>` may end the tag; the tag ends at the LAST of them before which the text is a complete, valid
condition. So `<#if age>30>older` is `age > 30`, `<#if n>1>s` is `n > 1`, `<#if vip><b>Hi` is `vip`, and
`<#if age >>` is an error (`age >` lacks its right side). Copy that itself starts with a value and `>` reads as part
of the condition (`<#if vip>VIP>` is `vip > VIP`): put a blank or parentheses there.

Limits: a render stops with RenderTimeout past its time limit (checked at every loop step, call and attribute
access), past 64 KiB of output, on range() over 1000 items, on recursion too deep, and on any single operation asked
to build more than the output cap (`*`, `**`, widths over 1000 in formats and filters).

Values: the inline default comes first, then the campaign default for the same path, else `MissingField`. A value
that is absent, None, or renders blank counts as missing. Values are inserted as data, never re-read as syntax,
and no template can produce `${`, `<#` or `</#` on its own: that is refused at compile time (a native Jinja
expression assembling one from pieces counts as a value).
"""

from __future__ import annotations

import re
import string
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import update_wrapper
from time import perf_counter
from typing import Any

import jinja2
from jinja2 import StrictUndefined, Template, TemplateRuntimeError, Undefined, meta, nodes, pass_context
from jinja2.runtime import Context, missing
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import escape

__all__ = [
    "CompiledTemplate",
    "MissingField",
    "RenderTimeout",
    "TemplateSyntaxError",
    "compile_template",
    "compiled",
    "to_jinja",
]

MAX_OUTPUT_CHARS = 64 * 1024
MAX_RANGE = 1000
# Widths, paddings, indents and batch sizes a template may ask of a filter or a format string.
MAX_WIDTH = 1000
CACHE_SIZE = 4096
# How far past `<#if` a condition may reach; bounds the search for the `>` that ends the tag.
MAX_CONDITION_CHARS = 1000


class TemplateSyntaxError(ValueError):
    """An authoring error, reported when the template is saved, at its place in the original source."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"line {line}, column {column}: {message}")
        self.message = message
        self.line = line
        self.column = column


class MissingField(LookupError):
    """A field with no value and no default at send time."""

    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field

    def __str__(self) -> str:
        return f"missing field: {self.field}"


class RenderTimeout(RuntimeError):
    """A render over its time limit, its output cap, or another bound (range size, recursion, widths)."""


# ---------------------------------------------------------------------------------------------------------------
# Per-render state. The sandbox hooks have no access to the render call, so the deadline and the campaign defaults
# travel in a thread-local; render() saves and restores them, so a render inside a render stays correct.


class _State(threading.local):
    deadline: float = float("inf")
    defaults: Mapping[str, Any] | None = None


_STATE = _State()


def _check_deadline() -> None:
    if perf_counter() > _STATE.deadline:
        raise RenderTimeout("render took longer than its time limit")


def _is_missing(value: Any) -> bool:
    if type(value) is str:
        return not value or value.isspace()
    # Callables are the sandbox's globals (range, dict, cycler...) showing through where data has no such key.
    return value is None or isinstance(value, Undefined) or callable(value)


def _walk(value: Any, rest: tuple[str, ...]) -> Any:
    """The value at a dotted path below `value`; None when any step is missing. Keys before attributes, so
    `cart.items` is the data's `items`, not dict.items."""
    for segment in rest:
        if value is None or isinstance(value, Undefined):
            return None
        if type(value) is dict or isinstance(value, Mapping):
            value = value.get(segment)
        elif isinstance(value, list | tuple) and segment.isdigit():
            index = int(segment)
            value = value[index] if index < len(value) else None
        elif segment.startswith("_"):
            return None
        else:
            value = _TEXT_ENV.getattr(value, segment)
    return value


def _fallback(path: str, default: str | None) -> str:
    if default is not None:
        return default
    defaults = _STATE.defaults
    if defaults:
        value = defaults.get(path)
        if not _is_missing(value):
            return str(value)
    raise MissingField(path)


def _field(value: Any, path: str, rest: tuple[str, ...] = (), default: str | None = None) -> str:
    """`${path!default}`: the text of a value, or its fallback."""
    if rest:
        value = _walk(value, rest)
    if type(value) is str:
        if value and not value.isspace():
            return value
    elif value is not None and not isinstance(value, Undefined) and not callable(value):
        # str() of a Markup subclass is a plain str: data is always escaped in HTML, never trusted as markup.
        text = str(value)
        if text and not text.isspace():
            return text
    return _fallback(path, default)


@pass_context
def _var(context: Context, name: str) -> Any:
    """A field root spelled like a Jinja keyword (`${none}`, `${self}`), read from the data directly."""
    value = context.resolve_or_missing(name)
    return None if value is missing else value


def _seq(value: Any, path: str, rest: tuple[str, ...] = ()) -> list | tuple:
    """The list a `<#list>` walks."""
    if rest:
        value = _walk(value, rest)
    if value is None or isinstance(value, Undefined):
        defaults = _STATE.defaults
        value = defaults.get(path) if defaults else None
        if value is None:
            raise MissingField(path)
    if not isinstance(value, list | tuple):
        raise TemplateRuntimeError(f"{path} is not a list")
    return value


@pass_context  # pass_context keeps Jinja from folding it at compile time
def _guard(context: Context, iterable: Any) -> Iterator[Any]:
    """Every for loop's iterable, so that loops check the deadline at each step."""
    deadline = _STATE.deadline
    for item in iterable:
        if perf_counter() > deadline:
            raise RenderTimeout("render took longer than its time limit")
        yield item


def _show(value: Any) -> Any:
    """What a native `{{ expr }}` prints: never a function or class, whose repr would show the sandbox's insides."""
    if callable(value) and not isinstance(value, Undefined):
        raise TemplateRuntimeError("a function or class cannot be printed")
    return value


def _limited_range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise RenderTimeout(f"range() is limited to {MAX_RANGE} items")
    return numbers


# Condition tests. A missing operand makes every comparison false; so does a type mismatch (`"abc" > 3`).


def _operand(value: Any) -> Any:
    return _MISSING if _is_missing(value) else value


_MISSING = object()


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def _compare(left: Any, right: Any, op: str) -> bool:
    left, right = _operand(left), _operand(right)
    if left is _MISSING or right is _MISSING:
        return False
    if _is_number(left) and isinstance(right, str):
        right = _number(right)
    elif _is_number(right) and isinstance(left, str):
        left = _number(left)
    if left is None or right is None:
        return False
    try:
        if op == "gt":
            return left > right
        if op == "ge":
            return left >= right
        if op == "lt":
            return left < right
        if op == "le":
            return left <= right
        if op == "eq":
            return left == right
        return left != right
    except TypeError:
        return False


def _comparison(op: str) -> Any:
    return lambda left, right: _compare(left, right, op)


_TESTS = {
    "_has": lambda value: not _is_missing(value),
    "_truthy": lambda value: not _is_missing(value) and bool(value),
    **{f"_{op}": _comparison(op) for op in ("gt", "ge", "lt", "le", "eq", "ne")},
}


# Bounds on what one operation may build, so that no single call explodes between two deadline checks.

_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_width(what: str, value: Any) -> None:
    if isinstance(value, int) and abs(value) > MAX_WIDTH:
        raise RenderTimeout(f"{what} {value} is over the limit {MAX_WIDTH}")


def _check_printf(fmt: str) -> None:
    for match in _PRINTF.finditer(fmt):
        for number in match.groups():
            if number == "*":
                raise RenderTimeout("'*' widths are not allowed in format strings")
            if number:
                _check_width("format width", int(number))


def _check_format(fmt: str) -> None:
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # the call itself will fail with the same error
    for _, _, spec, _ in parsed:
        if spec and "{" in spec:
            raise RenderTimeout("nested fields are not allowed in format specs")
        for number in re.findall(r"\d+", spec or ""):
            _check_width("format width", int(number))


def _check_size(size: int) -> None:
    if size > MAX_OUTPUT_CHARS:
        raise RenderTimeout(f"a value of {size} characters is over the output limit {MAX_OUTPUT_CHARS}")


def _limited_filter(original: Any, check: Any) -> Any:
    def limited(*args: Any, **kwargs: Any) -> Any:
        check(*args, **kwargs)
        return original(*args, **kwargs)

    return update_wrapper(limited, original)  # keeps jinja's pass_eval_context marks


def _bound_filters(filters: Mapping[str, Any]) -> dict[str, Any]:
    def width_at(index: int, name: str) -> Any:
        def check(*args: Any, **kwargs: Any) -> None:
            _check_width(name, kwargs.get(name, args[index] if len(args) > index else None))

        return check

    def replace_check(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> None:
        text, old, new = str(s), str(old), str(new)
        hits = text.count(old) if old else len(text) + 1
        if count is not None and count >= 0:
            hits = min(hits, count)
        _check_size(len(text) + hits * (len(new) - len(old)))

    def format_check(value: Any, *args: Any, **kwargs: Any) -> None:
        _check_printf(str(value))

    return {
        "center": _limited_filter(filters["center"], width_at(1, "width")),
        "indent": _limited_filter(filters["indent"], width_at(1, "width")),
        "batch": _limited_filter(filters["batch"], width_at(1, "linecount")),
        "slice": _limited_filter(filters["slice"], width_at(1, "slices")),
        "tojson": _limited_filter(filters["tojson"], width_at(2, "indent")),
        "replace": _limited_filter(filters["replace"], replace_check),
        "format": _limited_filter(filters["format"], format_check),
    }


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus deadline checks on every call and attribute access, and bounds on `*`, `**`,
    `%` and str.format."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _check_deadline()
        return super().call(context, obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_deadline()
        return super().getitem(obj, argument)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_deadline()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    _check_size(len(seq) * times)
            if isinstance(left, int) and isinstance(right, int):
                _check_size((left.bit_length() + right.bit_length()) // 8)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            _check_size(max(left.bit_length(), 1) * right // 8)
        elif operator == "%" and isinstance(left, str):
            _check_printf(left)
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped


class _Missing(StrictUndefined):
    """Strict undefined whose failure is MissingField(name), for native `{{ name }}` on absent data."""

    __slots__ = ()

    def __init__(self, hint: str | None = None, obj: Any = missing, name: str | None = None, exc: Any = None) -> None:
        super().__init__(hint, obj, name, MissingField if exc is None else exc)

    @property
    def _undefined_message(self) -> str:
        if self._undefined_exception is MissingField:
            return self._undefined_name if self._undefined_name is not None else (self._undefined_hint or "?")
        return super()._undefined_message


def _environment(html: bool) -> _Sandbox:
    env = _Sandbox(undefined=_Missing, autoescape=html, keep_trailing_newline=True, auto_reload=False, cache_size=0)
    env.globals.pop("lipsum", None)  # builds text of any size in one call
    env.globals["range"] = _limited_range
    env.filters.update(_bound_filters(env.filters))
    env.filters.update({"_field": _field, "_get": _walk, "_var": _var, "_seq": _seq, "_guard": _guard, "_show": _show})
    env.tests.update(_TESTS)
    return env


_TEXT_ENV = _environment(html=False)
_HTML_ENV = _environment(html=True)


# ---------------------------------------------------------------------------------------------------------------
# Translation: our syntax to Jinja source. Every construct keeps its line count, so Jinja's line numbers are the
# original's; text keeps its characters.

_ROOT = r"[A-Za-z_][A-Za-z0-9_]*"
_PATH = rf"{_ROOT}(?:\.\w+)*"
_START = re.compile(r"\$\{|</?#|\{")
_BRACE_FIELD = re.compile(rf"\{{({_PATH})\}}")
_FIELD_PATH = re.compile(rf"\s*({_PATH})\s*")
_STRING = r""""(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'"""
_NUMBER = r"-?\d+(?:\.\d+)?"
_LITERAL = re.compile(rf"\s*(?:({_STRING})|({_NUMBER}))\s*")
_DIRECTIVE = re.compile(r"<#(--|[A-Za-z_]\w*)")
_CLOSING = re.compile(r"</#([A-Za-z_]\w*)\s*>")
_ELSE = re.compile(r"\s*/?>")
_LIST = re.compile(rf"\s+({_PATH})\s+as\s+({_ROOT})\s*>")
_RAW_BEGIN = re.compile(r"\{%[-+]?\s*raw\s*[-+]?%\}")
_RAW_END = re.compile(r"\{%[-+]?\s*endraw\s*[-+]?%\}")
_TAG_NAME = re.compile(r"\{%[-+]?\s*(\w+)")
_COND_TOKEN = re.compile(
    rf"(?P<ws>\s+)|(?P<str>{_STRING})|(?P<num>{_NUMBER})|(?P<path>{_PATH})"
    r"|(?P<op>\?\?|>=|<=|==|!=|&&|\|\||[<>=!()])"
)

_FORBIDDEN_TAGS = {"include", "import", "from", "extends"}
# Names Jinja reads as keywords or binds itself; a field root spelled so is read from the data through _var.
_RESERVED = {"and", "or", "not", "in", "is", "if", "else", "true", "false", "none", "True", "False", "None", "self"}
_OPERATORS = {">": "gt", "gt": "gt", ">=": "ge", "gte": "ge", "<": "lt", "lt": "lt", "<=": "le", "lte": "le"}
_OPERATORS |= {"==": "eq", "=": "eq", "!=": "ne"}
_WORD_OPERATORS = {"gt", "gte", "lt", "lte"}
_DIRECTIVES = {"if", "elseif", "else", "list", "comment", "endif", "endlist"}


class _Error(Exception):
    """A syntax error at an offset of the (newline-normalised) source; located by the caller."""

    def __init__(self, message: str, offset: int) -> None:
        self.message = message
        self.offset = offset


def _jstr(value: str) -> str:
    # Python's repr escapes are ones Jinja's string literals decode.
    return repr(value)


def _root_expr(root: str) -> str:
    return f"({_jstr(root)}|_var)" if root in _RESERVED else root


def _rest_expr(rest: list[str]) -> str:
    return "(" + ", ".join(_jstr(s) for s in rest) + ("," if len(rest) == 1 else "") + ")"


def _value_expr(path: str) -> str:
    root, *rest = path.split(".")
    return f"({_root_expr(root)}|_get({_rest_expr(rest)}))" if rest else _root_expr(root)


def _unquote(literal: str) -> str:
    body = literal[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


@dataclass
class _Token:
    kind: str  # text, field, native, if, elseif, else, endif, list, endlist, comment
    start: int
    end: int
    jinja: str = ""


@dataclass
class _Frame:
    kind: str  # if or list
    start: int
    has_else: bool = False
    loop_var: str | None = None


@dataclass
class _Translation:
    source: str  # newline-normalised
    jinja: str
    fields: set[str]
    roots: set[str]
    native: list[tuple[int, int, int]]  # (first line, last line, column) of each Jinja tag
    texts: list[tuple[int, int]]  # (start, end) of each run of text and each Jinja tag, where output text comes from
    tags: set[int]  # where each of our tags and fields starts


class _Condition:
    """Recursive descent over one condition's tokens, producing a Jinja expression."""

    def __init__(self, tokens: list[tuple[str, str, int]], end: int, paths: set[str]) -> None:
        self.tokens = tokens
        self.end = end
        self.i = 0
        self.paths = paths

    def parse(self) -> str:
        if not self.tokens:
            raise _Error("the condition is empty", self.end)
        expr = self.or_()
        if self.i < len(self.tokens):
            _, text, offset = self.tokens[self.i]
            raise _Error(f"unexpected {text!r} in the condition", offset)
        return expr

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def accept(self, *ops: str) -> str | None:
        token = self.peek()
        if token and token[0] in ("op", "path") and token[1] in ops:
            self.i += 1
            return token[1]
        return None

    def or_(self) -> str:
        parts = [self.and_()]
        while self.accept("||"):
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else "(" + " or ".join(parts) + ")"

    def and_(self) -> str:
        parts = [self.not_()]
        while self.accept("&&"):
            parts.append(self.not_())
        return parts[0] if len(parts) == 1 else "(" + " and ".join(parts) + ")"

    def not_(self) -> str:
        if self.accept("!"):
            return f"(not {self.not_()})"
        return self.comparison()

    def comparison(self) -> str:
        value, truth = self.atom()
        op = self.accept(*_OPERATORS)
        if op is None:
            return truth
        right, _ = self.atom(after=op)
        return f"({value} is _{_OPERATORS[op]}({right}))"

    def atom(self, after: str | None = None) -> tuple[str, str]:
        """(the operand's value, its truth) as Jinja expressions."""
        token = self.peek()
        if token is None:
            where = f"after {after!r}" if after else "here"
            raise _Error(f"the condition needs a value {where}", self.end)
        kind, text, offset = token
        self.i += 1
        if kind == "op" and text == "(":
            inner = self.or_()
            if not self.accept(")"):
                raise _Error("')' is missing in the condition", self.peek()[2] if self.peek() else self.end)
            return inner, inner
        if kind == "str":
            value = _jstr(_unquote(text))
            return value, f"({value} is _truthy)"
        if kind == "num":
            return text, f"({text} is _truthy)"
        if kind == "path" and text in ("true", "false"):
            return text, text
        if kind == "path" and text not in _WORD_OPERATORS:
            _check_path(text, offset)
            self.paths.add(text)
            value = _value_expr(text)
            if self.accept("??"):
                return f"({value} is _has)", f"({value} is _has)"
            return value, f"({value} is _truthy)"
        raise _Error(f"the condition needs a value, not {text!r}", offset)


def _check_path(path: str, offset: int) -> None:
    for segment in path.split("."):
        if segment.startswith("__"):
            raise _Error(f"{segment!r} is not a field name", offset + path.index(segment))


class _Translator:
    def __init__(self, source: str) -> None:
        self.src = source
        self.tokens: list[_Token] = []
        self.stack: list[_Frame] = []
        self.fields: set[str] = set()
        self.roots: set[str] = set()

    # -- first pass: tokens, structure, fields

    def tokenize(self) -> None:
        src = self.src
        text_start = pos = 0
        while True:
            match = _START.search(src, pos)
            if match is None:
                break
            at, lead = match.start(), match.group()
            if lead == "{":
                following = src[at + 1 : at + 2]
                if following in ("{", "%", "#"):
                    self.text(text_start, at)
                    pos = text_start = self.native(at)
                    continue
                brace = _BRACE_FIELD.match(src, at)
                if brace is None:
                    pos = at + 1
                    continue
                self.text(text_start, at)
                self.field(at, brace.group(1), brace.start(1), None, brace.end())
                pos = text_start = brace.end()
            elif lead == "${":
                if src[at + 2 : at + 3] in ("{", "%", "#"):
                    pos = at + 1  # `${{ x }}`: a dollar sign before Jinja
                    continue
                self.text(text_start, at)
                pos = text_start = self.dollar_field(at)
            else:
                self.text(text_start, at)
                pos = text_start = self.directive(at) if lead == "<#" else self.closing(at)
        self.text(text_start, len(src))
        if self.stack:
            frame = self.stack[-1]
            raise _Error(f"<#{frame.kind}> is never closed: add </#{frame.kind}>", frame.start)

    def text(self, start: int, end: int) -> None:
        if end > start:
            self.tokens.append(_Token("text", start, end))

    def native(self, at: int) -> int:
        src = self.src
        raw = _RAW_BEGIN.match(src, at)
        if raw:
            close = _RAW_END.search(src, raw.end())
            if close is None:
                raise _Error("{% raw %} is never closed: add {% endraw %}", at)
            end = close.end()
        elif src.startswith("{#", at):
            close_at = src.find("#}", at + 2)
            if close_at < 0:
                raise _Error("'{#' is not closed with '#}'", at)
            end = close_at + 2
        else:
            closer = "}}" if src.startswith("{{", at) else "%}"
            end = self.tag_end(at, closer)
            name = _TAG_NAME.match(src, at)
            if closer == "%}" and name and name.group(1) in _FORBIDDEN_TAGS:
                raise _Error(f"{{% {name.group(1)} %}} is not allowed: a template cannot read other files", at)
        self.tokens.append(_Token("native", at, end, src[at:end]))
        return end

    def tag_end(self, at: int, closer: str) -> int:
        """Where a Jinja tag ends: its closer outside strings and open brackets, as Jinja's lexer reads it."""
        src, i, depth = self.src, at + 2, 0
        while i < len(src):
            char = src[i]
            if char in "'\"":
                close = re.compile(rf"{char}(?:[^{char}\\]|\\.)*{char}", re.S).match(src, i)
                if close is None:
                    break
                i = close.end()
                continue
            if depth == 0 and src.startswith(closer, i):
                return i + 2
            if char in "([{":
                depth += 1
            elif char in ")]}" and depth:
                depth -= 1
            i += 1
        raise _Error(f"{src[at : at + 2]!r} is not closed with {closer!r}", at)

    def field(self, at: int, path: str, path_at: int, default: str | None, end: int) -> None:
        _check_path(path, path_at)
        root, *rest = path.split(".")
        if not self.bound(root):
            self.fields.add(path)
        self.roots.add(root)
        args = [_jstr(path)]
        if rest or default is not None:
            args.append(_rest_expr(rest) if rest else "()")
        if default is not None:
            args.append(_jstr(default))
        expr = f"{_root_expr(root)}|_field({', '.join(args)})"
        self.tokens.append(_Token("field", at, end, "{{ " + expr + self.newlines(at, end) + " }}"))

    def dollar_field(self, at: int) -> int:
        src = self.src
        match = _FIELD_PATH.match(src, at + 2)
        if match is None:
            raise _Error("'${' must hold a field name, like ${name}", at)
        path, i, default = match.group(1), match.end(), None
        if src.startswith("!", i):
            literal = _LITERAL.match(src, i + 1)
            if literal is None:
                raise _Error("'!' needs a default value, like ${name!\"friend\"}: an empty default is not allowed", i)
            default = _unquote(literal.group(1)) if literal.group(1) else literal.group(2)
            if not default.strip():
                raise _Error("the default is blank: a field never renders empty", literal.start(1))
            i = literal.end()
        if not src.startswith("}", i):
            if i >= len(src):
                raise _Error("'${' is not closed with '}'", at)
            if src[i] == "?":
                raise _Error("?built-ins are not supported: use a Jinja filter, like {{ name|upper }}", i)
            raise _Error(f"unexpected {src[i]!r} in ${{...}}", i)
        self.field(at, path, match.start(1), default, i + 1)
        return i + 1

    def bound(self, root: str) -> bool:
        return any(frame.loop_var == root for frame in self.stack)

    def directive(self, at: int) -> int:
        src = self.src
        match = _DIRECTIVE.match(src, at)
        if match is None:
            raise _Error("'<#' starts a directive; write <#if ...>, <#list ...> or <#-- ... -->", at)
        name = match.group(1)
        if name == "--":
            close = src.find("-->", match.end())
            if close < 0:
                raise _Error("'<#--' is not closed with '-->'", at)
            end = close + 3
            breaks = self.newlines(at, end)
            self.tokens.append(_Token("comment", at, end, "{#" + breaks + "#}" if breaks else ""))
            return end
        if name in ("if", "elseif"):
            if name == "elseif":
                frame = self.top(at, "<#elseif>", ("if",))
                if frame.has_else:
                    raise _Error("<#elseif> after <#else>", at)
            condition, end = self.condition(at, match.end())
            if name == "if":
                self.stack.append(_Frame("if", at))
            tag = "if" if name == "if" else "elif"
            self.tokens.append(_Token(name, at, end, f"{{% {tag} {condition}{self.newlines(at, end)} %}}"))
            return end
        if name == "else":
            close = _ELSE.match(src, match.end())
            if close is None:
                raise _Error("<#else> takes nothing: write <#else>", at)
            frame = self.top(at, "<#else>", ("if", "list"))
            if frame.has_else:
                raise _Error(f"a second <#else> in the same <#{frame.kind}>", at)
            frame.has_else = True
            self.tokens.append(_Token("else", at, close.end(), "{% else" + self.newlines(at, close.end()) + " %}"))
            return close.end()
        if name == "list":
            form = _LIST.match(src, match.end())
            if form is None:
                raise _Error("write <#list items as item>", at)
            path, var = form.group(1), form.group(2)
            if var in _RESERVED or var in _WORD_OPERATORS:
                raise _Error(f"{var!r} cannot name a list item", form.start(2))
            _check_path(path, form.start(1))
            root, *rest = path.split(".")
            if not self.bound(root):
                self.fields.add(path)
            self.roots.update((root, var))
            args = [_jstr(path)] + ([_rest_expr(rest)] if rest else [])
            seq = f"{_root_expr(root)}|_seq({', '.join(args)})"
            end = form.end()
            self.stack.append(_Frame("list", at, loop_var=var))
            self.tokens.append(_Token("list", at, end, f"{{% for {var} in {seq}{self.newlines(at, end)} %}}"))
            return end
        raise _Error(f"unknown directive <#{name}>: only <#if>, <#elseif>, <#else>, <#list> are supported", at)

    def closing(self, at: int) -> int:
        match = _CLOSING.match(self.src, at)
        if match is None or match.group(1) not in ("if", "list"):
            shown = f"</#{match.group(1)}>" if match else "'</#'"
            raise _Error(f"unknown closing tag {shown}: only </#if> and </#list> are supported", at)
        kind = match.group(1)
        if not self.stack:
            raise _Error(f"</#{kind}> without a matching <#{kind}>", at)
        frame = self.stack[-1]
        if frame.kind != kind:
            line, column = _locate(self.src, frame.start)
            raise _Error(f"</#{kind}> found while <#{frame.kind}> (line {line}, column {column}) is open", at)
        self.stack.pop()
        end = match.end()
        tag = "endif" if kind == "if" else "endfor"
        self.tokens.append(_Token("end" + kind, at, end, "{% " + tag + self.newlines(at, end) + " %}"))
        return end

    def top(self, at: int, what: str, kinds: tuple[str, ...]) -> _Frame:
        if not self.stack or self.stack[-1].kind not in kinds:
            inside = " or ".join(f"<#{k}>" for k in kinds)
            raise _Error(f"{what} outside {inside}", at)
        return self.stack[-1]

    def newlines(self, start: int, end: int) -> str:
        return "\n" * self.src.count("\n", start, end)

    def condition(self, at: int, start: int) -> tuple[str, int]:
        """The condition's Jinja expression and where its tag ends; see the module docstring for the rule."""
        src = self.src
        tokens: list[tuple[str, str, int]] = []
        ends: list[tuple[int, int]] = []  # (number of tokens before it, offset of a `>` that may end the tag)
        depth, i, limit, stop = 0, start, min(len(src), at + MAX_CONDITION_CHARS), None
        while i < limit:
            match = _COND_TOKEN.match(src, i)
            if match is None:
                stop = i
                break
            kind = match.lastgroup
            text = match.group()
            if kind == "op" and text == "(":
                depth += 1
            elif kind == "op" and text == ")":
                if depth == 0:
                    stop = i
                    break
                depth -= 1
            elif kind == "op" and text == ">" and depth == 0 and src[i + 1 : i + 2] != ">":
                ends.append((len(tokens), i))
            if kind != "ws":
                tokens.append((kind, text, i))
            i = match.end()
        last_error: _Error | None = None
        for count, offset in reversed(ends):
            try:
                paths: set[str] = set()
                expr = _Condition(tokens[:count], offset, paths).parse()
            except _Error as exc:
                last_error = last_error or exc
                continue
            for path in paths:
                if not self.bound(path.split(".")[0]):
                    self.fields.add(path)
                self.roots.add(path.split(".")[0])
            return expr, offset + 1
        if last_error is not None:
            raise last_error
        if stop is not None and stop < len(src):
            raise _Error(f"unexpected {src[stop]!r} in the condition", stop)
        raise _Error("<#if ...> is not closed with '>'", at)

    # -- second pass: lines holding only directives disappear, then Jinja source

    def stripped(self) -> bytearray:
        """A mask of the characters dropped: the blanks and the line break of lines holding only directives."""
        src = self.src
        line_starts = [0] + [m.end() for m in re.finditer("\n", src)]
        directive_lines: set[int] = set()
        blocked: set[int] = set()
        line = 0
        for token in self.tokens:
            while line + 1 < len(line_starts) and line_starts[line + 1] <= token.start:
                line += 1
            last = line + src.count("\n", token.start, max(token.start, token.end - 1))
            if token.kind == "text":
                chunk_line = line
                for chunk in src[token.start : token.end].split("\n"):
                    if chunk.strip(" \t"):
                        blocked.add(chunk_line)
                    chunk_line += 1
            elif token.kind in _DIRECTIVES and last == line:
                directive_lines.add(line)
            else:
                blocked.update(range(line, last + 1))
        mask = bytearray(len(src))
        for line in directive_lines - blocked:
            start = line_starts[line]
            end = line_starts[line + 1] if line + 1 < len(line_starts) else len(src)
            for i in range(start, end):
                mask[i] = 1
        return mask

    def emit(self) -> str:
        mask = self.stripped()
        src, out = self.src, []
        for token in self.tokens:
            if token.kind != "text":
                out.append(token.jinja)
                continue
            if mask.find(1, token.start, token.end) < 0:
                _emit_text(out, src[token.start : token.end])
                continue
            chunk_start = token.start
            for i in range(token.start, token.end):
                if mask[i]:
                    _emit_text(out, src[chunk_start:i])
                    if src[i] == "\n":
                        out.append("{#\n#}")  # keeps Jinja's line numbers equal to the source's
                    chunk_start = i + 1
            _emit_text(out, src[chunk_start : token.end])
        return "".join(out)


def _emit_text(out: list[str], text: str) -> None:
    # Text never holds `{{`, `{%` or `{#` (those are Jinja tags); only a trailing `{` could make one with the next tag.
    if text.endswith("{"):
        out.append(text[:-1])
        out.append("{{ '{' }}")
    elif text:
        out.append(text)


def _locate(source: str, offset: int) -> tuple[int, int]:
    line = source.count("\n", 0, offset) + 1
    return line, offset - (source.rfind("\n", 0, offset) + 1) + 1


def _syntax_error(source: str, exc: _Error) -> TemplateSyntaxError:
    return TemplateSyntaxError(exc.message, *_locate(source, exc.offset))


def _normalise(source: str) -> str:
    # Jinja turns every line break into "\n"; doing it first keeps offsets, lines and columns in step with Jinja's.
    return source.replace("\r\n", "\n").replace("\r", "\n")


def _translate(source: str) -> _Translation:
    src = _normalise(source)
    translator = _Translator(src)
    try:
        translator.tokenize()
    except _Error as exc:
        raise _syntax_error(src, exc) from None
    native = []
    for token in translator.tokens:
        if token.kind == "native":
            line, column = _locate(src, token.start)
            native.append((line, line + src.count("\n", token.start, token.end), column))
    texts = [(token.start, token.end) for token in translator.tokens if token.kind in ("text", "native")]
    tags = {token.start for token in translator.tokens if token.kind not in ("text", "native")}
    return _Translation(src, translator.emit(), translator.fields, translator.roots, native, texts, tags)


def to_jinja(source: str) -> str:
    """The Jinja source a template compiles to; TemplateSyntaxError points into `source`."""
    return _translate(source).jinja


# ---------------------------------------------------------------------------------------------------------------
# Compile-time checks on Jinja's tree.

_MARKERS = ("${", "<#", "</#")
_DYNAMIC = "\x00"  # stands for a value from the data in the output analysis: it ends any marker


def _jinja_error(translation: _Translation, lineno: int, message: str) -> TemplateSyntaxError:
    column = 1
    for first, last, tag_column in translation.native:
        if first <= lineno <= last:
            column = tag_column if first == lineno else 1
            break
    return TemplateSyntaxError(message, lineno, column)


class _Placeholder(Exception):
    def __init__(self, marker: str, text: str, lineno: int) -> None:
        self.marker, self.text, self.lineno = marker, text, lineno


def _emit_tails(tails: frozenset[str], text: str, lineno: int) -> frozenset[str]:
    if not text:
        return tails
    out = set()
    for tail in tails:
        joined = tail + text
        for marker in _MARKERS:
            if marker in joined:
                raise _Placeholder(marker, text, lineno)
        out.add(joined[-2:])
    return frozenset(out)


class _Output:
    """Which last two characters the output may end with at each point, text from the template only (a value
    from the data is _DYNAMIC): if a marker can form from template text alone, some render sends it raw."""

    def __init__(self, html: bool, env: _Sandbox) -> None:
        self.html = html
        self.eval_ctx = nodes.EvalContext(env)

    def body(self, body: list[nodes.Node], tails: frozenset[str]) -> frozenset[str]:
        for node in body:
            tails = self.node(node, tails)
        return tails

    def node(self, node: nodes.Node, tails: frozenset[str]) -> frozenset[str]:
        if isinstance(node, nodes.Output):
            for child in node.nodes:
                if isinstance(child, nodes.TemplateData):
                    tails = _emit_tails(tails, child.data, child.lineno)
                    continue
                try:
                    value = child.as_const(self.eval_ctx)
                except Exception:
                    tails = frozenset({_DYNAMIC})
                    continue
                tails = _emit_tails(tails, str(escape(value) if self.html else value), child.lineno)
            return tails
        if isinstance(node, nodes.If):
            after = set(self.body(node.body, tails))
            for branch in node.elif_:
                after |= self.body(branch.body, tails)
            after |= self.body(node.else_, tails) if node.else_ else tails
            return frozenset(after)
        if isinstance(node, nodes.For):
            entry = tails
            while True:  # the tails a loop body may start from: a fixpoint over a finite set
                grown = entry | self.body(node.body, entry)
                if grown == entry:
                    break
                entry = grown
            return self.body(node.body, entry) | (self.body(node.else_, tails) if node.else_ else tails)
        if isinstance(node, nodes.Macro | nodes.CallBlock | nodes.FilterBlock | nodes.AssignBlock):
            self.body(node.body, frozenset({_DYNAMIC}))  # checked alone; its output reaches the message as a value
            return tails if isinstance(node, nodes.Macro | nodes.AssignBlock) else frozenset({_DYNAMIC})
        if isinstance(node, nodes.Scope | nodes.With | nodes.Block | nodes.ScopedEvalContextModifier):
            return self.body(node.body, tails)
        if isinstance(node, nodes.Assign | nodes.ExprStmt | nodes.EvalContextModifier):
            return tails
        return frozenset({_DYNAMIC})


def _check_tree(tree: nodes.Template, translation: _Translation, html: bool, env: _Sandbox) -> None:
    for node in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        name = type(node).__name__.lower()
        raise _jinja_error(translation, node.lineno, f"{name} is not allowed: a template cannot read other files")
    message = "the template itself would send {!r} raw; write it from data or rephrase"
    # A string literal holding a marker could reach the output by a path the analysis below cannot follow (a
    # default, a variable): refused wherever it stands.
    for const in tree.find_all(nodes.Const):
        for marker in _MARKERS:
            if isinstance(const.value, str) and marker in const.value:
                line = const.lineno or 1
                column = _column(translation, line, marker, [(0, len(translation.source))])
                raise TemplateSyntaxError(message.format(marker), line, column)
    try:
        _Output(html, env).body(tree.body, frozenset({""}))
    except _Placeholder as exc:
        line = exc.lineno or 1
        column = _column(translation, line, exc.text.split("\n")[0], translation.texts)
        raise TemplateSyntaxError(message.format(exc.marker), line, column) from None


def _column(translation: _Translation, line: int, piece: str, spans: list[tuple[int, int]]) -> int:
    """Jinja keeps only the line: the column of the first of `spans` on it that holds `piece`, else 1."""
    source = translation.source
    for start, end in spans:
        at = source.find(piece, start, end) if piece else -1
        while at >= 0:
            found_line, column = _locate(source, at)
            if found_line == line and at not in translation.tags:
                return column
            if found_line > line:
                break
            at = source.find(piece, at + 1, end)
    return 1


def _wrap(node: nodes.Expr, name: str, env: _Sandbox) -> nodes.Filter:
    wrapped = nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)
    wrapped.set_environment(env)
    return wrapped


def _harden(tree: nodes.Template, env: _Sandbox) -> None:
    """Every loop checks the deadline at each step; every native output refuses to print a function."""
    for loop in tree.find_all(nodes.For):
        loop.iter = _wrap(loop.iter, "_guard", env)
    for output in tree.find_all(nodes.Output):
        output.nodes = [
            child
            if isinstance(child, nodes.TemplateData | nodes.Const)
            or (isinstance(child, nodes.Filter) and child.name == "_field")
            else _wrap(child, "_show", env)
            for child in output.nodes
        ]


# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledTemplate:
    source: str
    jinja_source: str
    fields: frozenset[str]  # every data path referenced, e.g. "name", "user.vip_level", "items"
    html: bool = False
    _template: Template = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    def render(
        self, context: Mapping[str, Any], *, defaults: Mapping[str, Any] | None = None, time_limit_s: float = 0.05
    ) -> str:
        """One message's copy. Raises MissingField, RenderTimeout, or a jinja2.TemplateError (SecurityError for a
        sandbox violation, TemplateRuntimeError for anything else the template did wrong)."""
        template = self._template
        state = _STATE
        saved = state.deadline, state.defaults
        state.deadline = perf_counter() + time_limit_s
        state.defaults = defaults
        chunks: list[str] = []
        size = 0
        try:
            for chunk in template.root_render_func(template.new_context(context)):  # type: ignore[arg-type]
                size += len(chunk)
                if size > MAX_OUTPUT_CHARS:
                    raise RenderTimeout(f"output over {MAX_OUTPUT_CHARS} characters")
                chunks.append(chunk)
        except (MissingField, RenderTimeout, jinja2.TemplateError):
            raise
        except RecursionError:
            raise RenderTimeout("recursion too deep") from None
        except Exception as exc:
            # 1/0, "a" + 1, ...: the template's fault, reported as such, never a crash of the stream.
            raise TemplateRuntimeError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            state.deadline, state.defaults = saved
        return "".join(chunks)


def compile_template(source: str, *, html: bool = False) -> CompiledTemplate:
    """Validate fully (our syntax, Jinja's, the sandbox's rules) and compile; TemplateSyntaxError on any fault."""
    translation = _translate(source)
    env = _HTML_ENV if html else _TEXT_ENV
    try:
        tree = env.parse(translation.jinja)
        _check_tree(tree, translation, html, env)
        native_names = meta.find_undeclared_variables(tree) - set(env.globals) - translation.roots
        _harden(tree, env)
        code = env.compile(tree)
    except jinja2.TemplateSyntaxError as exc:
        raise _jinja_error(translation, exc.lineno or 1, exc.message or "invalid Jinja syntax") from None
    template = env.template_class.from_code(env, code, dict(env.globals))
    fields = frozenset(translation.fields | native_names)
    return CompiledTemplate(source, translation.jinja, fields, html, template)


_CACHE: OrderedDict[tuple[Hashable, bool], CompiledTemplate] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def compiled(key: Hashable, source: str, *, html: bool = False) -> CompiledTemplate:
    """compile_template, cached per key (e.g. (template_id, version, part)), least recently used out first. A key
    seen with another source is compiled again, so a template edited without a version bump is never stale."""
    cache_key = (key, html)
    with _CACHE_LOCK:
        hit = _CACHE.get(cache_key)
        if hit is not None and (hit.source is source or hit.source == source):
            _CACHE.move_to_end(cache_key)
            return hit
    result = compile_template(source, html=html)
    with _CACHE_LOCK:
        _CACHE[cache_key] = result
        _CACHE.move_to_end(cache_key)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return result
