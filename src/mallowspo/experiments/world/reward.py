"""The ground-truth reward r*(x, y) of the built-in world: the VADER compound sentiment
score of the response.

This mirrors the paper's IMDB task (§5.3), where the reward is a sentiment classifier's
score of the generated review and the goal is positive sentiment. VADER (Hutto & Gilbert,
2014) is a lexicon- and rule-based analyser: deterministic, CPU-only, no download (its
lexicon ships inside the ``vaderSentiment`` package), and it handles the constructions the
world's grammar uses (intensifiers such as "very", negation with "not", contrast with
"but"). Every sentiment word of the corpus is taken from its lexicon. The compound score
lies in [-1, 1]; higher is more positive. The reward depends on the response only (titles
are built from words VADER scores 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache


@lru_cache(maxsize=1)
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the built-in world's reward needs vaderSentiment: pip install 'mallowspo[world]'") from e
    return SentimentIntensityAnalyzer()


def sentiment_reward(response: str) -> float:
    """r*(x, y): VADER's compound score of the response text, in [-1, 1]."""
    return float(_analyzer().polarity_scores(response)["compound"])


def sentiment_rewards(responses: Iterable[str]) -> list[float]:
    """``sentiment_reward`` of each response."""
    return [sentiment_reward(r) for r in responses]
