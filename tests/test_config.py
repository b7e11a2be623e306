"""Typed config loading (marscale/core/config.py) and the training config tree (engine/config.py)."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Optional

import pytest
import yaml

from marscale.core.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    parse_yaml,
    read_config_file,
    save_config,
    to_dict,
)
from marscale.engine.config import TrainConfig, load_train_config, presets, validate
from marscale.engine.plan import make_plan
from marscale.data.shards import Manifest, ShardInfo, ShardSet, save_manifest

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
PRESETS = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")) if not os.path.basename(p).startswith("_"))
BASES = sorted(glob.glob(os.path.join(CONFIG_DIR, "_*.yaml")))


# A small schema of its own, so the loader is tested apart from the training tree.
@dataclasses.dataclass
class Inner:
    lr: float = 0.1
    steps: int = 3
    tags: tuple[str, ...] = ()
    pair: tuple[int, float] = (1, 2.0)


@dataclasses.dataclass
class Outer:
    name: str
    inner: Inner = dataclasses.field(default_factory=Inner)
    flag: bool = False
    maybe: Optional[int] = None
    either: float | None = None
    items: list[int] = dataclasses.field(default_factory=list)
    anything: tuple = (1, 2)

    def __post_init__(self):
        if self.name == "bad":
            raise ValueError("name must not be 'bad'")


def minimal_train_dict() -> dict:
    return {
        "clip": {"img_size": 64},
        "model": {"num_classes": 10, "variant": "vit_tiny"},
        "data": {"train_shards": "a", "val_shards": "b", "short_side": 64},
        "optim": {"lr": 1e-3, "epochs": 2},
    }


def write_yaml(path, data) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return str(path)


# ---------------------------------------------------------------------------------------
# generic loader


def test_from_dict_builds_nested_and_converts_types():
    cfg = from_dict(
        Outer,
        {
            "name": "x",
            "inner": {"lr": 1, "tags": ["a", "b"], "pair": [3, 4]},
            "maybe": 5,
            "either": 2,
            "items": [1, 2],
            "anything": [7, "z"],
        },
    )
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)  # int accepted for float
    assert cfg.inner.tags == ("a", "b")
    assert cfg.inner.pair == (3, 4.0) and isinstance(cfg.inner.pair[1], float)
    assert cfg.maybe == 5 and cfg.either == 2.0 and isinstance(cfg.either, float)
    assert cfg.items == [1, 2]
    assert cfg.anything == (7, "z")
    assert cfg.inner.steps == 3 and cfg.flag is False


def test_unknown_key_names_full_path_and_nearest():
    with pytest.raises(ConfigError, match=re.escape("unknown key 'inner.lrr' (did you mean 'inner.lr'?)")):
        from_dict(Outer, {"name": "x", "inner": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match=re.escape("unknown key 'optim.lrr' (did you mean 'optim.lr'?)")):
        from_dict(TrainConfig, {**minimal_train_dict(), "optim": {"lrr": 1e-3, "lr": 1e-3, "epochs": 1}})
    # Nothing close: the valid keys are listed instead.
    with pytest.raises(ConfigError, match=r"unknown key 'inner.zzzz' \(valid keys of 'inner': lr, steps, tags, pair\)"):
        from_dict(Outer, {"name": "x", "inner": {"zzzz": 1}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"steps": "3"}}, "'inner.steps' expects int, got '3' (str)"),
        ({"inner": {"steps": 2.5}}, "'inner.steps' expects int, got 2.5 (float)"),
        ({"inner": {"lr": "fast"}}, "'inner.lr' expects float, got 'fast' (str)"),
        ({"inner": {"lr": True}}, "'inner.lr' expects float, got True (bool)"),
        ({"flag": 1}, "'flag' expects bool, got 1 (int)"),
        ({"maybe": "x"}, "'maybe' expects int | None, got 'x' (str)"),
        ({"inner": {"tags": "a"}}, "'inner.tags' expects tuple[str, ...], got 'a' (str)"),
        ({"inner": {"tags": ["a", 2]}}, "'inner.tags[1]' expects str, got 2 (int)"),
        ({"inner": {"pair": [1]}}, "'inner.pair' expects 2 values (tuple[int, float]), got [1]"),
        ({"items": [1, "2"]}, "'items[1]' expects int, got '2' (str)"),
        ({"inner": 3}, "'inner' must be a mapping"),
    ],
)
def test_wrong_types_name_key_type_and_value(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(Outer, {"name": "x", **data})


def test_integral_float_accepted_for_int():
    assert from_dict(Outer, {"name": "x", "inner": {"steps": 5e8}}).inner.steps == 500_000_000


def test_missing_required_keys_are_named():
    with pytest.raises(ConfigError, match=re.escape("missing required key 'name'")):
        from_dict(Outer, {})
    with pytest.raises(ConfigError, match=re.escape("missing required keys 'data.train_shards', 'data.val_shards'")):
        from_dict(TrainConfig, {**minimal_train_dict(), "data": {}})
    with pytest.raises(ConfigError, match=re.escape("missing required key 'model'")):
        from_dict(TrainConfig, {k: v for k, v in minimal_train_dict().items() if k != "model"})


def test_post_init_errors_carry_the_path():
    with pytest.raises(ConfigError, match=re.escape("name must not be 'bad'")):
        from_dict(Outer, {"name": "bad"})
    d = minimal_train_dict()
    d["model"]["num_classes"] = 0
    with pytest.raises(ConfigError, match=re.escape("model: model.num_classes must be >= 1")):
        from_dict(TrainConfig, d)
    d = minimal_train_dict()
    d["model"]["arch"] = "resnet"  # a choice: checked against the Literal type, with the path
    with pytest.raises(ConfigError, match=re.escape("'model.arch' expects 'mar' | 'vit', got 'resnet'")):
        from_dict(TrainConfig, d)
    d = minimal_train_dict()
    d["optim"]["layer_decay"] = 1.5
    with pytest.raises(ConfigError, match=re.escape("optim: optim.layer_decay must be in (0, 1]")):
        from_dict(TrainConfig, d)


def test_yaml_reads_scientific_notation_as_float():
    assert parse_yaml("1e-4") == 1e-4
    assert parse_yaml("5e8") == 5e8
    assert parse_yaml("-2.5E-3") == -2.5e-3
    assert parse_yaml("1.0e-6") == 1e-6
    assert parse_yaml("12") == 12 and isinstance(parse_yaml("12"), int)
    assert parse_yaml("abc1e4") == "abc1e4"


def test_overrides_are_parsed_as_yaml():
    raw = {"name": "x", "inner": {"lr": 0.1}}
    out = apply_overrides(
        raw,
        ["inner.lr=1e-4", "flag=true", "inner.tags=[a, b]", "maybe=null", "items=[1,2]", "name=2024"],
        Outer,
    )
    assert raw == {"name": "x", "inner": {"lr": 0.1}}  # input untouched
    cfg = from_dict(Outer, out)
    assert cfg.inner.lr == 1e-4 and cfg.flag is True and cfg.inner.tags == ("a", "b")
    assert cfg.maybe is None and cfg.items == [1, 2]
    assert cfg.name == "2024"  # a str field keeps the text


def test_bad_overrides_give_clear_errors():
    message = "--set inner.lrr=1: unknown key 'inner.lrr' (did you mean 'inner.lr'?)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides({}, ["inner.lrr=1"], Outer)
    with pytest.raises(ConfigError, match="must look like key.subkey=value"):
        apply_overrides({}, ["inner.lr"], Outer)
    with pytest.raises(ConfigError, match=re.escape("'inner.steps' expects int, got 'many' (str)")):
        from_dict(Outer, apply_overrides({"name": "x"}, ["inner.steps=many"], Outer))
    with pytest.raises(ConfigError, match="'name' is a value, not a section"):
        apply_overrides({"name": "x"}, ["name.first=y"])


def test_load_config_with_defaults_and_overrides(tmp_path):
    write_yaml(tmp_path / "base.yaml", {"name": "base", "inner": {"lr": 0.5, "steps": 7}, "flag": True})
    write_yaml(tmp_path / "child.yaml", {"defaults": "base.yaml", "name": "child", "inner": {"lr": 0.25}})
    cfg = load_config(Outer, tmp_path / "child.yaml", ["inner.steps=9"])
    assert cfg.name == "child" and cfg.flag is True
    assert cfg.inner.lr == 0.25  # the file's own value wins
    assert cfg.inner.steps == 9  # the override wins over both
    # Defaults chains are refused (one level only).
    write_yaml(tmp_path / "grand.yaml", {"defaults": "child.yaml"})
    with pytest.raises(ConfigError, match="one level of inheritance"):
        read_config_file(tmp_path / "grand.yaml")
    with pytest.raises(ConfigError, match="not found"):
        read_config_file(write_yaml(tmp_path / "orphan.yaml", {"defaults": "nope.yaml"}))
    # Errors name the file.
    write_yaml(tmp_path / "typo.yaml", {"name": "x", "inner": {"step": 1}})
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown key 'inner.step' \(did you mean 'inner.steps'\?\)"):
        load_config(Outer, tmp_path / "typo.yaml")


def test_save_load_round_trip(tmp_path):
    cfg = load_train_config(os.path.join(CONFIG_DIR, "mar_vit_b_k400.yaml"), ["optim.clip_grad=3.0"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary left behind
    again = load_train_config(path)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    # Sections in field order, tuples written as lists.
    saved = yaml.safe_load(path.read_text())
    assert list(saved) == ["clip", "model", "masking", "data", "optim", "deepspeed", "checkpoint", "logging", "run"]
    assert saved["optim"]["betas"] == [0.9, 0.999]


# ---------------------------------------------------------------------------------------
# presets and the training tree


def test_presets_exist():
    names = {os.path.basename(p) for p in PRESETS}
    for expected in (
        "demo.yaml",
        "mar_vit_b_k400.yaml",
        "mar_vit_l_k400.yaml",
        "mar_vit_b_ssv2.yaml",
        "mar_vit_l_ssv2.yaml",
        "mar_vit_h_k400.yaml",
        "vit_b_k400.yaml",
        "vit_l_k400.yaml",
        "vit_h_k400.yaml",
    ):
        assert expected in names


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_every_preset_loads_and_validates(path):
    cfg = load_train_config(path)
    validate(cfg)
    assert cfg.run.name == os.path.splitext(os.path.basename(path))[0]
    assert cfg.clip.num_frames == 16 and cfg.clip.img_size in (64, 224)  # one clip section for every component
    if cfg.model.arch == "vit":
        assert cfg.masking.kind == "none"


def test_bases_are_used():
    used = set()
    for path in PRESETS:
        with open(path) as f:
            used.add((yaml.safe_load(f) or {}).get("defaults"))
    for base in BASES:
        assert os.path.basename(base) in used


def test_recipe_values():
    b = load_train_config(os.path.join(CONFIG_DIR, "mar_vit_b_k400.yaml"))
    assert (b.optim.lr, b.optim.layer_decay, b.optim.epochs, b.model.drop_path) == (1e-3, 0.65, 100, 0.1)
    assert (b.data.batch_size, b.data.clips_per_video, b.clip.sampling, b.data.flip) == (16, 2, "dense", True)
    assert b.optim.recon_weight == 0.01 and b.deepspeed.zero_stage == 2 and b.deepspeed.precision == "bf16"
    assert (b.data.mixup, b.data.cutmix, b.data.label_smoothing, b.data.random_erasing) == (0.8, 1.0, 0.1, 0.25)
    assert b.data.rand_augment == "rand-m9-mstd0.5-inc1"
    assert (b.optim.warmup_epochs, b.optim.warmup_lr, b.optim.min_lr, b.optim.weight_decay) == (5.0, 1e-6, 1e-6, 0.05)
    ls = load_train_config(os.path.join(CONFIG_DIR, "mar_vit_l_ssv2.yaml"))
    assert (ls.optim.lr, ls.optim.layer_decay, ls.optim.epochs, ls.model.drop_path) == (2.5e-4, 0.75, 40, 0.2)
    # SSv2 flips with the left/right classes swapped (the reference recipe: tests/test_recipe.py).
    assert (ls.clip.sampling, ls.data.flip, ls.optim.recon_weight, ls.model.num_classes) == (
        "segment",
        True,
        0.1,
        174,
    )
    assert ls.data.flip_label_pairs == ((86, 87), (93, 94), (166, 167))
    demo = load_train_config(os.path.join(CONFIG_DIR, "demo.yaml"))
    assert demo.model.variant == "vit_tiny" and demo.model.num_classes == 4 and demo.clip.sampling == "segment"
    assert demo.clip.segment_rule == "marscale" and ls.clip.segment_rule == "reference"
    assert demo.data.train_shards == "runs/demo/data/shards/train"
    assert demo.data.val_shards == "runs/demo/data/shards/val"
    assert (demo.data.test_num_clips, demo.data.test_num_crops) == (1, 1)
    assert demo.data.rand_augment == "" and demo.data.mixup == 0 and demo.data.cutmix == 0
    assert demo.data.random_erasing == 0 and not demo.data.flip


def test_preset_override():
    cfg = load_train_config(
        os.path.join(CONFIG_DIR, "demo.yaml"), ["optim.lr=3e-4", "deepspeed.zero_stage=0", "masking.ratio=0.75"]
    )
    assert cfg.optim.lr == 3e-4 and cfg.deepspeed.zero_stage == 0 and cfg.masking.ratio == 0.75
    with pytest.raises(ConfigError, match=re.escape("unknown key 'optim.lrr' (did you mean 'optim.lr'?)")):
        load_train_config(os.path.join(CONFIG_DIR, "demo.yaml"), ["optim.lrr=1e-4"])
    with pytest.raises(ConfigError, match=re.escape("'deepspeed.zero_stage' expects 0 | 1 | 2 | 3, got 'two' (str)")):
        load_train_config(os.path.join(CONFIG_DIR, "demo.yaml"), ["deepspeed.zero_stage=two"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        # The clip shape and pixel statistics have one home: old keys name the new one.
        (["data.num_frames=8"], "'data.num_frames' has moved: set 'clip.num_frames' instead"),
        (["model.img_size=32"], "'model.img_size' has moved: set 'clip.img_size' instead"),
        (["data.mean=[0.5,0.5,0.5]"], "'data.mean' has moved: set 'clip.mean' instead"),
        (["model.pixel_std=[0.5,0.5,0.5]"], "'model.pixel_std' has moved: set 'clip.std' instead"),
        (["model.decoder=false"],
         "'model.decoder' is a section now, not a value: set 'model.decoder.enabled: false' instead"),
        (["model.decoder.depth=0"], "decoder.depth must be >= 1"),
        (["model.decoder.num_heads=5"], "width 96 is not divisible by 5 heads; set model.decoder.num_heads"),
        (["model.bridge.init=kaiming"], "'model.bridge.init' expects 'xavier' | 'trunc_normal', got 'kaiming'"),
        (["clip.img_size=96"], "data.short_side=64 < clip.img_size=96"),
        (["clip.img_size=40", "data.short_side=40"], "clip.img_size 40 is not a multiple of the encoder's patch size 16"),
        (["clip.num_frames=5"], "clip.num_frames 5 is not a multiple of clip.tubelet_size 2"),
        (["clip.sampling=uniform"], "'clip.sampling' expects 'dense' | 'segment', got 'uniform'"),
        (["clip.segment_rule=linspace"], "'clip.segment_rule' expects 'marscale' | 'reference', got 'linspace'"),
        (["model.arch=vit"], "model.arch=vit is the full-token baseline but masking.kind='cell_running'"),
        (["masking.cell=[4,4]", "masking.ratio=0.25", "clip.img_size=96", "data.short_side=96"],
         "masking.cell=[4, 4] does not tile the 6x6 token grid"),
        (["run.device=cpu", "deepspeed.precision=fp16"], "fp16 is not supported on CPU"),
        (["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"], "offload_optimizer needs ZeRO"),
        (["deepspeed.precision=fp8"], "'deepspeed.precision' expects 'bf16' | 'fp16' | 'fp32', got 'fp8'"),
        (["optim.min_lr=1.0"], "optim.min_lr must be in [0, optim.lr=0.001]"),
        (["run.max_steps=0"], "run.max_steps must be >= 1"),
        (["run.collective_timeout_s=0"], "run.collective_timeout_s must be > 0 seconds"),
        # Resuming on another world size converts the checkpoint itself: the switch is gone.
        (["checkpoint.load_universal=true"],
         "'checkpoint.load_universal' is no longer a setting: a checkpoint resumed on another number of ranks"),
    ],
)
def test_cross_section_checks(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(os.path.join(CONFIG_DIR, "demo.yaml"), overrides)


def test_old_clip_keys_in_a_file_name_the_new_key(tmp_path):
    d = minimal_train_dict()
    d["data"]["num_frames"] = 8
    with pytest.raises(ConfigError, match=re.escape("'data.num_frames' has moved: set 'clip.num_frames' instead")):
        load_train_config(write_yaml(tmp_path / "old.yaml", d))


def test_decoder_section_replaces_the_old_bool(tmp_path):
    """`model.decoder` was a bool; a file that still says `decoder: true` is told the field."""
    from marscale.model.config import DecoderSpec

    d = minimal_train_dict()
    d["model"]["decoder"] = True
    message = "'model.decoder' is a section now, not a value: set 'model.decoder.enabled: true' instead"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(write_yaml(tmp_path / "old.yaml", d))
    d["model"]["decoder"] = {"depth": 3, "embed_dim": 64, "num_heads": 4}
    cfg = load_train_config(write_yaml(tmp_path / "new.yaml", d))
    assert cfg.model.decoder.enabled and cfg.model.decoder_spec == DecoderSpec(64, 3, 4)
    # A section's own errors and the generic "must be a mapping" message stay as they were.
    typo = "unknown key 'model.decoder.width' (did you mean 'model.decoder.depth'?)"
    with pytest.raises(ConfigError, match=re.escape(typo)):
        load_train_config(write_yaml(tmp_path / "typo.yaml", {**d, "model": {**d["model"], "decoder": {"width": 3}}}))
    with pytest.raises(ConfigError, match=re.escape("'model.bridge' must be a mapping of keys to values")):
        load_train_config(write_yaml(tmp_path / "b.yaml", {**d, "model": {**d["model"], "bridge": True}}))
    for name in ("vit_b_k400", "vit_l_k400", "vit_h_k400"):
        assert not load_train_config(os.path.join(CONFIG_DIR, f"{name}.yaml")).model.decoder.enabled
    h = load_train_config(os.path.join(CONFIG_DIR, "mar_vit_h_k400.yaml")).model
    assert h.decoder.enabled and h.decoder_spec == DecoderSpec(640, 12, 8) and not h.pretrained_partial


def test_choices_are_checked_when_built_in_python_too():
    from marscale.data.config import DataConfig
    from marscale.tokens.masking import MaskingConfig

    with pytest.raises(ValueError, match=r"decoder='ffmpeg': use one of 'auto', 'decord', 'pyav', 'torchcodec'"):
        DataConfig(train_shards="a", val_shards="b", decoder="ffmpeg")
    with pytest.raises(ValueError, match="kind='blocks'"):
        MaskingConfig(kind="blocks")


def test_presets_by_name():
    assert {"demo", "mar_vit_l_k400", "vit_h_k400"} <= set(presets())
    assert load_train_config("demo") == load_train_config(os.path.join(CONFIG_DIR, "demo.yaml"))
    assert load_train_config("mar_vit_b_k400.yaml").model.variant == "vit_b"
    with pytest.raises(FileNotFoundError, match="neither a file nor a preset"):
        load_train_config("mar_vit_z")


def test_vit_with_no_masking_and_mar_without_masking_are_allowed(caplog):
    cfg = load_train_config(os.path.join(CONFIG_DIR, "demo.yaml"), ["model.arch=vit", "masking.kind=none"])
    assert cfg.model.arch == "vit"
    with caplog.at_level("WARNING"):
        load_train_config(os.path.join(CONFIG_DIR, "demo.yaml"), ["masking.kind=none"])
    assert "no reconstruction loss" in caplog.text


def test_output_dir_defaults_to_runs_name():
    d = minimal_train_dict()
    d["run"] = {"name": "exp1"}
    assert from_dict(TrainConfig, d).run.output_dir == os.path.join("runs", "exp1")
    d["run"] = {"name": "exp1", "output_dir": "/somewhere"}
    assert from_dict(TrainConfig, d).run.output_dir == "/somewhere"


# ---------------------------------------------------------------------------------------
# derived values


def train_cfg(**sections) -> TrainConfig:
    d = minimal_train_dict()
    for name, values in sections.items():
        d[name] = {**d.get(name, {}), **values}
    return from_dict(TrainConfig, d)


def shard_set(videos: int, root: str = "train") -> ShardSet:
    return ShardSet(root, (f"{root}/{root}-000000.tar",), (videos,), ("a",))


def test_derived_steps_from_samples_per_epoch():
    cfg = train_cfg(
        data={"batch_size": 8, "clips_per_video": 2, "samples_per_epoch": 1000},
        deepspeed={"grad_accum_steps": 2},
        optim={"epochs": 3, "warmup_epochs": 0.5},
    )
    plan = make_plan(cfg, 4, shard_set(5000), shard_set(10, "val"))
    assert (plan.clips_per_step, plan.videos_per_step, plan.videos_per_epoch) == (64, 32, 1000)
    # 1000 videos x 2 clips / 64 clips per step = 31.25 -> 31 steps
    assert plan.steps_per_epoch == 31
    assert plan.batches_per_epoch == 62  # loader batches per rank: 31 steps x 2 accumulation
    assert plan.total_steps == 93
    assert plan.warmup_steps == 16  # 15.5 rounds to 16
    assert make_plan(cfg, 1, shard_set(5000), shard_set(10, "val")).steps_per_epoch == 125
    # max_steps replaces epochs x steps; warm-up never exceeds the run
    capped = train_cfg(
        data={"samples_per_epoch": 1000}, optim={"epochs": 3, "warmup_epochs": 5.0}, run={"max_steps": 40}
    )
    capped_plan = make_plan(capped, 1, shard_set(5000), shard_set(10, "val"))
    assert capped_plan.total_steps == 40
    assert capped_plan.warmup_steps == 40
    no_warmup = train_cfg(data={"samples_per_epoch": 1000}, optim={"epochs": 1, "warmup_epochs": 0.0})
    assert make_plan(no_warmup, 1, shard_set(5000), shard_set(10, "val")).warmup_steps == 0


def test_plan_tokens_and_flops_come_from_the_clip_and_the_counted_model():
    from marscale.cost.counting import count_model

    cfg = train_cfg(data={"samples_per_epoch": 100})  # vit_tiny, 16 x 64 x 64 clips, 50% masked
    plan = make_plan(cfg, 1, shard_set(100), shard_set(10, "val"))
    assert plan.token_grid == (8, 4, 4) and plan.tokens_per_clip == 128
    assert (plan.visible_tokens_train, plan.visible_tokens_eval) == (64, 64)
    count = count_model(cfg.model, cfg.clip, 0.5)
    assert plan.flops_per_clip_train == 2 * count.macs_training and plan.macs_per_view_eval == count.macs_inference
    assert "128 (8x4x4), visible 64 in training" in plan.summary()


def test_steps_per_epoch_from_manifest(tmp_path):
    shards = [ShardInfo(f"train-{i:06d}.tar", n, 1, "0" * 64, {"0": n}) for i, n in enumerate((40, 40, 20))]
    save_manifest(str(tmp_path), Manifest("train", ["a"], shards, [], {}))
    cfg = train_cfg(data={"train_shards": str(tmp_path), "batch_size": 4, "clips_per_video": 2})
    assert cfg.data.samples_per_epoch is None
    # 100 videos, 2 clips each, 4 clips per rank x 2 ranks -> 25 steps
    plan = make_plan(cfg, 2, val_set=shard_set(10, "val"))
    assert plan.train_set.num_videos == 100 and plan.train_set.shard_videos == (40, 40, 20)
    assert plan.steps_per_epoch == 25
    assert plan.total_steps == 2 * 25


def test_loader_batches_per_rank_from_the_plan():
    # 16 videos, batches of 4 clips = 2 videos: 8 batches on one rank, 4 on each of two.
    cfg = train_cfg(data={"batch_size": 4, "clips_per_video": 2})
    assert make_plan(cfg, 1, shard_set(16), shard_set(4, "val")).batches_per_epoch == 8
    assert make_plan(cfg, 2, shard_set(16), shard_set(4, "val")).batches_per_epoch == 4
    one_clip = train_cfg(data={"batch_size": 4, "clips_per_video": 1, "samples_per_epoch": 100})
    assert make_plan(one_clip, 3, shard_set(16), shard_set(4, "val")).batches_per_epoch == 8
    with pytest.raises(ValueError, match="less than one optimizer step"):
        make_plan(cfg, 16, shard_set(16), shard_set(4, "val"))


def test_epoch_smaller_than_a_step_is_an_error():
    cfg = train_cfg(data={"batch_size": 8, "samples_per_epoch": 10})
    with pytest.raises(ValueError, match="less than one optimizer step"):
        make_plan(cfg, 4, shard_set(100), shard_set(10, "val"))


def test_more_classes_in_the_shards_than_the_model_is_an_error():
    cfg = train_cfg(data={"samples_per_epoch": 100})
    many = ShardSet("train", ("t.tar",), (100,), tuple(str(i) for i in range(12)))
    with pytest.raises(ValueError, match="has 12 classes but model.num_classes is 10"):
        make_plan(cfg, 1, many, shard_set(10, "val"))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    from marscale.cli import main

    monkeypatch.delenv("MARSCALE_TRACEBACK", raising=False)
    demo = os.path.join(CONFIG_DIR, "demo.yaml")
    assert main(["train", "--config", demo, "--set", "optim.lrr=1e-4"]) == 78
    err = capsys.readouterr().err.strip()
    assert err == "marscale train: error: --set optim.lrr=1e-4: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--config", demo]) == 78
    assert "missing.pt" in capsys.readouterr().err

    monkeypatch.setenv("MARSCALE_TRACEBACK", "1")
    with pytest.raises(ConfigError, match="optim.lrr"):
        main(["train", "--config", demo, "--set", "optim.lrr=1e-4"])


def test_eval_refuses_a_checkpoint_without_a_trained_classifier(tmp_path, capsys, monkeypatch):
    """A VideoMAE pre-training checkpoint has no classifier: `marscale eval` would score
    random weights, so it stops and says so (before starting a process group)."""
    from test_checkpoint import save, videomae_pretrain_layout

    from marscale.cli import main
    from marscale.model import build_model

    monkeypatch.delenv("MARSCALE_TRACEBACK", raising=False)
    demo = os.path.join(CONFIG_DIR, "demo.yaml")
    cfg = load_train_config(demo)
    path = save(tmp_path, videomae_pretrain_layout(build_model(cfg.model, cfg.clip)), "pretrain.pth")
    assert main(["eval", "--checkpoint", path, "--config", demo]) == 78
    err = capsys.readouterr().err
    assert "has no trained classifier for this model" in err and "classifier." in err and "fine-tuned checkpoint" in err


def test_a_stored_config_with_a_retired_key_still_loads():
    """A run saved before `checkpoint.load_universal` was retired must still evaluate: the
    key is dropped from stored configs (a file a user writes still gets the error)."""
    from marscale.core.config import drop_retired, from_dict, to_dict
    from marscale.engine.config import TrainConfig, load_train_config

    stored = to_dict(load_train_config(os.path.join(CONFIG_DIR, "demo.yaml")))
    stored["checkpoint"]["load_universal"] = False
    with pytest.raises(ConfigError, match="no longer a setting"):
        from_dict(TrainConfig, stored)
    cleaned, dropped = drop_retired(TrainConfig, stored)
    assert dropped == ["checkpoint.load_universal"] and "load_universal" in stored["checkpoint"]
    assert to_dict(from_dict(TrainConfig, cleaned)) == to_dict(load_train_config(os.path.join(CONFIG_DIR, "demo.yaml")))


def test_a_ratio_that_masks_part_of_a_unit_is_refused_when_the_config_is_read():
    tiny = {"clip": {"img_size": 32, "num_frames": 4}, "data": {"short_side": 32}}  # 2x2x2: 8 tokens
    with pytest.raises((ConfigError, ValueError), match=re.escape("0.3 masks 2.4 of the 8 tokens")) as e:
        train_cfg(**tiny, masking={"kind": "random", "ratio": 0.3})
    assert "use 0.25 (2) or 0.375 (3)" in str(e.value)
    assert train_cfg(**tiny, masking={"kind": "random", "ratio": 0.25}).masking.visible((2, 2, 2), 0.25) == 6
    with pytest.raises((ConfigError, ValueError), match=r"masking.ratio 0.3 masks 2.4"):
        train_cfg(**tiny, masking={"kind": "random", "ratio": [0.25, 0.3], "eval_ratio": 0.5})
    with pytest.raises((ConfigError, ValueError), match=r"masking.eval_ratio 0.6 masks 4.8"):
        train_cfg(**tiny, masking={"kind": "random", "ratio": [0.25, 0.5], "eval_ratio": 0.6})
    # tube masking counts spatial positions: VideoMAE's 0.9 of 14 x 14 is 176.4 of them
    with pytest.raises((ConfigError, ValueError), match=re.escape("176.4 of the 196 spatial positions")) as e:
        train_cfg(clip={"img_size": 224}, data={"short_side": 224}, masking={"kind": "tube", "ratio": 0.9})
    assert "use 0.897959 (176) or 0.903061 (177)" in str(e.value)
