"""Tiny random-init models of the real transformers / diffusers classes, one per supported family.

Each case builds a model whose blocks include some that can be removed at the start, middle and end, and
gives the inputs of one deterministic forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]
    removals: list[list[str]]  # several removal requests to try, start / middle / end
    plain_exact: bool = True  # whether plain from_pretrained must reproduce the collapsed model
    plain_exact_for: Callable[[list[str]], bool] | None = None


def _tokens(vocab=99, batch=2, seq=7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # padding in the second sequence
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(size, channels=3, batch=2):
    return {"pixel_values": torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))}


def _seeded(fn):
    def build():
        torch.manual_seed(0)
        return fn().eval()

    return build


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(
        BertConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=5,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
            num_labels=3,
        )
    )


def roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(
        RobertaConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=5,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
            num_labels=3,
        )
    )


def xlm_roberta():
    from transformers import XLMRobertaConfig, XLMRobertaModel

    return XLMRobertaModel(
        XLMRobertaConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
        )
    )


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(
        ViTConfig(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=5,
            num_attention_heads=4,
            intermediate_size=37,
            num_labels=3,
        )
    )


def swin():
    from transformers import SwinConfig, SwinForImageClassification

    # 32px / patch 2 = 16x16 tokens in stage 0 with window 4: the shifted windows are active.
    return SwinForImageClassification(
        SwinConfig(
            image_size=32, patch_size=2, embed_dim=16, depths=[4, 3], num_heads=[2, 2], window_size=4, num_labels=3
        )
    )


def resnet_basic():
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[3, 3], layer_type="basic", num_labels=3)
    )


def resnet_bottleneck():
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[3, 2], layer_type="bottleneck", num_labels=3)
    )


def mobilenet_v2():
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    return MobileNetV2ForImageClassification(MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=3))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=5, n_head=4, n_positions=64))


def gpt2_scaled():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(vocab_size=99, n_embd=32, n_layer=4, n_head=4, n_positions=64, scale_attn_by_inverse_layer_idx=True)
    )


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=5,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Sliding window on the upper layers: layer_types differ per layer and must follow the removals.
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=5,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=2,
        )
    )


def mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(
        MistralConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            sliding_window=None,
        )
    )


def _decoder(config_cls, model_cls, **extra):
    import transformers

    config = getattr(transformers, config_cls)(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    return getattr(transformers, model_cls)(config)


def qwen3():
    return _decoder(
        "Qwen3Config", "Qwen3ForCausalLM", head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=2
    )


def mistral_sliding():
    return _decoder("MistralConfig", "MistralForCausalLM", sliding_window=4)


def gemma2():
    # layer_types alternates sliding / full by default; a window of 4 tokens is shorter than the inputs.
    return _decoder("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, sliding_window=4)


def gemma3():
    return _decoder(
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    )


def phi3():
    return _decoder("Phi3Config", "Phi3ForCausalLM")


def olmo2():
    return _decoder("Olmo2Config", "Olmo2ForCausalLM")


def gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=5,
            num_attention_heads=4,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


def smollm3():
    # no_rope_layers holds one flag per layer (rope on the 1st, 3rd and 5th layers here): it follows removals.
    return _decoder("SmolLM3Config", "SmolLM3ForCausalLM", no_rope_layer_interval=2)


def granite():
    return _decoder("GraniteConfig", "GraniteForCausalLM", residual_multiplier=0.5, attention_multiplier=0.3)


def qwen2_moe():
    # Every second layer's MLP is a mixture of experts, chosen from the layer index at construction: a removal that
    # shifts later layers by an odd count cannot be expressed by the config.
    return _decoder(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        decoder_sparse_step=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    )


def mixtral():
    # A mixture of experts whose router logits feed an auxiliary loss (output_router_logits): every layer records
    # something the loss needs.
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(
        MixtralConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            output_router_logits=True,
            router_aux_loss_coef=0.5,
            max_position_embeddings=64,
        )
    )


def deepseek_v3():
    # The first 2 layers are dense, the rest mixtures of experts (first_k_dense_replace): removing a dense layer must
    # shrink the dense prefix, or a plain reload builds a later layer with the wrong MLP.
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(
        DeepseekV3Config(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=5,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=2,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            max_position_embeddings=64,
        )
    )


def llama4():
    # MoE every second layer (moe_layers = [1, 3]), no rope on every fourth (no_rope_layers, one flag per layer); its
    # base_model_prefix names no module, so the backbone is found by structure.
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    return Llama4ForCausalLM(
        Llama4TextConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=16,
            intermediate_size_mlp=48,
            num_hidden_layers=5,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            max_position_embeddings=64,
        )
    )


def dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        num_layers=5,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )


def dit_pipeline():
    """A tiny diffusers DiTPipeline (DiT, AutoencoderKL, DDIM) in eval mode: in train mode DiT's label embedding
    drops class labels at random, so the pipeline's outputs would not be reproducible."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    )
    return DiTPipeline(
        transformer=transformer.eval(), vae=vae.eval(), scheduler=DDIMScheduler(), id2label={0: "zero", 1: "one"}
    )


def pipeline_images(pipeline) -> torch.Tensor:
    """Two DDIM steps from a fixed seed, as a tensor."""
    images = pipeline(
        class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    return torch.from_numpy(images)


def transformer2d():
    from diffusers import Transformer2DModel

    return Transformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=8,
        num_layers=4,
        norm_num_groups=4,
        activation_fn="gelu",
        cross_attention_dim=12,
    )


def unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=3,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=4,
        norm_num_groups=4,
    )


def _diffusion(sample_key, channels, size, *, class_labels=False, cross=None):
    def inputs():
        g = torch.Generator().manual_seed(0)
        out = {sample_key: torch.randn(2, channels, size, size, generator=g), "timestep": torch.tensor([3, 7])}
        if class_labels:
            out["class_labels"] = torch.tensor([1, 2])
        if cross:
            out["encoder_hidden_states"] = torch.randn(2, 5, cross, generator=g)
        return out

    return inputs


def _swin_plain(removed: list[str]) -> bool:
    # The shift pattern survives when every remaining block keeps its index parity.
    positions = {0: list(range(4)), 1: list(range(3))}
    for name in removed:
        parts = name.split(".")
        positions[int(parts[2])].remove(int(parts[4]))
    return all(orig % 2 == i % 2 for stage in positions.values() for i, orig in enumerate(stage))


CASES = [
    Case(
        "bert",
        _seeded(bert),
        _tokens,
        [["encoder.layer.0"], ["encoder.layer.2"], ["encoder.layer.4"], ["encoder.layer.1", "encoder.layer.3"]],
    ),
    Case("roberta", _seeded(roberta), _tokens, [["encoder.layer.0"], ["encoder.layer.2", "encoder.layer.4"]]),
    Case("xlm_roberta", _seeded(xlm_roberta), _tokens, [["encoder.layer.3"]]),
    Case("vit", _seeded(vit), lambda: _pixels(16), [["layers.0"], ["layers.2"], ["layers.4"]]),
    Case(
        "swin",
        _seeded(swin),
        lambda: _pixels(32),
        [
            ["encoder.layers.0.blocks.0"],
            ["encoder.layers.0.blocks.1"],
            ["encoder.layers.0.blocks.2", "encoder.layers.0.blocks.3"],
            ["encoder.layers.1.blocks.2"],
            ["encoder.layers.1.blocks.1"],
            ["encoder.layers.0.blocks.3"],
        ],
        plain_exact_for=_swin_plain,
    ),
    Case(
        "resnet_basic",
        _seeded(resnet_basic),
        lambda: _pixels(32),
        [
            ["encoder.stages.0.layers.0"],
            ["encoder.stages.0.layers.1"],
            ["encoder.stages.1.layers.2"],
            ["encoder.stages.0.layers.0", "encoder.stages.0.layers.1", "encoder.stages.0.layers.2"],
        ],
        plain_exact_for=lambda removed: len(removed) < 3,
    ),
    Case(
        "resnet_bottleneck",
        _seeded(resnet_bottleneck),
        lambda: _pixels(32),
        [["encoder.stages.0.layers.1"], ["encoder.stages.1.layers.1"]],
    ),
    Case(
        "mobilenet_v2",
        _seeded(mobilenet_v2),
        lambda: _pixels(32),
        [["layer.1"], ["layer.4", "layer.8"], ["layer.14"]],
        plain_exact=False,
    ),
    Case("gpt2", _seeded(gpt2), _tokens, [["h.0"], ["h.2"], ["h.4"]]),
    Case("gpt2_scaled", _seeded(gpt2_scaled), _tokens, [["h.1"]], plain_exact=False),
    Case("llama", _seeded(llama), _tokens, [["layers.0"], ["layers.2"], ["layers.4"]]),
    Case("qwen2", _seeded(qwen2), _tokens, [["layers.1"], ["layers.3"]]),
    Case("mistral", _seeded(mistral), _tokens, [["layers.0", "layers.3"]]),
    Case("qwen3", _seeded(qwen3), _tokens, [["layers.0"], ["layers.2"], ["layers.4"], ["layers.1", "layers.3"]]),
    Case("mistral_sliding", _seeded(mistral_sliding), _tokens, [["layers.0"], ["layers.2"], ["layers.4"]]),
    Case("gemma2", _seeded(gemma2), _tokens, [["layers.0"], ["layers.2"], ["layers.4"], ["layers.1", "layers.2"]]),
    Case("gemma3", _seeded(gemma3), _tokens, [["layers.0"], ["layers.1"], ["layers.4"], ["layers.2", "layers.3"]]),
    Case("phi3", _seeded(phi3), _tokens, [["layers.0"], ["layers.2"], ["layers.4"]]),
    Case("olmo2", _seeded(olmo2), _tokens, [["layers.0"], ["layers.2"], ["layers.4"]]),
    Case("gpt_neox", _seeded(gpt_neox), _tokens, [["layers.0"], ["layers.2"], ["layers.4"]]),
    Case("smollm3", _seeded(smollm3), _tokens, [["layers.0"], ["layers.2"], ["layers.4"], ["layers.1", "layers.3"]]),
    Case("granite", _seeded(granite), _tokens, [["layers.0"], ["layers.2"], ["layers.4"]]),
    # decoder_sparse_step is rewritten as an explicit mlp_only_layers: even a removal that shifts later layers by an
    # odd count reloads plainly.
    Case("qwen2_moe", _seeded(qwen2_moe), _tokens, [["layers.1"], ["layers.0", "layers.1"], ["layers.4"]]),
    Case("mixtral", _seeded(mixtral), _tokens, [["layers.0"], ["layers.3"]]),
    Case("deepseek_v3", _seeded(deepseek_v3), _tokens, [["layers.0"], ["layers.1", "layers.3"], ["layers.4"]]),
    Case("llama4", _seeded(llama4), _tokens, [["layers.0"], ["layers.1"], ["layers.2", "layers.3"]]),
    Case(
        "dit",
        _seeded(dit),
        _diffusion("hidden_states", 4, 8, class_labels=True),
        [["transformer_blocks.0"], ["transformer_blocks.2"], ["transformer_blocks.4"]],
    ),
    Case(
        "transformer2d",
        _seeded(transformer2d),
        _diffusion("hidden_states", 8, 4, cross=12),
        [["transformer_blocks.1"], ["transformer_blocks.3"]],
    ),
    Case(
        "unet",
        _seeded(unet),
        _diffusion("sample", 4, 8, cross=12),
        [
            ["down_blocks.0.resnets.0"],
            ["down_blocks.0.resnets.1"],
            ["down_blocks.1.resnets.1"],
            ["down_blocks.1.resnets.2"],
            ["down_blocks.0.resnets.0", "down_blocks.1.resnets.2"],
        ],
    ),
]

CASES_BY_NAME = {case.name: case for case in CASES}


def plain_exact(case: Case, removed: list[str]) -> bool:
    if case.plain_exact_for is not None:
        return case.plain_exact_for(removed)
    return case.plain_exact


def output_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    for key in ("logits", "sample", "last_hidden_state"):
        value = out.get(key) if hasattr(out, "get") else None
        if value is not None:
            return value
    return out[0]


def save_tiny_llm_with_smollm2_tokenizer(
    folder, num_hidden_layers: int, hidden_size: int = 32, intermediate_size: int = 64
):
    """Save a tiny random-init Llama that carries SmolLM2's real tokenizer (and its vocabulary size) in ``folder``:
    what the LLM commands need to run end to end in seconds on the embedded BBC News text, and what llama.cpp's
    converter recognises (it knows a BPE tokenizer by hashing its output)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_collapse.data import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("smollm2"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
