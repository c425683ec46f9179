"""Training: tokenizer (spec 6.1) and GPT (spec 6.2) recipes, losses, EMA, checkpoints, DDP.

Entry points (one per CLI command)::

    from hita.train import tokenizer_train_config, train_tokenizer, gpt_train_config, train_gpt, extract_codes
    train_tokenizer(tokenizer_train_config("tiny", "fashion-mnist", "runs/tok", steps=2000))
    extract_codes("runs/tok/tokenizer.safetensors", "fashion-mnist", "runs/codes.safetensors")
    train_gpt(gpt_train_config("tiny", "runs/gpt", codes="runs/codes.safetensors", steps=2000))

Under ``torchrun`` the same calls run DDP (gloo on CPU, NCCL on CUDA).
"""
from hita.train.codes import extract_codes, load_codes
from hita.train.common import TrainError
from hita.train.gpt_trainer import GPTTrainConfig, gpt_train_config, train_gpt
from hita.train.tokenizer_trainer import TokenizerTrainConfig, tokenizer_train_config, train_tokenizer

__all__ = [
    "GPTTrainConfig", "TokenizerTrainConfig", "TrainError", "extract_codes", "gpt_train_config", "load_codes",
    "tokenizer_train_config", "train_gpt", "train_tokenizer",
]
