"""Neutral helpers every layer may use: files (atomic writes, hashing), logging, metrics, images.

Nothing here imports a model, an exporter or a runtime; ``hita.util`` sits at the bottom of the
house so that ``export/``, ``runtimes/``, ``jobs/`` and ``cli/`` share one copy of each helper.
"""
