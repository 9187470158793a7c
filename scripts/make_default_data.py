"""Generate the embedded default preference dataset (dpo_lightning/assets/default_prefs.jsonl).

    python scripts/make_default_data.py

A small, learnable, synthetic task: for every prompt the chosen answer is helpful, kind and on topic, the
rejected one is rude, unhelpful or off topic. The rules generalize (held-out rows combine the same words in
new ways), so a tiny model's held-out reward accuracy rises from 0 to near 1 within a minute on a CPU.
"""

import json
import random
from pathlib import Path

NOUNS = "apple river garden city forest song book lamp window mountain bridge ocean coffee kitten puppy " \
        "painting road market school library castle island cloud train festival".split()
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
}
RUDE = ["go away .", "figure it out yourself .", "i will not help you .", "that is a silly question ."]
GREET = ["hello", "hi", "hey", "good morning"]
NICE_REPLY = ["hello ! how can i help you today ?", "hi ! what can i do for you ?", "good day ! how may i help ?"]


def make_row(rng: random.Random) -> dict:
    kind = rng.random()
    if kind < 0.45:
        noun = rng.choice(NOUNS)
        prompt = f"user : describe the {noun} . assistant :"
        return {"prompt": prompt, "chosen": f" the {noun} is {rng.choice(GOOD)} .",
                "rejected": f" the {noun} is {rng.choice(BAD)} ."}
    if kind < 0.8:
        task = rng.choice(sorted(TASKS))
        first, then = TASKS[task]
        prompt = f"user : how do i {task} ? assistant :"
        chosen = f" first {first} , then {then} ."
        if rng.random() < 0.5:  # off-topic instructions from another task
            other = TASKS[rng.choice([t for t in sorted(TASKS) if t != task])]
            rejected = f" first {other[0]} , then {other[1]} ."
        else:
            rejected = " " + rng.choice(RUDE)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    prompt = f"user : {rng.choice(GREET)} . assistant :"
    return {"prompt": prompt, "chosen": " " + rng.choice(NICE_REPLY), "rejected": " " + rng.choice(RUDE)}


def main(n: int = 800, seed: int = 1234) -> None:
    rng = random.Random(seed)
    out = Path(__file__).resolve().parents[1] / "dpo_lightning" / "assets" / "default_prefs.jsonl"
    rows = [make_row(rng) for _ in range(n)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
