"""User jobs that combine layers, as plain library functions the CLI calls.

``runtimes/`` runs graphs and ``export/`` writes them; a job may use both: the demo (export, then
generate, then parity), generating to a folder of PNGs and a grid, resolving checkpoint flags to
files (the embedded default model when none are given), building and running the C++ host.
"""
