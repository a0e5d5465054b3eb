"""Prompt conditioning of the UNet, for each model family: the one place that knows SD 1.x/2.x from SDXL.

SD 1.x/2.x: one tokenizer and one CLIP text encoder; the UNet's `encoder_hidden_states` are the
encoder's last hidden state, (n, 77, D).

SDXL (Podell et al. 2023, "SDXL", sec. 2.1-2.2; diffusers' StableDiffusionXLPipeline.encode_prompt):
two tokenizers and two text encoders; `encoder_hidden_states` are the concatenation, along the
feature axis, of both encoders' PENULTIMATE hidden states, (n, 77, 768 + 1280); the UNet also takes
`added_cond_kwargs`: `text_embeds`, the second encoder's pooled projection (n, 1280), and
`time_ids` = (original height, original width, crop top, crop left, target height, target width),
here (S, S, 0, 0, S, S) for the model's image size S (1024 for SDXL base), as the pipeline sets them
when no sizes are given.

One tensor carries a prompt's whole conditioning (a "packed conditioning"), so that the code that
batches prompts (concatenate, index rows, expand) never needs to know the family:
- SD 1.x/2.x: the hidden states themselves, (n, 77, D).
- SDXL: (n, 77 + 1, D): the hidden states, then ONE extra row holding [text_embeds | time_ids | 0...].
`unet_condition(unet, packed)` unpacks it into the UNet's keyword arguments at every UNet call;
the extra row never reaches attention.

The unconditional prompt "": SD 1.x/2.x encode it. SDXL follows its pipeline's convention: with
`force_zeros_for_empty_prompt` (True for SDXL base, read from the model's model_index.json) the
negative branch is all zeros (hidden states AND text_embeds); otherwise "" is encoded.

Textual inversion and UnlearnDiffAtk work on token-embedding ROWS. With two encoders a token's row
is the concatenation of its rows in both encoders' tables (768 + 1280 for SDXL): one tensor to
optimise, split at each encoder's input. Both tokenizers must share their vocabulary (SDXL's do:
the same CLIP BPE, only the padding token differs), so a token has one id in both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from recare.errors import RecareError
from recare.models.embeddings import add_placeholder_token, prefix_override, token_row_override

FAMILIES = ("sd", "sdxl")
N_TIME_IDS = 6
"""SDXL's micro-conditioning: original size (2), crop top-left (2), target size (2)."""


def is_sdxl_unet(unet: Any) -> bool:
    """Whether the UNet takes SDXL's text_time added conditioning (read from its config)."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def pooled_width(unet: Any) -> int:
    """Width of SDXL's text_embeds: the add-embedding input minus the time ids' embedding (from the config)."""
    config = unet.config
    return int(config.projection_class_embeddings_input_dim) - N_TIME_IDS * int(config.addition_time_embed_dim)


def unet_condition(unet: Any, packed: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The UNet's keyword arguments for a packed conditioning (module docstring), cast to `dtype` if given."""
    if dtype is not None:
        packed = packed.to(dtype)
    if not is_sdxl_unet(unet):
        return {"encoder_hidden_states": packed}
    width = pooled_width(unet)
    extra = packed[:, -1]  # (n, D)
    return {"encoder_hidden_states": packed[:, :-1],
            "added_cond_kwargs": {"text_embeds": extra[:, :width], "time_ids": extra[:, width:width + N_TIME_IDS]}}


def pack_sdxl(hidden: torch.Tensor, pooled: torch.Tensor, time_ids: Sequence[float]) -> torch.Tensor:
    """(n, L + 1, D): hidden (n, L, D), then the row [pooled (n, P) | time_ids | zeros] (module docstring)."""
    n, _, width = hidden.shape
    if pooled.shape[1] + len(time_ids) > width:
        raise RecareError(f"SDXL conditioning: text_embeds ({pooled.shape[1]}) and {len(time_ids)} time ids do not fit "
                          f"one row of width {width}; this UNet layout is not supported")
    extra = hidden.new_zeros(n, 1, width)
    extra[:, 0, :pooled.shape[1]] = pooled.to(hidden.dtype)
    extra[:, 0, pooled.shape[1]:pooled.shape[1] + len(time_ids)] = torch.tensor(time_ids, dtype=hidden.dtype)
    return torch.cat([hidden, extra], dim=1)


@dataclass
class PromptConditioner:
    """Token ids and packed UNet conditioning of prompts for one model (module docstring).

    Built by `SDComponents.conditioner()`; holds the components' tokenizers and text encoders
    (not copies), so tokens added here are in the components too.
    """

    tokenizers: tuple[Any, ...]
    text_encoders: tuple[Any, ...]
    family: str = "sd"
    time_ids: tuple[float, ...] = ()
    """SDXL: (S, S, 0, 0, S, S) for the image size S; empty for SD 1.x/2.x."""
    zeros_for_empty_prompt: bool = False
    """SDXL pipelines' force_zeros_for_empty_prompt: "" conditions as all zeros."""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise RecareError(f"unknown model family {self.family!r}; choose one of {FAMILIES}")
        if len(self.tokenizers) != len(self.text_encoders) or not self.tokenizers:
            raise RecareError("a prompt conditioner needs one tokenizer per text encoder")
        if len(self.tokenizers) > 1 and any(len(t) != len(self.tokenizers[0]) for t in self.tokenizers[1:]):
            raise RecareError("the tokenizers of this model have different vocabularies; recare needs one shared "
                              f"vocabulary (sizes {[len(t) for t in self.tokenizers]})")

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders[0].parameters()).device

    @property
    def row_widths(self) -> tuple[int, ...]:
        """Width of each encoder's token-embedding rows; a token's row is their concatenation."""
        return tuple(int(e.get_input_embeddings().weight.shape[1]) for e in self.text_encoders)

    @property
    def tokenizer(self) -> Any:
        """The first tokenizer: ids, decoding and the vocabulary are the same in all (checked)."""
        return self.tokenizers[0]

    # --- ids and encoding

    def token_ids(self, prompts: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """Per tokenizer, (n, L) ids padded to its max length, on the encoders' device (as the pipelines)."""
        return tuple(t(list(prompts), padding="max_length", truncation=True, max_length=t.model_max_length,
                       return_tensors="pt").input_ids.to(self.device) for t in self.tokenizers)

    def encode_ids(self, ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """Packed conditioning of token ids (one (n, L) tensor per tokenizer); gradients flow (no no_grad)."""
        if len(ids) != len(self.text_encoders):
            raise RecareError(f"{len(ids)} id tensors for {len(self.text_encoders)} text encoders")
        if self.family == "sd":
            return self.text_encoders[0](ids[0])[0]  # (n, L, D) last hidden state
        hidden, pooled = [], None
        for encoder, encoder_ids in zip(self.text_encoders, ids):
            out = encoder(encoder_ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # penultimate layer, as the SDXL pipeline
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (the last such encoder wins)
                pooled = out[0]
        if pooled is None:
            raise RecareError("SDXL conditioning needs a text encoder with a projection (CLIPTextModelWithProjection)")
        return pack_sdxl(torch.cat(hidden, dim=-1), pooled, self.time_ids)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Packed float32 conditioning of prompts, (n, L or L + 1, D); "" by the family's convention."""
        packed = self.encode_ids(self.token_ids(prompts)).float()
        if self.family == "sdxl" and self.zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=packed.device)
            width = int(self.text_encoders[-1].config.projection_dim)  # text_embeds
            zeros = torch.zeros_like(packed)
            zeros[:, -1, width:width + N_TIME_IDS] = packed[:, -1, width:width + N_TIME_IDS]  # the same time ids
            packed = torch.where(empty[:, None, None], zeros, packed)
        return packed

    # --- token-embedding rows

    def token_row(self, token_id: int) -> torch.Tensor:
        """The token's concatenated input-embedding row, (sum(row_widths),), as stored."""
        return torch.cat([e.get_input_embeddings().weight[token_id] for e in self.text_encoders])

    def split_row(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Each encoder's part of rows (..., sum(row_widths)), as slices of `rows` (views: gradients flow
        back, and an in-place update of `rows` between forwards is seen)."""
        if rows.shape[-1] != sum(self.row_widths):
            raise RecareError(f"embedding rows have {rows.shape[-1]} values; this model needs {sum(self.row_widths)} "
                              f"({' + '.join(map(str, self.row_widths))})")
        offsets = [sum(self.row_widths[:i]) for i in range(len(self.row_widths))]
        return [rows.narrow(-1, offset, width) for offset, width in zip(offsets, self.row_widths)]

    def set_token_row(self, token_id: int, row: torch.Tensor) -> None:
        """Write a concatenated row into every encoder's table."""
        with torch.no_grad():
            for encoder, part in zip(self.text_encoders, self.split_row(row.reshape(-1))):
                table = encoder.get_input_embeddings().weight
                table[token_id] = part.to(table.device, table.dtype)

    def embedding_table(self) -> torch.Tensor:
        """(vocabulary, sum(row_widths)): the token-embedding tables side by side, detached (SD: the table itself)."""
        tables = [e.get_input_embeddings().weight.detach() for e in self.text_encoders]
        return tables[0] if len(tables) == 1 else torch.cat([t.to(tables[0].device) for t in tables], dim=-1)

    def add_placeholder(self, placeholder: str, initializer: str, mode: str = "word") -> tuple[int, int]:
        """Add a new token to every tokenizer/encoder pair (recare.models.embeddings.add_placeholder_token);
        (placeholder id, initializer id), the same in every tokenizer (checked)."""
        ids = [add_placeholder_token(t, e, placeholder, initializer, mode)
               for t, e in zip(self.tokenizers, self.text_encoders)]
        if len(set(ids)) != 1:
            raise RecareError(f"placeholder {placeholder!r} got different ids in the tokenizers: {ids}")
        return ids[0]

    @contextlib.contextmanager
    def row_override(self, token_id: int, row: torch.Tensor) -> Iterator[None]:
        """While active, the token's input embedding in every encoder is its part of `row` (gradients flow;
        recare.models.embeddings.token_row_override per encoder)."""
        with contextlib.ExitStack() as stack:
            for encoder, part in zip(self.text_encoders, self.split_row(row)):
                stack.enter_context(token_row_override(encoder, token_id, part))
            yield

    @contextlib.contextmanager
    def prefix_override(self, rows: torch.Tensor, start: int = 1) -> Iterator[None]:
        """While active, positions start..start+k-1 of every sequence take `rows` (k, sum(row_widths))
        (recare.models.embeddings.prefix_override per encoder)."""
        with contextlib.ExitStack() as stack:
            for encoder, part in zip(self.text_encoders, self.split_row(rows)):
                stack.enter_context(prefix_override(encoder, part, start))
            yield
