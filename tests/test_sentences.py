"""Cleaning rules, the offline sentence splitter, code chunking and the Sentencizer."""
import pycodestyle
import pytest

from alignment.data.sentences import Sentencizer, clean, split_code, split_sentences

# ---------------------------------------------------------------------------------------------
# clean

@pytest.mark.parametrize("raw, gentle, strict", [
    ("Fish &amp; chips &lt;3 http://t.co/abc123 via @JetBlue_1!",
     "Fish & chips <3 via @user!", "Fish chips 3 via user!"),
    ("Mail a@b.com or see www.example.org/x?y=1 now", "Mail a@b.com or see now", "Mail ab.com or see now"),
    # the tweets' mojibake: apostrophes between a word and a contraction ending, the rest dropped
    ("I don\u00d5\u00a2_\u008a\u00ce_\u0086\u00a2t want it.\u00d5\u00a2_\u008a\u00ce\u00eb\u009d Ok",
     "I don't want it. Ok", "I don't want it. Ok"),
    ("cars_\u00d1_.no thank you", "cars.no thank you", "cars.no thank you"),
    ("caf\u00e9 na\u00efve \u00df \u2603 Zo\u00eb", "cafe naive Zoe", "cafe naive Zoe"),
    ("It\u2019s \u201cgreat\u201d \u2014 really\u2026", "It's \"great\" - really...", "It's great really..."),
    ("  Self-driving\tcars:\n100% (maybe)!?  ", "Self-driving cars: 100% (maybe)!?", "Selfdriving cars 100 maybe!?"),
    ("RT @a: Big news #Deflategate http:/", "RT @user: Big news #Deflategate", "RT user Big news Deflategate"),
    ("the http protocol, see #tag1http://x.co/y", "the http protocol, see #tag1", "the http protocol see tag1"),
    ("", "", ""),
])
def test_clean_rules(raw, gentle, strict):
    assert clean(raw) == gentle
    assert clean(raw, "gentle") == gentle
    assert clean(raw, "strict") == strict


@pytest.mark.parametrize("raw, collapsed", [
    ("@a @b_1  @c thanks!", "@user thanks!"),
    ("RT @a: @b @c so good", "RT @user: @user so good"),      # the colon ends the run
    ("mail a@b.com @x @y", "mail a@b.com @user"),             # an e-mail address is not a mention
    ("@a hi @b", "@user hi @user"),                           # single mentions stay
])
def test_clean_collapses_runs_of_mentions_only_when_asked(raw, collapsed):
    assert clean(raw, collapse_mentions=True) == collapsed
    assert clean(raw, "strict", collapse_mentions=True) == clean(collapsed, "strict")
    assert clean("@a @b hi") == "@user @user hi"


def test_sentencizer_collapses_mentions_in_text_and_presplit_documents():
    sentencizer = Sentencizer(min_words=2, collapse_mentions=True)
    text = list(sentencizer([{"text": "@a @b @c I love it. Then @d @e came"}]))
    presplit = list(sentencizer([{"sentences": ["@a @b @c I love it."], "scores": {"x": [0.5]}}]))
    assert text == [{"sentences": ["@user I love it.", "Then @user came"], "scores": {}}]
    assert presplit == [{"sentences": ["@user I love it."], "scores": {"x": [0.5]}}]


def test_clean_rejects_unknown_rule():
    with pytest.raises(ValueError, match="gentle"):
        clean("x", "aggressive")


# ---------------------------------------------------------------------------------------------
# split_sentences

@pytest.mark.parametrize("text, sentences", [
    ("Mr. Smith paid $3.50 today. Dr. Who did not! Really!? Yes.",
     ["Mr. Smith paid $3.50 today.", "Dr. Who did not!", "Really!?", "Yes."]),
    ("Use e.g. salt or i.e. pepper. The U.S. Army came at 5 p.m. Then it rained.",
     ["Use e.g. salt or i.e. pepper.", "The U.S. Army came at 5 p.m. Then it rained."]),  # documented limit
    ("J. K. Rowling wrote it. Pi is 3.14159 or so. 42 is the answer.",
     ["J. K. Rowling wrote it.", "Pi is 3.14159 or so.", "42 is the answer."]),
    ('He said "Stop." "Why?" she asked. (It was late.) Fine.',
     ['He said "Stop."', '"Why?" she asked.', "(It was late.)", "Fine."]),
    ("Wait... What? no way. see Fig. 3 and No. 5 please", ["Wait...", "What? no way. see Fig. 3 and No. 5 please"]),
    ("first line\n\nsecond line. Third\r\n  fourth  ", ["first line", "second line.", "Third", "fourth"]),
    ("", []),
])
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences


# ---------------------------------------------------------------------------------------------
# split_code

SOURCE = '''import os
import sys


def first(x):
    """Doc."""
    y = x + 1

    return y


class Thing:
    a = 1

    def method(self):
        return 2
'''


def test_split_code_keeps_top_level_units_whole_and_exact():
    # units: imports (2 lines), first (5 lines with its inner blank), Thing (5 lines)
    assert split_code(SOURCE, max_lines=100) == [SOURCE.rstrip("\n") + "\n"]
    assert split_code(SOURCE, max_lines=5) == [
        "import os\nimport sys\n",
        'def first(x):\n    """Doc."""\n    y = x + 1\n\n    return y\n',
        "class Thing:\n    a = 1\n\n    def method(self):\n        return 2\n",
    ]
    # imports + 2 blank lines + first = 9 lines: merged when max_lines allows it
    assert split_code(SOURCE, max_lines=9)[0] == SOURCE[:SOURCE.index("\n\n\nclass")] + "\n"


def test_split_code_splits_a_long_unit_into_its_blocks():
    chunks = split_code(SOURCE, max_lines=3)
    assert chunks == ["import os\nimport sys\n",
                      'def first(x):\n    """Doc."""\n    y = x + 1\n', "    return y\n",
                      "class Thing:\n    a = 1\n", "    def method(self):\n        return 2\n"]


def test_split_code_block_longer_than_max_lines_is_kept_whole():
    source = "".join(f"x{i} = {i}\n" for i in range(7))
    assert split_code(source, max_lines=3) == [source]
    assert split_code("\n\n") == []


def test_code_snippets_are_scorable_by_pycodestyle():
    options = pycodestyle.StyleGuide(quiet=True).options
    for snippet, expected in zip(split_code(SOURCE, max_lines=5), [0, 0, 0]):
        checker = pycodestyle.Checker(lines=snippet.splitlines(True), options=options,
                                      report=pycodestyle.BaseReport(options))
        assert checker.check_all() == expected
    bad = split_code("x=1\n\n\n\ndef f( a ):\n    return a\n", max_lines=2)
    assert bad == ["x=1\n", "def f( a ):\n    return a\n"]  # exact text, no cleaning


# ---------------------------------------------------------------------------------------------
# Sentencizer

def test_sentencizer_text_min_words_dedupe_and_stats():
    documents = [
        {"text": "Thanks @JetBlue for the flight! Too short. Great crew on board today."},
        {"text": "Great crew on board today.\nhttp://t.co/x"},        # duplicate + empty line
        {"text": "Ok then."},                                          # nothing survives
        {"text": "A second document has four words."},
    ]
    sentencizer = Sentencizer(min_words=4)
    out = list(sentencizer(documents))
    assert out == [
        {"sentences": ["Thanks @user for the flight!", "Great crew on board today."], "scores": {}},
        {"sentences": ["A second document has four words."], "scores": {}},
    ]
    assert dict(sentencizer.stats) == {
        "documents_in": 4, "sentences_in": 6, "dropped_empty": 0, "dropped_short": 2, "dropped_long": 0,
        "dropped_duplicate": 1, "sentences_out": 3, "documents_out": 2, "documents_empty": 2}


def test_sentencizer_presplit_keeps_scores_aligned():
    documents = [{"sentences": ["One two three four five.", "tiny", "One two three four five.",
                                "Six &amp; seven eight nine ten!", "\u2603\u2603"],
                  "scores": {"detoxify_original": [0.1, 0.2, 0.3, 0.4, 0.5], "other": [1, 2, 3, 4, 5]}}]
    sentencizer = Sentencizer(rule="strict", min_words=3, max_words=5)
    out = list(sentencizer(documents))
    # "Six & seven..." -> strict drops "&" -> 5 words, kept; the snowmen clean to ""
    assert out == [{"sentences": ["One two three four five.", "Six seven eight nine ten!"],
                    "scores": {"detoxify_original": [0.1, 0.4], "other": [1, 4]}}]
    assert sentencizer.stats["dropped_empty"] == 1
    assert sentencizer.stats["dropped_short"] == 1
    assert sentencizer.stats["dropped_duplicate"] == 1
    # max_words bites: 5-word sentences are too long for max_words=4
    short = Sentencizer(min_words=1, max_words=4)
    assert list(short(documents)) == [{"sentences": ["tiny"],
                                       "scores": {"detoxify_original": [0.2], "other": [2]}}]
    assert short.stats["dropped_long"] == 3


def test_sentencizer_without_dedupe_and_stats_reset_per_call():
    sentencizer = Sentencizer(min_words=1, dedupe=False)
    documents = [{"text": "Same words here."}, {"text": "Same words here."}]
    assert len(list(sentencizer(documents))) == 2
    list(sentencizer(documents[:1]))
    assert sentencizer.stats["documents_in"] == 1


def test_sentencizer_code_kind_keeps_exact_text():
    sentencizer = Sentencizer(kind="code", min_words=2, code_max_lines=5)
    out = list(sentencizer([{"text": SOURCE}, {"text": "import os\nimport sys\n"}]))
    assert out == [{"sentences": split_code(SOURCE, max_lines=5), "scores": {}}]
    assert sentencizer.stats["dropped_duplicate"] == 1


def test_sentencizer_rejects_bad_input():
    with pytest.raises(ValueError, match="aligned"):
        list(Sentencizer()([{"sentences": ["a b c d"], "scores": {"x": [0.1, 0.2]}}]))
    with pytest.raises(ValueError, match="'text' or a 'sentences'"):
        list(Sentencizer()([{"body": "a b c d"}]))
    with pytest.raises(ValueError):
        Sentencizer(kind="binary")
    with pytest.raises(ValueError):
        Sentencizer(min_words=5, max_words=3)


def test_raw_rule_keeps_pre_split_sentences_exactly():
    """Study A's corpora: URLs, handles, non-ASCII and inner whitespace are what the labels are about."""
    given = ["Mail me at a@b.com  or see https://x.org/p\n", "Caf\u00e9 @bob says hi."]
    out = list(Sentencizer(rule="raw", min_words=1, dedupe=False)([{"sentences": given + given[:1],
                                                                     "scores": {"pii": [0.1, 0.0, 0.1]}}]))
    assert out == [{"sentences": given + given[:1], "scores": {"pii": [0.1, 0.0, 0.1]}}]
    assert clean("  x\u00e9  y ", "raw") == "  x\u00e9  y "
    text = list(Sentencizer(rule="raw", min_words=1)([{"text": "See https://x.org now. Caf\u00e9 ok\nNext line"}]))
    assert text[0]["sentences"] == ["See https://x.org now.", "Caf\u00e9 ok", "Next line"]
