"""Attacks for the robustness axis (method §5): plain prompts, CCE and UnlearnDiffAtk, scored as ASR.

Every attack generates images with the ATTACKED model (any `SDComponents`: base SD, an erased
UNet, learned tokens), runs a detector on them and returns an `AttackResult`: one record per
prompt and the attack success rate (percent of images detected) with a Wilson 95% interval.
`asr` (detection, ASR, records), `plain`, `cce`, `unlearndiff`. May import: recare.train
(textual inversion for CCE, guidance), recare.metrics (detectors, intervals), recare.generate,
recare.models, recare.io, recare.errors, recare.config.
"""

from recare.attacks.asr import AsrSummary, AttackResult, summarize_asr
from recare.attacks.cce import CceConfig, learn_cce_token, run_cce_attack
from recare.attacks.plain import run_plain_attack
from recare.attacks.unlearndiff import UnlearnDiffAtkConfig, run_unlearndiffatk

__all__ = ["AsrSummary", "AttackResult", "CceConfig", "UnlearnDiffAtkConfig", "learn_cce_token", "run_cce_attack",
           "run_plain_attack", "run_unlearndiffatk", "summarize_asr"]
