"""The CARE-score label list, the CARE word of each concept, and the shipped data files (method §5).

The reference scores every concept against ONE fixed list of 82 labels: the 80 COCO object
classes plus 'stars' and 'freshwater'. The CARE word w* must be on the list; it is never added.
Label spellings follow the reference (`tv`, `couch`, `hair drier`, ...).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from recare.errors import RecareError

# The 80 COCO object categories in their standard order (COCO 2017 detection classes).
COCO_LABELS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# Labels the reference adds for the Van Gogh and tench CARE words.
CARE_EXTRA_LABELS: tuple[str, ...] = ("stars", "freshwater")

# Concept -> its CARE word w* (method §5).
CARE_WORDS: dict[str, str] = {"nudity": "person", "vangogh": "stars", "tench": "freshwater"}

# CARE word -> the shipped prompt file (src/recare/data/, see its README.md).
CARE_PROMPT_FILES: dict[str, str] = {
    "person": "care_prompts_person.txt",
    "stars": "care_prompts_stars.txt",
    "freshwater": "care_prompts_freshwater.txt",
}


def default_care_labels() -> list[str]:
    """The reference's 82 labels: COCO's 80 then 'stars', 'freshwater' (method §5).

    The reference lists 'person' after the other 79 COCO labels; order matters only for exact
    ties, which recare.care_score.care_hits counts as failures whatever the order.
    """
    return list(COCO_LABELS + CARE_EXTRA_LABELS)


def data_path(name: str) -> Path:
    """Path of a file shipped in recare/data (package data); RecareError if there is none."""
    path = Path(str(resources.files("recare").joinpath("data", name)))
    if not path.is_file():
        raise RecareError(f"recare ships no data file {name!r} (looked in {path.parent})")
    return path


def care_prompt_file(care_word: str) -> Path:
    """The shipped CARE prompt file of a CARE word ('person', 'stars' or 'freshwater')."""
    if care_word not in CARE_PROMPT_FILES:
        raise RecareError(f"no shipped CARE prompt file for {care_word!r}; "
                          f"shipped: {sorted(CARE_PROMPT_FILES)} (give your own prompt file)")
    return data_path(CARE_PROMPT_FILES[care_word])
