"""The VM template rebuilt from a saved document: runtime attributes go,
restored disks come in, values are quoted so nothing from the cloud is
interpreted."""

from __future__ import annotations

import pytest

from agent.vmtemplate import DiskSource, build, quote
from tests.onesim.testing import shared_dir


def test_quote_escapes_what_the_parser_treats_specially() -> None:
    assert quote('a"b\\c') == '"a\\"b\\c"'   # oned unescapes only \\"


def test_build_from_a_captured_document() -> None:
    shared = shared_dir()
    if shared is None:
        pytest.skip("../shared (OpenNebula captures) is absent")
    doc = (shared / "opennebula" / "captures" / "vm.info.running.xml").read_text()
    text = build(doc, "web-restored-3", {0: DiskSource(42)})
    assert text.startswith('NAME="web-restored-3"\n')
    assert 'IMAGE_ID="42"' in text
    for runtime in ("VMID=", "TEMPLATE_ID=", "AUTOMATIC_REQUIREMENTS", "TM_MAD_SYSTEM", "UUID"):
        assert runtime not in text, runtime
    assert 'MEMORY="128"' in text and "CONTEXT=[" in text


def test_user_attributes_are_kept_and_status_dropped() -> None:
    doc = ("<VM><TEMPLATE><DISK><DISK_ID>0</DISK_ID><IMAGE_ID>1</IMAGE_ID><TARGET>vda</TARGET>"
           "<SOURCE>/x</SOURCE></DISK><DISK><DISK_ID>1</DISK_ID><TYPE>fs</TYPE><SIZE>5</SIZE>"
           "<DATASTORE_ID>0</DATASTORE_ID></DISK></TEMPLATE><USER_TEMPLATE>"
           '<NOTE>say "hi"</NOTE><ERROR>old</ERROR><ONEBACK_STATUS>ok</ONEBACK_STATUS>'
           "</USER_TEMPLATE></VM>")
    text = build(doc, "n", {0: DiskSource(9), 1: DiskSource(None)})
    assert 'NOTE="say \\"hi\\""' in text
    assert "ERROR" not in text and "ONEBACK_STATUS" not in text
    assert "SOURCE" not in text and "DATASTORE_ID" not in text
    assert 'TYPE="fs"' in text and 'SIZE="5"' in text and 'TARGET="vda"' in text
