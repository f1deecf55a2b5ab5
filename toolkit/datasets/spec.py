"""What a network needs to know about its input images: channels, side, class count, normalisation.

One ``ImageSpec`` travels from the dataset (``DatasetInfo.spec``) into every network, job,
checkpoint and logged model, so nothing downstream assumes MNIST's shape. MNIST's own spec
keeps its published statistics (0.1307, 0.3081), so its networks compute what they always did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ImageSpec:
    channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    mean: tuple[float, ...] = (0.1307,)  # per channel, pixels in [0, 1]; the network standardises inside
    std: tuple[float, ...] = (0.3081,)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ImageSpec":
        """The spec a checkpoint or model file recorded; MNIST's for files written before specs existed."""
        if not d:
            return MNIST_SPEC
        return cls(int(d["channels"]), int(d["image_size"]), int(d["num_classes"]),
                   tuple(float(x) for x in d["mean"]), tuple(float(x) for x in d["std"]))

    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


MNIST_SPEC = ImageSpec()
