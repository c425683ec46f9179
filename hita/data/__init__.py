"""Training data: Fashion-MNIST IDX files, image folders, the reference augmentation, step batches."""
from hita.data.dataset import AUGMENTS, Augmented, DataError, open_dataset
from hita.data.sampler import StepBatchSampler, make_loader

__all__ = ["AUGMENTS", "Augmented", "DataError", "StepBatchSampler", "make_loader", "open_dataset"]
