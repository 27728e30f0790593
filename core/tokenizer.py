"""The CLIP BPE tokenizer, built offline from the merges file that open-clip-torch ships.

Stable Diffusion 1.x and 2.x use OpenAI CLIP's byte-level BPE with 49,408 tokens. The
vocabulary is not stored anywhere on disk here, but it is fully determined by the merges
file: 256 byte characters, the same 256 with the end-of-word marker `</w>`, one token per
merge (the merged pair joined), then `<|startoftext|>` and `<|endoftext|>`.
"""

import gzip
import importlib.util
import logging
from functools import lru_cache
from pathlib import Path

from core.errors import InputError

logger = logging.getLogger(__name__)

MERGES_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49_408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# CLIP's vocabulary uses the first 49,152 - 256 - 2 merges of the file and ignores the rest.
NUM_MERGES = 49_152 - 256 - 2


def byte_characters() -> list[str]:
    """Return the 256 printable characters that byte-level BPE uses for bytes 0..255, in vocabulary order.

    Bytes that are printable Latin-1 characters stand for themselves and come first. The
    remaining bytes (control characters, space, soft hyphen, ...) are mapped, in byte order,
    to the code points 256, 257, ... so that no token contains whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    printable_set = set(printable)
    others = [byte for byte in range(256) if byte not in printable_set]
    code_points = printable + [256 + index for index in range(len(others))]
    return [chr(code_point) for code_point in code_points]


def find_merges_file() -> Path:
    """Locate open-clip-torch's packaged merges file without importing open_clip.

    Importing open_clip imports torchvision, and PyPI's torchvision fails to import next
    to a CPU-only torch build, so the package is only looked up, never imported.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"the CLIP merges file {MERGES_FILE_NAME} was not found because open-clip-torch is not installed; "
            "install it with `pip install --no-deps open-clip-torch` (no-deps keeps the CPU torch build)",
            code="missing_dependency",
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / MERGES_FILE_NAME
        if path.is_file():
            return path
    raise InputError(
        f"open-clip-torch is installed but {MERGES_FILE_NAME} is missing from {list(spec.submodule_search_locations)}; "
        "reinstall it with `pip install --no-deps --force-reinstall open-clip-torch`",
        code="missing_dependency",
    )


@lru_cache(maxsize=1)
def read_merges(path: Path | None = None) -> tuple[tuple[str, str], ...]:
    """Read the merges that CLIP uses, as (left, right) pairs in priority order."""
    path = path or find_merges_file()
    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")

    # Line 0 is a version header, and CLIP uses the next NUM_MERGES lines.
    merge_lines = lines[1 : NUM_MERGES + 1]
    if len(merge_lines) != NUM_MERGES:
        raise InputError(
            f"{path} contains {len(merge_lines)} merges, expected {NUM_MERGES}; "
            "reinstall open-clip-torch with `pip install --no-deps --force-reinstall open-clip-torch`",
            code="missing_dependency",
        )
    return tuple(tuple(line.split(" ")) for line in merge_lines)


def build_vocab(merges: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """Build CLIP's token-to-id table from its merges."""
    characters = byte_characters()
    tokens = characters + [character + END_OF_WORD for character in characters]
    tokens += [left + right for left, right in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: token_id for token_id, token in enumerate(tokens)}


def load_clip_tokenizer(pad_token: str = EOS_TOKEN, model_max_length: int = 77):
    """Build a `transformers.CLIPTokenizer` with OpenAI CLIP's 49,408-token vocabulary, offline.

    `pad_token` follows the checkpoint: Stable Diffusion 1.x pads with `<|endoftext|>`,
    2.x with `!`.
    """
    from transformers import CLIPTokenizer

    merges = read_merges()
    vocab = build_vocab(merges)
    if pad_token not in vocab:
        raise InputError(f"pad token {pad_token!r} is not in the CLIP vocabulary; use {EOS_TOKEN!r} or '!'")

    # transformers 5 takes the tables themselves. It silently accepts the v4 `vocab_file=`
    # form and builds a 2-token vocabulary from it, hence the size check.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges), pad_token=pad_token, model_max_length=model_max_length)
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise RuntimeError(
            f"the CLIP tokenizer has {len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE}; "
            "this transformers version builds CLIPTokenizer differently, check its constructor"
        )
    return tokenizer
