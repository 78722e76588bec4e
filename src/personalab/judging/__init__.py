"""Judges (API and local), judging through the store, and the evaluation scorecard."""
