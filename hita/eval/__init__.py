"""Measuring quality: codebook health, reconstruction, generation metrics over pluggable features.

Nothing here runs a GPT or imports a runtime (``hita`` sits below ``runtimes``); generating the images
that these functions score is the job of ``hita.jobs.evaluate``. Optional libraries (scipy for the FID
matrix square root, scikit-image for SSIM) are imported when a function needs them, and their absence
is one line naming the package to install.
"""
