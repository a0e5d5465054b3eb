"""LoRA students in erasure training (TrainConfig.lora_rank > 0) on the tiny RANDOM SD: the frozen
teacher is the original model, stage 2 restarts from it, outputs load into stock diffusers, base
weights never move, and a resumed run is bit-identical."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from recare.errors import RecareError
from recare.models.loading import load_sd
from recare.models.params import merged_state_dict, select_modules
from recare.train import trainer as train_module
from recare.train.config import TrainConfig, config_from_tables
from recare.train.inversion import InversionConfig
from recare.train.run import train
from recare.train.sampling import make_ddim_scheduler
from recare.train.state import load_state
from recare.train.steps import (
    LORA_ADAPTER,
    PromptEmbeddings,
    student_epsilon,
    teacher_copy,
    teacher_epsilon,
    trainable_parameters,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_config(**overrides) -> TrainConfig:
    """Tiny ReCARE run with a rank-2 LoRA (alpha 4: scale 2); erase lr large enough to move it."""
    settings = dict(method="recare", erase_iterations=3, rounds=2, stage2_iterations=3, ddim_steps=4,
                    stop_range=(1, 3), inversion=InversionConfig(steps=2, resolution=32), checkpoint_every=2,
                    lora_rank=2, lora_alpha=4.0, erase_lr=1e-3, stage2_lr=1e-3)
    return TrainConfig(**{**settings, **overrides})


def lora_b_max(unet) -> float:
    return max(p.abs().max().item() for n, p in unet.named_parameters() if ".lora_B." in n)


def predict(unet, emb, t=500):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return unet(z, torch.tensor(t), encoder_hidden_states=emb).sample


# ----------------------------------------------------------------------------- config and CLI


def test_lora_config_defaults_and_errors():
    assert (TrainConfig().lora_rank, TrainConfig().lora_alpha) == (0, None)  # reference: no LoRA
    assert TrainConfig(lora_rank=4).effective_lora_alpha == 4.0
    assert TrainConfig(lora_rank=4, lora_alpha=8).effective_lora_alpha == 8.0
    for bad, match in [({"lora_rank": -1}, "lora_rank must be >= 0"), ({"lora_alpha": 0.0}, "lora_alpha must be > 0"),
                       ({"lora_rank": 1.5}, "'lora_rank' must be int, got 1.5")]:
        with pytest.raises(RecareError, match=match):
            TrainConfig(**bad)
    from_toml = config_from_tables({"concept": {"word": "nudity"}, "train": {"lora_rank": 4, "esd": {"lora_alpha": 2}}},
                                   {"method": "esd"})
    assert (from_toml.lora_rank, from_toml.lora_alpha) == (4, 2.0)


def test_lora_flags_through_the_cli(tiny_sd_dir, tmp_path, cli_error):
    from recare.cli import main

    args = ["train", "--method", "esd", "--model", str(tiny_sd_dir), "--concept", "nudity", "--device", "cpu",
            "--erase-iterations", "2", "--ddim-steps", "4", "--stop-range", "1", "3", "--train-method", "xattn"]
    assert "lora_rank must be >= 0" in cli_error(args + ["--out", str(tmp_path / "bad"), "--lora-rank", "-1"])
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "esd"
    assert main(args + ["--out", str(out), "--lora-rank", "2", "--lora-alpha", "8"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["identity"]["config"]["lora_rank"], run["identity"]["config"]["lora_alpha"]) == (2, 8.0)
    assert run["trainable"]["lora"] == {"rank": 2, "alpha": 8.0} and "lora.safetensors" in run["outputs"]
    assert run["trainable"]["tensors"] == 32  # 4 attn2 blocks x (to_q, to_k, to_v, to_out.0) x (A, B)


# ----------------------------------------------------------------------------- teacher and merge


def test_teacher_copy_of_the_initial_adapter_is_the_base_unet(tiny_sd):
    base = copy.deepcopy(tiny_sd.unet)
    unet = tiny_sd.unet
    trainable = trainable_parameters(unet, TrainConfig(lora_rank=2, train_method="full"))
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == set(trainable)
    fp32, bf16 = teacher_copy(trainable, None), teacher_copy(trainable, torch.bfloat16)
    with torch.no_grad():  # the student moves (A and B); the teacher copies must not
        for p in trainable.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ddim = make_ddim_scheduler(tiny_sd.scheduler, 4)
    emb = PromptEmbeddings(tiny_sd.conditioner())(["", "nudity"])
    z, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    teacher = teacher_epsilon(unet, fp32, ddim, z, t, emb)
    assert torch.equal(teacher, teacher_epsilon(base, {}, ddim, z, t, emb))  # B = 0: the original model
    with torch.no_grad():
        assert not torch.allclose(student_epsilon(unet, ddim, z, t, emb), teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 teacher copies stay exact for LoRA too
        assert torch.equal(teacher_epsilon(unet, fp32, ddim, z, t, emb), teacher_epsilon(unet, bf16, ddim, z, t, emb))


def test_same_seed_same_adapter(tiny_sd):
    from recare.models.tiny import build_tiny_sd

    config = TrainConfig(lora_rank=2, train_method="xattn", seed=3)
    a = trainable_parameters(tiny_sd.unet, config)
    b = trainable_parameters(build_tiny_sd(seed=0).unet, config)
    c = trainable_parameters(build_tiny_sd(seed=0).unet, TrainConfig(lora_rank=2, train_method="xattn", seed=4))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a if ".lora_A." in n)
    with pytest.raises(RecareError, match="already carries adapters"):
        trainable_parameters(tiny_sd.unet, config)


def test_merged_weights_are_w_plus_scaled_b_a(tiny_sd):
    unet = tiny_sd.unet
    stock = {k: v.clone() for k, v in unet.state_dict().items()}
    trainable = trainable_parameters(unet, TrainConfig(lora_rank=2, lora_alpha=3.0, train_method="noxattn"))
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.1)
    merged = merged_state_dict(unet, LORA_ADAPTER)
    assert merged.keys() == stock.keys()
    lin = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = trainable[f"{lin}.lora_A.recare.weight"], trainable[f"{lin}.lora_B.recare.weight"]  # (2, in), (out, 2)
    torch.testing.assert_close(merged[f"{lin}.weight"], stock[f"{lin}.weight"] + 1.5 * b @ a)
    a, b = trainable["conv_in.lora_A.recare.weight"], trainable["conv_in.lora_B.recare.weight"]  # (2,4,3,3), (16,2,1,1)
    delta = (b.flatten(1) @ a.flatten(1)).reshape(stock["conv_in.weight"].shape)
    torch.testing.assert_close(merged["conv_in.weight"], stock["conv_in.weight"] + 1.5 * delta)
    torch.testing.assert_close(merged["conv_in.bias"], stock["conv_in.bias"], rtol=0, atol=0)  # biases: no LoRA
    assert torch.equal(merged["conv_norm_out.weight"], stock["conv_norm_out.weight"])


# ----------------------------------------------------------------------------- a tiny LoRA ReCARE run


@pytest.fixture(scope="module")
def lora_run(tiny_sd_dir, images, careset, tmp_path_factory):
    """An uninterrupted LoRA ReCARE run; records B at every stage-1 step and the first stage-2 student."""
    components = load_sd(tiny_sd_dir)
    original = {k: v.clone() for k, v in components.unet.state_dict().items()}
    base = copy.deepcopy(components.unet)
    seen = {"stage1_b": [], "stage2_first": None}
    real_stage1, real_stage2 = train_module.stage1_loss, train_module.stage2_loss

    def stage1_spy(unet, *args, **kwargs):
        seen["stage1_b"].append(lora_b_max(unet))
        return real_stage1(unet, *args, **kwargs)

    def stage2_spy(unet, teacher, scheduler, z, t, table, rows, config):
        if seen["stage2_first"] is None:
            with torch.no_grad():
                emb = table[[rows.concept]]
                seen["stage2_first"] = (lora_b_max(unet), student_epsilon(unet, scheduler, z, t, emb),
                                        student_epsilon(base, scheduler, z, t, emb))
        return real_stage2(unet, teacher, scheduler, z, t, table, rows, config)

    out = tmp_path_factory.mktemp("lora") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "stage1_loss", stage1_spy)
        patch.setattr(train_module, "stage2_loss", stage2_spy)
        result = train(components, lora_config(), out, careset=careset, images=images, progress=False)
    assert result.complete
    return {"out": out, "unet": components.unet, "original": original, "base": base, "seen": seen,
            "emb": PromptEmbeddings(components.conditioner())(["nudity"])}


def test_unet_output_is_a_stock_unet_with_the_adapter_merged(lora_run, tiny_sd_dir):
    from diffusers import UNet2DConditionModel

    stock = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    saved = load_file(lora_run["out"] / "unet.safetensors")
    assert saved.keys() == stock.state_dict().keys()
    stock.load_state_dict(saved, strict=True)
    trained = predict(lora_run["unet"], lora_run["emb"])
    torch.testing.assert_close(predict(stock, lora_run["emb"]), trained, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(trained, predict(lora_run["base"], lora_run["emb"]), atol=1e-4)  # it trained


def test_base_weights_are_untouched(lora_run):
    state = lora_run["unet"].state_dict()
    adapters = [k for k in state if ".lora_" in k]
    assert adapters and {n for n, p in lora_run["unet"].named_parameters() if p.requires_grad} == set(adapters)
    bases = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    assert bases.keys() == lora_run["original"].keys()
    assert all(torch.equal(v, lora_run["original"][k]) for k, v in bases.items())


def test_teacher_rounds_and_stage2_restart(lora_run):
    seen = lora_run["seen"]
    b_round1, b_round2 = seen["stage1_b"][:3], seen["stage1_b"][3:]
    assert b_round1[0] == 0 and b_round1[-1] > 0  # round 1 starts from the original (B = 0) and moves
    assert b_round2[0] > 0  # round 2 continues from round 1's adapter
    b_stage2, student, original = seen["stage2_first"]
    assert b_stage2 == 0  # stage 2 restarts from the ORIGINAL UNet: the initial adapter
    assert torch.equal(student, original)


def test_lora_file_loads_into_a_diffusers_pipeline(lora_run, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    path = lora_run["out"] / "lora.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert (meta["recare_lora_rank"], meta["recare_lora_alpha"], meta["recare_train_method"]) == ("2", "4.0", "noxattn")
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert (adapter["unet.r"], adapter["unet.lora_alpha"]) == (2, 4.0)
    assert json.loads(meta["recare_lora_target_modules"]) == sorted(select_modules(lora_run["base"], "noxattn"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    torch.testing.assert_close(predict(pipe.unet, lora_run["emb"]), predict(lora_run["unet"], lora_run["emb"]))
    run = json.loads((lora_run["out"] / "run.json").read_text())
    assert "lora.safetensors" in run["outputs"] and run["trainable"]["lora"] == {"rank": 2, "alpha": 4.0}


def test_stopped_and_resumed_lora_run_is_bit_identical(lora_run, tiny_sd_dir, images, careset, tmp_path):
    out = tmp_path / "run"
    for budget in (4, 1):  # stops inside erase-2, then in erase-2 after a mid-round checkpoint
        result = train(load_sd(tiny_sd_dir), lora_config(), out, careset=careset, images=images, resume=True,
                       stop_after=budget, progress=False)
        assert not result.complete
        params = load_state(out).group("param")
        assert params and all(".lora_A." in n or ".lora_B." in n for n in params)
    assert train(load_sd(tiny_sd_dir), lora_config(), out, careset=careset, images=images, resume=True,
                 progress=False).complete
    for name in ("unet.safetensors", "lora.safetensors"):
        a, b = load_file(lora_run["out"] / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (out / "losses.csv").read_text() == (lora_run["out"] / "losses.csv").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lora_run_on_cuda_with_bf16_autocast(tiny_sd_dir, images, careset, tmp_path):
    from diffusers import UNet2DConditionModel

    result = train(load_sd(tiny_sd_dir, device="cuda"), lora_config(), tmp_path / "cuda", careset=careset,
                   images=images, device="cuda", progress=False)
    assert result.complete and all(np.isfinite(row[3]) for row in result.losses)
    saved = load_file(tmp_path / "cuda" / "unet.safetensors")
    assert saved["conv_in.weight"].dtype == torch.float32
    UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").load_state_dict(saved, strict=True)
