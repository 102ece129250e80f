"""The services core: what every process of a run uses (DESIGN.md, "Where code lives").

Importing it sets two logging rules for every process (driver, Ray workers, reward servers), so that a run's output
is the progress bar and a few lines:
- transformers' notice that an image processor "requires torchvision (not installed); falling back to ...Pil" is
  dropped: the PIL processors are the ones this project means to use (diffusers imports their names at start-up,
  so the notice would otherwise repeat in every worker);
- httpx logs each request at INFO (every /readyz poll, every reward call): its level is WARNING, so failures still
  show.
"""

import logging


class _DropTorchvisionFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallbackNotice())
logging.getLogger("httpx").setLevel(logging.WARNING)
