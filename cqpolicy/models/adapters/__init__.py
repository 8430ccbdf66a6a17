"""Model adapters, one file per diffusers model class (see ``base`` for the interface); importing the package
registers them all."""
from cqpolicy.models.adapters.base import (
    UNIT_NAMES,
    CacheUnit,
    ModelAdapter,
    NoCacheUnitsError,
    TextAdapter,
    TransformerBlocksAdapter,
    _ADAPTERS,
    adapter_for,
    cache_blocks,
    find_cache_units,
    parse_units,
    register_adapter,
    supported_classes,
)
from cqpolicy.models.adapters.dit import DiTAdapter
from cqpolicy.models.adapters.flux import FluxAdapter
from cqpolicy.models.adapters.pixart import PixArtAdapter
from cqpolicy.models.adapters.sd3 import SD3Adapter
from cqpolicy.models.adapters.unet2d import UNet2DAdapter
from cqpolicy.models.adapters.unet2d_condition import UNet2DConditionAdapter

__all__ = ["UNIT_NAMES", "CacheUnit", "ModelAdapter", "NoCacheUnitsError", "TextAdapter", "TransformerBlocksAdapter", "_ADAPTERS", "adapter_for",
           "cache_blocks", "find_cache_units", "parse_units", "register_adapter", "supported_classes",
           "DiTAdapter", "FluxAdapter", "PixArtAdapter", "SD3Adapter", "UNet2DAdapter", "UNet2DConditionAdapter"]
