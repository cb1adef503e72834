"""Run plumbing: device meshes and sharding, checkpoints, metric writers, multi-process setup, CPU settings, config I/O."""
