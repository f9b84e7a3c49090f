"""The config schema: every shipped config validates, every class of mistake names its key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig

from llama_adapter_v2.config import ConfigError, load_config, resolved_clip_arch, resolved_llama_arch
from llama_adapter_v2.config.layer_plan import LayerPlan, plan_layers
from llama_adapter_v2.config.schema import AdapterConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def demo_raw() -> dict:
    return yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())


def error_keys(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert str(path) in str(info.value)
    return [key for key, _ in info.value.problems]


def test_shipped_configs_are_the_expected_ones() -> None:
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "llama2-7b.yaml", "llama3-8b.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.training.output_dir.is_absolute()


def test_paper_and_gqa_configs_have_their_shapes() -> None:
    llama2 = load_config(REPO / "configs" / "llama2-7b.yaml")
    llama3 = load_config(REPO / "configs" / "llama3-8b.yaml")
    assert resolved_llama_arch(llama2).kv_heads == 32
    assert resolved_llama_arch(llama3).kv_heads == 8
    assert llama2.model.adapter.resolved_prompt_layers(32) == 30
    assert llama2.training.visual.base_lr == 1e-4 and llama2.training.language.base_lr == 1e-3


def test_unknown_key_is_named(tmp_path: Path, demo_raw: dict) -> None:
    demo_raw["training"]["stesp"] = 3
    assert error_keys(write(tmp_path, demo_raw)) == ["training.stesp"]


def test_wrong_type_is_named(tmp_path: Path, demo_raw: dict) -> None:
    demo_raw["training"]["batch_size"] = "eight"
    assert error_keys(write(tmp_path, demo_raw)) == ["training.batch_size"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("training.steps=0", "training.steps"),
        ("training.caption_ratio=1.5", "training.caption_ratio"),
        ("model.adapter.scale_position=both", "model.adapter.scale_position"),
        ("model.adapter.bias_targets=[q_proj,q_proj]", "model.adapter.bias_targets"),
        ("model.base.arch.num_attention_heads=5", "model.base.arch"),
        ("data.validation.max_failure_fraction=-0.1", "data.validation.max_failure_fraction"),
        ("training.precision=fp16", "training.precision"),
        ("model.base.quantize=fp4", "model.base.quantize"),
    ],
)
def test_impossible_value_is_named(tmp_path: Path, demo_raw: dict, override: str, key: str) -> None:
    assert key in error_keys(write(tmp_path, demo_raw), (override,))


@pytest.mark.parametrize(
    "overrides",
    [("training.trainable=all",), ("training.device=cuda", "training.precision=fp16")],
    ids=["trainable-all", "fp16"],
)
def test_fsdp_refuses_what_it_cannot_shard_before_any_tensor(
    tmp_path: Path, demo_raw: dict, overrides: tuple[str, ...]
) -> None:
    path = write(tmp_path, demo_raw)
    assert load_config(path, overrides).training.distributed.strategy == "ddp"  # fine under DDP
    assert error_keys(path, ("training.distributed.strategy=fsdp", *overrides)) == [
        "training.distributed.strategy"
    ]


def test_a_quantised_base_trains_under_ddp_not_fsdp(tmp_path: Path, demo_raw: dict) -> None:
    path = write(tmp_path, demo_raw)
    assert load_config(path, ("model.base.quantize=nf4",)).model.base.quantize == "nf4"
    assert load_config(path).model.base.quantize == "none"  # the default: today's full-precision base
    overrides = ("model.base.quantize=int8", "training.distributed.strategy=fsdp")
    assert error_keys(path, overrides) == ["model.base.quantize"]


def test_config_check_refuses_a_bad_quantize_value_by_name_before_torch() -> None:
    code = (
        "import sys\nfrom llama_adapter_v2.cli.main import app\n"
        "try:\n    app(['config', 'check', 'configs/demo.yaml', '--set', 'model.base.quantize=nf2'])\n"
        "except SystemExit as end:\n    code = end.code\n"
        "sys.exit(3 if {'torch', 'transformers'} & set(sys.modules) else code)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                            cwd=REPO)
    assert result.returncode not in (0, 3), result.stdout + result.stderr
    assert "model.base.quantize" in result.stdout + result.stderr


def test_prompt_layers_overlapping_visual_layers(tmp_path: Path, demo_raw: dict) -> None:
    keys = error_keys(write(tmp_path, demo_raw), ("model.adapter.prompt_layers=4",))
    assert keys == ["model.adapter.visual_layers"]


def test_additive_fusion_may_share_layers(tmp_path: Path, demo_raw: dict) -> None:
    cfg = load_config(
        write(tmp_path, demo_raw), ("model.adapter.prompt_layers=4", "model.adapter.visual_fusion=additive")
    )
    assert cfg.model.adapter.prompt_layers == 4


def test_more_layers_than_the_model_has(tmp_path: Path, demo_raw: dict) -> None:
    keys = error_keys(write(tmp_path, demo_raw), ("model.adapter.prompt_layers=9",))
    assert "model.adapter.prompt_layers" in keys
    overrides = ("model.adapter.visual_layers=5", "model.adapter.prompt_len=0")
    keys = error_keys(write(tmp_path, demo_raw), overrides)
    assert keys == ["model.adapter.visual_layers"]


def test_base_needs_a_path_or_an_arch(tmp_path: Path, demo_raw: dict) -> None:
    del demo_raw["model"]["base"]["arch"]
    assert error_keys(write(tmp_path, demo_raw)) == ["model.base.path"]
    del demo_raw["model"]["base"]["path"]
    assert error_keys(write(tmp_path, demo_raw)) == ["model.base"]


def test_local_checkpoint_shape_is_checked(tmp_path: Path, demo_raw: dict) -> None:
    folder = tmp_path / "base"
    folder.mkdir()
    arch = dict(demo_raw["model"]["base"]["arch"], model_type="llama", num_hidden_layers=6)
    (folder / "config.json").write_text(json.dumps(arch))
    demo_raw["model"]["base"]["path"] = str(folder)
    assert error_keys(write(tmp_path, demo_raw)) == ["model.base.arch.num_hidden_layers"]
    del demo_raw["model"]["base"]["arch"]
    cfg = load_config(write(tmp_path, demo_raw))
    assert resolved_llama_arch(cfg).num_hidden_layers == 6


def test_rope_theta_is_read_where_transformers_saves_it(tmp_path: Path, demo_raw: dict) -> None:
    """transformers 5 writes ``rope_parameters: {rope_theta: ...}``, not a top-level ``rope_theta``:
    read at the top level only, a Llama 3 base (500000) was taken for 10000 and its declared arch refused."""
    arch = dict(demo_raw["model"]["base"]["arch"], rope_theta=500000.0)
    LlamaConfig(**arch).save_pretrained(tmp_path / "base")
    assert "rope_theta" not in json.loads((tmp_path / "base" / "config.json").read_text())
    demo_raw["model"]["base"] |= {"path": str(tmp_path / "base"), "arch": arch}
    cfg = load_config(write(tmp_path, demo_raw))
    assert resolved_llama_arch(cfg).rope_theta == 500000.0
    demo_raw["model"]["base"]["arch"] = dict(arch, rope_theta=10000.0)
    assert error_keys(write(tmp_path, demo_raw)) == ["model.base.arch.rope_theta"]


def test_non_llama_checkpoint_is_refused(tmp_path: Path, demo_raw: dict) -> None:
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    demo_raw["model"]["base"]["path"] = str(folder)
    with pytest.raises(ConfigError, match="not a Llama-family checkpoint"):
        load_config(write(tmp_path, demo_raw))


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+"):
        load_config(path)


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\nname: b\n")
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert error_keys(path) == ["<root>"]


def test_relative_paths_resolve_against_the_project(tmp_path: Path, demo_raw: dict) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "configs").mkdir()
    cfg = load_config(write(tmp_path / "configs", demo_raw))
    assert cfg.data.work_dir == tmp_path / "artifacts" / "data"


def test_schema_imports_no_torch() -> None:
    code = (
        "import sys; from llama_adapter_v2.config import load_config; "
        f"load_config({str(REPO / 'configs' / 'llama2-7b.yaml')!r}); "
        "heavy = [m for m in ('torch', 'transformers', 'mlflow', 'prefect') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_full_clip_folder_reads_its_top_level_projection(tmp_path: Path, demo_raw: dict) -> None:
    folder = tmp_path / "clip"
    folder.mkdir()
    vision = dict(demo_raw["model"]["vision"]["arch"], projection_dim=512)
    top = {"model_type": "clip", "projection_dim": 64, "vision_config": vision}
    (folder / "config.json").write_text(json.dumps(top))
    demo_raw["model"]["vision"]["path"] = str(folder)
    cfg = load_config(write(tmp_path, demo_raw))
    assert resolved_clip_arch(cfg).projection_dim == 64


def test_layer_plan_puts_prompts_in_the_last_layers_and_visual_prompts_in_the_first() -> None:
    early = AdapterConfig(prompt_len=10, visual_layers=2)  # prompt_layers None: n_layers - 2
    assert plan_layers(early, 8) == LayerPlan(visual_layers=(0, 1), prompt_layers=(2, 3, 4, 5, 6, 7),
                                              additive=False)
    additive = AdapterConfig(prompt_len=10, prompt_layers=3, visual_fusion="additive")
    assert plan_layers(additive, 8) == LayerPlan(visual_layers=(), prompt_layers=(5, 6, 7), additive=True)
    assert plan_layers(additive, 8).uses_images
    assert not plan_layers(AdapterConfig(visual_layers=0), 8).uses_images
    assert plan_layers(AdapterConfig(prompt_len=0), 8).prompt_layers == ()


def test_additive_fusion_with_unequal_lengths_fails_at_load(tmp_path: Path, demo_raw: dict) -> None:
    overrides = ("model.adapter.visual_fusion=additive", "model.adapter.prompt_layers=2",
                 "model.adapter.visual.n_query=5")
    assert error_keys(write(tmp_path, demo_raw), overrides) == ["model.adapter.visual.n_query"]
