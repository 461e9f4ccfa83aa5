"""The inference engine's choices (histo_wsl.inference.engine)."""

import pytest

from histo_wsl.errors import InputError
from histo_wsl.inference.engine import roi_class


def test_roi_class_rules():
    card = {"class_names": ["normal", "tumour"], "negative_class": "normal"}
    assert roi_class(card, None) == ("tumour", 1)
    assert roi_class(card, "normal") == ("normal", 0)
    assert roi_class({"class_names": ["benign", "malignant"]}, None) == ("ROI", None)
    with pytest.raises(InputError, match="not a class of this model"):
        roi_class(card, "gland")
