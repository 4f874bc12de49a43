"""Shared model loading: the fused RMSNorm computes what Gemma's reference norm computes."""

from __future__ import annotations

import pytest
import torch

from components import modeling


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2**-7)])
@pytest.mark.parametrize("with_scale", [True, False])
def test_fused_rms_norm_matches_the_reference(dtype, tolerance, with_scale):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

    torch.manual_seed(0)
    norm = Gemma4RMSNorm(96, eps=1e-6, with_scale=with_scale)
    if with_scale:
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.5)
    norm = norm.to(dtype)
    x = (torch.randn(3, 7, 96) * 4 + 1).to(dtype).requires_grad_(True)
    probe = torch.randn(3, 7, 96)  # a loss whose gradient is not zero (the sum of squares of a norm is constant)
    reference = norm(x)
    (grad_reference,) = torch.autograd.grad((reference.float() * probe).sum(), x)
    holder = torch.nn.Sequential(norm)
    assert modeling.fuse_rms_norms(holder) == 1
    fused = norm(x)
    (grad_fused,) = torch.autograd.grad((fused.float() * probe).sum(), x)
    assert fused.dtype == reference.dtype == dtype
    scale = reference.float().abs().max()
    assert (fused.float() - reference.float()).abs().max() <= tolerance * scale
    assert (grad_fused.float() - grad_reference.float()).abs().max() <= 4 * tolerance * grad_reference.float().abs().max()
    modeling.fuse_rms_norms(holder, enabled=False)
    assert "forward" not in norm.__dict__ and torch.equal(norm(x), reference)


def test_fused_norms_leave_the_tiny_models_logits_unchanged(tiny_model_dir):
    model = modeling.load_model(str(tiny_model_dir), torch.device("cpu"))
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        norms = modeling.fuse_rms_norms(model)
        fused = model(input_ids=ids).logits
    assert norms >= 4 * model.config.text_config.num_hidden_layers
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("asked", ["auto", "nf4"])
def test_nf4_without_bitsandbytes_names_the_extra(asked, monkeypatch):
    """CPU installs leave the gpu extra out; nf4 asked on a GPU then fails at the flag, before
    any model loads, instead of deep inside from_pretrained."""
    real = modeling.importlib.util.find_spec
    monkeypatch.setattr(modeling.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs bitsandbytes.*pip install 'gemma-pets\[gpu\]'"):
        modeling.resolve_quantization(asked, torch.device("cuda"))
    assert modeling.resolve_quantization("none", torch.device("cuda")) == "none"


def _lora_stack(dropout: float):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 8))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=["0", "2"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, where the update would vanish from the comparison
            torch.nn.init.normal_(param, std=0.5)
    return model


def _forward_backward(model, x, autocast: bool):
    torch.manual_seed(1)  # the same dropout masks in both runs
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out, x.grad, grads


@pytest.mark.parametrize("autocast, tolerance", [(False, 1e-5), (True, 2**-6)])
def test_fused_lora_adds_match_peft(autocast, tolerance, monkeypatch):
    """Output and every gradient as PEFT's forward (dropout on, same masks), without PEFT's
    forward running; adapters switched off still fall back to it."""
    from peft.tuners.lora.layer import Linear

    calls = []
    peft_forward = Linear.forward
    monkeypatch.setattr(Linear, "forward", lambda self, *a, **k: calls.append(1) or peft_forward(self, *a, **k))
    model, x = _lora_stack(dropout=0.1), torch.randn(3, 5, 16)
    reference = _forward_backward(model, x, autocast)
    assert len(calls) == 2
    assert modeling.fuse_lora_adds(model) == 2
    fused = _forward_backward(model, x, autocast)
    assert len(calls) == 2, "the fused forward must not call PEFT's"
    assert fused[0].dtype == reference[0].dtype
    for got, want in [(fused[0], reference[0]), (fused[1], reference[1])] + [
            (fused[2][n], reference[2][n]) for n in reference[2]]:
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance * want.abs().max().item())
    first, act, last = model.get_base_model()
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(x), last.get_base_layer()(act(first.get_base_layer()(x))))
    assert len(calls) == 4
    modeling.fuse_lora_adds(model, enabled=False)
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, Linear))


def _wide_head_model(global_head_dim: int, device: str = "cpu", dtype=torch.float32):
    """Gemma 4's text stack in miniature with its real head-width split: sliding layers 32 wide,
    full-attention layers ``global_head_dim`` wide (512 in every published size)."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              layer_types=["sliding_attention", "full_attention"] * 2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, global_head_dim=global_head_dim,
                              hidden_size_per_layer_input=0, num_kv_shared_layers=0, sliding_window=16,
                              attn_implementation="sdpa")
    torch.manual_seed(0)
    return Gemma4ForCausalLM(config).to(device, dtype)


def test_wide_attention_routes_only_the_wide_layers_to_bf16_math(monkeypatch):
    """The 320-wide layers run SDPA with only the math kernel allowed and bf16 reductions on;
    the 32-wide layers see SDPA's own choice; the global flag is restored; logits unchanged."""
    model = _wide_head_model(320).eval()
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        seen.append((query.shape[-1], torch.backends.cuda.mem_efficient_sdp_enabled(),
                     torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()))
        return real_sdpa(query, *args, **kwargs)

    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert modeling.route_wide_attention(model) == 2
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        routed = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert sorted(seen) == [(32, True, False), (32, True, False), (320, False, True), (320, False, True)]
    assert not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.testing.assert_close(routed, reference, rtol=0, atol=1e-6)
    assert modeling.route_wide_attention(model, enabled=False) == 2
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `make test-gpu` on the device machine)")
def test_wide_attention_on_math_matches_the_efficient_kernel():
    """At the real 512-wide global heads in bf16, loss and gradients through the routed layers
    agree with SDPA's own pick (the memory-efficient kernel) to bf16 precision."""
    model = _wide_head_model(512, "cuda", torch.bfloat16).train()
    ids = torch.randint(3, 128, (4, 300), device="cuda")

    def loss_and_grads():
        loss = model(input_ids=ids, labels=ids).loss
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        return loss.float(), torch.cat([g.float().flatten() for g in grads])

    efficient = loss_and_grads()
    assert modeling.route_wide_attention(model) == 2
    routed = loss_and_grads()
    torch.testing.assert_close(routed[0], efficient[0], rtol=1e-2, atol=0)
    assert (routed[1] - efficient[1]).norm() <= 0.02 * efficient[1].norm()
