"""Memory plan of full-size erasure training (SD v1.4, SDXL base), counted on the meta device: nothing is allocated.

Per model and trainable set (train_method, or a LoRA adapter on it), the GiB of the tensors that
recare.train.trainer.Trainer keeps (bench_train.memory_plan says which), plus, under bf16 autocast, the bf16 weight
casts a training step holds for its backward (bench_train.grad_path_weights), before activations, and whether they
fit an 80 GiB H100, a 141 GiB H200 and a 24 GiB card. Seconds on a CPU.

    python benchmarks/memory_plan.py                               # SD v1.4 and SDXL, bf16 autocast
    python benchmarks/memory_plan.py --model sdxl --precision no   # fp32 (no autocast): fp32 teacher copy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench_train import MODELS, memory_plan
from recare.io import write_json_atomic

CARDS = {"H100 80 GiB": 80.0, "H200 141 GiB": 141.0, "24 GiB": 24.0}
SETUPS = (("noxattn", 0), ("xattn", 0), ("xattn-strict", 0), ("noxattn", 4), ("xattn", 4))
COLUMNS = (("unet_fp32", "UNet fp32"), ("gradients_fp32", "grads"), ("adamw_states_fp32", "AdamW"),
           ("teacher", "teacher"), ("text_encoders_fp32", "text enc."), ("vae_fp32", "VAE"),
           ("total", "kept on device"), ("autocast_weight_casts_bf16", "bf16 casts"), ("step_total", "step total"),
           ("host_original_master_fp32", "host master"))


def setup_name(train_method: str, lora_rank: int) -> str:
    return f"LoRA r{lora_rank} on {train_method}" if lora_rank else train_method


def plans(models: list[str], precision: str) -> list[dict]:
    rows = []
    for model in models:
        for train_method, rank in SETUPS:
            plan = memory_plan(train_method, model, rank, precision)
            plan["teacher"] = plan.get("teacher_copy_bf16", plan.get("teacher_copy_fp32"))
            rows.append({"model": model, "setup": setup_name(train_method, rank), "train_method": train_method,
                         "lora_rank": rank, "precision": precision, "plan_gib": plan,
                         "fits_before_activations": {card: plan["step_total"] < gib for card, gib in CARDS.items()}})
    return rows


def format_markdown(rows: list[dict]) -> list[str]:
    header = ["model", "trainable", "trainable M", *(label for _, label in COLUMNS), *CARDS]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        plan = row["plan_gib"]
        fits = [f"yes ({gib - plan['step_total']:.0f} left)" if ok else "no"
                for (card, ok), gib in zip(row["fits_before_activations"].items(), CARDS.values())]
        cells = [row["model"], row["setup"], f"{plan['trainable_parameters_M']:.1f}",
                 *(f"{plan[key]:.2f}" for key, _ in COLUMNS), *fits]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=list(MODELS), choices=MODELS, help="full-size architectures")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "no"),
                        help="'bf16': bf16 autocast over fp32 master weights (the GPU default); 'no': fp32")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    rows = plans(args.model, args.precision)
    unet_m = {row["model"]: row["plan_gib"]["unet_parameters_M"] for row in rows}
    mode = "bf16 autocast over fp32 master weights" if args.precision == "bf16" else "fp32, no autocast"
    print(f"memory plan, GiB before activations, {mode}; UNet parameters: "
          + ", ".join(f"{m} {n:.1f}M" for m, n in unet_m.items()))
    print("\n".join(format_markdown(rows)))
    if args.precision == "bf16":
        print("bf16 casts held by an inversion step (UNet conditioning path + text encoders): "
              + ", ".join(f"{m} {r['plan_gib']['inversion_autocast_weight_casts_bf16']:.2f} GiB"
                          for m, r in {row["model"]: row for row in rows}.items()))
    if args.json:
        write_json_atomic(args.json, {"precision": args.precision, "cards_gib": CARDS, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
