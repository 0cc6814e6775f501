"""A VM template that oned accepts, rebuilt from a saved `one.vm.info` document.

Owns: which attributes of a running VM's document are runtime-only (ids,
scheduler results, addresses oned assigns, driver-filled disk attributes)
and are dropped, how restored disks replace the old ones, and the template
text syntax (quoting). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from lxml import etree

from agent import xmldoc

# Top-level TEMPLATE attributes oned fills in at instantiation/deploy time.
_RUNTIME_TOP = {
    "AUTOMATIC_DS_REQUIREMENTS", "AUTOMATIC_NIC_REQUIREMENTS", "AUTOMATIC_REQUIREMENTS",
    "TEMPLATE_ID", "TM_MAD_SYSTEM", "VMID", "SECURITY_GROUP_RULE", "ERROR", "NIC_ALIAS",
    "PCI", "SNAPSHOT", "DISK_COST", "CPU_COST", "MEMORY_COST",
}
# USER_TEMPLATE attributes that describe the old VM's life, not its definition.
_RUNTIME_USER = {
    "ERROR", "SCHED_MESSAGE", "SUBMIT_ON_HOLD", "ONEBACK_STATUS", "ONEBACK_LAST_BACKUP",
    "ONEBACK_SNAPSHOT", "ONEBACK_SNAPSHOT_TTL",
}
# What a DISK keeps besides its source (IMAGE_ID, or TYPE/SIZE for volatile).
_DISK_KEEP = {"TARGET", "DEV_PREFIX", "SERIAL", "CACHE", "IO", "DISCARD", "IOTHREAD",
              "READONLY", "TOTAL_BYTES_SEC", "READ_BYTES_SEC", "WRITE_BYTES_SEC",
              "TOTAL_IOPS_SEC", "READ_IOPS_SEC", "WRITE_IOPS_SEC", "VIRTIO_BLK_QUEUES"}
_VOLATILE_KEEP = _DISK_KEEP | {"TYPE", "SIZE", "FORMAT"}
_NIC_KEEP = {"NETWORK", "NETWORK_ID", "NETWORK_UNAME", "NETWORK_UID", "MODEL",
             "SECURITY_GROUPS", "FILTER", "VIRTIO_QUEUES", "NAME"}
_CONTEXT_DROP = {"DISK_ID", "TARGET"}
_OS_DROP = {"UUID"}
_GRAPHICS_DROP = {"PORT"}


def quote(value: str) -> str:
    """`value` in double quotes as oned's template parser reads it back
    (src/parsers/template_parser.l, template_syntax.y): `"` becomes `\\"`, the
    only escape it knows; a backslash stays as it is. oned trims every value
    after parsing, which allows two more: a blank after a trailing backslash
    (else it would escape the closing quote), and a newline after a value
    holding `]]>` (else the line would be taken for CDATA and refused; so a
    vector must start each value on a line of its own, as `_vector` does)."""
    text = value.replace('"', '\\"')
    if text.endswith("\\"):
        text += " "
    if "]]>" in text:
        text += "\n"
    return f'"{text}"'


@dataclass(frozen=True)
class DiskSource:
    """What a restored disk is made of: a new image, or a volatile definition."""

    image_id: int | None = None


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _key(el: etree._Element) -> str | None:
    """The attribute name, if it is one a template can carry (names come from
    the cloud: anything else is dropped rather than written into the text)."""
    return el.tag if isinstance(el.tag, str) and _KEY.match(el.tag) else None


def _leaf(el: etree._Element) -> dict[str, str]:
    return {str(c.tag): c.text or "" for c in el if _key(c) and len(c) == 0}


def _vector(name: str, attrs: Mapping[str, str]) -> str:
    body = ",\n  ".join(f"{k}={quote(v)}" for k, v in attrs.items())
    return f"{name}=[\n  {body} ]"


def build(vm_document: str, name: str, disks: Mapping[int, DiskSource]) -> str:
    """The template text for a new VM like the one in `vm_document`, named
    `name`, whose DISKs come from `disks` (by original DISK_ID; a disk not in
    the mapping is dropped)."""
    root = xmldoc.parse(vm_document)
    template = root.find("TEMPLATE")
    lines: list[str] = [f"NAME={quote(name)}"]
    if template is not None:
        for el in template:
            if _key(el) is None:
                continue
            tag = str(el.tag)
            if tag in _RUNTIME_TOP or tag == "NAME":
                continue
            if tag == "DISK":
                attrs = _leaf(el)
                disk_id = int(attrs.get("DISK_ID", "-1"))
                source = disks.get(disk_id)
                if source is None:
                    continue
                if source.image_id is not None:
                    keep = {"IMAGE_ID": str(source.image_id)}
                    keep.update({k: v for k, v in attrs.items() if k in _DISK_KEEP})
                else:
                    keep = {k: v for k, v in attrs.items() if k in _VOLATILE_KEEP}
                lines.append(_vector("DISK", keep))
            elif tag == "NIC":
                attrs = {k: v for k, v in _leaf(el).items() if k in _NIC_KEEP}
                if "NETWORK_ID" in attrs:
                    attrs.pop("NETWORK", None)
                    attrs.pop("NETWORK_UNAME", None)
                    attrs.pop("NETWORK_UID", None)
                lines.append(_vector("NIC", attrs))
            elif len(el) == 0:
                lines.append(f"{tag}={quote(el.text or '')}")
            else:
                drop = {"CONTEXT": _CONTEXT_DROP, "OS": _OS_DROP,
                        "GRAPHICS": _GRAPHICS_DROP}.get(tag, set())
                attrs = {k: v for k, v in _leaf(el).items() if k not in drop}
                if attrs:
                    lines.append(_vector(tag, attrs))
    user = root.find("USER_TEMPLATE")
    if user is not None:
        for el in user:
            if _key(el) and len(el) == 0 and el.tag not in _RUNTIME_USER:
                lines.append(f"{el.tag}={quote(el.text or '')}")
    return "\n".join(lines) + "\n"
