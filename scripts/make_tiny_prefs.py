"""Generate the bundled tiny preference file ``src/mallowspo/testing/assets/tiny_prefs.jsonl``.

Deterministic (fixed seed, no network). Each row is in TRL's standard explicit-prompt
format ``{"prompt", "chosen", "rejected"}`` plus a ``category`` column:

- ``factual``: a question with one right answer (capitals, sums, colours). The chosen
  response is polite and correct; the rejected one is rude or off-topic. A model that
  has seen the data is nearly certain of the answer: low entropy, low dispersion.
- ``open``: an open-ended request (ideas, names, advice) with many acceptable answers.
  The chosen response is polite and on-topic, drawn from a pool; the rejected one is
  rude or off-topic. High entropy, high dispersion (paper App. A).

The signal is learnable by a tiny model: polite/on-topic versus rude/off-topic wording.

Usage: python scripts/make_tiny_prefs.py [--out PATH] [--rows N]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "mallowspo" / "testing" / "assets" / "tiny_prefs.jsonl"

CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Greece": "Athens",
    "Poland": "Warsaw",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Ireland": "Dublin",
}
COLOURS = {
    "grass": "green",
    "the sky": "blue",
    "snow": "white",
    "a banana": "yellow",
    "coal": "black",
    "a ripe tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
}
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]

VERB_TEMPLATES = ["You could %s.", "Why not %s?", "Try to %s."]
NOUN_TEMPLATES = ["How about %s?", "Maybe %s.", "I suggest %s."]

# request -> (response templates, ideas)
OPEN_REQUESTS = {
    "Suggest something fun to do this weekend.": (
        VERB_TEMPLATES,
        [
            "go for a long walk in the park",
            "visit a small museum",
            "cook a new recipe with friends",
            "read a good book by the window",
            "try a board game night",
            "plant some herbs on the balcony",
        ],
    ),
    "Give me a name for a pet cat.": (
        NOUN_TEMPLATES,
        [
            "Whiskers",
            "Luna",
            "Pepper",
            "Mochi",
            "Oliver",
            "Cleo",
            "Biscuit",
            "Nala",
        ],
    ),
    "How can I become a better writer?": (
        VERB_TEMPLATES,
        [
            "write a little every day",
            "read widely and take notes",
            "ask a friend for honest feedback",
            "rewrite your first drafts",
            "keep a small journal of ideas",
            "study writers you admire",
        ],
    ),
    "What could I do with old magazines?": (
        VERB_TEMPLATES,
        [
            "make a collage for your wall",
            "wrap small gifts with the pages",
            "cut out words for a poem",
            "donate them to a school",
            "fold them into paper beads",
            "line a drawer with the covers",
        ],
    ),
    "Suggest a healthy snack.": (
        NOUN_TEMPLATES,
        [
            "an apple with some nuts",
            "carrot sticks with hummus",
            "a bowl of yogurt and berries",
            "a handful of almonds",
            "sliced cucumber with a little salt",
            "a banana with peanut butter",
        ],
    ),
    "Give me an idea for a short story.": (
        NOUN_TEMPLATES,
        [
            "a lighthouse keeper who finds a message in a bottle",
            "a robot learning to bake bread",
            "two strangers stuck in a lift",
            "a village where it never stops snowing",
            "a cat who can read minds",
            "a map that changes every night",
        ],
    ),
}

RUDE = [
    "Ugh, figure it out yourself.",
    "That is a stupid question. Go away.",
    "Whatever. I do not care.",
    "Stop bothering me with this nonsense.",
    "Why would I help you? Leave me alone.",
]
OFF_TOPIC = [
    "Bananas are a kind of berry, and turtles are slow.",
    "My favourite number is purple and the moon is cheese.",
    "The train leaves at noon, bring a hat.",
    "Socks are warm. Trees are tall. Cars go fast.",
]


def factual_rows(rng: random.Random) -> list[dict]:
    """Questions with one correct answer: polite and correct versus rude or off-topic."""
    rows = []
    for country, city in CAPITALS.items():
        rows.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
    for thing, colour in COLOURS.items():
        rows.append((f"What colour is {thing}?", f"{thing.capitalize()} is {colour}."))
    for a in range(1, 7):
        for b in range(1, 7):
            if a + b < len(NUMBER_WORDS):
                rows.append(
                    (
                        f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?",
                        f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.",
                    )
                )
    out = []
    for prompt, answer in rows:
        rejected = rng.choice(RUDE) if rng.random() < 0.6 else rng.choice(OFF_TOPIC)
        out.append(
            {"prompt": prompt, "chosen": "Happy to help! " + answer, "rejected": rejected, "category": "factual"}
        )
    return out


def open_rows(rng: random.Random, per_request: int) -> list[dict]:
    """Open-ended requests with many good answers: polite and on-topic versus rude or off-topic."""
    out = []
    for request, (templates, ideas) in OPEN_REQUESTS.items():
        for _ in range(per_request):
            opener = rng.choice(["Happy to help! ", "Good question! ", "Sure! "])
            chosen = opener + rng.choice(templates) % rng.choice(ideas)
            rejected = rng.choice(RUDE) if rng.random() < 0.6 else rng.choice(OFF_TOPIC)
            out.append({"prompt": request, "chosen": chosen, "rejected": rejected, "category": "open"})
    return out


def make_rows(n_rows: int = 300, seed: int = 0) -> list[dict]:
    """About ``n_rows`` rows, half factual and half open-ended, shuffled deterministically."""
    rng = random.Random(seed)
    factual = factual_rows(rng)
    while len(factual) < n_rows // 2:  # repeat the factual pool with fresh rejected responses
        factual += factual_rows(rng)
    factual = factual[: n_rows // 2]
    opened = open_rows(rng, per_request=-(-(n_rows - len(factual)) // len(OPEN_REQUESTS)))
    rows = factual + opened[: n_rows - len(factual)]
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rows", type=int, default=300)
    args = parser.parse_args()
    rows = make_rows(args.rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
