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
