"""MM-Debiased: the valuation paper's 14,025 clips of VGGSound and Kinetics-400 in 10 classes,
chosen so that neither modality dominates over the data set while single samples still lean on one; audio +
video. The datamodule reads the cache that ``balance-prepare mm_debiased --raw RAW --out OUT`` writes (its
preparation is ``prepare_main`` here, where ``balance-prepare`` finds it)."""

from __future__ import annotations

from datamodules.clip_cache import LabelledClipsDataModule
from datamodules.kinetics_sounds import KineticsSoundsDataset
from datamodules.mm_debiased_prepare import CACHE_LAYOUT, CACHE_VERSION, COMMAND, PROG
from datamodules.mm_debiased_prepare import main as prepare_main  # noqa: F401 (balance-prepare finds it here)
from datamodules.mm_debiased_raw import LIST_FILE, RAW_LAYOUT, SOURCE
from datamodules.preparation import missing_cache_error


class MMDebiasedDataModule(LabelledClipsDataModule):
    """MM-Debiased from the prepared cache: fbank ``[1, 1024, 128]`` + frames ``[T, 3, S, S]`` (one per ``T``-th of
    the clip, as for Kinetics-Sounds), 10 classes.

    Args:
        split: ``official`` (the list's own training, validation and testing subsets) or ``stratified``
            (class-stratified train/val/test over every prepared clip).
        num_frames: frames per clip (``T``), one per ``T``-th of the clip; the valuation code uses 3.
        **kwargs: :class:`~datamodules.clip_cache.LabelledClipsDataModule`'s (``root``, ``val_fraction``,
            ``test_fraction``, ``store``, ``pack_dir``, ``image_size``, ``batch_size``, ...).
    """

    title = "MM-Debiased"
    cache_name = "mm_debiased"
    cache_version = CACHE_VERSION
    cache_files = ("meta.json", "clips.csv", "audio", "visual")
    splits_help = "official (the list's training/validation/testing subsets, default) or stratified"
    default_classes = 10  # the list's
    dataset_class = KineticsSoundsDataset

    def _missing_error(self, problem: str) -> FileNotFoundError:
        return missing_cache_error(
            problem, title=self.title, root=self.root,
            looks_raw=self.root is not None and (self.root / LIST_FILE).is_file(), command=COMMAND,
            raw_layout=RAW_LAYOUT, cache_layout=CACHE_LAYOUT, obtained=f"as {SOURCE}", prepare=PROG)
