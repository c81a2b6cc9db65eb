"""UCF-101: 13,320 clips of 101 human actions from YouTube, with two visual modalities, RGB frames and optical
flow, and three official train/test splits. The datamodule reads the cache that ``balance-prepare ucf101 --raw RAW
--out OUT`` writes (its preparation is ``prepare_main`` here, where ``balance-prepare`` finds it; the download:
:mod:`datamodules.ucf101_raw`; the preparation: :mod:`datamodules.ucf101_prepare`)."""

from __future__ import annotations

from typing import Any

from datamodules.clip_cache import LabelledClipsDataModule
from datamodules.clips import ClipDataset, FrameModality
from datamodules.preparation import missing_cache_error
from datamodules.transforms import flow_transform
from datamodules.ucf101_prepare import CACHE_LAYOUT, CACHE_VERSION, COMMAND, PROG
from datamodules.ucf101_prepare import main as prepare_main  # noqa: F401 (balance-prepare finds it here)
from datamodules.ucf101_raw import CLASS_FILE, LIST_DIR, OFFICIAL_SPLITS, RAW_LAYOUT, SOURCE


class UCF101Dataset(ClipDataset):
    """Items ``{"inputs": {"rgb": [T, 3, S, S], "flow": [T, 2, S, S]}, "label": int}``: ``T`` frames and the flow at
    the same frames (random in training, the centres of ``T`` equal parts in evaluation); the flow's ``u`` and
    ``v`` in [-1, 1], flipped with the frames (:class:`~datamodules.transforms.FlowTransform`)."""

    array_modalities = ()
    frame_modalities = {"rgb": FrameModality(("rgb",)),
                        "flow": FrameModality(("flow/u", "flow/v"), gray=True, transform=flow_transform)}


class UCF101DataModule(LabelledClipsDataModule):
    """UCF-101 from the prepared cache: RGB frames ``[T, 3, S, S]`` + optical flow ``[T, 2, S, S]``, 101 classes.

    Args:
        split: ``official`` (the train and test lists of ``official_split``; validation carved from its training
            clips by group, stratified, ``val_fraction`` of them) or ``stratified`` (class-stratified
            train/val/test over every prepared clip, by group).
        official_split: which of the three official splits (1, 2, 3).
        num_frames: frames per clip (``T``).
        **kwargs: :class:`~datamodules.clip_cache.LabelledClipsDataModule`'s (``root``, ``val_fraction``,
            ``test_fraction``, ``store``, ``pack_dir``, ``image_size``, ``batch_size``, ...).
    """

    title = "UCF-101"
    cache_name = "ucf101"
    cache_version = CACHE_VERSION
    cache_files = ("meta.json", "clips.csv", "rgb", "flow")
    splits_help = "official (official_split's train and test lists, validation carved by group; default) or stratified"
    group_column = "group"
    default_classes = 101
    dataset_class = UCF101Dataset

    def __init__(self, *args: Any, official_split: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if official_split not in OFFICIAL_SPLITS:
            raise ValueError(f"official_split must be one of {OFFICIAL_SPLITS}, got {official_split!r}")
        self.official_split = official_split
        self.split_column = f"split{official_split}"

    def _check_root(self) -> dict:
        meta = super()._check_root()
        if self.split == "official" and self.official_split not in meta["splits"]:
            raise self._missing_error(f"{self.root} was prepared from lists without split {self.official_split} "
                                      f"(it has {meta['splits']}): choose data.official_split from those, or prepare "
                                      f"again with trainlist0{self.official_split}.txt and "
                                      f"testlist0{self.official_split}.txt in {LIST_DIR}/")
        return meta

    def _missing_error(self, problem: str) -> FileNotFoundError:
        return missing_cache_error(
            problem, title=self.title, root=self.root,
            looks_raw=self.root is not None and (self.root / LIST_DIR / CLASS_FILE).is_file(), command=COMMAND,
            raw_layout=RAW_LAYOUT, cache_layout=CACHE_LAYOUT, obtained=f"as {SOURCE}", prepare=PROG)
