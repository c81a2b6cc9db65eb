"""Image and frame transforms shared by the datamodules (the papers' training augmentation)."""

from __future__ import annotations

import math

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


class CentredScale(torch.nn.Module):
    """uint8 images to float32 in [-1, 1], 127.5 to 0: quantised optical flow (zero motion at the middle grey) to
    signed values."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"CentredScale takes uint8 images, got {images.dtype}")
        return images.to(torch.float32).sub_(127.5).div_(127.5)


class FrameTransform:
    """Training: RandomResizedCrop + horizontal flip (OGM-GE, MLA); evaluation: Resize + CenterCrop. Both end in
    ImageNet normalisation. Applied to uint8 images ``[..., 3, H, W]`` (the stacked frames of a clip get one crop;
    channels-last memory is the fastest to resize).

    The same draws and pixels as torchvision's ``v2.Compose`` of those transforms (a test checks it), called
    directly: on a 224-pixel frame the composition's per-call bookkeeping cost as much as the resize itself.
    """

    SCALE = (0.08, 1.0)  # RandomResizedCrop's defaults: the crop's share of the area, and its aspect ratio
    RATIO = (3 / 4, 4 / 3)

    def __init__(self, image_size: int, train: bool) -> None:
        self.size = image_size
        self.train = train
        self.log_ratio = (math.log(self.RATIO[0]), math.log(self.RATIO[1]))
        self.normalize = ImageNetNormalize()

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of a random crop, drawn as RandomResizedCrop draws it: up to ten tries of an area
        share and a log-uniform aspect ratio that fit, else the centre crop of the nearest allowed ratio."""
        area = height * width
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*self.SCALE).item()
            aspect = math.exp(torch.empty(1).uniform_(*self.log_ratio).item())
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,)).item())
                left = int(torch.randint(0, width - w + 1, size=(1,)).item())
                return top, left, h, w
        ratio = width / height
        if ratio < self.RATIO[0]:
            w, h = width, int(round(width / self.RATIO[0]))
        elif ratio > self.RATIO[1]:
            w, h = int(round(height * self.RATIO[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        if self.train:
            top, left, h, w = self.crop_box(*images.shape[-2:])
            crop = images[..., top:top + h, left:left + w]
            lead = crop.shape[:-3]
            images = torch.nn.functional.interpolate(crop.reshape(-1, *crop.shape[-3:]), size=(self.size, self.size),
                                                     mode="bilinear", align_corners=False, antialias=True)
            images = images.reshape(*lead, *images.shape[-3:])
            if torch.rand(1) < 0.5:  # RandomHorizontalFlip(p=0.5)'s draw
                images = self.flip(images)
        else:
            images = F.center_crop(F.resize(images, self.size, antialias=True), self.size)
        return self.normalize(images)

    def flip(self, images: torch.Tensor) -> torch.Tensor:
        """The images mirrored left to right."""
        return images.flip(-1)


class FlowTransform(FrameTransform):
    """The frame transform of optical flow images ``[..., 2, H, W]`` (the horizontal ``u`` and vertical ``v``
    components, uint8 with zero motion at 127.5, as :mod:`datamodules.optical_flow` stores them): the same crops
    and resizes; a horizontal flip also reverses the horizontal motion (``u -> 255 - u``, as two-stream networks
    flip flow); then signed values in [-1, 1] (:class:`CentredScale`) instead of ImageNet normalisation."""

    def __init__(self, image_size: int, train: bool) -> None:
        super().__init__(image_size, train)
        self.normalize = CentredScale()

    def flip(self, images: torch.Tensor) -> torch.Tensor:
        images = images.flip(-1)
        images[..., 0, :, :] = 255 - images[..., 0, :, :]
        return images


def frame_transform(image_size: int, train: bool) -> FrameTransform:
    """The transform of images and frames for training (``train``) or evaluation: :class:`FrameTransform`."""
    return FrameTransform(image_size, train)


def flow_transform(image_size: int, train: bool) -> FlowTransform:
    """The transform of optical flow frames for training (``train``) or evaluation: :class:`FlowTransform`."""
    return FlowTransform(image_size, train)
