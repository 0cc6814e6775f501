"""The boundaries of STYLE.md, held by parsing the package's imports."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[1] / "agent"

# external system -> the only module allowed to import it
BOUNDARIES = {
    "xmlrpc": {"cloud.py"},  # oned's XML-RPC, through the standard library
    "pyone": set(),          # the tests' client only; the agent no longer needs it
    "requests": set(),
    "zmq": {"subscriber.py"},
    "sqlite3": {"catalog.py"},
    "sqlite_utils": {"catalog.py"},
    "cryptography": {"encryption.py"},   # agent/store/encryption.py
    "mfusepy": {"mount.py"},             # FUSE: agent/mount.py
    "prometheus_client": {"metrics.py"},
    "boto3": {"s3.py"},
    "botocore": {"s3.py"},
}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_each_external_system_has_one_boundary_module() -> None:
    for path in AGENT.rglob("*.py"):
        found = imports(path)
        for lib, allowed in BOUNDARIES.items():
            if lib in found:
                rel = str(path.relative_to(AGENT))
                assert path.name in allowed or rel.split("/")[0] + ".py" in allowed, (
                    f"{rel} imports {lib}")


def test_model_and_errors_import_nothing_from_the_package() -> None:
    for name in ("model.py", "errors.py"):
        assert "agent" not in imports(AGENT / name), name


def test_engine_never_prints() -> None:
    for path in AGENT.rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "print", f"{path.name} prints"


def test_only_xmldoc_parses_xml() -> None:
    for path in AGENT.rglob("*.py"):
        if path.name == "xmldoc.py":
            continue
        text = path.read_text()
        for call in ("etree.fromstring(", "etree.XML(", "etree.parse(", "ElementTree"):
            assert call not in text, f"{path.name} parses XML itself: use agent.xmldoc.parse"
