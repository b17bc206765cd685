"""BERT and RoBERTa encoders (XLM-R and CamemBERT share RoBERTa's modules): ``encoder.layer[i]``."""

from __future__ import annotations

from .base import register_architecture
from .common import LayerListAdapter, mlp_site, text_inputs


class BertAdapter(LayerListAdapter):
    family = "bert"
    description = "BERT / RoBERTa / XLM-RoBERTa / CamemBERT encoders (encoder.layer[i])"
    model_types = ("bert", "roberta", "xlm-roberta", "camembert")
    layers_path = "encoder.layer"

    def activation_sites(self, backbone):
        return [
            mlp_site(b.name, "intermediate.intermediate_act_fn", "intermediate.dense", "output.dense")
            for b in self.blocks(backbone)
        ]

    def example_inputs(self, model, batch_size=1, seq_len=128):
        seq_len = min(seq_len, model.config.max_position_embeddings - 2)
        return text_inputs(model, batch_size, seq_len)


register_architecture(BertAdapter())
