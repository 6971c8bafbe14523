"""The tiny CLIP tokenizer every example pipeline shares: a byte-level BPE vocabulary written as files."""

from __future__ import annotations

import json
import pathlib

TOKENIZER_MAX_LENGTH = 77

_MERGES = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("i", "n"),
    ("o", "n</w>"),
    ("e", "r"),
    ("a", "t</w>"),
    ("c", "at</w>"),
    ("d", "o"),
    ("do", "g</w>"),
    ("t", "o</w>"),
    ("p", "h"),
    ("ph", "o"),
    ("pho", "to</w>"),
)
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
_MERGES_HEADER = "#version: 0.2"




def _byte_alphabet() -> list[str]:
    """One printable unicode character per byte value, as byte-level BPE (GPT-2/CLIP) uses.

    Bytes that are already visible, non-space latin-1 characters stand for themselves; every
    other byte (controls, space, soft hyphen, ...) is shifted to code points 256, 257, ...
    """
    visible = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    alphabet = []
    shifted = 0
    for byte in range(256):
        if byte in visible:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return alphabet


def tokenizer_vocab() -> dict[str, int]:
    """The tiny tokenizer's vocabulary: bytes, bytes ending a word, merged pairs, then specials."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [char + "</w>" for char in alphabet] + [a + b for a, b in _MERGES]
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}


def make_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=tokenizer_vocab(),
        merges=list(_MERGES),
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=TOKENIZER_MAX_LENGTH,
    )


def write_tokenizer_files(folder: pathlib.Path) -> None:
    """Add the files a slow CLIPTokenizer needs (transformers 5 only writes tokenizer.json).

    vocab.json + merges.txt are what `CLIPTokenizer` of transformers 4.x reads; special_tokens_map.json
    is kept for the same older readers.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer_vocab(), ensure_ascii=False), encoding="utf-8")
    merges = "\n".join([_MERGES_HEADER] + [f"{a} {b}" for a, b in _MERGES]) + "\n"
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
