"""Weights: safetensors, strict loads, clear mismatch errors, no unpickling."""

import pytest
import torch
from safetensors.torch import save_file

from recare.errors import RecareError
from recare.models.checkpoints import (
    convert_pt_to_safetensors,
    load_learned_embeddings,
    load_unet_weights,
    save_learned_embeddings,
    save_unet_weights,
)


def _perturb(unet):
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.5)


def test_full_unet_round_trip(tiny_sd, tmp_path):
    from recare.models.tiny import build_tiny_sd

    _perturb(tiny_sd.unet)
    save_unet_weights(tiny_sd.unet, tmp_path / "unet.safetensors")
    fresh = build_tiny_sd().unet
    load_unet_weights(fresh, tmp_path / "unet.safetensors")
    for a, b in zip(fresh.state_dict().values(), tiny_sd.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_full_file_loads_strictly_in_stock_diffusers(tiny_sd, tmp_path):
    from safetensors.torch import load_file

    save_unet_weights(tiny_sd.unet, tmp_path / "unet.safetensors")
    tiny_sd.unet.load_state_dict(load_file(tmp_path / "unet.safetensors"), strict=True)


def test_subset_round_trip(tiny_sd, tmp_path):
    from recare.models.tiny import build_tiny_sd

    names = [n for n in tiny_sd.unet.state_dict() if "attn2" in n]
    _perturb(tiny_sd.unet)
    save_unet_weights(tiny_sd.unet, tmp_path / "sub.safetensors", names=names)
    fresh = build_tiny_sd().unet
    load_unet_weights(fresh, tmp_path / "sub.safetensors")
    assert torch.equal(fresh.state_dict()[names[0]], tiny_sd.unet.state_dict()[names[0]])


def test_mismatched_checkpoint_is_rejected(tiny_sd, tmp_path):
    state = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    name = next(iter(state))
    state[name] = torch.zeros(3, 3)
    save_file(state, tmp_path / "bad.safetensors", metadata={"recare_params": "full"})
    with pytest.raises(RecareError, match="does not match this UNet.*wrong shape"):
        load_unet_weights(tiny_sd.unet, tmp_path / "bad.safetensors")
    del state[name]
    save_file(state, tmp_path / "missing.safetensors", metadata={"recare_params": "full"})
    with pytest.raises(RecareError, match="missing"):
        load_unet_weights(tiny_sd.unet, tmp_path / "missing.safetensors")


def test_pt_is_read_weights_only_and_converted(tiny_sd, tmp_path):
    torch.save(tiny_sd.unet.state_dict(), tmp_path / "released.pt")
    convert_pt_to_safetensors(tmp_path / "released.pt", tmp_path / "released.safetensors")
    load_unet_weights(tiny_sd.unet, tmp_path / "released.safetensors")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(RecareError, match="weights_only"):
        load_unet_weights(tiny_sd.unet, tmp_path / "evil.pt")


def test_corrupt_safetensors(tiny_sd, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(RecareError, match="cannot read"):
        load_unet_weights(tiny_sd.unet, tmp_path / "junk.safetensors")
    with pytest.raises(RecareError, match="not found"):
        load_unet_weights(tiny_sd.unet, tmp_path / "nothing.safetensors")


def test_learned_embeddings_round_trip(tiny_sd, tmp_path):
    width = tiny_sd.text_encoder.get_input_embeddings().weight.shape[1]
    vector = torch.arange(width, dtype=torch.float32)
    save_learned_embeddings({"<concept-1>": vector}, tmp_path / "learned.safetensors")
    loaded = load_learned_embeddings(tiny_sd.conditioner(), tmp_path / "learned.safetensors")
    assert loaded == ["<concept-1>"]
    token_id = tiny_sd.tokenizer.convert_tokens_to_ids("<concept-1>")
    assert torch.equal(tiny_sd.text_encoder.get_input_embeddings().weight[token_id], vector)
    with pytest.raises(RecareError, match="already exists"):
        load_learned_embeddings(tiny_sd.conditioner(), tmp_path / "learned.safetensors")
    save_learned_embeddings({"<wide>": torch.zeros(width + 1)}, tmp_path / "wide.safetensors")
    with pytest.raises(RecareError, match="needs"):
        load_learned_embeddings(tiny_sd.conditioner(), tmp_path / "wide.safetensors")


def test_learned_embeddings_load_in_diffusers(tiny_sd, tmp_path):
    width = tiny_sd.text_encoder.get_input_embeddings().weight.shape[1]
    save_learned_embeddings({"<c>": torch.ones(width)}, tmp_path / "learned.safetensors")
    pipe = tiny_sd.pipeline()
    pipe.load_textual_inversion(str(tmp_path / "learned.safetensors"))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<c>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], torch.ones(width))


def test_text_encoder_weights_replace_strictly(tiny_sd, tmp_path):
    """A released replacement text encoder (AdvUnlearn-style) loads strictly, with or without the
    'text_model.' key prefix, from a file or a transformers folder; another architecture is refused."""
    from recare.models.checkpoints import load_text_encoder_weights
    from recare.models.tiny import build_tiny_sd

    other = build_tiny_sd(seed=7).text_encoder
    state = {k: v for k, v in other.state_dict().items() if not k.endswith("position_ids")}
    stripped = {k.removeprefix("text_model."): v for k, v in state.items()}
    save_file(stripped, tmp_path / "te.safetensors")
    load_text_encoder_weights(tiny_sd.text_encoder, tmp_path / "te.safetensors")
    for name, tensor in other.state_dict().items():
        assert torch.equal(tiny_sd.text_encoder.state_dict()[name], tensor)

    other.save_pretrained(tmp_path / "folder")
    fresh = build_tiny_sd(seed=0).text_encoder
    load_text_encoder_weights(fresh, tmp_path / "folder")
    assert torch.equal(fresh.get_input_embeddings().weight, other.get_input_embeddings().weight)

    del stripped[next(iter(stripped))]
    save_file(stripped, tmp_path / "partial.safetensors")
    with pytest.raises(RecareError, match="does not match this text encoder.*missing"):
        load_text_encoder_weights(fresh, tmp_path / "partial.safetensors")


def test_load_sd_with_text_encoder_weights(tiny_sd_dir, tmp_path):
    from recare.models.loading import load_sd
    from recare.models.tiny import build_tiny_sd

    other = build_tiny_sd(seed=7).text_encoder
    save_file(dict(other.state_dict()), tmp_path / "te.safetensors")
    loaded = load_sd(tiny_sd_dir, text_encoder_weights=tmp_path / "te.safetensors")
    assert torch.equal(loaded.text_encoder.get_input_embeddings().weight, other.get_input_embeddings().weight)


def test_parse_method_arg_with_text_encoder():
    from recare.eval.config import parse_method_arg

    spec = parse_method_arg("AdvUnlearn=,text_encoder=/x/te.safetensors")
    assert (spec.unet_weights, spec.learned_embeddings, spec.text_encoder_weights) == (None, (), "/x/te.safetensors")
    assert not spec.is_base
    spec = parse_method_arg("ReCARE=u.safetensors,e1.safetensors")
    assert (spec.unet_weights, spec.learned_embeddings, spec.text_encoder_weights) == (
        "u.safetensors", ("e1.safetensors",), None)
