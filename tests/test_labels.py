import numpy as np
import pandas as pd
import pytest

from chextrain.labels import PATHOLOGIES, SLUGS, apply_policy, resolve_policy

NAN = np.nan
RAW = np.array(
    [
        [1, 0, -1, NAN, -1],
        [-1, -1, 0, 1, NAN],
    ],
    dtype=np.float32,
)


def test_order_is_the_papers():
    assert PATHOLOGIES == ("Pleural Effusion", "Edema", "Atelectasis", "Consolidation", "Cardiomegaly")
    assert SLUGS[0] == "pleural_effusion" and SLUGS[-1] == "cardiomegaly"


def test_u_ones():
    targets, mask = apply_policy(RAW, "ones")
    np.testing.assert_array_equal(targets, [[1, 0, 1, 0, 1], [1, 1, 0, 1, 0]])
    assert mask.all()


def test_u_zeros():
    targets, mask = apply_policy(RAW, "zeros")
    np.testing.assert_array_equal(targets, [[1, 0, 0, 0, 0], [0, 0, 0, 1, 0]])
    assert mask.all()


def test_ignore_masks_uncertain_only():
    targets, mask = apply_policy(RAW, "ignore")
    np.testing.assert_array_equal(mask, [[1, 1, 0, 1, 0], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(targets * mask, [[1, 0, 0, 0, 0], [0, 0, 0, 1, 0]])


def test_per_pathology_overrides_from_a_dataframe():
    frame = pd.DataFrame(RAW, columns=list(SLUGS))
    targets, mask = apply_policy(frame, {"default": "zeros", "Atelectasis": "ones", "cardiomegaly": "ignore"})
    np.testing.assert_array_equal(targets[0], [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0])
    assert targets.dtype == np.float32 and mask.dtype == np.float32


@pytest.mark.parametrize(
    "policy, message",
    [
        ("maybe", "'maybe' is not one of"),
        ({"Pneumonia": "ones"}, "unknown pathology 'Pneumonia'"),
        ({"edema": "sometimes"}, "policy for 'edema' is 'sometimes'"),
    ],
)
def test_bad_policies(policy, message):
    with pytest.raises(ValueError, match=message):
        resolve_policy(policy)


def test_shape_checked():
    with pytest.raises(ValueError, match="N x 5"):
        apply_policy(np.zeros((3, 4)))
