"""What every reward server shares: settings, the dynamic batcher, image decoding with limits, auth, metrics,
short JSON errors and the app factory."""

from reward_servers.kit.app import V1_ERRORS, Inference, InferenceDep, create_app
from reward_servers.kit.batcher import DeadlineExceeded, DynamicBatcher, InferenceFailed, QueueFull
from reward_servers.kit.images import ImageInputError, center_crop_to_aspect, decode_image, decode_images
from reward_servers.kit.settings import ModelSettings, ServerSettings

__all__ = [
    "V1_ERRORS",
    "DeadlineExceeded",
    "DynamicBatcher",
    "ImageInputError",
    "Inference",
    "InferenceDep",
    "InferenceFailed",
    "ModelSettings",
    "QueueFull",
    "ServerSettings",
    "center_crop_to_aspect",
    "create_app",
    "decode_image",
    "decode_images",
]
