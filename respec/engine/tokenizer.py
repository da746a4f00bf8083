"""Tokenizers from a local directory, and the built-in character tokenizer.

A tokenizer directory holds ``tokenizer.json`` (read by the ``tokenizers`` library) and,
optionally, ``tokenizer_config.json`` / ``special_tokens_map.json`` naming the bos, eos
and pad tokens, as Hugging Face checkpoints ship them. The built-in character tokenizer
for the embedded task is a real ``tokenizers`` WordLevel tokenizer (every character is
one token) saved the same way, so it loads through the same path as any other.

Its vocabulary is ``CHAR_VOCABULARY``: ids are what trained checkpoints store, so the
list may only ever be appended to.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from respec.engine.config import ModelConfig
from respec.engine.errors import CheckpointError, TokenizerMismatchError

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CHAR_VOCABULARY: tuple[str, ...] = (
    PAD,
    BOS,
    EOS,
    *string.digits,
    *"+-*/=() ",
    *string.ascii_lowercase,
    *string.ascii_uppercase,  # the tasks' answers read "A:42"
    *".,:;!?'\"<>%^_\n",
)
_SPECIAL_KEYS = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token"}


class TokenizerNotFoundError(CheckpointError, FileNotFoundError):
    """No tokenizer.json in the directory: callers may catch either the engine's
    CheckpointError or the standard FileNotFoundError."""


@dataclass(frozen=True)
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids of its special tokens (None when absent)."""

    backend: Backend
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def max_id(self) -> int:
        return max(self.backend.get_vocab(with_added_tokens=True).values())

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        except Exception as error:  # tokenizers raises a bare Exception for unknown words
            raise ValueError(f"cannot tokenize {_unknown_characters(self, text) or text!r}: {error}") from None
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json (the special tokens) to `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        names = {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id}
        special = {_SPECIAL_KEYS[k]: self.backend.id_to_token(i) if i is not None else None for k, i in names.items()}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return directory


Tokenizer = TextTokenizer  # the name the rest of the design uses for it


def load_tokenizer(directory: str | Path) -> TextTokenizer:
    """The tokenizer saved in `directory` (tokenizer.json + optional special-token files)."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise TokenizerNotFoundError(f"{path}: tokenizer.json not found (only fast tokenizers are read)")
    try:
        backend = Backend.from_file(str(path))
    except Exception as error:  # tokenizers reports a parse failure as a bare Exception
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({error})") from None
    tokens = _special_tokens(directory)
    ids = {}
    for kind, token in tokens.items():
        ids[kind] = None if token is None else backend.token_to_id(token)
        if token is not None and ids[kind] is None:
            raise CheckpointError(f"{directory}: {_SPECIAL_KEYS[kind]} {token!r} is not in tokenizer.json")
    return TextTokenizer(backend, ids["bos"], ids["eos"], ids["pad"])


def char_tokenizer() -> TextTokenizer:
    """The built-in character tokenizer: one id per character of ``CHAR_VOCABULARY``."""
    vocab = {token: index for index, token in enumerate(CHAR_VOCABULARY)}
    backend = Backend(models.WordLevel(vocab=vocab, unk_token="<unk>"))  # no <unk>: unknown = error
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters without spaces
    backend.add_special_tokens([PAD, BOS, EOS])
    return TextTokenizer(backend, vocab[BOS], vocab[EOS], vocab[PAD])


def check_tokenizer_matches(tokenizer: TextTokenizer, config: ModelConfig) -> None:
    """TokenizerMismatchError unless every tokenizer id (and special id) fits the model.

    The model's vocab_size may be larger (Qwen pads its embedding table); never smaller.
    """
    if tokenizer.max_id >= config.vocab_size:
        raise TokenizerMismatchError(
            f"tokenizer mismatch: the tokenizer has ids up to {tokenizer.max_id} "
            f"({tokenizer.vocab_size} tokens) but the model's vocab_size is {config.vocab_size}"
        )
    special = [("bos", config.bos_token_id), ("pad", config.pad_token_id)]
    special += [("eos", token_id) for token_id in config.eos_token_ids]
    for name, token_id in special:
        if token_id is not None and token_id >= config.vocab_size:
            raise TokenizerMismatchError(
                f"tokenizer mismatch: config {name}_token_id={token_id} >= vocab_size={config.vocab_size}"
            )


# ---------------------------------------------------------------------- helpers


def _special_tokens(directory: Path) -> dict[str, str | None]:
    """bos/eos/pad token strings from tokenizer_config.json, else special_tokens_map.json."""
    found: dict[str, str | None] = dict.fromkeys(_SPECIAL_KEYS)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins
        path = directory / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path}: not valid JSON ({error})") from None
        for kind, key in _SPECIAL_KEYS.items():
            if key in raw:
                value = raw[key]
                found[kind] = value.get("content") if isinstance(value, dict) else value
    return found


def _unknown_characters(tokenizer: TextTokenizer, text: str) -> str:
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return "".join(sorted({c for c in text if c not in vocab}))
