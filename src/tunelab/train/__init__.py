from tunelab.train.run import TrainResult, train

__all__ = ["train", "TrainResult"]
