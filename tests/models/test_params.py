"""Student parameter selection and LoRA on the tiny UNet."""

import pytest
import torch
from torch import nn

from recare.errors import RecareError
from recare.models.params import TRAIN_MODES, add_lora, select_parameters, set_trainable


def linear_conv_parameter_names(unet):
    return {f"{m}.{p}" for m, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))
            for p, _ in module.named_parameters(recurse=False)}


def names(unet, mode):
    return [name for name, _ in select_parameters(unet, mode)]


def test_names_match_named_parameters(tiny_sd):
    unet = tiny_sd.unet
    params = dict(unet.named_parameters())
    for mode in TRAIN_MODES:
        for name, param in select_parameters(unet, mode):
            assert params[name] is param


def test_xattn_and_noxattn_partition_linear_conv(tiny_sd):
    unet = tiny_sd.unet
    xattn, noxattn = names(unet, "xattn"), names(unet, "noxattn")
    assert set(xattn).isdisjoint(noxattn)
    assert set(xattn) | set(noxattn) == linear_conv_parameter_names(unet) == set(names(unet, "full"))
    assert all(".attn2." in n for n in xattn) and not any("attn2" in n for n in noxattn)
    # tiny UNet: 4 transformer blocks x (to_q, to_k, to_v weights + to_out.0 weight and bias)
    assert len(xattn) == 20
    assert len(names(unet, "selfattn")) == 20 and all(".attn1." in n for n in names(unet, "selfattn"))


def test_noxattn_follows_reference(tiny_sd):
    selected = set(names(tiny_sd.unet, "noxattn"))
    # the reference keeps time embedding, conv_in/conv_out and attn1/ff; never normalisation layers
    for name in ("time_embedding.linear_1.weight", "conv_in.weight", "conv_out.bias",
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                 "mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight"):
        assert name in selected
    assert not any("norm" in n.split(".")[-2] for n in selected)
    assert "conv_norm_out.weight" not in selected


def test_xattn_strict_is_to_k_and_to_v(tiny_sd):
    selected = names(tiny_sd.unet, "xattn-strict")
    assert len(selected) == 8
    assert all(n.split(".")[-3] == "attn2" and n.split(".")[-2] in ("to_k", "to_v") for n in selected)


def test_unknown_mode_and_empty_selection(tiny_sd):
    with pytest.raises(ValueError, match="'esd-u'.*noxattn"):
        select_parameters(tiny_sd.unet, "esd-u")
    with pytest.raises(RecareError, match="selects no parameters"):
        select_parameters(nn.Sequential(nn.LayerNorm(4)), "full")


def test_set_trainable_freezes_everything_else(tiny_sd):
    unet = tiny_sd.unet
    selected = set_trainable(unet, "xattn")
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in selected}


def test_lora_only_lora_parameters_train(tiny_sd):
    unet = tiny_sd.unet
    gen = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 3, 32, generator=gen)
    before = unet(latents, 10, encoder_hidden_states=text).sample
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}

    trainable = add_lora(unet, rank=2, alpha=2.0, target="xattn")
    assert len(trainable) == 32  # 4 blocks x (to_q, to_k, to_v, to_out.0) x (lora_A, lora_B)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(".attn2." in n for n in trainable)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == set(trainable)
    torch.testing.assert_close(unet(latents, 10, encoder_hidden_states=text).sample, before)  # B = 0

    params = dict(unet.named_parameters())
    optimizer = torch.optim.SGD([params[n] for n in trainable], lr=0.1)
    for _ in range(2):  # step 1 moves B (A gets no gradient while B = 0); step 2 moves A too
        optimizer.zero_grad()
        unet(latents, 10, encoder_hidden_states=text).sample.square().mean().backward()
        optimizer.step()
    assert not torch.allclose(unet(latents, 10, encoder_hidden_states=text).sample, before)
    for name, value in unet.named_parameters():
        if name not in trainable:
            key = name.replace(".base_layer.", ".")
            assert torch.equal(value, base[key]), name
    unet.disable_adapters()
    torch.testing.assert_close(unet(latents, 10, encoder_hidden_states=text).sample, before)


def test_lora_rejects_bad_rank(tiny_sd):
    with pytest.raises(ValueError, match="rank"):
        add_lora(tiny_sd.unet, rank=0, alpha=1.0)
