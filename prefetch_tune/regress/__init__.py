"""Checking stored results again: regression sweeps and their reports."""
