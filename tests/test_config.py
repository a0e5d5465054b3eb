"""recare.config: dict -> dataclass coercion, checks, overrides, field docs and generated CLI flags."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from recare.config import (
    HelpFormatter,
    add_config_arguments,
    apply_overrides,
    check_fields,
    coerce,
    deep_merge,
    field_docs,
    from_dict,
    given_overrides,
    option,
    parse_override,
    to_dict,
    type_name,
)
from recare.errors import RecareError
from recare.io import json_ready


@dataclass(frozen=True)
class Inner:
    """A nested config (attribute docstrings)."""

    steps: int = option(3000, min=1)
    """Optimisation steps."""
    lr: float = option(5e-3, min=0, min_exclusive=True, flag="--inner-learning-rate")
    """Base learning rate
    (constant schedule)."""
    templates: tuple[str, ...] = ("a {}",)
    """Prompt templates, each with one '{}'."""

    def __post_init__(self) -> None:
        check_fields(self, "inner config")


@dataclass(frozen=True)
class Outer:
    """The main config (attribute docstrings)."""

    name: str
    """Required: the run's name."""
    top_k: int = option(50, max=100, aliases=("-k",))
    """Tokens taken per image."""
    alpha: float = 1.0
    """A weight; ints are accepted."""
    stop_range: tuple[int, int] = (1, 48)
    """Inclusive range of the stop index."""
    words: tuple[str, ...] = ()
    """Words searched; 50% of them at most."""
    use_ema: bool = True
    """Keep an exponential moving average."""
    lora_alpha: float | None = option(None, min=0, min_exclusive=True)
    """LoRA alpha; None: the rank."""
    optimizer: str = option("adamw", choices=("adam", "adamw"))
    """Optimizer of the erase."""
    mode: Literal["word", "raw"] = "word"
    """Vocabulary mode."""
    inner: Inner = field(default_factory=Inner)
    """Nested settings."""
    hidden: int = option(7, cli=False)
    """Never a flag."""

    def __post_init__(self) -> None:
        check_fields(self, "outer config")


@dataclass(frozen=True)
class Commented:
    """Trailing-comment style (like CareSetConfig)."""

    top_k: int = 50  # K: tokens taken per image by cosine similarity (2.2)
    perplexity: float = option(30.0, min=0, min_exclusive=True)  # t-SNE perplexity
    seed: int = option(42, doc="Seed of the   run.")
    plain: str = "x"
    vocab_words: list[str] | None = None  # search only these words;
    # a lone comment line is not the doc of the next field
    batch: int = 8

    def __post_init__(self) -> None:
        check_fields(self, "commented config")


@dataclass(frozen=True)
class Holder:
    """list[Dataclass] and dict fields."""

    items: list[Inner] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    extra: Any = None
    path: Path | None = None


# ----------------------------------------------------------------------------- from_dict / coerce


def test_from_dict_round_trip_and_coercion():
    data = {"name": "run", "top_k": 7, "alpha": 2, "stop_range": [2, 9], "words": ["a", "b"], "use_ema": False,
            "lora_alpha": 4, "optimizer": "adam", "mode": "raw", "inner": {"steps": 5, "templates": ["x {}"]}}
    cfg = from_dict(Outer, data, "outer config")
    assert cfg.alpha == 2.0 and type(cfg.alpha) is float
    assert type(cfg.lora_alpha) is float
    assert cfg.stop_range == (2, 9) and cfg.words == ("a", "b")
    assert cfg.inner == Inner(steps=5, templates=("x {}",))
    assert to_dict(cfg)["stop_range"] == [2, 9]
    assert from_dict(Outer, to_dict(cfg), "outer config") == cfg


def test_constructor_coerces_in_place_and_keeps_identity():
    words = ("a", "b")
    cfg = Outer(name="n", alpha=3, stop_range=[1, 2], words=words, inner={"steps": 2})
    assert type(cfg.alpha) is float and cfg.stop_range == (1, 2) and cfg.inner == Inner(steps=2)
    assert cfg.words is words
    value = [1, 2]
    assert coerce(value, list[int], "w", "x") is value
    assert coerce((1, 2), list[int], "w", "x") == [1, 2]
    assert coerce(2, float, "w", "x") == 2.0


@pytest.mark.parametrize("hint,value,message", [
    (int, "50", "cfg: 'top_k' must be int, got '50'"),
    (int, True, "cfg: 'top_k' must be int, got True"),
    (float, False, "cfg: 'top_k' must be float, got False"),
    (int | None, 1.5, "cfg: 'top_k' must be int | None, got 1.5"),
    (list[str], ["a", 3], "cfg: 'top_k' must be list[str], got ['a', 3]"),
    (tuple[int, int], ["a", 3], "cfg: 'top_k' must be tuple[int, int], got ['a', 3]"),
    (tuple[int, int], [1, 2, 3], "cfg: 'top_k' must be a list of 2 values, got [1, 2, 3]"),
    (Literal["word", "raw"], "x", "cfg: 'top_k' must be one of ['word', 'raw'], got 'x'"),
    (dict[str, int], {"a": "b"}, "cfg: 'top_k' must be dict[str, int], got {'a': 'b'}"),
    (str, None, "cfg: 'top_k' must be str, got None"),
])
def test_coerce_rejects_with_readable_type(hint, value, message):
    with pytest.raises(RecareError) as err:
        coerce(value, hint, "cfg", "top_k")
    assert str(err.value) == message


def test_coerce_accepts_any_union_and_dict():
    assert coerce(object, Any, "w", "x") is object
    assert coerce(None, int | None, "w", "x") is None
    assert coerce(["a"], str | tuple[str, ...], "w", "x") == ("a",)
    assert coerce({"a": 1}, dict[str, float], "w", "x") == {"a": 1.0}
    assert type_name(tuple[str, ...]) == "tuple[str, ...]"


def test_from_dict_errors():
    with pytest.raises(RecareError) as err:
        from_dict(Outer, {"name": "n", "x": 1}, "outer config")
    assert str(err.value).startswith("outer config has unknown key(s) ['x']; known keys: ['alpha', 'hidden', ")
    with pytest.raises(RecareError, match=r"^outer config is missing key\(s\) \['name'\]$"):
        from_dict(Outer, {}, "outer config")
    with pytest.raises(RecareError, match=r"^outer config is missing key\(s\) \['name', 'alpha'\]$"):
        from_dict(Outer, {}, "outer config", required=("alpha",))
    with pytest.raises(RecareError, match=r"^outer config must be a table/JSON object, got list$"):
        from_dict(Outer, [], "outer config")


def test_nested_errors_name_the_path():
    with pytest.raises(RecareError, match=r"^outer config\.inner has unknown key\(s\) \['x'\]"):
        from_dict(Outer, {"name": "n", "inner": {"x": 1}}, "outer config")
    with pytest.raises(RecareError, match=r"^outer config\.inner: 'steps' must be int, got 'a'$"):
        from_dict(Outer, {"name": "n", "inner": {"steps": "a"}}, "outer config")
    with pytest.raises(RecareError, match=r"^holder\.items\[1\] has unknown key\(s\) \['y'\]"):
        from_dict(Holder, {"items": [{"steps": 2}, {"y": 1}]}, "holder")
    holder = from_dict(Holder, {"items": [{"steps": 2}], "path": "a/b"}, "holder")
    assert holder.items == [Inner(steps=2)] and holder.path == Path("a/b")


@pytest.mark.parametrize("kwargs,message", [
    ({"optimizer": "sgd"}, "outer config: unknown optimizer 'sgd'; choose one of ['adam', 'adamw']"),
    ({"top_k": 101}, "outer config: top_k must be <= 100, got 101"),
    ({"lora_alpha": 0.0}, "outer config: lora_alpha must be > 0, got 0.0"),
    ({"inner": {"steps": 0}}, "inner config: steps must be >= 1, got 0"),
])
def test_choices_and_ranges(kwargs, message):
    with pytest.raises(RecareError) as err:
        Outer(name="n", **kwargs)
    assert str(err.value) == message


def test_ranges_pass_at_the_bounds_and_for_none():
    assert Outer(name="n", top_k=100, lora_alpha=None).top_k == 100
    assert Inner(steps=1).steps == 1
    assert Commented(perplexity=1e-9).perplexity == 1e-9


# ----------------------------------------------------------------------------- merging and overrides


def test_deep_merge_does_not_mutate():
    base = {"a": 1, "t": {"x": 1, "y": 2}}
    merged = deep_merge(base, {"t": {"y": 3}, "b": 2})
    assert merged == {"a": 1, "b": 2, "t": {"x": 1, "y": 3}}
    assert base == {"a": 1, "t": {"x": 1, "y": 2}}


@pytest.mark.parametrize("text,expected", [
    ("rounds=2", (("rounds",), 2)),
    ("lora_alpha=0.5", (("lora_alpha",), 0.5)),
    ("stop_range=[1,4]", (("stop_range",), [1, 4])),
    ("concept=nudity", (("concept",), "nudity")),
    ("concept = Van Gogh", (("concept",), "Van Gogh")),
    ('inversion.templates="a {}"', (("inversion", "templates"), "a {}")),
    ("use_ema=false", (("use_ema",), False)),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["rounds", "=3", "a..b=1", ".a=1"])
def test_parse_override_rejects_bad_text(text):
    with pytest.raises(RecareError, match="override"):
        parse_override(text)


def test_apply_overrides_nested_paths():
    data = {"train": {"rounds": 1, "inversion": {"steps": 10}}}
    out = apply_overrides(data, ["train.rounds=3", "train.inversion.lr=0.1", "model.source=tiny"])
    assert out == {"train": {"rounds": 3, "inversion": {"steps": 10, "lr": 0.1}}, "model": {"source": "tiny"}}
    assert data == {"train": {"rounds": 1, "inversion": {"steps": 10}}}
    with pytest.raises(RecareError, match="'train.rounds' is not a table"):
        apply_overrides(data, ["train.rounds.x=1"])


# ----------------------------------------------------------------------------- docs


def test_field_docs_from_docstrings():
    docs = field_docs(Outer)
    assert docs["name"] == "Required: the run's name."
    assert docs["stop_range"] == "Inclusive range of the stop index."
    assert field_docs(Inner)["lr"] == "Base learning rate (constant schedule)."


def test_field_docs_from_comments_and_metadata():
    docs = field_docs(Commented)
    assert docs == {"top_k": "K: tokens taken per image by cosine similarity (2.2)", "perplexity": "t-SNE perplexity",
                    "seed": "Seed of the run.", "vocab_words": "search only these words;"}
    generated = dataclasses.make_dataclass("Generated", [("x", int)])
    assert field_docs(generated) == {}


# ----------------------------------------------------------------------------- command line


def _parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = argparse.ArgumentParser(prog="t", formatter_class=lambda prog: HelpFormatter(prog, width=200))
    dests = add_config_arguments(parser, Outer, prefix="o-", exclude=("inner.templates",))
    return parser, dests


def test_flag_names_and_dests():
    _, dests = _parser()
    assert dests == {"o_name": "name", "o_top_k": "top_k", "o_alpha": "alpha", "o_stop_range": "stop_range",
                     "o_words": "words", "o_use_ema": "use_ema", "o_lora_alpha": "lora_alpha",
                     "o_optimizer": "optimizer", "o_mode": "mode", "o_inner_steps": "inner.steps",
                     "inner_learning_rate": "inner.lr"}
    only = add_config_arguments(argparse.ArgumentParser(), Outer, only=("inner",), flags={"inner.steps": "--n"})
    assert only == {"n": "inner.steps", "inner_learning_rate": "inner.lr", "inner_templates": "inner.templates"}


def test_given_tracking_and_overrides():
    parser, dests = _parser()
    args = parser.parse_args(["--o-top-k", "50", "-k", "9", "--no-o-use-ema", "--o-stop-range", "2", "5",
                              "--o-words", "a", "b", "--o-inner-steps", "4", "--inner-learning-rate", "0.5"])
    assert args._given == {"o_top_k", "o_use_ema", "o_stop_range", "o_words", "o_inner_steps", "inner_learning_rate"}
    overrides = given_overrides(args, dests)
    assert overrides == {"top_k": 9, "use_ema": False, "stop_range": (2, 5), "words": ("a", "b"),
                         "inner": {"steps": 4, "lr": 0.5}}
    assert from_dict(Outer, {"name": "n", **overrides}, "cfg").inner == Inner(steps=4, lr=0.5)
    assert given_overrides(parser.parse_args(["--o-top-k", "50"]), dests) == {"top_k": 50}  # a default, given
    plain = parser.parse_args([])
    assert plain.o_top_k == 50 and plain.o_use_ema is True and given_overrides(plain, dests) == {}
    assert not getattr(plain, "_given", set())


def test_flag_values_are_checked_by_the_dataclass():
    parser, dests = _parser()
    overrides = given_overrides(parser.parse_args(["--o-top-k", "500", "--o-lora-alpha", "0"]), dests)
    with pytest.raises(RecareError, match="top_k must be <= 100, got 500"):
        from_dict(Outer, {"name": "n", **overrides}, "cfg")
    with pytest.raises(SystemExit):
        parser.parse_args(["--o-mode", "other"])  # Literal -> argparse choices


def test_help_shows_docs_and_each_default_once():
    parser, _ = _parser()
    text = " ".join(parser.format_help().split())
    for doc in field_docs(Outer).values():
        if doc not in ("Nested settings.", "Never a flag."):
            assert doc in text
    assert "Optimisation steps. (default: 3000)" in text
    for default in ("(default: 3000)", "(default: 50)", "(default: True)", "(default: (1, 48))",
                    "(default: adamw)"):
        assert text.count(default) == 1, default
    assert "(default: None)" not in text
    assert "50% of them at most" in text
    assert "--o-use-ema, --no-o-use-ema" in text
    assert "--o-stop-range INT INT" in text and "--o-words STR [STR ...]" in text and "--o-top-k INT" in text
    assert "--hidden" not in text and "--o-hidden" not in text


# ----------------------------------------------------------------------------- JSON


def test_json_ready():
    data = {"p": Path("a/b"), 1: (1, 2), "c": Inner(), None: [True]}
    assert json_ready(data) == {"p": "a/b", "1": [1, 2], "c": {"steps": 3000, "lr": 5e-3, "templates": ["a {}"]},
                                "null": [True]}
    with pytest.raises(TypeError):
        json_ready({"x": object()})
