"""M2-BERT (Monarch Mixer BERT): configuration, models, checkpoint loading and the bundled tokenizer."""

from .auto import register_auto_classes
from .configuration_m2_bert import PRESETS, M2BertConfig
from .loading import load_config
from .modeling_m2_bert import HyenaFilter, M2BertForMaskedLM, M2BertModel, MonarchMixerSequenceMixer
from .tokenizer import load_tokenizer

register_auto_classes()  # transformers' Auto classes load our exports (`model_type: m2_bert`)


def from_pretrained(directory, **config_overrides) -> M2BertModel:
    """The encoder (`M2BertModel`) of any M2-BERT checkpoint directory."""
    return M2BertModel.from_pretrained(directory, **config_overrides)


__all__ = ["PRESETS", "HyenaFilter", "M2BertConfig", "M2BertForMaskedLM", "M2BertModel",
           "MonarchMixerSequenceMixer", "from_pretrained", "load_config", "load_tokenizer"]
