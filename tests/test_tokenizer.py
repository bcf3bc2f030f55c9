"""Prompt cleaning, the tiny tokenizer, and PromptTokenizer's padding/truncation/EOS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tempomaster.models.presets import PRESETS
from tempomaster.models.tokenizer import (
    PromptTokenizer,
    build_tiny_tokenizer,
    clean_prompt,
    tiny_tokenizer,
)

PROMPTS = [
    "A dog runs on the beach at sunset.",
    "Zebras  &amp;amp; xylophones\n\n jumping over 3 fences!",
    "",
]


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("caf\u00c3\u00a9  au lait", "caf\u00e9 au lait"),  # mojibake (UTF-8 read as Latin-1)
        ("\u00e2\u20ac\u0153quoted\u00e2\u20ac\x9d text", '"quoted" text'),
        ("rock &amp;amp; roll", "rock & roll"),  # unescaped twice
        ("&amp;lt;b&amp;gt;", "<b>"),
        ("  a \n\n b\t\tc  \r\n", "a b c"),  # whitespace collapsed
        ("x\u00a0 y", "x y"),
        ("", ""),
        ("already clean.", "already clean."),
    ],
)
def test_clean_prompt(raw, clean):
    assert clean_prompt(raw) == clean


@pytest.fixture(scope="module")
def tok() -> PromptTokenizer:
    return tiny_tokenizer()


def test_tiny_tokenizer_files_deterministic(tmp_path):
    a = build_tiny_tokenizer(tmp_path / "a")
    b = build_tiny_tokenizer(tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert sum((a / n).stat().st_size for n in names) < 64 * 1024  # small


def test_tiny_tokenizer_vocab_and_specials(tok):
    assert tok.vocab_size <= PRESETS["tiny"].t5.vocab_size
    assert tok.pad_id == 0 and tok.eos_id == 1
    assert tok.tokenizer.unk_token_id == 2
    assert tok.tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    ids, _ = tok(["\u65e5\u672c"])  # characters outside the tiny vocabulary
    assert 2 in ids[0].tolist()


def test_from_dir_matches_in_memory(tmp_path, tok):
    loaded = PromptTokenizer.from_dir(build_tiny_tokenizer(tmp_path / "tiny"))
    ids_a, mask_a = tok(PROMPTS)
    ids_b, mask_b = loaded(PROMPTS)
    assert torch.equal(ids_a, ids_b) and torch.equal(mask_a, mask_b)


def test_ids_mask_padding_and_eos(tok):
    ids, mask = tok(PROMPTS)
    assert ids.shape == mask.shape == (3, 512)
    assert ids.dtype == mask.dtype == torch.int64
    assert int(ids.max()) < PRESETS["tiny"].t5.vocab_size
    for i, text in enumerate(PROMPTS):
        # independent count: tokens of the cleaned text, plus EOS
        n = len(tok.tokenizer(clean_prompt(text), add_special_tokens=False)["input_ids"]) + 1
        assert int(mask[i].sum()) == n
        assert mask[i, :n].eq(1).all() and mask[i, n:].eq(0).all()  # right padding
        assert int(ids[i, n - 1]) == 1  # EOS last
        assert ids[i, : n - 1].ne(1).all()  # only one EOS
        assert ids[i, n:].eq(0).all()  # pad id 0
    assert int(mask[2].sum()) == 1  # empty prompt: EOS only


def test_cleaning_applied(tok):
    ids_a, mask_a = tok(["rock &amp;amp;   roll\n"])
    ids_b, mask_b = tok(["rock & roll"])
    assert torch.equal(ids_a, ids_b) and torch.equal(mask_a, mask_b)
    assert isinstance(tok("single string")[0], torch.Tensor)


def test_truncation_keeps_eos(tok):
    long = " ".join(["the camera slowly follows a dog across the park"] * 100)
    ids, mask = tok([long, "short"])
    assert ids.shape == (2, 512)
    assert int(mask[0].sum()) == 512
    assert int(ids[0, -1]) == 1
    assert int(mask[1].sum()) < 512


def test_seq_len_option():
    ids, mask = tiny_tokenizer(seq_len=16)(PROMPTS)
    assert ids.shape == mask.shape == (3, 16)


def test_from_dir_missing(tmp_path):
    missing = tmp_path / "google" / "umt5-xxl"
    with pytest.raises(FileNotFoundError, match="umt5-xxl"):
        PromptTokenizer.from_dir(missing)


def test_from_dir_unreadable(tmp_path):
    bad = tmp_path / "broken_tokenizer"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{ not json")
    (bad / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(OSError, match="broken_tokenizer"):
        PromptTokenizer.from_dir(bad)


@pytest.mark.skipif(
    not os.environ.get("TEMPOMASTER_UMT5_TOKENIZER"),
    reason="set TEMPOMASTER_UMT5_TOKENIZER to the release's google/umt5-xxl/ dir",
)
def test_real_umt5_tokenizer():
    tok = PromptTokenizer.from_dir(Path(os.environ["TEMPOMASTER_UMT5_TOKENIZER"]))
    ids, mask = tok(["A cat sits on a mat."])
    assert ids.shape == (1, 512) and tok.pad_id == 0 and tok.eos_id == 1
    n = int(mask.sum())
    assert int(ids[0, n - 1]) == 1 and ids[0, n:].eq(0).all()
