"""Build the `text_corpus` TFDS dataset from a directory of .txt files.

    python -m attnlab.data.prepare --source_dir=../shared/data/shakespeare \
        --data_dir=~/tensorflow_datasets
"""

import glob
import os
import time

from absl import app, flags

from attnlab import metrics
from attnlab.data import text_corpus

_SOURCE = flags.DEFINE_string("source_dir", None, "Directory of .txt files.", required=True)
_DATA_DIR = flags.DEFINE_string(
  "data_dir", os.path.expanduser("~/tensorflow_datasets"), "TFDS data_dir to build into."
)


def main(argv):
  del argv
  files = glob.glob(os.path.join(_SOURCE.value, "**", "*.txt"), recursive=True)
  size = sum(os.path.getsize(f) for f in files)
  progress = metrics.Progress(total=2, label="data.prepare")
  progress.update(step="scanned", files=len(files), MB=f"{size / 1e6:.1f}")
  start = time.time()
  data_dir = os.path.expanduser(_DATA_DIR.value)
  text_corpus.prepare(_SOURCE.value, data_dir)
  progress.update(step="built text_corpus", into=data_dir, took=f"{time.time() - start:.0f}s")
  progress.close()


if __name__ == "__main__":
  app.run(main)
