"""tunelab: supervised fine-tuning of open language models, end to end."""
from tunelab.errors import TunelabError
from tunelab.train import TrainResult, train

__version__ = "0.1.0"

__all__ = ["TunelabError", "TrainResult", "train", "__version__"]
