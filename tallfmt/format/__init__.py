"""The format layer: the bytes of .tall files and sharded indexes (FORMAT.md). No torch, no math on
tensors; numba only for byte planes, loaded when a plane is first split or merged."""
