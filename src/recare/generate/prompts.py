"""Prompt files and generation jobs: which image to make, from which prompt, with which seed.

A `PromptJob` is one image: its prompt, its seed and its output file stem. Seeds follow the
reference (method §1 and 5): image i of a prompt uses seed `seed + i` (42, 43, ...), so the same
job list always gives the same images whatever the batch size.

File formats read by `read_prompt_file`:
- `.txt`: one prompt per non-empty line (surrounding whitespace stripped).
- `.csv`: a header row; the prompt column (default `prompt`), and when present the seed column
  (default `evaluation_seed`), `evaluation_guidance` (per-prompt guidance scale) and
  `case_number` (kept as the job's case id). The benchmark files in ../shared/data use this layout.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from recare.errors import RecareError

DEFAULT_SEED = 42
GUIDANCE_COLUMN = "evaluation_guidance"
CASE_COLUMN = "case_number"


@dataclass(frozen=True)
class PromptJob:
    """One image to generate."""

    prompt: str  # text given to the pipeline
    seed: int  # seed of this image's own torch.Generator
    name: str  # output file stem (no extension), unique within an output folder
    guidance: float | None = None  # per-prompt guidance scale; None = the GenerationConfig's
    prompt_index: int = 0  # position of the prompt in its list or file (0-based)
    case_id: str | None = None  # the file's own id of the prompt (CSV `case_number`), if any


def jobs_for_prompt(prompt: str, num_images: int, seed: int = DEFAULT_SEED) -> list[PromptJob]:
    """Images i = 0..num_images-1 of one prompt at seeds seed+i, named `{i:05d}` (method §1)."""
    _check_count(num_images, "num_images")
    _check_prompt(prompt, "prompt")
    return [PromptJob(prompt, seed + i, f"{i:05d}") for i in range(num_images)]


def jobs_for_prompts(prompts: Sequence[str], num_images_per_prompt: int = 1, seed: int = DEFAULT_SEED,
                     seeds: Sequence[int] | None = None, guidances: Sequence[float | None] | None = None,
                     case_ids: Sequence[str | None] | None = None) -> list[PromptJob]:
    """Jobs for a list of prompts: image i of prompt p gets seed `seeds[p] + i` and name `{p:05d}_{i:03d}`.

    `seeds` (one base seed per prompt) defaults to `seed` for every prompt, so each prompt's
    images use seeds 42..42+n-1 as the CARE score does (method §5).
    """
    _check_count(num_images_per_prompt, "num_images_per_prompt")
    n = len(prompts)
    seeds = [seed] * n if seeds is None else list(seeds)
    guidances = [None] * n if guidances is None else list(guidances)
    case_ids = [None] * n if case_ids is None else list(case_ids)
    if not len(seeds) == len(guidances) == len(case_ids) == n:
        raise ValueError("prompts, seeds, guidances and case_ids must have the same length")
    jobs = []
    for p, (prompt, base, guidance, case) in enumerate(zip(prompts, seeds, guidances, case_ids)):
        _check_prompt(prompt, f"prompt {p}")
        jobs += [PromptJob(prompt, base + i, f"{p:05d}_{i:03d}", guidance, p, case)
                 for i in range(num_images_per_prompt)]
    return jobs


SHIPPED_PROMPT_SETS = {"nudity": "nudity.csv", "vangogh": "vangogh.csv", "tench": "tench.csv",
                       "coco_30k": "coco_30k.csv", "i2p": "i2p.csv"}
"""The field's prompt sets shipped in recare/data/prompts (MIT; sources in its SOURCES.md), by name."""


def prompt_file_path(value: str | os.PathLike) -> Path:
    """A prompt file: an existing path, or the name of a shipped prompt set (SHIPPED_PROMPT_SETS)."""
    from importlib import resources

    path = Path(value)
    if path.exists():
        return path
    name = str(value)
    if name in SHIPPED_PROMPT_SETS:
        return Path(str(resources.files("recare").joinpath("data", "prompts", SHIPPED_PROMPT_SETS[name])))
    if not path.suffix:
        raise RecareError(f"prompt file {name!r} not found; the shipped prompt sets are {sorted(SHIPPED_PROMPT_SETS)}")
    return path


def read_prompt_file(path: str | os.PathLike, num_images_per_prompt: int = 1, seed: int = DEFAULT_SEED,
                     prompt_column: str = "prompt", seed_column: str = "evaluation_seed",
                     limit: int | None = None) -> list[PromptJob]:
    """Jobs for every prompt of a .txt or .csv file (format in the module docstring).

    Image i of a prompt gets seed `base + i`, where base is the row's `seed_column` value when
    the CSV has that column, else `seed`. `limit` keeps the first `limit` prompts.
    Raises RecareError naming the file for a missing or empty file, a missing column, or a
    non-integer seed / non-numeric guidance.
    """
    _check_count(num_images_per_prompt, "num_images_per_prompt")
    path = prompt_file_path(path)
    if limit is not None and limit < 1:
        raise RecareError(f"limit must be a positive number of prompts, got {limit}")
    if path.suffix.lower() == ".csv":
        prompts, seeds, guidances, cases = _read_csv(path, prompt_column, seed_column, limit)
    else:
        prompts = read_prompts(path, limit=limit)
        seeds, guidances, cases = None, None, None
    return jobs_for_prompts(prompts, num_images_per_prompt, seed, seeds, guidances, cases)


def read_prompts(path: str | os.PathLike, prompt_column: str = "prompt", limit: int | None = None) -> list[str]:
    """Just the prompt texts of a .txt or .csv prompt file (same rules as read_prompt_file)."""
    path = prompt_file_path(path)
    if path.suffix.lower() == ".csv":
        return _read_csv(path, prompt_column, None, limit)[0]
    lines = [line.strip() for line in _read_text(path).splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise RecareError(f"prompt file {path} has no prompts (only empty lines)")
    return prompts[:limit] if limit is not None else prompts


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise RecareError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise RecareError(f"prompt file {path} is not UTF-8 text: {err}") from err
    if not text.strip():
        raise RecareError(f"prompt file {path} is empty")
    return text


def _read_csv(path: Path, prompt_column: str, seed_column: str | None, limit: int | None):
    """(prompts, base seeds or None, guidances or None, case ids or None) of a CSV prompt file."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    rows = list(reader)
    columns = list(reader.fieldnames or [])
    if prompt_column not in columns:
        raise RecareError(f"prompt file {path} has no column {prompt_column!r}; columns: {columns}")
    if not rows:
        raise RecareError(f"prompt file {path} has a header but no rows")
    rows = rows[:limit] if limit is not None else rows
    prompts = [(row[prompt_column] or "").strip() for row in rows]
    for number, prompt in enumerate(prompts, start=1):
        if not prompt:
            raise RecareError(f"{path} data row {number}: empty {prompt_column!r}")
    seeds = None
    if seed_column is not None and seed_column in columns:
        seeds = [_parse_seed(row[seed_column], path, n, seed_column) for n, row in enumerate(rows, start=1)]
    guidances = None
    if GUIDANCE_COLUMN in columns:
        guidances = [_parse_guidance(row[GUIDANCE_COLUMN], path, n) for n, row in enumerate(rows, start=1)]
    cases = [(row[CASE_COLUMN] or "").strip() or None for row in rows] if CASE_COLUMN in columns else None
    return prompts, seeds, guidances, cases


def _parse_seed(text: str | None, path: Path, row: int, column: str) -> int:
    """A seed in [0, 2**64) (torch.Generator's range); '42.0' is accepted (spreadsheet exports), '42.5' is not."""
    text = (text or "").strip()
    if text.isdigit():
        value = int(text)
    else:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        value = int(number) if math.isfinite(number) and number == int(number) else -1
    if not 0 <= value < 2**64:
        raise RecareError(f"{path} data row {row}: {column!r} must be a non-negative integer seed, got {text!r}")
    return value


def _parse_guidance(text: str | None, path: Path, row: int) -> float | None:
    """A finite guidance scale, or None for an empty cell (the config's guidance is used)."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise RecareError(f"{path} data row {row}: {GUIDANCE_COLUMN!r} must be a number, got {text!r}")
    return value


def _check_count(value: int, what: str) -> None:
    if not isinstance(value, int) or value < 1:
        raise RecareError(f"{what} must be a positive integer, got {value!r}")


def _check_prompt(prompt: str, what: str) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise RecareError(f"{what} is empty")
