"""The VCNet model: L2HNet CNN branch + ViT_FuseX transformer branch, UPer and cascaded decoders.

Public API::

    from networks import build_model, get_config, load_model, save_checkpoint
    model = build_model(get_config("vcnet"))     # published model, random init
    vit_logits, cnn_logits = model(x)            # x: normalised (B, bands, H, W), H, W % 32 == 0
    model = load_model("epoch_99.pth")           # project checkpoint -> eval-mode model
"""

from networks.checkpoint import load_model, model_from_checkpoint, read_checkpoint, save_checkpoint
from networks.config import config_from_dict, config_to_dict, get_config, get_tiny_config, get_vcnet_config
from networks.encoder_decoder import EncoderDecoder, build_model
from networks.pretrained import load_deit_weights

__all__ = [
    "EncoderDecoder",
    "build_model",
    "config_from_dict",
    "config_to_dict",
    "get_config",
    "get_tiny_config",
    "get_vcnet_config",
    "load_deit_weights",
    "load_model",
    "model_from_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]
