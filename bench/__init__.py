"""Microbenchmarks: each prints a table and writes JSON."""
