"""The console report of a CARE-set: kept clusters, words and dropped candidates."""

from __future__ import annotations

import logging

from recare.careset.artifact import DROPPED_REFINEMENT, CandidateInfo, CareSet, ClusterInfo

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- report


def format_report(careset: CareSet, width: int = 100) -> str:
    """A readable report: clusters with their words and residuals, what was dropped and why, the kept words."""
    lines = [f"CARE-set for {careset.reference_word!r} (concept type {careset.concept_type})"]
    diag = careset.diagnostics
    if diag is not None:
        cfg = careset.config
        lines.append(f"{len(diag.candidates)} candidates (top-K {cfg.top_k if cfg else '?'} per image over "
                     f"{diag.n_images} images, {diag.n_distinct_candidates} distinct), vocabulary {diag.vocab_mode!r} "
                     f"of {diag.vocab_size} entries")
        lines.append(f"t-SNE perplexity {diag.effective_perplexity:g}; {len(diag.clusters)} clusters; "
                     f"{diag.effective_drop_k} dropped at each end of the mean-residual order")
        lines.append("Clusters by ascending mean residual (word (count, residual); x = dropped by refinement):")
        for cluster in diag.clusters:
            lines.extend(_cluster_lines(cluster, diag.candidates, width))
        refined = [c for c in diag.candidates if c.status == DROPPED_REFINEMENT]
        alpha = f"{cfg.alpha:g}" if cfg else "alpha"
        lines.append(f"Dropped by refinement (d_i > (1 + {alpha}) * mean of the others' d_j): "
                     + (", ".join(f"{c.word} (d={c.refinement_score:.4f} > {c.refinement_threshold:.4f})"
                                  for c in refined) or "none"))
    lines.append(f"Kept CARE words ({len(careset.words)}):")
    lines.extend(_pack(list(careset.words), width, indent="  "))
    return "\n".join(lines)


def _cluster_lines(cluster: ClusterInfo, candidates: list[CandidateInfo], width: int) -> list[str]:
    members = sorted((c for c in candidates if c.cluster == cluster.cluster), key=lambda c: -c.count)
    head = (f"  cluster {cluster.cluster}: {cluster.size} tokens, mean residual {cluster.mean_residual:.4f}, "
            f"{cluster.status}")
    items = [f"{'x ' if c.status == DROPPED_REFINEMENT else ''}{c.word} ({c.count}, {c.residual:.3f})" for c in members]
    return [head] + _pack(items, width, indent="    ")


def _pack(items: list[str], width: int, indent: str) -> list[str]:
    """Comma-separated items on lines of at most `width` characters, never splitting an item."""
    lines, line = [], ""
    for item in items:
        if line and len(indent) + len(line) + len(item) + 2 > width:
            lines.append(indent + line + ",")
            line = ""
        line = f"{line}, {item}" if line else item
    return lines + [indent + line] if line else lines
