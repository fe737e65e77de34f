"""Media helpers: speech decoding, image loading and size buckets, mp4 writing."""
