"""Adapter file formats: safetensors I/O, kohya and diffusers/PEFT key tables, metadata, detection.

Modules, by role:

* :mod:`~tuner.formats.io`: atomic ``save_safetensors``; ``read_safetensors`` / ``read_header`` that
  validate a file before trusting it.
* :mod:`~tuner.formats.kohya`: kohya names (``lora_unet_...``), export and import of kohya state dicts.
* :mod:`~tuner.formats.ldm`: the diffusers <-> LDM UNet module-name table (FORMATS.md §1.5).
* :mod:`~tuner.formats.peft`: diffusers/PEFT namings (``unet.<path>.lora_A.weight`` and older ones).
* :mod:`~tuner.formats.metadata`: ``ss_*``, ``modelspec.*``, the ``tuner`` block and the sshs hashes.
* :mod:`~tuner.formats.detect`: which format and family a file is.
* :mod:`~tuner.formats.lorafile`: ``save_lora`` / ``load_lora``, the entry points.
* :mod:`~tuner.formats.embeddings`: textual-inversion files (``read_embedding``, kohya/diffusers/A1111
  writers, ``bundle_emb`` keys).
* :mod:`~tuner.formats.inspect`: ``inspect_file`` / ``format_inspection`` for ``tuner inspect``.

The in-memory representation is :class:`tuner.adapters.types.LoraWeights` with canonical module keys.
"""
