"""TempoMaster-TRT: TensorRT export toolchain and lean runtime for TempoMaster."""

__version__ = "0.1.0"
