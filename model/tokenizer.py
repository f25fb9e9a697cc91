"""The bert-base-uncased WordPiece tokenizer, bundled so that it loads offline."""

from __future__ import annotations

import functools
from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
# Long enough for the 32k models; avoids the 512-token warning of the stock config.
MODEL_MAX_LENGTH = 32768


@functools.lru_cache(maxsize=None)
def load_tokenizer():
    """A fast `BertTokenizerFast` for bert-base-uncased ([PAD]=0, [CLS]=101, [SEP]=102, [MASK]=103)."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(TOKENIZER_DIR), model_max_length=MODEL_MAX_LENGTH)
