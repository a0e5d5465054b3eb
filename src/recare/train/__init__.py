"""Erasure training (method §3, 4, 4b): ESD, STEREO and ReCARE from one trainer.

`config` (TrainConfig and its TOML form), `methods` (what each method needs), `guidance` and
`losses` (pure tensor math of the targets), `sampling` (partial DDIM trajectories),
`inversion` (textual inversion), `steps` (one iteration's predictions and losses), `trainer`
(phases, resume, `train`), `state` (resumable state), `outputs` (run.json, losses, folder checks).
May import: recare.careset (the CareSet artifact), recare.models, recare.io, recare.errors,
recare.config. The pure math (guidance, losses) imports nothing that loads models.
"""

from recare.train.config import TrainConfig, config_from_tables, config_from_toml
from recare.train.inversion import InversionConfig
from recare.train.run import TrainResult, train

__all__ = ["InversionConfig", "TrainConfig", "TrainResult", "config_from_tables", "config_from_toml", "train"]
