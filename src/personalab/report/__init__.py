"""What studies write next to their results: figures, statistics, progress bars and run-folder files.

The report wing imports nothing from the engine, judging, studies or the command line.
"""
