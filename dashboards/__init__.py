"""Plotly dashboards of a run directory (standalone HTML, works offline).

Each view is two functions: one extracts plain data from the run directory (testable without Plotly), one draws it.
"""

from mpq.dashboards.frontier import build_dashboard_html, dashboard_data, draw_dashboard, write_dashboard

__all__ = ["dashboard_data", "draw_dashboard", "build_dashboard_html", "write_dashboard"]
