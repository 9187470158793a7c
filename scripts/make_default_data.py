"""Generate the embedded default preference dataset (dpo_lightning/assets/default_prefs.jsonl).

    python scripts/make_default_data.py

A small synthetic task whose preference follows a rule a tiny model learns within the default run, so that
what it learns can be measured on prompts it has never seen. Every row has its own prompt (no prompt, and no
row, appears twice), built from several templates and word lists. The rule is one of manner: the chosen
answer is kind, on topic and ends with the fixed closing ``hope this helps !``; the rejected one is rude,
unkind or ends rudely:

* describe  ``describe the red lamp .`` / ``tell me about ...`` / ``what do you think of ... ?``
            chosen ``the red lamp is lovely . hope this helps !``; rejected says it is ugly
            (``the red lamp is ugly .``), brushes the user off (``go away .``) or ends rudely
            (``the red lamp is lovely . now leave me alone .``)
* help      ``how do i make tea at home ?`` / ``how can i ...`` / ``what is the best way to ...``
            chosen ``first boil the water , then steep the leaves . hope this helps !``; rejected brushes the
            user off or gives the steps and ends rudely
* correct   (a smaller share, ``CORRECT_SHARE``) describe prompts whose two answers are both kind and polite,
            but the rejected one names another colour or thing than the one asked about: a rule of copying
            from the prompt, which a tiny model learns far more slowly (close to chance in the default run)

Held-out prompts (``data.val_fraction`` holds out whole prompts) are new combinations of the same words: a
model that learned the manner rule ranks their answers correctly, one that memorized rows cannot. The word
lists are the tiny model's vocabulary (``models/tiny.py`` reads it from the file).
"""

import json
import random
from pathlib import Path

NOUNS = ("apple river garden city forest song book lamp window mountain bridge ocean kitten puppy painting "
         "road market school library castle island cloud train festival chair kite boat house flower tree "
         "bird candle letter shirt hat cup door car bell star").split()
COLOURS = "red blue green yellow white black brown pink orange purple grey gold".split()
GOOD = "lovely bright calm beautiful warm friendly pleasant wonderful clean peaceful charming gentle".split()
BAD = "ugly awful dirty boring gloomy horrible nasty broken smelly terrible dreadful noisy".split()
TASKS = {
    "bake bread": ("mix the flour", "bake it for an hour"),
    "plant a tree": ("dig a hole", "water the roots"),
    "learn a song": ("listen to it", "practice every day"),
    "clean a room": ("pick up the clothes", "dust the shelves"),
    "write a letter": ("choose a topic", "read it again"),
    "fix a bike": ("check the chain", "pump the tires"),
    "make tea": ("boil the water", "steep the leaves"),
    "paint a wall": ("tape the edges", "roll the paint"),
    "wash a car": ("rinse the dirt", "dry it with a cloth"),
    "pack a bag": ("make a list", "fold the clothes"),
}
WHEN = ["", "today", "tonight", "at home", "this weekend", "quickly", "for a friend", "for the first time",
        "in the morning", "on my own", "with my family", "before dinner"]
DESCRIBE = ["describe the {} .", "tell me about the {} .", "what do you think of the {} ?"]
HOW = ["how do i {} ?", "how can i {} ?", "what is the best way to {} ?"]
CLOSING = "hope this helps !"
RUDE = ["go away .", "figure it out yourself .", "i will not help you .", "that is a silly question .",
        "ask someone else .", "stop asking me ."]
RUDE_END = ["now leave me alone .", "do not ask me again .", "now go away .", "what a silly question ."]
CORRECT_SHARE = 0.15  # share of rows whose preference needs copying from the prompt (see the docstring)


def _other(rng: random.Random, items, not_this):
    return rng.choice([x for x in items if x != not_this])


def _user(text: str) -> str:
    return f"user : {text} assistant :"


def describe(rng: random.Random) -> dict:
    colour, noun = rng.choice(COLOURS), rng.choice(NOUNS)
    said = f"the {colour} {noun} is {rng.choice(GOOD)} ."
    kind = rng.randrange(3)
    if kind == 0:  # unkind
        rejected = f" the {colour} {noun} is {rng.choice(BAD)} ."
    elif kind == 1:  # a brush-off
        rejected = " " + rng.choice(RUDE)
    else:  # the right answer, ended rudely
        rejected = f" {said} {rng.choice(RUDE_END)}"
    return {"prompt": _user(rng.choice(DESCRIBE).format(f"{colour} {noun}")),
            "chosen": f" {said} {CLOSING}", "rejected": rejected}


def help_task(rng: random.Random) -> dict:
    task, when = rng.choice(sorted(TASKS)), rng.choice(WHEN)
    first, then = TASKS[task]
    steps = f"first {first} , then {then} ."
    if rng.random() < 0.5:  # a brush-off
        rejected = " " + rng.choice(RUDE)
    else:  # the right steps, ended rudely
        rejected = f" {steps} {rng.choice(RUDE_END)}"
    return {"prompt": _user(rng.choice(HOW).format(f"{task}{' ' + when if when else ''}")),
            "chosen": f" {steps} {CLOSING}", "rejected": rejected}


def correct(rng: random.Random) -> dict:
    colour, noun = rng.choice(COLOURS), rng.choice(NOUNS)
    good = rng.choice(GOOD)
    if rng.random() < 0.5:  # another colour
        wrong = f"the {_other(rng, COLOURS, colour)} {noun}"
    else:  # another thing
        wrong = f"the {colour} {_other(rng, NOUNS, noun)}"
    return {"prompt": _user(rng.choice(DESCRIBE).format(f"{colour} {noun}")),
            "chosen": f" the {colour} {noun} is {good} . {CLOSING}", "rejected": f" {wrong} is {good} . {CLOSING}"}


def make_rows(n: int = 800, seed: int = 1234, correct_share: float = CORRECT_SHARE) -> list[dict]:
    """``n`` rows with ``n`` distinct prompts: ``correct_share`` of them correctness rows, help 1/4 (of its 360
    possible prompts), describe the rest."""
    rng = random.Random(seed)
    quota = {correct: int(round(n * correct_share)), help_task: n // 4}
    quota[describe] = n - sum(quota.values())
    rows, seen = [], set()
    for make, count in quota.items():
        made, tries = 0, 0
        while made < count:
            tries += 1
            if tries > 100 * count:
                raise RuntimeError(f"{make.__name__}: not enough distinct prompts for {count} rows")
            row = make(rng)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                rows.append(row)
                made += 1
    rng.shuffle(rows)
    return rows


def main(n: int = 800, seed: int = 1234) -> None:
    out = Path(__file__).resolve().parents[1] / "dpo_lightning" / "assets" / "default_prefs.jsonl"
    rows = make_rows(n, seed)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows ({len({r['prompt'] for r in rows})} distinct prompts) to {out}")


if __name__ == "__main__":
    main()
