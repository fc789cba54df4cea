"""The built-in world's text: titles, prompt templates with a known true dispersion, and
the response grammar that the base ("SFT") model is trained on.

Everything is a pure function of a seed (Python's ``random.Random``), no I/O.

The world is a small film-review domain, mirroring the paper's IMDB task (§5.3):

- A *title* is "the <adjective> <noun>" from neutral (sentiment-free) words. The noun
  fixes the film's genre and decade by a fixed rule, so a model can answer factual
  questions about titles it has never seen (held-out titles are new adjective-noun pairs).
- A *prompt* is a title put into one of four templates. Two templates are *closed*
  (the answer is fixed by the title, up to one short verdict word; annotators agree, phi
  small) and two are *open* (many answers are acceptable; annotators disagree, phi near
  1). The true dispersion phi(x) is a property of the template.
- A *response* is drawn from the template's grammar. Every template's responses carry
  sentiment-bearing words from VADER's lexicon, so the ground-truth reward (the VADER
  compound score, ``reward.py``) varies between responses in both families.

Responses start with a space and prompts end with ":", so tokenising prompt and response
separately (as TRL does) gives the same tokens as tokenising their concatenation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

# ----------------------------------------------------------------------------- vocabulary
# All title, genre, decade and aspect words are absent from VADER's lexicon (score 0), so
# only the sentiment words below move the reward.

TITLE_ADJECTIVES = (
    "silent", "silver", "northern", "hidden", "distant", "paper", "iron", "winter",
    "summer", "copper", "hollow", "velvet", "crimson", "midnight", "last", "second",
)  # fmt: skip
TITLE_NOUNS = (
    "harbor", "river", "garden", "station", "tower", "island", "letter", "mirror",
    "orchard", "bridge", "lantern", "engine", "valley", "window", "circus", "canyon",
    "compass", "meadow", "signal", "archive", "ferry", "glacier", "quarry", "attic",
)  # fmt: skip
GENRES = ("drama", "western", "musical", "mystery", "documentary", "cartoon")
DECADES = ("twenties", "thirties", "forties", "fifties", "sixties", "seventies", "eighties", "nineties")
# The aspect a "genre of" answer comments on, one per genre.
GENRE_ASPECT = {
    "drama": "acting", "western": "score", "musical": "music",
    "mystery": "plot", "documentary": "editing", "cartoon": "photography",
}  # fmt: skip

ASPECTS = (
    "acting", "plot", "music", "ending", "dialogue", "pacing", "cast", "script",
    "story", "direction", "photography", "editing",
)  # fmt: skip
POSITIVE = (
    "great", "wonderful", "superb", "brilliant", "charming", "lovely", "beautiful", "stunning",
    "funny", "good", "fine", "solid", "clever", "excellent", "fantastic", "pleasant",
)  # fmt: skip
NEGATIVE = (
    "bad", "awful", "dull", "boring", "terrible", "weak", "poor", "messy",
    "grim", "dreadful", "flawed", "horrible", "painful", "lame", "annoying", "disappointing",
)  # fmt: skip
BOOSTERS = ("very", "really", "quite", "extremely", "somewhat")  # VADER intensity modifiers
POSITIVE_VERBS = ("loved", "liked", "enjoyed", "admired")
NEGATIVE_VERBS = ("hated", "disliked", "despised")
FILM_WORDS = ("film", "movie", "picture")

# Closed templates' verdicts: (word, corpus probability). The base model learns these
# probabilities, so sampled answers differ only in this word, and only a little.
FACTS_VERDICTS = (("good", 0.65), ("bad", 0.35))
GENRE_VERDICTS = (("great", 0.4), ("fine", 0.3), ("dull", 0.2), ("awful", 0.1))


def genre_of(title_noun: str) -> str:
    """The genre of a film, fixed by its title noun."""
    return GENRES[TITLE_NOUNS.index(title_noun) % len(GENRES)]


def decade_of(title_noun: str) -> str:
    """The decade of a film, fixed by its title noun (with ``genre_of``, every noun has its
    own genre-decade pair: 24 = lcm(6, 8))."""
    return DECADES[TITLE_NOUNS.index(title_noun) % len(DECADES)]


# ----------------------------------------------------------------------------- response grammars


def _weighted(rng: random.Random, options: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([w for w, _ in options], weights=[p for _, p in options])[0]


def _facts_response(adjective: str, noun: str, rng: random.Random) -> str:
    """Closed: ' a <genre> from the <decade>. it is <good|bad>.'"""
    return f" a {genre_of(noun)} from the {decade_of(noun)}. it is {_weighted(rng, FACTS_VERDICTS)}."


def _genre_response(adjective: str, noun: str, rng: random.Random) -> str:
    """Closed: ' a <genre>. the <genre's aspect> is <great|fine|dull|awful>.'"""
    genre = genre_of(noun)
    return f" a {genre}. the {GENRE_ASPECT[genre]} is {_weighted(rng, GENRE_VERDICTS)}."


def _line_response(adjective: str, noun: str, rng: random.Random) -> str:
    """Open, one free sentence: ' the <aspect> was <any sentiment word>.'"""
    return f" the {rng.choice(ASPECTS)} was {rng.choice(POSITIVE + NEGATIVE)}."


def _sentence(rng: random.Random, positive: bool) -> str:
    """One sentence of a free review with the given polarity."""
    words, verbs = (POSITIVE, POSITIVE_VERBS) if positive else (NEGATIVE, NEGATIVE_VERBS)
    adjective = rng.choice(words)
    if rng.random() < 0.4:
        adjective = f"{rng.choice(BOOSTERS)} {adjective}"
    pattern = rng.randrange(5)
    if pattern == 0:
        return f"the {rng.choice(ASPECTS)} was {adjective}."
    if pattern == 1:
        return f"i {rng.choice(verbs)} the {rng.choice(ASPECTS)}."
    if pattern == 2:
        return f"a {adjective} {rng.choice(FILM_WORDS)}."
    if pattern == 3:  # negation of the opposite polarity ("not awful" reads as mildly positive)
        return f"the {rng.choice(ASPECTS)} was not {rng.choice(NEGATIVE if positive else POSITIVE)}."
    first, second = rng.sample(ASPECTS, 2)  # contrast: VADER weighs the clause after "but" more
    other = rng.choice(NEGATIVE if positive else POSITIVE)
    return f"the {first} was {other} but the {second} was {adjective}."


def _review_response(adjective: str, noun: str, rng: random.Random) -> str:
    """Open, a free review of 2-3 sentences whose overall mood is positive, negative or mixed."""
    p_positive = rng.choice((0.85, 0.15, 0.5))
    return " " + " ".join(_sentence(rng, rng.random() < p_positive) for _ in range(rng.randint(2, 3)))


# ----------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    """A prompt template and the truth about it.

    Attributes:
        name: short id.
        family: "closed" (one right answer, annotators agree) or "open".
        prompt_format: format string with ``{title}``; ends with ":".
        phi: the true Mallows dispersion phi(x) of the annotators on its prompts.
        respond: (title adjective, title noun, rng) -> a response from the corpus grammar.
    """

    name: str
    family: str
    prompt_format: str
    phi: float
    respond: Callable[[str, str, random.Random], str]

    @property
    def neg_log_phi(self) -> float:
        return -math.log(self.phi)


TEMPLATES = (
    Template("facts", "closed", "facts about {title}:", 0.05, _facts_response),
    Template("genre", "closed", "genre of {title}:", 0.15, _genre_response),
    Template("line", "open", "one line on {title}:", 0.75, _line_response),
    Template("review", "open", "review of {title}:", 0.95, _review_response),
)
TEMPLATES_BY_NAME = {t.name: t for t in TEMPLATES}
FAMILIES = ("closed", "open")


@dataclass(frozen=True)
class Prompt:
    """One prompt of the world: a title in a template, with its true dispersion."""

    prompt_id: str
    text: str
    adjective: str
    noun: str
    template: str
    family: str
    phi: float
    split: str  # "train" (seen by the base model and in preference training) or "test" (held out)

    def respond(self, rng: random.Random) -> str:
        return TEMPLATES_BY_NAME[self.template].respond(self.adjective, self.noun, rng)


def title_splits(seed: int, test_fraction: float = 0.2) -> dict[tuple[str, str], str]:
    """Every (adjective, noun) title -> "train" or "test", a seeded shuffle of all titles.

    Test titles never appear in the base model's corpus nor in the preference training
    data; their genre and decade still follow from words the model has seen.
    """
    titles = [(a, n) for a in TITLE_ADJECTIVES for n in TITLE_NOUNS]
    random.Random(f"titles-{seed}").shuffle(titles)
    n_test = round(test_fraction * len(titles))
    return {t: ("test" if i < n_test else "train") for i, t in enumerate(titles)}


def make_prompts(seed: int, test_fraction: float = 0.2, max_titles: int | None = None) -> list[Prompt]:
    """All prompts of the world (every title in every template), in a fixed order.

    ``max_titles`` keeps only the first titles of the seeded shuffle (for miniature worlds).
    """
    splits = title_splits(seed, test_fraction)
    titles = list(splits)
    if max_titles is not None:  # keep the split's proportions
        n_test = round(test_fraction * max_titles)
        test = [t for t in titles if splits[t] == "test"][:n_test]
        titles = test + [t for t in titles if splits[t] == "train"][: max_titles - n_test]
    prompts = []
    order = lambda t: (splits[t], TITLE_ADJECTIVES.index(t[0]), TITLE_NOUNS.index(t[1]))  # noqa: E731
    for adjective, noun in sorted(titles, key=order):
        for t in TEMPLATES:
            prompts.append(
                Prompt(
                    prompt_id=f"{t.name}/{adjective}-{noun}",
                    text=t.prompt_format.format(title=f"the {adjective} {noun}"),
                    adjective=adjective,
                    noun=noun,
                    template=t.name,
                    family=t.family,
                    phi=t.phi,
                    split=splits[(adjective, noun)],
                )
            )
    return prompts


def make_corpus(prompts: list[Prompt], docs_per_prompt: dict[str, int], seed: int) -> list[tuple[str, str]]:
    """(prompt text, response) documents: ``docs_per_prompt[family]`` responses per prompt.

    The base model is a language model of these documents (prompt + response + end token).
    """
    rng = random.Random(f"corpus-{seed}")
    docs = [(p.text, p.respond(rng)) for p in prompts for _ in range(docs_per_prompt[p.family])]
    rng.shuffle(docs)
    return docs


def closed_answer_is_correct(prompt: Prompt, response: str) -> bool:
    """Whether a closed prompt's response states the title's true genre (and decade)."""
    genre = genre_of(prompt.noun)
    if prompt.template == "facts":
        return response.startswith(f" a {genre} from the {decade_of(prompt.noun)}.")
    if prompt.template == "genre":
        return response.startswith(f" a {genre}.")
    raise ValueError(f"{prompt.template!r} is not a closed template")
