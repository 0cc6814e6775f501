"""OpenNebula templates: the attribute multimap, its text and XML forms.

Owns: `Template` (oned's std::multimap of single and vector attributes,
rendered sorted by name with every value in CDATA), the text parser that
reproduces oned's flex/bison grammar (src/parsers/template_parser.l and
template_syntax.y) including its error messages and locations, the XML form
(`parse_str_or_xml`), and oned's merge semantics (Template::merge).
Must not: know what any attribute means.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from lxml import etree

Value = str | dict[str, str]


class TemplateError(Exception):
    """A template oned would refuse; str(e) is oned's message."""


def cdata(value: str) -> str:
    """oned's one_util::escape_xml: the value inside a CDATA section.
    (oned does not split a ']]>' inside a value; we do, to stay well-formed.)"""
    return "<![CDATA[" + value.replace("]]>", "]]]]><![CDATA[>") + "]]>"


@dataclass
class Template:
    """Ordered multimap name -> str | {KEY: str}. Names are upper case."""

    attrs: list[tuple[str, Value]] = field(default_factory=list)

    # -- reading ----------------------------------------------------------
    def get(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.attrs:
            if key == name and isinstance(value, str):
                return value
        return default

    def vector(self, name: str) -> dict[str, str] | None:
        for key, value in self.attrs:
            if key == name and isinstance(value, dict):
                return value
        return None

    def vectors(self, name: str) -> list[dict[str, str]]:
        return [v for k, v in self.attrs if k == name and isinstance(v, dict)]

    def has(self, name: str) -> bool:
        return any(k == name for k, _ in self.attrs)

    def names(self) -> list[str]:
        return [k for k, _ in self.attrs]

    def __iter__(self) -> Iterator[tuple[str, Value]]:
        return iter(self.attrs)

    def __len__(self) -> int:
        return len(self.attrs)

    # -- writing ----------------------------------------------------------
    def add(self, name: str, value: Value) -> None:
        """multimap insert: after existing attributes of the same name."""
        self.attrs.append((name.upper(), value))

    def replace(self, name: str, value: Value) -> None:
        self.erase(name)
        self.add(name, value)

    def erase(self, name: str) -> int:
        before = len(self.attrs)
        self.attrs = [(k, v) for k, v in self.attrs if k != name]
        return before - len(self.attrs)

    def remove_value(self, value: Value) -> None:
        self.attrs = [(k, v) for k, v in self.attrs if v is not value]

    def merge(self, other: Template) -> None:
        """Template::merge: every name in `other` is erased here first, then
        other's attributes are added (empty vectors are skipped)."""
        for name in set(other.names()):
            self.erase(name)
        for name, value in other.attrs:
            if isinstance(value, dict):
                if value:
                    self.add(name, dict(value))
            else:
                self.add(name, value)

    def copy(self) -> Template:
        return Template([(k, dict(v) if isinstance(v, dict) else v) for k, v in self.attrs])

    # -- forms ------------------------------------------------------------
    def sorted_attrs(self) -> list[tuple[str, Value]]:
        return sorted(self.attrs, key=lambda kv: kv[0])  # stable: multimap order

    def to_xml(self, root: str = "TEMPLATE", extra: str = "") -> str:
        out = [f"<{root}>"]
        for name, value in self.sorted_attrs():
            out.append(attr_xml(name, value))
        out.append(extra)
        out.append(f"</{root}>")
        return "".join(out)

    def to_str(self) -> str:
        """The KEY="value" text form (values re-escaped for the parser)."""
        lines = []
        for name, value in self.sorted_attrs():
            if isinstance(value, dict):
                inner = ", ".join(f'{k}="{_esc(v)}"' for k, v in sorted(value.items()))
                lines.append(f"{name}=[{inner}]")
            else:
                lines.append(f'{name}="{_esc(value)}"')
        return "\n".join(lines)

    def to_json(self) -> list[list[object]]:
        return [[k, v] for k, v in self.attrs]

    @classmethod
    def from_json(cls, data: list[list[object]]) -> Template:
        out = cls()
        for key, value in data:
            out.attrs.append((str(key), dict(value) if isinstance(value, dict) else str(value)))
        return out


def _esc(value: str) -> str:
    return value.replace('"', '\\"')


def attr_xml(name: str, value: Value) -> str:
    if isinstance(value, dict):
        inner = "".join(f"<{k}>{cdata(v)}</{k}>" for k, v in sorted(value.items()) if k)
        return f"<{name}>{inner}</{name}>"
    return f"<{name}>{cdata(value)}</{name}>"


# ---------------------------------------------------------------------------
# The text grammar (flex rules of template_parser.l, longest match wins,
# ties go to the earlier rule; locations as YY_USER_ACTION keeps them)
# ---------------------------------------------------------------------------

_BLANK = "[ \t]"
_INITIAL_RULES: list[tuple[str | None, re.Pattern[str]]] = [
    (None, re.compile(rf"{_BLANK}*#[^\n]*\n")),
    (None, re.compile(r"[ \t\n]+")),
    ("VARIABLE", re.compile(r"[A-Za-z0-9_]+")),
    ("EQUAL", re.compile(rf"{_BLANK}*={_BLANK}*")),          # BEGIN VALUE
    ("EQUAL_EMPTY", re.compile(rf"{_BLANK}*={_BLANK}*\n")),
    ("COMMA", re.compile(r"[ \t\n]*,[ \t\n]*")),
    ("CBRACKET", re.compile(r"[ \t\n]*\][ \t\n]*")),
]
_VALUE_RULES: list[tuple[str, re.Pattern[str]]] = [  # each one BEGINs INITIAL
    ("OBRACKET", re.compile(rf"{_BLANK}*\[[ \t\n]*")),
    ("CCDATA", re.compile(r"[^\n]*\]\]>[^\n]*")),
    ("QSTRING", re.compile(r'"(?:\\"|[^"])*"')),
    ("STRING", re.compile(r"[^=#\s,\[\]]+")),
]


@dataclass
class _Token:
    kind: str
    text: str
    line: int
    first: int
    last: int


def _longest(rules: list[tuple[str | None, re.Pattern[str]]] | list[tuple[str, re.Pattern[str]]],
             text: str, pos: int) -> tuple[int, str | None] | None:
    best: tuple[int, str | None] | None = None
    for kind, pattern in rules:
        m = pattern.match(text, pos)
        if m and m.end() > pos and (best is None or m.end() - pos > best[0]):
            best = (m.end() - pos, kind)
    return best


def _tokens(text: str) -> Iterator[_Token]:
    """flex with YY_USER_ACTION: columns never reset, lines count the
    newlines matched so far (yylineno starts at 0 in oned's scanner)."""
    pos, lineno, column = 0, 0, 1
    in_value = False
    while pos < len(text):
        best = _longest(_VALUE_RULES if in_value else _INITIAL_RULES, text, pos)
        if best is None:  # the default rule: ECHO one character, state kept
            length, kind, next_value = 1, None, in_value
        else:
            length, kind = best
            next_value = (kind == "EQUAL") if not in_value else False
        matched = text[pos:pos + length]
        lineno += matched.count("\n")
        first, column = column, column + length
        pos += length
        in_value = next_value
        if kind is not None:
            yield _Token(kind, matched, lineno, first, column)


def _value(token: _Token) -> str:
    value = token.text[1:-1] if token.kind == "QSTRING" else token.text
    return value.replace('\\"', '"')


_EXPECT = {
    "top": ["$end"],
    "var": ["EQUAL", "EQUAL_EMPTY"],
    "equal": ["OBRACKET", "CCDATA", "STRING"],
    "obracket": ["CBRACKET", "VARIABLE"],
    "avar": ["EQUAL"],
    "aequal": ["STRING"],
    "aval": ["COMMA", "CBRACKET"],
    "acomma": ["VARIABLE"],
}


def parse(text: str) -> Template:
    """Parse the KEY="value" / KEY=[K="v", ...] form; raises TemplateError
    with oned's "Parse error: ..." message."""
    tmpl = Template()
    state = "top"
    name = ""
    vector: dict[str, str] = {}
    akey = ""
    loc = (1, 1, 1)  # bison's initial yylloc: line 1, columns 1:1
    stream = _tokens(text)
    while True:
        token = next(stream, None)
        kind = token.kind if token else "$end"
        if kind == "QSTRING":
            kind = "STRING"
        if token:
            loc = (token.line, token.first, token.last)
        ok = True
        if state == "top":
            if kind == "VARIABLE":
                name, state = token.text.upper(), "var"  # type: ignore[union-attr]
            elif kind == "$end":
                break
            else:
                ok = False
        elif state == "var":
            if kind == "EQUAL":
                state = "equal"
            elif kind == "EQUAL_EMPTY":
                tmpl.add(name, "")
                state = "top"
            else:
                ok = False
        elif state == "equal":
            if kind == "STRING":
                tmpl.add(name, _value(token))  # type: ignore[arg-type]
                state = "top"
            elif kind == "OBRACKET":
                vector, state = {}, "obracket"
            elif kind == "CCDATA":
                raise TemplateError("Parse error.")
            else:
                ok = False
        elif state == "obracket":
            if kind == "CBRACKET":
                tmpl.add(name, {})
                state = "top"
            elif kind == "VARIABLE":
                akey, state = token.text.upper(), "avar"  # type: ignore[union-attr]
            else:
                ok = False
        elif state == "avar":
            ok = kind == "EQUAL"
            state = "aequal"
        elif state == "aequal":
            if kind == "STRING":
                vector.setdefault(akey, _value(token))  # type: ignore[arg-type]
                state = "aval"
            else:
                ok = False
        elif state == "aval":
            if kind == "COMMA":
                state = "acomma"
            elif kind == "CBRACKET":
                tmpl.add(name, vector)
                state = "top"
            else:
                ok = False
        elif state == "acomma":
            ok = kind == "VARIABLE"
            if ok:
                akey, state = token.text.upper(), "avar"  # type: ignore[union-attr]
        if not ok:
            expected = " or ".join(_EXPECT[state])
            raise TemplateError(
                f"Parse error: syntax error, unexpected {kind}, expecting {expected}"
                f" at line {loc[0]}, columns {loc[1]}:{loc[2]}")
    return _trimmed(tmpl)


def _trimmed(tmpl: Template) -> Template:
    """Template::trim_attributes: values lose surrounding white space."""
    out = Template()
    for name, value in tmpl.attrs:
        if isinstance(value, dict):
            out.attrs.append((name, {k: v.strip() for k, v in value.items()}))
        else:
            out.attrs.append((name, value.strip()))
    return out


def from_xml(text: str) -> Template:
    """Template::from_xml: the root's element children become attributes
    (text children -> single, element children -> vector); the root name is
    ignored."""
    try:
        root = etree.fromstring(text.encode())
    except etree.XMLSyntaxError as exc:
        raise TemplateError("Parse error: XML Template malformed.") from exc
    tmpl = Template()
    for child in root:
        if not isinstance(child.tag, str):
            continue
        elements = [c for c in child if isinstance(c.tag, str)]
        if not elements and child.text is not None:
            tmpl.add(child.tag.upper(), child.text)
        else:
            tmpl.add(child.tag.upper(),
                     {c.tag.upper(): (c.text or "") for c in elements})
    return _trimmed(tmpl)


def parse_str_or_xml(text: str) -> Template:
    """Template::parse_str_or_xml: XML when the text starts with '<'."""
    if text.startswith("<"):
        return from_xml(text)
    return parse(text)
