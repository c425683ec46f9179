"""Runtimes: one decode loop over interchangeable step executors, plus parity."""
