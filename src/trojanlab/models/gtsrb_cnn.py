"""The GTSRB CNN of Neural Cleanse / TrojanNet / thesis Table 5.9 (methods sheet section 1.5).

Six 3x3 ReLU convolutions (32, 32, 64, 64, 128, 128 channels; the first of each pair pads "same", the second is
"valid"), max-pooling and dropout 0.2 after each pair, FC 512 with dropout 0.5, FC ``num_classes``. The thesis's
table lists the fourth convolution as 32 channels; the official model has 64, which we follow. 571,723
parameters for 43 classes, as the official Keras model.

``batch_norm=True`` (architecture ``gtsrb_cnn_bn``) puts a BatchNorm after every convolution and after FC 512,
before the ReLU: the same network with the normalisation most modern victims have, so that a population of models
covers both of ANP's neuron kinds (BatchNorm channels, and plain convolution/linear units).
"""

from __future__ import annotations

from torch import nn


class GTSRBCNN(nn.Module):
    def __init__(
        self, num_classes: int = 43, in_channels: int = 3, image_size: int = 32, batch_norm: bool = False
    ) -> None:
        super().__init__()

        def norm(kind: type[nn.Module], width: int) -> list[nn.Module]:
            return [kind(width)] if batch_norm else []

        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for width in (32, 64, 128):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                *norm(nn.BatchNorm2d, width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3),
                *norm(nn.BatchNorm2d, width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.Dropout(0.2),
            ]
            channels, size = width, (size - 2) // 2
        if size < 1:
            raise ValueError(f"GTSRBCNN needs images of at least 22x22 pixels, got {image_size}")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * size * size, 512),
            *norm(nn.BatchNorm1d, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )
        for module in self.modules():  # Keras's Glorot-uniform initialisation, zero bias
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        return self.classifier(self.features(x))
