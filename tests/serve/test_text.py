"""Incremental detokenization: stop strings cut the output even across tokens, and text that
could begin a stop string is held back until it cannot."""

from __future__ import annotations

from respec.engine.tokenizer import char_tokenizer
from respec.serve.text import TextStream

TOKENIZER = char_tokenizer()


def feed(stream: TextStream, text: str) -> list[str]:
    return [stream.push(TOKENIZER.encode(character)) for character in text]


def test_a_stop_string_split_over_tokens_ends_the_output_before_it():
    stream = TextStream(TOKENIZER, ["--", "zz"])
    pieces = feed(stream, "ab-c--d")
    assert "".join(pieces) == "ab-c" and stream.stopped
    assert stream.push(TOKENIZER.encode("e")) == "" and stream.flush() == ""


def test_text_that_may_start_a_stop_string_waits_and_then_comes_out_whole():
    stream = TextStream(TOKENIZER, ["xyz"])
    pieces = feed(stream, "abxyq")
    assert pieces == ["", "", "a", "b", "x"]  # two characters held: a stop string of 3 may be under way
    assert stream.flush() == "yq" and not stream.stopped


def test_without_stop_strings_every_token_shows_at_once():
    stream = TextStream(TOKENIZER)
    assert feed(stream, "1+2=3") == ["1", "+", "2", "=", "3"]
    assert stream.push([TOKENIZER.eos_id]) == ""  # special tokens decode to nothing
