from pathlib import Path

import pytest

from cascade_rcnn.config import NOT_IMPLEMENTED, ConfigError, check_supported, get_cfg, get_key, load_config

REPO = Path(__file__).resolve().parents[1]
CASCADE_1X = REPO / "configs/Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml"
CASCADE_3X = REPO / "configs/Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml"
FIXTURE = REPO.parent / "shared/fixtures/d2_parity/config.yaml"


def test_cascade_1x_effective_values():
    cfg = load_config(CASCADE_1X)
    # The values the fact sheet lists as effective for the 1x schedule.
    assert cfg.MODEL.ROI_HEADS.NAME == "CascadeROIHeads"
    assert cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG is True
    assert cfg.MODEL.MASK_ON is True
    assert cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN == 2000
    assert cfg.MODEL.RPN.PRE_NMS_TOPK_TEST == 1000
    assert cfg.MODEL.RPN.IN_FEATURES == ["p2", "p3", "p4", "p5", "p6"]
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[32], [64], [128], [256], [512]]
    assert cfg.INPUT.MIN_SIZE_TRAIN == (640, 672, 704, 736, 768, 800)
    assert cfg.SOLVER.STEPS == (60000, 80000) and cfg.SOLVER.MAX_ITER == 90000
    assert cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS == (0.5, 0.6, 0.7)
    assert cfg.MODEL.ROI_MASK_HEAD.NUM_CONV == 4
    assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"


def test_3x_overrides_schedule_only():
    one, three = load_config(CASCADE_1X), load_config(CASCADE_3X)
    assert three.SOLVER.STEPS == (210000, 250000) and three.SOLVER.MAX_ITER == 270000
    three.SOLVER.STEPS, three.SOLVER.MAX_ITER = one.SOLVER.STEPS, one.SOLVER.MAX_ITER
    assert three == one


@pytest.mark.usefixtures("d2_parity")
def test_fixture_config_loads_with_its_base():
    cfg = load_config(FIXTURE)
    assert cfg.MODEL.RESNETS.STEM_OUT_CHANNELS == 16
    assert cfg.MODEL.FPN.OUT_CHANNELS == 64
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    assert cfg.INPUT.MIN_SIZE_TRAIN == (256, 288, 320)  # a YAML string parsed as a tuple


def test_overrides_are_parsed_and_typed():
    cfg = load_config(
        CASCADE_1X, ["SOLVER.BASE_LR", "0.2", "SOLVER.STEPS", "(15000, 20000)", "MODEL.DEVICE", "npu"]
    )
    assert cfg.SOLVER.BASE_LR == 0.2
    assert cfg.SOLVER.STEPS == (15000, 20000)
    assert cfg.MODEL.DEVICE == "npu"
    cfg = load_config(CASCADE_1X, ["SOLVER.MAX_ITER", "10", "SOLVER.AMP.ENABLED", "True"])
    assert cfg.SOLVER.MAX_ITER == 10 and isinstance(cfg.SOLVER.MAX_ITER, int)
    assert cfg.SOLVER.AMP.ENABLED is True


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{CASCADE_1X}"\nMODEL:\n  RESNET:\n    DEPTH: 101\n')
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "MODEL.RESNET" in str(e.value) and str(bad) in str(e.value)
    assert "RESNETS" in str(e.value)  # suggests the near miss


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("SOLVER:\n  BASE_LRR: 0.1\n")
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "base.yaml"\n')
    with pytest.raises(ConfigError, match=r"base\.yaml.*SOLVER\.BASE_LRR"):
        load_config(child)


def test_unknown_override_and_bad_types():
    with pytest.raises(ConfigError, match="SOLVER.BASE_LRR"):
        load_config(CASCADE_1X, ["SOLVER.BASE_LRR", "0.1"])
    with pytest.raises(ConfigError, match="odd"):
        load_config(CASCADE_1X, ["SOLVER.BASE_LR"])
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITER"):
        load_config(CASCADE_1X, ["SOLVER.MAX_ITER", "many"])
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITER"):
        load_config(CASCADE_1X, ["SOLVER.MAX_ITER", "1.5"])


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text('_BASE_: "b.yaml"\n')
    b.write_text('_BASE_: "a.yaml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)


def test_dump_round_trips(tmp_path):
    cfg = load_config(CASCADE_1X)
    path = tmp_path / "dumped.yaml"
    path.write_text(cfg.dump())
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()


def test_frozen_config_refuses_writes():
    cfg = get_cfg().freeze()
    with pytest.raises(AttributeError):
        cfg.SEED = 3
    clone = cfg.clone()
    clone.SEED = 3
    assert clone.SEED == 3 and cfg.SEED == -1


@pytest.mark.parametrize(
    "key, value",
    [
        ("INPUT.CROP.ENABLED", "True"),
        ("TEST.AUG.ENABLED", "True"),
        ("DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"),
        ("DATALOADER.REPEAT_THRESHOLD", "0.001"),
        ("SOLVER.REFERENCE_WORLD_SIZE", "8"),
        ("TEST.PRECISE_BN.ENABLED", "True"),
        ("MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", "(1.0, 1.0, 1.0, 1.0)"),
        ("VIS_PERIOD", "20"),
        ("FLOAT32_PRECISION", "high"),
    ],
)
def test_unimplemented_key_is_an_error_unless_default(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(CASCADE_1X, [key, value])
    message = str(e.value)
    assert key in message and "not supported" in message and str(CASCADE_1X) in message
    assert value.strip("()").split(",")[0] in message  # the offending value is shown
    # The default value itself is accepted, set explicitly or not.
    default = get_key(get_cfg(), key)
    assert get_key(load_config(CASCADE_1X, [key, repr(default)]), key) == default


def test_unimplemented_keys_in_a_file_are_all_named(tmp_path):
    bad = tmp_path / "crop.yaml"
    bad.write_text(
        f'_BASE_: "{CASCADE_1X}"\nINPUT:\n  CROP:\n    ENABLED: True\n    SIZE: [0.5, 0.5]\n'
        "TEST:\n  AUG:\n    ENABLED: True\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    message = str(e.value)
    for key in ("INPUT.CROP.ENABLED=True", "INPUT.CROP.SIZE=[0.5, 0.5]", "TEST.AUG.ENABLED=True"):
        assert key in message
    assert str(bad) in message


def test_every_config_in_the_repo_loads():
    paths = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:  # the fixture's config: test_fixture_config_loads_with_its_base
        load_config(path)
    check_supported(get_cfg())  # the defaults themselves


def test_every_key_is_read_by_the_code_or_refused():
    """A key the code never reads must be in NOT_IMPLEMENTED (a name-level check: `.KEY` in src/)."""
    src = REPO / "src" / "cascade_rcnn"
    code = "\n".join(p.read_text() for p in src.rglob("*.py") if p.name != "config.py")

    def leaves(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    for key in NOT_IMPLEMENTED:
        get_key(get_cfg(), key)  # every listed key exists
    unread = [k for k in leaves(get_cfg()) if k not in NOT_IMPLEMENTED and f".{k.split('.')[-1]}" not in code]
    assert not unread, f"keys neither read nor refused: {unread}"


@pytest.mark.usefixtures("d2_parity")
def test_model_and_loader_refuse_unimplemented_keys_set_in_code():
    from cascade_rcnn.data.loader import build_train_loader
    from cascade_rcnn.modeling import build_model

    cfg = load_config(FIXTURE)
    cfg.TEST.AUG.ENABLED = True
    with pytest.raises(ConfigError, match=r"TEST\.AUG\.ENABLED=True is not supported"):
        build_model(cfg, "cpu")
    cfg = load_config(FIXTURE)
    cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
    with pytest.raises(ConfigError, match=r"DATALOADER\.SAMPLER_TRAIN='RepeatFactorTrainingSampler'"):
        build_train_loader(cfg, [], batch_per_device=1)
