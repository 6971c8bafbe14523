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
    """The tiny CLIPTokenizer, loaded from its files: transformers 4.x's slow CLIPTokenizer takes only file paths,
    and a vocab.json + merges.txt + tokenizer_config.json folder loads on both transformers lines."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="tiny-clip-tokenizer-") as folder:
        write_tokenizer_files(pathlib.Path(folder))
        return CLIPTokenizer.from_pretrained(folder)


def write_tokenizer_files(folder: pathlib.Path) -> None:
    """Write the files every CLIPTokenizer reads (transformers 5 itself saves only tokenizer.json).

    vocab.json + merges.txt + tokenizer_config.json load on transformers 4.x and 5; special_tokens_map.json is
    kept for the same older readers.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer_vocab(), ensure_ascii=False), encoding="utf-8")
    merges = "\n".join([_MERGES_HEADER] + [f"{a} {b}" for a, b in _MERGES]) + "\n"
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config.update(special, tokenizer_class="CLIPTokenizer", model_max_length=TOKENIZER_MAX_LENGTH)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
