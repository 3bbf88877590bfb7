"""Wikitext to plain text, with mwparserfromhell's parse tree.

Kept: prose, link labels, the text of formatting tags, headings as lines of their own, list
items. Removed: templates and template arguments, references, tables, galleries, math and other
extension tags, file/image/category links, interlanguage links, HTML comments and tags. Markup
that mwparserfromhell could not parse (an unclosed ``{{``, a stray ``<ref``) is removed by a last
regex pass, so no ``[[``, ``{{``, ``<ref`` or ``{|`` survives.
"""

from __future__ import annotations

import html
import re

import mwparserfromhell
from mwparserfromhell.nodes import (
    Argument,
    Comment,
    ExternalLink,
    Heading,
    HTMLEntity,
    Tag,
    Template,
    Text,
    Wikilink,
)
from mwparserfromhell.wikicode import Wikicode

# Extension and HTML tags whose whole content is markup or apparatus, not prose.
_DROP_TAGS = frozenset(
    {
        "ref",
        "references",
        "table",
        "gallery",
        "math",
        "chem",
        "ce",
        "timeline",
        "imagemap",
        "score",
        "graph",
        "templatedata",
        "syntaxhighlight",
        "source",
        "mapframe",
        "maplink",
        "hiero",
        "inputbox",
        "categorytree",
        "noinclude",
        "indicator",
        "section",
        "templatestyles",
        "charinsert",
        "rss",
    }
)
_BREAK_TAGS = frozenset({"br", "hr", "p"})
_RAW_TAGS = frozenset({"nowiki", "pre"})
# Interlanguage prefixes are lower-case language codes: de, fr, zh-min-nan, simple, ...
_INTERLANGUAGE = re.compile(r"^(?:[a-z]{2,3}(?:-[a-z0-9]+)*|simple)$")
_DEFAULT_DROP_PREFIXES = frozenset({"file", "image", "media", "category"})

_LEFTOVER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_LEFTOVER_TABLE = re.compile(r"\{\|.*?(?:\n\|\}|\Z)", re.S)
_LEFTOVER_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?(?:</ref\s*>|\Z)", re.S | re.I)
_LEFTOVER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_LEFTOVER_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*>")
_LEFTOVER_MARKUP = re.compile(r"\[\[|\]\]|\{\{|\}\}|\{\||\|\}|<ref\b", re.I)
_SPACES = re.compile(r"[ \t]*\n[ \t]*")
_BLANK_LINES = re.compile(r"\n{3,}")


def wikitext_to_text(wikitext: str, drop_link_prefixes: frozenset[str] = _DEFAULT_DROP_PREFIXES) -> str:
    """Plain text of an article's wikitext.

    ``drop_link_prefixes`` are lower-case namespace names whose links are not text (File, Image,
    Category and their localized names from the dump's siteinfo).
    """
    code = mwparserfromhell.parse(wikitext, skip_style_tags=False)
    parts: list[str] = []
    _emit(code, parts, drop_link_prefixes)
    text = "".join(parts)
    text = _remove_leftovers(text, drop_link_prefixes)
    text = _SPACES.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _emit(code: Wikicode, out: list[str], drop: frozenset[str]) -> None:
    for node in code.nodes:
        if isinstance(node, Text):
            out.append(node.value)
        elif isinstance(node, Heading):
            title: list[str] = []
            _emit(node.title, title, drop)
            out.append("".join(title).strip())  # the line break around it is in the text
        elif isinstance(node, Wikilink):
            _emit_wikilink(node, out, drop)
        elif isinstance(node, ExternalLink):
            if node.title is not None:
                _emit(node.title, out, drop)
            elif node.brackets is False:
                out.append(str(node.url))
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, Tag):
            _emit_tag(node, out, drop)
        elif isinstance(node, (Template, Argument, Comment)):
            continue


def _emit_wikilink(node: Wikilink, out: list[str], drop: frozenset[str]) -> None:
    target = str(node.title).strip()
    visible_colon = target.startswith(":")  # [[:Category:X]] is an ordinary link to X
    target = target.lstrip(":")
    if ":" in target and not visible_colon:
        prefix = target.split(":", 1)[0].strip()
        if prefix.lower() in drop or _INTERLANGUAGE.match(prefix):
            return
    if node.text is not None:
        _emit(node.text, out, drop)
    else:
        out.append(target)


def _emit_tag(node: Tag, out: list[str], drop: frozenset[str]) -> None:
    name = str(node.tag).strip().lower()
    if name in _DROP_TAGS:
        return
    if name in _BREAK_TAGS:
        out.append("\n")
        if name == "p" and node.contents is not None:
            _emit(node.contents, out, drop)
        return
    if name in _RAW_TAGS:
        if node.contents is not None:
            out.append(html.unescape(str(node.contents)))
        return
    if node.contents is not None and not node.self_closing:
        _emit(node.contents, out, drop)


def _remove_leftovers(text: str, drop: frozenset[str]) -> str:
    """Remove markup the parser left as text (unbalanced or malformed), innermost first."""
    text = _LEFTOVER_REF.sub("", text)
    previous = None
    while previous != text:
        previous = text
        text = _LEFTOVER_TEMPLATE.sub("", text)
    previous = None
    while previous != text:
        previous = text
        text = _LEFTOVER_LINK.sub(lambda m: _leftover_link(m.group(1), drop), text)
    text = _LEFTOVER_TABLE.sub("", text)
    text = _LEFTOVER_TAG.sub("", text)
    return _LEFTOVER_MARKUP.sub("", text)


def _leftover_link(inner: str, drop: frozenset[str]) -> str:
    """``[[target|label]]`` found as text: the same rules as a parsed link."""
    target, _, label = inner.partition("|")
    target = target.strip()
    if ":" in target and not target.startswith(":"):
        prefix = target.split(":", 1)[0].strip()
        if prefix.lower() in drop or _INTERLANGUAGE.match(prefix):
            return ""
    return label.rsplit("|", 1)[-1] if label else target.lstrip(":")
