"""Input pipelines: TFDS builders (`digits`, `mnist5k`, `byte_text`) and grain iterators.

Importing this package registers the `digits`, `mnist5k` and `byte_text` TFDS builders, so
`tfds.builder("digits")` works too. See `zoo.data.pipeline` for the API.
"""

from zoo.data.pipeline import dataset_info
from zoo.data.pipeline import get_builder
from zoo.data.pipeline import local_batch_size
from zoo.data.pipeline import make_iterator
