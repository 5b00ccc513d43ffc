r"""Pipeline text: parse ``"prune(sparsity=0.5,include=[/ffn/*]),cleanup"`` into passes and print it back.

Grammar (whitespace is allowed between tokens)::

    pipeline := [ pass ("," pass)* ]
    pass     := NAME [ "(" [ option ("," option)* ] ")" ]
    option   := NAME "=" value
    value    := scalar | "[" [ scalar ("," scalar)* ] "]"
    scalar   := WORD | STRING

A WORD is a run of letters, digits and ``_ . / * - + : ? @ % ~`` (numbers such as ``1e-3`` and patterns such as
``/encoder/*.MatMul`` are words); a STRING is quoted with ``'`` or ``"`` and ``\\`` escapes the next character.
Values are converted by the type of the options dataclass field: ``bool`` (``true``/``false``), ``int``,
``float``, ``str``, optional variants (``none``) and ``tuple[str, ...]`` (a single scalar becomes a 1-tuple).
A ``str`` field whose metadata has ``"choices"`` (or typed ``Literal["a", "b"]``) accepts only those strings.

The syntax follows MLIR's textual pass pipelines (``mlir/docs/PassManagement.md``) reduced to one nesting level.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import re
import types
import typing
from typing import TYPE_CHECKING, Any

from effc.errors import PipelineError
from effc.passes.base import EffcPass, PassOptions, registered_passes

if TYPE_CHECKING:
    from effc.ir.calibration import Calibration

__all__ = ["Pipeline", "describe_passes", "format_pass", "parse_pipeline"]

_WORD = r"[\w./*\-+:?@%~]+"
_TOKEN = re.compile(
    rf"""(?P<ws>\s+)|(?P<word>{_WORD})|(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')|(?P<punct>[(),=\[\]])|(?P<bad>.)""",
    re.DOTALL,
)


# kind: "word" | "string" | "punct" | "end"; text: unescaped for strings; pos: 0-based offset; length: chars
_Token = collections.namedtuple("_Token", "kind text pos length")


def _error(text: str, pos: int, length: int, message: str, hint: str | None = None) -> PipelineError:
    """A PipelineError that quotes the pipeline text and points at ``text[pos:pos+length]`` (1-based column)."""
    err = PipelineError(f"{message} at column {pos + 1} of {text!r}", hint)
    err.text, err.pos, err.length = text, pos, max(1, length)  # type: ignore[attr-defined]
    err.caret = text + "\n" + " " * pos + "^" * max(1, length)  # type: ignore[attr-defined]
    return err


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    for m in _TOKEN.finditer(text):
        kind, raw, pos = m.lastgroup, m.group(), m.start()
        if kind == "bad" and raw in "'\"":
            raise _error(text, pos, 1, "unterminated quoted string", f"close the string with {raw}")
        if kind == "bad":
            raise _error(text, pos, 1, f"unexpected character {raw!r}",
                         "write name(key=value,...) and separate passes with ','; quote values holding other "
                         "characters with ' or \" (ASCII quotes)")
        if kind != "ws":
            value = re.sub(r"\\(.)", r"\1", raw[1:-1], flags=re.DOTALL) if kind == "string" else raw
            tokens.append(_Token(kind, value, pos, len(raw)))
    return [*tokens, _Token("end", "", len(text), 1)]


def _did_you_mean(word: str, names: collections.abc.Iterable[str], what: str) -> str:
    """Hint listing all ``names``, the closest to ``word`` first (difflib), with a guess when one is close."""
    names = list(names)
    if not names:
        return f"{what}: (none)"
    ranked = difflib.get_close_matches(word, names, n=len(names), cutoff=0.0)
    ranked += sorted(n for n in names if n not in ranked)
    guess = [n for n in names if n.lower() == word.lower()] or difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    return (f"did you mean {guess[0]!r}? " if guess else "") + f"{what}: {', '.join(ranked)}"


@dataclasses.dataclass(frozen=True)
class TypeSpec:
    """How one options field is parsed and printed (derived from its dataclass field and type hint)."""

    name: str
    base: type  # bool | int | float | str
    optional: bool
    is_tuple: bool
    default: Any  # dataclasses.MISSING when the field has no default
    help: str
    choices: tuple[str, ...]


@functools.cache
def field_specs(options_cls: type[PassOptions]) -> tuple[TypeSpec, ...]:
    """The :class:`TypeSpec` of every field of an options dataclass, in field order.

    Raises:
        TypeError: a field type the pipeline text cannot express (a bug in the pass, not user input).
    """
    hints = typing.get_type_hints(options_cls)
    specs = []
    for f in dataclasses.fields(options_cls):
        t, optional, is_tuple = hints[f.name], False, False
        if typing.get_origin(t) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(t) if a is not type(None)]
            optional = len(args) < len(typing.get_args(t))
            t = args[0] if len(args) == 1 else None
        if typing.get_origin(t) is tuple:
            args = typing.get_args(t)
            is_tuple, t = True, args[0] if len(args) == 2 and args[1] is Ellipsis else None
        choices = tuple(f.metadata.get("choices", ()))
        if typing.get_origin(t) is typing.Literal and all(isinstance(a, str) for a in typing.get_args(t)):
            t, choices = str, typing.get_args(t)
        if t not in (bool, int, float, str):
            raise TypeError(f"{options_cls.__name__}.{f.name}: type {hints[f.name]} cannot be written in a pipeline")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        specs.append(TypeSpec(f.name, t, optional, is_tuple, default, f.metadata.get("help", ""), choices))
    return tuple(specs)


def type_name(spec: TypeSpec) -> str:
    """``"float"``, ``"tuple[str, ...]"``, ``"str | None"``, ``"one of magnitude|wanda"``, ..."""
    name = "|".join(spec.choices) if spec.choices else spec.base.__name__
    name = f"one of {name}" if spec.choices and not spec.is_tuple else name
    name = f"tuple[{name}, ...]" if spec.is_tuple else name
    return f"{name} | None" if spec.optional else name


def _convert_scalar(spec: TypeSpec, text: str, quoted: bool) -> Any:
    if spec.base is str:
        if spec.choices and text not in spec.choices:
            raise ValueError(f"{text!r} is not one of {', '.join(spec.choices)}")
        return text
    if spec.base is bool and not quoted and text in ("true", "false"):
        return text == "true"
    if spec.base is int and not quoted and re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if spec.base is float and not quoted and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?inf", text):
        return float(text)
    expected = {bool: "true or false", int: "an integer", float: "a number"}[spec.base]
    raise ValueError(f"{text!r} is not {expected}")


def convert_value(spec: TypeSpec, raw: Any, is_list: bool) -> Any:
    """Convert ``raw`` (``(text, quoted)``, or a list of those when ``is_list``) to the field's type.

    Raises:
        ValueError: the text does not fit the field's type (the parser turns it into a PipelineError).
    """
    if is_list:
        if not spec.is_tuple:
            raise ValueError(f"a list is not allowed here, expected {type_name(spec)}")
        return tuple(_convert_scalar(spec, text, quoted) for text, quoted in raw)
    text, quoted = raw
    if spec.optional and not quoted and text == "none":
        return None
    value = _convert_scalar(spec, text, quoted)
    return (value,) if spec.is_tuple else value


def format_value(spec: TypeSpec, value: Any, top: bool = True) -> str:
    """Canonical text of one option value (inverse of :func:`convert_value`)."""
    if value is None:
        return "none"
    if spec.is_tuple and top:
        return "[" + ",".join(format_value(spec, v, top=False) for v in value) + "]"
    if spec.base is bool:
        return "true" if value else "false"
    if spec.base in (int, float):
        return repr(spec.base(value))  # repr(float) is the shortest text that reads back to the same double
    if re.fullmatch(_WORD, value) and not (top and spec.optional and value == "none"):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Parser:
    """Recursive descent over the tokens; every error names the offending token's column."""

    def __init__(self, text: str) -> None:
        self.text, self.tokens, self.i = text, _tokenize(text), 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def accept(self, punct: str) -> _Token | None:
        """Consume and return the next token when it is ``punct``."""
        tok = self.tokens[self.i]
        if tok.kind == "punct" and tok.text == punct:
            self.i += 1
            return tok
        return None

    def take(self, kinds: tuple[str, ...], what: str, hint: str | None = None) -> _Token:
        """Consume the next token; it must be of one of ``kinds`` (``"word"``, ``"string"``) or be ``what``."""
        tok = self.tokens[self.i]
        self.i += 1
        if tok.kind in kinds or (tok.kind == "punct" and tok.text == what):
            return tok
        found = "end of text" if tok.kind == "end" else repr(tok.text)
        raise self.error(tok, f"expected {what if kinds else repr(what)}, found {found}", hint)

    def error(self, tok: _Token, message: str, hint: str | None = None) -> PipelineError:
        return _error(self.text, tok.pos, tok.length, message, hint)

    def value(self) -> tuple[_Token, list[_Token] | _Token]:
        """Return (first token, scalar token or list of scalar tokens)."""
        first, hint = self.peek(), "quote values with special characters"
        if not self.accept("["):
            return first, self.take(("word", "string"), "a value", hint)
        items: list[_Token] = []
        if not self.accept("]"):
            items.append(self.take(("word", "string"), "a value", hint))
            while self.accept(","):
                items.append(self.take(("word", "string"), "a value", hint))
            self.take((), "]", "close the list with ']'")
        return first, items

    def pass_(self, calibration: Calibration | None) -> EffcPass:
        name_tok = self.take(("word",), "a pass name", "passes are separated by ','")
        passes = registered_passes()
        cls = passes.get(name_tok.text)
        if cls is None:
            hint = _did_you_mean(name_tok.text, passes, "registered passes")
            raise self.error(name_tok, f"unknown pass {name_tok.text!r}", hint)
        specs = {s.name: s for s in field_specs(cls.Options)}
        values: dict[str, Any] = {}
        end = name_tok.pos + name_tok.length
        if self.accept("("):
            if not self.accept(")"):
                self._option(cls, specs, values)
                while self.accept(","):
                    self._option(cls, specs, values)
                self.take((), ")", "separate options with ',' and close with ')'")
            end = self.tokens[self.i - 1].pos + 1
        segment = self.text[name_tok.pos : end]
        try:
            return cls(cls.Options(**values), calibration=calibration)
        except PipelineError as e:
            if e.message.startswith(f"{cls.name}(") or e.message.startswith(segment):
                raise
            raise PipelineError(f"{segment}: {e.message}", e.hint) from e

    def _option(self, cls: type[EffcPass], specs: dict[str, TypeSpec], values: dict[str, Any]) -> None:
        hint = f"options of '{cls.name}': {', '.join(specs) or '(none)'}; close the list with ')'"
        key = self.take(("word",), f"an option name of '{cls.name}'", hint)
        spec = specs.get(key.text)
        if spec is None:
            hint = _did_you_mean(key.text, specs, f"options of '{cls.name}'")
            raise self.error(key, f"pass '{cls.name}' has no option {key.text!r}", hint)
        if key.text in values:
            raise self.error(key, f"option {key.text!r} of '{cls.name}' given twice", "give each option once")
        self.take((), "=", f"write options as {key.text}=value")
        first, raw = self.value()
        try:
            if isinstance(raw, list):
                values[key.text] = convert_value(spec, [(t.text, t.kind == "string") for t in raw], is_list=True)
            else:
                values[key.text] = convert_value(spec, (raw.text, raw.kind == "string"), is_list=False)
        except ValueError as e:
            message, hint = f"bad value for {cls.name}({key.text}=...): {e}", f"{key.text} expects {type_name(spec)}"
            raise self.error(first, message, hint) from None


class Pipeline(collections.abc.Sequence):
    """An ordered sequence of :class:`EffcPass` instances; ``str()`` is the canonical pipeline text.

    Two pipelines are equal when they hold the same pass classes with equal options, in the same order.

    Args:
        passes: the passes, in run order.
    """

    def __init__(self, passes: collections.abc.Iterable[EffcPass] = ()) -> None:
        self._passes = list(passes)
        bad = [type(p).__name__ for p in self._passes if not isinstance(p, EffcPass)]
        if bad:
            raise TypeError(f"a Pipeline holds EffcPass instances, got {bad[0]}")

    def __getitem__(self, index):
        return Pipeline(self._passes[index]) if isinstance(index, slice) else self._passes[index]

    def __len__(self) -> int:
        return len(self._passes)

    def __str__(self) -> str:
        return ",".join(str(p) for p in self._passes)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pipeline):
            return NotImplemented
        return [(type(p), p.options) for p in self] == [(type(p), p.options) for p in other]

    __hash__ = None  # type: ignore[assignment]

    @property
    def names(self) -> list[str]:
        """Pass names in run order."""
        return [p.name for p in self._passes]


def parse_pipeline(text: str, calibration: Calibration | None = None) -> Pipeline:
    """Parse pipeline text into a :class:`Pipeline`; options are validated as each pass is built.

    Args:
        text: e.g. ``"prune(sparsity=0.5,method=wanda),cleanup"``; empty or blank text gives an empty pipeline.
        calibration: handed to every pass (data-driven passes use it, the others ignore it).

    Returns:
        The passes in order.

    Raises:
        PipelineError: a syntax error (column given), an unknown pass (candidates listed, closest first), an unknown
            option (the pass's options listed), a value of the wrong type (option and expected type named), or a
            value the options dataclass rejects.
    """
    if not isinstance(text, str):
        raise PipelineError(f"pipeline text must be a string, got {type(text).__name__}")
    parser = _Parser(text)
    passes: list[EffcPass] = []
    while parser.peek().kind != "end":
        if passes:
            parser.take((), ",", "separate passes with ','")
        passes.append(parser.pass_(calibration))
    return Pipeline(passes)


def format_pass(name: str, options: PassOptions) -> str:
    """Canonical text of one pass: ``name`` or ``name(key=value,...)`` with non-default options in field order.

    Floats print with ``repr`` (exact round trip), bools as ``true``/``false``, tuples as ``[a,b]``, strings
    quoted only when they are not a plain word (or would read as ``none`` for an optional field).
    """
    parts = []
    for spec in field_specs(type(options)):
        value = getattr(options, spec.name)
        if value != spec.default:
            parts.append(f"{spec.name}={format_value(spec, value)}")
    return f"{name}({','.join(parts)})" if parts else name


def describe_passes() -> list[dict[str, Any]]:
    """Every registered pass for ``effc passes``.

    Returns:
        One dict per pass, sorted by name: ``name``, ``summary``, ``exact``, ``uses_calibration`` and ``options``,
        a list of ``{"name", "type", "default", "help"}`` (plus ``"choices"`` where the field lists them);
        defaults are JSON-friendly (tuples become lists).
    """
    out = []
    for name, cls in registered_passes().items():
        options = []
        for spec in field_specs(cls.Options):
            default = list(spec.default) if isinstance(spec.default, tuple) else spec.default
            options.append({"name": spec.name, "type": type_name(spec), "default": default, "help": spec.help})
            options[-1].update({"choices": list(spec.choices)} if spec.choices else {})
        info = {"summary": cls.summary, "exact": cls.exact, "uses_calibration": cls.uses_calibration}
        out.append({"name": name, **info, "options": options})
    return out
