"""fasttrain: the fastest honest path from a folder of images to a trained CNN on one GPU."""

__version__ = "0.1.0"
