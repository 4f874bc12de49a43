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
