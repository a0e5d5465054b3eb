"""`recare careset`: the CARE-set from target images (SPEC 2)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from recare.cli.common import Formatter, add_clip_args, default_device, load_clip_from_args

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- careset


def _add_careset(sub) -> None:
    from recare.careset.config import CONCEPT_TYPES, CareSetConfig
    from recare.careset.vocab import VOCAB_MODES

    d = CareSetConfig()
    p = sub.add_parser("careset", formatter_class=Formatter, help="build the CARE-set from target images (SPEC 2)")
    p.add_argument("--images", type=Path, required=True, help="folder of target images (.jpg/.jpeg/.png)")
    p.add_argument("--reference-word", required=True, help="the target's word, e.g. 'nudity' or 'Van Gogh'")
    p.add_argument("--concept-type", default=d.concept_type, choices=CONCEPT_TYPES,
                   help="style -> retain prompts 'A painting of {w}', else 'A photo of {w}'")
    add_clip_args(p)
    p.add_argument("--device", default=default_device(), help="torch device")
    p.add_argument("--top-k", type=int, default=d.top_k, help="tokens per image (K)")
    p.add_argument("--top-n", type=int, default=d.top_n, help="most frequent tokens kept (N)")
    p.add_argument("--clusters", type=int, default=d.n_clusters, help="k-means clusters (reference 7, paper 6)")
    p.add_argument("--drop-k", type=int, default=d.drop_k, help="clusters dropped at each residual extreme")
    p.add_argument("--perplexity", type=float, default=d.perplexity, help="t-SNE perplexity")
    p.add_argument("--alpha", type=float, default=d.alpha, help="refinement margin")
    p.add_argument("--min-cluster-size", type=int, default=d.min_cluster_size, help="smallest refined cluster")
    p.add_argument("--seed", type=int, default=d.seed, help="t-SNE / k-means random_state")
    p.add_argument("--vocab-mode", default=d.vocab_mode, choices=VOCAB_MODES,
                   help="word: whole words (default); raw: the reference's raw BPE strings")
    p.add_argument("--vocab-file", type=Path, default=None,
                   help="text file of words (one per line, # comments): search only these vocabulary words")
    p.add_argument("--cache-dtype", default=d.cache_dtype, choices=["float32", "float16"],
                   help="vocabulary features dtype (the reference rounds to float16)")
    p.add_argument("--cache-dir", type=Path, default=None, help="vocabulary cache ($RECARE_CACHE or ~/.cache/recare)")
    p.add_argument("--out", type=Path, required=True, help="CARE-set JSON to write")
    p.add_argument("--layout", default="recare", choices=["recare", "reference"],
                   help="recare: versioned JSON with diagnostics; reference: the reference code's careset.json")
    p.set_defaults(run=_run_careset)


def _run_careset(args: argparse.Namespace) -> int:
    from recare.careset.build import build_careset_from_folder
    from recare.careset.config import CareSetConfig
    from recare.careset.report import format_report
    from recare.careset.vocab import read_word_list
    from recare.io import list_images

    config = CareSetConfig(top_k=args.top_k, top_n=args.top_n, n_clusters=args.clusters, drop_k=args.drop_k,
                           perplexity=args.perplexity, alpha=args.alpha, min_cluster_size=args.min_cluster_size,
                           seed=args.seed, vocab_mode=args.vocab_mode, cache_dtype=args.cache_dtype,
                           concept_type=args.concept_type,
                           vocab_words=read_word_list(args.vocab_file) if args.vocab_file else None)
    list_images(args.images)  # fail on a missing/empty folder before loading CLIP
    clip = load_clip_from_args(args)
    careset = build_careset_from_folder(clip, args.images, args.reference_word, config, args.cache_dir)
    careset.save(args.out, layout=args.layout)
    print(format_report(careset))
    print(f"CARE-set written to {args.out}")
    return 0


