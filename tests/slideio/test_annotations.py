"""Annotation files rasterised as ground truth (histo_wsl.slideio.annotations)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.mark.parametrize(
    ("name", "text", "needles"),
    [
        (
            "bad.xml",
            '<?xml version="1.0"?>\n<ASAP_Annotations>\n<Annotations>\n</ASAP_Annotations>\n',
            ["line 4", "mismatched tag"],
        ),
        (
            "nan.xml",
            '<?xml version="1.0"?>\n<ASAP_Annotations><Annotations>\n'
            '<Annotation Name="a" Type="Polygon"><Coordinates>\n'
            '<Coordinate Order="0" X="abc" Y="1"/>\n'
            "</Coordinates></Annotation></Annotations></ASAP_Annotations>\n",
            ["line 4", "X='abc' is not a number"],
        ),
        ("bad.geojson", '{"type": "FeatureCollection",\n "features": [}\n', ["line 2", "JSON"]),
    ],
)
def test_malformed_annotations_give_line_and_reason(tmp_path, name, text, needles):
    from histo_wsl.errors import InputError
    from histo_wsl.slideio.annotations import annotation_mask

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError) as info:
        annotation_mask(path, (10, 10), 1.0)
    message = str(info.value)
    assert name in message
    for needle in needles:
        assert needle in message, message


def test_mask_image_annotation_is_resized_to_the_map(tmp_path):
    from histo_wsl.slideio.annotations import annotation_mask

    big = np.zeros((160, 200), np.uint8)
    big[40:120, 40:120] = 255
    path = tmp_path / "s_mask.png"
    Image.fromarray(big).save(path)
    truth = annotation_mask(path, (40, 50), 4.0)
    mask, notes = truth.mask, truth.notes
    assert (
        truth.ignore is None
        and mask.shape == (40, 50)
        and mask.sum() == 400
        and mask[10:30, 10:30].all()
    )
    assert notes["format"] == "mask-image" and notes["mask_size"] == [200, 160]
