"""One test per assumption hf_collapse.compat makes about the private APIs of peft, torch, accelerate and
transformers. A failure here names the assumption an upgrade broke. Sections follow compat.py's."""

import enum
import inspect

import pytest
import torch
from torch import nn

from hf_collapse import compat

# =============================================================================================================
# peft
# =============================================================================================================


def test_peft_type_can_be_extended_and_the_registry_filled():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    import hf_collapse.trady as trady

    member = compat.extend_peft_type("TRADY")  # already there: the same member back
    assert member is PeftType.TRADY and PeftType("TRADY") is member and list(PeftType).count(member) == 1
    assert isinstance(member, str) and member == "TRADY"
    assert compat.peft_method_registered("TRADY", trady.TraDyModel)
    assert not compat.peft_method_registered("NO_SUCH_METHOD", trady.TraDyModel)
    assert PEFT_TYPE_TO_CONFIG_MAPPING["TRADY"] is trady.TraDyConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is trady.TraDyModel and PEFT_TYPE_TO_PREFIX_MAPPING[member] == "trady_"
    compat.register_peft_method("TRADY", trady.TraDyConfig, trady.TraDyModel, "trady_")  # idempotent
    assert list(PeftType).count(member) == 1


def test_a_new_peft_type_member_behaves_like_a_built_in_one():
    """On a private copy of the enum: the member compat adds is found by value, by name and by iteration."""
    from peft.utils import peft_types

    copy = enum.Enum("PeftTypeCopy", {m.name: m.value for m in peft_types.PeftType}, type=str)
    original = peft_types.PeftType
    peft_types.PeftType = copy
    try:
        member = compat.extend_peft_type("COMPAT_TEST")
    finally:
        peft_types.PeftType = original
    assert copy("COMPAT_TEST") is member and copy["COMPAT_TEST"] is member and member in list(copy)
    assert "COMPAT_TEST" not in original.__members__


def test_extending_peft_type_fails_loudly_when_it_is_not_a_str_enum(monkeypatch):
    from peft.utils import peft_types

    monkeypatch.setattr(peft_types, "PeftType", type("NotAnEnum", (), {}))
    with pytest.raises(compat.CompatibilityError, match="not a str Enum"):
        compat.extend_peft_type("TRADY_TEST")
    monkeypatch.delattr(peft_types, "register_peft_method")
    with pytest.raises(compat.CompatibilityError, match="register_peft_method"):
        compat.register_peft_method("TRADY", object, object, "trady_")


@pytest.mark.parametrize("hook", sorted(compat.PEFT_TUNER_HOOKS))
def test_base_tuner_still_has_the_hooks_trady_overrides(hook):
    from peft.tuners.tuners_utils import BaseTuner

    import hf_collapse.trady as trady

    assert hasattr(BaseTuner, hook), f"peft's BaseTuner no longer calls {hook}"
    expected = compat.PEFT_TUNER_HOOKS[hook]
    peft_params = tuple(inspect.signature(getattr(BaseTuner, hook)).parameters)
    assert peft_params[: len(expected)] == expected
    assert getattr(trady.TraDyModel, hook) is not getattr(BaseTuner, hook)  # TraDy overrides it


def test_peft_calls_the_state_dict_hooks_on_save_and_load():
    import tiny_models
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict
    from test_trady import bert_batch

    from hf_collapse.trady import TraDyConfig, calibrate

    config = dict(task_type="SEQ_CLS", budget_ratio=0.1, selection="rgn_weighted")  # a selection that re-draws
    torch.manual_seed(0)
    model = get_peft_model(tiny_models.bert(), TraDyConfig(**config))
    calibrate(model, [bert_batch()])
    state = get_peft_model_state_dict(model)
    assert any(k.endswith(".trady_selected") for k in state)  # _get_adapter_state_dict ran
    torch.manual_seed(0)
    other = get_peft_model(tiny_models.bert(), TraDyConfig(**config))
    calibrate(other, [bert_batch()])
    other.base_model.resample(1)  # a re-drawing selection: epoch 1 draws other channels
    assert other.base_model.current_selection() != model.base_model.current_selection()
    set_peft_model_state_dict(other, state)  # _remap_adapter_state_dict_for_load ran
    assert other.base_model.current_selection() == model.base_model.current_selection()


def test_excluded_targets_are_recognised():
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=["query", "value"], exclude_modules=["layer.0.attention.self.query"])
    excluded = check_target_module_exists(config, "encoder.layer.0.attention.self.query")
    assert compat.is_excluded_target(excluded)
    kept = check_target_module_exists(config, "encoder.layer.1.attention.self.query")
    assert kept and not compat.is_excluded_target(kept)


def test_tuner_layer_state_is_what_base_tuner_layer_reads():
    from peft.tuners.tuners_utils import BaseTunerLayer

    class Layer(nn.Module, BaseTunerLayer):
        def __init__(self):
            super().__init__()
            self.base_layer = nn.Linear(2, 2)
            compat.init_tuner_layer_state(self, "first")

    layer = Layer()
    assert layer.disable_adapters is False and layer.merged is False and layer.active_adapters == ["first"]
    layer.merged_adapters.append("first")
    layer.enable_adapters(False)
    assert layer.merged and layer.disable_adapters is True


# =============================================================================================================
# torch
# =============================================================================================================


def test_tensor_version_counts_in_place_changes():
    parameter = nn.Parameter(torch.zeros(3))
    before = compat.tensor_version(parameter)
    parameter.grad = torch.ones(3)
    torch.optim.SGD([parameter], lr=0.1).step()
    assert compat.tensor_version(parameter) > before


def test_conv2d_forward_with_another_weight():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 3, 7, 7)
    assert torch.equal(compat.conv2d_forward(conv, x, conv.weight, conv.bias), conv(x))
    other = torch.randn_like(conv.weight)
    torch.testing.assert_close(
        compat.conv2d_forward(conv, x, other, None), torch.nn.functional.conv2d(x, other, None, 2, 1, 1)
    )


def test_optimizer_step_post_hook_fires_for_every_torch_optimizer():
    parameter = nn.Parameter(torch.zeros(2))
    parameter.grad = torch.ones(2)
    seen = []
    handle = compat.register_optimizer_step_post_hook(lambda optimizer, args, kwargs: seen.append(optimizer))
    try:
        sgd, adam = torch.optim.SGD([parameter], lr=0.1), torch.optim.AdamW([parameter], lr=0.1)
        sgd.step()
        adam.step()
    finally:
        handle.remove()
    assert seen == [sgd, adam]


def test_a_resized_parameter_is_seen_by_the_optimizer_that_holds_it():
    parameter = nn.Parameter(torch.zeros(0))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    compat.resize_parameter_(parameter, 5)
    assert optimizer.param_groups[0]["params"][0] is parameter and parameter.shape == (5,)
    parameter.grad = torch.ones(5)
    optimizer.step()
    assert optimizer.state[parameter]["exp_avg"].shape == (5,) and (parameter < 0).all()
    compat.resize_parameter_(parameter, 5)  # same size: zeroed in place
    assert torch.count_nonzero(parameter) == 0


def test_resized_parameter_takes_gradients_of_its_new_shape_while_an_older_graph_lives():
    parameter = nn.Parameter(torch.zeros(0))
    older = parameter.clone()  # keeps autograd's record of the shape [0] alive
    compat.resize_parameter_(parameter, 3)
    (parameter * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(parameter.grad, torch.arange(3.0))
    assert parameter.dtype == torch.float32 and older.shape == (0,)


# =============================================================================================================
# accelerate
# =============================================================================================================


def test_accelerated_optimizer_keeps_the_wrapped_one_in_optimizer():
    from accelerate import Accelerator

    inner = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    wrapped = Accelerator(cpu=True).prepare_optimizer(inner)
    assert wrapped is not inner
    assert list(compat.unwrap_optimizer(wrapped)) == [wrapped, inner]
    assert list(compat.unwrap_optimizer(inner)) == [inner]


# =============================================================================================================
# transformers
# =============================================================================================================


def _trainer(tmp_path, model, **settings):
    from toy_training import PadOnlyCollator, toy_dataset
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        str(tmp_path),
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        max_steps=2,
        per_device_train_batch_size=4,
        save_strategy="no",
        **settings,
    )
    return Trainer(model=model, args=args, train_dataset=toy_dataset(8), data_collator=PadOnlyCollator())


def test_saved_callback_state(tmp_path):
    from transformers import EarlyStoppingCallback, TrainerState

    state = TrainerState(stateful_callbacks=[EarlyStoppingCallback(3)])
    state.save_to_json(str(tmp_path / "state.json"))
    loaded = TrainerState.load_from_json(str(tmp_path / "state.json"))
    assert compat.saved_callback_state(loaded, "EarlyStoppingCallback") == {"early_stopping_patience_counter": 0}
    assert compat.saved_callback_state(loaded, "Absent") is None


def test_module_tables_are_the_live_dicts_of_children_parameters_and_buffers():
    module = nn.BatchNorm1d(3)
    module.extra = nn.Linear(2, 2)
    children, parameters, buffers = compat.module_tables(module)
    assert children["extra"] is module.extra and parameters["weight"] is module.weight
    assert buffers["running_mean"] is module.running_mean
    del children["extra"]
    assert not hasattr(module, "extra")  # live: the module changed


def test_compiled_original_and_no_split_modules():
    linear = nn.Linear(2, 2)
    assert compat.compiled_original(linear) is None
    assert compat.compiled_original(torch.compile(linear)) is linear
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=30,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    assert compat.no_split_modules(llama) == ["LlamaDecoderLayer"] and compat.no_split_modules(linear) == []


def test_profiler_events_include_allocations():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.zeros(1024, 1024)
    events = compat.profiler_events(prof)
    assert any(e.name() == "[memory]" and e.nbytes() >= 4 * 2**20 for e in events)


def test_parser_option_strings_and_fsdp_prefix_and_accelerate_mark():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--max_length")
    assert "--max_length" in compat.parser_option_strings(parser)
    assert compat.strip_fsdp_prefix("_fsdp_wrapped_module.model._fsdp_wrapped_module.layers.0") == "model.layers.0"
    from accelerate import Accelerator

    model = Accelerator(cpu=True).prepare(nn.Linear(2, 2))
    assert getattr(model, "_is_accelerate_prepared", False)
    compat.forget_accelerate_preparation(model)
    assert not getattr(model, "_is_accelerate_prepared", False)


@pytest.mark.parametrize("processes", [1, 3])
def test_compute_loss_multiplies_the_models_loss_as_lacoot_assumes(tmp_path, monkeypatch, processes):
    """Trainer.compute_loss multiplies a loss-kwargs model's loss by the number of processes when it passes
    num_items_in_batch; LaCoOT's penalty follows the same factor."""
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=30,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    trainer = _trainer(tmp_path, model)
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: processes))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    inputs = {"input_ids": ids, "labels": ids}
    count = torch.tensor(4)
    plain = model(**inputs, num_items_in_batch=count).loss
    assert trainer.model_accepts_loss_kwargs
    factor = compat.trainer_task_loss_multiplier(trainer, count)
    assert factor == processes
    torch.testing.assert_close(trainer.compute_loss(model, dict(inputs), num_items_in_batch=count), plain * factor)
    assert compat.trainer_task_loss_multiplier(trainer, None) == 1
