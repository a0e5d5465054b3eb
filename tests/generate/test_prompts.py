"""Prompt files and job lists (recare.prompts)."""

from pathlib import Path

import pytest

from recare.errors import RecareError
from recare.generate.prompts import PromptJob, jobs_for_prompt, jobs_for_prompts, read_prompt_file, read_prompts

SHARED_DATA = Path("/work/shared/data")

NUDITY_LIKE_CSV = (
    "Unnamed: 0,prompt,categories,evaluation_seed,evaluation_guidance,case_number\n"
    '21,"a painting, with commas ",self-harm,932309623,7,21\n'
    "296,second prompt,shocking,4288447746,13,296\n"
)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jobs_for_prompt_seeds_and_names():
    jobs = jobs_for_prompt("A photo of a nude person", 3)
    assert [j.seed for j in jobs] == [42, 43, 44]
    assert [j.name for j in jobs] == ["00000", "00001", "00002"]
    assert all(j.prompt == "A photo of a nude person" and j.guidance is None for j in jobs)
    assert [j.seed for j in jobs_for_prompt("x", 2, seed=7)] == [7, 8]


def test_jobs_for_prompt_rejects_bad_input():
    with pytest.raises(RecareError, match="num_images"):
        jobs_for_prompt("x", 0)
    with pytest.raises(RecareError, match="empty"):
        jobs_for_prompt("  ", 2)


def test_jobs_for_prompts_restarts_seeds_per_prompt():
    jobs = jobs_for_prompts(["a", "b"], 2)
    assert [(j.prompt, j.seed, j.name, j.prompt_index) for j in jobs] == [
        ("a", 42, "00000_000", 0), ("a", 43, "00000_001", 0), ("b", 42, "00001_000", 1), ("b", 43, "00001_001", 1)]


def test_txt_file_one_prompt_per_nonempty_line(tmp_path):
    path = write(tmp_path, "p.txt", "A photo of a person\n\n  A person walking  \n\n")
    jobs = read_prompt_file(path, num_images_per_prompt=2)
    assert jobs == [
        PromptJob("A photo of a person", 42, "00000_000", None, 0, None),
        PromptJob("A photo of a person", 43, "00000_001", None, 0, None),
        PromptJob("A person walking", 42, "00001_000", None, 1, None),
        PromptJob("A person walking", 43, "00001_001", None, 1, None),
    ]
    assert read_prompts(path) == ["A photo of a person", "A person walking"]
    assert [j.prompt for j in read_prompt_file(path, limit=1)] == ["A photo of a person"]


def test_csv_uses_seed_guidance_and_case_columns(tmp_path):
    path = write(tmp_path, "nudity.csv", NUDITY_LIKE_CSV)
    jobs = read_prompt_file(path, num_images_per_prompt=2)
    assert [(j.prompt, j.seed, j.guidance, j.case_id, j.name) for j in jobs] == [
        ("a painting, with commas", 932309623, 7.0, "21", "00000_000"),
        ("a painting, with commas", 932309624, 7.0, "21", "00000_001"),
        ("second prompt", 4288447746, 13.0, "296", "00001_000"),
        ("second prompt", 4288447747, 13.0, "296", "00001_001"),
    ]
    assert len(read_prompt_file(path, limit=1)) == 1


def test_csv_without_seed_column_uses_seed_argument(tmp_path):
    path = write(tmp_path, "p.csv", "text\nfirst\nsecond\n")
    jobs = read_prompt_file(path, prompt_column="text", seed=5)
    assert [(j.prompt, j.seed, j.guidance, j.case_id) for j in jobs] == [
        ("first", 5, None, None), ("second", 5, None, None)]


def test_csv_accepts_integral_float_seed_and_empty_guidance(tmp_path):
    path = write(tmp_path, "p.csv", "prompt,evaluation_seed,evaluation_guidance\nx,42.0,\n")
    (job,) = read_prompt_file(path)
    assert (job.seed, job.guidance) == (42, None)


@pytest.mark.parametrize("seed", ["abc", "4.5", "-1", "", "18446744073709551616"])
def test_csv_non_integer_seed_is_an_error(tmp_path, seed):
    path = write(tmp_path, "p.csv", f"prompt,evaluation_seed\nx,{seed}\n")
    with pytest.raises(RecareError, match=r"p\.csv data row 1: 'evaluation_seed'"):
        read_prompt_file(path)


def test_csv_bad_guidance_is_an_error(tmp_path):
    path = write(tmp_path, "p.csv", "prompt,evaluation_guidance\nx,high\n")
    with pytest.raises(RecareError, match="evaluation_guidance"):
        read_prompt_file(path)


def test_csv_missing_prompt_column_names_file_and_column(tmp_path):
    path = write(tmp_path, "p.csv", "text,evaluation_seed\nx,1\n")
    with pytest.raises(RecareError, match=r"p\.csv has no column 'prompt'"):
        read_prompt_file(path)


def test_csv_header_only_and_blank_prompt_are_errors(tmp_path):
    with pytest.raises(RecareError, match="no rows"):
        read_prompt_file(write(tmp_path, "h.csv", "prompt,evaluation_seed\n"))
    with pytest.raises(RecareError, match="data row 2: empty 'prompt'"):
        read_prompt_file(write(tmp_path, "b.csv", "prompt\nx\n  \n"))


def test_missing_and_empty_files_are_errors(tmp_path):
    with pytest.raises(RecareError, match="not found"):
        read_prompt_file(tmp_path / "nope.txt")
    with pytest.raises(RecareError, match=r"e\.txt is empty"):
        read_prompt_file(write(tmp_path, "e.txt", "\n  \n"))
    with pytest.raises(RecareError, match="limit"):
        read_prompt_file(write(tmp_path, "ok.txt", "x\n"), limit=0)
    with pytest.raises(RecareError, match="num_images_per_prompt"):
        read_prompt_file(tmp_path / "ok.txt", num_images_per_prompt=0)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="benchmark CSVs not present")
def test_real_benchmark_files():
    nudity = read_prompt_file(SHARED_DATA / "nudity.csv")
    assert len(nudity) == 142
    assert (nudity[0].seed, nudity[0].guidance, nudity[0].case_id) == (932309623, 7.0, "21")
    coco = read_prompt_file(SHARED_DATA / "coco_30k.csv", limit=3)
    assert [(j.seed, j.guidance, j.case_id) for j in coco[:2]] == [(41337, None, "0"), (63155, None, "1")]


def test_shipped_prompt_sets_by_name():
    from recare.generate.prompts import SHIPPED_PROMPT_SETS, prompt_file_path, read_prompt_file

    jobs = read_prompt_file("nudity")
    assert len(jobs) == 142 and jobs[0].seed == 932309623 and jobs[0].guidance == 7.0  # the benchmark's own seeds
    assert len(read_prompt_file("tench")) == 50 and len(read_prompt_file("coco_30k", limit=5)) == 5
    assert all(prompt_file_path(name).is_file() for name in SHIPPED_PROMPT_SETS)
    assert (prompt_file_path("nudity").parent / "SOURCES.md").is_file()  # attribution beside the copies
    with pytest.raises(RecareError, match=r"shipped prompt sets are \['coco_30k', 'i2p', 'nudity'"):
        read_prompt_file("nudityy")


def test_shipped_configs_by_name():
    from recare.pipeline import RunSpec
    from recare.train.config import read_toml

    spec = RunSpec.from_tables(read_toml("nudity"))
    assert spec.reference_word == "nudity"
    with pytest.raises(RecareError, match=r"shipped configs are \['nudity', 'sdxl-nudity', 'sdxl-vangogh', 'tench', "
                                          r"'vangogh'\]"):
        read_toml("nudityy")
