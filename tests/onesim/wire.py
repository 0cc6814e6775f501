"""The XML-RPC wire format, byte for byte as oned's xmlrpc-c writes it.

Owns: decoding a methodCall body into (method, params), encoding oned's
result arrays ([true, value, 0] / [false, msg, code, resp_id, i8]) with the
CRLF layout, <i4>/<i8> types and escaping of xmlrpc-c, and XML-RPC faults
(what xmlrpc-c answers for a missing or mistyped parameter).
Must not: know any method's meaning.
"""

from __future__ import annotations

import xmlrpc.client
from dataclasses import dataclass
from typing import Any

HEADER = '<?xml version="1.0" encoding="UTF-8"?>\r\n'
FAULT_TYPE = -501  # xmlrpc-c fault::CODE_TYPE


class Fault(Exception):
    """An XML-RPC fault (xmlrpc-c rejects the call before oned sees it)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class I8:
    """A value xmlrpc-c sends as <i8>."""

    value: int


def decode_call(body: bytes) -> tuple[str, tuple[Any, ...]]:
    try:
        params, method = xmlrpc.client.loads(body, use_builtin_types=True)
    except Exception as exc:  # expat or xmlrpc.client errors
        raise Fault(-503, f"Call XML not a proper XML-RPC call.  {exc}") from exc
    if method is None:
        raise Fault(-503, "Call XML not a proper XML-RPC call.  No methodName")
    return method, params


def escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\r", "&#x0d;"))


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return f"<value><boolean>{int(value)}</boolean></value>"
    if isinstance(value, I8):
        return f"<value><i8>{value.value}</i8></value>"
    if isinstance(value, int):
        return f"<value><i4>{value}</i4></value>"
    if isinstance(value, float):
        return f"<value><double>{value!r}</double></value>"
    if isinstance(value, str):
        return f"<value><string>{escape(value)}</string></value>"
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode_result(values: list[Any]) -> bytes:
    """A methodResponse holding one array, laid out like xmlrpc-c."""
    items = "".join(_value(v) + "\r\n" for v in values)
    text = (HEADER + "<methodResponse>\r\n<params>\r\n<param><value><array><data>\r\n"
            + items + "</data></array></value></param>\r\n</params>\r\n</methodResponse>\r\n")
    return text.encode("utf-8")


def encode_fault(fault: Fault) -> bytes:
    text = (HEADER + "<methodResponse>\r\n<fault>\r\n<value><struct>\r\n"
            "<member><name>faultCode</name>\r\n"
            f"<value><i4>{fault.code}</i4></value></member>\r\n"
            "<member><name>faultString</name>\r\n"
            f"<value><string>{escape(fault.message)}</string></value></member>\r\n"
            "</struct></value>\r\n</fault>\r\n</methodResponse>\r\n")
    return text.encode("utf-8")


_KIND_NAMES = {"i": "integer", "s": "a string", "b": "boolean"}


def check_params(signature: str, params: tuple[Any, ...], required: int) -> None:
    """xmlrpc-c's paramList getters: the first `required` parameters must be
    present; every present one must have its declared type."""
    if len(params) < required:
        raise Fault(FAULT_TYPE, "Not enough parameters")
    for index, (kind, value) in enumerate(zip(signature, params, strict=False)):
        ok = {
            "i": type(value) is int,
            "s": isinstance(value, str),
            "b": isinstance(value, bool),
        }.get(kind, True)
        if not ok:
            raise Fault(FAULT_TYPE,
                        f"Parameter that is supposed to be {_KIND_NAMES[kind]} is not"
                        f" (parameter {index})")
