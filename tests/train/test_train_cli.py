"""`recare train` and `recare run` end to end on tiny RANDOM models; the outputs must load into
stock diffusers objects. The weights mean nothing; the test checks code paths and formats."""

import json

import numpy as np
import pytest
import torch

from recare.careset.artifact import CareSet
from recare.cli import main
from tiny_training import TINY_TRAIN, train_args, write_train_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_train_inputs(tmp_path_factory.mktemp("train-cli"))


@pytest.fixture(scope="module")
def trained(inputs, tiny_sd_dir):
    outs = {}
    for method in ("esd", "stereo", "recare"):
        outs[method] = inputs / f"out-{method}"
        assert main(train_args(inputs, tiny_sd_dir, method, outs[method])) == 0
    return outs


def test_each_method_writes_its_outputs(trained):
    for method, out in trained.items():
        run = json.loads((out / "run.json").read_text())
        assert run["status"] == "complete" and run["identity"]["config"]["method"] == method
        assert (out / "unet.safetensors").is_file() and (out / "losses.png").is_file()
        embeds = sorted(p.name for p in out.glob("learned_embeds-*.safetensors"))
        assert embeds == ([] if method == "esd" else ["learned_embeds-1.safetensors", "learned_embeds-2.safetensors"])
    esd = json.loads((trained["esd"] / "run.json").read_text())
    assert esd["trainable"]["mode"] == "xattn"  # from [train.esd]
    assert json.loads((trained["recare"] / "run.json").read_text())["info"]["careset"].endswith("careset.json")
    stages = {line.split(",")[0] for line in (trained["stereo"] / "losses.csv").read_text().splitlines()[1:]}
    assert stages == {"erase", "inversion", "stage2"}


def test_outputs_load_into_stock_diffusers(trained, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    out = trained["recare"]
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.load_state_dict(load_file(out / "unet.safetensors"), strict=True)
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, unet=unet, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for k in (1, 2):
        pipe.load_textual_inversion(str(out / f"learned_embeds-{k}.safetensors"))
    assert pipe.tokenizer.convert_tokens_to_ids("<recare-2>") != pipe.tokenizer.unk_token_id
    image = pipe("a photo of <recare-1>", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_resume_through_the_cli(inputs, tiny_sd_dir, trained, tmp_path, capsys):
    out = tmp_path / "recare"
    assert main(train_args(inputs, tiny_sd_dir, "recare", out, "--max-steps-this-run", "3")) == 0
    assert "--resume" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"
    assert main(train_args(inputs, tiny_sd_dir, "recare", out, "--resume")) == 0
    from safetensors.torch import load_file

    a, b = load_file(trained["recare"] / "unet.safetensors"), load_file(out / "unet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage1_from_through_the_cli(inputs, tiny_sd_dir, trained, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "recare"
    assert main(train_args(inputs, tiny_sd_dir, "recare", out, "--stage1-from", str(trained["stereo"]))) == 0
    assert json.loads((out / "run.json").read_text())["info"]["stage1_from"] == str(trained["stereo"].resolve())
    a, b = load_file(trained["recare"] / "unet.safetensors"), load_file(out / "unet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_errors(inputs, tiny_sd_dir, trained, tmp_path, capsys, cli_error):
    out = tmp_path / "out"
    args = train_args(inputs, tiny_sd_dir, "recare", out)
    other = tmp_path / "vangogh.json"
    CareSet.from_words("Van Gogh", ["sky"], concept_type="style").save(other)
    assert "is for reference word 'Van Gogh'" in cli_error([a if a != str(inputs / "careset.json") else str(other)
                                                                 for a in args])
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"format_version": 1, "reference_word": "nudity"}')
    assert "invalid CARE-set file" in cli_error([a if a != str(inputs / "careset.json") else str(malformed)
                                                      for a in args])
    assert "not one whole word" in cli_error(args + ["--initializer", "Van Gogh"])
    assert "stop_range" in cli_error(args + ["--stop-range", "0", "3"])
    assert not out.exists()
    # weights of another architecture
    from diffusers import UNet2DConditionModel

    from recare.models.checkpoints import save_unet_weights

    small = UNet2DConditionModel(sample_size=16, block_out_channels=(8, 16), layers_per_block=1,
                                 cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    save_unet_weights(small, tmp_path / "small.safetensors")
    assert "does not match this UNet" in cli_error(args + ["--unet-weights", str(tmp_path / "small.safetensors")])
    # an output folder holding another run stays untouched
    folder = trained["esd"]
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert "another config" in cli_error(train_args(inputs, tiny_sd_dir, "stereo", folder))
    assert "--resume" in cli_error(train_args(inputs, tiny_sd_dir, "esd", folder))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert "no concept" in cli_error([a for a in args if a not in ("--concept", "nudity")])


@pytest.mark.parametrize("model_dir", ["tiny_sd_dir", "tiny_sdxl_dir"])
def test_run_pipeline_from_one_toml(inputs, model_dir, tiny_clip_dir, tmp_path, monkeypatch, request):
    from recare.careset import vocab

    tiny_sd_dir = request.getfixturevalue(model_dir)  # SD 1.x layout, then SDXL
    words = ["person", "woman", "man", "tree", "sky", "river", "cat", "dog", "night", "star", "red", "sun"]
    monkeypatch.setattr(vocab, "vocabulary_entries",
                        lambda tokenizer, mode="word": (list(words), [w + "</w>" for w in words], list(words)))
    config = tmp_path / "nudity.toml"
    config.write_text(f"""
[concept]
word = "nudity"
prompt = "A photo of a nude person"
type = "nudity"
initializer = "person"

[model]
source = "{tiny_sd_dir}"

[generate]
num_images = 4
num_inference_steps = 2
batch_size = 4

[careset]
clip_model = "{tiny_clip_dir}"
cache_dir = "{tmp_path / 'cache'}"
top_k = 10
top_n = 10
n_clusters = 3
""" + TINY_TRAIN)
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 0
    root = tmp_path / "run"
    assert len(list((root / "images").glob("*.png"))) == 4
    assert CareSet.load(root / "careset.json").reference_word == "nudity"
    run = json.loads((root / "recare" / "run.json").read_text())
    assert run["status"] == "complete" and run["identity"]["images"] == [f"{i:05d}.png" for i in range(4)]
    # a second call reuses images and CARE-set and finds the finished run
    assert main(["run", str(config), "--out", str(root), "--device", "cpu", "--resume"]) == 0


def test_bf16_paths_run_through_the_cli_on_the_cpu(inputs, tiny_sd_dir, tmp_path):
    """The precision a GPU uses, as an explicit choice on the CPU: bf16 autocast training (every
    phase of ReCARE) and bf16 weights for generation."""
    out = tmp_path / "bf16"
    assert main(train_args(inputs, tiny_sd_dir, "recare", out, "--mixed-precision", "bf16",
                            "--inversion-mixed-precision", "bf16")) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["identity"]["config"]["mixed_precision"] == "bf16"
    assert run["identity"]["config"]["inversion"]["mixed_precision"] == "bf16"
    images = tmp_path / "images"
    assert main(["generate", "--model", str(tiny_sd_dir), "--prompt", "a cat", "--num-images", "2", "--steps", "2",
                 "--dtype", "bf16", "--device", "cpu", "--out", str(images)]) == 0
    manifest = json.loads((images / "manifest.json").read_text())
    assert manifest["model"]["dtype"] == "bfloat16" and len(list(images.glob("*.png"))) == 2
