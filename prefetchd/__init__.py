"""prefetchd: stream JUMP Cell Painting fields from S3 into shared memory, ahead of the trainer."""

__version__ = "0.1.0"
