"""Plotly dashboards of run directories (standalone HTML, works offline), reading only the run directory.

Each view is two functions: one in :mod:`mpq.dashboards.views` extracts plain data (testable without Plotly), one
in :mod:`mpq.dashboards.figures` draws it; :mod:`mpq.dashboards.page` assembles the page.
"""

from mpq.dashboards.page import build_dashboard_html, dashboard_data, figures_in, write_dashboard

__all__ = ["dashboard_data", "build_dashboard_html", "write_dashboard", "figures_in"]
