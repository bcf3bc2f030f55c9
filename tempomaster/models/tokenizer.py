"""Prompt cleaning and tokenization for the umT5 text encoder.

SPEC section 3 ("Text:"): the prompt is cleaned (ftfy fix, HTML unescape
twice, whitespace collapsed), tokenized to exactly `seq_len` (512) tokens with
padding and truncation, EOS appended as umT5 does; the mask marks real tokens.

Two tokenizers:
- the real one, `PromptTokenizer.from_dir("google/umt5-xxl/")`, loaded with
  transformers from local files only (never the hub);
- the `tiny` preset's own, `build_tiny_tokenizer(out_dir)` / `tiny_tokenizer()`:
  a small Unigram model built here from a built-in English corpus, with
  umT5's special ids (pad 0, eos 1, unk 2). It is not trained by an
  optimiser: the pieces are the corpus words (by frequency), single
  characters and a few suffixes, with log-frequency scores, so the files are
  the same bytes on every run and machine.
"""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from pathlib import Path

import ftfy
import torch

__all__ = [
    "clean_prompt",
    "PromptTokenizer",
    "build_tiny_tokenizer",
    "tiny_tokenizer",
    "TINY_VOCAB_SIZE",
]

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in umT5
TINY_VOCAB_SIZE = 384  # == PRESETS["tiny"].t5.vocab_size (upper bound on ids)


TINY_TOKENIZER_SOURCE = "<tiny built-in>"


def clean_prompt(text: str) -> str:
    """ftfy fix, HTML unescape twice, whitespace collapsed and stripped.

    Same as Wan2.1's `whitespace_clean(basic_clean(text))`.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class PromptTokenizer:
    """Callable: list of prompts -> (ids [B, seq_len], mask [B, seq_len]), int64.

    Prompts are cleaned with `clean_prompt`, EOS is appended, rows are padded
    with the pad id (0) to exactly `seq_len` and truncated to it (EOS kept
    as the last token of a truncated row).
    """

    def __init__(self, tokenizer, seq_len: int = 512, source: str | None = None):
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.source = source  # directory it was loaded from, for messages

    @classmethod
    def from_dir(cls, path: str | Path, seq_len: int = 512) -> PromptTokenizer:
        """Load a local tokenizer directory (e.g. the release's `google/umt5-xxl/`)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"tokenizer directory not found: {str(path)!r} (expected a local "
                "tokenizer dir such as the release's google/umt5-xxl/ with "
                "tokenizer.json / spiece.model and tokenizer_config.json)"
            )
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # transformers raises many kinds here
            raise OSError(f"cannot load a tokenizer from {str(path)!r}: {type(exc).__name__}: {exc}") from exc
        if tok.pad_token_id is None:
            raise OSError(f"tokenizer in {str(path)!r} has no pad token")
        return cls(tok, seq_len=seq_len, source=str(path))

    def __repr__(self) -> str:
        return f"PromptTokenizer(vocab={self.vocab_size}, seq_len={self.seq_len}, source={self.source or 'built-in'})"

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        texts = [clean_prompt(t) for t in texts]
        out = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.seq_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = out["input_ids"].to(torch.int64)
        mask = out["attention_mask"].to(torch.int64)
        return ids, mask


# --------------------------------------------------------------------------
# The tiny preset's tokenizer
# --------------------------------------------------------------------------

# Generic video-description text; the tiny vocabulary is made from it.
TINY_CORPUS = """
A golden retriever runs across a green park on a sunny afternoon, chasing a
red ball while children laugh in the background. The camera follows the dog
in a smooth tracking shot, then slowly zooms in on its happy face.
A woman in a blue dress walks along a quiet beach at sunset. Waves roll onto
the sand and the sky turns orange and pink. Her hair moves in the wind as she
looks out at the sea. The shot is wide and calm, with soft warm light.
A busy city street at night, full of cars and people. Neon signs glow in the
rain and their colors reflect on the wet road. A young man with an umbrella
crosses the street while a taxi passes by. The camera pans slowly from left
to right.
Close up of a cup of coffee on a wooden table. Steam rises from the cup and
a hand adds milk, which swirls into the dark coffee. The background is
blurred and the light is soft, like an early morning in a small kitchen.
An old man sits on a bench in the snow and feeds birds. White snow falls
gently around him. The trees are bare and the sky is gray. He smiles as a
small bird lands on his hand. The scene is quiet and slow.
A high speed train moves through a mountain valley. The camera is on a drone
and flies above the train, showing the river, the forest and the snow on the
mountain tops. The motion is fast but stable, with clear details.
Two cats play with a string on a soft carpet in a bright living room. One cat
jumps into the air and the other rolls on its back. Sunlight comes through
the window. The video is colorful, sharp and full of life.
A chef cuts fresh vegetables on a board in a restaurant kitchen. The knife
moves quickly and the pieces fall into a bowl. Fire rises from a pan behind
him. The shot is a medium close up with natural light and shallow focus.
A little girl blows bubbles in a garden full of flowers. The bubbles float
up and shine in the light before they pop. She turns around and runs toward
her mother. The camera stays still and the colors are bright and clear.
A small boat sails on a blue lake surrounded by tall green hills. Clouds
move across the sky and their shadows pass over the water. Birds fly low
over the waves. The video is a slow aerial view, cinematic and detailed.
A man rides a bicycle down a long road through a field of yellow flowers.
The wheels spin and dust rises behind him. The camera moves beside him at
the same speed. The sky is clear and blue, and the day is warm and bright.
"""

# Kept as single pieces so that unseen words split into sensible parts.
_TINY_SUFFIXES = ("ing", "ed", "er", "ly", "es", "s", "tion", "est", "'s")
_TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"-()/&"
_META = "\u2581"  # sentencepiece's word-start marker "▁"


def _tiny_vocab(vocab_size: int = TINY_VOCAB_SIZE, corpus: str = TINY_CORPUS) -> list[tuple[str, float]]:
    """Pieces and log-probability scores, fully determined by ``corpus``."""
    words = re.findall(r"[a-z0-9']+", corpus.lower())
    counts = Counter(words)
    total = sum(counts.values())

    vocab: list[tuple[str, float]] = [(t, 0.0) for t in SPECIAL_TOKENS]
    seen = {t for t in SPECIAL_TOKENS}

    def add(piece: str, score: float) -> None:
        if piece not in seen and len(vocab) < vocab_size:
            seen.add(piece)
            vocab.append((piece, round(score, 4)))

    # whole words with the word-start marker, most frequent first, ties by spelling
    for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size - len(_TINY_SUFFIXES) - len(_TINY_CHARS) - 1:
            break
        add(_META + word, math.log(n / total))
    # fallbacks: suffixes, the bare marker and single characters (far less likely)
    for suffix in _TINY_SUFFIXES:
        add(suffix, math.log(1 / total) - 2.0)
    add(_META, math.log(1 / total) - 4.0)
    for ch in _TINY_CHARS:
        add(ch, math.log(1 / total) - 6.0)
    assert len(vocab) <= vocab_size
    return vocab


def _tiny_backend(corpus: str = TINY_CORPUS):
    """The tiny tokenizer (or one like it made from another ``corpus``) as a `tokenizers.Tokenizer`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(_tiny_vocab(corpus=corpus), unk_id=UNK_ID, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Lowercase(),  # tiny vocabulary: one case only
            normalizers.Replace(Regex(r"\s+"), " "),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="always")
    # umT5 appends </s> to every sequence
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {SPECIAL_TOKENS[EOS_ID]}",
        pair=f"$A {SPECIAL_TOKENS[EOS_ID]} $B {SPECIAL_TOKENS[EOS_ID]}",
        special_tokens=[(SPECIAL_TOKENS[EOS_ID], EOS_ID)],
    )
    return tok


_TINY_SPECIAL_MAP = {
    "pad_token": SPECIAL_TOKENS[PAD_ID],
    "eos_token": SPECIAL_TOKENS[EOS_ID],
    "unk_token": SPECIAL_TOKENS[UNK_ID],
}
_TINY_CONFIG = {
    # class name understood by transformers 4.x and 5.x alike
    "tokenizer_class": "PreTrainedTokenizerFast",
    **_TINY_SPECIAL_MAP,
    "model_max_length": 512,
    "padding_side": "right",
    "truncation_side": "right",
    "clean_up_tokenization_spaces": False,
}


def tiny_fast_tokenizer(corpus: str = TINY_CORPUS):
    """The tiny tokenizer (or its twin over another ``corpus``) as a transformers fast tokenizer (in memory)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_tiny_backend(corpus), **_TINY_CONFIG)


def build_tiny_tokenizer(out_dir: str | Path, corpus: str = TINY_CORPUS, model_max_length: int = 512) -> Path:
    """Write the tiny preset's tokenizer dir and return it.

    Files: tokenizer.json, tokenizer_config.json, special_tokens_map.json;
    loadable by `PromptTokenizer.from_dir` / `AutoTokenizer`. The files are
    written directly (not via `save_pretrained`) so their bytes do not depend
    on the transformers version: the same bytes every time. The toy
    preset's tokenizer is the same construction over a corpus that starts
    with its captions' vocabulary, and its preset's text length.
    """
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _tiny_backend(corpus).save(str(out_dir / "tokenizer.json"), pretty=True)
    config = {**_TINY_CONFIG, "model_max_length": model_max_length}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", _TINY_SPECIAL_MAP)):
        text = json.dumps(content, indent=2, sort_keys=True) + "\n"
        (out_dir / name).write_text(text, encoding="utf-8")
    return out_dir


def tiny_tokenizer(seq_len: int = 512) -> PromptTokenizer:
    """The tiny preset's tokenizer, built in memory (no files)."""
    return PromptTokenizer(tiny_fast_tokenizer(), seq_len=seq_len, source=TINY_TOKENIZER_SOURCE)
