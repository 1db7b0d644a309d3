"""The MNIST pipeline: one module per DVC stage, plus config, tracking, data_io and models."""

import os

# TensorFlow's C++ start-up chatter (CUDA probing, CPU feature notes) buries the stage output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
