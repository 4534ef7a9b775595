"""The fused float32 CPU training kernels (`dsv3.kernels.cpu_fused`): built with the machine's C compiler,
their outputs and gradients are the float64 reference's to float32 rounding, they are deterministic,
`ops` takes them only for float32 CPU training on the auto backend, and without a compiler everything
falls back to the torch ops."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from dsv3.kernels import cpu_fused, ops, reference, rms_norm_grad


def _close(mine: torch.Tensor, theirs: torch.Tensor, tolerance: float = 2e-6) -> None:
    """float32 against float64: the error relative to the largest entry."""
    scale = theirs.abs().max().clamp_min(1e-30)
    assert ((mine.double() - theirs).abs().max() / scale).item() < tolerance


def _gradients(fn, *inputs: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(upstream.to(out.dtype))
    return (out.detach(), *(leaf.grad for leaf in leaves))


def test_the_library_builds_here() -> None:
    assert cpu_fused.available(), "a C compiler (cc) is part of the supported setup"


@pytest.mark.parametrize(
    ("shape", "width"),
    [((4, 32, 256), None), ((3, 5, 80), 64), ((7, 20), None), ((0, 16), None)],
    ids=["contiguous", "strided-latent", "odd-width", "empty"],
)
def test_rms_norm_matches_the_reference(shape, width) -> None:
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    x = full[..., :width] if width else full  # a column slice: rows a stride apart, as the MLA latent
    weight = torch.randn(x.shape[-1], generator=generator, dtype=torch.float64)
    upstream = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    expected = _gradients(lambda a, b: reference.rms_norm(a, b, 1e-6), x, weight, upstream=upstream)
    x32 = full.float()[..., :width] if width else full.float()
    got = _gradients(lambda a, b: cpu_fused.rms_norm(a, b, 1e-6), x32, weight.float(), upstream=upstream)
    if x.numel():
        for mine, theirs in zip(got, expected, strict=True):
            _close(mine, theirs)
    assert got[1].shape == x.shape and got[2].shape == weight.shape


def test_rms_norm_gradient_of_one_input_only() -> None:
    x = torch.randn(6, 32, dtype=torch.float64)
    weight = torch.randn(32, dtype=torch.float64)
    for grad_x, grad_w in ((True, False), (False, True)):
        xi, wi = x.float().requires_grad_(grad_x), weight.float().requires_grad_(grad_w)
        cpu_fused.rms_norm(xi, wi, 1e-6).sum().backward()
        xr, wr = x.clone().requires_grad_(grad_x), weight.clone().requires_grad_(grad_w)
        reference.rms_norm(xr, wr, 1e-6).sum().backward()
        assert (xi.grad is None) == (not grad_x) and (wi.grad is None) == (not grad_w)
        _close(xi.grad if grad_x else wi.grad, xr.grad if grad_x else wr.grad)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("width", [128, 24])
def test_weighted_swiglu_matches_the_reference(weighted: bool, width: int) -> None:
    generator = torch.Generator().manual_seed(1)
    gate_up = torch.randn(50, 2 * width, generator=generator, dtype=torch.float64) * 4
    weights = torch.rand(50, generator=generator, dtype=torch.float64)
    upstream = torch.randn(50, width, generator=generator, dtype=torch.float64)
    inputs = (gate_up, weights) if weighted else (gate_up,)
    expected = _gradients(
        lambda *a: reference.weighted_swiglu(a[0], a[1] if weighted else None), *inputs, upstream=upstream
    )
    got = _gradients(
        lambda *a: cpu_fused.weighted_swiglu(a[0], a[1] if weighted else None),
        *(t.float() for t in inputs),
        upstream=upstream,
    )
    for mine, theirs in zip(got, expected, strict=True):
        _close(mine, theirs)
    assert got[1].is_contiguous()  # the grouped GEMM's backward takes d[gate | up] as it is


def test_silu_mul_matches_the_reference() -> None:
    generator = torch.Generator().manual_seed(2)
    gate, up, upstream = (torch.randn(2, 9, 40, generator=generator, dtype=torch.float64) for _ in range(3))
    expected = _gradients(lambda g, u: F.silu(g) * u, gate, up, upstream=upstream)
    got = _gradients(cpu_fused.silu_mul, gate.float(), up.float(), upstream=upstream)
    for mine, theirs in zip(got, expected, strict=True):
        _close(mine, theirs)


def test_the_kernels_are_deterministic() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(64, 256, generator=generator)
    weight = torch.randn(256, generator=generator)
    gate_up = torch.randn(64, 256, generator=generator)
    row_weights = torch.rand(64, generator=generator)
    runs = []
    for _ in range(2):
        norm = _gradients(lambda a, b: cpu_fused.rms_norm(a, b, 1e-6), x, weight, upstream=x.flip(0))
        act = _gradients(cpu_fused.weighted_swiglu, gate_up, row_weights, upstream=x[:, :128])
        runs.append((*norm, *act))
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


def test_ops_takes_them_for_float32_cpu_training_on_the_auto_backend(monkeypatch) -> None:
    x = torch.randn(4, 32)
    weight = torch.ones(32, requires_grad=True)

    def norm_function():
        return getattr(type(ops.rms_norm(x, weight, 1e-6).grad_fn), "_forward_cls", None)

    assert norm_function() is cpu_fused._FusedRMSNorm
    gate, up = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    view = ops.silu_mul(gate, up).grad_fn  # silu_mul views its [rows, F] result back into the input shape
    assert type(view.next_functions[0][0])._forward_cls is cpu_fused._SiluMul
    with torch.no_grad():  # inference keeps the reference ops, bitwise
        assert torch.equal(ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
    with ops.force_backend("torch"):
        assert norm_function() is rms_norm_grad._RMSNorm
    monkeypatch.setenv(cpu_fused.ENABLE_ENV, "0")
    assert not cpu_fused.available()
    assert norm_function() is rms_norm_grad._RMSNorm
    assert type(ops.silu_mul(gate, up).grad_fn).__name__ == "MulBackward0"


def test_grouped_swiglu_through_ops_matches_the_torch_backend() -> None:
    generator = torch.Generator().manual_seed(4)
    experts, hidden, width = 4, 32, 16
    counts = torch.tensor([5, 0, 9, 2])
    x = torch.randn(16, hidden, generator=generator)
    gate_up = torch.randn(experts, 2 * width, hidden, generator=generator) * 0.2
    down = torch.randn(experts, hidden, width, generator=generator) * 0.2
    row_weights = torch.rand(16, generator=generator)
    upstream = torch.randn(16, hidden, generator=generator)
    results = []
    for name in ("auto", "torch"):
        with ops.force_backend(name):
            results.append(
                _gradients(
                    lambda *a: ops.grouped_swiglu(a[0], counts, *a[1:]),
                    x,
                    gate_up,
                    down,
                    row_weights,
                    upstream=upstream,
                )
            )
    for fused, plain in zip(*results, strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_fresh_cache_builds_a_blocked_one_falls_back_to_tmp_and_no_compiler_to_torch(tmp_path) -> None:
    check = """
        import torch
        from dsv3.kernels import cpu_fused, ops
        weight = torch.ones(8, requires_grad=True)
        out = ops.rms_norm(torch.randn(2, 8), weight, 1e-6)
        out.sum().backward()
        print(cpu_fused.available(), type(out.grad_fn).__name__, weight.grad is not None)
    """
    built = _run(check, DSV3_KERNEL_CACHE=str(tmp_path / "fresh"))
    assert built.returncode == 0, built.stderr
    assert built.stdout.split() == ["True", "_FusedRMSNormBackward", "True"]
    assert list((tmp_path / "fresh").glob("cpu_fused-*.so"))
    missing = _run(check, DSV3_KERNEL_CACHE=str(tmp_path / "none"), CC=str(tmp_path / "no-such-cc"))
    assert missing.returncode == 0, missing.stderr
    assert missing.stdout.split() == ["False", "_RMSNormBackward", "True"]
    assert "no C compiler" in missing.stderr
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")  # an unusable cache directory (root ignores read-only modes)
    (tmp_path / "tmp").mkdir()
    fallback = _run(check, DSV3_KERNEL_CACHE=str(blocked / "cache"), TMPDIR=str(tmp_path / "tmp"))
    assert fallback.returncode == 0, fallback.stderr
    assert fallback.stdout.split()[0] == "True"
    assert list((tmp_path / "tmp").glob(f"dsv3-{os.getuid()}/cpu_fused-*.so"))
    broken = _run(check, DSV3_KERNEL_CACHE=str(tmp_path / "broken"), CC="false")
    assert broken.returncode == 0, broken.stderr
    assert broken.stdout.split()[0] == "False" and "could not build" in broken.stderr


@pytest.mark.parametrize(
    "change", [{}, {"q_lora_rank": None}, {"v_head_dim": 24}], ids=["lora", "q_proj", "v24"]
)
def test_mla_heads_match_the_attention_modules_own_heads(change: dict) -> None:
    """The fused kernel against `MultiHeadLatentAttention._heads` (torch ops) run in float64, on the
    module's own projections: q, k, v and the gradients of every projection weight and of the input."""
    from dsv3.model import ModelConfig
    from dsv3.model.attention import MultiHeadLatentAttention
    from dsv3.model.rope import RotaryEmbedding

    config = ModelConfig.from_hf_config(ModelConfig.flavour("debug").to_hf_config() | change)
    torch.manual_seed(5)
    reference_module = MultiHeadLatentAttention(config).double()
    for param in reference_module.parameters():
        torch.nn.init.normal_(param, std=0.3)
    fused_module = MultiHeadLatentAttention(config)
    fused_module.load_state_dict(reference_module.state_dict())
    cos, sin = RotaryEmbedding(config)(torch.arange(11))
    x = torch.randn(2, 11, config.hidden_size, dtype=torch.float64)
    upstream = [torch.randn(2, config.num_attention_heads, 11, config.qk_head_dim, dtype=torch.float64)]
    upstream += [upstream[0].flip(2), upstream[0].flip(3)]
    results = []
    for module, dtype in ((reference_module, torch.float64), (fused_module, torch.float32)):
        xi = x.to(dtype).detach().requires_grad_()
        q = module._query_projection(xi)
        latent, rope_key = module._latent_parts(xi)
        projections = (q, module.kv_b_proj(latent), rope_key, cos.to(dtype), sin.to(dtype))
        if dtype == torch.float64:
            heads = module._heads(*projections)
        else:
            heads = ops.mla_heads(
                *projections, config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
            )
        torch.autograd.backward(heads, [u.to(dtype) for u in upstream])
        grads = [p.grad for name, p in module.named_parameters() if not name.startswith("o_proj")]
        results.append((*heads, xi.grad, *grads))
    for fused, expected in zip(results[1], results[0], strict=True):
        _close(fused, expected, 5e-6)  # o_proj, outside the heads, is the only parameter without a gradient
    q, k, v = results[1][:3]
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    assert (v[..., config.v_head_dim :] == 0).all()


def test_a_model_trains_the_same_with_the_kernels_on_and_off(monkeypatch) -> None:
    """The whole debug model (MoE, MTP, balance loss): one loss and every gradient, kernels on and off."""
    from dsv3.model import DeepSeekV3, ModelConfig
    from dsv3.model.loss import language_model_loss

    torch.manual_seed(6)
    model = DeepSeekV3(ModelConfig.flavour("debug")).train()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(6))
    runs = []
    for enabled in ("1", "0"):
        monkeypatch.setenv(cpu_fused.ENABLE_ENV, enabled)
        model.zero_grad(set_to_none=True)
        loss = language_model_loss(model(ids), ids, 0.3, 1e-3).total
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_on, grads_on), (loss_off, grads_off) = runs
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=0)
    for on, off in zip(grads_on, grads_off, strict=True):
        assert (on is None) == (off is None)
        if on is not None:
            torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-7)


def test_permute_and_unpermute_match_index_select_and_index_add() -> None:
    """The dispatcher's permutation and its un-permuting sum, forward and backward, against torch's
    index_select / index_add on a random routing (some experts empty, rows in expert order)."""
    from dsv3.model.dispatch import sort_by_expert

    generator = torch.Generator().manual_seed(7)
    tokens, top_k, hidden = 37, 4, 24
    ids = torch.stack([torch.randperm(16, generator=generator)[:top_k] for _ in range(tokens)])
    ids[ids == 3] = 5  # expert 3 gets nothing
    order, _ = sort_by_expert(ids, 16)
    x = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    rows = torch.randn(tokens * top_k, hidden, generator=generator, dtype=torch.float64)
    upstream_rows = torch.randn(tokens * top_k, hidden, generator=generator, dtype=torch.float64)
    upstream_tokens = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)

    expected = _gradients(lambda a: a.index_select(0, order // top_k), x, upstream=upstream_rows)
    got = _gradients(lambda a: cpu_fused.permute_rows(a, order, top_k), x.float(), upstream=upstream_rows)
    for mine, theirs in zip(got, expected, strict=True):
        _close(mine, theirs)

    def index_add(r: torch.Tensor) -> torch.Tensor:
        return r.new_zeros(tokens, hidden).index_add_(0, order // top_k, r)

    expected = _gradients(index_add, rows, upstream=upstream_tokens)
    got = _gradients(lambda r: cpu_fused.unpermute_sum(r, order, tokens, top_k), rows.float(),
                     upstream=upstream_tokens)  # fmt: skip
    for mine, theirs in zip(got, expected, strict=True):
        _close(mine, theirs)


def test_the_ops_wrappers_name_the_bad_argument() -> None:
    x = torch.randn(4, 8)
    order = torch.arange(8)
    with pytest.raises(ops.KernelInputError, match="order must be int64"):
        ops.permute_rows(x, order.int(), 2)
    with pytest.raises(ops.KernelInputError, match="x must be"):
        ops.permute_rows(x[None], order, 2)
    with pytest.raises(ops.KernelInputError, match="T\\*K = 8"):
        ops.unpermute_sum(torch.randn(6, 8), order, 4, 2)
    q, kv, rope_key = torch.randn(1, 3, 2 * 12), torch.randn(1, 3, 2 * 16), torch.randn(1, 3, 4)
    cos = sin = torch.randn(3, 2)
    assert ops.mla_heads(q, kv, rope_key, cos, sin, 2, 8, 8)[2].shape == (1, 2, 3, 12)
    with pytest.raises(ops.KernelInputError, match="kv must be"):
        ops.mla_heads(q, kv[..., :-1], rope_key, cos, sin, 2, 8, 8)
    with pytest.raises(ops.KernelInputError, match="rope_key must be"):
        ops.mla_heads(q, kv, rope_key[..., :2], cos, sin, 2, 8, 8)
    with pytest.raises(ops.KernelInputError, match="cos/sin"):
        ops.mla_heads(q, kv, rope_key, cos[:2], sin[:2], 2, 8, 8)
    with pytest.raises(ops.KernelInputError, match="float32 CPU"):
        ops.mla_heads(q.double(), kv.double(), rope_key.double(), cos.double(), sin.double(), 2, 8, 8)


def test_bf16_autocast_training_keeps_the_torch_path() -> None:
    """Under CPU autocast the projections come out bf16: attention and the experts take torch's ops."""
    from dsv3.model import DeepSeekV3, ModelConfig
    from dsv3.model.loss import language_model_loss

    torch.manual_seed(8)
    model = DeepSeekV3(ModelConfig.flavour("debug")).train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = language_model_loss(model(ids), ids).total
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.model.layers.parameters())
