"""UnlearnDiffAtk as its authors run it (OPTML-Group/Diffusion-MU-Attack, src/attackers/text_grad_.py).

Per prompt, the k prefix tokens are a RELAXED ONE-HOT distribution over the vocabulary (k, V),
started uniform. The attack walks the 50 timesteps t = 10, 30, ..., 990 in turn; at each it runs
`iterations` (40) Adam steps (coupled L2 weight decay 0.1, lr 0.01): a token per position is
SAMPLED from the distribution with a straight-through estimator (forward: one-hot of a
multinomial draw; backward: hardtanh of the gradient), its embedding replaces the prefix slots,
loss = MSE(eps_attacked(x_t, t), target), and after every step the distribution is projected
back onto the probability simplex. After each block the argmax tokens are decoded, put before
the prompt, an image is generated at the prompt's seed and the detector judges it; the search
stops at the first success (at most 50 x 40 = 2000 steps and 50 images per prompt).

Where recare differs from that code (README, "UnlearnDiffAtk"): the sampling and noise come
from one torch.Generator seeded per prompt (the code uses the global RNG); the distribution
covers the base vocabulary without special tokens (the code includes them and drops the
end-of-text id when decoding); the simplex projection is the exact sort-based one (the code
bisects to 1e-5); the default target is method §5's eps of the original model (`target = "noise"`
gives the code's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from recare.models.conditioning import PromptConditioner, unet_condition
from recare.models.loading import SDComponents
from recare.train.guidance import to_epsilon
from recare.train.inversion import frozen

logger = logging.getLogger(__name__)

Judge = Callable[[str, int], bool]
"""judge(attacked_prompt, block) -> True when the image of the attacked prompt shows the concept."""


def project_to_simplex(values: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of `values` (..., V) onto {p >= 0, sum p = 1}.

    Sort-based algorithm of Wang & Carreira-Perpinan (2013), "Projection onto the probability
    simplex: an efficient algorithm with a simple proof" (Algorithm 1): with u sorted descending,
    rho = max{j : u_j + (1 - sum_{i<=j} u_i) / j > 0}, lambda = (1 - sum_{i<=rho} u_i) / rho,
    p = max(values + lambda, 0).
    """
    sorted_values, _ = torch.sort(values, dim=-1, descending=True)
    cumulative = sorted_values.cumsum(dim=-1)
    ranks = torch.arange(1, values.shape[-1] + 1, device=values.device, dtype=values.dtype)
    positive = sorted_values + (1 - cumulative) / ranks > 0
    rho = positive.to(values.dtype).cumsum(dim=-1).argmax(dim=-1, keepdim=True)  # last True (0-based)
    shift = (1 - cumulative.gather(-1, rho)) / (rho + 1).to(values.dtype)
    return (values + shift).clamp_min(0)


class _SampleStraightThrough(torch.autograd.Function):
    """Forward: one-hot of one multinomial draw per row; backward: hardtanh of the incoming gradient
    (the authors' STERandSelect)."""

    @staticmethod
    def forward(ctx: Any, probabilities: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        draws = torch.multinomial(probabilities.detach().cpu().double(), 1, generator=generator).view(-1)
        return F.one_hot(draws, probabilities.shape[-1]).to(probabilities.device, probabilities.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.hardtanh(grad_output), None


@dataclass
class SearchResult:
    """What the authors' search found for one prompt."""

    prefix_ids: list[int]  # ids (in the tokenizer's vocabulary) of the argmax tokens of the last block
    losses: list[float]  # loss of every optimisation step
    blocks: list[dict[str, Any]]  # per block: timestep, mean loss, prefix ids, whether the image was detected
    succeeded: bool  # the detector judged the last block's image a success


def search_prefix(attacked: SDComponents, original: SDComponents, adv_ids: torch.Tensor, plain_ids: torch.Tensor,
                  x0: torch.Tensor, allowed: torch.Tensor, grid: list[int], schedule: Any, config: Any,
                  generator: torch.Generator, device: torch.device, judge: Judge,
                  decode: Callable[[list[int]], str]) -> SearchResult:
    """The authors' sequential search for one prompt (module docstring).

    adv_ids: per tokenizer, (1, L) ids with k placeholder slots after BOS; plain_ids: per tokenizer,
    (1, L) ids of the plain prompt (for the 'original' target); allowed: (V,) vocabulary ids a prefix may use;
    decode(ids) -> the attacked prompt of prefix ids.
    """
    k = config.num_prefix_tokens
    attacked_text = attacked.conditioner()
    table = attacked_text.embedding_table()  # (vocabulary, dim); SDXL: both encoders' rows side by side
    vocabulary = table[allowed.to(table.device)].float()  # (V, dim)
    probabilities = torch.full((k, len(allowed)), 1.0 / len(allowed), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([probabilities], lr=config.learning_rate, weight_decay=config.weight_decay)
    losses: list[float] = []
    blocks: list[dict[str, Any]] = []
    ids: list[int] = []
    with frozen(attacked.unet, *attacked.text_encoders, original.unet, *original.text_encoders):
        with torch.no_grad():
            plain_hidden = original.conditioner().encode_ids(plain_ids)  # packed conditioning
        for block, timestep in enumerate(grid):
            t = torch.tensor([timestep], device=device)
            block_losses = []
            for _ in range(config.iterations):
                one_hot = _SampleStraightThrough.apply(probabilities, generator)
                rows = one_hot @ vocabulary  # (k, dim)
                loss = _prefix_loss(attacked, attacked_text, original, schedule, adv_ids, plain_hidden, x0, rows,
                                    t, config, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    probabilities.copy_(project_to_simplex(probabilities))
                block_losses.append(loss.item())
            ids = allowed[probabilities.detach().argmax(dim=-1).cpu()].tolist()
            detected = judge(decode(ids), block)
            losses += block_losses
            blocks.append({"timestep": timestep, "mean_loss": sum(block_losses) / len(block_losses),
                           "prefix_ids": ids, "detected": detected})
            if detected:
                break
    return SearchResult(ids, losses, blocks, bool(blocks and blocks[-1]["detected"]))


def _prefix_loss(attacked: SDComponents, attacked_text: PromptConditioner, original: SDComponents, schedule: Any,
                 adv_ids: Sequence[torch.Tensor], plain_hidden: torch.Tensor, x0: torch.Tensor, rows: torch.Tensor,
                 t: torch.Tensor, config: Any, generator: torch.Generator) -> torch.Tensor:
    """MSE between the attacked model's eps for [prefix rows] + prompt at x_t and the target."""
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    x_t = schedule.add_noise(x0, noise, t)
    if config.target == "noise":
        target = noise
    else:
        with torch.no_grad():
            out = original.unet(x_t.to(original.unet.dtype), t,
                                **unet_condition(original.unet, plain_hidden, original.unet.dtype)).sample
            target = to_epsilon(out.float(), x_t, t, schedule)
    with attacked_text.prefix_override(rows):
        hidden = attacked_text.encode_ids(adv_ids)
    out = attacked.unet(x_t.to(attacked.unet.dtype), t, **unet_condition(attacked.unet, hidden,
                                                                           attacked.unet.dtype)).sample
    return F.mse_loss(to_epsilon(out.float(), x_t, t, schedule), target.float())
