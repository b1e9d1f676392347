"""Offline lm-eval tasks built from the demo text (Botchan, public domain).

Both tasks use only the held-out part of the novel (the last 40% of its characters,
the part llmquant's demo evaluates perplexity on; calibration uses the first 60%),
and only the novel itself, not the Project Gutenberg header and licence.

* ``botchan_cloze``: a passage of 40 to 120 words that ends a sentence; the model
  must predict its last word (greedy accuracy, as LAMBADA scores it).
* ``botchan_continuation``: three sentences of context; choose the sentence that
  really follows among four (three distractors drawn from elsewhere in the held-out text).

The examples are a deterministic function of the text (no randomness beyond a fixed seed).
"""

from __future__ import annotations

import random
import re

HELD_OUT = (0.6, 1.0)
# A sentence ends at . ! or ? (and a closing quote) before a capital, except after a title.
_SENTENCE_END = re.compile(r'(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<=[.!?])["\']?\s+(?=["\']?[A-Z])')


def held_out_text() -> str:
    from llmquant import assets

    full = assets.fetch("botchan", quiet=True).read_text(encoding="utf-8")
    start, end = (int(len(full) * f) for f in HELD_OUT)
    body_end = full.find("*** END OF THIS PROJECT GUTENBERG EBOOK")
    text = full[start : min(end, body_end) if body_end > 0 else end]
    return " ".join(text.split())  # this copy of the novel has no blank lines between paragraphs


def sentences() -> list[str]:
    out = [s.strip() for s in _SENTENCE_END.split(held_out_text()) if s.strip()]
    return out[1:]  # the held-out range starts in the middle of a sentence


def cloze_examples(max_examples: int = 300) -> list[dict]:
    sents, out, i = sentences(), [], 0
    while i < len(sents) and len(out) < max_examples:
        passage, j = [], i
        while j < len(sents) and sum(len(s.split()) for s in passage) < 40:
            passage.append(sents[j])
            j += 1
        text = " ".join(passage)
        words = text.split()
        m = re.fullmatch(r"([A-Za-z]{3,})[.!?]['\"]?", words[-1]) if words else None
        if m and 40 <= len(words) <= 120:
            out.append({"context": " ".join(words[:-1]), "target": m.group(1)})
        i = j
    return out


def continuation_examples(max_examples: int = 300, seed: int = 1234) -> list[dict]:
    sents = sentences()
    usable = [k for k in range(3, len(sents)) if 6 <= len(sents[k].split()) <= 40]
    rng = random.Random(seed)
    out = []
    for k in usable[::2][:max_examples]:
        pool = [x for x in usable if abs(x - k) > 10]
        choices = [sents[k]] + [sents[x] for x in rng.sample(pool, 3)]
        order = list(range(4))
        rng.shuffle(order)
        out.append({
            "context": " ".join(sents[k - 3 : k]),
            "choices": [choices[o] for o in order],
            "label": order.index(0),
        })
    return out


def cloze_dataset(**kwargs):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(cloze_examples())})


def continuation_dataset(**kwargs):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(continuation_examples())})
