"""The run report: one self-contained HTML page of one or several run folders (``personalab report``).

Reads run folders only (their files and stores), never a model; ``write_report`` is what every
run command calls at its end.
"""

from personalab.report.page import REPORT, build_page, write_report

__all__ = ["REPORT", "build_page", "write_report"]
