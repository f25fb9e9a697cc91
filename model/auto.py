"""M2-BERT in Hugging Face's Auto classes, without `trust_remote_code`.

Importing `model` registers `model_type: m2_bert`, which the config.json of our exports carries
(with `architectures`), so that
    import model  # noqa: F401  (registers m2_bert)
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
    AutoConfig.from_pretrained("runs/finetune-m2-32k/final")            # -> model.M2BertConfig
    AutoModel.from_pretrained("runs/finetune-m2-32k/final")             # -> model.M2BertModel
    AutoModelForMaskedLM.from_pretrained("runs/pretrain-m2-32k/final")  # -> model.M2BertForMaskedLM
load our classes from local directories. The authors' released configs say `model_type: bert` (their
code is remote code); they keep loading through `model.from_pretrained`, in `reference` padding mode.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .configuration_m2_bert import M2BertConfig
from .modeling_m2_bert import M2BertForMaskedLM, M2BertModel


def register_auto_classes() -> None:
    """Map `model_type: m2_bert` to our config and model classes in transformers' Auto classes."""
    AutoConfig.register(M2BertConfig.model_type, M2BertConfig, exist_ok=True)
    AutoModel.register(M2BertConfig, M2BertModel, exist_ok=True)
    AutoModelForMaskedLM.register(M2BertConfig, M2BertForMaskedLM, exist_ok=True)
