"""The CARE-set (method §2): from target images to the words to retain.

`vocab` (the encoded token vocabulary, cached), `algorithm` (candidates, residual, clustering,
refinement: pure functions), `config` (CareSetConfig), `artifact` (the CareSet file),
`build` (the algorithm run on a model and images), `report` (the console report). May import:
recare.models, recare.io, recare.errors, recare.config.
"""

from recare.careset.artifact import CareSet, reference_key
from recare.careset.build import build_careset, build_careset_from_folder
from recare.careset.config import CareSetConfig
from recare.careset.report import format_report

__all__ = ["CareSet", "CareSetConfig", "build_careset", "build_careset_from_folder", "format_report", "reference_key"]
