"""TFDS builder that stores a lab's preference pairs as array_record files (no TensorFlow needed).

The builder copies arrays that the lab has already computed (an ``.npz`` per split); it
generates nothing itself, so the stored bytes are exactly the lab's arrays. A user reads
them back in any process with ``tfds.builder_from_directory(path).as_data_source(split)``
or ``tfds.data_source(DATASET_NAME, split=..., data_dir=...)``.
"""

import os

import numpy as np
import tensorflow_datasets as tfds

DATASET_NAME = "gpo_lab"
DATASET_VERSION = "1.0.0"
SPLITS = ("train", "test")
INT_FIELDS = ("prompt", "chosen", "rejected", "chosen_mask", "rejected_mask")
FLOAT_FIELDS = ("ref_chosen_logps", "ref_rejected_logps", "gold_chosen", "gold_rejected",
                "label_p")
FIELDS = INT_FIELDS + FLOAT_FIELDS


def features(prompt_len: int, response_len: int) -> tfds.features.FeaturesDict:
  f = {"prompt": tfds.features.Tensor(shape=(prompt_len,), dtype=np.int32)}
  for name in INT_FIELDS[1:]:
    f[name] = tfds.features.Tensor(shape=(response_len,), dtype=np.int32)
  for name in FLOAT_FIELDS:
    f[name] = tfds.features.Tensor(shape=(), dtype=np.float32)
  return tfds.features.FeaturesDict(f)


class GpoLab(tfds.core.GeneratorBasedBuilder):
  """Preference pairs of one lab: prompt, chosen/rejected responses, masks, gold, ref log-probs."""

  name = DATASET_NAME
  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "Pairs sampled from the lab's reference policy, gold BT labels."}
  # No download checksums to locate: without this TFDS resolves the module's resource path,
  # which needs `importlib_resources` on Python 3.11 for packages installed in some layouts.
  code_path = None

  def __init__(self, *, source_dir: str, prompt_len: int, response_len: int, **kwargs):
    self._source_dir = source_dir
    self._prompt_len = prompt_len
    self._response_len = response_len
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=...) instead of dataset_info_from_configs: the latter needs the
    # builder to live in a registered package with a metadata directory.
    return tfds.core.DatasetInfo(
        builder=self,
        description="GPO lab preference pairs (see gpo_jax.lab).",
        features=features(self._prompt_len, self._response_len),
        # Keep example i at index i, so the stored order is the lab's order.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(os.path.join(self._source_dir, f"{s}.npz"))
            for s in SPLITS}

  def _generate_examples(self, path):
    with np.load(path) as z:
      arrays = {k: z[k] for k in FIELDS}
    for i in range(arrays["prompt"].shape[0]):
      yield i, {k: (arrays[k][i].astype(np.int32) if k in INT_FIELDS
                    else np.float32(arrays[k][i])) for k in FIELDS}


def write_dataset(pairs: dict[str, dict[str, np.ndarray]], data_dir: str, scratch_dir: str,
                  prompt_len: int, response_len: int) -> str:
  """Writes ``pairs[split][field]`` arrays as a TFDS dataset; returns the version directory."""
  os.makedirs(scratch_dir, exist_ok=True)
  for split in SPLITS:
    missing = [k for k in FIELDS if k not in pairs[split]]
    if missing:
      raise ValueError(f"split {split!r} lacks fields {missing}; need {list(FIELDS)}")
    np.savez(os.path.join(scratch_dir, f"{split}.npz"), **pairs[split])
  builder = GpoLab(source_dir=scratch_dir, prompt_len=prompt_len, response_len=response_len,
                   data_dir=data_dir)
  tfds.disable_progress_bar()
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(download_mode=tfds.GenerateMode.FORCE_REDOWNLOAD))
  return builder.data_dir


def read_split(version_dir: str, split: str) -> dict[str, np.ndarray]:
  """All examples of ``split`` as stacked NumPy arrays, through a TFDS data source."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
  source = tfds.builder_from_directory(version_dir).as_data_source(split=split)
  examples = source.__getitems__(list(range(len(source))))
  out = {}
  for k in FIELDS:
    dtype = np.int32 if k in INT_FIELDS else np.float32
    out[k] = np.asarray([e[k] for e in examples], dtype=dtype)
  return out
