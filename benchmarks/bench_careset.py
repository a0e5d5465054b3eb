"""Benchmark CARE-set construction (method §2) with a full-size, RANDOMLY initialised CLIP ViT-B/32.

Costs do not depend on the weights, but the CARE words do: the words printed here mean nothing.

Measures
  1. vocabulary encoding, cold cache: short padding (each batch padded to its longest text,
     texts sorted by token length) over the whole vocabulary, and 77-token padding on a seeded
     random subset, extrapolated to the whole vocabulary;
  2. CARE-set construction for N random 224x224 images with a cold and with a warm vocabulary cache.

Usage:  python benchmarks/bench_careset.py [--images 500] [--device cpu] [--vocab-mode word]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from recare.careset.algorithm import top_k_candidates
from recare.careset.build import build_careset, careset_from_features, check_reference_word, encode_image_inputs
from recare.careset.config import CareSetConfig
from recare.careset.vocab import VOCAB_MODES, encode_texts_by_length, encode_vocabulary, vocabulary_entries
from recare.models.tiny import build_clip_vit_b32

COLD_TARGET_S, WARM_TARGET_S = 180.0, 30.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=500, help="number of random target images")
    parser.add_argument("--device", default="cpu", help="torch device for CLIP")
    parser.add_argument("--vocab-mode", default="word", choices=VOCAB_MODES, help="vocabulary mode")
    parser.add_argument("--pad-subset", type=int, default=512,
                        help="vocabulary entries encoded with 77-token padding (timed, then extrapolated)")
    parser.add_argument("--text-batch-size", type=int, default=1024, help="texts per text-encoder call")
    parser.add_argument("--reference-word", default="nudity", help="reference word of the target")
    return parser.parse_args()


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(n)]


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def time_padding(clip, texts: list[str], subset: int, batch_size: int) -> float:
    """Short padding over the whole vocabulary vs 77-token padding on a subset."""
    sample = random.Random(0).sample(texts, min(subset, len(texts)))
    with Timer() as short_sub:
        encode_texts_by_length(clip, sample, batch_size)
    with Timer() as full_sub:
        encode_texts_by_length(clip, sample, batch_size, padding="max_length")
    scale = len(texts) / len(sample)
    print(f"  subset of {len(sample)} random entries: short padding {short_sub.seconds:.2f} s, "
          f"77-token padding {full_sub.seconds:.2f} s -> speed-up {full_sub.seconds / short_sub.seconds:.1f}x")
    print(f"  77-token padding over all {len(texts)} entries: ~{full_sub.seconds * scale:.0f} s "
          f"(EXTRAPOLATED from the subset, x{scale:.1f})")
    return full_sub.seconds * scale


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print("NOTE: CLIP ViT-B/32 with RANDOM weights (recare.tiny.build_clip_vit_b32): timings are real, "
          "CARE words are meaningless.")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
          "the CPU may be shared with other jobs")
    with Timer() as t:
        clip = build_clip_vit_b32(seed=0)
        clip.model.to(args.device)
        clip.fingerprint()
    print(f"build model + fingerprint: {t.seconds:.1f} s")
    images = random_images(args.images)
    config = CareSetConfig(vocab_mode=args.vocab_mode, text_batch_size=args.text_batch_size)
    _, _, texts = vocabulary_entries(clip.tokenizer, args.vocab_mode)

    print(f"\n1. vocabulary encoding, mode {args.vocab_mode!r}, {len(texts)} entries")
    full_padding_s = time_padding(clip, texts, args.pad_subset, args.text_batch_size)
    with tempfile.TemporaryDirectory() as cache_dir:
        print(f"\n2. CARE-set construction, {args.images} images, top-K {config.top_k}, top-N {config.top_n}")
        with Timer() as t_ref:
            word = check_reference_word(clip, args.reference_word)
        with Timer() as t_img:
            image_features = encode_image_inputs(clip, images, config.image_batch_size, progress=False)
        with Timer() as t_vocab:
            vocab = encode_vocabulary(clip, args.vocab_mode, args.text_batch_size, cache_dir, progress=False)
        distinct = top_k_candidates(image_features, vocab.features, config.top_k, 1).n_distinct
        if distinct < config.top_n:  # random weights: images can share most of their top-K tokens
            print(f"  NOTE: only {distinct} distinct candidates with random weights; top-N lowered "
                  f"from {config.top_n} to {distinct}")
            config = dataclasses.replace(config, top_n=distinct)
        with Timer() as t_rest:
            careset_from_features(clip, image_features, vocab, word, config)
        cold = t_ref.seconds + t_img.seconds + t_vocab.seconds + t_rest.seconds
        print(f"  cold cache: images {t_img.seconds:.1f} s + vocabulary (short padding) {t_vocab.seconds:.1f} s "
              f"+ candidates/re-encode/t-SNE/k-means/refinement {t_rest.seconds:.1f} s = {cold:.1f} s")
        print(f"  vocabulary, whole: short padding {t_vocab.seconds:.1f} s (measured) vs 77-token padding "
              f"~{full_padding_s:.0f} s (extrapolated): speed-up ~{full_padding_s / t_vocab.seconds:.1f}x")
        with tempfile.TemporaryDirectory() as image_dir:
            paths = []
            for i, image in enumerate(images):
                paths.append(f"{image_dir}/{i:05d}.png")
                image.save(paths[-1])
            with Timer() as t_warm:  # warm vocabulary cache, image features not cached yet
                careset = build_careset(clip, paths, word, config, cache_dir=cache_dir, progress=False)
            print(f"  warm vocabulary cache, images encoded: build_careset {t_warm.seconds:.1f} s")
            with Timer() as t_warm_all:  # warm vocabulary and image-feature caches (e.g. an ablation rerun)
                build_careset(clip, paths, word, config, cache_dir=cache_dir, progress=False)
            print(f"  warm vocabulary + image-feature caches (same files, other parameters): "
                  f"build_careset {t_warm_all.seconds:.1f} s")
    print(f"  {len(careset.words)} CARE words kept of {config.top_n} (random weights: meaningless): "
          f"{', '.join(careset.words[:8])}, ...")

    print("\nTargets (this machine):")
    print(f"  cold total < {COLD_TARGET_S:.0f} s: {cold:.1f} s -> {'MET' if cold < COLD_TARGET_S else 'NOT MET'}")
    for label, seconds in (("warm vocabulary cache", t_warm.seconds),
                           ("warm vocabulary + image caches", t_warm_all.seconds)):
        print(f"  {label} < {WARM_TARGET_S:.0f} s: {seconds:.1f} s -> "
              f"{'MET' if seconds < WARM_TARGET_S else 'NOT MET'}")


if __name__ == "__main__":
    main()
