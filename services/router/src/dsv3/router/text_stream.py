"""New tokens -> text deltas, holding back what a stop sequence or an unfinished character may still claim.

Tokens do not map to characters one to one: a byte-level or BPE token may end inside a UTF-8 character,
and a stop sequence may span tokens. So the text so far is decoded whole, a trailing replacement
character (an incomplete byte sequence) is held, as is the longest tail that could begin a stop
sequence; what lies before is safe to send. A stop sequence ends the text just before it.
"""

from __future__ import annotations

from dsv3.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text handed out so far
        self.stopped = False

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop sequence."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def feed(self, token: int) -> str:
        """Add one token; the text now safe to send (may be empty). Sets `stopped` on a stop sequence."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        search_from = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(text, min(hits))
        end = len(text)
        if text.endswith("\ufffd"):
            end -= 1
        end -= self._held_tail(text[:end])
        return self._take(text, end)

    def flush(self) -> str:
        """At the end of the generation: everything not sent yet (unless a stop sequence ended it)."""
        if self.stopped:
            return ""
        return self._take(self.tokenizer.decode(self.ids), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        if end <= self.sent:
            return ""
        delta = text[self.sent : end]
        self.sent = end
        return delta
