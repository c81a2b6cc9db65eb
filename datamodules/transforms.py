"""Image and frame transforms shared by the datamodules (the papers' training augmentation)."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetNormalize(torch.nn.Module):
    """uint8 images to ImageNet-normalised float32 in one pass, ``(x - 255 mean) / (255 std)``: torchvision's
    ``ToDtype(float32, scale=True)`` then ``Normalize`` up to float rounding, at about a third of their cost."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", 255.0 * torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(IMAGENET_STD).view(3, 1, 1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"ImageNetNormalize takes uint8 images, got {images.dtype}")
        return images.to(torch.float32).sub_(self.shift).mul_(self.scale)


def frame_transform(image_size: int, train: bool):
    """Training: RandomResizedCrop + horizontal flip (OGM-GE, MLA); evaluation: Resize + CenterCrop. Both end in
    ImageNet normalisation. Applied to uint8 images or the stacked frames of a clip at once (one crop per clip)."""
    from torchvision.transforms import v2

    head = ([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()] if train
            else [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
    return v2.Compose([*head, ImageNetNormalize()])
