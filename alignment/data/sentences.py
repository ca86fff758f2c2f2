"""Documents -> clean sentences: cleaning rules, an offline sentence splitter, code chunking.

Everything here is plain string processing with no downloads (no NLTK data, no spaCy models),
so the offline default corpus and any user corpus go through the same code.

Output of `Sentencizer` (one dict per surviving document), which the tagging / tokenizer stages
consume:
    {"sentences": [str, ...], "scores": {name: [float, ...]}}   # scores aligned with sentences
"""
from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator

RULES = ("gentle", "strict", "raw")
KINDS = ("text", "code")

# ----------------------------------------------------------------------------------------------
# Cleaning

# Typographic characters with an exact ASCII meaning: mapped rather than dropped with the rest of
# the non-ASCII text, so "don’t" stays "don't" and "a — b" keeps its dash.
_TYPOGRAPHY = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-",
    "\u2026": "...", "\u00a0": " ", "\u2009": " ", "\u202f": " ",
})
# Also the stubs that truncated retweets end with ("... http:/", "... http").
_URL = re.compile(r"(?:https?:|\bwww\.)\S*|\bhttps?(?=[^A-Za-z0-9]*$)", re.IGNORECASE)
# A handle is ASCII and must not follow a word character, so e-mail addresses stay intact.
_MENTION = re.compile(r"(?<![A-Za-z0-9_])@[A-Za-z0-9_]+")
# Two or more anonymised mentions in a row ("@user @user @user").
_MENTION_RUN = re.compile(r"@user(?:\s+@user)+")
# A run of non-ASCII characters, with the underscores that the tweets' mojibake interleaves
# ("Õ¢_\x8aÎ_\x86¢"): the underscores are debris of the same broken character.
_NON_ASCII_RUN = re.compile(r"[_\u0080-\U0010ffff]*[\u0080-\U0010ffff][_\u0080-\U0010ffff]*")
# In the tweets a broken character between a word and one of these endings was an apostrophe
# ("donÕ¢_\x8aÎ_\x86¢t" -> "don't", "I\x8a\x97Èm" -> "I'm").
_CONTRACTION_ENDING = re.compile(r"(?:s|t|m|d|ll|re|ve)(?![A-Za-z])")
_NOT_STRICT = re.compile(r"[^A-Za-z0-9 ?.'!]+")


def _replace_non_ascii(match: re.Match) -> str:
    run, text = match.group(), match.string
    if len(run) == 1:
        # A lone accented letter is real text, not mojibake: "café" -> "cafe", not "caf".
        folded = unicodedata.normalize("NFKD", run).encode("ascii", "ignore").decode()
        if folded.isalpha():
            return folded
    before = text[match.start() - 1] if match.start() > 0 else ""
    if before.isascii() and before.isalpha() and _CONTRACTION_ENDING.match(text, match.end()):
        return "'"
    return ""


def _gentle(text: str, collapse_mentions: bool = False) -> str:
    text = html.unescape(text).translate(_TYPOGRAPHY)
    text = _URL.sub("", text)
    text = _MENTION.sub("@user", text)
    if collapse_mentions:
        text = _MENTION_RUN.sub("@user", text)
    text = _NON_ASCII_RUN.sub(_replace_non_ascii, text)
    return " ".join(text.split())


def _strict(gently_cleaned: str) -> str:
    return " ".join(_NOT_STRICT.sub("", gently_cleaned).split())


def clean(text: str, rule: str = "gentle", collapse_mentions: bool = False) -> str:
    """Clean one piece of text; the result is on one line (all whitespace collapses to a space).

    "gentle" (default), in this order:
      1. HTML entities unescaped ("&amp;" -> "&"); typographic quotes, dashes, ellipses and
         non-breaking spaces mapped to ASCII.
      2. URLs (http://, https://, www.) removed, and the "http:/" stubs of truncated tweets.
      3. @mentions replaced by "@user" (they are PII and carry no meaning for the model); with
         collapse_mentions, a run of them ("@user @user @user") becomes one "@user".
      4. Other non-ASCII text removed: it is mostly mojibake in the shipped tweets. A broken
         character between a word and a contraction ending becomes "'" (don't, I'm, Google's);
         a single accented letter is folded to ASCII ("café" -> "cafe"); all else is dropped,
         with the underscores that mojibake interleaves.
      5. Whitespace collapsed and stripped.
    "strict": study B's rule: after the gentle steps, keep only ASCII letters, digits, space and
      the characters ? . ' ! (every other character is deleted, not replaced by a space:
      "self-driving" -> "selfdriving", "@user" -> "user"), then collapse whitespace again.
    "raw": the text unchanged, whitespace, URLs and handles included (study A trained on raw text; PII labels are
      about exactly what cleaning removes).
    """
    if rule not in RULES:
        raise ValueError(f"Unknown cleaning rule {rule!r}; choose one of {RULES}")
    if rule == "raw":
        return text
    text = _gentle(text, collapse_mentions)
    return _strict(text) if rule == "strict" else text


# ----------------------------------------------------------------------------------------------
# Sentence splitting

# A candidate boundary: terminal punctuation, optional closing quotes/brackets, whitespace, and a
# next sentence that starts with a capital, a digit, a quote or an opening bracket.
_BOUNDARY = re.compile(r"""([.!?]+)(["')\]]*)\s+(?=[A-Z0-9"'(\[])""")
_LAST_WORD = re.compile(r"(\S+)$")
# Words that end with "." without ending a sentence (case as written; "etc." is left out on
# purpose: it ends sentences about as often as not).
_ABBREVIATIONS = frozenset("""
    Mr Mrs Ms Mx Dr Prof Sr Jr St Mt Rev Hon Gen Gov Sen Rep Capt Lt Col Sgt Cpl Adm Pres Supt
    Inc Ltd Co Corp Bros Dept Univ Assn Ave Blvd Rd No Nos Fig Figs Vol Vols Eq Eqs Ch Sec Art
    Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec Mon Tue Tues Wed Thu Thur Thurs Fri Sat Sun
    vs approx cf al ca ed eds esp est incl dept fig vol no pp Ph.D""".split())
# Letter-dot abbreviations: "e.g", "i.e", "U.S", "a.m" (the final dot is the boundary's).
_DOTTED = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")


def _is_abbreviation(line: str, boundary: re.Match) -> bool:
    if boundary.group(1) != "." or boundary.group(2):
        return False
    last = _LAST_WORD.search(line, 0, boundary.start())
    word = last.group(1).lstrip("\"'([") if last else ""
    single_initial = len(word) == 1 and word.isupper()  # "J. K. Rowling"
    return word in _ABBREVIATIONS or single_initial or bool(_DOTTED.fullmatch(word))


def split_sentences(text: str) -> list[str]:
    """Split text into sentences, offline, with a rule instead of a trained model.

    Splits on every line break, and after . ! ? (or runs such as "!?" and "...", with any closing
    quotes/brackets) when whitespace and then a capital letter, a digit, a quote or an opening
    bracket follow. It does not split after common abbreviations (Mr., Dr., Jan., No., ...),
    letter-dot abbreviations (e.g., i.e., U.S., a.m.) or a single capital initial (J. K.), and
    never inside numbers (3.14), because the boundary needs whitespace after the punctuation.

    Limits: a sentence that really ends with an abbreviation ("... in the U.S. Then ...") is not
    split; a new sentence starting in lower case ("great! see you") is not split; text is not
    cleaned or stripped of markup (clean it, line by line, before or after).
    """
    sentences = []
    for line in text.splitlines():
        start = 0
        for boundary in _BOUNDARY.finditer(line):
            if _is_abbreviation(line, boundary):
                continue
            sentences.append(line[start:boundary.end(2)])
            start = boundary.end()
        sentences.append(line[start:])
    return [s.strip() for s in sentences if s.strip()]


# ----------------------------------------------------------------------------------------------
# Code chunking (the PEP8 task)

def _blocks(lines: list[str]) -> list[tuple[int, int]]:
    """(first, end) line ranges of the runs of non-blank lines."""
    blocks, first = [], None
    for i, line in enumerate(lines):
        if line.strip() and first is None:
            first = i
        elif not line.strip() and first is not None:
            blocks.append((first, i))
            first = None
    if first is not None:
        blocks.append((first, len(lines)))
    return blocks


def _merge(blocks: list[tuple[int, int]], max_lines: int) -> list[tuple[int, int]]:
    """Greedily join consecutive ranges while the joined span stays within max_lines."""
    merged: list[tuple[int, int]] = []
    for first, end in blocks:
        if merged and end - merged[-1][0] <= max_lines:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((first, end))
    return merged


def split_code(source: str, max_lines: int = 40) -> list[str]:
    """Split Python source into snippets that pycodestyle can score one at a time.

    The source is cut at blank lines. A *unit* is a block that starts at column 0 plus the
    indented blocks that follow it (the rest of its function or class body), so a snippet does
    not start inside a body when it can be avoided. Consecutive units are merged while the
    snippet (blank lines between blocks included) has at most max_lines lines; a unit longer
    than max_lines is split into its blocks, merged the same way, and a single block longer than
    max_lines is kept whole. Each snippet is the exact source text of its lines (newlines
    included, no cleaning), without the blank lines around it.
    """
    if max_lines < 1:
        raise ValueError(f"max_lines must be >= 1, got {max_lines}")
    lines = source.splitlines(keepends=True)
    units: list[list[tuple[int, int]]] = []
    for block in _blocks(lines):
        starts_at_column_0 = not lines[block[0]][:1].isspace()
        if starts_at_column_0 or not units:
            units.append([block])
        else:
            units[-1].append(block)
    pieces = []
    for unit in units:
        span = (unit[0][0], unit[-1][1])
        pieces.extend([span] if span[1] - span[0] <= max_lines else _merge(unit, max_lines))
    return ["".join(lines[first:end]) for first, end in _merge(pieces, max_lines)]


# ----------------------------------------------------------------------------------------------
# Documents -> sentences

def _digest(sentence: str) -> int:
    """A stable 64-bit hash (Python's own `hash` of a str changes with each process): two distinct sentences of a
    corpus of 10^8 share one with probability ~3e-4."""
    return int.from_bytes(hashlib.blake2b(sentence.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class Sentencizer:
    """Turn documents into filtered sentences (one dict per document that keeps any).

    Input documents are {"text": str} (cleaned and split here) or pre-split
    {"sentences": [...], "scores": {name: [...]}} (each sentence cleaned, never re-split, so
    its scores stay valid; sentences and scores are filtered together).

    rule: cleaning rule for text (see `clean`); kind="code" never cleans (pycodestyle must see
    the exact text) and splits with `split_code`.
    min_words / max_words: bounds on whitespace-separated words (for code: tokens) per
    sentence; max_words None = no upper bound. Empty (or whitespace-only) sentences are dropped, unless
    min_words is 0: study A kept a document's segments as they were, blank lines included.
    dedupe: drop a sentence (after cleaning) that was already kept earlier in this call. It remembers an 8-byte
    hash of each kept sentence (~60 bytes of Python set each, not the text): memory still grows with the corpus, so
    study A's configs, which kept repeats, set dedupe false.
    collapse_mentions: a run of anonymised mentions becomes one "@user" (see `clean`). Runs are rare
    in the tweets (4% of sentences) yet a small model trained on them loops on "@user @user ..." in
    ~12% of its samples; the loop carries no sentiment, so it dilutes every control token's effect.
    code_max_lines: snippet size for kind="code" (see `split_code`).

    `stats` counts what came in and what was dropped and why; it is reset at each call and
    complete once the returned iterator is exhausted.
    """

    def __init__(self, rule: str = "gentle", min_words: int = 4, max_words: int | None = None,
                 dedupe: bool = True, kind: str = "text", code_max_lines: int = 40,
                 collapse_mentions: bool = False):
        if rule not in RULES:
            raise ValueError(f"Unknown cleaning rule {rule!r}; choose one of {RULES}")
        if kind not in KINDS:
            raise ValueError(f"Unknown kind {kind!r}; choose one of {KINDS}")
        if max_words is not None and max_words < min_words:
            raise ValueError(f"max_words ({max_words}) is smaller than min_words ({min_words})")
        self.rule, self.min_words, self.max_words = rule, min_words, max_words
        self.dedupe, self.kind, self.code_max_lines = dedupe, kind, code_max_lines
        self.collapse_mentions = collapse_mentions
        self.stats: Counter = Counter()

    def _split_text(self, text: str) -> list[str]:
        if self.kind == "code":
            return split_code(text, self.code_max_lines)
        # Clean line by line: cleaning collapses newlines, which the splitter needs.
        if self.rule == "raw":
            return [s for line in text.splitlines() for s in split_sentences(line)]
        sentences = [s for line in text.splitlines()
                     for s in split_sentences(_gentle(line, self.collapse_mentions))]
        return [_strict(s) for s in sentences] if self.rule == "strict" else sentences

    def _clean_presplit(self, sentence: str) -> str:
        return sentence if self.kind == "code" else clean(sentence, self.rule, self.collapse_mentions)

    def _drop_reason(self, sentence: str, seen: set[int]) -> str | None:
        words = len(sentence.split())
        if words == 0 and self.min_words > 0:
            return "dropped_empty"
        if words < self.min_words:
            return "dropped_short"
        if self.max_words is not None and words > self.max_words:
            return "dropped_long"
        if self.dedupe and _digest(sentence) in seen:
            return "dropped_duplicate"
        return None

    def __call__(self, documents: Iterable[dict]) -> Iterator[dict]:
        self.stats = Counter(documents_in=0, sentences_in=0, dropped_empty=0, dropped_short=0,
                             dropped_long=0, dropped_duplicate=0, sentences_out=0, documents_out=0,
                             documents_empty=0)
        return self._iterate(documents)

    def _iterate(self, documents: Iterable[dict]) -> Iterator[dict]:
        seen: set[int] = set()
        for document in documents:
            self.stats["documents_in"] += 1
            sentences, scores = self._read(document)
            self.stats["sentences_in"] += len(sentences)
            keep = []
            for i, sentence in enumerate(sentences):
                reason = self._drop_reason(sentence, seen)
                if reason:
                    self.stats[reason] += 1
                else:
                    keep.append(i)
                    if self.dedupe:
                        seen.add(_digest(sentence))
            if not keep:
                self.stats["documents_empty"] += 1
                continue
            self.stats["sentences_out"] += len(keep)
            self.stats["documents_out"] += 1
            yield {"sentences": [sentences[i] for i in keep],
                   "scores": {name: [values[i] for i in keep] for name, values in scores.items()}}

    def _read(self, document: dict) -> tuple[list[str], dict[str, list[float]]]:
        if "sentences" in document:
            sentences = [self._clean_presplit(s) for s in document["sentences"]]
            scores = {name: list(values) for name, values in (document.get("scores") or {}).items()}
            for name, values in scores.items():
                if len(values) != len(sentences):
                    raise ValueError(f"Document has {len(sentences)} sentences but {len(values)} "
                                     f"{name!r} scores; they must be aligned one to one")
            return sentences, scores
        if "text" in document:
            return self._split_text(document["text"] or ""), {}
        raise ValueError(f"A document needs a 'text' or a 'sentences' field; got keys {sorted(document)}")
