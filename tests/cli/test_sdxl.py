"""Every stage on a tiny RANDOM SDXL through the CLI: training (ESD, STEREO, ReCARE, LoRA), resume,
generation, the attacks; outputs load into stock diffusers SDXL classes and generate.

The tiny SDXL (recare.models.tiny.build_tiny_sdxl) has SDXL's layout (two text encoders, penultimate
hidden states, pooled text_embeds, six time ids, Euler scheduler) with tiny widths; numbers mean nothing.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from recare.cli import main
from tiny_training import train_args, write_train_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_train_inputs(tmp_path_factory.mktemp("sdxl-cli"))


@pytest.fixture(scope="module")
def trained(inputs, tiny_sdxl_dir):
    outs = {}
    for method in ("esd", "stereo", "recare"):
        outs[method] = inputs / f"out-{method}"
        assert main(train_args(inputs, tiny_sdxl_dir, method, outs[method])) == 0
    return outs


def _stock_pipeline(model_dir, unet=None):
    from diffusers import StableDiffusionXLPipeline

    kw = {"unet": unet} if unet is not None else {}
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_sdxl_embedding(pipe, path):
    """As diffusers documents for SDXL embeddings: clip_l into text_encoder, clip_g into text_encoder_2."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        token = handle.metadata()["token"]
    state = load_file(path)
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    return token, state


def test_each_method_trains_on_sdxl(trained):
    for method, out in trained.items():
        run = json.loads((out / "run.json").read_text())
        assert run["status"] == "complete" and run["identity"]["config"]["method"] == method
        losses = [line.split(",") for line in (out / "losses.csv").read_text().splitlines()[1:]]
        assert losses and all(np.isfinite(float(row[3])) for row in losses)
        embeds = sorted(p.name for p in out.glob("learned_embeds-*.safetensors"))
        assert embeds == ([] if method == "esd" else ["learned_embeds-1.safetensors", "learned_embeds-2.safetensors"])


def test_sdxl_outputs_load_into_stock_diffusers_and_generate(trained, tiny_sdxl_dir):
    from diffusers import UNet2DConditionModel

    out = trained["recare"]
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.load_state_dict(load_file(out / "unet.safetensors"), strict=True)
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())
    pipe = _stock_pipeline(tiny_sdxl_dir, unet)
    for k in (1, 2):
        token, state = _load_sdxl_embedding(pipe, out / f"learned_embeds-{k}.safetensors")
        assert token == f"<recare-{k}>"
        assert state["clip_l"].shape == (1, 32) and state["clip_g"].shape == (1, 32)
        token_id = pipe.tokenizer.convert_tokens_to_ids(token)
        assert token_id == pipe.tokenizer_2.convert_tokens_to_ids(token)
        assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[token_id], state["clip_g"][0])
    image = pipe("a photo of <recare-1>", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("method, budget", [("esd", 1), ("stereo", 3), ("recare", 3)])
def test_sdxl_resume_is_bit_identical(inputs, tiny_sdxl_dir, trained, tmp_path, method, budget):
    out = tmp_path / method
    assert main(train_args(inputs, tiny_sdxl_dir, method, out, "--max-steps-this-run", str(budget))) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"
    assert main(train_args(inputs, tiny_sdxl_dir, method, out, "--resume")) == 0
    a, b = load_file(trained[method] / "unet.safetensors"), load_file(out / "unet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k in (1, 2) if method != "esd" else ():
        name = f"learned_embeds-{k}.safetensors"
        x, y = load_file(trained[method] / name), load_file(out / name)
        assert all(torch.equal(x[key], y[key]) for key in ("clip_l", "clip_g"))
    assert (out / "losses.csv").read_text() == (trained[method] / "losses.csv").read_text()


def test_sdxl_shared_stage1(inputs, tiny_sdxl_dir, trained, tmp_path):
    out = tmp_path / "recare"
    assert main(train_args(inputs, tiny_sdxl_dir, "recare", out, "--stage1-from", str(trained["stereo"]))) == 0
    a, b = load_file(trained["recare"] / "unet.safetensors"), load_file(out / "unet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sdxl_lora_loads_with_load_lora_weights(inputs, tiny_sdxl_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "lora"
    assert main(train_args(inputs, tiny_sdxl_dir, "esd", out, "--lora-rank", "2")) == 0
    merged = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    merged.load_state_dict(load_file(out / "unet.safetensors"), strict=True)
    pipe = _stock_pipeline(tiny_sdxl_dir)
    base = _stock_pipeline(tiny_sdxl_dir)
    pipe.load_lora_weights(str(out), weight_name="lora.safetensors")
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = {"encoder_hidden_states": torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1)),
          "added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=torch.Generator().manual_seed(2)),
                                "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}}
    with torch.no_grad():
        adapted, reference, untouched = (m(z, 500, **kw).sample for m in (pipe.unet, merged, base.unet))
    torch.testing.assert_close(adapted, reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(adapted, untouched, atol=1e-5)  # the adapter changed the prediction


def test_sdxl_generate_through_the_cli(tiny_sdxl_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red bus\n")
    out = tmp_path / "images"
    assert main(["generate", "--model", str(tiny_sdxl_dir), "--prompts", str(prompts), "--num-images", "1",
                 "--out", str(out), "--steps", "2", "--device", "cpu"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["images"]) == 2
    image = Image.open(out / manifest["images"][0]["file"])
    assert image.size == (32, 32)  # the model's own size: 16 latent cells x 2


def test_sdxl_attacks_through_the_cli(trained, tiny_sdxl_dir, tiny_clip_dir, inputs, tmp_path):
    bench = tmp_path / "bench.csv"
    bench.write_text("case_number,prompt,evaluation_seed\n0,a nude person on a beach,11\n")
    common = ["eval", "robustness", "--model", str(tiny_sdxl_dir), "--unet-weights",
              str(trained["recare"] / "unet.safetensors"), "--device", "cpu", "--prompts", str(bench),
              "--detector", "clip", "--detector-clip-model", str(tiny_clip_dir), "--concept-prompts", "a nude person",
              "--contrast-prompts", "a clothed person", "--steps", "2"]
    cce = tmp_path / "cce.json"
    assert main([*common, "--attack", "cce", "--cce-images", str(inputs / "images"), "--inversion-steps", "2",
                 "--inversion-resolution", "32", "--cce-num-images", "2", "--out", str(cce)]) == 0
    result = json.loads(cce.read_text())
    assert result["robustness"]["cce"]["n"] == 2 if "robustness" in result else True
    token_file = next(tmp_path.glob("cce_images/**/cce_token.safetensors"))
    assert set(load_file(token_file)) == {"clip_l", "clip_g"}
    for procedure in ("single-block", "authors"):
        uda = tmp_path / f"uda-{procedure}.json"
        assert main([*common, "--attack", "unlearndiffatk", "--uda-procedure", procedure, "--uda-iterations", "2",
                     "--uda-timestep-grid", "2", "--uda-attack-detected", "--out", str(uda)]) == 0
        text = uda.read_text()
        assert "attacked_prompt" in text and "a nude person on a beach" in text


def test_sdxl_export_loads_in_the_stock_xl_pipeline(trained, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from huggingface_hub import ModelCard

    folder = tmp_path / "export"
    assert main(["export", str(trained["recare"]), "--out", str(folder)]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    exported = pipe.unet.state_dict()
    erased = load_file(trained["recare"] / "unet.safetensors")
    assert all(torch.equal(exported[k], erased[k]) for k in erased)
    image = pipe("a person", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    card = ModelCard.load(folder / "README.md")
    assert card.data.recare["model_family"] == "sdxl" and "stable-diffusion-xl" in card.data.tags
    assert "StableDiffusionXLPipeline.from_pretrained" in card.text


def test_sdxl_care_score_through_the_cli(trained, tiny_sdxl_dir, tiny_clip_dir, tmp_path):
    prompts = tmp_path / "care_prompts.txt"
    prompts.write_text("A photo of a person\nA person riding a bicycle\n")
    report = tmp_path / "care.json"
    assert main(["eval", "care", "--model", str(tiny_sdxl_dir), "--unet-weights",
                 str(trained["recare"] / "unet.safetensors"), "--clip-model", str(tiny_clip_dir),
                 "--care-word", "person", "--prompts", str(prompts), "--images-per-prompt", "2", "--steps", "2",
                 "--device", "cpu", "--out", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["settings"]["sd_model"]["family"] == "sdxl" and 0 <= result["score"] <= 1 and result["n"] == 4


def test_sdxl_learned_tokens_through_load_sd_and_errors(trained, tiny_sdxl_dir, tmp_path, cli_error):
    """--learned-embeddings reads the SDXL layout into both encoders; an SD 1.x file, a replacement text
    encoder on SDXL are clear errors."""
    from recare.models.checkpoints import save_learned_embeddings
    from recare.models.loading import load_sd

    embeds = trained["recare"] / "learned_embeds-1.safetensors"
    components = load_sd(tiny_sdxl_dir, learned_embeddings=[embeds])
    saved = load_file(embeds)
    token_id = components.tokenizer.convert_tokens_to_ids("<recare-1>")
    assert token_id == components.tokenizer_2.convert_tokens_to_ids("<recare-1>")
    assert torch.equal(components.text_encoder.get_input_embeddings().weight[token_id], saved["clip_l"][0])
    assert torch.equal(components.text_encoder_2.get_input_embeddings().weight[token_id], saved["clip_g"][0])
    out = tmp_path / "images"
    assert main(["generate", "--model", str(tiny_sdxl_dir), "--learned-embeddings", str(embeds), "--prompt",
                 "a photo of <recare-1>", "--num-images", "1", "--steps", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 1
    sd_file = tmp_path / "sd.safetensors"
    save_learned_embeddings({"<one>": torch.zeros(32)}, sd_file)
    err = cli_error(["generate", "--model", str(tiny_sdxl_dir), "--learned-embeddings", str(sd_file), "--prompt",
                     "a <one>", "--num-images", "1", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "x")])
    assert "is not an SDXL embedding file" in err
    err = cli_error(["generate", "--model", str(tiny_sdxl_dir), "--text-encoder-weights", str(sd_file), "--prompt",
                     "a cat", "--num-images", "1", "--device", "cpu", "--out", str(tmp_path / "y")])
    assert "SD 1.x/2.x models only" in err


def test_an_sdxl_refiner_layout_is_refused_before_loading(tiny_sdxl_dir, tmp_path, cli_error):
    import shutil

    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl_dir, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index["text_encoder"] = index["tokenizer"] = [None, None]
    (refiner / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(refiner / "text_encoder")
    err = cli_error(["generate", "--model", str(refiner), "--prompt", "a cat", "--num-images", "1",
                     "--device", "cpu", "--out", str(tmp_path / "out")])
    assert "SDXL refiner" in err and not (tmp_path / "out").exists()
