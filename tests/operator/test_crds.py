"""The CRDs: structural schemas that accept the examples and refuse the invalid samples, printer
columns, the scale subresource; rules only CEL can express are enforced again by the operator."""

from __future__ import annotations

import subprocess
import sys

import jsonschema
import pytest
from op_helpers import CRDS, EXAMPLES, crd_schema, load

from dsv3.operator.spec import ServingSpec, SpecError, TrainingSpec, parse_serving, parse_training

VALID = sorted(EXAMPLES.glob("*.yaml"))
INVALID = sorted((EXAMPLES / "invalid").glob("*.yaml"))
CEL_ONLY = {"training-bad-parallelism.yaml", "serving-two-weights.yaml"}  # jsonschema has no CEL


def _validate(doc: dict) -> None:
    # OpenAPI v3.0 schemas are draft-4 JSON schema plus x-kubernetes-* keys (ignored here).
    jsonschema.Draft4Validator(crd_schema(doc["kind"])).validate(doc)


def _parse(doc: dict) -> TrainingSpec | ServingSpec:
    return (parse_training if doc["kind"] == "DeepSeekTrainingJob" else parse_serving)(
        doc["spec"], "ckpt:50070"
    )


def test_there_are_samples_of_both_kinds() -> None:
    kinds = {load(p)["kind"] for p in VALID}
    assert kinds == {"DeepSeekTrainingJob", "DeepSeekServingJob"}
    assert len(INVALID) >= 5


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_examples_validate_against_the_crd_schema_and_parse(path) -> None:
    doc = load(path)
    errors = list(jsonschema.Draft4Validator(crd_schema(doc["kind"])).iter_errors(doc))
    assert errors == [], [e.message for e in errors]
    spec = _parse(doc)
    expected = TrainingSpec if doc["kind"] == "DeepSeekTrainingJob" else ServingSpec
    assert isinstance(spec, expected) and spec.image == doc["spec"]["image"]
    if isinstance(spec, TrainingSpec):  # the sample's training block is what the trainer will get
        assert spec.steps == doc["spec"]["training"]["steps"]


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_samples_are_refused(path) -> None:
    doc = load(path)
    if path.name in CEL_ONLY:
        _validate(doc)  # structurally fine: the CEL rule (API server) and the operator refuse it
        rules = str(crd_schema(doc["kind"]))
        assert "x-kubernetes-validations" in rules
    else:
        with pytest.raises(jsonschema.ValidationError):
            _validate(doc)
    with pytest.raises(SpecError) as err:
        _parse(doc)
    assert str(err.value).startswith("spec.")  # names the field


def test_printer_columns_and_subresources() -> None:
    dstj = load(CRDS / "deepseektrainingjobs.yaml")["spec"]
    cols = [c["name"] for c in dstj["versions"][0]["additionalPrinterColumns"] if not c.get("priority")]
    assert cols == ["State", "Step", "Loss", "Workers", "Age"]
    assert dstj["names"]["shortNames"] == ["dstj"]
    assert dstj["versions"][0]["subresources"] == {"status": {}}
    dssj = load(CRDS / "deepseekservingjobs.yaml")["spec"]
    scale = dssj["versions"][0]["subresources"]["scale"]
    assert scale["specReplicasPath"] == ".spec.shards.replicas"
    assert scale["labelSelectorPath"] == ".status.shards.selector"
    status = dssj["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["properties"]["shards"]["properties"]["selector"]["type"] == "string"  # HPA needs a string


def test_crds_pass_kubernetes_validate_strict() -> None:
    files = [str(p) for p in sorted(CRDS.glob("*.yaml"))]
    run = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.33.0", *files],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
