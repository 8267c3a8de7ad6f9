"""`ipro prepare`: turn a folder of videos (and photos) into a training set with face pools.

For each input file:

1. Decode with PyAV, resample to `fps` by presentation time (so variable frame rate
   comes out evenly spaced), apply rotation metadata, and cut back-to-back clips of
   `frames` frames (`stride_s` leaves gaps between clip starts).
2. Detect faces on every sampled frame at source resolution and embed them with the
   configured recognizer. Faces whose box centre falls outside the training crop are
   ignored: they would not be in the clip the model sees.
3. Run the filters. Each one records a verdict (pass / fail / null = not applicable)
   and a reason that quotes the measured value and the threshold.
4. For kept clips write the first frame (PNG) and the clip (H.264 mp4), both resized
   and centre-cropped to `height` x `width`, and the face pool (safetensors, boxes and
   landmarks in clip pixels, people clustered with `identity_threshold`).

Stills (png, jpg, ...) become one-frame items with `is_still` set: they go through the
same face filters (except `length`), get a first frame and a pool but no clip. The
training loader uses them as first-frame-only items and skips them when a ground-truth
clip is asked for.

Reliability: every file is written atomically; after an input's clips are written its
record (`records/<input_id>.json`) is written, which marks it done. A rerun skips
inputs that have a record, and `manifest.parquet` and `summary.json` are always rebuilt
from all records, so a killed run loses at most the inputs in progress. Bad inputs
(unreadable, corrupt, empty, not a video, too large) are recorded as failed with a
reason and do not stop the run. To retry one, delete its record.

Sharding: `shard=(i, n)` takes the inputs whose stable hash of the relative path is i
mod n. Shards may write into the same OUT_DIR (records are per input; run once more
without a shard at the end to rebuild the manifest from all records) or into separate
ones, combined with `merge_prepared(sources, dest)` (`ipro prepare-merge`).
"""

from ipro.data.prepare.config import FILTERS, PrepareConfig, load_config
from ipro.data.prepare.run import finalize, merge_prepared, prepare
from ipro.data.prepare.scan import caption_for, in_shard, list_inputs, load_captions, parse_shard

__all__ = [
    "FILTERS",
    "PrepareConfig",
    "caption_for",
    "finalize",
    "in_shard",
    "list_inputs",
    "load_captions",
    "load_config",
    "merge_prepared",
    "parse_shard",
    "prepare",
]
