import pytest
import torch

from umilayers._validation import (
    check_bool_mask,
    check_choice,
    check_finite,
    check_positive_int,
    check_tensor,
)


def test_named_sizes_bind_across_arguments():
    sizes = {}
    check_tensor("x", torch.zeros(2, 3, 4), ("B", "k", 4), sizes)
    assert sizes == {"B": 2, "k": 3}
    with pytest.raises(ValueError, match=r"mask: expected shape \(B=2, k=3\), got \(2, 5\)"):
        check_tensor("mask", torch.zeros(2, 5), ("B", "k"), sizes)


def test_rank_and_fixed_size_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"x: expected a 3-d tensor .* got 2-d shape \(2, 3\)"):
        check_tensor("x", torch.zeros(2, 3), ("B", "N", "D"))
    with pytest.raises(ValueError, match=r"x: expected shape \(B=2, 4\), got \(2, 3\) \(axis 1 should be 4\)"):
        check_tensor("x", torch.zeros(2, 3), ("B", 4))


def test_type_errors():
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        check_tensor("x", [1, 2])
    with pytest.raises(TypeError, match="floating-point"):
        check_tensor("x", torch.zeros(2, dtype=torch.long), floating=True)
    with pytest.raises(TypeError, match="torch.bool"):
        check_bool_mask("m", torch.zeros(2), ("B",))


def test_finite_positive_choice():
    check_finite("x", torch.zeros(3))
    with pytest.raises(ValueError, match="x: expected finite values, found 2"):
        check_finite("x", torch.tensor([0.0, float("nan"), float("inf")]))
    with pytest.raises(ValueError):
        check_positive_int("depth", 0)
    with pytest.raises(TypeError):
        check_positive_int("depth", True)
    with pytest.raises(ValueError, match=r"normalize: expected one of \['inputs', 'slots'\], got 'x'"):
        check_choice("normalize", "x", ["inputs", "slots"])
