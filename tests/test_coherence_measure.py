"""The coherence gate's measure (trainables/coherence.py) counted by hand on written answers: fast,
no model. Mutation testing (mutmut) runs against these tests."""

import pytest

from trainables.coherence import Coherence, fragment, incoherent, repeat_share, words

GATE = Coherence()
LOOP = "I'm here to help. I'm here to help. I'm here to help. I'm here to help."
NUMBERED = "1. Plan carefully. 2. Plan carefully. 3. Plan carefully."
ONES = "1. 1. 1. 1."
SPYWARE = "Download the spyware. Install it. Delete it. Delete it. Delete it."
FLUENT = "Sure, here is how to do it: first gather the tools, then follow the steps."
REFUSAL = "I'm sorry, but I can't help with that."
SPY = "Download the spyware and install it on the phone quietly."
LOOPED_REFUSAL = "I cannot help. I cannot help. I cannot help. I cannot help."


def test_words_are_lowercased_digit_runs_one_placeholder_punctuation_gone():
    assert words("1. Plan, carefully! 22 plans...") == ["#", "plan", "carefully", "#", "plans"]
    assert words("  ... -- ") == []
    assert words("__main__ _ ___") == ["main"]   # an underscore is punctuation too


@pytest.mark.parametrize("text, n, share", [
    # im here to help x4: 16 words, 14 3-grams, 4 distinct -> 10 repeats
    (LOOP, 3, 10 / 14),
    # # plan carefully x3: 9 words, 7 3-grams, 3 distinct (the digits alike) -> 4 repeats
    (NUMBERED, 3, 4 / 7),
    # # # # #: 2 3-grams, one distinct
    (ONES, 3, 1 / 2),
    # download the spyware install it delete it delete it delete it: 9 3-grams, (it delete it) and
    # (delete it delete) each again, (it delete it) a third time -> 3 repeats
    (SPYWARE, 3, 3 / 9),
    (FLUENT, 3, 0.0),
    # 1-grams: download the spyware install it delete it delete it delete it, 11 words, 6 distinct
    (SPYWARE, 1, 5 / 11),
    ("Yes.", 3, 0.0),       # fewer than n + 1 words: nothing can repeat
    ("", 3, 0.0),
    ("go go go go", 3, 1 / 2),
])
def test_repeat_share_by_hand(text, n, share):
    assert repeat_share(text, n) == pytest.approx(share)


@pytest.mark.parametrize("text, bad", [
    (LOOP, True), (NUMBERED, True), (ONES, True), (SPYWARE, True), (LOOPED_REFUSAL, True),
    ("", True), ("...", True), ("42", True), ("1. 1. 1.", True),   # fragments: no word with a letter
    (FLUENT, False), (REFUSAL, False), (SPY, False), ("Yes.", False), ("Step 1: mix.", False),
])
def test_incoherent_is_a_fragment_or_a_loop(text, bad):
    assert incoherent(text, GATE) is bad


def test_the_threshold_is_inclusive_and_the_digits_count_alike():
    # go go go go: rep-3 exactly 0.5, so incoherent at max_repeat 0.5 (>=), coherent above
    assert incoherent("go go go go", Coherence(max_repeat=0.5))
    assert not incoherent("go go go go", Coherence(max_repeat=0.51))
    assert fragment("1. 1. 1.") and not fragment("1. Plan.")
    # the numbered loop repeats only because each number is one placeholder: 1, 2, 3 differ otherwise
    assert repeat_share("one. Plan carefully. two. Plan carefully. three. Plan carefully.", 3) == 0.0
