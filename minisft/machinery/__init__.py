"""What makes the lesson in minisft/sft run for real: flags, files, caches, checkpoints, processes, trackers."""
