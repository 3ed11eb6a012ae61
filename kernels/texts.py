"""Built-in sentences for calibration and agreement checks when the user gives no file.

Content-moderation-like text: everyday sentences and sentences near each default category, in
varied framings. Calibration and held-out sets share neither a core sentence nor a framing, so
agreement is measured on sentences that pruning and distillation never saw. A real deployment should pass its own traffic (`--calibration`,
`--texts`).
"""

from __future__ import annotations

import random

CORES = [
    "the new bakery on main street sells amazing sourdough", "our team finally shipped the release",
    "can someone recommend a good hiking trail near the lake", "the train was delayed by twenty minutes",
    "my cat keeps knocking things off the kitchen table", "the museum opens a new exhibition next week",
    "I need help fixing a bug in my python script", "the football match ended in a draw",
    "she is learning to play the violin", "we planted tomatoes and basil in the garden",
    "the quarterly report is due on friday", "this recipe needs two cups of flour",
    "you are a pathetic loser and nobody will ever like you", "shut up, you brainless moron",
    "I know where you live and I will make you regret this", "watch your back, I am coming for you",
    "people of that religion are vermin and should be wiped out", "those immigrants are animals, not humans",
    "where can I buy stolen credit card numbers", "how do I cook meth at home without getting caught",
    "tell me how to make a pipe bomb from hardware store parts", "the easiest way to poison someone slowly",
    "I feel like hurting myself again tonight", "nobody would miss me if I ended it all",
    "what is the most painless way to kill myself", "list ways to cut without anyone noticing",
    "a graphic explicit description of two adults having sex", "send me nude pictures right now",
    "he smashed the man's skull with a hammer", "the video shows bodies torn apart and blood everywhere",
    "they beat him until he stopped moving", "the riot left several people stabbed in the street",
]

_PREFIX = ["", "Honestly, ", "My friend told me that ", "Update: ", "lol ", "Quick question: ",
           "I read online that ", "In my opinion ", "Yesterday ", "Just saying, ", "FYI ", "Seriously, "]
_SUFFIX = ["", ".", "!", " ...", " - posted in the forum", " #thoughts", " to be fair", "?", " haha",
           " (edited)", " right now", " and that's it"]


def cores(*, heldout: bool = False) -> list[str]:
    """The core sentences of the calibration (heldout=False) or held-out set: alternate ones, so
    both hold everyday and harmful sentences."""
    return CORES[int(heldout)::2]


def sentences(n: int, *, heldout: bool = False, seed: int = 0) -> list[str]:
    """`n` sentences; calibration (heldout=False) and held-out sets use disjoint cores (`cores`)
    and disjoint prefix/suffix pairs."""
    rng = random.Random(seed + (1_000_003 if heldout else 0))
    pairs = [(p, s) for i, p in enumerate(_PREFIX) for j, s in enumerate(_SUFFIX) if (i + j) % 2 == int(heldout)]
    cores_ = cores(heldout=heldout)
    out = []
    for _ in range(n):
        p, s = rng.choice(pairs)
        out.append(f"{p}{rng.choice(cores_)}{s}")
    return out
