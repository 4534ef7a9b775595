"""ModelConfig: both rope layouts, round trips, shipped flavours and clear errors for bad fields."""

import json

import pytest

from dsv3.model import ConfigError, ModelConfig


@pytest.mark.parametrize("flavour", ["debug", "16b", "671b"])
def test_flavour_round_trips_through_hf_dict(flavour: str) -> None:
    config = ModelConfig.flavour(flavour)
    assert ModelConfig.from_hf_config(config.to_hf_config()) == config


def test_671b_matches_release_hyperparameters() -> None:
    c = ModelConfig.flavour("671b")
    assert (c.hidden_size, c.num_hidden_layers, c.n_routed_experts, c.num_experts_per_tok) == (
        7168,
        61,
        256,
        8,
    )
    assert (c.n_group, c.topk_group, c.kv_lora_rank, c.q_lora_rank) == (8, 4, 512, 1536)
    assert (
        c.rope.rope_type == "yarn" and c.rope.factor == 40 and c.rope.original_max_position_embeddings == 4096
    )
    # softmax scale = 192^-0.5 * (0.1 * 1 * ln 40 + 1)^2
    assert c.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 3.6888794541139363 + 1) ** 2)


def test_rope_parameters_block_and_legacy_layout_agree() -> None:
    legacy = ModelConfig.flavour("debug").to_hf_config()
    scaling = legacy.pop("rope_scaling")
    theta = legacy.pop("rope_theta")
    newer = dict(
        legacy,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": theta,
            **{k: v for k, v in scaling.items() if k != "type"},
        },
    )
    assert ModelConfig.from_hf_config(newer) == ModelConfig.flavour("debug")


def test_missing_rope_scaling_means_plain_rope() -> None:
    raw = ModelConfig.flavour("debug").to_hf_config()
    raw["rope_scaling"] = None
    config = ModelConfig.from_hf_config(raw)
    assert config.rope.rope_type == "default"
    assert config.softmax_scale == pytest.approx(config.qk_head_dim**-0.5)


def test_reads_a_config_file_and_a_directory(tmp_path) -> None:
    config = ModelConfig.flavour("debug")
    config.save(tmp_path)
    assert ModelConfig.from_hf_config(tmp_path) == config
    assert ModelConfig.from_hf_config(tmp_path / "config.json") == config


def test_transformers_reads_our_config() -> None:
    transformers = pytest.importorskip("transformers")
    ours = ModelConfig.flavour("debug")
    theirs = transformers.DeepseekV3Config(**ours.to_hf_config())
    assert theirs.rope_parameters["rope_type"] == "yarn"
    assert theirs.rope_parameters["factor"] == ours.rope.factor
    assert theirs.n_group == ours.n_group and theirs.num_nextn_predict_layers == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"topk_group": 5}, "topk_group"),
        ({"n_routed_experts": 18}, "n_routed_experts"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_size": -4}, "hidden_size"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"first_k_dense_replace": 9}, "first_k_dense_replace"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type"),
        ({"rope_scaling": {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}}, "factor"),
        ({"rope_theta": "big"}, "rope_theta"),
        ({"n_experts": 4}, "n_experts"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ],
)
def test_bad_config_names_the_field(change: dict, field: str) -> None:
    raw = ModelConfig.flavour("debug").to_hf_config() | change
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_config(raw)


def test_bad_files_raise_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_hf_config(tmp_path / "absent.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf_config(bad)
    with pytest.raises(ConfigError, match="unknown model flavour"):
        ModelConfig.flavour("huge")


def test_saved_config_is_plain_json(tmp_path) -> None:
    path = ModelConfig.flavour("671b").save(tmp_path)
    raw = json.loads(path.read_text())
    assert raw["model_type"] == "deepseek_v3" and raw["rope_scaling"]["type"] == "yarn"
    assert raw["num_key_value_heads"] == raw["num_attention_heads"] == 128
