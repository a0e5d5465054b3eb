"""Textual inversion (SPEC 3b): initializer lookup, latent cache, one-row training, save/load."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from recare.errors import RecareError
from recare.models.embeddings import add_placeholder_token, token_row_override
from recare.train.inversion import (
    InversionConfig,
    LatentCache,
    denoising_loss,
    image_slices,
    images_to_pixels,
    train_textual_inversion,
)


def _random_images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _config(**kw):
    base = dict(steps=5, resolution=None, encode_batch_size=2)
    return InversionConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- initializer


@pytest.mark.parametrize("mode, word, expected", [
    ("word", "person", 2533), ("word", "art", 794),
    ("reference", "person", 3510), ("reference", "art", 1486), ("reference", "person</w>", 2533),
])
def test_initializer_ids(tiny_sd, mode, word, expected):
    table_before = tiny_sd.text_encoder.get_input_embeddings().weight.clone()
    ids = add_placeholder_token(tiny_sd.tokenizer, tiny_sd.text_encoder, "<c-0>", word, initializer_mode=mode)
    table = tiny_sd.text_encoder.get_input_embeddings().weight
    assert ids == (49408, expected)
    assert table.shape[0] == 49409 == len(tiny_sd.tokenizer)
    assert torch.equal(table[49408], table_before[expected])
    assert torch.equal(table[:49408], table_before)
    assert tiny_sd.tokenizer.encode("a photo of a <c-0>")[-2] == 49408


def test_multi_token_initializer_names_pieces(tiny_sd):
    with pytest.raises(RecareError, match=r"starry</w>.*sky</w>"):
        add_placeholder_token(tiny_sd.tokenizer, tiny_sd.text_encoder, "<c-0>", "starry sky")
    with pytest.raises(RecareError, match=r"'ten', 'ch</w>'"):
        add_placeholder_token(tiny_sd.tokenizer, tiny_sd.text_encoder, "<c-0>", "tench")
    assert len(tiny_sd.tokenizer) == 49408  # nothing added on error


@pytest.mark.parametrize("initializer", ["zzqqxx", "starry sky", "<|endoftext|>", "<|startoftext|>"])
def test_reference_mode_rejects_unknown_and_special(tiny_sd, initializer):
    with pytest.raises(RecareError, match="not an entry|special"):
        add_placeholder_token(tiny_sd.tokenizer, tiny_sd.text_encoder, "<c-0>", initializer, "reference")
    assert len(tiny_sd.tokenizer) == 49408


def test_existing_placeholder_and_bad_mode(tiny_sd):
    tok, te = tiny_sd.tokenizer, tiny_sd.text_encoder
    for existing in ("person", "person</w>"):
        with pytest.raises(RecareError, match="already exists"):
            add_placeholder_token(tok, te, existing, "art")
    add_placeholder_token(tok, te, "<c-0>", "art")
    with pytest.raises(RecareError, match="already exists"):
        add_placeholder_token(tok, te, "<c-0>", "art")
    with pytest.raises(RecareError, match="initializer_mode"):
        add_placeholder_token(tok, te, "<c-1>", "art", initializer_mode="fragment")
    with pytest.raises(RecareError, match="special"):
        add_placeholder_token(tok, te, "<c-1>", "<|endoftext|>")


# ----------------------------------------------------------------------------- config and slices


def test_config_defaults_and_validation():
    cfg = InversionConfig()
    assert (cfg.steps, cfg.learning_rate, cfg.batch_size, cfg.resolution, cfg.flip_p) == (3000, 5e-3, 1, 512, 0.5)
    assert cfg.initializer_mode == "word" and cfg.template_list()[0] == "a photo of a {}"
    assert InversionConfig(templates="style").template_list()[0] == "a painting in the style of {}"
    assert InversionConfig(batch_size=4).effective_learning_rate == pytest.approx(0.02)
    assert InversionConfig(batch_size=4, scale_lr_by_batch=False).effective_learning_rate == pytest.approx(5e-3)
    for bad in (dict(templates="person"), dict(templates=("no slot",)), dict(steps=0), dict(flip_p=1.5),
                dict(initializer_mode="x"), dict(mixed_precision="fp8"), dict(timestep_range=(5, 5))):
        with pytest.raises(RecareError):
            InversionConfig(**bad)


def test_image_slices_sorted_contiguous():
    paths = ["e.png", "b.png", "a.png", "d.png", "c.png"]
    assert image_slices(paths, 2) == [["a.png", "b.png"], ["c.png", "d.png"]]  # "e.png" unused, as the reference
    assert image_slices(paths, 1) == [["a.png", "b.png", "c.png", "d.png", "e.png"]]
    assert image_slices(paths, 5)[4] == ["e.png"]
    with pytest.raises(RecareError, match="cannot be split"):
        image_slices(paths[:1], 2)
    with pytest.raises(RecareError, match="n_rounds"):
        image_slices(paths, 0)


def test_images_to_pixels_range_and_values():
    img = Image.new("RGB", (3, 2), (0, 255, 51))
    pixels = images_to_pixels([img], 4)
    assert pixels.shape == (1, 3, 4, 4)
    # 0 -> -1, 255 -> 1, 51 -> 51 / 127.5 - 1 = -0.6
    assert torch.allclose(pixels[0, :, 0, 0], torch.tensor([-1.0, 1.0, -0.6]))


# ----------------------------------------------------------------------------- latents and loss


def test_latent_cache_sample_equals_fresh_encode(tiny_sd):
    vae = tiny_sd.vae
    pixels = images_to_pixels(_random_images(3), 32)
    cache = LatentCache.encode(vae, pixels, batch_size=2)
    assert cache.mean.shape == (2, 3, 4, 16, 16) and len(cache) == 3
    for index, flip in ((1, False), (2, True)):
        cached = cache.sample(torch.tensor([index]), torch.tensor([flip]), torch.Generator().manual_seed(7))
        image = pixels[index:index + 1]
        image = torch.flip(image, dims=[-1]) if flip else image
        with torch.no_grad():
            fresh = vae.encode(image).latent_dist.sample(generator=torch.Generator().manual_seed(7))
        assert torch.allclose(cached, fresh * vae.config.scaling_factor, atol=1e-5)
    # the flipped stats are a separate encoding, not a flip of the unflipped latent
    assert not torch.allclose(cache.mean[1, 0], torch.flip(cache.mean[0, 0], dims=[-1]), atol=1e-4)


class _ZeroUNet(torch.nn.Module):
    dtype = torch.float32
    config = SimpleNamespace()  # an SD 1.x UNet: no added conditioning

    def forward(self, sample, timestep, encoder_hidden_states):
        return SimpleNamespace(sample=torch.zeros_like(sample))


@pytest.mark.parametrize("prediction_type, expected", [("epsilon", 4.0), ("v_prediction", 0.00085)])
def test_denoising_loss_targets(prediction_type, expected):
    """Zero prediction at t = 0: loss = mean(target^2). latents 1, noise 2, alpha_bar_0 = 1 - 0.00085.
    epsilon: target 2 -> 4. v: sqrt(ab) * 2 - sqrt(1 - ab) * 1 -> (2 sqrt(0.99915) - sqrt(0.00085))^2."""
    from diffusers import DDPMScheduler

    from recare.models.tiny import SD14_SCHEDULER

    scheduler = DDPMScheduler(prediction_type=prediction_type, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", num_train_timesteps=1000)
    assert SD14_SCHEDULER["beta_start"] == 0.00085
    conditioner = SimpleNamespace(encode_ids=lambda ids: torch.zeros(1, 3, 8))
    loss = denoising_loss(_ZeroUNet(), conditioner, scheduler, torch.ones(1, 4, 2, 2), (torch.zeros(1, 3),),
                          torch.tensor([0]), torch.full((1, 4, 2, 2), 2.0))
    if prediction_type == "v_prediction":
        expected = (2 * 0.99915 ** 0.5 - 0.00085 ** 0.5) ** 2  # 3.8855...
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_row_override_matches_reference_full_table_update(tiny_sd):
    """AdamW on one row through the hook == the reference's AdamW on the whole table + restore."""
    tok, te = tiny_sd.tokenizer, tiny_sd.text_encoder
    pid, _ = add_placeholder_token(tok, te, "<c-0>", "person")
    ids = tok(["a photo of a <c-0>", "a <c-0> in the rain"], padding="max_length", max_length=16,
              return_tensors="pt").input_ids
    weights = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    objective = lambda model: (model(ids)[0] * weights).sum()  # noqa: E731

    reference = copy.deepcopy(te)
    table = reference.get_input_embeddings().weight
    original = table.detach().clone()
    table.requires_grad_(True)
    opt_ref = torch.optim.AdamW([table], lr=0.1)
    row = te.get_input_embeddings().weight[pid].detach().clone().requires_grad_(True)
    opt_row = torch.optim.AdamW([row], lr=0.1)
    for _ in range(4):
        opt_ref.zero_grad()
        objective(reference).backward()
        opt_ref.step()
        with torch.no_grad():
            keep = torch.ones(len(table), dtype=torch.bool)
            keep[pid] = False
            table[keep] = original[keep]
        opt_row.zero_grad()
        with token_row_override(te, pid, row):
            objective(te).backward()
        opt_row.step()
    assert not torch.allclose(row, original[pid])
    assert torch.allclose(row, table[pid], atol=1e-6)
    assert torch.equal(te.get_input_embeddings().weight, original)  # the hook never touches the table


# ----------------------------------------------------------------------------- training


def test_few_steps_change_only_the_placeholder_row(tiny_sd, tmp_path):
    tiny_sd.unet.requires_grad_(True)  # a student UNet: must not receive gradients, flags restored
    before = tiny_sd.text_encoder.get_input_embeddings().weight.detach().clone()
    first, second = _random_images(2, size=40)
    second.save(tmp_path / "second.png")  # paths are read with recare.io
    learned = train_textual_inversion(tiny_sd, [first, tmp_path / "second.png"], "<c-0>", "person", _config(),
                                      torch.Generator().manual_seed(0), progress=False)
    table = tiny_sd.text_encoder.get_input_embeddings().weight
    assert learned.token == "<c-0>" and learned.token_id == 49408 and learned.initializer_id == 2533
    assert len(learned.losses) == 5 and all(np.isfinite(learned.losses))
    assert learned.embedding.shape == (32,) and learned.embedding.dtype == torch.float32
    assert torch.equal(table[:49408], before)  # bit-identical
    # Adam moves each element by up to lr = 5e-3 per step; weight decay alone would move it by ~1e-6
    assert (table[49408] - before[2533]).abs().max() > 1e-3
    assert torch.equal(table[49408], learned.embedding)
    assert all(p.requires_grad and p.grad is None for p in tiny_sd.unet.parameters())
    assert not any(p.requires_grad for p in tiny_sd.text_encoder.parameters())


def test_same_seed_same_embedding_and_explicit_unet():
    from recare.models.tiny import build_tiny_sd

    runs = []
    for seed in (3, 3, 4):
        sd = build_tiny_sd(seed=0, prediction_type="v_prediction")
        erased = copy.deepcopy(sd.unet)
        with torch.no_grad():
            next(erased.parameters()).add_(0.1)
        cfg = _config(steps=3, batch_size=2, flip_p=0.5)
        runs.append(train_textual_inversion(sd, _random_images(3), "<c-0>", "art", cfg,
                                            torch.Generator().manual_seed(seed), unet=erased, progress=False))
    assert torch.equal(runs[0].embedding, runs[1].embedding) and runs[0].losses == runs[1].losses
    assert not torch.equal(runs[0].embedding, runs[2].embedding)


class _TextBiasedUNet(torch.nn.Module):
    """The tiny UNet plus a large offset read from the text: a loss term that the token can remove.

    With random weights the tiny UNet hardly listens to the prompt, so the step-to-step noise of
    the loss would hide any progress; this offset makes progress measurable without flakiness.
    """

    def __init__(self, unet, dim):
        super().__init__()
        self.unet = unet
        torch.manual_seed(0)
        self.head = torch.nn.Linear(dim, unet.config.in_channels)
        torch.nn.init.constant_(self.head.bias, 1.5)

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, sample, timestep, encoder_hidden_states):
        out = self.unet(sample, timestep, encoder_hidden_states).sample
        offset = self.head(encoder_hidden_states[:, 1])  # (b, c): the placeholder position of "{}"
        return SimpleNamespace(sample=out + offset[:, :, None, None])


def test_overfit_reduces_loss(tiny_sd):
    unet = _TextBiasedUNet(tiny_sd.unet, 32)
    cfg = _config(steps=20, learning_rate=0.05, templates=("{}",), timestep_range=(400, 600), flip_p=0.0)
    learned = train_textual_inversion(tiny_sd, _random_images(1), "<c-0>", "person", cfg,
                                      torch.Generator().manual_seed(0), unet=unet, progress=False)
    first, last = np.mean(learned.losses[:5]), np.mean(learned.losses[-5:])
    assert last < 0.8 * first, (first, last)


def test_training_input_errors(tiny_sd):
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(RecareError, match="at least one image"):
        train_textual_inversion(tiny_sd, [], "<c-0>", "person", _config(), gen, progress=False)
    with pytest.raises(RecareError, match="Generator"):
        train_textual_inversion(tiny_sd, _random_images(1), "<c-0>", "person", _config(), 0, progress=False)
    with pytest.raises(RecareError, match="CUDA"):  # fp16 needs CUDA; bf16 runs on the CPU too (test below)
        train_textual_inversion(tiny_sd, _random_images(1), "<c-0>", "person", _config(mixed_precision="fp16"), gen,
                                progress=False)
    with pytest.raises(RecareError, match="exceeds"):
        train_textual_inversion(tiny_sd, _random_images(1), "<c-0>", "person", _config(timestep_range=(0, 1001)),
                                gen, progress=False)
    assert len(tiny_sd.tokenizer) == 49408  # validation happens before the token is added


def test_saved_embedding_loads_in_diffusers(tiny_sd, tmp_path):
    from recare.io import read_json
    from recare.models.checkpoints import load_learned_embeddings
    from recare.models.tiny import build_tiny_sd

    cfg = _config(steps=2)
    learned = train_textual_inversion(tiny_sd, _random_images(1), "<c-0>", "person", cfg,
                                      torch.Generator().manual_seed(0), progress=False)
    path = tmp_path / "learned.safetensors"
    learned.save(path, cfg)
    meta = read_json(tmp_path / "learned.json")
    assert meta["token"] == "<c-0>" and meta["initializer_id"] == 2533 and meta["config"]["steps"] == 2

    pipe = build_tiny_sd(seed=0).pipeline()
    pipe.load_textual_inversion(str(path))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<c-0>")
    assert torch.allclose(pipe.text_encoder.get_input_embeddings().weight[token_id], learned.embedding)

    fresh = build_tiny_sd(seed=0)
    assert load_learned_embeddings(fresh.conditioner(), path) == ["<c-0>"]
    assert torch.equal(fresh.text_encoder.get_input_embeddings().weight[49408], learned.embedding)


def test_a_float16_vae_that_asks_for_upcasting_encodes_in_float32(tiny_sdxl):
    """SDXL's VAE overflows in fp16 (its config says force_upcast): latents are encoded in float32 and the
    weights go back to float16 afterwards; the latents equal those of the float32 VAE cast to fp16 once."""
    vae = tiny_sdxl.vae
    assert vae.config.force_upcast
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference = LatentCache.encode(vae.half().float(), pixels)  # fp16-rounded weights, run in fp32
    vae.half()
    cache = LatentCache.encode(vae, pixels)
    assert vae.dtype == torch.float16
    torch.testing.assert_close(cache.mean, reference.mean)
    torch.testing.assert_close(cache.std, reference.std)
