"""Figures and tables written next to a study's results: PNG plots (``plots``), CSV and Markdown tables (``tables``).

Imports nothing from the engine, judging, studies or the command line.
"""
