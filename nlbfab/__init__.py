"""nlbfab: latent-variable models on the Neural Latents Benchmark '21, with Lightning Fabric.

Data flows one way, one module per stage: ``splits`` (names) -> ``synth``/``synth_nwb`` or
DANDI (NWB files) -> ``nwb`` (loading) -> ``prep`` (per-split tensors) -> models ->
``submission`` -> ``scoring``. Importing nlbfab reads no file and touches no device.
"""
__version__ = "0.1.0"
