"""OwLoreConfig validation: one error naming every bad field, with the fix."""

import pytest

from owlore.run.config import ConfigError, OwLoreConfig, dataclass_from_dict


def test_defaults_follow_official_scripts():
    c = OwLoreConfig()
    assert (c.gamma, c.interval, c.rank, c.update_proj_gap, c.scale, c.proj_type) == (5, 50, 256, 100, 1.0, "std")
    assert c.state_policy == "reset" and c.train_embeddings and c.train_lm_head


def test_every_bad_field_reported_at_once():
    with pytest.raises(ConfigError) as e:
        OwLoreConfig(gamma=0, interval=-1, mode="x", rank=0, proj_type="full", state_policy="drop", threshold=0,
                     floor=1.5, scale=0)
    msg = str(e.value)
    for key in ("gamma=0", "interval=-1", "mode='x'", "rank=0", "proj_type='full'", "state_policy='drop'",
                "threshold=0", "floor=1.5", "scale=0"):
        assert key in msg, key
    assert "must be one of reset, keep, offload" in msg


def test_from_dict_reports_unknown_and_mistyped_keys():
    obj, problems = dataclass_from_dict(OwLoreConfig, {"gama": 3, "rank": "big", "interval": 0}, section="owlore")
    assert obj is None  # interval=0 is invalid, so not even the valid keys build an OwLoreConfig
    assert any("owlore.gama: unknown key" in p for p in problems)
    assert any("owlore.rank='big': expected int | null" in p for p in problems)
    assert any(p.startswith("owlore.interval=0") for p in problems)
    obj, problems = dataclass_from_dict(OwLoreConfig, {"rank": None, "gamma": 2}, section="owlore")
    assert problems == [] and obj.rank is None and obj.gamma == 2
