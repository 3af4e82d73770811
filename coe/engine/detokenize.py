"""Incremental detokenization with stop strings, correct for multi-byte UTF-8 pieces.

Decoding token by token is wrong twice over: a byte-level BPE token can hold half of a multi-byte
character, and SentencePiece drops a word's leading space when the word is decoded alone. So each
step decodes a short window (a few tokens of context, then the new ones) and emits only what the
window added, holding back text that ends in U+FFFD (an incomplete character) until the next token
completes it. The window starts from the prompt's last tokens so that the first new token gets
its leading space (the approach of TGI and vLLM).

Stop strings: text that could be the start of a stop string is held back until it is resolved,
so a stream never shows text the final output will not contain. The final text stops before the
first stop string.

This module knows nothing about models or scheduling; it only needs a transformers tokenizer.
"""

from __future__ import annotations

from typing import Any, Sequence

_CONTEXT = 6  # prompt tokens of context for the first window


class Detokenizer:
    """Turns a stream of token ids into text deltas.

    Args:
        tokenizer: a transformers tokenizer.
        prompt_ids: the prompt (its tail gives the first tokens their context).
        stop: stop strings.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = tuple(s for s in stop if s)
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""  # everything decoded so far (emitted + held back)
        self.emitted = 0  # chars of ``text`` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Feed one new token; returns the text that may be shown now (possibly "").

        After a stop string is found, ``stopped`` is True and the returned text ends before it.
        """
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        return self._release(final=False)

    def decode_all(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids`` in one go, exactly as feeding them one by one and flushing
        would produce it (for requests nobody streams and that have no stop strings)."""
        assert not self.stop and not self.text, "decode_all is for fresh detokenizers without stop strings"
        context = self._decode(self.ids)
        full = self._decode(self.ids + list(token_ids))
        self.ids.extend(token_ids)
        self.text = full[len(context) :] if full.startswith(context) else self._decode(list(token_ids))
        self.read_offset = len(self.ids)
        return self._release(final=True)

    def flush(self) -> str:
        """Generation ended: decode whatever is still held back and return the remaining text."""
        if not self.stopped and self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            if len(full) > len(prefix):
                self.text += full[len(prefix) :]
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        if self.stop:
            # A stop string can only start at or after ``emitted`` (possible starts are held back).
            start = max(0, self.emitted - self.max_stop + 1)
            hit = -1
            for s in self.stop:
                i = self.text.find(s, start)
                if i != -1 and (hit == -1 or i < hit):
                    hit = i
            if hit != -1:
                self.stopped = True
                self.text = self.text[:hit]
                out = self.text[self.emitted :]
                self.emitted = len(self.text)
                return out
            if not final:
                hold = self._partial_stop_len()
                end = len(self.text) - hold
                out = self.text[self.emitted : end] if end > self.emitted else ""
                self.emitted = max(self.emitted, end)
                return out
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def _partial_stop_len(self) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        tail = self.text[-self.max_stop :] if self.max_stop else ""
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best
