"""Generation (method §1): prompts and seeds, resumable image generation with a manifest, sharding over processes.

Owns `PromptJob`s (prompt files, seeds), `generate_images` (per-image generators, resume,
manifest.json) and its multi-process form. May import: recare.models, recare.io,
recare.errors, recare.config.
"""

from recare.generate.images import GenerationConfig, generate_images, read_manifest
from recare.generate.prompts import PromptJob, jobs_for_prompt, jobs_for_prompts, read_prompt_file, read_prompts

__all__ = ["GenerationConfig", "PromptJob", "generate_images", "jobs_for_prompt", "jobs_for_prompts",
           "read_manifest", "read_prompt_file", "read_prompts"]
