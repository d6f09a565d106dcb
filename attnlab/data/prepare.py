"""Build the `text_corpus` TFDS dataset from a directory of .txt files.

    python -m attnlab.data.prepare --source_dir=../shared/data/shakespeare \
        --data_dir=~/tensorflow_datasets
"""

import os

from absl import app, flags

from attnlab.data import text_corpus

_SOURCE = flags.DEFINE_string("source_dir", None, "Directory of .txt files.", required=True)
_DATA_DIR = flags.DEFINE_string(
  "data_dir", os.path.expanduser("~/tensorflow_datasets"), "TFDS data_dir to build into."
)


def main(argv):
  del argv
  text_corpus.prepare(_SOURCE.value, os.path.expanduser(_DATA_DIR.value))


if __name__ == "__main__":
  app.run(main)
