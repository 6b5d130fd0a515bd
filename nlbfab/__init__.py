"""nlbfab: latent-variable models on the Neural Latents Benchmark '21, with Lightning Fabric.

Data flows one way, one module per stage: ``splits`` (names) -> ``synth``/``synth_nwb`` or
DANDI (NWB files) -> ``prep`` (per-split tensors, by the ``native`` engine, or ``nwb`` and
nlb_tools with ``--engine nlb_tools``) -> models ->
``submission`` -> ``scoring``. Importing nlbfab reads no file and touches no device.
"""
__version__ = "0.1.0"
