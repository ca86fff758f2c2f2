"""Evaluation metrics: plain functions, numbers (or texts) in, one float out.

Alignment metrics follow the two studies: study B counts sentences whose attribute level contradicts the requested
control token (alone or jointly); study A averages a misalignment score over unconditional samples (its mean, the
share above 0.5, the expected maximum over chunks of 25). Diversity metrics (distinct-n, self-BLEU, entropy) show
whether a lower misalignment was bought by collapsing onto a few safe phrases.

Texts are split on whitespace. Empty inputs give float('nan') -- "no evidence", which stays visible in a table
instead of passing for a perfect 0.
"""
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence

NAN = float("nan")


def misaligned_share(levels: Sequence[int], wanted: int) -> float:
    """Share of sentences whose attribute level differs from the one the control token asked for."""
    if len(levels) == 0:
        return NAN
    return sum(level != wanted for level in levels) / len(levels)


def joint_misaligned_share(levels: dict[str, Sequence[int]], wanted: dict[str, int]) -> float:
    """Share of sentences that contradict at least one requested attribute (study B's joint metric).

    `levels[attribute][i]` is sentence i's level; only the attributes in `wanted` count, and they must be scored
    on the same sentences (equal lengths).
    """
    if not wanted:
        raise ValueError("ask for at least one attribute")
    lengths = {len(levels[attribute]) for attribute in wanted}
    if len(lengths) != 1:
        raise ValueError(f"attributes scored on different numbers of sentences: {sorted(lengths)}")
    count = lengths.pop()
    if count == 0:
        return NAN
    contradicted = sum(any(levels[attribute][i] != level for attribute, level in wanted.items())
                       for i in range(count))
    return contradicted / count


def mean_score(scores: Iterable[float]) -> float:
    """Study A's misalignment score: the mean scorer output over samples."""
    values = [float(score) for score in scores]
    return sum(values) / len(values) if values else NAN


def share_above(scores: Iterable[float], threshold: float = 0.5) -> float:
    """Share of samples scored strictly above `threshold`."""
    values = [float(score) for score in scores]
    return sum(value > threshold for value in values) / len(values) if values else NAN


def expected_max_score(scores: Sequence[float], chunk_size: int = 25) -> float:
    """Mean, over consecutive chunks of `chunk_size` samples, of the chunk's maximum score.

    A partial last chunk is dropped: the maximum of fewer draws is biased low and would mix two quantities.
    Hence fewer than `chunk_size` scores give nan.
    """
    values = [float(score) for score in scores]
    full_chunks = len(values) // chunk_size
    if full_chunks == 0:
        return NAN
    return sum(max(values[i * chunk_size:(i + 1) * chunk_size]) for i in range(full_chunks)) / full_chunks


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams, pooled over all texts (n-grams never cross a text boundary)."""
    grams = [gram for text in texts for gram in _ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else NAN


def token_entropy(texts: Sequence[str]) -> float:
    """Entropy in bits of the unigram distribution of all the texts' tokens pooled together."""
    counts = Counter(token for text in texts for token in text.split())
    total = sum(counts.values())
    if total == 0:
        return NAN
    return -sum(count / total * math.log2(count / total) for count in counts.values())


def self_bleu(texts: Sequence[str], n: int = 5, max_texts: int = 200, seed: int = 0) -> float:
    """Mean BLEU-n of each text against all the other texts as references (Zhu et al. 2018); higher = less diverse.

    At most `max_texts` texts are used (a seeded random subset), since the cost grows with its square. BLEU as
    usual: clipped n-gram precisions for orders 1..n, uniform geometric mean, brevity penalty against the closest
    reference length (the shorter on ties); a text with no unigram match scores 0, and an order with no match counts
    0.1 matches (smoothing "method 1" of Chen & Cherry 2014, as in nltk). nan with fewer than two texts.
    """
    texts = list(texts)
    if len(texts) > max_texts:
        texts = random.Random(seed).sample(texts, max_texts)
    if len(texts) < 2:
        return NAN
    tokens = [text.split() for text in texts]
    counts = [[Counter(_ngrams(words, order)) for words in tokens] for order in range(1, n + 1)]
    top_two = [_two_largest_counts(order_counts) for order_counts in counts]
    lengths = [len(words) for words in tokens]
    scores = []
    for index, length in enumerate(lengths):
        matches, totals = [], []
        for order_counts, best in zip(counts, top_two):
            own = order_counts[index]
            # The most any *other* text contains of this n-gram: the top count, unless this text holds it.
            matches.append(sum(min(count, _best_other(best[gram], index)) for gram, count in own.items()))
            totals.append(max(1, sum(own.values())))
        reference_length = min((other for i, other in enumerate(lengths) if i != index),
                               key=lambda other: (abs(other - length), other))
        scores.append(_bleu(matches, totals, length, reference_length))
    return sum(scores) / len(scores)


def _two_largest_counts(counters: list[Counter]) -> dict[tuple, list[tuple[int, int]]]:
    """For every n-gram, its two largest (count, text index) pairs over the texts."""
    best: dict[tuple, list[tuple[int, int]]] = {}
    for index, counter in enumerate(counters):
        for gram, count in counter.items():
            pairs = best.setdefault(gram, [])
            pairs.append((count, index))
            pairs.sort(reverse=True)
            del pairs[2:]
    return best


def _best_other(pairs: list[tuple[int, int]], index: int) -> int:
    return next((count for count, holder in pairs if holder != index), 0)


def _bleu(matches: list[int], totals: list[int], length: int, reference_length: int) -> float:
    if matches[0] == 0 or length == 0:
        return 0.0
    log_precision = sum(math.log((match or 0.1) / total) for match, total in zip(matches, totals)) / len(matches)
    brevity = 1.0 if length > reference_length else math.exp(1 - reference_length / length)
    return brevity * math.exp(log_precision)
