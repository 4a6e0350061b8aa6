"""Self-contained HTML pages of runs, comparisons and suites (``report.html``).

One file each, with its CSS, data and script inline and no external URL: it opens from disk
or S3 with no network. Plots are inline SVG drawn by matplotlib (``pip install
'shardeval[report]'``), imported only while a page is built; without it the page shows the
same numbers as CSS bars and tables.
"""

from __future__ import annotations

from shardeval.report.compare_page import build_comparison_report
from shardeval.report.run_page import build_run_report
from shardeval.report.suite_page import build_suite_report
from shardeval.report.writer import write_run_report

__all__ = [
    "build_comparison_report",
    "build_run_report",
    "build_suite_report",
    "write_run_report",
]
