"""Every refusal of the surgery and loading API names what was wrong."""

import json

import pytest
import torch
from tiny_models import CASES_BY_NAME
from transformers import DistilBertConfig, DistilBertModel

import hf_collapse


@pytest.fixture(scope="module")
def bert():
    return CASES_BY_NAME["bert"].build()


def test_unknown_architecture_lists_families_and_register_hint():
    model = DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32))
    with pytest.raises(ValueError) as error:
        hf_collapse.adapter_for(model)
    message = str(error.value)
    assert "DistilBertModel" in message and "register_architecture" in message
    for family in ("bert", "swin", "llama", "unet_2d_condition"):
        assert family in message


def test_plain_module_is_refused():
    with pytest.raises(ValueError, match="does not know the architecture"):
        hf_collapse.find_blocks(torch.nn.Linear(2, 2))


def test_unknown_block_name(bert):
    with pytest.raises(ValueError, match=r"unknown block 'encoder.layer.9'.*encoder.layer.0"):
        hf_collapse.remove_blocks(bert, ["encoder.layer.9"])


def test_duplicate_block(bert):
    blocks = hf_collapse.find_blocks(bert)
    with pytest.raises(ValueError, match="more than once"):
        hf_collapse.remove_blocks(bert, [blocks[1], "encoder.layer.1"])


def test_scoring_a_block_twice_is_refused(bert):
    with pytest.raises(ValueError, match=r"named more than once: \['bert.encoder.layer.1'\]"):
        hf_collapse.score_blocks(bert, [], blocks=["encoder.layer.1", "encoder.layer.1"])


def test_tlc_site_named_twice_or_already_linearized_is_refused(bert):
    from hf_collapse.tlc import activation_sites, activation_statistics, linearize

    site = activation_sites(bert)[0]
    with pytest.raises(ValueError, match="named twice"):
        activation_sites(bert, [site.name, site.name])
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    linearized = linearize(bert, activation_statistics(bert, [batch], [site])[site.name])
    with pytest.raises(ValueError, match="already linearized"):
        activation_sites(linearized, [site.name])


def test_every_block(bert):
    with pytest.raises(ValueError, match="cannot remove all 5 blocks"):
        hf_collapse.remove_blocks(bert, hf_collapse.find_blocks(bert))


def test_empty_request(bert):
    with pytest.raises(ValueError, match="no blocks given"):
        hf_collapse.remove_blocks(bert, [])


def test_wrong_item_type(bert):
    with pytest.raises(TypeError, match="Block objects or block names"):
        hf_collapse.remove_blocks(bert, [3])


@pytest.mark.parametrize(
    "case_name,block,reason",
    [
        ("resnet_basic", "encoder.stages.1.layers.0", "changes the tensor shape"),
        ("resnet_bottleneck", "encoder.stages.0.layers.0", "changes the tensor shape"),
        ("mobilenet_v2", "layer.2", "changes the tensor shape"),
        ("unet", "down_blocks.1.resnets.0", "changes the channel count"),
        ("unet", "down_blocks.0.resnets.2", "reads a different number of channels"),
    ],
)
def test_shape_changing_block(case_name, block, reason):
    model = CASES_BY_NAME[case_name].build()
    with pytest.raises(
        ValueError, match=f"{block}' is not removable: .*{reason}"
    ):  # its name ends with the old spelling
        hf_collapse.remove_blocks(model, [block])


def _saved_collapsed(tmp_path, case="bert", blocks=("encoder.layer.1",)):
    model = hf_collapse.remove_blocks(CASES_BY_NAME[case].build(), list(blocks))
    model.save_pretrained(tmp_path)
    return tmp_path / "config.json"


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda r: r.update(format_version=7), "format_version is 7"),
        (lambda r: r.pop("edits"), "'edits' is missing"),
        (lambda r: r.update(edits=[{"op": "explode"}]), "unknown edit"),
        (
            lambda r: r.update(edits=[{"op": "remove_blocks", "blocks": "encoder.layer.1"}]),
            "needs a list of block names",
        ),
        (lambda r: r.update(model_class="transformers.SwinModel"), "foreign to this model"),
        (lambda r: r.update(model_class="os.system"), "foreign to this model"),
        (lambda r: r.update(family="swin"), "written for family 'swin'"),
        (lambda r: r.update(edits=[{"op": "remove_blocks", "blocks": ["encoder.layer.99"]}]), "cannot replay"),
    ],
)
def test_corrupted_record_is_refused(tmp_path, corrupt, message):
    config_path = _saved_collapsed(tmp_path)
    config = json.loads(config_path.read_text())
    corrupt(config["hf_collapse"])
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)


def test_record_that_is_not_a_mapping(tmp_path):
    config_path = _saved_collapsed(tmp_path)
    config = json.loads(config_path.read_text())
    config["hf_collapse"] = ["remove", "everything"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="expected a mapping"):
        hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)


def test_weights_that_do_not_match_the_record(tmp_path):
    config_path = _saved_collapsed(tmp_path)
    config = json.loads(config_path.read_text())
    config["hf_collapse"]["edits"] = [{"op": "remove_blocks", "blocks": ["encoder.layer.1", "encoder.layer.2"]}]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match the recorded structure"):
        hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)


def test_diffusers_record_mismatch(tmp_path):
    config_path = _saved_collapsed(tmp_path, "dit", ["transformer_blocks.1"])
    config = json.loads(config_path.read_text())
    config["hf_collapse"]["edits"] = []
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match the recorded structure"):
        hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path / "empty")


def test_register_architecture_refusals():
    with pytest.raises(TypeError, match="ArchitectureAdapter instance"):
        hf_collapse.register_architecture(object())

    class Nameless(hf_collapse.ArchitectureAdapter):
        model_types = ("x",)

    with pytest.raises(ValueError, match="non-empty `family`"):
        hf_collapse.register_architecture(Nameless())

    class MatchesNothing(hf_collapse.ArchitectureAdapter):
        family = "nothing"

    with pytest.raises(ValueError, match="matches nothing"):
        hf_collapse.register_architecture(MatchesNothing())

    class Duplicate(hf_collapse.ArchitectureAdapter):
        family = "bert"
        model_types = ("bert",)

    with pytest.raises(ValueError, match="already registered"):
        hf_collapse.register_architecture(Duplicate())
    with pytest.raises(ValueError, match="no family 'nope'"):
        hf_collapse.unregister_architecture("nope")


def test_one_name_validator_for_every_api(bert):
    """remove_blocks, score_blocks, collapse and select_blocks refuse the same mistakes with the same words, and accept
    a block's path under the task head as well as its name."""
    from hf_collapse.block_io import select_blocks
    from hf_collapse.names import resolve_names

    calls = [
        lambda names: hf_collapse.remove_blocks(bert, names),
        lambda names: select_blocks(bert, names),
        lambda names: hf_collapse.collapse(bert, {n: 0.0 for n in names}, num_units=1, latency_repeats=0),
    ]
    for call in calls:
        with pytest.raises(
            ValueError, match=r"unknown block 'encoder.layer.9'; the blocks of this model.*encoder.layer.0"
        ):
            call(["encoder.layer.9"])
    for call in calls[:2]:
        with pytest.raises(ValueError, match=r"block 'bert.encoder.layer.1' is named twice"):
            call(["encoder.layer.1", "bert.encoder.layer.1"])  # the same block under its two spellings
    assert [b.name for b in select_blocks(bert, ["encoder.layer.2"])] == ["bert.encoder.layer.2"]
    with pytest.raises(ValueError, match="no widgets given: name at least one of: a, b"):
        resolve_names([], {"a": 1, "b": 2}, "widget")
    with pytest.raises(TypeError, match="widget names must be strings"):
        resolve_names([3], {"a": 1}, "widget")


def test_names_given_through_a_wrapper_are_accepted_on_the_unwrapped_model(bert):
    from hf_collapse.names import resolve_names

    blocks = {b.name: b for b in hf_collapse.find_blocks(bert)}
    assert resolve_names(["base_model.model.bert.encoder.layer.2"], blocks, "block")[0].name == "bert.encoder.layer.2"
    with pytest.raises(ValueError, match="unknown block 'xbert.encoder.layer.2'"):  # only on a dot boundary
        resolve_names(["xbert.encoder.layer.2"], blocks, "block")
