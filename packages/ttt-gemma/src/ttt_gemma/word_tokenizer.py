"""A small word-level tokenizer for tests and demos (no hub download): built with the
``tokenizers`` library, saved as a local tokenizer folder, loaded with ``transformers``.

Real pi0.5 runs use PaliGemma's SentencePiece tokenizer: point ``data.tokenizer`` at a local folder
holding it (any folder ``transformers.AutoTokenizer.from_pretrained`` reads).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<bos>", "<unk>")
# the words of pi0.5's prompt "Task: <task>, State: <0..255 ...>;\nAction: " besides the task's
PROMPT_WORDS = ("Task", "State", "Action", ":", ",", ";", ".", *map(str, range(256)))


def build_word_tokenizer(folder: str | os.PathLike, texts: list[str]) -> Path:
    """Write a word-level tokenizer folder: the specials, pi0.5's prompt words and every word of
    ``texts`` (split on whitespace and punctuation as the tokenizer splits them). Encoding adds
    ``<bos>`` first (as openpi's ``add_bos=True``); padding is ``<pad>`` (id 0). Returns the folder."""
    words = [w for text in texts for w in re.findall(r"\w+|[^\w\s]", text)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*SPECIALS, *PROMPT_WORDS, *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   unk_token="<unk>")  # fmt: skip
    fast.save_pretrained(folder)
    return Path(folder)


def load_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A local tokenizer folder through ``transformers.AutoTokenizer`` (never the hub)."""
    if not (Path(folder) / "tokenizer_config.json").is_file():
        raise ValueError(
            f"data.tokenizer: {os.fspath(folder)!r} is not a tokenizer folder (no "
            "tokenizer_config.json); give a local folder saved by transformers' save_pretrained"
        )
    return AutoTokenizer.from_pretrained(os.fspath(folder), local_files_only=True)
