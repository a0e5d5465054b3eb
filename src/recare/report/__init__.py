"""Reports of an evaluation: results.json, report.md, report.html, the radar chart and image grids.

May import: recare.metrics (the radar chart), recare.io, recare.errors, recare.config.
"""

from recare.report.writer import results_table, write_reports

__all__ = ["results_table", "write_reports"]
