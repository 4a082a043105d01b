"""Streaming: print an answer's text while its tokens come (sample.py --prompt), right for every tokenizer.

    python sample.py --ckpt out/final --prompt "Name three primes."     # the answer appears as it is decoded
"""
import sys


class TextStream:
    """Prints generated tokens as text while they come. Decoding one piece at a time is wrong twice over:
    SentencePiece drops a piece's leading space when it starts the text, and a byte-fallback character
    spans several pieces. So decode from the last clean boundary and print only what the new token adds
    once it no longer ends in a half character (U+FFFD)."""

    def __init__(self, tok, file=None):
        self.tok, self.file = tok, file or sys.stdout
        self.ids, self.start, self.printed = [], 0, 0  # decode ids[start:]; ids[start:printed] are shown

    def put(self, token_id):
        self.ids.append(token_id)
        self._emit(final=False)

    def end(self):
        self._emit(final=True)
        self.file.write("\n")
        self.file.flush()

    def _emit(self, final):
        shown = self.tok.decode(self.ids[self.start:self.printed])
        text = self.tok.decode(self.ids[self.start:])
        if len(text) > len(shown) and (final or not text.endswith("\ufffd")):
            self.file.write(text[len(shown):])
            self.file.flush()
            # keep one piece of context so the next piece's leading space survives decoding
            self.start, self.printed = self.printed, len(self.ids)
