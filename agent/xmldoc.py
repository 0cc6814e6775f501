"""XML from OpenNebula, parsed safely: the only place oneback parses XML.

Owns: one hardened lxml parser for every document oned sends (pools, VM and
image documents, event bodies, saved documents read back from the catalog):
no entity expansion, no DTD loading, no network, and large text allowed
(a VM owner may put a 10 MB value into USER_TEMPLATE; libxml2's default
refuses text nodes over 10 MB, which would make one tenant's VM unreadable).
Malformed XML raises `XmlError`, a ValueError, with a short message.
Must not: know what the documents mean.
"""

from __future__ import annotations

import threading

from lxml import etree

_local = threading.local()


class XmlError(ValueError):
    """A document is not well-formed XML."""


def _parser(recover: bool) -> etree.XMLParser:
    # lxml parsers are not thread-safe: one per thread (and mode).
    attr = "recovering" if recover else "parser"
    parser = getattr(_local, attr, None)
    if parser is None:
        parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                                 dtd_validation=False, huge_tree=True, remove_pis=True,
                                 recover=recover)
        setattr(_local, attr, parser)
    return parser


def parse(text: str | bytes, *, recover: bool = False) -> etree._Element:
    """The root element of `text`. Raises XmlError if it is not XML.
    `recover`: libxml2 repairs what it can past the first error, as oned's
    hook manager (Nokogiri) does; only what comes *before* that error can be
    trusted to be as the sender wrote it."""
    data = text.encode() if isinstance(text, str) else text
    try:
        root = etree.fromstring(data, _parser(recover))
    except etree.XMLSyntaxError as e:
        raise XmlError(f"not well-formed XML: {str(e)[:200]}") from None
    if root is None:
        raise XmlError("not well-formed XML: nothing could be recovered")
    return root
