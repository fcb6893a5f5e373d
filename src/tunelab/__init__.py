"""tunelab: supervised fine-tuning of open language models, end to end."""
from tunelab.errors import TunelabError

__version__ = "0.1.0"


def train(config, **kwargs):
    """Fine-tune from a TrainConfig, a dict of config keys, or a YAML path."""
    from pathlib import Path

    from tunelab.config import TrainConfig, build_config, load_config
    from tunelab.train import train as _train
    if isinstance(config, (str, Path)):
        config = load_config(config)
    elif isinstance(config, dict):
        config = build_config(config)
    elif not isinstance(config, TrainConfig):
        raise TypeError("config must be a TrainConfig, a dict or a YAML path")
    return _train(config, **kwargs)


__all__ = ["TunelabError", "train", "__version__"]
