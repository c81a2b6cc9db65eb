"""easy-VQA: questions about 64x64 images of one coloured shape, 13 answers (the ``easy-vqa`` pip package's data).

Each sample is one question: the image (``visual``) and the question's token ids (``text``); the label is the
answer's index in ``answers.txt``. The package ships 4,000 training images with 38,575 questions and 1,000 test
images with 9,673 questions. The validation split is carved from the training images, by image, so that no image
has questions in both training and validation. Yes/no questions (about 3/4 of them) need both modalities
together; "what color/shape" questions are answered by the image once the text says which kind is asked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from datamodules.base import MultimodalDataModule
from datamodules.text import Vocabulary

LAYOUT = """<root>/
  answers.txt                 one answer per line (the class order)
  train/questions.json        [[question, answer, image_id], ...]
  train/images/<image_id>.png
  test/questions.json
  test/images/<image_id>.png"""


def default_root() -> Path:
    """The data directory of the installed ``easy-vqa`` package."""
    try:
        import easy_vqa
    except ImportError as error:
        raise FileNotFoundError(
            "easy-VQA needs the `easy-vqa` package (pip install easy-vqa) or data.root pointing at a directory "
            f"laid out as\n{LAYOUT}"
        ) from error
    return Path(easy_vqa.__file__).parent / "data"


def read_questions(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Reads ``questions.json``: (question texts, answers, image ids)."""
    rows = json.loads(path.read_text())
    return [r[0] for r in rows], [r[1] for r in rows], np.array([int(r[2]) for r in rows], dtype=np.int64)


def load_images(directory: Path, image_ids: np.ndarray) -> torch.Tensor:
    """Decodes ``<directory>/<id>.png`` for every id, as RGB: ``uint8 [len(image_ids), 3, H, W]``."""
    arrays = []
    for image_id in image_ids:
        with Image.open(directory / f"{image_id}.png") as image:
            arrays.append(np.asarray(image.convert("RGB")))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class VQADataset(Dataset):
    """Questions paired with their images; images are shared uint8 tensors, normalised to [-1, 1] on access.

    Args:
        images: ``uint8 [num_images, 3, H, W]``.
        image_rows: the row of ``images`` of every question.
        tokens: ``LongTensor[num_questions, max_length]`` question token ids.
        labels: answer index of every question.
        image_ids: the data set's image id of every question (for inspection and tests).
        texts: the question texts (for inspection and tests).
    """

    def __init__(
        self,
        images: torch.Tensor,
        image_rows: torch.Tensor,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        image_ids: np.ndarray,
        texts: list[str],
    ) -> None:
        self.images = images
        self.image_rows = image_rows
        self.tokens = tokens
        self.labels = labels
        self.image_ids = image_ids
        self.texts = texts

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        image = self.images[self.image_rows[index]].float().div_(127.5).sub_(1.0)
        return {"inputs": {"visual": image, "text": self.tokens[index]}, "label": int(self.labels[index])}


class EasyVQADataModule(MultimodalDataModule):
    """easy-VQA with a validation split carved from the training images.

    The vocabulary is built from the questions of the training part only (validation and test words unseen in
    training map to unknown); ``encoder_kwargs`` passes its size to the text encoder. All images are decoded
    once into memory (5,000 small PNGs, about 60 MB).

    Args:
        root: a directory in the package's layout (default: the installed ``easy-vqa`` package's data).
        val_fraction: fraction of the training images (with all their questions) moved to validation; the
            images are chosen by a permutation seeded with ``seed``.
        max_length: question length in tokens (longer questions are truncated; the longest has 10 tokens).
        min_count: training-word count below which a word maps to unknown.
        **kwargs: the base datamodule's arguments (batch_size, seed, missing_rate, ...).
    """

    modalities = ["visual", "text"]
    num_classes = 13

    def __init__(
        self,
        root: str | None = None,
        val_fraction: float = 0.1,
        max_length: int = 16,
        min_count: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.root = Path(root).expanduser() if root else None
        self.val_fraction = val_fraction
        self.max_length = max_length
        self.min_count = min_count
        self.vocab: Vocabulary | None = None
        self.answers: list[str] = []

    @property
    def encoder_kwargs(self) -> dict[str, dict[str, int]]:
        if self.vocab is None:
            raise RuntimeError("the vocabulary is built in setup(): call it before reading encoder_kwargs")
        return {"text": {"vocab_size": len(self.vocab)}}

    def _check_root(self) -> Path:
        root = self.root or default_root()
        needed = [root / "answers.txt"]
        needed += [root / part / name for part in ("train", "test") for name in ("questions.json", "images")]
        missing = [str(p) for p in needed if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"easy-VQA data not found (missing {missing}); expected (pip install easy-vqa provides it)\n{LAYOUT}"
            )
        return root

    def split_images(self, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Splits the distinct training image ids into (train, validation) ids, seeded by ``seed``."""
        unique = np.unique(image_ids)
        shuffled = np.random.default_rng(self.seed).permutation(unique)
        n_val = max(1, int(round(self.val_fraction * len(unique))))
        return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])

    def build_datasets(self) -> dict[str, Dataset]:
        root = self._check_root()
        self.answers = [a.strip() for a in (root / "answers.txt").read_text().splitlines() if a.strip()]
        if len(self.answers) != self.num_classes:
            raise ValueError(f"{root / 'answers.txt'} lists {len(self.answers)} answers, expected {self.num_classes}")
        answer_index = {a: i for i, a in enumerate(self.answers)}

        questions = {}
        for part in ("train", "test"):
            texts, answers, image_ids = read_questions(root / part / "questions.json")
            unknown = sorted(set(answers) - set(answer_index))
            if unknown:
                raise ValueError(f"{root / part / 'questions.json'} has answers {unknown} not in answers.txt")
            labels = np.array([answer_index[a] for a in answers], dtype=np.int64)
            questions[part] = (texts, labels, image_ids)

        train_ids, val_ids = self.split_images(questions["train"][2])
        in_train = np.isin(questions["train"][2], train_ids)
        selection = {
            "train": ("train", np.flatnonzero(in_train)),
            "val": ("train", np.flatnonzero(~in_train)),
            "test": ("test", np.arange(len(questions["test"][1]))),
        }
        self.vocab = Vocabulary.build(
            (questions["train"][0][i] for i in selection["train"][1]), min_count=self.min_count
        )

        images: dict[str, tuple[torch.Tensor, dict[int, int]]] = {}
        for part in ("train", "test"):
            ids = np.unique(questions[part][2])
            images[part] = (load_images(root / part / "images", ids), {int(i): row for row, i in enumerate(ids)})

        datasets = {}
        for split, (part, rows) in selection.items():
            texts, labels, image_ids = questions[part]
            pixels, row_of = images[part]
            split_texts = [texts[i] for i in rows]
            datasets[split] = VQADataset(
                images=pixels,
                image_rows=torch.tensor([row_of[int(image_ids[i])] for i in rows], dtype=torch.long),
                tokens=self.vocab.encode_batch(split_texts, self.max_length),
                labels=torch.from_numpy(labels[rows]),
                image_ids=image_ids[rows],
                texts=split_texts,
            )
        return datasets
