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


# --- the tiny T5 tokenizer of the PixArt examples ---------------------------------------------------

T5_MAX_LENGTH = 16  # the tokenizer's model_max_length: an export's default sequence length
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5's own vocabulary
T5_WORDS = ("a", "photo", "of", "an", "astronaut", "riding", "horse", "on", "mars", "the", "cat", "dog")
_T5_SPACE = "\u2581"  # SentencePiece's word-start marker


def t5_vocab() -> list[tuple[str, float]]:
    """The Unigram vocabulary: specials, whole words, then single characters (so every prompt tokenizes)."""
    import string

    characters = [_T5_SPACE, *(string.ascii_letters + string.digits + string.punctuation)]
    return (
        [(token, 0.0) for token in T5_SPECIALS]
        + [(_T5_SPACE + word, -2.0) for word in T5_WORDS]
        + [(character, -5.0) for character in characters]
    )


def write_t5_tokenizer_files(folder: pathlib.Path) -> None:
    """A tokenizer.json (Unigram, SentencePiece-style word starts, `</s>` appended) and its config: what
    T5TokenizerFast loads on transformers 4.x and 5 without a sentencepiece model file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("spiece.model", "added_tokens.json"):
        (folder / stale).unlink(missing_ok=True)
    tokenizer = Tokenizer(models.Unigram(t5_vocab(), unk_id=T5_SPECIALS.index("<unk>"), byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_T5_SPACE, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=_T5_SPACE, prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", T5_SPECIALS.index("</s>"))]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    config = {
        **special,
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": T5_MAX_LENGTH,
        "extra_ids": 0,
        "additional_special_tokens": [],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def make_t5_tokenizer():
    """The tiny T5TokenizerFast, loaded from its files."""
    import tempfile

    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory(prefix="tiny-t5-tokenizer-") as folder:
        write_t5_tokenizer_files(pathlib.Path(folder))
        return T5TokenizerFast.from_pretrained(folder)
