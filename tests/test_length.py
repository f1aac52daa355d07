import pytest
import torch

from balcaprl.length import apply_length_mask, length_conditional_mask, length_ratios, word_length


class TestMask:
    def test_window_bounds_are_inclusive(self):
        ratios = torch.tensor([0.5, 2.0, 0.49, 2.01, 1.0, 0.0], dtype=torch.float64)
        assert length_conditional_mask(ratios).tolist() == [True, True, False, False, True, False]

    def test_custom_window(self):
        assert length_conditional_mask(torch.tensor([0.8, 1.3]), 0.9, 1.5).tolist() == [False, True]

    def test_inverted_window_is_an_error(self):
        with pytest.raises(ValueError, match="low <= high"):
            length_conditional_mask(torch.tensor([1.0]), 2.0, 0.5)


class TestRatios:
    def test_exact_half_and_double_from_word_counts(self):
        reference = "one two three four"
        ratios = length_ratios(["a b", "a b c d e f g h", "a", "a b c d e f g h i"], [[reference]] * 4)
        assert ratios.tolist() == [0.5, 2.0, 0.25, 2.25]
        assert length_conditional_mask(ratios).tolist() == [True, True, False, False]

    def test_mean_reference_length_over_several_references(self):
        # references of 3 and 5 words: mean 4
        ratios = length_ratios(["w w"], [["a b c", "a b c d e"]])
        assert ratios.tolist() == [0.5]

    def test_single_reference_string(self):
        assert length_ratios(["a b c"], ["x y z"]).tolist() == [1.0]

    def test_custom_length_function(self):
        assert length_ratios(["abcd"], [["ab"]], length_fn=len).tolist() == [2.0]

    def test_empty_reference_list_names_the_row(self):
        with pytest.raises(ValueError, match="Row 1 has no reference"):
            length_ratios(["a", "b"], [["x"], []])

    def test_all_empty_references_name_the_row(self):
        with pytest.raises(ValueError, match="Row 0"):
            length_ratios(["a"], [[""]])

    def test_word_length(self):
        assert word_length("  a red\tcircle\n") == 3


def test_masked_rewards_become_zero_not_nan():
    rewards = torch.tensor([[0.9, 0.8, 0.7], [0.9, float("nan"), 0.7], [0.5, 0.6, float("nan")]])
    keep = torch.tensor([True, False, False])
    masked = apply_length_mask(rewards, keep, [1, 2])
    expected = torch.tensor([[0.9, 0.8, 0.7], [0.9, 0.0, 0.0], [0.5, 0.0, 0.0]])
    torch.testing.assert_close(masked, expected)
    assert rewards[1, 1].isnan()  # input untouched
    torch.testing.assert_close(apply_length_mask(rewards, keep, []), rewards, equal_nan=True)


def test_a_caption_exactly_on_a_bound_is_kept():
    # 3 words against references of 3, 3 and 4 words: ρ = 3 / (10/3) = 9/10 exactly, on the bound of [0.9, 1.1].
    ratios = length_ratios(["a b c"], [["a b c", "d e f", "g h i j"]])
    assert length_conditional_mask(ratios, 0.9, 1.1).tolist() == [True]


@pytest.mark.parametrize("window", [(0.5, 2.0), (0.9, 1.1), (0.8, 1.25), (0.7, 1.3)])
def test_window_decisions_equal_exact_rational_arithmetic(window):
    from fractions import Fraction

    low, high = (Fraction(str(bound)) for bound in window)  # the decimal the recipe wrote
    captions, references, expected = [], [], []
    for caption_words in range(0, 25):
        for reference_words in ([3, 3, 4], [7], [2, 5], [10, 11, 12, 13, 9], [6, 6, 6, 7]):
            captions.append("w " * caption_words)
            references.append(["w " * words for words in reference_words])
            ratio = Fraction(caption_words * len(reference_words), sum(reference_words))
            expected.append(low <= ratio <= high)
    assert length_conditional_mask(length_ratios(captions, references), *window).tolist() == expected
