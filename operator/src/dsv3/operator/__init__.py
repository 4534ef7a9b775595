"""dsv3-operator: Kopf handlers that run DeepSeekTrainingJob / DeepSeekServingJob resources.

Torch-free by design (tests/operator/test_torch_free.py): `render` turns a parsed spec into manifests,
`lifecycle` decides what a training job does next, `handlers` wires both to the Kubernetes API.
"""
