"""Adapters for training frameworks, one module per framework, each importing its framework only when
imported itself (``import noisescale`` imports none of them):

- :mod:`noisescale.integrations.lightning`: ``NoiseScaleCallback`` for ``lightning.Trainer``
  (extra ``[lightning]``).
- :mod:`noisescale.integrations.transformers`: ``NoiseScaleCallback`` for ``transformers.Trainer``
  (extra ``[transformers]``).
- :mod:`noisescale.integrations.accelerate`: ``AcceleratedNoiseScale`` for ``accelerator.accumulate``
  loops (extra ``[accelerate]``).

docs/integrations.md says where each one hooks in and why that is correct.
"""

__all__: list[str] = []
