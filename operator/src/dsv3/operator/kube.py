"""A small generic Kubernetes REST client (the `kubernetes` package's ApiClient under it) for the few
kinds the operator owns, plus create-or-patch that writes only when the live object differs."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import kubernetes

from dsv3.operator.render import Manifest

_PLURALS = {
    "Pod": "pods",
    "Service": "services",
    "ConfigMap": "configmaps",
    "StatefulSet": "statefulsets",
    "Deployment": "deployments",
    "DeepSeekTrainingJob": "deepseektrainingjobs",
    "DeepSeekServingJob": "deepseekservingjobs",
}


class KubeError(RuntimeError):
    """An API call answered with an HTTP error (status kept for the 404 checks)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{_PLURALS[kind]}"
    return f"{path}/{name}" if name else path


def contains(live: Any, desired: Any) -> bool:
    """True when every field of `desired` is present and equal in `live` (the server may add defaults)."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(contains(live.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(map(contains, live, desired))
    return live == desired


@dataclasses.dataclass
class Kube:
    """API calls the handlers make; `writes` counts creates/patches/deletes (a no-op reconcile adds none)."""

    api: kubernetes.client.ApiClient
    writes: int = 0

    @classmethod
    def from_environment(cls) -> Kube:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        return cls(kubernetes.client.ApiClient())

    def _call(self, method: str, path: str, body: Any = None, query: list | None = None, patch: bool = False):
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/merge-patch+json" if patch else "application/json"
        args = self.api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.api.call_api(*args, _request_timeout=30)
        data = resp.read()
        if resp.status >= 400:
            raise KubeError(resp.status, f"{method} {path}: HTTP {resp.status}: {data[:300]!r}")
        return json.loads(data) if data else {}

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", _path(api_version, kind, namespace, name))
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        out = self._call("GET", _path(api_version, kind, namespace), query=[("labelSelector", selector)])
        return list(out.get("items") or [])

    def create(self, m: Manifest, namespace: str) -> dict[str, Any]:
        self.writes += 1
        return self._call("POST", _path(m.api_version, m.kind, namespace), body=m.body)

    def patch(self, api_version: str, kind: str, namespace: str, name: str, body: Mapping[str, Any]) -> Any:
        self.writes += 1
        return self._call("PATCH", _path(api_version, kind, namespace, name), body=dict(body), patch=True)

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete (background propagation); False when it was already gone."""
        try:
            self.writes += 1
            self._call(
                "DELETE",
                _path(api_version, kind, namespace, name),
                body={"propagationPolicy": "Background"},
            )
            return True
        except KubeError as e:
            if e.status == 404:
                return False
            raise

    def ensure(self, m: Manifest, namespace: str, immutable: bool = False) -> str:
        """Create the child, or patch it when it drifted; returns 'created', 'patched' or 'unchanged'.

        An existing object without our ownerReference is adopted by the patch (it gains it). Pods are
        `immutable`: a live pod is never patched (a new generation replaces it)."""
        live = self.get(m.api_version, m.kind, namespace, m.name)
        if live is None:
            try:
                self.create(m, namespace)
            except KubeError as e:
                if e.status != 409:  # 409: a concurrent reconcile created it first
                    raise
                return "unchanged"
            return "created"
        desired = {k: v for k, v in m.body.items() if k not in ("apiVersion", "kind")}
        if immutable or contains(live, desired):
            return "unchanged"
        self.patch(m.api_version, m.kind, namespace, m.name, desired)
        return "patched"
