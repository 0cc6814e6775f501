"""The template language as oned's flex/bison parser reads it, including its
error messages and locations."""

from __future__ import annotations

import pytest

from tests.onesim.templates import Template, TemplateError, parse, parse_str_or_xml


@pytest.mark.parametrize("text, message", [
    # the two the real oned answered in the captures
    ('NAME="x"\nDISK=[IMAGE_ID="1"',
     "Parse error: syntax error, unexpected $end, expecting COMMA or CBRACKET at line 1, "
     "columns 25:28"),
    ('DISK=[IMAGE_ID=',
     "Parse error: syntax error, unexpected $end, expecting STRING at line 0, columns 15:16"),
    # other states of the grammar
    ("A B", "Parse error: syntax error, unexpected VARIABLE, expecting EQUAL or EQUAL_EMPTY at "
            "line 0, columns 3:4"),
    ("A=", "Parse error: syntax error, unexpected $end, expecting OBRACKET or CCDATA or STRING at"
           " line 0, columns 2:3"),
    ("D=[A=1,]", "Parse error: syntax error, unexpected CBRACKET, expecting VARIABLE at line 0, "
                 "columns 8:9"),
    ('A="1"\n,', "Parse error: syntax error, unexpected COMMA, expecting $end at line 1, "
                 "columns 6:8"),
    ("A=x]]>", "Parse error."),
])
def test_errors_are_worded_like_oned(text: str, message: str) -> None:
    with pytest.raises(TemplateError) as err:
        parse(text)
    assert str(err.value) == message


def test_values_vectors_comments_and_empties() -> None:
    tmpl = parse('# a comment\nNAME = "vm one"\nname2=plain\nDISK=[ image_id = "0", '
                 'size="4" ,\n  TYPE=fs ]\nEMPTY=\nVEC=[]\nQ="say \\"hi\\""\n')
    assert tmpl.attrs == [("NAME", "vm one"), ("NAME2", "plain"),
                          ("DISK", {"IMAGE_ID": "0", "SIZE": "4", "TYPE": "fs"}),
                          ("EMPTY", ""), ("VEC", {}), ("Q", 'say "hi"')]


def test_xml_form_and_rendering() -> None:
    tmpl = parse_str_or_xml("<ANY><B>2</B><A>1</A><DISK><SIZE>4</SIZE></DISK></ANY>")
    assert tmpl.get("A") == "1" and tmpl.vector("DISK") == {"SIZE": "4"}
    assert tmpl.to_xml() == ("<TEMPLATE><A><![CDATA[1]]></A><B><![CDATA[2]]></B>"
                             "<DISK><SIZE><![CDATA[4]]></SIZE></DISK></TEMPLATE>")
    with pytest.raises(TemplateError, match=r"^Parse error: XML Template malformed.$"):
        parse_str_or_xml("<A>")


def test_merge_replaces_whole_attributes() -> None:
    base = parse('A="1"\nDISK=[IMAGE_ID="0"]\nDISK=[IMAGE_ID="1"]\nKEEP="k"')
    base.merge(parse('DISK=[IMAGE_ID="9"]\nA="2"'))
    assert base.attrs == [("KEEP", "k"), ("DISK", {"IMAGE_ID": "9"}), ("A", "2")]
    assert Template([("X", "a]]>b")]).to_xml().count("CDATA") == 2  # still well-formed
