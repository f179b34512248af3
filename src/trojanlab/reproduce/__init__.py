"""One command for every experiment of the thesis: resumable stages and a report (``trojanlab reproduce``)."""

from .pipeline import Stage, StageFailed, build_stages, load_config, merge, parse_override, run_pipeline
from .report import write_report

__all__ = [
    "Stage",
    "StageFailed",
    "build_stages",
    "load_config",
    "merge",
    "parse_override",
    "run_pipeline",
    "write_report",
]
