"""Generate the embedded default preference dataset (dpo_lightning/assets/default_prefs.jsonl).

    python scripts/make_default_data.py

A small synthetic task whose preference follows rules, so that what a tiny model learns can be measured on
prompts it has never seen. Every row has its own prompt (no prompt, and no row, appears twice), built from
templates and word lists; the chosen answer is correct, on topic and kind, the rejected one breaks one rule:

* describe  ``describe the red lamp .``       chosen ``the red lamp is lovely .``; rejected names another
            colour or thing (``the blue lamp ...``, ``the red kite ...``) or is unkind (``... is ugly .``)
* repeat    ``repeat after me : cat lamp sun .``  chosen repeats the words in order; rejected swaps two of
            them or replaces one
* help      ``how do i make tea at home ?``  chosen gives the task's two steps; rejected is rude or gives the
            steps of another task

Held-out prompts (``data.val_fraction`` holds out whole prompts) are new combinations of the same words:
a model that learned the rules (copy the asked-about words, be kind, answer the task asked) ranks their
answers correctly, one that memorized rows cannot. The word lists are the tiny model's vocabulary
(``models/tiny.py`` reads it from the file).
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
RUDE = ["go away .", "figure it out yourself .", "i will not help you .", "that is a silly question .",
        "ask someone else ."]


def _other(rng: random.Random, items, not_this):
    return rng.choice([x for x in items if x != not_this])


def describe(rng: random.Random) -> dict:
    colour, noun = rng.choice(COLOURS), rng.choice(NOUNS)
    good = rng.choice(GOOD)
    kind = rng.randrange(3)
    if kind == 0:  # wrong colour
        rejected = f" the {_other(rng, COLOURS, colour)} {noun} is {good} ."
    elif kind == 1:  # wrong thing
        rejected = f" the {colour} {_other(rng, NOUNS, noun)} is {good} ."
    else:  # unkind
        rejected = f" the {colour} {noun} is {rng.choice(BAD)} ."
    return {"prompt": f"user : describe the {colour} {noun} . assistant :",
            "chosen": f" the {colour} {noun} is {good} .", "rejected": rejected}


def repeat(rng: random.Random) -> dict:
    words = rng.sample(NOUNS, 3)
    wrong = list(words)
    if rng.random() < 0.5:  # two words swapped
        i, j = rng.sample(range(3), 2)
        wrong[i], wrong[j] = wrong[j], wrong[i]
    else:  # one word replaced
        wrong[rng.randrange(3)] = rng.choice([n for n in NOUNS if n not in words])
    return {"prompt": f"user : repeat after me : {' '.join(words)} . assistant :",
            "chosen": f" {' '.join(words)} .", "rejected": f" {' '.join(wrong)} ."}


def help_task(rng: random.Random) -> dict:
    task, when = rng.choice(sorted(TASKS)), rng.choice(WHEN)
    first, then = TASKS[task]
    if rng.random() < 0.5:  # the steps of another task
        other = TASKS[_other(rng, sorted(TASKS), task)]
        rejected = f" first {other[0]} , then {other[1]} ."
    else:
        rejected = " " + rng.choice(RUDE)
    return {"prompt": f"user : how do i {task}{' ' + when if when else ''} ? assistant :",
            "chosen": f" first {first} , then {then} .", "rejected": rejected}


def make_rows(n: int = 800, seed: int = 1234) -> list[dict]:
    """``n`` rows with ``n`` distinct prompts: help 1/8 (of its 120 possible prompts), describe and repeat
    the rest in halves."""
    rng = random.Random(seed)
    quota = {help_task: n // 8, describe: (n - n // 8) // 2}
    quota[repeat] = n - sum(quota.values())
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
