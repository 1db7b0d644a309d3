"""Model builders: `model.name` in the config picks one. Both take (n, 28, 28) float32 images.

The softmax layers stay float32 under mixed precision (train.mixed_precision): float16
probabilities would make the loss lose precision near 0 and 1.
"""

import keras
from keras import layers

from pipeline.config import CnnConfig, MlpConfig
from pipeline.data_io import IMAGE_SHAPE, NUM_CLASSES


def build_model(config: MlpConfig | CnnConfig) -> keras.Model:
    if config.name == "mlp":
        return build_mlp(config)
    if config.name == "cnn":
        return build_cnn(config)
    raise ValueError(f"model.name: unknown model {config.name!r}; allowed: mlp, cnn")


def build_mlp(config: MlpConfig) -> keras.Model:
    """The reference model: Dense 512 relu -> Dense 10 softmax on the flattened image."""
    return keras.Sequential(
        [
            keras.Input(shape=IMAGE_SHAPE),
            layers.Flatten(),
            layers.Dense(config.hidden_units, activation="relu"),
            layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32"),
        ],
        name="mlp",
    )


def build_cnn(config: CnnConfig) -> keras.Model:
    """Conv blocks (3x3 convolutions with batch norm and ReLU, max-pooled), then a dense head.

    model.random_shift > 0 moves each training image by a random fraction of its side: a layer
    that acts in training only (keras.layers.RandomTranslation), so the saved model predicts unchanged.
    """
    model = keras.Sequential([keras.Input(shape=IMAGE_SHAPE), layers.Reshape((*IMAGE_SHAPE, 1))], name="cnn")
    if config.random_shift:
        model.add(layers.RandomTranslation(config.random_shift, config.random_shift, fill_mode="constant"))
    for filters in config.filters:
        for conv in range(config.convs_per_block):
            # No bias: batch normalisation's offset does its job.
            model.add(layers.Conv2D(filters, 3, padding="same", use_bias=False))
            if conv == config.convs_per_block - 1:
                # Pooled before batch norm and ReLU, so that they touch a quarter of the values, forward
                # and backward: max-pooling commutes with ReLU.
                model.add(layers.MaxPooling2D())
            model.add(layers.BatchNormalization())
            model.add(layers.ReLU())
    model.add(layers.Flatten())
    model.add(layers.Dropout(config.dropout))
    model.add(layers.Dense(config.dense_units, activation="relu"))
    model.add(layers.Dropout(config.dropout))
    model.add(layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32"))
    return model
