"""Wikitext cleaning on hand-written markup: what is kept, what goes."""

from __future__ import annotations

from rnnpipe.pipeline.data.wikitext import wikitext_to_text


def test_prose_links_and_headings_are_kept():
    src = "Intro with [[Link|a label]] and [[Plain link]].\n\n== History ==\nText '''bold''' ''it''.\n"
    assert wikitext_to_text(src) == "Intro with a label and Plain link.\n\nHistory\nText bold it."


def test_templates_refs_tables_files_categories_comments_removed():
    src = (
        "A{{Infobox|x=[[y]]|z={{nested}}}} b<ref name=a>cite {{c}}</ref> c<ref name=b/>.\n"
        "{| class=wikitable\n|-\n| cell || cell\n|}\n"
        "[[File:X.jpg|thumb|A caption with [[link]]]] [[Image:Y.png]] [[Category:Things]] [[de:Ding]]\n"
        "<!-- hidden --> end &amp; <math>x^2</math> <gallery>a.jpg|b</gallery>"
    )
    out = wikitext_to_text(src)
    assert out == "A b c.\n\nend &"
    for markup in ("[[", "{{", "<ref", "{|", "thumb", "Category", "hidden", "Ding"):
        assert markup not in out


def test_localized_file_namespace_and_visible_colon_links():
    src = "[[Datei:Bild.jpg|mini|Text]] see [[:Category:Foo|the category]] and [[:Wikipedia:About]]"
    assert wikitext_to_text(src, frozenset({"datei", "kategorie"})) == "see the category and Wikipedia:About"


def test_unbalanced_markup_is_removed_by_the_last_pass():
    src = "Start [[File:A.svg|thumb|caption '''bold'' &lt;br /&gt;]] {{unclosed template and end ]] text"
    out = wikitext_to_text(src)
    assert "[[" not in out and "{{" not in out and "]]" not in out and "thumb" not in out
    assert out.startswith("Start") and out.endswith("text")


def test_external_links_lists_and_breaks():
    src = "* one [http://x.org label]\n* two http://bare.org\nline<br/>next"
    assert wikitext_to_text(src) == "one label\ntwo http://bare.org\nline\nnext"
