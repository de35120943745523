"""Tensors of ONNX models: what an input or output is (:class:`TensorSpec`, read from the
model), the default pre-processing of an image (:class:`ImageToTensor`) and post-processing
(:func:`outputs_by_name`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Array", "ImageToTensor", "Outputs", "TensorSpec", "outputs_by_name"]

Array = np.ndarray[Any, Any]
Outputs = dict[str, Array]
"""One frame's outputs: output name -> array (without the batch axis when the model has one)."""

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(uint16)": np.uint16,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the model: its ``name``, ``shape`` (an int for a fixed dimension,
    a str for a dynamic one: its symbolic name, or ``"?"``) and ONNX ``type``
    (``"tensor(float)"``)."""

    name: str
    shape: tuple[int | str, ...]
    type: str

    @classmethod
    def of(cls, arg: Any) -> TensorSpec:
        """From ONNX Runtime's ``NodeArg``."""
        shape = tuple(d if isinstance(d, int) else str(d or "?") for d in (arg.shape or ()))
        return cls(str(arg.name), shape, str(arg.type))

    @property
    def dtype(self) -> np.dtype[Any] | None:
        """The NumPy type of the tensor, None for a type NumPy has no match for."""
        found = _NUMPY_TYPES.get(self.type)
        return np.dtype(found) if found is not None else None

    @property
    def batch_dynamic(self) -> bool:
        """Whether the first axis takes any size (a batch axis that can batch)."""
        return bool(self.shape) and isinstance(self.shape[0], str)

    def text(self, shape: Sequence[int | str]) -> str:
        """``shape`` written with ``?`` for the dynamic dimensions."""
        return "(" + ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) + ")"


@dataclass(frozen=True)
class ImageToTensor:
    """The default ``preprocess``: an image (H x W x C, or H x W grey, as live frames are BGR
    ``uint8``) to a float32 C x H x W tensor, ``(pixel * scale - mean) / std`` per channel.

    ``size`` (width, height) resizes first (for a model with a fixed input size); ``rgb`` turns
    BGR into RGB, for models trained on RGB. The defaults give pixel values in 0-1, BGR, at the
    image's own size. The batch axis is not added here: the model adds it."""

    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    rgb: bool = False
    size: tuple[int, int] | None = None

    def __call__(self, image: Any) -> Array:
        image = np.asarray(image)
        if image.ndim not in (2, 3):
            raise ValueError(f"an image is H x W or H x W x C, not an array of shape {image.shape}")
        if self.size is not None and (image.shape[1], image.shape[0]) != self.size:
            import cv2

            image = cv2.resize(image, self.size, interpolation=cv2.INTER_LINEAR)
        if image.ndim == 2:
            image = image[:, :, None]
        for label, values in (("mean", self.mean), ("std", self.std)):
            channels = image.shape[2]
            if len(values) not in (1, channels):
                fits = "1" if channels == 1 else f"1 or {channels}"
                raise ValueError(
                    f"{len(values)} {label} values for an image of {channels} channel(s), "
                    f"which takes {fits}"
                )
        if self.rgb and image.shape[2] == 3:
            image = image[:, :, ::-1]
        # (pixel * scale - mean) / std as one multiply and one subtract, in place, on C x H x W
        std = np.asarray(self.std, np.float32)
        gain = (np.float32(self.scale) / std).reshape(-1, 1, 1)
        offset = (np.asarray(self.mean, np.float32) / std).reshape(-1, 1, 1)
        x: Array = image.transpose(2, 0, 1).astype(np.float32, order="C")
        x *= gain
        x -= offset
        return x


def outputs_by_name(outputs: Outputs, frame: Any) -> Outputs:
    """The default ``postprocess``: the frame's outputs as they are (output name -> array)."""
    return outputs
