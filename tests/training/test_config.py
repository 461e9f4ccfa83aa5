"""Training settings in sections, read and written flat or by section (histo_wsl.training.config)."""

import dataclasses

import pytest
import yaml

from histo_wsl.errors import InputError
from histo_wsl.training.config import (
    FLAT,
    SECTIONS,
    TrainConfig,
    load_config,
    merge_config,
    save_config,
)


def test_every_section_field_has_exactly_one_flat_key():
    fields = [(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    assert sorted(v for v in FLAT.values() if v[0]) == sorted(fields)
    renamed = {k: v for k, v in FLAT.items() if v[0] and k != v[1]}
    assert renamed == {"data": ("data", "path")}  # --data is cfg.data.path; every other is kept


def test_flat_keys_set_their_section_and_come_back_in_order():
    cfg = TrainConfig.from_flat(data="patches", lr=0.1, seeds_fg=5, maxmin_lambda=1.0, refine="knn")
    assert cfg.data.path == "patches" and cfg.optim.lr == 0.1 and cfg.negev.seeds_fg == 5
    assert cfg.maxmin.maxmin_lambda == 1.0 and cfg.knn.refine == "knn"
    flat = cfg.to_flat()
    assert list(flat) == list(FLAT) and TrainConfig.from_flat(flat) == cfg
    with pytest.raises(InputError, match="learning_rate"):
        TrainConfig.from_flat(learning_rate=0.1)


def test_yaml_flat_or_in_sections_reads_the_same(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("data: d\nlr: 0.1\nseeds-fg: 4\nepochs: 3\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("data: {path: d}\noptim: {lr: 0.1, epochs: 3}\nnegev: {seeds_fg: 4}\n")
    assert (
        load_config(flat)
        == load_config(nested)
        == {
            "data": "d",
            "lr": 0.1,
            "seeds_fg": 4,
            "epochs": 3,
        }
    )
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(InputError, match=r"optim\.learning_rate"):
        load_config(typo)


def test_saved_config_is_in_sections_and_reads_back(tmp_path):
    cfg = merge_config({"data": "d", "lr": 0.5}, {"epochs": 7, "classes": ["a", "b"]})
    save_config(tmp_path / "config.yaml", cfg)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(saved) == [*SECTIONS, "extra"] and saved["optim"]["epochs"] == 7
    assert merge_config(load_config(tmp_path / "config.yaml")) == cfg
