"""What a checkpoint's bytes must prove before a run resumes from them.

  checksums.py  array checksums on device (pure, jittable)
  checks.py     integrity records, read errors told apart, one restore
                decision for every process (host; no orbax: all orbax calls
                stay in `checkpointing.py`)
"""
