"""The HTML report: liner notes you can listen to (credits, plots, opt-out audit)."""

from linernotes.report.build import ClipPair, OptOut, build_report

__all__ = ["ClipPair", "OptOut", "build_report"]
