from hita.models.gpt import HitaGPT
from hita.models.tokenizer import HitaTokenizer, TokenizerOutput
