"""LoRA: exact no-op when fresh, merge/unmerge round trip, numerics against peft, parameter names, meta device."""

import copy

import peft
import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from minedit.parts.lora import (LoRALinear, inject_lora, load_lora_state_dict, lora_parameters, lora_state_dict,
                          merge_lora, unmerge_lora)


def tiny_llama_config():
    return LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.o = nn.Linear(8, 6), nn.Linear(6, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.o(self.v_proj(self.q_proj(x)))


def test_fresh_lora_is_exact_noop_and_trains_only_adapters():
    model = tiny_llama()
    ids = torch.randint(0, 50, (2, 7))
    ref = model(ids).logits
    names = inject_lora(model, rank=4, alpha=8)
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    assert torch.equal(model(ids).logits, ref)
    # B = 0 but A is not: the adapter can start learning (gradient reaches B).
    model.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    model(ids).logits.sum().backward()
    layer = model.get_submodule(names[0])
    assert layer.lora_A.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


def test_merge_unmerge_round_trip_and_forward_agree():
    model = tiny_llama()
    inject_lora(model, rank=4, alpha=8)
    randomize_lora(model)
    ids = torch.randint(0, 50, (2, 7))
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".weight")}
    unmerged = model(ids).logits
    merge_lora(model)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, w0["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        if n.endswith(".weight"):
            torch.testing.assert_close(p, w0[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_lora(model)


def test_matches_peft_with_same_weights():
    torch.manual_seed(0)
    ours, theirs, plain = Tiny(), Tiny(), Tiny()
    theirs.load_state_dict(ours.state_dict())
    plain.load_state_dict(ours.state_dict())
    inject_lora(ours, rank=4, alpha=6)
    randomize_lora(ours)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            layer, ref = getattr(ours, name), theirs.base_model.model.get_submodule(name)
            assert ref.scaling["default"] == layer.scaling
            ref.lora_A["default"].weight.copy_(layer.lora_A)
            ref.lora_B["default"].weight.copy_(layer.lora_B)
    x = torch.randn(5, 8)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ours(x), plain(x), atol=1e-3)  # the adapters are active, not a trivial match


def test_base_names_unchanged_and_lora_state_dict_round_trip():
    model = tiny_llama()
    base_sd = copy.deepcopy(model.state_dict())
    inject_lora(model, rank=4, alpha=8)
    sd = lora_state_dict(model)
    assert sd and all(k.endswith((".lora_A", ".lora_B")) for k in sd)
    assert set(model.state_dict()) == set(base_sd) | set(sd)
    result = model.load_state_dict(base_sd, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == set(sd)

    randomize_lora(model)
    saved = lora_state_dict(model)
    fresh = tiny_llama()
    inject_lora(fresh, rank=4, alpha=8)
    load_lora_state_dict(fresh, saved)
    ids = torch.randint(0, 50, (1, 6))
    assert torch.equal(fresh(ids).logits, model(ids).logits)

    bad = dict(saved)
    bad["extra.lora_A"] = bad.pop("model.layers.0.self_attn.q_proj.lora_A")
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.0.self_attn.q_proj.lora_A'\].*extra.lora_A"):
        load_lora_state_dict(fresh, bad)


def test_reinjection_and_no_match_raise():
    model = tiny_llama()
    inject_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lora(tiny_llama(), targets=("qproj",))


def test_include_regex_skips_vision_tower():
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=60, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4),
        image_token_id=59)
    model = LlavaForConditionalGeneration(cfg)
    names = inject_lora(model, rank=2, alpha=4, include=r"language_model")
    assert len(names) == 4 and all("language_model" in n for n in names)
    assert type(model.get_submodule("model.vision_tower.encoder.layers.0.self_attn.q_proj")) is nn.Linear
    assert type(model.get_submodule("model.vision_tower.encoder.layers.1.self_attn.v_proj")) is nn.Linear


def test_meta_device_injection_counts():
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config())
    rank = 8
    names = inject_lora(model, rank=rank, alpha=16, dtype=torch.float32)
    expected = 0
    for name in names:
        layer = model.get_submodule(name)
        assert layer.lora_A.is_meta and layer.lora_B.is_meta
        expected += rank * (layer.in_features + layer.out_features)
    assert sum(p.numel() for p in lora_parameters(model)) == expected
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 kv heads of 8) in each of 2 layers
    assert expected == 2 * rank * ((32 + 32) + (32 + 16))


def test_fp32_adapter_over_bf16_base():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear(base, rank=4, alpha=4, dtype=torch.float32)
    assert layer.weight is base.weight and layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = base(x).float() + (x.float() @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
