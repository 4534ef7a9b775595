"""The test harness's Kubernetes API: KMock's emulator (a stateful in-memory API server; an emulator,
not a cluster) with the gaps closed that kubectl, helm and Kopf run into. All extensions live here.

Added over kmock 0.8: server-assigned uid / resourceVersion / generation / creationTimestamp; `kind`
and label selectors on lists; core-group discovery as `v1`; server version 1.33; `dryRun` answered
without storing; PUT as a whole-object write; a CRD that is created registers its resource (short
names, subresources); the `/scale` subresource of a CRD (replica paths, string label selector);
server-side printing (`as=Table`) from the CRD's additionalPrinterColumns.

Protobuf request bodies of the kinds helm sends (release Secrets/ConfigMaps, DeleteOptions) are decoded
to JSON (k8s_protobuf.py), so `helm install`/`upgrade`/`uninstall` store and read their releases.

Not emulated: pods never run (tests set their status), no garbage collection, no CEL or schema
validation, no OpenAPI documents (helm runs with `--disable-openapi-validation`; the manifests are
validated offline with kubernetes-validate in test_chart.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import itertools
import json
import re
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp.web
import k8s_protobuf
import kmock
import yaml
from kmock._internal import enums, references  # kmock v0: private modules, pinned version

_RV = itertools.count(1)
APPLY_PATCH = "application/apply-patch+yaml"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def jsonpath(obj: Any, path: str) -> Any:
    """The subset of JSONPath that printer columns use: `.a.b`, `.a[0]`, `.a[-1:].b`."""
    cur: Any = obj
    for part in re.findall(r"\.([A-Za-z0-9_]+)|\[(-?\d+)(:?)\]", path):
        key, index, sl = part
        if cur is None:
            return None
        if key:
            cur = cur.get(key) if isinstance(cur, dict) else None
        else:
            if not isinstance(cur, list) or not cur:
                return None
            i = int(index)
            cur = cur[i:][0] if sl else (cur[i] if -len(cur) <= i < len(cur) else None)
    return cur


def _get_path(obj: dict, dotted: str) -> Any:
    return jsonpath(obj, dotted)


def _set_path(obj: dict, dotted: str, value: Any) -> dict:
    keys = dotted.strip(".").split(".")
    out: dict = {}
    cur = out
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = value
    return out


class Emulator(kmock.KubernetesEmulator):
    """KMock's KubernetesEmulator plus the extensions listed in the module docstring."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        self.crds: dict[tuple[str, str], dict] = {}  # (group, plural) -> CRD

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Protobuf bodies (helm's release Secrets) become JSON before KMock parses the request."""
        if raw_request.headers.get("Content-Type", "").startswith(k8s_protobuf.CONTENT_TYPE):
            body = await raw_request.read()
            try:
                decoded = json.dumps(k8s_protobuf.decode(body)).encode()
            except ValueError as exc:
                status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 415,
                          "reason": "UnsupportedMediaType", "message": str(exc)}  # fmt: skip
                return aiohttp.web.json_response(status, status=415)
            raw_request._read_bytes = decoded  # aiohttp's body cache: what read()/text()/json() return
        elif raw_request.headers.get("Content-Type", "").startswith(APPLY_PATCH):
            body = await raw_request.read()
            raw_request._read_bytes = json.dumps(yaml.safe_load(body)).encode()  # SSA bodies are YAML
        return await super().__call__(raw_request)

    # -- helpers --------------------------------------------------------------------------------

    def _crd_for(self, res: references.resource | None) -> dict | None:
        if res is None:
            return None
        return self.crds.get((res.group, res.plural))

    def _stored(self, request: kmock.Request) -> dict | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def _register_crd(self, crd: dict) -> None:
        spec = crd["spec"]
        names = spec["names"]
        for v in spec["versions"]:
            subs = set(v.get("subresources") or {})
            self.resources[f"{spec['group']}/{v['name']}/{names['plural']}"] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular", names["kind"].lower()),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                verbs={"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"},
                shortnames=set(names.get("shortNames") or []),
                categories=set(names.get("categories") or []),
                subresources=subs,
            )
        self.crds[(spec["group"], names["plural"])] = crd

    # -- the request pipeline --------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        path = request.url.path
        if request.method == enums.method.GET and path.rstrip("/") == "/api/v1":
            return aiohttp.web.json_response(self._core_resources())
        if res is not None and request.subresource == "scale":
            return await self._scale(request)
        accept = request.headers.get("Accept", "")
        if "as=Table" in accept and request.action in (enums.action.LIST, enums.action.FETCH):
            table = await self._table(request)
            if table is not None:
                return table
        if res is not None and request.method == enums.method.PUT and request.name:
            object.__setattr__(request, "action", enums.action.UPDATE)
        applying = request.headers.get("Content-Type", "").startswith(APPLY_PATCH)
        if applying and res is not None and request.name and self._stored(request) is None:
            # Server-side apply (helm 4, kubectl apply --server-side) of an absent object creates it.
            object.__setattr__(request, "action", enums.action.CREATE)
        dry = request.params.get("dryRun") == "All"
        if dry and request.action in (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE):
            body = self._stored(request) if request.action != enums.action.CREATE else None
            return aiohttp.web.json_response(request.data if request.action != enums.action.DELETE else body)
        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            meta.update(
                uid=str(uuid.uuid4()),
                resourceVersion=str(next(_RV)),
                generation=1,
                creationTimestamp=_now(),
            )
            request.data.pop("status", None) if self._has_status(res) else None
        elif request.action == enums.action.UPDATE and isinstance(request.data, dict):
            self._bump(request)
        if request.action == enums.action.WATCH:
            response = await super()._handle(request)
            return response
        response = await super()._handle(request)
        if (
            request.action == enums.action.CREATE
            and res is not None
            and res.plural == "customresourcedefinitions"
        ):
            self._register_crd(request.data)
        listed = request.action == enums.action.LIST and res is not None and res.plural
        if listed and isinstance(response, aiohttp.web.Response) and response.body:
            body = json.loads(bytes(response.body))
            if "items" not in body:
                return response
            info = self.resources[res] if res is not None else None
            kind = info.kind if info is not None and info.kind else ""
            body.update(apiVersion=f"{res.group}/{res.version}".lstrip("/"), kind=f"{kind}List")
            body["metadata"]["resourceVersion"] = str(next(_RV))
            wanted = request.params.get("labelSelector", "")
            body["items"] = [i for i in body["items"] if _selects(wanted, i["metadata"].get("labels") or {})]
            for item in body["items"]:
                item.setdefault("apiVersion", body["apiVersion"])
                item.setdefault("kind", kind)
            return aiohttp.web.json_response(body)
        return response

    def _has_status(self, res: references.resource | None) -> bool:
        crd = self._crd_for(res)
        return crd is not None and "status" in (crd["spec"]["versions"][0].get("subresources") or {})

    def _bump(self, request: kmock.Request) -> None:
        """resourceVersion on every write; generation when anything but status/metadata changes."""
        data = request.data
        meta = data.setdefault("metadata", {})
        if not isinstance(meta, dict):
            return
        meta["resourceVersion"] = str(next(_RV))
        meta.pop("uid", None)
        meta.pop("creationTimestamp", None)
        if request.subresource in ("status",):
            data.pop("spec", None) if self._has_status(request.resource) else None
            return
        stored = self._stored(request)
        if stored is None:
            return
        if self._has_status(request.resource):
            data.pop("status", None)  # the main resource ignores status, as a real API server does
        changed = any(
            k not in ("metadata", "status") and stored.get(k) != _merge(stored.get(k), v)
            for k, v in data.items()
        )
        if changed:
            meta["generation"] = int(stored["metadata"].get("generation") or 1) + 1

    async def _serve_server_version(self, request: kmock.Request) -> Any:
        """A current server version (kmock reports 1.26; the chart needs >= 1.28)."""
        out = dict(await super()._serve_server_version(request))
        out.update(major="1", minor="33", gitVersion="v1.33.0-kmock")
        return out

    async def _serve_version(self, request: kmock.Request) -> Any:
        """Subresources carry no short names (kubectl warns about ambiguous ones otherwise)."""
        out = await super()._serve_version(request)
        for r in out.get("resources", []) if isinstance(out, dict) else []:
            if "/" in r["name"]:
                r["shortNames"] = []
                r["categories"] = []
                if r["name"].endswith("/scale"):
                    r.update(kind="Scale", group="autoscaling", version="v1")
        return out

    def _core_resources(self) -> dict:
        out = []
        for res in self._get_resources():
            if res.group != "" or res.version != "v1" or not res.plural:
                continue
            info = self.resources[res]
            for sub in {""} | set(info.subresources):
                out.append(
                    {
                        "name": f"{res.plural}/{sub}" if sub else res.plural,
                        "singularName": info.singular or "",
                        "namespaced": bool(info.namespaced),
                        "kind": info.kind or res.plural.capitalize(),
                        "verbs": sorted(info.verbs),
                        "shortNames": sorted(info.shortnames),
                    }
                )
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": out}

    async def _scale(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        crd = self._crd_for(request.resource)
        scale = (crd or {}).get("spec", {}).get("versions", [{}])[0].get("subresources", {}).get("scale")
        if scale is None:
            raise kmock.KubernetesResourceNotFoundError()
        obj = self._stored(request)
        if obj is None:
            raise kmock.KubernetesObjectNotFoundError()
        if request.method in (enums.method.PATCH, enums.method.PUT):
            replicas = (request.data or {}).get("spec", {}).get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                raise kmock.KubernetesError(
                    status=422, reason="Invalid", message="spec.replicas must be >= 0"
                )
            patch = _set_path({}, scale["specReplicasPath"], replicas)
            inner = kmock.Request(
                method=enums.method.PATCH,
                url=request.url.with_path(request.url.path.rsplit("/scale", 1)[0]),
                data=patch,
                action=enums.action.UPDATE,
                resource=request.resource,
                namespace=request.namespace,
                name=request.name,
            )
            self._bump(inner)
            async with self._lock:  # what KubernetesEmulator._handle does for a PATCH, and its event
                stored = self.objects[request.resource, request.namespace, request.name]
                stored.patch(inner.data)
                await self._buses[request.resource].put({"type": "MODIFIED", "object": stored.raw})
            obj = self._stored(request) or obj
        status: dict[str, Any] = {"replicas": _get_path(obj, scale["statusReplicasPath"]) or 0}
        if scale.get("labelSelectorPath"):
            status["selector"] = _get_path(obj, scale["labelSelectorPath"]) or ""
        return aiohttp.web.json_response(
            {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": {k: obj["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion")},
                "spec": {"replicas": _get_path(obj, scale["specReplicasPath"]) or 0},
                "status": status,
            }
        )

    async def _table(self, request: kmock.Request) -> aiohttp.web.StreamResponse | None:
        crd = self._crd_for(request.resource)
        if crd is None:
            return None
        cols = [c for c in crd["spec"]["versions"][0].get("additionalPrinterColumns") or []]
        if request.name:
            one = self._stored(request)
            if one is None:
                raise kmock.KubernetesObjectNotFoundError()
            objs = [one]
        else:
            objs = [
                copy.deepcopy(o.raw)
                for (r, ns, _), o in self.objects.items()
                if r == request.resource and not o.deleted and (request.namespace in (None, ns))
            ]
        defs = [{"name": "Name", "type": "string", "format": "name", "priority": 0}]
        defs += [
            {"name": c["name"], "type": c["type"], "format": "", "priority": c.get("priority", 0)}
            for c in cols
        ]
        rows = []
        for o in sorted(objs, key=lambda o: o["metadata"]["name"]):
            cells = [o["metadata"]["name"]]
            for c in cols:
                v = jsonpath(o, c["jsonPath"])
                cells.append(_age(v) if c["type"] == "date" and v else v)
            rows.append(
                {"cells": cells, "object": {"kind": "PartialObjectMetadata", "metadata": o["metadata"]}}
            )
        return aiohttp.web.json_response(
            {
                "kind": "Table",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": {},
                "columnDefinitions": defs,
                "rows": rows,
            }
        )


def _selects(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors (`a=b,c!=d,e`), as kubectl -l and list calls send them."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _age(stamp: str) -> str:
    then = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    secs = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    return f"{secs}s" if secs < 120 else f"{secs // 60}m"


def _merge(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        out = dict(old)
        for k, v in new.items():
            out[k] = _merge(old.get(k), v)
        return out
    return new


@contextlib.contextmanager
def serve() -> Iterator[tuple[Emulator, int]]:
    """Run the emulator on 127.0.0.1 in a background thread (its own event loop); yields it and the port."""
    emulator = Emulator()
    loop = asyncio.new_event_loop()
    ready: list = []
    stop = asyncio.Event()

    async def main() -> None:
        async with emulator, kmock.Server(emulator) as server:
            ready.append(server.port)
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    for _ in range(500):
        if ready:
            break
        threading.Event().wait(0.01)
    if not ready:
        raise RuntimeError("the emulator did not start")
    try:
        yield emulator, ready[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)


def kubeconfig(port: int) -> str:
    return (
        "apiVersion: v1\nkind: Config\ncurrent-context: emu\n"
        f"clusters:\n- name: emu\n  cluster: {{server: 'http://127.0.0.1:{port}'}}\n"
        "users:\n- name: emu\n  user: {}\n"
        "contexts:\n- name: emu\n  context: {cluster: emu, user: emu, namespace: default}\n"
    )
