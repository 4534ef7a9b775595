"""Kubernetes' protobuf request bodies, decoded to the JSON objects the emulator stores.

Helm 4 writes its release records (Secrets, or ConfigMaps with `HELM_DRIVER=configmap`) with
`Content-Type: application/vnd.kubernetes.protobuf`; KMock reads only JSON. A real API server accepts
both, so the emulator translates these bodies before KMock sees them. Only the kinds client-go sends as
protobuf in our tests are known; any other kind is refused loudly rather than stored wrong.

Wire layout (k8s.io/apimachinery runtime.Unknown and k8s.io/api core/v1 generated.proto): a 4-byte magic
`k8s\\0`, then `Unknown{typeMeta=1{apiVersion=1, kind=2}, raw=2, contentEncoding=3, contentType=4}`,
where `raw` is the object's own message.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

MAGIC = b"k8s\x00"
CONTENT_TYPE = "application/vnd.kubernetes.protobuf"


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) for each field of one message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, value
        elif wire == 2:
            size, pos = _varint(buf, pos)
            yield number, buf[pos : pos + size]
            pos += size
        elif wire == 1:
            yield number, buf[pos : pos + 8]
            pos += 8
        elif wire == 5:
            yield number, buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"protobuf wire type {wire} is not supported")


def _map_entry(buf: bytes) -> tuple[str, bytes]:
    entry = dict(_fields(buf))
    return bytes(entry.get(1, b"")).decode(), bytes(entry.get(2, b""))


def _object_meta(buf: bytes) -> dict[str, Any]:
    names = {1: "name", 2: "generateName", 3: "namespace", 5: "uid", 6: "resourceVersion"}
    meta: dict[str, Any] = {}
    for number, value in _fields(buf):
        if number in names:
            meta[names[number]] = bytes(value).decode()
        elif number == 7:
            meta["generation"] = value
        elif number in (11, 12):  # labels, annotations
            key, val = _map_entry(bytes(value))
            meta.setdefault("labels" if number == 11 else "annotations", {})[key] = val.decode()
        elif number == 14:
            meta.setdefault("finalizers", []).append(bytes(value).decode())
    return meta


def _secret(buf: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret"}
    for number, value in _fields(buf):
        if number == 1:
            obj["metadata"] = _object_meta(bytes(value))
        elif number == 2:
            key, val = _map_entry(bytes(value))
            obj.setdefault("data", {})[key] = base64.b64encode(val).decode()
        elif number == 3:
            obj["type"] = bytes(value).decode()
        elif number == 4:
            key, val = _map_entry(bytes(value))
            obj.setdefault("stringData", {})[key] = val.decode()
        elif number == 5:
            obj["immutable"] = bool(value)
    return obj


def _config_map(buf: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap"}
    for number, value in _fields(buf):
        if number == 1:
            obj["metadata"] = _object_meta(bytes(value))
        elif number == 2:
            key, val = _map_entry(bytes(value))
            obj.setdefault("data", {})[key] = val.decode()
        elif number == 3:
            key, val = _map_entry(bytes(value))
            obj.setdefault("binaryData", {})[key] = base64.b64encode(val).decode()
        elif number == 4:
            obj["immutable"] = bool(value)
    return obj


def _delete_options(buf: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
    for number, value in _fields(buf):
        if number == 1:
            obj["gracePeriodSeconds"] = value
        elif number == 4:
            obj["propagationPolicy"] = bytes(value).decode()
    return obj


_DECODERS = {"Secret": _secret, "ConfigMap": _config_map, "DeleteOptions": _delete_options}


def decode(body: bytes) -> dict[str, Any]:
    """The JSON form of one protobuf-encoded object; ValueError for a body or kind not understood."""
    if not body.startswith(MAGIC):
        raise ValueError("protobuf body without the k8s magic prefix")
    unknown = dict(_fields(body[len(MAGIC) :]))
    type_meta = dict(_fields(bytes(unknown.get(1, b""))))
    kind = bytes(type_meta.get(2, b"")).decode()
    if kind not in _DECODERS:
        raise ValueError(f"the emulator cannot decode protobuf {kind or 'objects without a kind'}")
    return _DECODERS[kind](bytes(unknown.get(2, b"")))
