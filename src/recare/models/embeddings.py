"""Token embeddings of a CLIP text encoder: placeholder tokens, and rows overridden during a forward.

One mechanism serves textual inversion (one token's row is a trained tensor, method §3b) and
UnlearnDiffAtk (the first k positions of every prompt are trained tensors): a forward hook on the
token-embedding module replaces looked-up rows, so gradients reach the trained tensors and the
embedding table itself is never modified.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

import torch

from recare.errors import RecareError

logger = logging.getLogger(__name__)

INITIALIZER_MODES = ("word", "reference")
"""How a placeholder's initial embedding is found (add_placeholder_token)."""
EmbeddingSubstitute = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(input_ids (b, seq), looked-up embeddings (b, seq, dim)) -> the embeddings to use instead."""


def add_placeholder_token(tokenizer, text_encoder, placeholder: str, initializer: str,
                          initializer_mode: str = "word") -> tuple[int, int]:
    """Add `placeholder` to tokenizer and text encoder, its embedding copied from `initializer`.

    initializer_mode (method §3b):
      - "word" (default, diffusers' textual-inversion example): `initializer` must tokenise to
        exactly one token as a whole word: "person" -> "person</w>" (id 2533), "art" ->
        "art</w>" (id 794). Several tokens raise RecareError naming the pieces. This is the
        embedding of the word as it appears in prompts, hence the default.
      - "reference" (damilab/CARE): `tokenizer.convert_tokens_to_ids(initializer)`, a raw
        vocabulary lookup that returns the word-FRAGMENT entry: "person" -> 3510, "art" -> 1486
        ("person</w>" also works and gives 2533). Where the reference silently falls back to
        the end-of-text id for a string that is not a vocabulary entry, this raises RecareError.
    Special tokens (start/end of text) are rejected in both modes.

    Returns:
        (placeholder_id, initializer_id).
    """
    if initializer_mode not in INITIALIZER_MODES:
        raise RecareError(f"unknown initializer_mode {initializer_mode!r}; choose one of {INITIALIZER_MODES}")
    if not placeholder or placeholder != placeholder.strip():
        raise RecareError(f"placeholder {placeholder!r} must be non-empty without surrounding spaces")
    if placeholder in tokenizer.get_vocab():
        raise RecareError(f"placeholder {placeholder!r} already exists in the tokenizer; choose a new name")
    initializer_id = _initializer_id(tokenizer, initializer, initializer_mode)
    tokenizer.add_tokens([placeholder])
    placeholder_id = tokenizer.convert_tokens_to_ids(placeholder)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new row is overwritten
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[placeholder_id] = table[initializer_id]
    if tokenizer.encode(f"a {placeholder}", add_special_tokens=False)[-1:] != [placeholder_id]:
        raise RecareError(f"the tokenizer does not keep placeholder {placeholder!r} as one token in prompts")
    logger.info("added token %r (id %d) initialised from %r (id %d, mode %s)", placeholder, placeholder_id,
                tokenizer.convert_ids_to_tokens(initializer_id), initializer_id, initializer_mode)
    return placeholder_id, initializer_id


def _initializer_id(tokenizer, initializer: str, mode: str) -> int:
    """The token id that initialises the placeholder (see add_placeholder_token)."""
    special = set(tokenizer.all_special_ids)
    if mode == "word":
        ids = tokenizer.encode(initializer, add_special_tokens=False)
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise RecareError(f"initializer {initializer!r} is {len(ids)} tokens {pieces}, not one whole word; "
                              "choose a single-token word or initializer_mode='reference'")
        token_id = ids[0]
    else:
        token_id = tokenizer.convert_tokens_to_ids(initializer)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise RecareError(f"initializer {initializer!r} is not an entry of the tokenizer vocabulary "
                              "(reference mode looks up raw entries such as 'person' or 'person</w>')")
    if token_id in special:
        raise RecareError(f"initializer {initializer!r} is a special token (id {token_id})")
    return int(token_id)


@contextlib.contextmanager
def input_embedding_override(text_encoder: Any, substitute: EmbeddingSubstitute) -> Iterator[None]:
    """While active, the text encoder's token embeddings are substitute(input_ids, embeddings)."""
    def hook(module, args, output):
        return substitute(args[0], output)

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def token_row_override(text_encoder: Any, token_id: int, row: torch.Tensor) -> contextlib.AbstractContextManager:
    """While active, the input embedding of `token_id` is `row` (dim,), kept in its own dtype for gradients."""
    def substitute(input_ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        is_token = (input_ids == token_id).unsqueeze(-1)  # (b, seq, 1)
        return torch.where(is_token, row.to(output.dtype), output)

    return input_embedding_override(text_encoder, substitute)


def prefix_override(text_encoder: Any, rows: torch.Tensor, start: int = 1) -> contextlib.AbstractContextManager:
    """While active, input embeddings at positions start..start+k-1 of every sequence are `rows` (k, dim)."""
    k = rows.shape[0]

    def substitute(input_ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:  # output: (b, seq, dim)
        prefix = rows.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :start], prefix, output[:, start + k:]], dim=1)

    return input_embedding_override(text_encoder, substitute)
