"""Figures and tables written next to a study's results: plots (``plots``) saved as PNG with an SVG copy and
checked for what would not read at their size (``layout``), CSV and Markdown tables (``tables``).

Imports nothing from the engine, judging, studies or the command line.
"""
